/* Reads all of stdin with read(2), alternating small and large chunks; echoes
 * each complete line uppercased with write(2) as soon as it is read (so a
 * caller can tell that the program is running), then prints a byte count, a
 * line count and a checksum. */
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char line[1 << 16];
static size_t line_len;

static void write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            perror("write");
            exit(2);
        }
        p += w;
        n -= (size_t)w;
    }
}

static void flush_line(void)
{
    write_all(line, line_len);
    line_len = 0;
}

int main(void)
{
    static char buf[1 << 17];
    static const size_t chunks[] = {1, 7, 64, 4096, sizeof(buf)};
    uint64_t bytes = 0, lines = 0, sum = 0;
    uint32_t adler_a = 1, adler_b = 0;
    unsigned k = 0;

    for (;;) {
        size_t want = chunks[k++ % (sizeof(chunks) / sizeof(chunks[0]))];
        ssize_t n = read(0, buf, want);
        ssize_t i;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("read");
            return 2;
        }
        if (n == 0)
            break;
        for (i = 0; i < n; i++) {
            unsigned char c = (unsigned char)buf[i];
            bytes++;
            sum = sum * 31 + c;
            adler_a = (adler_a + c) % 65521;
            adler_b = (adler_b + adler_a) % 65521;
            line[line_len++] = (char)toupper(c);
            if (c == '\n') {
                lines++;
                flush_line();
            } else if (line_len == sizeof(line)) {
                flush_line();
            }
        }
    }
    if (line_len > 0) {
        flush_line();
        write_all("\n", 1);
    }
    printf("bytes %llu lines %llu hash %016llx adler32 %08x\n",
           (unsigned long long)bytes, (unsigned long long)lines,
           (unsigned long long)sum, (unsigned)((adler_b << 16) | adler_a));
    return 0;
}
