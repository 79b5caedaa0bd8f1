// Process and signal costs for `cargo bench --bench vm`: `procbench fork N` forks N children
// that exit at once and waits for each; `procbench signal N` raises N signals to a handler.
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile long hits;
static void on_usr1(int s) { (void)s; hits++; }

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[2]);
    if (strcmp(argv[1], "fork") == 0) {
        for (long i = 0; i < n; i++) {
            pid_t c = fork();
            if (c < 0) return 3;
            if (c == 0) _exit(0);
            int st;
            if (waitpid(c, &st, 0) != c || st != 0) return 4;
        }
        return 0;
    }
    if (strcmp(argv[1], "signal") == 0) {
        signal(SIGUSR1, on_usr1);
        for (long i = 0; i < n; i++) raise(SIGUSR1);
        return hits == n ? 0 : 5;
    }
    return 2;
}
