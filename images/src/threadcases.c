// Cases where threads once behaved differently under mosvm than natively, each a section
// with deterministic output: forks by a thread while another unmaps memory (the child started
// on a replaced page-table root); stores of a thread into memory another thread unmapped
// (they must fault, never land in memory mapped afterwards); a sigwait thread taking five
// signals, each sent once it took the one before; signals a worker sends to the process, handled by the first
// thread; sem_post from a signal handler waking a single-threaded sem_wait; 300 threads alive
// at once with the C library's default 8 MiB stacks (more than the default --mem, untouched);
// pthread_sigqueue (rt_tgsigqueueinfo) to another thread of the process and to itself.
#define _GNU_SOURCE
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile int stop;
static void *churn(void *a) {
    while (!stop) {
        char *p = mmap(0, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        p[0] = 1;
        munmap(p, 65536);
    }
    return 0;
}
static void *forker(void *a) {
    int bad = 0;
    for (int i = 0; i < 60; i++) {
        pid_t p = fork();
        if (!p) _exit(0);
        int st;
        waitpid(p, &st, 0);
        bad += st != 0;
    }
    printf("forks by a thread during munmaps: bad children %d\n", bad);
    return 0;
}

static volatile long *page;
static volatile int started, faulted;
static void segv(int s) { faulted = 1; pthread_exit(0); }
static void *writer(void *a) {
    signal(SIGSEGV, segv);
    started = 1;
    for (long i = 1;; i++) page[i & 511] = 0x4141414141414141;
    return 0;
}

static sigset_t waitset;
static sem_t ack;
static void *sigwaiter(void *a) {
    int got = 0;
    for (int i = 0; i < 5; i++) {
        int s;
        if (sigwait(&waitset, &s) == 0 && s == SIGUSR1) got++;
        sem_post(&ack);
    }
    printf("sigwait thread took %d signals\n", got);
    return 0;
}

static atomic_int on_first, on_sender;
static void count_where(int s) {
    if (syscall(SYS_gettid) == getpid()) on_first++;
    else on_sender++;
}
static void *sender(void *a) {
    usleep(20000); // the first thread is in pthread_join by then
    for (int i = 0; i < 20; i++) {
        kill(getpid(), SIGUSR2);
        // The next one once this one's handler has run and returned (while a handler runs,
        // its signal is blocked in its thread, which would then not take the next).
        while (on_first + on_sender <= i) usleep(1000);
        usleep(5000);
    }
    return 0;
}

static pthread_barrier_t all;
static void *wait_all(void *a) {
    pthread_barrier_wait(&all);
    return a;
}

static sem_t sem;
static void post(int s) { sem_post(&sem); }
static volatile int queued, qtid;
static void take_value(int s, siginfo_t *si, void *u) { queued += si->si_value.sival_int; }
static void *wait_queued(void *a) {
    qtid = syscall(SYS_gettid);
    while (!queued) usleep(1000);
    return 0;
}
/* What pthread_sigqueue does (musl has none): rt_tgsigqueueinfo with SI_QUEUE. */
static long queue_to(int tid, int sig, int value) {
    siginfo_t si = {0};
    si.si_signo = sig;
    si.si_code = SI_QUEUE;
    si.si_pid = getpid();
    si.si_uid = getuid();
    si.si_value.sival_int = value;
    return syscall(SYS_rt_tgsigqueueinfo, getpid(), tid, sig, &si);
}

int main(void) {
    setvbuf(stdout, 0, _IONBF, 0);
    pthread_t c, f;
    pthread_create(&c, 0, churn, 0);
    pthread_create(&f, 0, forker, 0);
    pthread_join(f, 0);
    stop = 1;
    pthread_join(c, 0);

    page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_t w;
    pthread_create(&w, 0, writer, 0);
    while (!started) ;
    usleep(10000);
    munmap((void *)page, 4096);
    long *q[128];
    for (int i = 0; i < 128; i++) {
        q[i] = mmap((void *)(0x200000000000UL + i * 0x10000UL), 4096, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        q[i][0] = 0;
    }
    pthread_join(w, 0);
    int hits = 0;
    for (int i = 0; i < 128; i++)
        for (int j = 1; j < 512; j++)
            if (q[i][j] == 0x4141414141414141) {
                hits++;
                break;
            }
    printf("writer to unmapped memory faulted: %d; new pages holding its stores: %d\n", faulted, hits);
    signal(SIGSEGV, SIG_DFL);

    sigemptyset(&waitset);
    sigaddset(&waitset, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &waitset, 0);
    sem_init(&ack, 0, 0);
    pthread_create(&w, 0, sigwaiter, 0);
    for (int i = 0; i < 5; i++) {
        usleep(20000);
        kill(getpid(), SIGUSR1);
        while (sem_wait(&ack) != 0) ;
    }
    pthread_join(w, 0);

    signal(SIGUSR2, count_where);
    pthread_create(&w, 0, sender, 0);
    pthread_join(w, 0);
    printf("signals from a worker to the process: first thread %d, sender %d\n", (int)on_first,
           (int)on_sender);

    enum { MANY = 300 };
    static pthread_t many[MANY];
    pthread_barrier_init(&all, 0, MANY + 1);
    int made = 0;
    for (int i = 0; i < MANY; i++)
        if (pthread_create(&many[i], 0, wait_all, 0) == 0) made++;
    if (made == MANY) pthread_barrier_wait(&all);
    long sum = 0;
    for (int i = 0; i < made && made == MANY; i++) {
        void *r;
        pthread_join(many[i], &r);
        sum += r == 0;
    }
    printf("threads alive at once: %d of %d, joined %ld\n", made, MANY, sum);

    sem_init(&sem, 0, 0);
    signal(SIGALRM, post);
    alarm(1);
    while (sem_wait(&sem) != 0) ;
    printf("sem_wait woken by sem_post in a handler\n");

    struct sigaction qa = {0};
    qa.sa_sigaction = take_value;
    qa.sa_flags = SA_SIGINFO;
    sigaction(SIGRTMIN, &qa, 0);
    pthread_create(&w, 0, wait_queued, 0);
    while (!qtid) usleep(1000);
    long to_other = queue_to(qtid, SIGRTMIN, 7);
    pthread_join(w, 0);
    long to_self = queue_to(syscall(SYS_gettid), SIGRTMIN, 7);
    printf("rt_tgsigqueueinfo: to another thread %ld, to itself %ld, values %d\n", to_other,
           to_self, (int)queued);
    return 0;
}
