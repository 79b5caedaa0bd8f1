// Threads (clone with CLONE_THREAD) through the C library: mutexes, condition variables,
// barriers, read-write locks, semaphores, thread-local storage, 64 threads, 300 create/join
// rounds, a priority-inheritance mutex, a robust mutex whose owner dies, a thread blocked in a
// pipe read while others compute, signals to one thread (pthread_kill) and to the process,
// cancellation of a blocked thread, a SIGEV_THREAD timer, a sigwait thread, fork and
// posix_spawn from a thread, the first thread exiting first, and execve from another thread.
// Output is deterministic.
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_rwlock_t rw = PTHREAD_RWLOCK_INITIALIZER;
static pthread_barrier_t bar;
static sem_t sem;
static long counter, total, rwsum;
static int turn;
static __thread long tls = -1;

static long gettid_(void) { return syscall(SYS_gettid); }

static void *count(void *a) {
    tls = (long)a;
    for (int i = 0; i < 20000; i++) {
        pthread_mutex_lock(&m);
        counter++;
        pthread_mutex_unlock(&m);
    }
    return (void *)(tls * 10);
}

static void *barrier_round(void *a) {
    for (int r = 0; r < 30; r++) {
        pthread_mutex_lock(&m);
        total += (long)a;
        pthread_mutex_unlock(&m);
        pthread_barrier_wait(&bar);
    }
    return 0;
}

static void *pingpong(void *a) {
    long me = (long)a;
    for (int i = 0; i < 1000; i++) {
        pthread_mutex_lock(&m);
        while (turn != me) pthread_cond_wait(&cv, &m);
        turn = 1 - me;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&m);
    }
    return 0;
}

static void *rw_reader(void *a) {
    for (int i = 0; i < 2000; i++) {
        pthread_rwlock_rdlock(&rw);
        long v = rwsum;
        pthread_rwlock_unlock(&rw);
        (void)v;
        if (i % 100 == 0) {
            pthread_rwlock_wrlock(&rw);
            rwsum++;
            pthread_rwlock_unlock(&rw);
        }
    }
    return 0;
}

static void *sem_poster(void *a) {
    for (int i = 0; i < 500; i++) sem_post(&sem);
    return 0;
}

static void *twice(void *a) { return (void *)((long)a * 2); }
static void *tid_differs(void *a) { return (void *)(long)(gettid_() != getpid()); }

static pthread_mutex_t pi, robust;
static void *pi_worker(void *a) {
    for (int i = 0; i < 5000; i++) {
        pthread_mutex_lock(&pi);
        counter++;
        pthread_mutex_unlock(&pi);
    }
    return 0;
}

static void *robust_owner(void *a) {
    pthread_mutex_lock(&robust);
    pthread_barrier_wait(&bar);
    usleep(50000);
    return 0; // ends holding it
}

static int pfd[2];
static void *pipe_reader(void *a) {
    char buf[32] = {0};
    ssize_t n = read(pfd[0], buf, sizeof buf - 1);
    printf("reader: %zd bytes: %s\n", n, buf);
    return 0;
}

static volatile sig_atomic_t usr1_in_target, usr2_hits;
static long sleeper_tid;
static void on_usr1(int s) { usr1_in_target = gettid_() == sleeper_tid; }
static void on_usr2(int s) { usr2_hits++; }
static void *sleeper(void *a) {
    sleeper_tid = gettid_();
    pthread_barrier_wait(&bar);
    struct timespec ts = {10, 0};
    int r = nanosleep(&ts, &ts);
    printf("sleeper: nanosleep %d (%s), handler ran in this thread: %d\n", r,
           r ? strerror(errno) : "-", (int)usr1_in_target);
    return 0;
}

static volatile int stop;
static void *spin(void *a) {
    while (!stop) ;
    return 0;
}

static void *cancel_me(void *a) {
    char c;
    pthread_barrier_wait(&bar);
    read(pfd[0], &c, 1); // a cancellation point, blocked
    return (void *)1;
}

static atomic_int ticks;
static void tick(union sigval v) { atomic_fetch_add(&ticks, v.sival_int); }

static void *sigwaiter(void *a) {
    sigset_t *set = a;
    int sig = 0;
    sigwait(set, &sig);
    printf("sigwait thread took signal %d\n", sig);
    return 0;
}

static void *forker(void *a) {
    pid_t p = fork();
    if (p == 0) {
        printf("child of a thread runs alone\n");
        fflush(stdout);
        _exit(5);
    }
    int st;
    waitpid(p, &st, 0);
    printf("thread reaped its child: status %d\n", WEXITSTATUS(st));
    char *argv[] = {"sh", "-c", "echo spawned from a thread", 0};
    pid_t q;
    if (posix_spawn(&q, "/bin/sh", 0, 0, argv, environ) == 0) {
        waitpid(q, &st, 0);
        printf("spawn status %d\n", WEXITSTATUS(st));
    }
    return 0;
}

static void *outlive(void *a) {
    usleep(100000);
    printf("a thread outlives the first one and execs\n");
    fflush(stdout);
    execl("/bin/sh", "sh", "-c", "echo exec from a thread: same pid $(( $$ == $PPID_ ))", (char *)0);
    perror("execl");
    return 0;
}

int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    pthread_t t[64];
    void *r;

    long sum = 0;
    for (long i = 0; i < 4; i++) pthread_create(&t[i], 0, count, (void *)(i + 1));
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], &r);
        sum += (long)r;
    }
    printf("mutex counter %ld, thread-local results %ld, main's tls %ld\n", counter, sum, tls);

    pthread_barrier_init(&bar, 0, 6);
    for (long i = 0; i < 6; i++) pthread_create(&t[i], 0, barrier_round, (void *)(i + 1));
    for (int i = 0; i < 6; i++) pthread_join(t[i], 0);
    pthread_barrier_destroy(&bar);
    printf("barrier total %ld\n", total);

    pthread_create(&t[0], 0, pingpong, (void *)0);
    pthread_create(&t[1], 0, pingpong, (void *)1);
    pthread_join(t[0], 0);
    pthread_join(t[1], 0);
    printf("condvar ping-pong ends on turn %d\n", turn);

    for (int i = 0; i < 4; i++) pthread_create(&t[i], 0, rw_reader, 0);
    for (int i = 0; i < 4; i++) pthread_join(t[i], 0);
    printf("rwlock writes %ld\n", rwsum);

    sem_init(&sem, 0, 0);
    pthread_create(&t[0], 0, sem_poster, 0);
    pthread_create(&t[1], 0, sem_poster, 0);
    for (int i = 0; i < 1000; i++) sem_wait(&sem);
    pthread_join(t[0], 0);
    pthread_join(t[1], 0);
    printf("semaphore: 1000 waits\n");

    sum = 0;
    for (long i = 0; i < 64; i++)
        if (pthread_create(&t[i], 0, twice, (void *)i)) printf("create %ld failed\n", i);
    for (int i = 0; i < 64; i++) {
        pthread_join(t[i], &r);
        sum += (long)r;
    }
    printf("64 threads: %ld\n", sum);
    for (int i = 0; i < 300; i++) {
        pthread_create(&t[0], 0, twice, (void *)1);
        pthread_join(t[0], 0);
    }
    printf("300 create/join rounds\n");

    pthread_mutexattr_t at;
    pthread_mutexattr_init(&at);
    pthread_mutexattr_setprotocol(&at, PTHREAD_PRIO_INHERIT);
    pthread_mutex_init(&pi, &at);
    counter = 0;
    for (int i = 0; i < 3; i++) pthread_create(&t[i], 0, pi_worker, 0);
    for (int i = 0; i < 3; i++) pthread_join(t[i], 0);
    printf("priority-inheritance mutex counter %ld\n", counter);

    pthread_mutexattr_t ra;
    pthread_mutexattr_init(&ra);
    pthread_mutexattr_setrobust(&ra, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&robust, &ra);
    pthread_barrier_init(&bar, 0, 2);
    pthread_create(&t[0], 0, robust_owner, 0);
    pthread_barrier_wait(&bar);
    int e = pthread_mutex_lock(&robust);
    printf("robust mutex after its owner ended: %s\n", e == EOWNERDEAD ? "EOWNERDEAD" : strerror(e));
    if (e == EOWNERDEAD) pthread_mutex_consistent(&robust);
    pthread_mutex_unlock(&robust);
    pthread_join(t[0], 0);

    pipe(pfd);
    pthread_create(&t[0], 0, pipe_reader, 0);
    volatile long x = 0;
    for (long i = 0; i < 20000000; i++) x += i;
    printf("main computed %ld while the reader was blocked\n", (long)x);
    write(pfd[1], "hello", 5);
    pthread_join(t[0], 0);

    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    pthread_create(&t[0], 0, sleeper, 0);
    pthread_barrier_wait(&bar);
    usleep(100000);
    pthread_kill(t[0], SIGUSR1);
    pthread_join(t[0], 0);

    signal(SIGUSR2, on_usr2);
    stop = 0;
    pthread_create(&t[0], 0, spin, 0);
    pthread_create(&t[1], 0, spin, 0);
    kill(getpid(), SIGUSR2);
    usleep(100000);
    stop = 1;
    pthread_join(t[0], 0);
    pthread_join(t[1], 0);
    printf("a signal to the process ran its handler %d time(s)\n", (int)usr2_hits);

    pthread_create(&t[0], 0, cancel_me, 0);
    pthread_barrier_wait(&bar);
    usleep(50000);
    pthread_cancel(t[0]);
    pthread_join(t[0], &r);
    printf("blocked thread cancelled: %d\n", r == PTHREAD_CANCELED);

    cpu_set_t set;
    sched_getaffinity(0, sizeof set, &set);
    pthread_create(&t[0], 0, tid_differs, 0);
    pthread_join(t[0], &r);
    printf("gettid: %d in the first thread, %d in another; affinity has CPUs: %d\n",
           gettid_() == getpid(), (int)(long)r, CPU_COUNT(&set) > 0);

    struct sigevent tev = {0};
    tev.sigev_notify = SIGEV_THREAD;
    tev.sigev_notify_function = tick;
    tev.sigev_value.sival_int = 1;
    timer_t tt;
    if (timer_create(CLOCK_MONOTONIC, &tev, &tt) == 0) {
        struct itimerspec its = {{0, 20000000}, {0, 20000000}};
        timer_settime(tt, 0, &its, 0);
        while (atomic_load(&ticks) < 5) usleep(10000);
        timer_delete(tt);
        printf("SIGEV_THREAD timer: its callbacks ran in a thread\n");
    }

    sigset_t ws, old;
    sigemptyset(&ws);
    sigaddset(&ws, SIGWINCH);
    pthread_sigmask(SIG_BLOCK, &ws, &old);
    pthread_create(&t[0], 0, sigwaiter, &ws);
    usleep(50000);
    kill(getpid(), SIGWINCH);
    pthread_join(t[0], 0);
    pthread_sigmask(SIG_SETMASK, &old, 0);

    pthread_create(&t[0], 0, forker, 0);
    pthread_join(t[0], 0);

    char pid[32];
    snprintf(pid, sizeof pid, "%d", getpid());
    setenv("PPID_", pid, 1);
    pthread_create(&t[0], 0, outlive, 0);
    pthread_exit(0);
}
