/* Allocates about N MiB (argv[1], default 256) in many ways: malloc of many
 * sizes, mmap/munmap, and realloc growth (large blocks make glibc use
 * mremap). Fills, checksums and frees everything, printing the checksums.
 * On an allocation failure it prints one line on stderr and exits 1. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MIB (1024UL * 1024UL)

static uint64_t fill_and_sum(unsigned char *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 6364136223846793005ULL + 1442695040888963407ULL, sum = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        if ((i & 7) == 0)
            x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        p[i] = (unsigned char)(x >> (8 * (i & 7)));
    }
    for (i = 0; i < n; i++)
        sum = sum * 131 + p[i];
    return sum;
}

static uint64_t sum_only(const unsigned char *p, size_t n)
{
    uint64_t sum = 0;
    size_t i;
    for (i = 0; i < n; i++)
        sum = sum * 131 + p[i];
    return sum;
}

static void fail(const char *what, size_t size)
{
    fprintf(stderr, "memory: %s of %zu bytes failed\n", what, size);
    exit(1);
}

int main(int argc, char **argv)
{
    long mib = argc > 1 ? atol(argv[1]) : 256;
    size_t total = (size_t)(mib < 1 ? 1 : mib) * MIB;
    size_t budget = total / 2, used, nblocks = 0, i;
    static unsigned char *blocks[1 << 16];
    static size_t sizes[1 << 16];
    uint64_t sum = 0, x = 12345;
    unsigned char *big = NULL;
    size_t big_size = 0;

    /* 1. malloc of many sizes, from a few bytes to a few MiB. */
    for (used = 0; used < budget && nblocks < sizeof(blocks) / sizeof(blocks[0]);) {
        size_t sz;
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        switch ((x >> 33) % 4) {
        case 0: sz = 1 + (x >> 40) % 256; break;
        case 1: sz = 256 + (x >> 40) % 16384; break;
        case 2: sz = 16384 + (x >> 40) % (256 * 1024); break;
        default: sz = 256 * 1024 + (x >> 40) % (4 * MIB); break;
        }
        if (used + sz > budget)
            sz = budget - used;
        if (sz == 0)
            break;
        blocks[nblocks] = malloc(sz);
        if (!blocks[nblocks])
            fail("malloc", sz);
        sizes[nblocks] = sz;
        sum ^= fill_and_sum(blocks[nblocks], sz, nblocks);
        used += sz;
        nblocks++;
    }
    printf("malloc blocks %zu bytes %zu checksum %016llx\n", nblocks, used,
           (unsigned long long)sum);
    /* Free every other block, then reallocate into the holes. */
    for (i = 0; i < nblocks; i += 2)
        free(blocks[i]);
    sum = 0;
    for (i = 0; i < nblocks; i += 2) {
        blocks[i] = malloc(sizes[i]);
        if (!blocks[i])
            fail("malloc", sizes[i]);
        sum ^= fill_and_sum(blocks[i], sizes[i], i + 7);
    }
    for (i = 1; i < nblocks; i += 2)
        sum ^= sum_only(blocks[i], sizes[i]);
    printf("malloc refill checksum %016llx\n", (unsigned long long)sum);
    for (i = 0; i < nblocks; i++)
        free(blocks[i]);

    /* 2. mmap/munmap of anonymous regions, with a hole punched in the middle. */
    sum = 0;
    for (i = 0; i < 4; i++) {
        size_t sz = total / 16;
        unsigned char *p = mmap(NULL, sz, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            fail("mmap", sz);
        sum ^= fill_and_sum(p, sz, 100 + i);
        if (sz > 3 * 4096 && munmap(p + 4096, 4096) != 0)
            fail("munmap", 4096);
        sum ^= sum_only(p, 4096) + sum_only(p + 8192, sz - 8192);
        if (munmap(p, sz) != 0)
            fail("munmap", sz);
    }
    printf("mmap checksum %016llx\n", (unsigned long long)sum);

    /* 3. realloc growth up to a quarter of the total; the contents must
     * survive every move. */
    big_size = 4096;
    big = malloc(big_size);
    if (!big)
        fail("malloc", big_size);
    sum = fill_and_sum(big, big_size, 1);
    while (big_size * 2 <= total / 4) {
        size_t old = big_size;
        unsigned char *p;
        big_size *= 2;
        p = realloc(big, big_size);
        if (!p)
            fail("realloc", big_size);
        if (sum_only(p, old) != sum)
            fail("realloc (contents changed)", big_size);
        big = p;
        fill_and_sum(big + old, big_size - old, big_size);
        sum = sum_only(big, big_size);
    }
    printf("realloc final %zu checksum %016llx\n", big_size,
           (unsigned long long)sum);
    free(big);

    /* 4. calloc must hand out zeroed memory. */
    {
        size_t sz = total / 8;
        unsigned char *p = calloc(1, sz);
        size_t nz = 0;
        if (!p)
            fail("calloc", sz);
        for (i = 0; i < sz; i++)
            nz += p[i] != 0;
        printf("calloc %zu nonzero %zu\n", sz, nz);
        free(p);
    }
    printf("total MiB %zu done\n", total / MIB);
    return 0;
}
