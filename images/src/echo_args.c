/* Prints argc, argv, the environment in order, and the auxv entries whose
 * values are stable from one run to the next (or only whether they are set). */
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>

extern char **environ;

#ifndef AT_EXECFN
#define AT_EXECFN 31
#endif

static void show(const char *name, unsigned long type)
{
    printf("%s=%lu\n", name, getauxval(type));
}

static void present(const char *name, unsigned long type)
{
    printf("%s set=%s\n", name, getauxval(type) ? "yes" : "no");
}

int main(int argc, char **argv)
{
    int i;
    char **e;
    const char *execfn;

    printf("argc=%d\n", argc);
    for (i = 0; i < argc; i++)
        printf("argv[%d]=[%s] len=%zu\n", i, argv[i], strlen(argv[i]));
    if (argv[argc] != NULL)
        printf("argv not NULL-terminated\n");
    for (i = 0, e = environ; *e; e++, i++)
        printf("env[%d]=[%s]\n", i, *e);
    printf("envc=%d\n", i);

    show("AT_PAGESZ", AT_PAGESZ);
    show("AT_CLKTCK", AT_CLKTCK);
    show("AT_UID", AT_UID);
    show("AT_EUID", AT_EUID);
    show("AT_GID", AT_GID);
    show("AT_EGID", AT_EGID);
    show("AT_SECURE", AT_SECURE);
    printf("AT_HWCAP=%#lx\n", getauxval(AT_HWCAP));
    present("AT_RANDOM", AT_RANDOM);
    present("AT_PHDR", AT_PHDR);
    present("AT_ENTRY", AT_ENTRY);
    present("AT_EXECFN", AT_EXECFN);
    execfn = (const char *)getauxval(AT_EXECFN);
    printf("AT_EXECFN string=[%s]\n", execfn ? execfn : "(null)");
    return 0;
}
