/* Reads the clocks, sleeps a few tens of milliseconds in several ways, and
 * prints only verdicts that do not depend on the time of day or the load. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int64_t ns(const struct timespec *t)
{
    return (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec;
}

static int64_t now(clockid_t c)
{
    struct timespec t;
    if (clock_gettime(c, &t) != 0) {
        perror("clock_gettime");
        return -1;
    }
    return ns(&t);
}

static void verdict(const char *what, int ok)
{
    printf("%s %s\n", what, ok ? "ok" : "FAILED");
}

int main(void)
{
    int i, monotonic = 1, slept = 1;
    int64_t prev, m0, m1, r0, r1;
    struct timeval tv;
    struct timespec req = {0, 30 * 1000000L};
    time_t t0, t1;

    prev = now(CLOCK_MONOTONIC);
    for (i = 0; i < 10000; i++) {
        int64_t cur = now(CLOCK_MONOTONIC);
        if (cur < prev)
            monotonic = 0;
        prev = cur;
    }
    monotonic &= prev > 0;

    r0 = now(CLOCK_REALTIME);
    /* After 2017-01-01 and before 2100-01-01. */
    verdict("realtime plausible",
            r0 > 1483228800LL * 1000000000LL && r0 < 4102444800LL * 1000000000LL);
    if (gettimeofday(&tv, NULL) != 0)
        perror("gettimeofday");
    t0 = time(NULL);
    verdict("gettimeofday agrees",
            tv.tv_sec >= r0 / 1000000000LL - 1 && tv.tv_sec <= r0 / 1000000000LL + 5);
    /* time() may read a coarse clock that lags by a tick, across a second boundary. */
    verdict("time agrees", t0 >= tv.tv_sec - 1 && t0 <= tv.tv_sec + 5);
    verdict("coarse clocks", now(CLOCK_MONOTONIC_COARSE) > 0 && now(CLOCK_REALTIME_COARSE) > 0);
    verdict("cputime clock", now(CLOCK_PROCESS_CPUTIME_ID) >= 0);

    m0 = now(CLOCK_MONOTONIC);
    if (nanosleep(&req, NULL) != 0)
        perror("nanosleep");
    m1 = now(CLOCK_MONOTONIC);
    slept &= m1 - m0 >= 30 * 1000000LL;
    monotonic &= m1 >= m0;

    m0 = now(CLOCK_MONOTONIC);
    usleep(20000);
    m1 = now(CLOCK_MONOTONIC);
    slept &= m1 - m0 >= 20 * 1000000LL;
    monotonic &= m1 >= m0;

    m0 = now(CLOCK_MONOTONIC);
    req.tv_nsec = 25 * 1000000L;
    if (clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL) != 0)
        perror("clock_nanosleep");
    m1 = now(CLOCK_MONOTONIC);
    slept &= m1 - m0 >= 25 * 1000000LL;
    monotonic &= m1 >= m0;

    r1 = now(CLOCK_REALTIME);
    t1 = time(NULL);
    /* Wall-clock time may be stepped; allow a generous window either way. */
    verdict("realtime advanced", r1 > r0 - 60 * 1000000000LL);
    verdict("time advanced", t1 + 60 >= t0);
    verdict("sleep", slept);
    verdict("monotonic", monotonic);
    return 0;
}
