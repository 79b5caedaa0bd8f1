/* Dereferences an unmapped address and must die of SIGSEGV. With an argument FILE, it first
 * works until FILE exists (it may be moved meanwhile). */
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    static volatile unsigned long sink;
    if (argc > 1)
        while (access(argv[1], F_OK) != 0)
            for (unsigned long i = 0; i < 1000000; i++)
                sink += i;
    volatile int *p = (volatile int *)0;
    fputs("about to fault\n", stdout);
    fflush(stdout);
    *p = 42;
    puts("not reached");
    return 0;
}
