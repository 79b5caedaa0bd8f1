/* One side of a POSIX named semaphore shared by two processes.
 * Usage: psem wait NAME    wait three times (sem_wait), then unlink
 *        psem timed NAME   wait three times with a 10 s deadline (sem_timedwait)
 *        psem post NAME    post three times, 200 ms apart */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    sem_t *s = sem_open(argv[2], O_CREAT, 0600, 0);
    if (s == SEM_FAILED) { printf("sem_open: %s\n", strerror(errno)); return 1; }
    if (!strcmp(argv[1], "post")) {
        for (int i = 0; i < 3; i++) {
            struct timespec t = {0, 200000000};
            nanosleep(&t, NULL);
            sem_post(s);
        }
        printf("posted 3\n");
    } else {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        t.tv_sec += 10;
        int n = 0;
        for (int i = 0; i < 3; i++)
            n += (!strcmp(argv[1], "wait") ? sem_wait(s) : sem_timedwait(s, &t)) == 0;
        printf("woke %d times\n", n);
        sem_unlink(argv[2]);
    }
    return 0;
}
