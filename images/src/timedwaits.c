/* Calls with a relative timeout that nothing ends early: poll, ppoll, select, pselect6,
 * epoll_wait, epoll_pwait2, semtimedop, FUTEX_WAIT and sigtimedwait, each with a timeout of
 * MS milliseconds (argv[1], default 1000), on a pipe nobody writes, a semaphore nobody
 * changes, a futex nobody wakes, a signal nobody sends. Prints each call's result, errno, what
 * select and pselect6 wrote back, and whether it waited at least its timeout. With "thread"
 * (argv[2]) the calls run in a second thread while the first waits in pthread_join.
 * Moved while it waits, every call must still end when its timeout does. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/select.h>
#include <sys/sem.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define FUTEX_WAIT_PRIVATE_OP 128 /* FUTEX_WAIT | FUTEX_PRIVATE_FLAG */

static long ms = 1000;

static const char *errname(int e) {
    switch (e) {
    case EAGAIN: return "EAGAIN";
    case ETIMEDOUT: return "ETIMEDOUT";
    case EINTR: return "EINTR";
    case ENOSYS: return "ENOSYS";
    case EINVAL: return "EINVAL";
    default: return "other";
    }
}
static int pipefd[2];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void report(const char *what, long ret, int err, double t0) {
    double waited = now() - t0;
    printf("%-12s ret=%ld errno=%s waited_full=%s\n", what, ret, ret < 0 ? errname(err) : "-",
           waited >= ms / 1000.0 - 0.002 ? "yes" : "no");
    fflush(stdout);
}

static struct timespec ts_of(long m) {
    struct timespec t = {m / 1000, (m % 1000) * 1000000L};
    return t;
}

static void *waits(void *arg) {
    (void)arg;
    double t0;
    long r;

    struct pollfd p = {pipefd[0], POLLIN, 0};
    t0 = now();
    r = poll(&p, 1, (int)ms);
    report("poll", r, errno, t0);

    struct timespec t = ts_of(ms);
    t0 = now();
    r = syscall(SYS_ppoll, &p, 1, &t, NULL, 8);
    report("ppoll", r, errno, t0);
    printf("ppoll left %ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);

    fd_set rd;
    FD_ZERO(&rd);
    FD_SET(pipefd[0], &rd);
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    t0 = now();
    r = select(pipefd[0] + 1, &rd, NULL, NULL, &tv);
    report("select", r, errno, t0);
    printf("select left %ld.%06ld\n", (long)tv.tv_sec, (long)tv.tv_usec);

    FD_ZERO(&rd);
    FD_SET(pipefd[0], &rd);
    t = ts_of(ms);
    t0 = now();
    r = syscall(SYS_pselect6, pipefd[0] + 1, &rd, NULL, NULL, &t, NULL);
    report("pselect6", r, errno, t0);
    printf("pselect6 left %ld.%09ld\n", (long)t.tv_sec, t.tv_nsec);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 7};
    epoll_ctl(ep, EPOLL_CTL_ADD, pipefd[0], &ev);
    t0 = now();
    r = epoll_wait(ep, &ev, 1, (int)ms);
    report("epoll_wait", r, errno, t0);

    t = ts_of(ms);
    t0 = now();
    r = syscall(SYS_epoll_pwait2, ep, &ev, 1, &t, NULL, 8);
    report("epoll_pwait2", r, errno, t0);
    close(ep);

    int sem = semget(IPC_PRIVATE, 1, 0600);
    struct sembuf op = {0, -1, 0};
    t = ts_of(ms);
    t0 = now();
    r = semtimedop(sem, &op, 1, &t);
    report("semtimedop", r, errno, t0);
    semctl(sem, 0, IPC_RMID);

    static uint32_t word = 0;
    t = ts_of(ms);
    t0 = now();
    r = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE_OP, 0, &t, NULL, 0);
    report("futex_wait", r, errno, t0);

    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    t = ts_of(ms);
    t0 = now();
    r = sigtimedwait(&set, NULL, &t);
    report("sigtimedwait", r, errno, t0);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1)
        ms = atol(argv[1]);
    if (pipe(pipefd) != 0)
        return 1;
    if (argc > 2 && strcmp(argv[2], "thread") == 0) {
        pthread_t th;
        pthread_create(&th, NULL, waits, NULL);
        pthread_join(th, NULL);
    } else {
        waits(NULL);
    }
    printf("done\n");
    return 0;
}
