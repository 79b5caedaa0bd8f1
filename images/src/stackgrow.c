/* The main thread's stack grows to RLIMIT_STACK: prints the limit it started with, sets the
 * soft limit to ARG2 MiB when given ("max": to the hard limit, "-": unchanged), then recurses
 * ARG1 MiB deep and prints the depth reached. Past the limit the recursion dies of SIGSEGV, as
 * natively. With ARG3 "below", a file is first mapped shared 4 MiB below the stack pointer:
 * a deeper recursion stops at it (SIGSEGV) and never writes into the file. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

/* The deepest frame: the kernel writes into the far end of a 1 MiB local array, below any
 * page the program itself touched. */
static __attribute__((noinline)) int leaf(void) {
    volatile char big[1 << 20];
    int fd = open("/dev/zero", O_RDONLY);
    int got = (int)read(fd, (char *)big, 16);
    close(fd);
    printf("leaf read %d, %d\n", got, big[5]);
    return got;
}

static int depth(int n) {
    volatile char pad[1024];
    memset((char *)pad, n, sizeof pad);
    return n == 0 ? leaf() : depth(n - 1) + (pad[10] & 1);
}

static void show(const char *what, rlim_t v) {
    if (v == RLIM_INFINITY)
        printf("%s unlimited\n", what);
    else
        printf("%s %llu KiB\n", what, (unsigned long long)v / 1024);
}

int main(int argc, char **argv) {
    int mib = argc > 1 ? atoi(argv[1]) : 1;
    struct rlimit r;
    getrlimit(RLIMIT_STACK, &r);
    show("soft", r.rlim_cur);
    show("hard", r.rlim_max);
    if (argc > 2 && strcmp(argv[2], "-") != 0) {
        r.rlim_cur = strcmp(argv[2], "max") == 0 ? r.rlim_max : (rlim_t)atoi(argv[2]) << 20;
        printf("setrlimit: %d\n", setrlimit(RLIMIT_STACK, &r));
    }
    if (argc > 3 && strcmp(argv[3], "below") == 0) {
        char *want = (char *)(((unsigned long)&r - (4 << 20)) & ~0xfffUL);
        int fd = open("below.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
        char buf[65536];
        memset(buf, 'F', sizeof buf);
        if (fd < 0 || write(fd, buf, sizeof buf) != sizeof buf)
            return 2;
        char *m = mmap(want, sizeof buf, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
        printf("mapped below the stack: %s\n", m == want ? "yes" : "no");
    }
    fflush(stdout);
    printf("depth %d\n", depth(mib * 1024));
    return 0;
}
