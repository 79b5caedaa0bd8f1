/* Memory given back and taken again while it runs: CHUNKS chunks of 1 MiB, each filled with a
 * pattern of its own; in each round one chunk is checked against its pattern (every other
 * round), unmapped, mapped
 * afresh (which must read as zeros) and filled with a new pattern. Prints the mismatches and
 * the non-zero bytes found in fresh memory every 250 rounds (both 0 on a sound system), then a
 * checksum. Usage: churn [ROUNDS [CHUNKS]] (defaults 4000, 64; at most 1024 chunks); prints
 * "ready" once all chunks are filled. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define MAX_CHUNKS 1024
#define CHUNK (1UL << 20)

static uint64_t *map_chunk(void)
{
    void *p = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static void fill(uint64_t *c, uint64_t gen)
{
    for (size_t i = 0; i < CHUNK / 8; i++)
        c[i] = gen * 0x9e3779b97f4a7c15ull + i;
}

static size_t mismatches(const uint64_t *c, uint64_t gen)
{
    size_t bad = 0;
    for (size_t i = 0; i < CHUNK / 8; i++)
        bad += c[i] != gen * 0x9e3779b97f4a7c15ull + i;
    return bad;
}

int main(int argc, char **argv)
{
    long rounds = argc > 1 ? atol(argv[1]) : 4000;
    long chunks = argc > 2 ? atol(argv[2]) : 64;
    if (chunks < 1 || chunks > MAX_CHUNKS) {
        fprintf(stderr, "churn: CHUNKS must be 1..%d\n", MAX_CHUNKS);
        return 2;
    }
    static uint64_t *chunk[MAX_CHUNKS], gen[MAX_CHUNKS];
    uint64_t next = 1, x = 12345, sum = 0;
    size_t bad = 0, dirty = 0;
    for (int i = 0; i < chunks; i++) {
        chunk[i] = map_chunk();
        gen[i] = next++;
        fill(chunk[i], gen[i]);
    }
    printf("ready\n");
    fflush(stdout);
    for (long r = 1; r <= rounds; r++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        int i = (int)((x >> 33) % (uint64_t)chunks);
        /* Every other round the chunk goes unread: its memory is given back untouched. */
        if (r % 2)
            bad += mismatches(chunk[i], gen[i]);
        munmap(chunk[i], CHUNK);
        chunk[i] = map_chunk();
        for (size_t k = 0; k < CHUNK / 8; k++)
            dirty += chunk[i][k] != 0;
        gen[i] = next++;
        fill(chunk[i], gen[i]);
        if (r % 250 == 0) {
            printf("round %ld mismatches %zu nonzero_fresh %zu\n", r, bad, dirty);
            fflush(stdout);
        }
    }
    for (int i = 0; i < chunks; i++)
        sum += chunk[i][i * 997] + gen[i];
    printf("sum %016llx\n", (unsigned long long)sum);
    return bad != 0 || dirty != 0;
}
