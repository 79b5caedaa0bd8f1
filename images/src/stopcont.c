/* Job control of a process that may run away from home: it works until the file "moved"
 * appears in its directory, stops itself with raise(SIGTSTP) (default action), and once
 * continued works until the file "done" appears (meanwhile it is stopped and continued from
 * outside with SIGSTOP and SIGCONT). A SIGCONT handler counts the continues it sees: each
 * SIGCONT sent to the process runs it once. */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static volatile sig_atomic_t conts;
static volatile unsigned long sink;

static void on_cont(int sig) {
    (void)sig;
    conts++;
}

static void work_until(const char *file) {
    while (access(file, F_OK) != 0) {
        for (unsigned long i = 0; i < 2000000; i++)
            sink += i;
    }
}

int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_cont;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGCONT, &sa, NULL);
    printf("working\n");
    fflush(stdout);
    work_until("moved");
    raise(SIGTSTP);
    printf("continued after SIGTSTP: %d SIGCONT seen\n", (int)conts);
    fflush(stdout);
    work_until("done");
    printf("done: %d SIGCONT seen\n", (int)conts);
    return 0;
}
