/* Holds a writable shared file mapping until told to let it go, then works on.
 * stdin: one line ("unmap") to drop the mapping, then one more line to finish. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void) {
    int fd = open("shared.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (ftruncate(fd, 4096) != 0) return 1;
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { puts("mmap failed"); return 1; }
    strcpy(m, "written through the mapping\n");
    puts("mapped");
    fflush(stdout);
    char line[128];
    if (!fgets(line, sizeof line, stdin)) return 2;
    munmap(m, 4096);
    printf("unmapped after %s", line);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 3;
    unsigned long h = 5381;
    for (long i = 0; i < 20000000; i++) h = h * 33 + (i & 0xff);
    printf("finished after %s%lx\n", line, h);
    close(fd);
    return 0;
}
