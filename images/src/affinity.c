/* CPU affinity and thread attributes asked of the process itself, of one of its threads by
 * its tid, and of its parent; pthread_getattr_np in a thread (which asks the kernel for the
 * thread's affinity by tid). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void ask(const char *who, pid_t pid) {
    cpu_set_t s;
    int r = sched_getaffinity(pid, sizeof s, &s);
    printf("%s: %s, %d cpus\n", who, r ? strerror(errno) : "ok", r ? 0 : CPU_COUNT(&s));
}

static void *thread(void *arg) {
    (void)arg;
    ask("thread by tid", (pid_t)syscall(SYS_gettid));
    pthread_attr_t at;
    int r = pthread_getattr_np(pthread_self(), &at);
    size_t size = 0;
    if (r == 0)
        pthread_attr_getstacksize(&at, &size);
    printf("pthread_getattr_np: %d, stack %s\n", r, size > 0 ? "known" : "unknown");
    return 0;
}

int main(void) {
    ask("self", 0);
    ask("own pid", getpid());
    ask("parent", getppid());
    pthread_t t;
    pthread_create(&t, 0, thread, 0);
    pthread_join(t, 0);
    return 0;
}
