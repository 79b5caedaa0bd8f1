/* Forks where the process runs: it works until the file "moved" appears in its directory (by
 * then it may run away from home), then forks three children. Each says it started (a file
 * "childN.ready"), works until "checked" appears (the test may move it meanwhile), computes,
 * reports through a pipe to the parent, writes a file of its own and ends in its own way: an
 * exit status, death by a signal it sends itself, death by the parent's SIGKILL. The parent
 * prints their reports in order and what wait reports of each; then a vfork child execs
 * /bin/echo, and a child forks a grandchild whose status it passes on. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define N 3

/* Work until `file` appears, or (when `parent` is not 0) until the parent is gone. */
static void work_until(const char *file, pid_t parent) {
    static volatile unsigned long sink;
    while (access(file, F_OK) != 0) {
        if (parent && getppid() != parent)
            _exit(1);
        for (unsigned long i = 0; i < 2000000; i++)
            sink += i;
    }
}

static int cmp(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void child(int i, pid_t parent, int out) {
    char name[32];
    snprintf(name, sizeof name, "child%d.ready", i);
    close(open(name, O_CREAT | O_WRONLY, 0644));
    work_until("checked", parent);
    unsigned long s = 0;
    for (unsigned long k = 0; k < 30000000; k++)
        s += k * (unsigned long)(i + 3) % 11;
    snprintf(name, sizeof name, "child%d.out", i);
    FILE *f = fopen(name, "w");
    fprintf(f, "%lu\n", s);
    fclose(f);
    /* (The report comes last: the parent kills child 2 once it has them all.) */
    dprintf(out, "child %d: sum %lu, parent %s, own pid %s\n", i, s,
            getppid() == parent ? "right" : "WRONG", getpid() != parent ? "new" : "SAME");
    if (i == 1)
        kill(getpid(), SIGTERM);
    if (i == 2)
        for (;;)
            pause();
    _exit(10 + i);
}

int main(void) {
    work_until("moved", 0);
    pid_t me = getpid();
    int p[2];
    if (pipe(p) != 0)
        return 1;
    pid_t kids[N];
    for (int i = 0; i < N; i++) {
        kids[i] = fork();
        if (kids[i] < 0) {
            perror("fork");
            return 1;
        }
        if (kids[i] == 0) {
            close(p[0]);
            child(i, me, p[1]);
        }
    }
    close(p[1]);
    /* Every report comes in before the last child is killed. */
    char buf[4096];
    size_t len = 0;
    char *lines[N];
    int got = 0;
    while (got < N) {
        ssize_t n = read(p[0], buf + len, sizeof buf - 1 - len);
        if (n <= 0)
            break;
        len += n;
        buf[len] = 0;
        got = 0;
        for (char *c = buf; *c; c++)
            got += *c == '\n';
    }
    char *save = NULL;
    int k = 0;
    for (char *l = strtok_r(buf, "\n", &save); l && k < N; l = strtok_r(NULL, "\n", &save))
        lines[k++] = l;
    qsort(lines, k, sizeof *lines, cmp);
    for (int i = 0; i < k; i++)
        printf("%s\n", lines[i]);
    kill(kids[2], SIGKILL);
    for (int i = 0; i < N; i++) {
        int st;
        pid_t w = waitpid(kids[i], &st, 0);
        printf("child %d: waited %s, ", i, w == kids[i] ? "right pid" : "WRONG pid");
        if (WIFEXITED(st))
            printf("exit %d\n", WEXITSTATUS(st));
        else if (WIFSIGNALED(st))
            printf("signal %d\n", WTERMSIG(st));
        else
            printf("status %#x\n", st);
    }
    fflush(stdout);
    pid_t v = vfork();
    if (v == 0) {
        execl("/bin/echo", "echo", "a vfork child exec'd", (char *)NULL);
        _exit(127);
    }
    int st;
    waitpid(v, &st, 0);
    printf("vfork child: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    pid_t c = fork();
    if (c == 0) {
        pid_t g = fork();
        if (g == 0)
            _exit(7);
        int gs;
        waitpid(g, &gs, 0);
        _exit(WIFEXITED(gs) ? WEXITSTATUS(gs) + 1 : 99);
    }
    waitpid(c, &st, 0);
    printf("child of a child: exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    return 0;
}
