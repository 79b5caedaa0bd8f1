/* Prints the wall clock as the three calls a program may use see it, one line per tick:
 * "time() clock_gettime(CLOCK_REALTIME).tv_sec gettimeofday().tv_sec".
 * Usage: wallclock TICKS INTERVAL_MS */
#include <stdio.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

int main(int argc, char **argv) {
    int ticks = argc > 1 ? atoi(argv[1]) : 10;
    long ms = argc > 2 ? atol(argv[2]) : 100;
    struct timespec pause = {ms / 1000, (ms % 1000) * 1000000L};
    for (int i = 0; i < ticks; i++) {
        struct timespec ts;
        struct timeval tv;
        time_t t = time(NULL);
        if (clock_gettime(CLOCK_REALTIME, &ts) != 0 || gettimeofday(&tv, NULL) != 0) {
            perror("clock");
            return 1;
        }
        printf("%lld %lld %lld\n", (long long)t, (long long)ts.tv_sec, (long long)tv.tv_sec);
        fflush(stdout);
        nanosleep(&pause, NULL);
    }
    return 0;
}
