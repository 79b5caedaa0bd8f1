// Process and signal costs for `cargo bench --bench vm`: `procbench fork N` forks N children
// that exit at once and waits for each; `procbench signal N` raises N signals to a handler;
// `procbench thread N` creates and joins N threads one after the other; `procbench futex N`
// passes a token N times back and forth between two threads through a futex word.
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile long hits;
static void *nothing(void *a) { return a; }

#define FUTEX_WAIT_PRIVATE 128
#define FUTEX_WAKE_PRIVATE 129
static atomic_int token;
static long rounds;
static void wait_for(int want) {
    int v;
    while ((v = atomic_load(&token)) != want)
        syscall(SYS_futex, &token, FUTEX_WAIT_PRIVATE, v, 0, 0, 0);
}
static void pass(int to) {
    atomic_store(&token, to);
    syscall(SYS_futex, &token, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
}
static void *partner(void *a) {
    for (long i = 0; i < rounds; i++) {
        wait_for(1);
        pass(0);
    }
    return a;
}
static void on_usr1(int s) { (void)s; hits++; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[2]);
    if (strcmp(argv[1], "fork") == 0) {
        for (long i = 0; i < n; i++) {
            pid_t c = fork();
            if (c < 0) return 3;
            if (c == 0) _exit(0);
            int st;
            if (waitpid(c, &st, 0) != c || st != 0) return 4;
        }
        return 0;
    }
    if (strcmp(argv[1], "thread") == 0) {
        for (long i = 0; i < n; i++) {
            pthread_t t;
            if (pthread_create(&t, 0, nothing, 0) != 0) return 6;
            pthread_join(t, 0);
        }
        return 0;
    }
    if (strcmp(argv[1], "futex") == 0) {
        pthread_t t;
        rounds = n;
        if (pthread_create(&t, 0, partner, 0) != 0) return 6;
        for (long i = 0; i < n; i++) {
            pass(1);
            wait_for(0);
        }
        pthread_join(t, 0);
        return 0;
    }
    if (strcmp(argv[1], "signal") == 0) {
        signal(SIGUSR1, on_usr1);
        for (long i = 0; i < n; i++) raise(SIGUSR1);
        return hits == n ? 0 : 5;
    }
    return 2;
}
