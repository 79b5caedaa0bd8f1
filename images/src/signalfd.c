// signalfd(2): reads of pending signals as signalfd_siginfo records (standard ones merged,
// real-time ones queued with their value), poll and epoll readiness, SIGCHLD with its status,
// O_NONBLOCK against a blocking read woken by another process's signal, a short buffer.
#define _GNU_SOURCE
#include <sys/signalfd.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
#include <poll.h>
#include <errno.h>
#include <string.h>
#include <sys/wait.h>
#include <sys/epoll.h>
int main(void) {
    sigset_t m; sigemptyset(&m);
    sigaddset(&m, SIGUSR1); sigaddset(&m, SIGCHLD); sigaddset(&m, SIGRTMIN);
    sigprocmask(SIG_BLOCK, &m, 0);
    int fd = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC);
    printf("signalfd %s\n", fd >= 0 ? "ok" : strerror(errno));
    struct signalfd_siginfo si[4];
    ssize_t n = read(fd, si, sizeof si);
    printf("empty read %zd %s\n", n, n < 0 ? strerror(errno) : "");
    struct pollfd p = {fd, POLLIN, 0};
    printf("poll before %d\n", poll(&p, 1, 0));
    kill(getpid(), SIGUSR1); kill(getpid(), SIGUSR1);
    union sigval v = {.sival_int = 99};
    sigqueue(getpid(), SIGRTMIN, v); sigqueue(getpid(), SIGRTMIN, v);
    int pr = poll(&p, 1, 1000);
    printf("poll after %d revents %d\n", pr, p.revents);
    n = read(fd, si, sizeof si);
    for (int i = 0; i < n / (ssize_t)sizeof *si; i++)
        printf("  signo %u code %d int %d pid-ok %d\n", si[i].ssi_signo, si[i].ssi_code, si[i].ssi_int, si[i].ssi_pid == (unsigned)getpid());
    printf("poll drained %d\n", poll(&p, 1, 0));
    pid_t c = fork();
    if (c == 0) _exit(9);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    struct epoll_event out;
    int k = epoll_wait(ep, &out, 1, 5000);
    printf("epoll %d\n", k);
    n = read(fd, si, sizeof si);
    printf("child: %zd records, signo %u status %d pid-ok %d\n", n / (ssize_t)sizeof *si, si[0].ssi_signo, si[0].ssi_status, si[0].ssi_pid == (unsigned)c);
    waitpid(c, 0, 0);
    sigset_t u;
    sigemptyset(&u);
    sigaddset(&u, SIGUSR1);
    int fd2 = signalfd(-1, &u, 0);
    if (fork() == 0) { usleep(100000); kill(getppid(), SIGUSR1); _exit(0); }
    n = read(fd2, si, sizeof si);
    int e = errno;
    printf("blocking read %zd signo %u %s\n", n, si[0].ssi_signo, n < 0 ? strerror(e) : "");
    n = read(fd2, si, 10);
    e = errno;
    printf("short read %zd %s\n", n, strerror(e));
    close(fd); close(fd2);
    return 0;
}
