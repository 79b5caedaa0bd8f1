// Handlers, interval timers and POSIX timers for migration tests: counts SIGALRM from a 10 ms
// ITIMER_REAL and a 15 ms POSIX timer (SIGRTMIN+2) in handlers, waiting in sigsuspend, and
// prints milestones (deterministic output whatever the timing).
// Usage: sigtravel TICKS [usr1]   (with usr1: after TICKS, go on until a SIGUSR1 arrives)
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static volatile sig_atomic_t alrm, rt, usr1, usr1_code = 99;
static void on_alrm(int s) { (void)s; alrm++; }
static void on_rt(int s) { (void)s; rt++; }
static void on_usr1(int s, siginfo_t *si, void *u) {
    (void)s;
    (void)u;
    usr1 = 1;
    usr1_code = si->si_code;
}

int main(int argc, char **argv) {
    long ticks = argc > 1 ? atol(argv[1]) : 300;
    int want_usr1 = argc > 2 && strcmp(argv[2], "usr1") == 0;
    setvbuf(stdout, NULL, _IONBF, 0);
    struct sigaction sa = {.sa_handler = on_alrm};
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_rt;
    sigaction(SIGRTMIN + 2, &sa, NULL);
    struct sigaction su = {.sa_sigaction = on_usr1, .sa_flags = SA_SIGINFO};
    sigaction(SIGUSR1, &su, NULL);
    sigset_t block, none;
    sigemptyset(&block);
    sigaddset(&block, SIGALRM);
    sigaddset(&block, SIGRTMIN + 2);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, NULL);
    sigemptyset(&none);
    struct itimerval it = {{0, 10000}, {0, 10000}};
    setitimer(ITIMER_REAL, &it, NULL);
    struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN + 2};
    timer_t t;
    if (timer_create(CLOCK_MONOTONIC, &ev, &t) != 0) return 2;
    struct itimerspec ts = {{0, 15000000}, {0, 15000000}};
    timer_settime(t, 0, &ts, NULL);
    long next = 50;
    static unsigned long mem[1 << 18];
    unsigned long x = 1;
    while (alrm < ticks || (want_usr1 && !usr1)) {
        sigsuspend(&none);
        for (int i = 0; i < 20000; i++) {
            x = x * 6364136223846793005ul + 1;
            mem[(x >> 20) % (1 << 18)] ^= x;
        }
        if (alrm >= next && next <= ticks) {
            printf("reached %ld alarms\n", next);
            next += 50;
        }
    }
    printf("the POSIX timer ran too: %d\n", rt > 0);
    if (want_usr1) printf("SIGUSR1 reached its handler, si_code %d\n", usr1_code);
    return 0;
}
