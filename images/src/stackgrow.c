/* The main thread's stack grows to RLIMIT_STACK: prints the limit it started with, raises the
 * soft limit to ARG2 MiB when given ("max": to the hard limit), then recurses ARG1 MiB deep
 * and prints the depth reached. Past the limit the recursion dies of SIGSEGV, as natively. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
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
    if (argc > 2) {
        r.rlim_cur = strcmp(argv[2], "max") == 0 ? r.rlim_max : (rlim_t)atoi(argv[2]) << 20;
        printf("setrlimit: %d\n", setrlimit(RLIMIT_STACK, &r));
    }
    fflush(stdout);
    printf("depth %d\n", depth(mib * 1024));
    return 0;
}
