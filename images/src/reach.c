/* A guest trying to reach the memory and descriptors of the VMM that runs it: its own
 * /proc/self/mem (natively the process's own memory, under mosvm the VMM's), directly, through
 * /proc/thread-self and through a symbolic link, and every descriptor number of its pid's
 * /proc/PID/fd through links the VMM does not rewrite. Prints what it got; under mosvm the
 * memory must stay out of reach and only the guest's own descriptors may reopen. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void try_mem(const char *path) {
    int fd = open(path, O_RDWR);
    printf("%s: %s\n", path, fd >= 0 ? "opened" : strerror(errno));
    if (fd >= 0) close(fd);
}

int main(void) {
    try_mem("/proc/self/mem");
    try_mem("/proc/thread-self/mem");
    try_mem("/proc/self/pagemap");
    symlink("/proc/self/mem", "memlink");
    try_mem("memlink");
    int p[2];
    if (pipe(p) != 0) return 1;
    /* Every pipe the process itself holds. */
    static struct stat mine[1024];
    int n_mine = 0;
    for (int fd = 0; fd < 1024; fd++)
        if (fstat(fd, &mine[n_mine]) == 0 && S_ISFIFO(mine[n_mine].st_mode)) n_mine++;
    int foreign = 0;
    for (int i = 0; i < 256; i++) {
        char link[32], target[64];
        snprintf(link, sizeof link, "fdlink%d", i);
        snprintf(target, sizeof target, "/proc/%d/fd/%d", getpid(), i);
        symlink(target, link);
        int fd = open(link, O_RDONLY | O_NONBLOCK);
        if (fd < 0) continue;
        struct stat st;
        fstat(fd, &st);
        /* A pipe that is not one of ours would be the VMM's. */
        int ours = 0;
        for (int k = 0; k < n_mine; k++)
            if (st.st_ino == mine[k].st_ino && st.st_dev == mine[k].st_dev) ours = 1;
        if (S_ISFIFO(st.st_mode) && !ours) foreign++;
        close(fd);
        unlink(link);
    }
    printf("foreign pipes reopened: %d\n", foreign);
    return 0;
}
