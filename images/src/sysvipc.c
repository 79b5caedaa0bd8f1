/* SysV shared memory, semaphores and message queues, and POSIX named semaphores, as Linux
 * gives them: two attachments of one segment see each other's stores, IPC_STAT counts
 * attachments, semop/semtimedop/semctl (SETVAL, SETALL/GETALL, IPC_STAT), typed messages
 * with E2BIG, MSG_NOERROR and ENOMSG, and errno for what Linux refuses. IPC ids differ from
 * run to run and are never printed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <stdio.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <time.h>
#include <unistd.h>

union semun { int val; struct semid_ds *buf; unsigned short *array; };

static const char *en(int e) {
    switch (e) {
    case 0: return "ok"; case EINVAL: return "EINVAL"; case EAGAIN: return "EAGAIN";
    case ENOMSG: return "ENOMSG"; case E2BIG: return "E2BIG"; case EIDRM: return "EIDRM";
    case EFAULT: return "EFAULT"; case EACCES: return "EACCES"; case ENOENT: return "ENOENT";
    case EEXIST: return "EEXIST"; case ERANGE: return "ERANGE";
    default: return "other";
    }
}

#define SHOW(what, expr) do { errno = 0; long r_ = (long)(expr); \
    printf("%-36s %ld %s\n", what, r_ < 0 ? -1L : r_, r_ < 0 ? en(errno) : ""); } while (0)

int main(void) {
    /* Shared memory. */
    int shm = shmget(IPC_PRIVATE, 10000, IPC_CREAT | 0600);
    char *a = shmat(shm, NULL, 0);
    char *b = shmat(shm, NULL, SHM_RDONLY);
    if (a == (void *)-1 || b == (void *)-1) { printf("shmat failed: %s\n", en(errno)); return 1; }
    strcpy(a + 9000, "shared!");
    printf("second attachment reads: %s, first byte %d\n", b + 9000, b[0]);
    struct shmid_ds ds;
    shmctl(shm, IPC_STAT, &ds);
    printf("segsz %zu nattch %lu\n", ds.shm_segsz, (unsigned long)ds.shm_nattch);
    SHOW("shmdt second", shmdt(b));
    SHOW("shmdt not an attachment", shmdt(a + 4096));
    shmctl(shm, IPC_STAT, &ds);
    printf("nattch after shmdt %lu\n", (unsigned long)ds.shm_nattch);
    SHOW("shmat unaligned", (long)shmat(shm, (void *)(a + 1), 0));
    char *c = shmat(shm, (void *)((unsigned long)(a + 1)), SHM_RND);
    printf("SHM_RND over a mapping: %s\n", c == (void *)-1 ? en(errno) : "attached");
    SHOW("shmat bad id", (long)shmat(-5, NULL, 0));
    SHOW("shmctl RMID", shmctl(shm, IPC_RMID, NULL));
    printf("still mapped after RMID: %s\n", a + 9000);
    SHOW("shmdt first", shmdt(a));
    SHOW("shmctl unknown cmd", shmctl(shm, 999, &ds));

    /* Semaphores. */
    int sem = semget(IPC_PRIVATE, 3, IPC_CREAT | 0600);
    union semun u;
    u.val = 2;
    SHOW("SETVAL 2", semctl(sem, 0, SETVAL, u));
    struct sembuf down = {0, -1, 0}, nowait = {0, -1, IPC_NOWAIT};
    SHOW("semop down", semop(sem, &down, 1));
    SHOW("semop down", semop(sem, &down, 1));
    SHOW("semop down IPC_NOWAIT", semop(sem, &nowait, 1));
    struct timespec ts = {0, 20000000};
    SHOW("semtimedop 20 ms", semtimedop(sem, &down, 1, &ts));
    SHOW("GETVAL", semctl(sem, 0, GETVAL));
    unsigned short vals[3] = {7, 8, 9}, back[3] = {0};
    u.array = vals;
    SHOW("SETALL", semctl(sem, 0, SETALL, u));
    u.array = back;
    SHOW("GETALL", semctl(sem, 0, GETALL, u));
    printf("values %u %u %u\n", back[0], back[1], back[2]);
    struct sembuf two[2] = {{1, -8, 0}, {2, 1, 0}};
    SHOW("semop two at once", semop(sem, two, 2));
    SHOW("GETVAL 1", semctl(sem, 1, GETVAL));
    SHOW("GETVAL 2", semctl(sem, 2, GETVAL));
    struct semid_ds sds;
    u.buf = &sds;
    SHOW("IPC_STAT", semctl(sem, 0, IPC_STAT, u));
    printf("nsems %lu\n", (unsigned long)sds.sem_nsems);
    u.val = 40000;
    SHOW("SETVAL too large", semctl(sem, 0, SETVAL, u));
    SHOW("semop no such sem", semop(sem, &(struct sembuf){5, 1, 0}, 1));
    SHOW("RMID", semctl(sem, 0, IPC_RMID));
    SHOW("semop after RMID", semop(sem, &down, 1));

    /* Message queues. */
    int q = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    struct { long type; char text[64]; } m = {2, "second type"}, r;
    SHOW("msgsnd type 2", msgsnd(q, &m, strlen(m.text) + 1, 0));
    m.type = 1;
    strcpy(m.text, "first type, longer text");
    SHOW("msgsnd type 1", msgsnd(q, &m, strlen(m.text) + 1, 0));
    struct msqid_ds qs;
    msgctl(q, IPC_STAT, &qs);
    printf("qnum %lu\n", (unsigned long)qs.msg_qnum);
    memset(&r, 'x', sizeof r);
    SHOW("msgrcv type 2", msgrcv(q, &r, sizeof r.text, 2, 0));
    printf("got type %ld text %s, byte after %c\n", r.type, r.text, r.text[20]);
    SHOW("msgrcv too small", msgrcv(q, &r, 5, 0, 0));
    memset(&r, 'x', sizeof r);
    SHOW("msgrcv MSG_NOERROR", msgrcv(q, &r, 5, 0, MSG_NOERROR));
    printf("truncated: %.5s then %c\n", r.text, r.text[5]);
    SHOW("msgrcv empty IPC_NOWAIT", msgrcv(q, &r, sizeof r.text, 0, IPC_NOWAIT));
    SHOW("msgsnd negative type", msgsnd(q, &(struct { long t; char c; }){-1, 0}, 1, 0));
    SHOW("msgctl RMID", msgctl(q, IPC_RMID, NULL));
    SHOW("msgsnd after RMID", msgsnd(q, &m, 4, 0));

    /* POSIX named semaphores (over /dev/shm). */
    char name[64];
    snprintf(name, sizeof name, "/mosvm-test-%d", getpid());
    sem_t *ps = sem_open(name, O_CREAT | O_EXCL, 0600, 1);
    if (ps == SEM_FAILED) { printf("sem_open: %s\n", en(errno)); return 0; }
    int v = -1;
    sem_getvalue(ps, &v);
    printf("sem value %d\n", v);
    SHOW("sem_wait", sem_wait(ps));
    SHOW("sem_trywait", sem_trywait(ps));
    SHOW("sem_post", sem_post(ps));
    SHOW("sem_post", sem_post(ps));
    sem_getvalue(ps, &v);
    printf("sem value %d\n", v);
    sem_t *again = sem_open(name, 0);
    sem_getvalue(again, &v);
    printf("second open sees %d\n", v);
    SHOW("sem_open O_EXCL again", sem_open(name, O_CREAT | O_EXCL, 0600, 1) == SEM_FAILED ? -1 : 0);
    SHOW("sem_unlink", sem_unlink(name));
    SHOW("sem_unlink again", sem_unlink(name));
    return 0;
}
