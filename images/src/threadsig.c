/* A threaded process that may run away from home takes signals and forks there: a worker
 * thread computes until the file "done" appears; the first thread says it is ready (a file
 * "ready", its handler and thread in place), works until "moved"
 * appears, then acknowledges each SIGUSR1 its handler sees with a file "ackN" (the test sends
 * the next one after it), three in all; then it forks a child that exits with status 4, waits
 * for it, and prints what it saw. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t hits;
static volatile unsigned long sink;

static void on_usr1(int sig) {
    (void)sig;
    hits++;
}

static void work_until(const char *file) {
    while (access(file, F_OK) != 0)
        for (unsigned long i = 0; i < 1000000; i++)
            sink += i;
}

static void *worker(void *arg) {
    work_until("done");
    return arg;
}

int main(void) {
    signal(SIGUSR1, on_usr1);
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0)
        return 1;
    close(open("ready", O_CREAT | O_WRONLY, 0644));
    work_until("moved");
    for (int n = 1; n <= 3; n++) {
        while (hits < n)
            for (unsigned long i = 0; i < 1000000; i++)
                sink += i;
        char name[16];
        snprintf(name, sizeof name, "ack%d", n);
        close(open(name, O_CREAT | O_WRONLY, 0644));
    }
    pid_t c = fork();
    if (c == 0)
        _exit(4);
    int st;
    waitpid(c, &st, 0);
    close(open("done", O_CREAT | O_WRONLY, 0644));
    pthread_join(t, NULL);
    printf("signals seen: %d; child: exit %d\n", (int)hits, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    return 0;
}
