/* Memory-map operations in a loop, for benchmarks: each prints nothing but a checksum.
 * Usage: mapbench flip N    mprotect one touched page read-only and back, N times
 *        mapbench anon N    mmap 1 MiB, touch every page, munmap, N times (malloc's large blocks)
 *        mapbench file N    mmap a 1 MiB file shared, read every page, munmap, N times */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MIB (1L << 20)

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[2]);
    unsigned long sum = 0;
    if (!strcmp(argv[1], "flip")) {
        char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (long i = 0; i < n; i++) {
            p[i & 4095] = (char)i;
            mprotect(p, 4096, PROT_READ);
            sum += (unsigned char)p[i & 4095];
            mprotect(p, 4096, PROT_READ | PROT_WRITE);
        }
    } else if (!strcmp(argv[1], "anon")) {
        for (long i = 0; i < n; i++) {
            char *p = mmap(NULL, MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            for (long o = 0; o < MIB; o += 4096) p[o] = (char)o;
            sum += (unsigned char)p[4096];
            munmap(p, MIB);
        }
    } else if (!strcmp(argv[1], "file")) {
        int fd = open("mapbench.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (ftruncate(fd, MIB) != 0) return 1;
        for (long i = 0; i < n; i++) {
            char *p = mmap(NULL, MIB, PROT_READ, MAP_SHARED, fd, 0);
            for (long o = 0; o < MIB; o += 4096) sum += (unsigned char)p[o];
            munmap(p, MIB);
        }
        unlink("mapbench.bin");
    }
    printf("%lu\n", sum);
    return 0;
}
