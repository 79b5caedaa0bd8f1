/* Threads started late: the process works until the file "moved" appears in its directory
 * (by then it may run away from home), then starts four threads that compute, records their
 * thread ids, has one thread signal another with tgkill, and checks what a thread id must be:
 * distinct, not the process id, and the target of a tgkill the very thread that handles it.
 * Then it works until "done" appears (the test may move it meanwhile) and joins them. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

#define N 4
static pid_t tids[N];
static atomic_int ready;
static atomic_int go_on;
static volatile pid_t handled_by;
static unsigned long sums[N];

static void on_usr1(int sig) {
    (void)sig;
    handled_by = (pid_t)syscall(SYS_gettid);
}

static void *worker(void *arg) {
    long i = (long)arg;
    tids[i] = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&ready, 1);
    unsigned long s = 0;
    while (!atomic_load(&go_on))
        for (unsigned long k = 0; k < 100000; k++)
            s += k * (unsigned long)(i + 1);
    for (unsigned long k = 0; k < 50000000; k++)
        sums[i] += k * (unsigned long)(i + 1) % 7;
    (void)s;
    return NULL;
}

static void work_until(const char *file) {
    static volatile unsigned long sink;
    while (access(file, F_OK) != 0)
        for (unsigned long i = 0; i < 2000000; i++)
            sink += i;
}

int main(void) {
    signal(SIGUSR1, on_usr1);
    work_until("moved");
    pthread_t th[N];
    for (long i = 0; i < N; i++)
        pthread_create(&th[i], NULL, worker, (void *)i);
    while (atomic_load(&ready) < N)
        ;
    int distinct = 1, not_pid = 1;
    for (int i = 0; i < N; i++) {
        if (tids[i] == getpid())
            not_pid = 0;
        for (int j = 0; j < i; j++)
            if (tids[i] == tids[j])
                distinct = 0;
    }
    printf("thread ids distinct: %s, none the process id: %s\n", distinct ? "yes" : "no",
           not_pid ? "yes" : "no");
    syscall(SYS_tgkill, getpid(), tids[2], SIGUSR1);
    while (handled_by == 0)
        ;
    printf("tgkill reached its thread: %s\n", handled_by == tids[2] ? "yes" : "no");
    fflush(stdout);
    work_until("done");
    atomic_store(&go_on, 1);
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < N; i++)
        printf("sum %d: %lu\n", i, sums[i]);
    return 0;
}
