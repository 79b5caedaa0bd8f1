/* A thread blocked in a call that waits (a read of an empty pipe) is interrupted by a signal
 * aimed at it alone: pthread_kill of a handler without SA_RESTART (the read fails with EINTR),
 * then pthread_cancel of a second such reader (it ends cancelled). The first thread waits for a
 * file "go" in the cwd before each (the test moves the process first), and prints what it saw.
 * Usage: threadintr */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int pfd[2];

static void on_usr1(int s) { (void)s; }

static void *reader(void *arg)
{
    (void)arg;
    char c;
    ssize_t r = read(pfd[0], &c, 1);
    printf("reader: read returned %zd (%s)\n", r, r < 0 ? strerror(errno) : "data");
    fflush(stdout);
    return (void *)1;
}

static void await_go(void)
{
    while (access("go", F_OK) != 0)
        usleep(10000);
}

int main(void)
{
    if (pipe(pfd) != 0)
        return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    pthread_t t;
    void *r;
    pthread_create(&t, NULL, reader, NULL);
    printf("ready\n");
    fflush(stdout);
    await_go();
    usleep(100000);
    pthread_kill(t, SIGUSR1);
    pthread_join(t, &r);
    printf("after pthread_kill: joined, returned %ld\n", (long)r);
    pthread_create(&t, NULL, reader, NULL);
    usleep(100000);
    pthread_cancel(t);
    pthread_join(t, &r);
    printf("after pthread_cancel: cancelled %d\n", r == PTHREAD_CANCELED);
    return 0;
}
