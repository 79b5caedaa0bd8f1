/*
 * The guest's vDSO: clock_gettime, gettimeofday, time, clock_getres and getcpu answered in
 * guest ring 3 from the time page (the "vvar" page) the VMM keeps current, so these calls
 * make no VM exit. Linux's own vDSO does the same from its vdso_data (see vdso(7)).
 *
 * The time page lies one page below this image (the symbol mosvm_vvar, set by vdso.lds). Its
 * layout is guest/src/lib.rs's `vvar` module; the VMM writes it under a sequence count (odd
 * while a write is under way), as Linux's seqcount. A page whose VVAR_VALID flag is clear
 * (before the VMM first writes it, or zeroed by the guest) sends every call to the system
 * call, as do clocks the page does not describe (CPU-time clocks, unknown ids).
 */

typedef unsigned long u64;
typedef long s64;
typedef unsigned int u32;

struct vvar {
	u32 seq;
	u32 flags;
	u64 tsc_base;      /* guest TSC at the base */
	u64 mono_ns;       /* guest CLOCK_MONOTONIC at tsc_base, ns */
	u64 mono_mult;     /* ns per TSC tick, 32.32 fixed point */
	u64 raw_ns;        /* guest CLOCK_MONOTONIC_RAW at tsc_base, ns */
	u64 raw_mult;
	s64 realtime_off;  /* CLOCK_REALTIME - CLOCK_MONOTONIC, ns */
	s64 boottime_off;  /* CLOCK_BOOTTIME - CLOCK_MONOTONIC, ns */
	s64 tai_off;       /* CLOCK_TAI - CLOCK_REALTIME, ns */
	u64 coarse_res_ns; /* resolution of the _COARSE clocks */
	u32 cpu;
	u32 node;
};

#define VVAR_VALID 1u

extern const volatile struct vvar mosvm_vvar __attribute__((visibility("hidden")));

struct timespec_k { s64 tv_sec; s64 tv_nsec; };
struct timeval_k { s64 tv_sec; s64 tv_usec; };
struct timezone_k { int tz_minuteswest; int tz_dsttime; };

#define NR_gettimeofday 96
#define NR_time 201
#define NR_clock_gettime 228
#define NR_clock_getres 229
#define NR_getcpu 309

#define CLOCK_REALTIME 0
#define CLOCK_MONOTONIC 1
#define CLOCK_MONOTONIC_RAW 4
#define CLOCK_REALTIME_COARSE 5
#define CLOCK_MONOTONIC_COARSE 6
#define CLOCK_BOOTTIME 7
#define CLOCK_TAI 11

static inline long sys3(long nr, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "0"(nr), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

static inline u64 rdtsc_ordered(void)
{
	u32 lo, hi;
	/* lfence keeps the TSC read after the sequence count's. */
	__asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((u64)hi << 32) | lo;
}

#define barrier() __asm__ volatile("" : : : "memory")

/*
 * The guest's time on `clk` in ns (signed: CLOCK_REALTIME may lie before 1970). Returns 0, or
 * -1 when the page cannot answer (the caller makes the system call).
 */
static int page_ns(int clk, s64 *out)
{
	const volatile struct vvar *v = &mosvm_vvar;
	for (;;) {
		u32 seq = v->seq;
		barrier();
		if (seq & 1) {
			__asm__ volatile("pause");
			continue;
		}
		if (!(v->flags & VVAR_VALID))
			return -1;
		u64 base, ns, mult;
		s64 off;
		switch (clk) {
		case CLOCK_MONOTONIC:
		case CLOCK_MONOTONIC_COARSE:
			base = v->mono_ns; mult = v->mono_mult; off = 0;
			break;
		case CLOCK_REALTIME:
		case CLOCK_REALTIME_COARSE:
			base = v->mono_ns; mult = v->mono_mult; off = v->realtime_off;
			break;
		case CLOCK_BOOTTIME:
			base = v->mono_ns; mult = v->mono_mult; off = v->boottime_off;
			break;
		case CLOCK_TAI:
			base = v->mono_ns; mult = v->mono_mult;
			off = v->realtime_off + v->tai_off;
			break;
		case CLOCK_MONOTONIC_RAW:
			base = v->raw_ns; mult = v->raw_mult; off = 0;
			break;
		default:
			return -1;
		}
		u64 tsc_base = v->tsc_base;
		u64 tsc = rdtsc_ordered();
		barrier();
		if (v->seq != seq)
			continue;
		/* A TSC a little behind the base (another vCPU's) counts as the base. */
		u64 d = tsc > tsc_base ? tsc - tsc_base : 0;
		ns = base + (u64)(((unsigned __int128)d * mult) >> 32);
		*out = (s64)ns + off;
		return 0;
	}
}

static void to_timespec(s64 ns, struct timespec_k *ts)
{
	s64 s = ns / 1000000000L, r = ns % 1000000000L;
	if (r < 0) {
		r += 1000000000L;
		s -= 1;
	}
	ts->tv_sec = s;
	ts->tv_nsec = r;
}

int __vdso_clock_gettime(int clk, struct timespec_k *ts)
{
	s64 ns;
	if (page_ns(clk, &ns) != 0)
		return sys3(NR_clock_gettime, clk, (long)ts, 0);
	to_timespec(ns, ts);
	return 0;
}

int __vdso_gettimeofday(struct timeval_k *tv, struct timezone_k *tz)
{
	s64 ns;
	if (page_ns(CLOCK_REALTIME, &ns) != 0)
		return sys3(NR_gettimeofday, (long)tv, (long)tz, 0);
	if (tv) {
		struct timespec_k ts;
		to_timespec(ns, &ts);
		tv->tv_sec = ts.tv_sec;
		tv->tv_usec = ts.tv_nsec / 1000;
	}
	if (tz) {
		tz->tz_minuteswest = 0;
		tz->tz_dsttime = 0;
	}
	return 0;
}

long __vdso_time(long *t)
{
	s64 ns;
	if (page_ns(CLOCK_REALTIME, &ns) != 0)
		return sys3(NR_time, (long)t, 0, 0);
	struct timespec_k ts;
	to_timespec(ns, &ts);
	if (t)
		*t = ts.tv_sec;
	return ts.tv_sec;
}

int __vdso_clock_getres(int clk, struct timespec_k *res)
{
	const volatile struct vvar *v = &mosvm_vvar;
	s64 ns;
	if (!(v->flags & VVAR_VALID))
		return sys3(NR_clock_getres, clk, (long)res, 0);
	switch (clk) {
	case CLOCK_REALTIME:
	case CLOCK_MONOTONIC:
	case CLOCK_MONOTONIC_RAW:
	case CLOCK_BOOTTIME:
	case CLOCK_TAI:
		ns = 1;
		break;
	case CLOCK_REALTIME_COARSE:
	case CLOCK_MONOTONIC_COARSE:
		ns = (s64)v->coarse_res_ns;
		break;
	default:
		return sys3(NR_clock_getres, clk, (long)res, 0);
	}
	if (res) {
		res->tv_sec = 0;
		res->tv_nsec = ns;
	}
	return 0;
}

long __vdso_getcpu(unsigned *cpu, unsigned *node, void *unused)
{
	const volatile struct vvar *v = &mosvm_vvar;
	(void)unused;
	if (!(v->flags & VVAR_VALID))
		return sys3(NR_getcpu, (long)cpu, (long)node, 0);
	if (cpu)
		*cpu = v->cpu;
	if (node)
		*node = v->node;
	return 0;
}

/* The names without the prefix, as Linux's vDSO also exports them. */
int clock_gettime(int, struct timespec_k *) __attribute__((weak, alias("__vdso_clock_gettime")));
int gettimeofday(struct timeval_k *, struct timezone_k *) __attribute__((weak, alias("__vdso_gettimeofday")));
long time(long *) __attribute__((weak, alias("__vdso_time")));
int clock_getres(int, struct timespec_k *) __attribute__((weak, alias("__vdso_clock_getres")));
long getcpu(unsigned *, unsigned *, void *) __attribute__((weak, alias("__vdso_getcpu")));
