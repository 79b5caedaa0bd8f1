/* Threaded programs a migration must leave where they are, with deterministic output.
 * Usage: stayhome leader-exit|pi [LINES]
 *   leader-exit: the first thread calls pthread_exit while a worker computes and prints;
 *   pi: a second thread blocks on a priority-inheritance mutex the first holds, then a
 *   worker computes and prints. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long lines = 40;
static pthread_mutex_t pi;

static void *work(void *arg) {
    (void)arg;
    uint64_t x = 7;
    for (long l = 0; l < lines; l++) {
        for (long i = 0; i < 20000000; i++)
            x = x * 6364136223846793005ull + 1442695040888963407ull;
        printf("line %ld %016llx\n", l, (unsigned long long)x);
        fflush(stdout);
    }
    return 0;
}

static void *contend(void *arg) {
    (void)arg;
    /* The first thread holds the mutex: this blocks in FUTEX_LOCK_PI. */
    pthread_mutex_lock(&pi);
    pthread_mutex_unlock(&pi);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    if (argc > 2)
        lines = atol(argv[2]);
    pthread_t t;
    if (strcmp(argv[1], "pi") == 0) {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_setprotocol(&a, PTHREAD_PRIO_INHERIT);
        pthread_mutex_init(&pi, &a);
        pthread_t c;
        pthread_mutex_lock(&pi);
        pthread_create(&c, 0, contend, 0);
        struct timespec nap = {0, 100000000};
        nanosleep(&nap, 0);
        pthread_mutex_unlock(&pi);
        pthread_join(c, 0);
        printf("pi mutex done\n");
        pthread_create(&t, 0, work, 0);
        pthread_join(t, 0);
        return 0;
    }
    pthread_create(&t, 0, work, 0);
    pthread_exit(0);
}
