/* A long-running guest for migration tests: prints a line steadily, appends to a file in the
 * cwd, and keeps dirtying a buffer, all with deterministic output.
 * Usage: ticker [LINES [WORK [MIB]]]  (defaults 40 lines, 2000000 work units, 16 MiB). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    long lines = argc > 1 ? atol(argv[1]) : 40;
    long work = argc > 2 ? atol(argv[2]) : 2000000;
    long mib = argc > 3 ? atol(argv[3]) : 16;
    size_t size = (size_t)mib << 20;
    uint64_t *buf = malloc(size);
    if (!buf) {
        perror("malloc");
        return 1;
    }
    size_t words = size / sizeof(uint64_t);
    for (size_t i = 0; i < words; i++)
        buf[i] = i * 0x9e3779b97f4a7c15ull;
    FILE *f = fopen("ticker.out", "w");
    if (!f) {
        perror("ticker.out");
        return 1;
    }
    uint64_t x = 1;
    for (long l = 0; l < lines; l++) {
        for (long w = 0; w < work; w++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            buf[(x >> 17) % words] ^= x;
        }
        uint64_t sum = 0;
        for (size_t i = 0; i < words; i += 512)
            sum += buf[i];
        printf("tick %ld %016llx %016llx\n", l, (unsigned long long)x, (unsigned long long)sum);
        fflush(stdout);
        fprintf(f, "line %ld %llu\n", l, (unsigned long long)(sum % 1000003));
        fflush(f);
    }
    fclose(f);
    uint64_t total = 0;
    for (size_t i = 0; i < words; i++)
        total += buf[i];
    printf("total %016llx\n", (unsigned long long)total);
    return 0;
}
