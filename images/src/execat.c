/* Execs at a given moment: dirties MiB megabytes of memory over and over until wall-clock
 * time T (ms since the epoch, argv[1]), then execs /bin/sh to print two lines and exit 33.
 * A test moves the process around T (argv[2]: MiB, default 8). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    long long t = atoll(argv[1]);
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 8;
    char *m = malloc(mib << 20);
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long now = ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
        if (now >= t)
            break;
        memset(m, (int)now, mib << 20);
    }
    execl("/bin/sh", "sh", "-c", "echo exec ok; echo after; exit 33", (char *)NULL);
    return 1;
}
