/* Calls whose arguments hold buffers, lengths and nested pointers, run with good and bad
 * arguments: every result and every byte the kernel hands back is printed, so a run under
 * mosvm can be compared with the same program run natively.
 *
 * marshal [MiB]: MiB (default 200) is the size of the single read and write of a file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <termios.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef FICLONE
#define FICLONE _IOW(0x94, 9, int)
#endif

#define WILD ((void *)0xdead0000000UL)
#define KERNEL ((void *)0xffff888000000000UL)
#define NONCANON ((void *)0x0000900000000000UL)

static const char *en(int e) {
    switch (e) {
    case EPERM: return "EPERM"; case ENOENT: return "ENOENT"; case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN"; case ENOMEM: return "ENOMEM"; case EACCES: return "EACCES";
    case EFAULT: return "EFAULT"; case EEXIST: return "EEXIST"; case ENOTDIR: return "ENOTDIR";
    case EINVAL: return "EINVAL"; case EMFILE: return "EMFILE"; case ENOTTY: return "ENOTTY";
    case EFBIG: return "EFBIG"; case ESPIPE: return "ESPIPE"; case ENOSYS: return "ENOSYS";
    case ENODEV: return "ENODEV"; case EOPNOTSUPP: return "EOPNOTSUPP"; case EINTR: return "EINTR";
    case ERANGE: return "ERANGE"; case ENAMETOOLONG: return "ENAMETOOLONG";
    case EMSGSIZE: return "EMSGSIZE"; case ENOBUFS: return "ENOBUFS"; case ENOTSOCK: return "ENOTSOCK";
    case EADDRINUSE: return "EADDRINUSE"; case ECONNREFUSED: return "ECONNREFUSED";
    case EAFNOSUPPORT: return "EAFNOSUPPORT"; case EISDIR: return "EISDIR"; case EPIPE: return "EPIPE";
    case ENOTCONN: return "ENOTCONN"; case EDESTADDRREQ: return "EDESTADDRREQ";
    default: return "other";
    }
}

static void show(const char *what, long r) {
    if (r < 0)
        printf("%-44s -> -1 %s\n", what, en(errno));
    else
        printf("%-44s -> %ld\n", what, r);
    fflush(stdout);
}

static unsigned long sum(const unsigned char *p, size_t n) {
    unsigned long h = 1469598103934665603UL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211UL;
    return h;
}

static void big_transfers(size_t mib) {
    size_t n = mib << 20;
    unsigned char *buf = malloc(n), *in = malloc(n + (2 << 20));
    if (!buf || !in) { printf("malloc failed\n"); return; }
    for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(i * 7 + (i >> 20));
    int fd = open("big.bin", O_RDWR | O_CREAT | O_TRUNC, 0644);
    show("single write(all)", write(fd, buf, n));
    show("size", lseek(fd, 0, SEEK_END));
    memset(in, 0, n);
    long r = pread(fd, in, n, 0);
    show("single pread(all)", r);
    printf("pread equal %d\n", r == (long)n && memcmp(in, buf, n) == 0);
    /* A read asking for more than the file holds. */
    lseek(fd, 0, SEEK_SET);
    memset(in, 0, n);
    r = read(fd, in, n + (2 << 20));
    show("single read(all)", r);
    printf("read sum %lx\n", sum(in, n));
    /* Vectors whose pieces straddle the 64 MiB request size. */
    size_t a = n / 3, b = n - a - 5;
    struct iovec wv[3] = {{buf + n - 5, 5}, {buf, a}, {buf + a, b}};
    lseek(fd, 0, SEEK_SET);
    show("writev(3 pieces)", writev(fd, wv, 3));
    memset(in, 0, n);
    struct iovec rv[2] = {{in, b}, {in + b, n - b}};
    show("preadv(2 pieces)", preadv(fd, rv, 2, 0));
    printf("preadv sum %lx\n", sum(in, n));
    show("pwrite at 1 MiB", pwrite(fd, buf, n / 2, 1 << 20));
    show("pread past the end", pread(fd, in, n, n + (1 << 20) - 10));
    /* Bad buffers and lengths. */
    show("read(WILD, 100)", read(fd, WILD, 100));
    show("read(KERNEL, 100)", read(fd, KERNEL, 100));
    show("read(NONCANON, 100)", read(fd, NONCANON, 100));
    show("write(WILD, huge)", write(fd, WILD, (size_t)1 << 62));
    volatile size_t minus1 = (size_t)-1;
    show("write(buf, -1)", write(fd, buf, minus1));
    show("read(buf, SSIZE_MAX)", pread(fd, in, (size_t)1 << 63 >> 1, 0));
    show("write(badfd, WILD, 1)", write(77, WILD, 1));
    struct iovec bad[2] = {{in, 10}, {WILD, 10}};
    show("readv(good, WILD)", preadv(fd, bad, 2, 0));
    struct iovec neg[1] = {{in, (size_t)-1}};
    show("readv(negative length)", readv(fd, neg, 1));
    struct iovec many[1025];
    for (int i = 0; i < 1025; i++) many[i] = rv[i % 2];
    show("readv(1025 iovecs)", readv(fd, many, 1025));
    show("readv(-1 iovecs)", syscall(SYS_readv, fd, rv, -1L));
    show("readv(1<<63 iovecs: the low 32 bits count)", syscall(SYS_readv, fd, rv, 1UL << 63));
    show("writev(WILD iovecs)", writev(fd, WILD, 2));
    close(fd);
    unlink("big.bin");
    free(buf);
    free(in);
}

static void selects(void) {
    int p[2];
    if (pipe(p) != 0) return;
    show("write pipe", write(p[1], "x", 1));
    fd_set rd;
    struct timespec ts = {0, 1000000};
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR1);
    FD_ZERO(&rd);
    FD_SET(p[0], &rd);
    long r = pselect(p[0] + 1, &rd, NULL, NULL, &ts, &mask);
    printf("pselect(mask) -> %ld ready=%d\n", r, FD_ISSET(p[0], &rd));
    struct { const sigset_t *ss; size_t len; } pack = {&mask, 8};
    FD_ZERO(&rd);
    FD_SET(p[0], &rd);
    show("pselect6(pack)", syscall(SYS_pselect6, p[0] + 1, &rd, NULL, NULL, &ts, &pack));
    pack.len = 16;
    show("pselect6(pack, size 16)", syscall(SYS_pselect6, p[0] + 1, &rd, NULL, NULL, &ts, &pack));
    pack.ss = WILD;
    pack.len = 8;
    show("pselect6(pack -> WILD)", syscall(SYS_pselect6, p[0] + 1, &rd, NULL, NULL, &ts, &pack));
    pack.ss = NULL;
    show("pselect6(pack -> NULL)", syscall(SYS_pselect6, p[0] + 1, &rd, NULL, NULL, &ts, &pack));
    show("pselect6(WILD pack)", syscall(SYS_pselect6, p[0] + 1, &rd, NULL, NULL, &ts, WILD));
    show("select(WILD set)", select(p[0] + 1, WILD, NULL, NULL, NULL));
    FD_ZERO(&rd);
    FD_SET(60, &rd);
    show("select(unknown fd)", select(61, &rd, NULL, NULL, &(struct timeval){0, 0}));
    show("select(-1)", select(-1, NULL, NULL, NULL, &(struct timeval){0, 0}));
    struct pollfd pf[3] = {{p[0], POLLIN, 0}, {55, POLLIN, 0}, {-1, POLLIN, 0}};
    r = poll(pf, 3, 0);
    printf("poll -> %ld: fd %d rev %#x, fd %d rev %#x, fd %d rev %#x\n", r, pf[0].fd,
           pf[0].revents, pf[1].fd, pf[1].revents, pf[2].fd, pf[2].revents);
    show("poll(WILD)", poll(WILD, 2, 0));
    show("poll(nfds 1<<40: the low 32 bits count)", syscall(SYS_poll, pf, 1UL << 40, 0));
    show("ppoll(WILD sigmask)", ppoll(pf, 1, &ts, WILD));
    close(p[0]);
    close(p[1]);
}

static void messages(void) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) return;
    char a[3] = "hel", b[8] = "lo world";
    struct iovec iv[2] = {{a, 3}, {b, 8}};
    struct msghdr m = {0};
    m.msg_iov = iv;
    m.msg_iovlen = 2;
    show("sendmsg", sendmsg(sv[0], &m, 0));
    char r1[4] = {0}, r2[16] = {0};
    struct iovec ov[2] = {{r1, 4}, {r2, 16}};
    struct msghdr in = {0};
    in.msg_iov = ov;
    in.msg_iovlen = 2;
    long r = recvmsg(sv[1], &in, 0);
    printf("recvmsg -> %ld [%.4s][%.16s] flags %#x\n", r, r1, r2, in.msg_flags);
    /* A descriptor passed in SCM_RIGHTS. */
    int fd = open("passed.txt", O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(fd, "via SCM_RIGHTS\n", 15);
    lseek(fd, 0, SEEK_SET);
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr s = {0};
    char one = '!';
    struct iovec siv = {&one, 1};
    s.msg_iov = &siv;
    s.msg_iovlen = 1;
    s.msg_control = ctl.buf;
    s.msg_controllen = sizeof ctl.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&s);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    show("sendmsg(SCM_RIGHTS)", sendmsg(sv[0], &s, 0));
    close(fd);
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } rctl;
    memset(&rctl, 0, sizeof rctl);
    char got = 0;
    struct iovec riv = {&got, 1};
    struct msghdr rm = {0};
    rm.msg_iov = &riv;
    rm.msg_iovlen = 1;
    rm.msg_control = rctl.buf;
    rm.msg_controllen = sizeof rctl.buf;
    r = recvmsg(sv[1], &rm, MSG_CMSG_CLOEXEC);
    struct cmsghdr *rc = CMSG_FIRSTHDR(&rm);
    int nfd = -1;
    if (rc && rc->cmsg_type == SCM_RIGHTS) memcpy(&nfd, CMSG_DATA(rc), sizeof nfd);
    char text[32] = {0};
    long n = nfd >= 0 ? read(nfd, text, sizeof text - 1) : -1;
    printf("recvmsg(SCM_RIGHTS) -> %ld '%c' fd %d cloexec %d controllen %zu read %ld: %s", r,
           got, nfd, nfd >= 0 ? fcntl(nfd, F_GETFD) : -1, (size_t)rm.msg_controllen, n, text);
    close(nfd);
    /* A descriptor that does not exist. */
    int badfd = 99;
    memcpy(CMSG_DATA(c), &badfd, sizeof badfd);
    show("sendmsg(SCM_RIGHTS, bad fd)", sendmsg(sv[0], &s, 0));
    /* Control buffer too small for what arrives: truncated, MSG_CTRUNC. */
    memcpy(CMSG_DATA(c), &sv[0], sizeof sv[0]);
    show("sendmsg(SCM_RIGHTS again)", sendmsg(sv[0], &s, 0));
    /* A receive buffer larger than any control message is only a capacity. */
    static char bigctl[100000];
    struct msghdr bm = rm;
    bm.msg_control = bigctl;
    bm.msg_controllen = sizeof bigctl;
    show("sendmsg(SCM_RIGHTS for a big buffer)", sendmsg(sv[0], &s, 0));
    r = recvmsg(sv[1], &bm, MSG_CMSG_CLOEXEC);
    printf("recvmsg(control 100000) -> %ld controllen %zu\n", r, (size_t)bm.msg_controllen);
    if (r > 0 && CMSG_FIRSTHDR(&bm)) {
        int got_fd;
        memcpy(&got_fd, CMSG_DATA(CMSG_FIRSTHDR(&bm)), sizeof got_fd);
        close(got_fd);
    }
    rm.msg_controllen = 8;
    r = recvmsg(sv[1], &rm, 0);
    printf("recvmsg(small control) -> %ld flags %#x controllen %zu\n", r, rm.msg_flags,
           (size_t)rm.msg_controllen);
    /* Bad pointers inside the msghdr. */
    struct msghdr w = {0};
    struct iovec wiv = {WILD, 4};
    w.msg_iov = &wiv;
    w.msg_iovlen = 1;
    show("sendmsg(iov -> WILD)", syscall(SYS_sendmsg, sv[0], &w, 0));
    w.msg_iov = WILD;
    show("sendmsg(msg_iov WILD)", syscall(SYS_sendmsg, sv[0], &w, 0));
    w.msg_iov = iv;
    w.msg_iovlen = 5000;
    show("sendmsg(5000 iovecs)", syscall(SYS_sendmsg, sv[0], &w, 0));
    w.msg_iovlen = 1;
    w.msg_control = WILD;
    w.msg_controllen = 64;
    show("sendmsg(control WILD)", syscall(SYS_sendmsg, sv[0], &w, 0));
    show("sendmsg(WILD msghdr)", syscall(SYS_sendmsg, sv[0], WILD, 0));
    show("recvmsg(WILD msghdr)", syscall(SYS_recvmsg, sv[1], WILD, MSG_DONTWAIT));
    /* Datagram addresses: a name longer than the buffer is truncated, its length reported. */
    int u = socket(AF_UNIX, SOCK_DGRAM, 0), v = socket(AF_UNIX, SOCK_DGRAM, 0);
    struct sockaddr_un ua = {AF_UNIX, "mosvm-marshal-a.sock"}, va = {AF_UNIX, "mosvm-marshal-b.sock"};
    unlink(ua.sun_path);
    unlink(va.sun_path);
    show("bind a", bind(u, (void *)&ua, sizeof ua));
    show("bind b", bind(v, (void *)&va, sizeof va));
    show("sendto b", sendto(u, "dgram", 5, 0, (void *)&va, sizeof va));
    struct sockaddr_un from;
    memset(&from, 'Z', sizeof from);
    socklen_t fl = 6;
    char dg[16] = {0};
    r = recvfrom(v, dg, sizeof dg, 0, (void *)&from, &fl);
    printf("recvfrom -> %ld '%s' fromlen %u next byte %c\n", r, dg, fl, ((char *)&from)[6]);
    show("sendto b again", sendto(u, "x", 1, 0, (void *)&va, sizeof va));
    memset(&from, 'Z', sizeof from);
    struct msghdr nm = {0};
    struct iovec niv = {dg, sizeof dg};
    nm.msg_name = &from;
    nm.msg_namelen = 4;
    nm.msg_iov = &niv;
    nm.msg_iovlen = 1;
    r = recvmsg(v, &nm, 0);
    printf("recvmsg(name 4) -> %ld namelen %u next byte %c\n", r, nm.msg_namelen,
           ((char *)&from)[4]);
    fl = sizeof from;
    memset(&from, 0, sizeof from);
    r = getsockname(u, (void *)&from, &fl);
    printf("getsockname -> %ld len %u %s\n", r, fl, from.sun_path);
    fl = 3;
    memset(&from, 'Z', sizeof from);
    r = getsockname(u, (void *)&from, &fl);
    printf("getsockname(len 3) -> %ld len %u next byte %c\n", r, fl, ((char *)&from)[3]);
    show("getsockname(WILD len)", getsockname(u, (void *)&from, WILD));
    fl = 16;
    show("getsockname(WILD addr)", getsockname(u, WILD, &fl));
    int val = 0;
    socklen_t vl = 100;
    r = getsockopt(u, SOL_SOCKET, SO_TYPE, &val, &vl);
    printf("getsockopt(SO_TYPE, len 100) -> %ld val %d len %u\n", r, val, vl);
    show("connect(WILD)", connect(u, WILD, 16));
    show("bind(len 1000)", bind(socket(AF_UNIX, SOCK_DGRAM, 0), (void *)&ua, 1000));
    unlink(ua.sun_path);
    unlink(va.sun_path);
}

static void ioctls_and_direct_io(void) {
    int p[2];
    if (pipe(p) != 0) return;
    write(p[1], "abc", 3);
    int n = -1;
    show("ioctl(pipe, FIONREAD)", ioctl(p[0], FIONREAD, &n));
    printf("FIONREAD -> %d\n", n);
    show("ioctl(pipe, TCFLSH)", ioctl(p[0], TCFLSH, 0));
    show("ioctl(pipe, TCSBRK)", ioctl(p[0], TCSBRK, 1));
    struct termios t;
    show("ioctl(pipe, TCGETS)", ioctl(p[0], TCGETS, &t));
    show("ioctl(pipe, unknown)", ioctl(p[0], 0x12345678, 0));
    show("ioctl(pipe, FIONREAD, WILD)", ioctl(p[0], FIONREAD, WILD));
    int a = open("clone-src", O_RDWR | O_CREAT | O_TRUNC, 0644);
    int b = open("clone-dst", O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(a, "cloned bytes\n", 13);
    long r = ioctl(b, FICLONE, a);
    show("ioctl(FICLONE)", r);
    show("ioctl(FICLONE, bad fd)", ioctl(b, FICLONE, 77));
    /* fcntl commands whose argument is a pointer. */
    uint64_t hint = 2, got = 0;
    show("fcntl(F_SET_RW_HINT)", syscall(SYS_fcntl, a, 1036, &hint));
    show("fcntl(F_GET_RW_HINT)", syscall(SYS_fcntl, a, 1035, &got));
    printf("rw hint %lu\n", (unsigned long)got);
    show("fcntl(F_GET_RW_HINT, WILD)", syscall(SYS_fcntl, a, 1035, WILD));
    show("fcntl(F_GETLK, WILD)", syscall(SYS_fcntl, a, F_GETLK, WILD));
    show("fcntl(unknown command)", syscall(SYS_fcntl, a, 9999, 0));
    close(a);
    close(b);
    close(p[0]);
    close(p[1]);
    /* O_DIRECT wants aligned buffers: an aligned transfer works, a misaligned one is EINVAL. */
    int fd = open("direct.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    char page[8192];
    memset(page, 'd', sizeof page);
    write(fd, page, sizeof page);
    fsync(fd);
    close(fd);
    fd = open("direct.dat", O_RDWR | O_DIRECT);
    if (fd < 0) {
        show("open(O_DIRECT)", fd);
    } else {
        char *buf = aligned_alloc(4096, 3 * 4096);
        show("pread(O_DIRECT, aligned)", pread(fd, buf, 4096, 4096));
        printf("read back '%c'\n", buf[100]);
        memset(buf, 'w', 4096);
        show("pwrite(O_DIRECT, aligned)", pwrite(fd, buf, 4096, 0));
        show("pread(O_DIRECT, misaligned)", pread(fd, buf + 1, 4096, 0));
        free(buf);
        close(fd);
    }
    unlink("direct.dat");
}

/* The kernel copies only where the process's mappings allow: into a read-only page, from a
 * PROT_NONE page or a page given back by munmap is EFAULT; a deep stack buffer never touched
 * before is filled. */
static void protections(void) {
    int fd = open("prot.txt", O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(fd, "0123456789", 10);
    char *p = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(p, 'q', 3 * 4096);
    mprotect(p, 4096, PROT_READ);
    mprotect(p + 4096, 4096, PROT_NONE);
    munmap(p + 2 * 4096, 4096);
    show("pread into a read-only page", pread(fd, p, 5, 0));
    printf("read-only page still '%c'\n", p[0]);
    show("write from a read-only page", write(fd, p, 5));
    show("write from a PROT_NONE page", write(fd, p + 4096, 5));
    show("write from an unmapped page", write(fd, p + 2 * 4096, 5));
    show("pread into an unmapped page", pread(fd, p + 2 * 4096, 5, 0));
    struct stat st;
    show("fstat into a read-only page", syscall(SYS_fstat, fd, p));
    show("fstat into its own struct", fstat(fd, &st));
    struct timespec *ts = (void *)p;
    show("clock_gettime into a read-only page", syscall(SYS_clock_gettime, CLOCK_MONOTONIC, ts));
    volatile char deep[1 << 20];
    show("pread into a deep stack buffer", pread(fd, (char *)deep, 10, 0));
    printf("deep stack buffer holds '%c%c'\n", deep[0], deep[9]);
    close(fd);
}

static void paths(void) {
    char small[4];
    show("getcwd(4)", getcwd(small, sizeof small) ? 0 : -1);
    show("getcwd(WILD)", syscall(SYS_getcwd, WILD, 100));
    char lb[5] = "@@@@@";
    show("symlink", symlink("a-long-target-name", "lnk"));
    long r = readlink("lnk", lb, 4);
    printf("readlink(4) -> %ld [%.5s]\n", r, lb);
    show("readlink(WILD buf)", readlink("lnk", WILD, 10));
    show("open(WILD path)", open(WILD, O_RDONLY));
    show("open(KERNEL path)", open(KERNEL, O_RDONLY));
    char *longp = malloc(8192);
    memset(longp, 'a', 8191);
    longp[8191] = 0;
    show("open(8191-byte name)", open(longp, O_RDONLY));
    longp[4096] = 0;
    show("open(4096-byte name)", open(longp, O_RDONLY));
    longp[4095] = 0;
    show("open(4095-byte name)", open(longp, O_RDONLY));
    /* A path running into an unmapped page. */
    char *pg = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(pg + 4096, 4096);
    memset(pg, 'b', 4096);
    show("open(path into a hole)", open(pg, O_RDONLY));
    show("stat(., WILD)", syscall(SYS_stat, ".", WILD));
    show("fstat(WILD)", syscall(SYS_fstat, 1, WILD));
    unlink("lnk");
    free(longp);
}

/* sendmmsg/recvmmsg: several datagrams in one call, msg_len filled in, MSG_WAITFORONE,
 * a bad second header, nothing to read. */
static void many_messages(void) {
    int sv[2];
    socketpair(AF_UNIX, SOCK_DGRAM, 0, sv);
    char text[3][16] = {"one", "two two", "three three 3"};
    struct iovec iov[3];
    struct mmsghdr out[3];
    memset(out, 0, sizeof out);
    for (int i = 0; i < 3; i++) {
        iov[i].iov_base = text[i];
        iov[i].iov_len = strlen(text[i]);
        out[i].msg_hdr.msg_iov = &iov[i];
        out[i].msg_hdr.msg_iovlen = 1;
    }
    show("sendmmsg 3", sendmmsg(sv[0], out, 3, 0));
    printf("msg_len %u %u %u\n", out[0].msg_len, out[1].msg_len, out[2].msg_len);
    char in[4][32];
    struct iovec iiov[4];
    struct mmsghdr got[4];
    memset(got, 0, sizeof got);
    memset(in, 0, sizeof in);
    for (int i = 0; i < 4; i++) {
        iiov[i].iov_base = in[i];
        iiov[i].iov_len = sizeof in[i];
        got[i].msg_hdr.msg_iov = &iiov[i];
        got[i].msg_hdr.msg_iovlen = 1;
    }
    show("recvmmsg 4 WAITFORONE", recvmmsg(sv[1], got, 4, MSG_WAITFORONE, NULL));
    printf("got [%s] [%s] [%s] lens %u %u %u\n", in[0], in[1], in[2], got[0].msg_len,
           got[1].msg_len, got[2].msg_len);
    show("recvmmsg nothing DONTWAIT", recvmmsg(sv[1], got, 2, MSG_DONTWAIT, NULL));
    out[1].msg_hdr.msg_iov = (struct iovec *)WILD;
    show("sendmmsg bad second", sendmmsg(sv[0], out, 3, 0));
    /* (A wild vector itself is not tried: musl reads each header in user space first.) */
    show("sendmmsg bad vector", syscall(SYS_sendmmsg, sv[0], WILD, 2, 0));
    show("recvmmsg one left", recvmmsg(sv[1], got, 4, MSG_DONTWAIT, NULL));
    struct timespec bad = {0, 2000000000};
    show("recvmmsg bad timeout", recvmmsg(sv[1], got, 1, 0, &bad));
    close(sv[0]);
    close(sv[1]);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 200;
    many_messages();
    big_transfers(mib);
    selects();
    messages();
    ioctls_and_direct_io();
    protections();
    paths();
    return 0;
}
