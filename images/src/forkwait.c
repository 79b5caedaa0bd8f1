// Processes as Linux makes them: fork with a pipe to the parent, exec chains, wait statuses
// (exit codes, deaths by signal), a SIGCHLD handler and its siginfo, waitid, kill between
// processes and to a process group, vfork, posix_spawn, copy-on-write memory after fork,
// descriptors and cwd inherited, orphans' exits reaped.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static volatile sig_atomic_t chld, chld_code, chld_status, chld_pid_ok;
static pid_t expect_pid;

static void on_chld(int s, siginfo_t *si, void *u) {
    (void)s;
    (void)u;
    chld++;
    chld_code = si->si_code;
    chld_status = si->si_status;
    chld_pid_ok = si->si_pid == expect_pid;
}

static void status(const char *what, int st) {
    if (WIFEXITED(st))
        printf("%s: exited %d\n", what, WEXITSTATUS(st));
    else if (WIFSIGNALED(st))
        printf("%s: killed by %d%s\n", what, WTERMSIG(st), WCOREDUMP(st) ? " (core)" : "");
    else
        printf("%s: status %#x\n", what, st);
}

static int big[1 << 16];

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    struct rlimit nocore = {0, 0};
    setrlimit(RLIMIT_CORE, &nocore);
    pid_t me = getpid();

    // 1. fork: the child writes through a pipe; memory is a copy.
    for (int i = 0; i < (1 << 16); i++) big[i] = i;
    int p[2];
    if (pipe(p) != 0) return 2;
    pid_t c = fork();
    if (c == 0) {
        close(p[0]);
        big[5] = -5;
        char b[128];
        int n = snprintf(b, sizeof b, "child: ppid is parent %d, own pid differs %d, big %d %d\n",
                         getppid() == me, getpid() != me, big[5], big[65535]);
        if (write(p[1], b, n) != n) _exit(9);
        _exit(3);
    }
    close(p[1]);
    char buf[256];
    ssize_t n;
    while ((n = read(p[0], buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
    close(p[0]);
    int st;
    printf("wait: right pid %d\n", waitpid(c, &st, 0) == c);
    status("fork child", st);
    printf("parent big[5] still %d\n", big[5]);

    // 2. Deaths by signal: abort, a segfault, a kill from the parent.
    c = fork();
    if (c == 0) abort();
    waitpid(c, &st, 0);
    status("abort", st);
    c = fork();
    if (c == 0) {
        *(volatile int *)8 = 1;
        _exit(0);
    }
    waitpid(c, &st, 0);
    status("segfault", st);
    if (pipe(p) != 0) return 2;
    c = fork();
    if (c == 0) {
        close(p[0]);
        close(p[1]);
        for (;;) pause();
    }
    close(p[1]);
    usleep(50000);
    kill(c, SIGTERM);
    waitpid(c, &st, 0);
    status("killed", st);
    close(p[0]);

    // 2b. A signal sent the moment fork returns reaches the child (none is lost while the
    // child is still being set up).
    int killed = 0;
    for (int i = 0; i < 20; i++) {
        c = fork();
        if (c == 0) {
            for (;;) pause();
        }
        kill(c, SIGTERM);
        waitpid(c, &st, 0);
        killed += WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM;
    }
    printf("killed right after fork: %d of 20\n", killed);

    // 3. SIGCHLD with siginfo, then waitid.
    struct sigaction sa = {.sa_sigaction = on_chld, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigaction(SIGCHLD, &sa, NULL);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGCHLD);
    sigprocmask(SIG_BLOCK, &block, &old);
    c = fork();
    if (c == 0) _exit(42);
    expect_pid = c;
    sigset_t none;
    sigemptyset(&none);
    while (!chld) sigsuspend(&none);
    sigprocmask(SIG_SETMASK, &old, NULL);
    printf("sigchld: %d code %d status %d pid ok %d\n", chld, chld_code, chld_status, chld_pid_ok);
    siginfo_t si;
    memset(&si, 0, sizeof si);
    printf("waitid: %d", waitid(P_PID, c, &si, WEXITED));
    printf(" code %d status %d pid ok %d\n", si.si_code, si.si_status, si.si_pid == c);
    signal(SIGCHLD, SIG_DFL);

    // 4. A process group of two children, killed together.
    pid_t g1 = fork();
    if (g1 == 0) {
        setpgid(0, 0);
        for (;;) pause();
    }
    setpgid(g1, g1);
    pid_t g2 = fork();
    if (g2 == 0) {
        setpgid(0, g1);
        for (;;) pause();
    }
    setpgid(g2, g1);
    usleep(50000);
    printf("pgid: %d %d\n", getpgid(g1) == g1, getpgid(g2) == g1);
    kill(-g1, SIGUSR1);
    int s1, s2;
    waitpid(g1, &s1, 0);
    waitpid(g2, &s2, 0);
    status("group 1", s1);
    status("group 2", s2);

    // 5. exec chains: fork, exec /bin/sh, which forks and execs again; output by a pipe.
    if (pipe(p) != 0) return 2;
    c = fork();
    if (c == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        execl("/bin/sh", "sh", "-c", "echo one; /bin/echo two | tr a-z A-Z; exit 6", (char *)0);
        _exit(127);
    }
    close(p[1]);
    while ((n = read(p[0], buf, sizeof buf)) > 0) fwrite(buf, 1, n, stdout);
    close(p[0]);
    waitpid(c, &st, 0);
    status("sh", st);

    // 6. vfork + exec, vfork + _exit; posix_spawn.
    c = vfork();
    if (c == 0) {
        execl("/bin/echo", "echo", "vfork exec", (char *)0);
        _exit(127);
    }
    waitpid(c, &st, 0);
    status("vfork exec", st);
    c = vfork();
    if (c == 0) _exit(11);
    waitpid(c, &st, 0);
    status("vfork exit", st);
    char *argv[] = {"sh", "-c", "echo spawned $0", NULL};
    int r = posix_spawn(&c, "/bin/sh", NULL, NULL, argv, environ);
    waitpid(c, &st, 0);  // the spawned shell's output and ours would race otherwise
    printf("posix_spawn: %d\n", r);
    status("spawned", st);

    // 6b. A vfork child shares its parent's memory until it execs or exits: what it writes
    // is seen (glibc's posix_spawn reports a failed exec that way).
    volatile int shared_word = 1;
    c = vfork();
    if (c == 0) {
        shared_word = 42;
        _exit(0);
    }
    waitpid(c, &st, 0);
    printf("vfork child's write seen: %d\n", shared_word);
    char *none_argv[] = {"nope", NULL};
    r = posix_spawn(&c, "/nonexistent/program", NULL, NULL, none_argv, environ);
    printf("posix_spawn of a missing program: %d (%s)\n", r, strerror(r));
    if (r == 0) waitpid(c, &st, 0);

    // 7. Inherited: descriptors, cwd, files written by the children.
    mkdir("sub", 0755);
    if (chdir("sub") != 0) return 2;
    int fd = open("log", O_CREAT | O_WRONLY | O_APPEND, 0644);
    for (int i = 0; i < 3; i++) {
        c = fork();
        if (c == 0) {
            dprintf(fd, "child %d\n", i);
            _exit(0);
        }
        waitpid(c, &st, 0);
    }
    close(fd);
    if (chdir("..") != 0) return 2;

    // 8. No children left: ECHILD.
    r = waitpid(-1, &st, WNOHANG);
    printf("no more children: %d %s\n", r, strerror(errno));
    return 0;
}
