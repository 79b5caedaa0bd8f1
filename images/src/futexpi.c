/* Priority-inheritance futex operations and the robust list, in one thread (futex(2),
 * get_robust_list(2)); addresses are never printed. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* From <linux/futex.h> (musl's include path has no kernel headers). */
#define FUTEX_LOCK_PI 6
#define FUTEX_UNLOCK_PI 7
#define FUTEX_TRYLOCK_PI 8
#define FUTEX_PRIVATE_FLAG 128
#define FUTEX_OWNER_DIED 0x40000000

static long fx(uint32_t *w, int op) { return syscall(SYS_futex, w, op, 0, NULL, NULL, 0); }

static void show(const char *what, long r, uint32_t w, uint32_t tid) {
    const char *e = r == 0 ? "" : errno == EDEADLK ? "EDEADLK" : errno == EPERM ? "EPERM"
                  : errno == EAGAIN ? "EAGAIN" : errno == ESRCH ? "ESRCH" : "other";
    printf("%-28s %ld %-8s word=%s%s\n", what, r, e, (w & 0x3fffffff) == tid ? "tid" : w ? "?" : "0",
           w & FUTEX_OWNER_DIED ? "|OWNER_DIED" : "");
}

int main(void) {
    uint32_t tid = (uint32_t)syscall(SYS_gettid), w = 0;
    show("LOCK_PI free", fx(&w, FUTEX_LOCK_PI), w, tid);
    show("LOCK_PI own", fx(&w, FUTEX_LOCK_PI), w, tid);
    show("TRYLOCK_PI own", fx(&w, FUTEX_TRYLOCK_PI), w, tid);
    show("UNLOCK_PI own", fx(&w, FUTEX_UNLOCK_PI), w, tid);
    show("UNLOCK_PI free", fx(&w, FUTEX_UNLOCK_PI), w, tid);
    show("TRYLOCK_PI free", fx(&w, FUTEX_TRYLOCK_PI), w, tid);
    show("UNLOCK_PI private", fx(&w, FUTEX_UNLOCK_PI | FUTEX_PRIVATE_FLAG), w, tid);
    w = FUTEX_OWNER_DIED;
    show("LOCK_PI owner died", fx(&w, FUTEX_LOCK_PI), w, tid);
    fx(&w, FUTEX_UNLOCK_PI);

    /* A PI mutex and a robust mutex through the C library. */
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setprotocol(&a, PTHREAD_PRIO_INHERIT);
    pthread_mutex_t m;
    pthread_mutex_init(&m, &a);
    int l1 = pthread_mutex_lock(&m);
    int t1 = pthread_mutex_trylock(&m);
    int u1 = pthread_mutex_unlock(&m);
    printf("pi lock %d trylock %d unlock %d\n", l1, t1, u1);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_t r;
    pthread_mutex_init(&r, &a);
    int l2 = pthread_mutex_lock(&r);
    int u2 = pthread_mutex_unlock(&r);
    printf("robust pi lock %d unlock %d\n", l2, u2);

    void *head = NULL;
    size_t len = 0;
    long g = syscall(SYS_get_robust_list, 0, &head, &len);
    printf("get_robust_list: %ld, head %s, len %zu\n", g, head ? "set" : "none", len);
    return 0;
}
