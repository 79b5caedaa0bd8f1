/* Exercises the file system calls a program makes against its cwd: creates,
 * writes, appends, renames, seeks, pread/pwrite, truncates, unlinks, lists,
 * stats, writev/readv, dup/dup2/fcntl, links and symlinks. Prints what it
 * saw (no times, no inode numbers, no absolute paths) and leaves a known
 * set of files behind. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

static int failures;

static const char *errname(int e)
{
    switch (e) {
    case 0: return "OK";
    case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST";
    case ENOTEMPTY: return "ENOTEMPTY";
    case EBADF: return "EBADF";
    case EISDIR: return "EISDIR";
    case ENOTDIR: return "ENOTDIR";
    case EINVAL: return "EINVAL";
    case ESPIPE: return "ESPIPE";
    case ELOOP: return "ELOOP";
    default: return "other";
    }
}

#define CHECK(expr)                                                         \
    do {                                                                    \
        if (!(expr)) {                                                      \
            printf("FAILED line %d: %s (errno %s)\n", __LINE__, #expr,      \
                   errname(errno));                                         \
            failures++;                                                     \
        }                                                                   \
    } while (0)

/* Prints the result of a call expected to fail, as an errno name. */
#define EXPECT_ERR(label, expr)                                             \
    do {                                                                    \
        long r_;                                                            \
        errno = 0;                                                          \
        r_ = (long)(expr);                                                  \
        printf("%s: %s\n", label, r_ < 0 ? errname(errno) : "succeeded");   \
    } while (0)

static void write_file(const char *path, const char *text, int flags)
{
    int fd = open(path, O_WRONLY | O_CREAT | flags, 0644);
    CHECK(fd >= 0);
    CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    CHECK(close(fd) == 0);
}

static void cat(const char *path)
{
    char buf[256];
    ssize_t n;
    int fd = open(path, O_RDONLY);
    CHECK(fd >= 0);
    n = read(fd, buf, sizeof(buf) - 1);
    CHECK(n >= 0);
    buf[n < 0 ? 0 : n] = 0;
    printf("%s contains [", path);
    fwrite(buf, 1, n < 0 ? 0 : (size_t)n, stdout);
    printf("]\n");
    close(fd);
}

static const char *type_of(mode_t m)
{
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "dir";
    if (S_ISLNK(m)) return "symlink";
    if (S_ISFIFO(m)) return "fifo";
    return "other";
}

static void show_stat(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0) {
        printf("lstat %s: %s\n", path, errname(errno));
        return;
    }
    printf("%s: %s mode %03o nlink %lu", path, type_of(st.st_mode),
           (unsigned)(st.st_mode & 07777), (unsigned long)st.st_nlink);
    if (!S_ISDIR(st.st_mode))
        printf(" size %lld", (long long)st.st_size);
    printf("\n");
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void list_dir(const char *path)
{
    char *names[256];
    size_t n = 0, i;
    struct dirent *de;
    DIR *d = opendir(path);
    CHECK(d != NULL);
    if (!d)
        return;
    while ((de = readdir(d)) != NULL && n < 256)
        names[n++] = strdup(de->d_name);
    closedir(d);
    qsort(names, n, sizeof(names[0]), cmp_str);
    printf("listing %s (%zu entries):", path, n);
    for (i = 0; i < n; i++) {
        printf(" %s", names[i]);
        free(names[i]);
    }
    printf("\n");
}

int main(void)
{
    char buf[8192], a[8], b[16], cwd[4096];
    struct iovec iov[3];
    struct stat st;
    int fd, fd2, fd3, flags, dirfd;
    ssize_t n;
    off_t off;
    size_t i;
    char *bigbuf;

    /* Directories. */
    CHECK(mkdir("d1", 0755) == 0);
    CHECK(mkdir("d1/sub", 0750) == 0);
    CHECK(mkdir("gone", 0755) == 0);
    EXPECT_ERR("mkdir existing", mkdir("d1", 0755));
    write_file("gone/file", "x", O_TRUNC);
    EXPECT_ERR("rmdir non-empty", rmdir("gone"));
    CHECK(unlink("gone/file") == 0);
    CHECK(rmdir("gone") == 0);
    EXPECT_ERR("rmdir removed", rmdir("gone"));

    /* Create, append, rename. */
    write_file("a.txt", "hello\n", O_TRUNC);
    write_file("a.txt", "world\n", O_APPEND);
    cat("a.txt");
    CHECK(rename("a.txt", "d1/renamed.txt") == 0);
    EXPECT_ERR("open renamed-away", open("a.txt", O_RDONLY));
    EXPECT_ERR("open O_EXCL existing",
               open("d1/renamed.txt", O_WRONLY | O_CREAT | O_EXCL, 0644));
    cat("d1/renamed.txt");

    /* lseek, read, write past the end, pread/pwrite. */
    fd = open("b.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0);
    for (i = 0; i < sizeof(buf); i++)
        buf[i] = (char)('a' + i % 26);
    CHECK(write(fd, buf, sizeof(buf)) == (ssize_t)sizeof(buf));
    off = lseek(fd, 100, SEEK_SET);
    printf("lseek set -> %lld\n", (long long)off);
    n = read(fd, b, 10);
    printf("read %zd at 100: %.10s\n", n, b);
    printf("lseek cur -> %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
    printf("lseek end -> %lld\n", (long long)lseek(fd, 0, SEEK_END));
    printf("lseek end+1000 -> %lld\n", (long long)lseek(fd, 1000, SEEK_END));
    CHECK(write(fd, "TAIL", 4) == 4);
    CHECK(fstat(fd, &st) == 0);
    printf("size after sparse write %lld\n", (long long)st.st_size);
    CHECK(pwrite(fd, "PWRITE", 6, 10) == 6);
    memset(b, 0, sizeof(b));
    n = pread(fd, b, 12, 5);
    printf("pread %zd at 5: %.12s\n", n, b);
    n = pread(fd, b, 4, 8192 + 500);
    printf("pread in hole: %zd bytes, zero=%d\n", n, b[0] == 0 && b[3] == 0);
    printf("offset unchanged by pread/pwrite: %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
    EXPECT_ERR("lseek negative", lseek(fd, -1, SEEK_SET));
    CHECK(ftruncate(fd, 5000) == 0);
    CHECK(fstat(fd, &st) == 0);
    printf("size after ftruncate %lld\n", (long long)st.st_size);
    CHECK(fsync(fd) == 0);
    CHECK(fdatasync(fd) == 0);
    CHECK(close(fd) == 0);
    CHECK(truncate("b.bin", 4000) == 0);
    show_stat("b.bin");
    EXPECT_ERR("read closed fd", read(fd, b, 1));

    /* writev / readv. */
    fd = open("vec.txt", O_RDWR | O_CREAT | O_TRUNC, 0640);
    CHECK(fd >= 0);
    iov[0].iov_base = "one ";
    iov[0].iov_len = 4;
    iov[1].iov_base = "";
    iov[1].iov_len = 0;
    iov[2].iov_base = "two three\n";
    iov[2].iov_len = 10;
    printf("writev -> %zd\n", writev(fd, iov, 3));
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    memset(a, 0, sizeof(a));
    memset(b, 0, sizeof(b));
    iov[0].iov_base = a;
    iov[0].iov_len = 6;
    iov[1].iov_base = b;
    iov[1].iov_len = 15;
    n = readv(fd, iov, 2);
    printf("readv -> %zd [%.6s] [%.8s]\n", n, a, b);

    /* dup, dup2, fcntl. */
    fd2 = dup(fd);
    CHECK(fd2 > fd);
    CHECK(write(fd2, "via dup\n", 8) == 8);
    printf("shared offset after dup write: %lld\n", (long long)lseek(fd, 0, SEEK_CUR));
    fd3 = dup2(fd, 42);
    printf("dup2 -> %d\n", fd3);
    CHECK(write(42, "via dup2\n", 9) == 9);
    flags = fcntl(42, F_GETFD);
    printf("F_GETFD after dup2: %d\n", flags);
    CHECK(fcntl(42, F_SETFD, FD_CLOEXEC) == 0);
    printf("F_GETFD after set: %d\n", fcntl(42, F_GETFD));
    printf("F_GETFL accmode rdwr: %d\n", (fcntl(fd, F_GETFL) & O_ACCMODE) == O_RDWR);
    fd3 = fcntl(fd, F_DUPFD_CLOEXEC, 50);
    printf("F_DUPFD_CLOEXEC >= 50: %d cloexec %d\n", fd3 >= 50, fcntl(fd3, F_GETFD));
    CHECK(close(fd3) == 0);
    CHECK(close(42) == 0);
    CHECK(close(fd2) == 0);
    CHECK(close(fd) == 0);
    EXPECT_ERR("fcntl closed fd", fcntl(42, F_GETFD));
    fd = open("vec.txt", O_WRONLY | O_APPEND);
    CHECK(fd >= 0);
    printf("F_GETFL append: %d\n", (fcntl(fd, F_GETFL) & O_APPEND) != 0);
    EXPECT_ERR("read write-only fd", read(fd, b, 1));
    CHECK(write(fd, "appended\n", 9) == 9);
    close(fd);
    cat("vec.txt");

    /* Symlinks and hard links. */
    CHECK(symlink("d1/renamed.txt", "link") == 0);
    memset(buf, 0, sizeof(buf));
    n = readlink("link", buf, sizeof(buf) - 1);
    printf("readlink -> %zd [%s]\n", n, buf);
    CHECK(stat("link", &st) == 0);
    printf("stat through link: %s size %lld\n", type_of(st.st_mode), (long long)st.st_size);
    show_stat("link");
    CHECK(symlink("nowhere", "dangling") == 0);
    EXPECT_ERR("stat dangling", stat("dangling", &st));
    CHECK(unlink("dangling") == 0);
    CHECK(link("vec.txt", "hard.txt") == 0);
    show_stat("vec.txt");
    EXPECT_ERR("readlink regular file", readlink("vec.txt", buf, sizeof(buf)));

    /* *at calls relative to a directory fd. */
    dirfd = open("d1", O_RDONLY | O_DIRECTORY);
    CHECK(dirfd >= 0);
    fd = openat(dirfd, "sub/deep.txt", O_WRONLY | O_CREAT | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(write(fd, "deep\n", 5) == 5);
    close(fd);
    CHECK(mkdirat(dirfd, "tmpdir", 0700) == 0);
    CHECK(fstatat(dirfd, "tmpdir", &st, 0) == 0);
    printf("fstatat tmpdir: %s\n", type_of(st.st_mode));
    CHECK(unlinkat(dirfd, "tmpdir", AT_REMOVEDIR) == 0);
    CHECK(renameat(dirfd, "sub/deep.txt", dirfd, "sub/deeper.txt") == 0);
    printf("faccessat deeper: %d\n", faccessat(dirfd, "sub/deeper.txt", R_OK, 0));
    close(dirfd);
    EXPECT_ERR("open dir for writing", open("d1", O_WRONLY));
    EXPECT_ERR("open through a file", open("b.bin/x", O_RDONLY));

    /* chdir and getcwd (the absolute path differs from run to run). */
    CHECK(chdir("d1/sub") == 0);
    CHECK(getcwd(cwd, sizeof(cwd)) != NULL);
    n = (ssize_t)strlen(cwd);
    printf("getcwd ends with /d1/sub: %d\n", n >= 7 && strcmp(cwd + n - 7, "/d1/sub") == 0);
    write_file("made-in-sub.txt", "sub\n", O_TRUNC);
    CHECK(chdir("../..") == 0);

    /* chmod, access. */
    write_file("private.txt", "secret\n", O_TRUNC);
    CHECK(chmod("private.txt", 0600) == 0);
    show_stat("private.txt");
    printf("access F_OK missing: %s\n", access("missing", F_OK) == 0 ? "OK" : errname(errno));

    /* Temporary files, unlinked again. */
    write_file("tmp1", "1", O_TRUNC);
    write_file("tmp2", "2", O_TRUNC);
    CHECK(unlink("tmp1") == 0);
    CHECK(unlink("tmp2") == 0);
    EXPECT_ERR("unlink missing", unlink("tmp1"));
    EXPECT_ERR("unlink directory", unlink("d1"));

    /* One large write and read in a single call each. */
    bigbuf = malloc(1 << 20);
    CHECK(bigbuf != NULL);
    for (i = 0; i < (1 << 20); i++)
        bigbuf[i] = (char)(i * 7 + i / 4096);
    fd = open("big.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0);
    printf("big write -> %zd\n", write(fd, bigbuf, 1 << 20));
    CHECK(lseek(fd, 0, SEEK_SET) == 0);
    memset(bigbuf, 0, 1 << 20);
    n = read(fd, bigbuf, 1 << 20);
    {
        int same = 1;
        for (i = 0; i < (1 << 20); i++)
            if (bigbuf[i] != (char)(i * 7 + i / 4096))
                same = 0;
        printf("big read -> %zd intact %d\n", n, same);
    }
    close(fd);
    free(bigbuf);
    EXPECT_ERR("lseek bad fd", lseek(-1, 0, SEEK_SET));
    {
        int p[2];
        CHECK(pipe(p) == 0);
        EXPECT_ERR("lseek on pipe", lseek(p[0], 0, SEEK_SET));
        CHECK(write(p[1], "pipe", 4) == 4);
        memset(b, 0, sizeof(b));
        n = read(p[0], b, sizeof(b));
        printf("pipe read %zd [%.4s]\n", n, b);
        close(p[0]);
        close(p[1]);
    }

    list_dir(".");
    list_dir("d1");
    list_dir("d1/sub");
    show_stat("d1");
    show_stat("d1/sub");
    show_stat("d1/renamed.txt");
    show_stat("d1/sub/deeper.txt");
    show_stat("hard.txt");
    show_stat("big.bin");
    printf("failures %d\n", failures);
    return failures ? 1 : 0;
}
