/* Page protections, enforced on the guest's own accesses as Linux enforces them.
 *
 * Usage: protect              checks that must not fault: contents kept across PROT_NONE,
 *                             a W^X flip loop, munmap + mmap at the same address reads zero,
 *                             a huge PROT_NONE reservation opened in pieces
 *        protect MODE         then one access that must fault (SIGSEGV, status 139):
 *          ro-store           store to a page made read-only with mprotect
 *          none-read          read of a page made PROT_NONE
 *          unmapped-read      read of a page after munmap
 *          guard              store into a PROT_NONE guard page below a buffer
 *          file-ro-store      store to a read-only private file mapping
 *          brk-shrunk         read of heap memory given back with brk */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PG 4096L

static void fault_now(volatile char *p, int store) {
    printf("before the faulting access\n");
    fflush(stdout);
    if (store) *p = 'w';
    else printf("%d\n", *p);
    printf("after the faulting access\n");
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    volatile char *p = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    p[0] = 'a'; p[PG] = 'b'; p[2 * PG] = 'c';

    /* PROT_NONE keeps contents. */
    mprotect((void *)p, 3 * PG, PROT_NONE);
    mprotect((void *)p, 3 * PG, PROT_READ | PROT_WRITE);
    printf("after NONE and back: %c %c %c\n", p[0], p[PG], p[2 * PG]);

    /* A W^X flip loop, as JITs do. */
    long sum = 0;
    for (int i = 0; i < 2000; i++) {
        mprotect((void *)p, PG, PROT_READ | PROT_WRITE);
        p[i % PG] = (char)i;
        mprotect((void *)p, PG, PROT_READ);
        sum += p[i % PG];
    }
    printf("flip loop sum %ld\n", sum);

    /* munmap, then a new mapping at the same address reads zero. */
    void *q = mmap(NULL, 8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(q, 'q', 8 * PG);
    munmap(q, 8 * PG);
    char *q2 = mmap(q, 8 * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    int nz = 0;
    for (long i = 0; i < 8 * PG; i++) nz += q2[i] != 0;
    printf("remapped nonzero bytes: %d\n", nz);

    /* MAP_FIXED over a live mapping replaces its contents. */
    memset(q2, 'r', PG);
    mmap(q2, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    printf("MAP_FIXED over data reads %d\n", q2[0]);

    /* A large PROT_NONE reservation opened in pieces. */
    size_t big = 1UL << 40;
    char *r = mmap(NULL, big, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (r == MAP_FAILED) { puts("reservation failed"); return 1; }
    for (int i = 0; i < 64; i++) {
        char *c = r + (size_t)i * (big / 64);
        mprotect(c, 16 * PG, PROT_READ | PROT_WRITE);
        c[5] = (char)('A' + i % 26);
    }
    int ok = 0;
    for (int i = 0; i < 64; i++) ok += r[(size_t)i * (big / 64) + 5] == (char)('A' + i % 26);
    printf("reservation pieces ok: %d\n", ok);
    munmap(r, big);

    if (!strcmp(mode, "ro-store")) {
        mprotect((void *)p, PG, PROT_READ);
        printf("read-only page reads %c\n", p[0]);
        fault_now(p, 1);
    } else if (!strcmp(mode, "none-read")) {
        mprotect((void *)(p + PG), PG, PROT_NONE);
        fault_now(p + PG, 0);
    } else if (!strcmp(mode, "unmapped-read")) {
        munmap((void *)(p + 2 * PG), PG);
        fault_now(p + 2 * PG, 0);
    } else if (!strcmp(mode, "guard")) {
        mprotect((void *)p, PG, PROT_NONE);
        memset((void *)(p + PG), 'g', PG);
        fault_now(p + PG - 1, 1);
    } else if (!strcmp(mode, "file-ro-store")) {
        int fd = open("ro.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
        write(fd, "file contents", 13);
        volatile char *f = mmap(NULL, PG, PROT_READ, MAP_PRIVATE, fd, 0);
        printf("file page reads %c\n", f[0]);
        fault_now(f, 1);
    } else if (!strcmp(mode, "hole")) {
        /* mprotect over a hole changes the pages before it, then says ENOMEM. */
        munmap((void *)(p + 2 * PG), PG);
        int r = mprotect((void *)p, 3 * PG, PROT_READ);
        printf("mprotect over a hole: %d\n", r);
        printf("bad prot bits: %d\n", mprotect((void *)p, PG, 0xff));
        fault_now(p + PG, 1);
    } else if (!strcmp(mode, "brk-shrunk")) {
        char *top = sbrk(0);
        sbrk(4 * PG);
        memset(top, 'h', 4 * PG);
        sbrk(-4 * PG);
        fault_now(top + 2 * PG, 0);
    }
    return 0;
}
