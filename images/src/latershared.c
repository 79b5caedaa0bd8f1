/* Waits for a line on stdin, then makes a writable shared file mapping and attaches a SysV
 * segment: calls that run only at home (a process away is brought home for them). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <unistd.h>

int main(void) {
    char line[64];
    puts("waiting");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 2;
    int fd = open("late.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (ftruncate(fd, 4096) != 0) return 1;
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) { printf("mmap failed: errno %d\n", errno); return 1; }
    strcpy(m, "made at home\n");
    munmap(m, 4096);
    char b[16] = {0};
    pread(fd, b, 13, 0);
    printf("file: %s", b);
    int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    char *s = shmat(id, NULL, 0);
    if (s == (void *)-1) { printf("shmat failed: errno %d\n", errno); return 1; }
    strcpy(s, "segment");
    printf("segment: %s\n", s);
    shmdt(s);
    shmctl(id, IPC_RMID, NULL);
    return 0;
}
