/* A multi-threaded long-running guest for migration tests, with deterministic output: four
 * workers dirty their quarter of a buffer each round under a mutex and condition variable the
 * main thread drives; it prints each round and appends to mtticker.out. Meanwhile one thread
 * sleeps in short naps, another is blocked reading a pipe until the end, and a last one reads
 * standard input until its end (it may still be blocked there when the process exits), so a
 * move finds threads in futex waits, sleeps and home calls.
 * Usage: mtticker [ROUNDS [WORK [MIB]]]  (defaults 40 rounds, 1000000 work units, 16 MiB). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 4

static uint64_t *buf;
static size_t words;
static long work;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go = PTHREAD_COND_INITIALIZER, done_cv = PTHREAD_COND_INITIALIZER;
static long round_no = -1, finished, rounds;
static uint64_t part[WORKERS];
static volatile int stop;
static int pipefd[2];
static __thread uint64_t steps;

static void *worker(void *arg) {
    long id = (long)arg;
    size_t lo = words / WORKERS * id, n = words / WORKERS;
    uint64_t x = 1 + id;
    for (long r = 0; r < rounds; r++) {
        pthread_mutex_lock(&mu);
        while (round_no < r)
            pthread_cond_wait(&go, &mu);
        pthread_mutex_unlock(&mu);
        for (long w = 0; w < work; w++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            buf[lo + (x >> 17) % n] ^= x;
            steps++;
        }
        uint64_t sum = 0;
        for (size_t i = lo; i < lo + n; i += 512)
            sum += buf[i];
        pthread_mutex_lock(&mu);
        part[id] = sum ^ x;
        finished++;
        pthread_cond_signal(&done_cv);
        pthread_mutex_unlock(&mu);
    }
    return (void *)(uintptr_t)steps;
}

static void *napper(void *arg) {
    (void)arg;
    struct timespec t = {0, 5000000};
    while (!stop)
        nanosleep(&t, 0);
    return 0;
}

static void *reader(void *arg) {
    (void)arg;
    char msg[64] = {0};
    ssize_t n = read(pipefd[0], msg, sizeof msg - 1);
    printf("reader got %zd bytes: %s\n", n, msg);
    return 0;
}

static void *drain(void *arg) {
    (void)arg;
    char b[256];
    while (read(0, b, sizeof b) > 0)
        ;
    return 0;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 40;
    work = argc > 2 ? atol(argv[2]) : 1000000;
    long mib = argc > 3 ? atol(argv[3]) : 16;
    size_t size = (size_t)mib << 20;
    buf = malloc(size);
    if (!buf || pipe(pipefd) != 0) {
        perror("setup");
        return 1;
    }
    words = size / sizeof(uint64_t);
    for (size_t i = 0; i < words; i++)
        buf[i] = i * 0x9e3779b97f4a7c15ull;
    FILE *f = fopen("mtticker.out", "w");
    if (!f) {
        perror("mtticker.out");
        return 1;
    }
    pthread_t w[WORKERS], nap, rd, in;
    pthread_create(&in, 0, drain, 0);
    for (long i = 0; i < WORKERS; i++)
        pthread_create(&w[i], 0, worker, (void *)i);
    pthread_create(&nap, 0, napper, 0);
    pthread_create(&rd, 0, reader, 0);
    for (long r = 0; r < rounds; r++) {
        pthread_mutex_lock(&mu);
        finished = 0;
        round_no = r;
        pthread_cond_broadcast(&go);
        while (finished < WORKERS)
            pthread_cond_wait(&done_cv, &mu);
        uint64_t all = 0;
        for (int i = 0; i < WORKERS; i++)
            all = all * 31 + part[i];
        pthread_mutex_unlock(&mu);
        printf("round %ld %016llx\n", r, (unsigned long long)all);
        fflush(stdout);
        fprintf(f, "round %ld %llu\n", r, (unsigned long long)(all % 1000003));
        fflush(f);
    }
    for (int i = 0; i < WORKERS; i++) {
        void *steps;
        pthread_join(w[i], &steps);
        printf("worker %d made %lu steps\n", i, (unsigned long)(uintptr_t)steps);
    }
    stop = 1;
    pthread_join(nap, 0);
    if (write(pipefd[1], "the end", 7) != 7)
        return 1;
    pthread_join(rd, 0);
    fclose(f);
    uint64_t total = 0;
    for (size_t i = 0; i < words; i++)
        total += buf[i];
    printf("total %016llx\n", (unsigned long long)total);
    return 0;
}
