// A read of stdin blocked when SIGUSR1 comes: with `restart`, the handler has SA_RESTART and
// the read goes on until data arrives; without, it fails with EINTR. For the tests that send
// the signal while the process waits at home or on another node.
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t got;
static void on_usr1(int s) { (void)s; got++; }

int main(int argc, char **argv) {
    int restart = argc > 1 && strcmp(argv[1], "restart") == 0;
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = restart ? SA_RESTART : 0};
    sigaction(SIGUSR1, &sa, NULL);
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    ssize_t n = read(0, buf, sizeof buf);
    if (n < 0)
        printf("read failed: %s; handler ran %d time(s)\n", strerror(errno), (int)got);
    else
        printf("read %zd bytes; handler ran %d time(s)\n", n, (int)got);
    return 0;
}
