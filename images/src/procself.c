/* The process's own /proc files describe the process itself: cmdline and environ as they
 * are in its memory, comm after prctl(PR_SET_NAME), status, stat, statm, limits and maps
 * consistent with what the process knows of itself, its descriptors listed in fd/ with
 * fdinfo/N positions and flags. Printed as facts that hold natively, to be compared with
 * the same program run natively.
 *
 * procself ARGS...: at least two arguments, the first at least 3 characters long. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

extern char **environ;

static int readall(const char *p, char *buf, int cap) {
    int fd = open(p, O_RDONLY), n = 0, r;
    if (fd < 0) return -1;
    while (n < cap && (r = read(fd, buf + n, cap - n)) > 0) n += r;
    close(fd);
    return n;
}

/* Whether the NUL-separated fields of buf[0..n) are exactly v[0..count). */
static int fields_match(const char *buf, int n, char **v, int count) {
    int i = 0;
    for (int off = 0; off < n; i++) {
        if (i >= count || strcmp(buf + off, v[i]) != 0) return 0;
        off += (int)strlen(buf + off) + 1;
    }
    return i == count;
}

static long status_field(const char *key) {
    static char buf[8192];
    int n = readall("/proc/self/status", buf, sizeof buf - 1);
    if (n <= 0) return -1;
    buf[n] = 0;
    char *p = strstr(buf, key);
    return p ? atol(p + strlen(key)) : -1;
}

static int cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

int main(int argc, char **argv) {
    static char buf[65536];
    int n = readall("/proc/self/cmdline", buf, sizeof buf);
    printf("cmdline fields match argv: %d\n", fields_match(buf, n, argv, argc));
    memcpy(argv[1], "XYZ", 3);
    n = readall("/proc/self/cmdline", buf, sizeof buf);
    printf("cmdline follows argv rewritten in memory: %d\n", fields_match(buf, n, argv, argc));
    int envc = 0;
    while (environ[envc]) envc++;
    n = readall("/proc/self/environ", buf, sizeof buf);
    printf("environ fields match envp: %d\n", fields_match(buf, n, environ, envc));

    prctl(PR_SET_NAME, "renamed-by-prctl");
    n = readall("/proc/self/comm", buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("comm: %s", buf);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", getpid());
    n = readall(path, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("comm by pid: %s", buf);

    n = readall("/proc/self/status", buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    char *name = strstr(buf, "Name:\t");
    printf("status Name: %.15s\n", name ? name + 6 : "(none)");
    printf("status Pid is getpid: %d\n", status_field("\nPid:") == getpid());
    printf("status PPid is getppid: %d\n", status_field("PPid:") == getppid());
    printf("status Threads: %ld\n", status_field("Threads:"));
    printf("status Uid is getuid: %d\n", status_field("Uid:") == (long)getuid());
    long vmsize = status_field("VmSize:"), vmrss = status_field("VmRSS:");
    printf("status VmSize >= VmRSS > 0: %d\n", vmsize >= vmrss && vmrss > 0);

    n = readall("/proc/self/stat", buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    char *close_paren = strrchr(buf, ')');
    printf("stat pid is getpid: %d, name (%.*s)\n", atoi(buf) == getpid(),
           close_paren ? (int)(close_paren - strchr(buf, '(') - 1) : 0,
           strchr(buf, '(') ? strchr(buf, '(') + 1 : "");
    n = readall("/proc/self/statm", buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    long size = 0, resident = 0;
    sscanf(buf, "%ld %ld", &size, &resident);
    printf("statm size >= resident > 0: %d\n", size >= resident && resident > 0);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    n = readall("/proc/self/limits", buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    char *lim = strstr(buf, "Max open files");
    printf("limits: open files soft limit matches getrlimit: %d\n",
           lim && atol(lim + 26) == (long)rl.rlim_cur);

    n = readall("/proc/self/maps", buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    printf("maps has [stack]: %d\n", strstr(buf, "[stack]") != NULL);
    unsigned long here = (unsigned long)&n, found = 0;
    for (char *l = buf; l && *l; l = strchr(l, '\n'), l = l ? l + 1 : l) {
        unsigned long lo, hi;
        if (sscanf(l, "%lx-%lx", &lo, &hi) == 2 && lo <= here && here < hi) found = 1;
    }
    printf("maps covers a stack variable: %lu\n", found);

    for (int fd = 3; fd < 1024; fd++) close(fd);
    int f = open("data.txt", O_RDWR | O_CREAT | O_APPEND, 0644);
    write(f, "0123456789", 10);
    lseek(f, 4, SEEK_SET);
    int p[2];
    pipe(p);
    dup2(f, 12);
    DIR *d = opendir("/proc/self/fd");
    int self = d ? dirfd(d) : -1, fds[64], k = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) && k < 64)
        if (e->d_name[0] != '.' && atoi(e->d_name) != self) fds[k++] = atoi(e->d_name);
    if (d) closedir(d);
    qsort(fds, k, sizeof *fds, cmp);
    printf("fd/:");
    for (int i = 0; i < k; i++) printf(" %d", fds[i]);
    printf("\n");
    char target[256];
    ssize_t t = readlink("/proc/self/fd/12", target, sizeof target - 1);
    target[t > 0 ? t : 0] = 0;
    char *slash = strrchr(target, '/');
    printf("fd/12 -> .../%s\n", slash ? slash + 1 : target);
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", f);
    n = readall(path, buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = 0;
    char *pos = strstr(buf, "pos:"), *flags = strstr(buf, "flags:");
    printf("fdinfo pos: %ld flags: %lo\n", pos ? atol(pos + 4) : -1,
           flags ? strtol(flags + 6, NULL, 8) & 07777 : -1);
    t = readlink("/proc/self/exe", target, sizeof target - 1);
    target[t > 0 ? t : 0] = 0;
    slash = strrchr(target, '/');
    printf("exe basename: %s\n", slash ? slash + 1 : target);
    return 0;
}
