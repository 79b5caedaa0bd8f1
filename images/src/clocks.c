/* The clocks a program reads through the vDSO (libc's clock_gettime, gettimeofday, time,
 * clock_getres, sched_getcpu) and through the system call itself, side by side. Prints only
 * verdicts and values that do not depend on the time of day or the load.
 *
 * Usage: clocks check        every clock id, both paths, edge cases
 *        clocks count N      N rounds of the calls every libc sends to the vDSO (for
 *                            counting VM exits; musl's clock_getres is a system call)
 *        clocks spin N       N calls of clock_gettime(CLOCK_MONOTONIC) (a benchmark);
 *        clocks sysspin N    the same as system calls
 *        clocks sleeps N MS  N nanosleep()s of MS ms each (glibc and musl make them relative
 *                            CLOCK_REALTIME sleeps), each measured on CLOCK_MONOTONIC
 *        clocks travel SECS  read the clocks in a tight loop for SECS seconds of
 *                            CLOCK_MONOTONIC, one line per second, checking they never
 *                            go back (while the process is moved around) */
#define _GNU_SOURCE
#include <errno.h>
#include <link.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int64_t ns(const struct timespec *t)
{
    return (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec;
}

/* Through libc (the vDSO where there is one). */
static int64_t lib(clockid_t c)
{
    struct timespec t;
    if (clock_gettime(c, &t) != 0)
        return -1;
    return ns(&t);
}

/* Through the system call. */
static int64_t sys(clockid_t c)
{
    struct timespec t;
    if (syscall(SYS_clock_gettime, c, &t) != 0)
        return -1;
    return ns(&t);
}

static void verdict(const char *what, int ok)
{
    printf("%s %s\n", what, ok ? "ok" : "FAILED");
}

static int vdso_objects;

static int count_vdso(struct dl_phdr_info *info, size_t size, void *data)
{
    if (info->dlpi_name && strcmp(info->dlpi_name, "linux-vdso.so.1") == 0)
        vdso_objects++;
    return 0;
}

/* Whether f() in a child dies of SIGSEGV (1), returns -1 with EFAULT (2), or else (0). */
static int bad_pointer(clockid_t c, int through_syscall)
{
    fflush(stdout);
    pid_t p = fork();
    if (p == 0) {
        long r = through_syscall ? syscall(SYS_clock_gettime, c, (void *)16)
                                 : clock_gettime(c, (struct timespec *)16);
        _exit(r == -1 && errno == EFAULT ? 2 : 0);
    }
    int st;
    waitpid(p, &st, 0);
    if (WIFSIGNALED(st))
        return WTERMSIG(st) == SIGSEGV ? 1 : 0;
    return WEXITSTATUS(st);
}

static int check(void)
{
    /* (Not 16, MAX_CLOCKS: some kernels' vDSOs answer clock_getres for it, the call does not.) */
    static const clockid_t ids[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 99, -1, -6, -14};
    FILE *maps;
    char line[512];
    int vdso = 0, vvar = 0;
    unsigned long vvar_at = 0;

    printf("AT_SYSINFO_EHDR %s\n", getauxval(AT_SYSINFO_EHDR) ? "set" : "unset");
    maps = fopen("/proc/self/maps", "r");
    while (maps && fgets(line, sizeof line, maps)) {
        if (strstr(line, "[vdso]"))
            vdso = strstr(line, " r-xp ") != NULL;
        if (strstr(line, "[vvar]") && !strstr(line, "vclock")) {
            vvar = 1;
            sscanf(line, "%lx", &vvar_at);
        }
    }
    if (maps)
        fclose(maps);
    printf("maps: [vdso] r-x %d, [vvar] %d\n", vdso, vvar);
    if (vvar_at) {
        /* The time page is no ordinary memory: fork advice on it is refused. */
        errno = 0;
        int a = madvise((void *)vvar_at, 4096, MADV_DONTFORK), ea = errno;
        errno = 0;
        int b = madvise((void *)vvar_at, 4096, MADV_DOFORK), eb = errno;
        printf("[vvar] MADV_DONTFORK %d errno %d, MADV_DOFORK %d errno %d\n", a, ea, b, eb);
    }
    dl_iterate_phdr(count_vdso, NULL);
    printf("dl_iterate_phdr linux-vdso.so.1: %d\n", vdso_objects);

    for (unsigned i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        clockid_t c = ids[i];
        struct timespec t, r = {7, 7}, r2 = {7, 7};
        errno = 0;
        int a = clock_gettime(c, &t), ea = errno;
        errno = 0;
        int b = syscall(SYS_clock_gettime, c, &t), eb = errno;
        errno = 0;
        int g = clock_getres(c, &r), eg = errno;
        errno = 0;
        int g2 = syscall(SYS_clock_getres, c, &r2), eg2 = errno;
        errno = 0;
        int n = clock_getres(c, NULL), en = errno;
        printf("clock %d: gettime %d/%d errno %d/%d, getres %d/%d errno %d/%d res %ld.%09ld/"
               "%ld.%09ld, getres(NULL) %d errno %d\n",
               c, a, b, ea, eb, g, g2, eg, eg2, (long)r.tv_sec, r.tv_nsec, (long)r2.tv_sec,
               r2.tv_nsec, n, en);
    }

    /* Both paths read one clock: libc, syscall, libc never go back. */
    static const clockid_t hres[] = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_MONOTONIC_RAW,
                                     CLOCK_BOOTTIME, CLOCK_TAI};
    for (unsigned i = 0; i < sizeof hres / sizeof hres[0]; i++) {
        int ok = 1;
        for (int k = 0; k < 2000; k++) {
            int64_t a = lib(hres[i]), b = sys(hres[i]), c = lib(hres[i]);
            ok &= a > 0 && a <= b && b <= c;
        }
        printf("clock %d: libc and syscall agree in order: %s\n", hres[i], ok ? "ok" : "FAILED");
    }
    /* A coarse clock is never ahead of its fine one. */
    {
        int ok = 1;
        for (int k = 0; k < 2000; k++) {
            ok &= lib(CLOCK_MONOTONIC_COARSE) <= lib(CLOCK_MONOTONIC);
            ok &= lib(CLOCK_REALTIME_COARSE) <= lib(CLOCK_REALTIME);
        }
        verdict("coarse clocks not ahead", ok);
    }
    {
        int64_t m = lib(CLOCK_MONOTONIC), bt = lib(CLOCK_BOOTTIME);
        verdict("boottime not behind monotonic", bt >= m);
        int64_t r = lib(CLOCK_REALTIME), tai = lib(CLOCK_TAI);
        printf("tai minus realtime: %lld s\n", (long long)((tai - r + 500000000LL) / 1000000000LL));
    }
    {
        struct timeval tv;
        struct timezone tz = {77, 77};
        int r = gettimeofday(&tv, &tz);
        int64_t rt = lib(CLOCK_REALTIME);
        time_t t = time(NULL), t2 = 0;
        time_t t3 = time(&t2);
        printf("gettimeofday %d tz %d %d\n", r, tz.tz_minuteswest, tz.tz_dsttime);
        verdict("gettimeofday near clock_gettime",
                llabs((int64_t)tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL - rt) < 1000000000LL);
        verdict("time near gettimeofday", t >= tv.tv_sec - 1 && t <= tv.tv_sec + 1);
        verdict("time stores what it returns", t2 == t3);
        struct timeval *volatile none = NULL;
        verdict("gettimeofday(NULL, NULL)", gettimeofday(none, NULL) == 0);
    }
    {
        unsigned cpu = 99, node = 99;
        int r = syscall(SYS_getcpu, &cpu, &node, NULL);
        int c = sched_getcpu();
        verdict("getcpu", r == 0 && cpu < 4096 && node < 1024 && c >= 0 && c < 4096);
    }
    {
        /* An absolute sleep has passed its deadline when it returns, by every path. */
        int ok = 1;
        for (int k = 0; k < 5; k++) {
            struct timespec d;
            clock_gettime(CLOCK_MONOTONIC, &d);
            d.tv_nsec += 3000000;
            if (d.tv_nsec >= 1000000000) {
                d.tv_sec++;
                d.tv_nsec -= 1000000000;
            }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &d, NULL);
            ok &= lib(CLOCK_MONOTONIC) >= ns(&d) && sys(CLOCK_MONOTONIC) >= ns(&d);
        }
        verdict("absolute sleep ends after its deadline", ok);
        int64_t m0 = lib(CLOCK_MONOTONIC), r0 = lib(CLOCK_REALTIME);
        usleep(20000);
        int64_t m1 = lib(CLOCK_MONOTONIC), r1 = lib(CLOCK_REALTIME);
        verdict("a 20 ms sleep takes 20 ms", m1 - m0 >= 20000000LL && m1 - m0 < 5000000000LL);
        verdict("wall clock advances with it", r1 - r0 >= 19000000LL && r1 - r0 < 5000000000LL);
    }
    printf("bad pointer, monotonic via libc: %d\n", bad_pointer(CLOCK_MONOTONIC, 0));
    printf("bad pointer, monotonic via syscall: %d\n", bad_pointer(CLOCK_MONOTONIC, 1));
    printf("bad pointer, cputime via libc: %d\n", bad_pointer(CLOCK_PROCESS_CPUTIME_ID, 0));
    return 0;
}

static int count(long n)
{
    struct timespec t;
    struct timeval tv;
    int64_t sum = 0;
    for (long i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        sum += t.tv_nsec & 1;
        clock_gettime(CLOCK_REALTIME, &t);
        clock_gettime(CLOCK_BOOTTIME, &t);
        gettimeofday(&tv, NULL);
        sum += time(NULL) & 1;
        sum += sched_getcpu() & 1;
    }
    printf("done %ld rounds %s\n", n, sum >= 0 ? "ok" : "");
    return 0;
}

static int travel(long secs)
{
    int64_t start = lib(CLOCK_MONOTONIC), prev = start, prev_sys = start;
    int64_t r0 = lib(CLOCK_REALTIME);
    long tick = 0, reads = 0;
    int mono_ok = 1, wall_ok = 1;
    while (tick < secs) {
        int64_t m = lib(CLOCK_MONOTONIC);
        reads++;
        mono_ok &= m >= prev;
        prev = m;
        if ((reads & 4095) == 0) {
            int64_t s = sys(CLOCK_MONOTONIC);
            mono_ok &= s >= prev_sys && s >= m;
            prev_sys = s;
            int64_t m2 = lib(CLOCK_MONOTONIC);
            mono_ok &= m2 >= s;
            prev = m2;
            /* The wall clock moves with the monotonic one (it is home's wherever the
             * process runs; moves pause both). */
            int64_t r = lib(CLOCK_REALTIME);
            wall_ok &= llabs((r - r0) - (m2 - start)) < 2000000000LL;
        }
        if (m - start >= (tick + 1) * 1000000000LL) {
            tick++;
            printf("tick %ld\n", tick);
            fflush(stdout);
        }
    }
    verdict("monotonic never went back", mono_ok);
    verdict("wall clock kept pace", wall_ok);
    verdict("many reads", reads > secs * 1000);
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "check";
    long n = argc > 2 ? atol(argv[2]) : 3;
    if (strcmp(mode, "count") == 0)
        return count(n);
    if (strcmp(mode, "spin") == 0 || strcmp(mode, "sysspin") == 0) {
        int64_t sum = 0;
        for (long i = 0; i < n; i++)
            sum += mode[0] == 's' && mode[1] == 'y' ? sys(CLOCK_MONOTONIC) & 1 : lib(CLOCK_MONOTONIC) & 1;
        return sum < 0;
    }
    if (strcmp(mode, "sleeps") == 0) {
        long ms = argc > 3 ? atol(argv[3]) : 20;
        int early = 0;
        for (long i = 0; i < n; i++) {
            struct timespec req = {ms / 1000, (ms % 1000) * 1000000L};
            int64_t t0 = lib(CLOCK_MONOTONIC);
            nanosleep(&req, NULL);
            int64_t d = lib(CLOCK_MONOTONIC) - t0;
            if (d < ms * 1000000LL) {
                early++;
                fprintf(stderr, "sleep %ld ended %lld ns early\n", i, (long long)(ms * 1000000LL - d));
            }
        }
        printf("%ld sleeps of %ld ms, none ended early: %s\n", n, ms, early ? "FAILED" : "ok");
        return 0;
    }
    if (strcmp(mode, "travel") == 0)
        return travel(n);
    return check();
}
