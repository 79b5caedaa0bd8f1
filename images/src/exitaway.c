/* A worker ends the process (exit(42)) while the first thread waits in a read of standard
 * input (under the test, a home call that never returns; natively, after its end of input,
 * in pause()). Usage: exitaway [LINES] */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static long lines = 40;

static void *work(void *arg) {
    (void)arg;
    uint64_t x = 3;
    for (long l = 0; l < lines; l++) {
        for (long i = 0; i < 20000000; i++)
            x = x * 6364136223846793005ull + 1442695040888963407ull;
        printf("line %ld %016llx\n", l, (unsigned long long)x);
        fflush(stdout);
    }
    exit(42);
}

int main(int argc, char **argv) {
    if (argc > 1)
        lines = atol(argv[1]);
    pthread_t t;
    pthread_create(&t, 0, work, 0);
    char b[64];
    while (read(0, b, sizeof b) > 0)
        ;
    for (;;)
        pause();
}
