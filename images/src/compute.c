/* A pure CPU loop: an integer (xorshift) and a floating-point (logistic map)
 * recurrence for N iterations (argv[1], default sized for about a second). */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 550000000L;
    uint64_t x = 88172645463325252ULL, acc = 0;
    double r = 0.123456789, s = 0.0;
    long i;
    for (i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc += x >> 40;
        r = 3.9 * r * (1.0 - r);
        s += r;
    }
    printf("iterations %ld\n", n);
    printf("xorshift %" PRIu64 " sum %" PRIu64 "\n", x, acc);
    printf("logistic %.17g mean %.12f\n", r, n ? s / (double)n : 0.0);
    return 0;
}
