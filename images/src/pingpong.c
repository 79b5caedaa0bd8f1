/* Benchmark guest: measures the cost of one trapped home syscall (getppid, forwarded to the
 * deputy) as seen by the program, ROUNDS times, CALLS calls per round, one line per round:
 * "round I NS_PER_CALL". Usage: pingpong ROUNDS CALLS */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 20;
    long calls = argc > 2 ? atol(argv[2]) : 2000;
    for (long r = 0; r < rounds; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < calls; i++)
            syscall(SYS_getppid);
        clock_gettime(CLOCK_MONOTONIC, &b);
        double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / calls;
        printf("round %ld %.0f\n", r, ns);
        fflush(stdout);
    }
    return 0;
}
