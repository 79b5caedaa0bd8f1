/* Calls getppid N times (argv[1], default 100000) through syscall(2), so no
 * libc cache can answer it, then prints "done N". */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    long first = syscall(SYS_getppid);
    long i;
    for (i = 0; i < n; i++) {
        if (syscall(SYS_getppid) != first) {
            fprintf(stderr, "getppid changed at iteration %ld\n", i);
            return 1;
        }
    }
    printf("done %ld\n", n);
    return 0;
}
