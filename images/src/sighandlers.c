// Signal handlers as Linux runs them: siginfo, masks, nesting, SA_RESETHAND/SA_NODEFER,
// sigaltstack, faults caught and recovered from with siglongjmp, a handler that edits the
// interrupted context, FPU state kept across a handler, alarm/setitimer with pause and
// sigsuspend, SA_RESTART against EINTR on a blocking pipe read, sigtimedwait, sigqueue, SIGPIPE.
#define _GNU_SOURCE
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

static volatile sig_atomic_t hits, depth, maxdepth;
static volatile int last_code, last_pid_self, mask_had_self, mask_had_extra;
static volatile long last_value;
static sigjmp_buf jb;
static volatile void *fault_addr;
static volatile int fault_code;
static char *alt_lo, *alt_hi;
static volatile int on_alt, alt_query;

static void on_info(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    hits++;
    depth++;
    if (depth > maxdepth) maxdepth = depth;
    last_code = si->si_code;
    last_pid_self = si->si_pid == getpid();
    last_value = si->si_value.sival_int;
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    mask_had_self = sigismember(&cur, sig);
    mask_had_extra = sigismember(&cur, SIGWINCH);
    if (sig == SIGUSR1 && depth == 1) raise(SIGUSR2);  // nests when SIGUSR2 is unblocked
    depth--;
}

static void on_plain(int sig) {
    (void)sig;
    hits++;
}

static void on_alt_handler(int sig) {
    (void)sig;
    char here;
    on_alt = &here >= alt_lo && &here < alt_hi;
    stack_t q;
    sigaltstack(NULL, &q);
    alt_query = q.ss_flags;
}

static void on_fault(int sig, siginfo_t *si, void *uc) {
    (void)sig;
    (void)uc;
    fault_addr = si->si_addr;
    fault_code = si->si_code;
    siglongjmp(jb, 1);
}

static void skip_ud2(int sig, siginfo_t *si, void *v) {
    (void)sig;
    (void)si;
    ucontext_t *uc = v;
    uc->uc_mcontext.gregs[REG_RIP] += 2;  // past the ud2
    hits++;
}

static void clobber_fpu(int sig) {
    (void)sig;
    volatile double x = 1e300;
    for (int i = 0; i < 10; i++) x = x * 3.7 + 1.0 / (i + 1);
    __asm__ volatile("pxor %%xmm0, %%xmm0; pxor %%xmm1, %%xmm1; pxor %%xmm7, %%xmm7" ::: "xmm0", "xmm1", "xmm7");
    hits++;
}

static int pipe_w = -1;
static void write_pipe(int sig) {
    (void)sig;
    hits++;
    if (write(pipe_w, "x", 1) != 1) _exit(9);
}

static void set(int sig, void *h, int flags, int extra) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    if (flags & SA_SIGINFO)
        sa.sa_sigaction = h;
    else
        sa.sa_handler = h;
    sa.sa_flags = flags;
    sigemptyset(&sa.sa_mask);
    if (extra) sigaddset(&sa.sa_mask, extra);
    if (sigaction(sig, &sa, NULL) != 0) {
        perror("sigaction");
        exit(2);
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);

    // 1. siginfo of raise (tgkill: SI_TKILL), mask inside the handler, nesting.
    set(SIGUSR1, on_info, SA_SIGINFO, SIGWINCH);
    set(SIGUSR2, on_info, SA_SIGINFO, 0);
    raise(SIGUSR1);
    printf("raise: hits %d depth %d code %d self %d mask self %d extra %d\n", hits, maxdepth,
           last_code, last_pid_self, mask_had_self, mask_had_extra);

    // 2. Blocked signals stay pending; unblocking delivers them.
    sigset_t s, old;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    sigprocmask(SIG_BLOCK, &s, &old);
    hits = 0;
    kill(getpid(), SIGUSR2);
    sigset_t pend;
    sigpending(&pend);
    printf("blocked: hits %d pending %d\n", hits, sigismember(&pend, SIGUSR2));
    sigprocmask(SIG_SETMASK, &old, NULL);
    printf("unblocked: hits %d code %d\n", hits, last_code);

    // 3. SA_RESETHAND: the handler runs once, then the action is SIG_DFL.
    hits = 0;
    set(SIGURG, on_plain, SA_RESETHAND, 0);
    raise(SIGURG);
    raise(SIGURG);
    struct sigaction now;
    sigaction(SIGURG, NULL, &now);
    printf("resethand: hits %d dfl %d\n", hits, now.sa_handler == SIG_DFL);

    // 4. sigaltstack with SA_ONSTACK.
    stack_t ss = {.ss_size = 65536, .ss_flags = 0};
    ss.ss_sp = malloc(ss.ss_size);
    alt_lo = ss.ss_sp;
    alt_hi = alt_lo + ss.ss_size;
    sigaltstack(&ss, NULL);
    set(SIGWINCH, on_alt_handler, SA_ONSTACK, 0);
    raise(SIGWINCH);
    stack_t q;
    sigaltstack(NULL, &q);
    printf("altstack: on %d query-in-handler %d after %d size %zu\n", on_alt, alt_query,
           q.ss_flags, q.ss_size);

    // 5. Faults caught and left with siglongjmp.
    set(SIGSEGV, on_fault, SA_SIGINFO | SA_NODEFER, 0);
    set(SIGFPE, on_fault, SA_SIGINFO | SA_NODEFER, 0);
    set(SIGBUS, on_fault, SA_SIGINFO | SA_NODEFER, 0);
    char *ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 3; i++) {
        if (sigsetjmp(jb, 1) == 0) {
            *(volatile char *)(ro + 8 * i) = 1;
            printf("no fault?\n");
        } else {
            printf("segv %d: at page+%ld code %d\n", i, (long)((char *)fault_addr - ro), fault_code);
        }
    }
    if (sigsetjmp(jb, 1) == 0) {
        *(volatile int *)16 = 1;
    } else {
        printf("segv null: addr %p code %d\n", fault_addr, fault_code);
    }
    volatile int zero = 0;
    if (sigsetjmp(jb, 1) == 0) {
        volatile int r = 7 / zero;
        (void)r;
    } else {
        printf("fpe: code %d\n", fault_code);
    }
    munmap(ro, 4096);
    if (sigsetjmp(jb, 1) == 0) {
        *(volatile char *)ro = 1;
    } else {
        printf("segv unmapped: at page+%ld code %d\n", (long)((char *)fault_addr - ro), fault_code);
    }

    // 6. A handler that moves the interrupted rip past an invalid instruction.
    hits = 0;
    set(SIGILL, skip_ud2, SA_SIGINFO, 0);
    __asm__ volatile("ud2");
    __asm__ volatile("ud2");
    printf("ud2 skipped: %d\n", hits);

    // 7. FPU and SSE state survive a handler that clobbers them; setitimer interrupts.
    hits = 0;
    set(SIGALRM, clobber_fpu, SA_RESTART, 0);
    struct itimerval it = {{0, 2000}, {0, 2000}};
    setitimer(ITIMER_REAL, &it, NULL);
    double acc = 0;
    for (long i = 1; i < 40000000 && hits < 20; i++) acc += 1.0 / (double)i;
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    double check = 0;
    // Recompute natively-identically: the same sum up to where the loop stopped is not
    // known, so check a property instead: acc is a harmonic partial sum (finite, > 1).
    check = acc > 1.0 && acc < 30.0;
    printf("fpu: ticks>=20 %d sum sane %d\n", hits >= 20, (int)check);

    // 8. alarm + pause; setitimer + sigsuspend.
    hits = 0;
    set(SIGALRM, on_plain, 0, 0);
    alarm(1);
    int r = pause();
    printf("pause: %d errno %s hits %d\n", r, errno == EINTR ? "EINTR" : "?", hits);
    sigset_t blk, wait_mask;
    sigemptyset(&blk);
    sigaddset(&blk, SIGALRM);
    sigprocmask(SIG_BLOCK, &blk, &old);
    struct itimerval tick = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_REAL, &tick, NULL);
    hits = 0;
    sigemptyset(&wait_mask);
    while (hits < 5) sigsuspend(&wait_mask);
    setitimer(ITIMER_REAL, &off, NULL);
    sigprocmask(SIG_BLOCK, NULL, &s);
    printf("sigsuspend: hits %d still blocked %d\n", hits, sigismember(&s, SIGALRM));
    sigprocmask(SIG_SETMASK, &old, NULL);
    struct itimerval g;
    getitimer(ITIMER_REAL, &g);
    printf("getitimer off: %ld %ld\n", (long)g.it_value.tv_sec, (long)g.it_value.tv_usec);

    // 9. A pipe read blocked when SIGALRM comes: restarted with SA_RESTART, EINTR without.
    int p[2];
    if (pipe(p) != 0) return 3;
    pipe_w = p[1];
    for (int restart = 1; restart >= 0; restart--) {
        set(SIGALRM, write_pipe, restart ? SA_RESTART : 0, 0);
        struct itimerval once = {{0, 0}, {0, 100000}};
        setitimer(ITIMER_REAL, &once, NULL);
        char c;
        errno = 0;
        ssize_t n = read(p[0], &c, 1);
        printf("read with%s SA_RESTART: %zd %s\n", restart ? "" : "out", n,
               n < 0 ? strerror(errno) : "data");
        if (n < 0 && read(p[0], &c, 1) != 1) return 4;
    }

    // 10. sigtimedwait and sigqueue.
    sigemptyset(&s);
    sigaddset(&s, SIGUSR1);
    sigprocmask(SIG_BLOCK, &s, &old);
    raise(SIGUSR1);
    siginfo_t si;
    struct timespec ts = {1, 0};
    int got = sigtimedwait(&s, &si, &ts);
    printf("sigtimedwait: %d code %d self %d\n", got, si.si_code, si.si_pid == getpid());
    ts.tv_sec = 0;
    ts.tv_nsec = 50000000;
    got = sigtimedwait(&s, &si, &ts);
    printf("sigtimedwait timeout: %d %s\n", got, errno == EAGAIN ? "EAGAIN" : strerror(errno));
    sigprocmask(SIG_SETMASK, &old, NULL);
    hits = 0;
    sigqueue(getpid(), SIGUSR2, (union sigval){.sival_int = 4242});
    printf("sigqueue: hits %d code %d value %ld\n", hits, last_code, last_value);

    // 11a. POSIX timers: a periodic SIGEV_SIGNAL timer taken with sigtimedwait, its
    // siginfo, gettime/getoverrun, delete; a timer with the default sigevent.
    {
        sigset_t rt;
        sigemptyset(&rt);
        sigaddset(&rt, SIGRTMIN + 1);
        sigaddset(&rt, SIGALRM);
        sigprocmask(SIG_BLOCK, &rt, &old);
        struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN + 1};
        ev.sigev_value.sival_int = 77;
        timer_t t;
        int cr = timer_create(CLOCK_MONOTONIC, &ev, &t);
        struct itimerspec its = {{0, 10000000}, {0, 10000000}};
        int st = timer_settime(t, 0, &its, NULL);
        int got_sigs = 0, code_ok = 1, value_ok = 1;
        for (int i = 0; i < 3; i++) {
            siginfo_t ti;
            struct timespec lim = {2, 0};
            if (sigtimedwait(&rt, &ti, &lim) == SIGRTMIN + 1) {
                got_sigs++;
                code_ok &= ti.si_code == SI_TIMER;
                value_ok &= ti.si_value.sival_int == 77;
            }
        }
        struct itimerspec cur;
        int gt = timer_gettime(t, &cur);
        printf("timer: create %d settime %d signals %d SI_TIMER %d value %d gettime %d interval %ld\n",
               cr, st, got_sigs, code_ok, value_ok, gt, cur.it_interval.tv_nsec);
        int ov = timer_getoverrun(t);
        int del = timer_delete(t);
        printf("timer: overrun >= 0 %d delete %d\n", ov >= 0, del);
        errno = 0;
        int after = timer_gettime(t, &cur);
        printf("timer: gettime after delete %d %s\n", after, strerror(errno));
        timer_t d;
        timer_create(CLOCK_REALTIME, NULL, &d);
        struct itimerspec once = {{0, 0}, {0, 20000000}};
        timer_settime(d, 0, &once, NULL);
        siginfo_t di;
        struct timespec lim = {2, 0};
        int dsig = sigtimedwait(&rt, &di, &lim);
        printf("default timer: %s code SI_TIMER %d\n", dsig == SIGALRM ? "SIGALRM" : "other",
               di.si_code == SI_TIMER);
        timer_delete(d);
        sigprocmask(SIG_SETMASK, &old, NULL);
    }

    // 11. SIGPIPE to a handler; the write fails with EPIPE.
    hits = 0;
    set(SIGPIPE, on_plain, 0, 0);
    close(p[0]);
    errno = 0;
    ssize_t w = write(p[1], "y", 1);
    printf("sigpipe: write %zd %s hits %d\n", w, strerror(errno), hits);

    // 11b. /proc/self/status shows this process's own signal state.
    {
        sigset_t b2, o2;
        sigemptyset(&b2);
        sigaddset(&b2, SIGWINCH);
        sigaddset(&b2, SIGUSR1);
        sigprocmask(SIG_BLOCK, &b2, &o2);
        signal(SIGUSR1, on_plain);
        raise(SIGWINCH);
        kill(getpid(), SIGUSR1);
        FILE *st = fopen("/proc/self/status", "r");
        char line[256];
        while (st && fgets(line, sizeof line, st))
            if ((!strncmp(line, "Sig", 3) && strncmp(line, "SigQ", 4)) || !strncmp(line, "ShdPnd", 6))
                fputs(line, stdout);
        if (st) fclose(st);
        sigprocmask(SIG_SETMASK, &o2, NULL);
    }

    // 12. Ignored signals are dropped even when sent while blocked and then ignored.
    set(SIGUSR1, SIG_IGN, 0, 0);
    raise(SIGUSR1);
    sigpending(&pend);
    printf("ignored pending %d\n", sigismember(&pend, SIGUSR1));
    return 0;
}
