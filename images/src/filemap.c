/* File-backed and shared memory, as Linux gives it: shared mappings are the page cache
 * (coherent with read/write/ftruncate, written back by msync and munmap), private mappings
 * show the file until written (copy-on-write), MADV_DONTNEED on a private page brings the
 * file back, mprotect from PROT_NONE shows the file, mremap growth shows the file's tail,
 * memfd works like a file, and the access checks give Linux's errno.
 *
 * Usage: filemap            every check, printing what it sees
 *        filemap sigbus     then touch a shared page past the end of its file (SIGBUS) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PG 4096L

static const char *en(int e) {
    switch (e) {
    case 0: return "ok";
    case EACCES: return "EACCES"; case EINVAL: return "EINVAL"; case ENODEV: return "ENODEV";
    case EBADF: return "EBADF"; case ENOMEM: return "ENOMEM"; case EFAULT: return "EFAULT";
    case EPERM: return "EPERM"; case EEXIST: return "EEXIST"; case ENXIO: return "ENXIO";
    case EOVERFLOW: return "EOVERFLOW";
    default: return "other";
    }
}

static char c0(char c) { return c ? c : '0'; }

static int make(const char *name, char fill, long pages) {
    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0644);
    char *b = malloc(pages * PG);
    for (long i = 0; i < pages; i++) memset(b + i * PG, fill + i, PG);
    if (write(fd, b, pages * PG) != pages * PG) { puts("write failed"); exit(1); }
    free(b);
    return fd;
}

static void try_map(const char *what, size_t len, int prot, int flags, int fd, off_t off) {
    errno = 0;
    void *p = mmap(NULL, len, prot, flags, fd, off);
    printf("%-40s %s\n", what, p == MAP_FAILED ? en(errno) : "mapped");
    if (p != MAP_FAILED) munmap(p, len);
}

int main(int argc, char **argv) {
    int fd = make("data.bin", 'a', 4);
    char *sh = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *sh2 = mmap(NULL, 4 * PG, PROT_READ, MAP_SHARED, fd, 0);
    char *pr = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (sh == MAP_FAILED || sh2 == MAP_FAILED || pr == MAP_FAILED) { puts("mmap failed"); return 1; }
    printf("initial: %c %c %c %c\n", sh[0], sh[PG], pr[2 * PG], sh2[3 * PG]);

    /* A store through one shared mapping is the file and the other mapping. */
    sh[5] = 'X';
    char b[8] = {0};
    pread(fd, b, 1, 5);
    printf("store via shared: pread %c, other mapping %c, private %c\n", b[0], sh2[5], pr[5]);

    /* Private: copy-on-write. */
    pr[PG] = 'P';
    pwrite(fd, "QR", 2, PG);
    printf("after private store + pwrite: private %c%c shared %c%c\n", pr[PG], pr[PG + 1], sh[PG], sh[PG + 1]);
    madvise(pr + PG, PG, MADV_DONTNEED);
    printf("private after DONTNEED: %c%c\n", pr[PG], pr[PG + 1]);

    /* write() and ftruncate() seen through the mappings. */
    lseek(fd, 2 * PG + 7, SEEK_SET);
    write(fd, "W", 1);
    printf("after write: shared %c private %c\n", sh[2 * PG + 7], pr[2 * PG + 7]);
    ftruncate(fd, 3 * PG);
    ftruncate(fd, 4 * PG);
    printf("after truncate+extend: shared[3pg]=%d private[3pg]=%d\n", sh[3 * PG], pr[3 * PG]);

    /* msync and munmap write back; a new mapping sees it. */
    memcpy(sh + 100, "synced", 6);
    printf("msync: %d\n", msync(sh, 4 * PG, MS_SYNC));
    memcpy(sh + 3 * PG + 1, "unmapped", 8);
    munmap(sh, 4 * PG);
    pread(fd, b, 8, 3 * PG + 1);
    printf("after munmap: %.8s\n", b);

    /* PROT_NONE then mprotect shows the file (private and shared). */
    char *n = mmap(NULL, 2 * PG, PROT_NONE, MAP_PRIVATE, fd, 0);
    int rc = mprotect(n, 2 * PG, PROT_READ);
    printf("mprotect private: %d -> %c\n", rc, c0(n[PG]));
    char *ns = mmap(NULL, 2 * PG, PROT_NONE, MAP_SHARED, fd, 0);
    rc = mprotect(ns + PG, PG, PROT_READ);
    printf("mprotect shared: %d -> %c\n", rc, c0(ns[PG]));

    /* mremap growth of a private file mapping shows the file's tail. */
    char *g = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    g[1] = 'G';
    char *g2 = mremap(g, PG, 3 * PG, MREMAP_MAYMOVE);
    if (g2 == MAP_FAILED) printf("mremap: %s\n", en(errno));
    else printf("mremap grown: %c%c %c %c\n", g2[0], g2[1], g2[PG], g2[2 * PG + 7]);

    /* Offsets: a mapping from page 2 on. */
    char *o = mmap(NULL, PG, PROT_READ, MAP_SHARED, fd, 2 * PG);
    printf("offset 2 pages: %c\n", o == MAP_FAILED ? '!' : o[7]);

    /* memfd: shared memory with a size. */
    int m = memfd_create("probe", MFD_CLOEXEC);
    ftruncate(m, 2 * PG);
    char *mm = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    memcpy(mm + PG, "memfd", 5);
    pread(m, b, 5, PG);
    printf("memfd: %.5s\n", b);
    struct stat st;
    fstat(m, &st);
    printf("memfd size %ld\n", (long)st.st_size);

    /* What Linux refuses. */
    int ro = open("data.bin", O_RDONLY);
    try_map("shared writable of O_RDONLY", PG, PROT_READ | PROT_WRITE, MAP_SHARED, ro, 0);
    try_map("private writable of O_RDONLY", PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, ro, 0);
    char *r = mmap(NULL, PG, PROT_READ, MAP_SHARED, ro, 0);
    errno = 0;
    rc = mprotect(r, PG, PROT_READ | PROT_WRITE);
    printf("%-40s %s\n", "mprotect write on shared O_RDONLY", rc ? en(errno) : "ok");
    int wo = open("data.bin", O_WRONLY);
    try_map("any mapping of O_WRONLY", PG, PROT_READ, MAP_PRIVATE, wo, 0);
    int ap = open("data.bin", O_RDWR | O_APPEND);
    try_map("shared writable of O_APPEND", PG, PROT_READ | PROT_WRITE, MAP_SHARED, ap, 0);
    int pfd[2];
    pipe(pfd);
    try_map("a pipe", PG, PROT_READ, MAP_PRIVATE, pfd[0], 0);
    try_map("a closed descriptor", PG, PROT_READ, MAP_PRIVATE, 99, 0);
    try_map("unaligned offset", PG, PROT_READ, MAP_PRIVATE, fd, 100);
    try_map("/dev/zero shared", PG, PROT_READ | PROT_WRITE, MAP_SHARED, open("/dev/zero", O_RDWR), 0);

    /* /proc/self/maps names the file and tells shared from private. */
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int named = 0, shared = 0;
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, "/data.bin")) {
            named++;
            if (line[21] == 's' || strstr(line, "-s ")) shared++;
        }
    printf("maps: data.bin %s, shared lines %s\n", named ? "named" : "missing", shared ? "yes" : "no");

    /* mremap with MREMAP_FIXED keeps a shared mapping the file's; an overlapping target is
     * EINVAL; a shrinking move drops the tail. */
    char *fm = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *target = mmap(NULL, 4 * PG, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    errno = 0;
    void *ov = mremap(fm, 2 * PG, 2 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, fm + PG);
    printf("%-40s %s\n", "mremap onto itself", ov == MAP_FAILED ? en(errno) : "moved");
    char *moved = mremap(fm, 2 * PG, 2 * PG, MREMAP_MAYMOVE | MREMAP_FIXED, target + PG);
    if (moved == MAP_FAILED) printf("mremap fixed: %s\n", en(errno));
    else {
        moved[PG + 3] = 'M';
        pread(fd, b, 1, PG + 3);
        printf("store after a fixed move reaches the file: %c\n", b[0]);
        char *smaller = mremap(moved, 2 * PG, PG, MREMAP_MAYMOVE | MREMAP_FIXED, target);
        printf("shrinking move: %s, reads %c\n", smaller == MAP_FAILED ? en(errno) : "ok",
               smaller == MAP_FAILED ? '!' : smaller[7]);
    }
    /* A read into a page past the end of a file is EFAULT and takes nothing from the pipe. */
    int pp[2];
    pipe(pp);
    write(pp[1], "XY", 2);
    char *eof = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, m, 0);
    ftruncate(m, PG);
    errno = 0;
    long rr = read(pp[0], eof + PG, 2);
    printf("read into a page past EOF: %ld %s\n", rr, rr < 0 ? en(errno) : "");
    char left[4] = {0};
    printf("pipe still holds %ld bytes: %.2s\n", (long)read(pp[0], left, 2), left);

    /* mmap flags Linux checks. */
    try_map("no mapping type", PG, PROT_READ, MAP_ANONYMOUS, -1, 0);
    try_map("SHARED_VALIDATE with an unknown flag", PG, PROT_READ, MAP_SHARED_VALIDATE | 0x200000, fd, 0);
    try_map("GROWSDOWN of a file", PG, PROT_READ, MAP_PRIVATE | MAP_GROWSDOWN, fd, 0);
    char *low = mmap(NULL, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    printf("MAP_32BIT below 2 GiB: %s\n", low != MAP_FAILED && (unsigned long)low < 0x80000000UL ? "yes" : "no");

    /* brk lowered inside a page keeps the bytes before the end of that page. */
    char *b0 = (char *)syscall(SYS_brk, 0); /* raw: musl's brk/sbrk refuse to move it */
    syscall(SYS_brk, b0 + PG);
    b0[100] = 'W';
    syscall(SYS_brk, b0 + 50);
    printf("after brk inside the page: %c\n", b0[100] ? b0[100] : '0');

    if (argc > 1 && !strcmp(argv[1], "sigbus")) {
        char *t = mmap(NULL, 2 * PG, PROT_READ, MAP_SHARED, fd, 0);
        ftruncate(fd, PG);
        printf("before the access past the end\n");
        fflush(stdout);
        printf("%d\n", t[PG + 1]);
    }
    return 0;
}
