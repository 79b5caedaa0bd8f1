// Process and signal costs for `cargo bench --bench vm`: `procbench fork N` forks N children
// that exit at once and waits for each; `procbench signal N` raises N signals to a handler;
// `procbench thread N` creates and joins N threads one after the other; `procbench futex N`
// passes a token N times back and forth between two threads through a futex word;
// `procbench spawn N` vforks N children that exec /bin/true and waits for each. With a third
// argument FILE, it first works until FILE exists (it may be moved meanwhile), then prints
// the time each operation took, in ns ("ns_per_op X").
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
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

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int run(const char *what, long n);

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[2]);
    if (argc < 4)
        return run(argv[1], n);
    static volatile unsigned long sink;
    while (access(argv[3], F_OK) != 0)
        for (unsigned long i = 0; i < 1000000; i++)
            sink += i;
    long t0 = now_ns();
    int r = run(argv[1], n);
    printf("ns_per_op %ld\n", (now_ns() - t0) / n);
    return r;
}

static int run(const char *what, long n) {
    if (strcmp(what, "spawn") == 0) {
        for (long i = 0; i < n; i++) {
            pid_t c = vfork();
            if (c < 0) return 3;
            if (c == 0) {
                execl("/bin/true", "true", (char *)0);
                _exit(127);
            }
            int st;
            if (waitpid(c, &st, 0) != c || st != 0) return 4;
        }
        return 0;
    }
    if (strcmp(what, "fork") == 0) {
        for (long i = 0; i < n; i++) {
            pid_t c = fork();
            if (c < 0) return 3;
            if (c == 0) _exit(0);
            int st;
            if (waitpid(c, &st, 0) != c || st != 0) return 4;
        }
        return 0;
    }
    if (strcmp(what, "thread") == 0) {
        for (long i = 0; i < n; i++) {
            pthread_t t;
            if (pthread_create(&t, 0, nothing, 0) != 0) return 6;
            pthread_join(t, 0);
        }
        return 0;
    }
    if (strcmp(what, "futex") == 0) {
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
    if (strcmp(what, "signal") == 0) {
        signal(SIGUSR1, on_usr1);
        for (long i = 0; i < n; i++) raise(SIGUSR1);
        return hits == n ? 0 : 5;
    }
    return 2;
}
