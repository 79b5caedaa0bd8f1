/* Benchmark guest for migration: fills MIB of memory with non-zero data, prints "ready",
 * then for SECONDS dirties RATE MiB/s (one word per page, paced every 10 ms; 0 = idle), and
 * prints a checksum of the whole buffer at the end.
 * Usage: hog MIB RATE SECONDS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 64;
    long rate = argc > 2 ? atol(argv[2]) : 0;
    double secs = argc > 3 ? atof(argv[3]) : 5;
    size_t pages = (size_t)mib * 256;
    uint64_t *buf = malloc(pages * 4096);
    if (!buf) {
        perror("malloc");
        return 1;
    }
    size_t words = pages * 512;
    for (size_t i = 0; i < words; i++)
        buf[i] = i * 0x9e3779b97f4a7c15ull + 1;
    printf("ready\n");
    fflush(stdout);
    double start = now(), next = start;
    size_t cursor = 0;
    long per_tick = rate * 256 / 100; /* pages per 10 ms */
    while (now() - start < secs) {
        for (long k = 0; k < per_tick; k++) {
            buf[(cursor % pages) * 512] += 1;
            cursor += 7;
        }
        next += 0.01;
        double d = next - now();
        if (d > 0) {
            struct timespec ts = {0, (long)(d * 1e9)};
            nanosleep(&ts, NULL);
        }
    }
    uint64_t sum = 0;
    for (size_t i = 0; i < words; i += 64)
        sum += buf[i];
    printf("sum %016llx\n", (unsigned long long)sum);
    return 0;
}
