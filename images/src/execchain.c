// execve as Linux does it: errno for what cannot run (ENOENT, EACCES, ENOEXEC, E2BIG),
// a `#!` script whose interpreter is this program, descriptors without O_CLOEXEC kept, the
// environment passed, ignored signals kept ignored and handlers reset, the mask and pending
// signals kept, then a chain on through /bin/sh to a last program whose status is ours.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void on_usr1(int s) { (void)s; }

static int child(int argc, char **argv) {
    printf("child: argc %d", argc);
    for (int i = 1; i < argc; i++) printf(" [%s]", strchr(argv[i], '/') ? "path" : argv[i]);
    printf(" FOO=%s\n", getenv("FOO") ? getenv("FOO") : "(none)");
    printf("child: fd 3 %s, fd 4 %s\n", fcntl(3, F_GETFD) >= 0 ? "open" : "closed",
           fcntl(4, F_GETFD) >= 0 ? "open" : "closed");
    struct sigaction sa;
    sigaction(SIGUSR1, NULL, &sa);
    printf("child: USR1 %s\n", sa.sa_handler == SIG_DFL ? "default" : "other");
    sigaction(SIGUSR2, NULL, &sa);
    printf("child: USR2 %s\n", sa.sa_handler == SIG_IGN ? "ignored" : "other");
    sigset_t m, p;
    sigprocmask(SIG_BLOCK, NULL, &m);
    sigpending(&p);
    printf("child: TERM blocked %d pending %d\n", sigismember(&m, SIGTERM), sigismember(&p, SIGTERM));
    char line[64];
    ssize_t n = read(3, line, sizeof line - 1);
    printf("child: read %zd from the kept descriptor\n", n);
    fflush(stdout);
    char *sh[] = {"sh", "-c", "echo \"sh: FOO is $FOO\"; exit 42", NULL};
    execv("/bin/sh", sh);
    perror("execv /bin/sh");
    return 1;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "child") == 0) return child(argc, argv);
    setvbuf(stdout, NULL, _IONBF, 0);
    char *none[] = {"x", NULL};
    int r = execve("/nonexistent/prog", none, NULL);
    printf("missing: %d %s\n", r, strerror(errno));
    r = execve("/etc/passwd", none, NULL);
    printf("not executable: %d %s\n", r, strerror(errno));
    r = execve("/", none, NULL);
    printf("directory: %d %s\n", r, strerror(errno));
    int fd = open("notelf", O_CREAT | O_WRONLY | O_TRUNC, 0755);
    if (write(fd, "just text\n", 10) != 10) return 2;
    close(fd);
    r = execve("./notelf", none, NULL);
    printf("not a program: %d %s\n", r, strerror(errno));
    size_t big = 300 * 1024;
    char *huge = malloc(big);
    memset(huge, 'a', big - 1);
    huge[big - 1] = 0;
    char *toobig[] = {"x", huge, NULL};
    r = execve("/bin/true", toobig, NULL);
    printf("argument too long: %d %s\n", r, strerror(errno));
    free(huge);

    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return 3;
    self[n] = 0;
    fd = open("script.sh", O_CREAT | O_WRONLY | O_TRUNC, 0755);
    dprintf(fd, "#!%s child\n", self);
    close(fd);
    int p[2];
    if (pipe(p) != 0 || p[0] != 3) return 4;  // fd 3: kept; fd 4 (write end): close-on-exec
    fcntl(p[1], F_SETFD, FD_CLOEXEC);
    if (write(p[1], "through exec\n", 13) != 13) return 5;
    struct sigaction sa = {.sa_handler = on_usr1};
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGUSR2, SIG_IGN);
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGTERM);
    sigprocmask(SIG_BLOCK, &m, NULL);
    raise(SIGTERM);
    char *args[] = {"script", "one", NULL};
    char *env[] = {"FOO=bar", NULL};
    execve("./script.sh", args, env);
    perror("execve script");
    return 1;
}
