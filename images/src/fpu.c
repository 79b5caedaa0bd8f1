/* Exercises the SSE/AVX paths that glibc and musl choose at start: large
 * memcpy/memset/memcmp/strlen/strchr, double and float math through libm,
 * and printf of doubles. Prints the results. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BIG (8 * 1024 * 1024)

static uint64_t hash(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ULL;
    size_t i;
    for (i = 0; i < n; i++)
        h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

int main(void)
{
    unsigned char *a = malloc(BIG + 64), *b = malloc(BIG + 64);
    char *s = malloc(BIG + 1);
    size_t i, off;
    double x = 0.0, acc = 0.0, v[1024];
    float f = 1.0f;
    volatile double vol = 2.0;

    if (!a || !b || !s) {
        fprintf(stderr, "fpu: out of memory\n");
        return 1;
    }
    for (i = 0; i < BIG + 64; i++)
        a[i] = (unsigned char)(i * 2654435761u >> 13);
    for (off = 0; off < 8; off++) {
        memcpy(b + off, a + 7 - off, BIG - 64 * off);
        printf("memcpy off %zu hash %016llx memcmp %d\n", off,
               (unsigned long long)hash(b + off, BIG - 64 * off),
               memcmp(b + off, a + 7 - off, BIG - 64 * off) == 0);
    }
    memmove(b + 1, b, BIG);
    printf("memmove hash %016llx\n", (unsigned long long)hash(b, BIG + 1));
    memset(s, 'x', BIG);
    s[BIG] = 0;
    s[BIG / 2 + 3] = 'y';
    printf("strlen %zu\n", strlen(s));
    printf("strchr y at %td\n", strchr(s, 'y') - s);
    printf("strrchr x at %td\n", strrchr(s, 'x') - s);
    printf("memchr y at %td\n", (char *)memchr(s, 'y', BIG) - s);
    s[1000] = 0;
    printf("strlen short %zu strcmp %d\n", strlen(s), strcmp(s, s + 1) == 0);

    for (i = 0; i < 1024; i++)
        v[i] = sin((double)i * 0.01) * exp(-(double)i / 512.0) + sqrt((double)i);
    for (i = 0; i < 1024; i++)
        acc += v[i] * v[1023 - i];
    printf("dot %.15e\n", acc);
    for (i = 1; i <= 100000; i++) {
        x += 1.0 / ((double)i * (double)i);
        f = f * 1.0001f + 0.5f / (float)i;
    }
    printf("basel %.17g pi %.17g\n", x, sqrt(6.0 * x));
    printf("float %.9g\n", (double)f);
    printf("log %.17g pow %.17g atan2 %.17g\n", log(vol * 10.5), pow(vol, 0.37), atan2(vol, 3.0));
    printf("fmod %.17g floor %g ceil %g round %g trunc %g\n", fmod(10.75, vol), floor(-2.5),
           ceil(-2.5), round(-2.5), trunc(-2.5));
    printf("formats %f %e %g %a %10.3f|%-10.2e|\n", M_PI, M_E, 1e-300 * vol, 1.0 / vol, -M_PI,
           6.02214076e23);
    printf("special %f %f %f\n", 1.0 / (vol - 2.0), -1.0 / (vol - 2.0), sqrt(-vol));
    printf("strtod %.17g atof %.17g\n", strtod("3.141592653589793238", NULL), atof("1e-5"));
    printf("long double %.20Lg\n", (long double)1 / 3 * vol);
    free(a);
    free(b);
    free(s);
    return 0;
}
