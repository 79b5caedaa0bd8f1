/* Prints one line and exits 0: the smallest program a loader must run. */
#include <stdio.h>

int main(void)
{
    puts("hello from a mosvm image");
    return 0;
}
