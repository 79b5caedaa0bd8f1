/* Dereferences an unmapped address and must die of SIGSEGV. */
#include <stdio.h>

int main(void)
{
    volatile int *p = (volatile int *)0;
    fputs("about to fault\n", stdout);
    fflush(stdout);
    *p = 42;
    puts("not reached");
    return 0;
}
