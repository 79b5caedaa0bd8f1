//! The guest's clocks as its time page (`[vvar]`) describes them: guest TSC to ns, as Linux's
//! timekeeper describes its clocks to its vDSO (vdso(7)) and KVM's kvmclock to a guest.
//!
//! The core ([`GuestClock`]) is sans-IO: it takes host clock readings ([`HostSample`]) and
//! returns the page's contents ([`Params`]). The shell reads the host ([`sample`]) and writes
//! the page under its sequence count ([`publish`]).
//!
//! What the page must hold, whatever the host's clocks do:
//! - the guest's CLOCK_MONOTONIC is the host's plus the guest's offset (carried across moves)
//!   and never goes back, across an update of the page included: an update continues the
//!   previous line from where it stands and steers toward the host's clock over the next
//!   second ([`HORIZON_NS`]) instead of stepping (a host clock that ran ahead by more than
//!   [`STEP_NS`] is caught up with a step forward);
//! - CLOCK_REALTIME is the guest's wall clock (the home node's: the paper's gettimeofday
//!   rule), as an offset from CLOCK_MONOTONIC that follows the host's steps (settimeofday);
//! - the rate is the host's: measured against the TSC over the guest's life once a second has
//!   passed, before that the TSC frequency KVM reports (KVM_GET_TSC_KHZ).

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Over how long an update steers the page's line back onto the host's clock, ns.
pub const HORIZON_NS: i64 = 1_000_000_000;
/// A page line behind the host's clock by more than this is stepped forward, ns.
pub const STEP_NS: i64 = 1_000_000;
/// Steering never changes the rate by more than this share (parts per 2^32).
const MAX_STEER: i64 = 1 << 28; // 1/16
/// The page is written again when it is older than this, ns (at a VM exit).
pub const REFRESH_NS: i64 = 250_000_000;
/// A change of an offset between clocks smaller than this is reading noise, not a step, ns.
const OFFSET_NOISE_NS: i64 = 1_000;

/// The host's clocks, read together: the host TSC and CLOCK_MONOTONIC, _RAW, _REALTIME,
/// _BOOTTIME and _TAI in ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostSample {
    pub tsc: u64,
    pub mono: i64,
    pub raw: i64,
    pub real: i64,
    pub boot: i64,
    pub tai: i64,
}

/// What the time page says (see `guest::vvar`): ns = base + ((tsc - tsc_base) * mult >> 32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// Guest TSC at the base.
    pub tsc_base: u64,
    /// Guest CLOCK_MONOTONIC at `tsc_base`, ns.
    pub mono_ns: u64,
    /// CLOCK_MONOTONIC ns per guest TSC tick, 32.32 fixed point.
    pub mono_mult: u64,
    /// Guest CLOCK_MONOTONIC_RAW at `tsc_base`, ns.
    pub raw_ns: u64,
    /// CLOCK_MONOTONIC_RAW ns per tick, 32.32.
    pub raw_mult: u64,
    /// Guest CLOCK_REALTIME minus guest CLOCK_MONOTONIC, ns.
    pub realtime_off: i64,
    /// CLOCK_BOOTTIME minus CLOCK_MONOTONIC, ns.
    pub boottime_off: i64,
    /// CLOCK_TAI minus CLOCK_REALTIME, ns.
    pub tai_off: i64,
}

impl Params {
    fn line(base: u64, mult: u64, tsc_base: u64, tsc: u64) -> u64 {
        let d = tsc.saturating_sub(tsc_base);
        base.wrapping_add(((d as u128 * mult as u128) >> 32) as u64)
    }

    /// The guest's `clock` (a Linux clock id) at guest TSC `tsc`, ns, as the vDSO computes it;
    /// None for a clock the page does not describe.
    pub fn at(&self, clock: i32, tsc: u64) -> Option<i64> {
        let mono = Self::line(self.mono_ns, self.mono_mult, self.tsc_base, tsc) as i64;
        Some(match clock {
            libc::CLOCK_MONOTONIC | libc::CLOCK_MONOTONIC_COARSE => mono,
            libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE => mono + self.realtime_off,
            libc::CLOCK_BOOTTIME => mono + self.boottime_off,
            libc::CLOCK_TAI => mono + self.realtime_off + self.tai_off,
            libc::CLOCK_MONOTONIC_RAW => {
                Self::line(self.raw_ns, self.raw_mult, self.tsc_base, tsc) as i64
            }
            _ => return None,
        })
    }
}

/// How far the guest's clocks are ahead of the host's, ns: CLOCK_MONOTONIC (and its COARSE
/// form), CLOCK_MONOTONIC_RAW, CLOCK_BOOTTIME and CLOCK_REALTIME. Each is carried across a
/// move on its own: two hosts' MONOTONIC, RAW and BOOTTIME differ by different amounts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub mono: i64,
    pub raw: i64,
    pub boot: i64,
    pub realtime: i64,
}

/// One guest's clocks (see the module's text). `tsc_offset` is the guest TSC minus the host's
/// (KVM's TSC offset, read once per vCPU set), `khz` the guest TSC's rate.
#[derive(Clone, Debug)]
pub struct GuestClock {
    tsc_offset: u64,
    khz: u64,
    first: Option<HostSample>,
    params: Option<Params>,
    /// Host CLOCK_MONOTONIC at the last update, ns.
    pub updated: i64,
}

/// 32.32 ns per tick for `ns` ns over `ticks` ticks.
fn mult_of(ns: i64, ticks: u64) -> u64 {
    (((ns.max(0) as u128) << 32) / ticks.max(1) as u128) as u64
}

/// Continue the line (`base`, `mult` from `tsc_base`) at `tsc` and steer it toward `truth`
/// at rate `rate` (32.32): the new base and mult.
fn steer(base: u64, mult: u64, tsc_base: u64, tsc: u64, truth: i64, rate: u64) -> (u64, u64) {
    let here = Params::line(base, mult, tsc_base, tsc) as i64;
    let err = truth - here;
    if err > STEP_NS {
        return (truth as u64, rate);
    }
    // Gain (or lose) `err` over the next HORIZON_NS: rate * (1 + err / HORIZON_NS).
    let share = ((err as i128) << 32) / HORIZON_NS as i128;
    let share = share.clamp(-(MAX_STEER as i128), MAX_STEER as i128);
    let m = rate as i128 + ((rate as i128 * share) >> 32);
    (here as u64, m.max(1) as u64)
}

impl GuestClock {
    /// A guest whose TSC reads `tsc_offset` more than the host's (wrapping) and ticks at
    /// `khz` kHz.
    pub fn new(tsc_offset: u64, khz: u64) -> GuestClock {
        GuestClock {
            tsc_offset,
            khz: khz.max(1),
            first: None,
            params: None,
            updated: i64::MIN,
        }
    }

    /// The page as it stands (None before the first update).
    pub fn params(&self) -> Option<&Params> {
        self.params.as_ref()
    }

    /// The guest TSC at host TSC `host_tsc`.
    pub fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.tsc_offset)
    }

    /// The guest's `clock` at host TSC `host_tsc`, ns (None: the page does not describe it,
    /// or has not been written yet).
    pub fn now(&self, clock: i32, host_tsc: u64) -> Option<i64> {
        self.params?.at(clock, self.guest_tsc(host_tsc))
    }

    /// Take the host's reading `s` (each guest clock is the host's plus its offset in `o`):
    /// the page's new contents.
    pub fn update(&mut self, s: &HostSample, o: &Offsets) -> Params {
        let first = *self.first.get_or_insert(*s);
        let nominal = mult_of(1_000_000, self.khz);
        let span = s.mono - first.mono;
        let (rate, raw_rate) = if span >= 1_000_000_000 {
            let ticks = s.tsc.wrapping_sub(first.tsc);
            (mult_of(span, ticks), mult_of(s.raw - first.raw, ticks))
        } else {
            (nominal, nominal)
        };
        let tsc = self.guest_tsc(s.tsc);
        let mono = s.mono + o.mono;
        let raw = s.raw + o.raw;
        let real_off = s.real + o.realtime - mono;
        // CLOCK_BOOTTIME is CLOCK_MONOTONIC plus the time suspended: never behind it, and on a
        // host never suspended exactly it (reading noise is not a suspension). CLOCK_TAI is
        // CLOCK_REALTIME plus whole seconds (the kernel's TAI offset).
        let host_boot_off = match s.boot - s.mono {
            d if d < OFFSET_NOISE_NS => 0,
            d => d,
        };
        let boot_off = (host_boot_off + o.boot - o.mono).max(0);
        let tai_off = (s.tai - s.real + 500_000_000).div_euclid(1_000_000_000) * 1_000_000_000;
        let keep = |old: i64, new: i64| {
            if (new - old).abs() < OFFSET_NOISE_NS {
                old
            } else {
                new
            }
        };
        let p = match self.params {
            None => Params {
                tsc_base: tsc,
                mono_ns: mono as u64,
                mono_mult: rate,
                raw_ns: raw as u64,
                raw_mult: raw_rate,
                realtime_off: real_off,
                boottime_off: boot_off,
                tai_off,
            },
            Some(o) => {
                let (mono_ns, mono_mult) =
                    steer(o.mono_ns, o.mono_mult, o.tsc_base, tsc, mono, rate);
                let (raw_ns, raw_mult) =
                    steer(o.raw_ns, o.raw_mult, o.tsc_base, tsc, raw, raw_rate);
                // The wall clock follows the line the monotonic one now takes.
                let real_off = real_off - (mono_ns as i64 - mono);
                Params {
                    tsc_base: tsc,
                    mono_ns,
                    mono_mult,
                    raw_ns,
                    raw_mult,
                    realtime_off: keep(o.realtime_off, real_off),
                    boottime_off: keep(o.boottime_off, boot_off),
                    tai_off: keep(o.tai_off, tai_off),
                }
            }
        };
        self.params = Some(p);
        self.updated = s.mono;
        p
    }
}

/// The host TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc reads the time-stamp counter; user mode may (CR4.TSD is clear on Linux).
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// This host's `clock`, ns.
pub fn read(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill in.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Host CLOCK_MONOTONIC, ns.
pub fn host_mono() -> i64 {
    read(libc::CLOCK_MONOTONIC)
}

/// Read the host's clocks: the TSC and CLOCK_MONOTONIC from the tightest of three tries,
/// each other clock as its offset from CLOCK_MONOTONIC read between two readings of it.
pub fn sample() -> HostSample {
    let mut best: Option<(i64, u64, i64)> = None;
    for _ in 0..3 {
        let m0 = read(libc::CLOCK_MONOTONIC);
        let tsc = host_tsc();
        let m1 = read(libc::CLOCK_MONOTONIC);
        if best.is_none_or(|(w, _, _)| m1 - m0 < w) {
            best = Some((m1 - m0, tsc, m0 + (m1 - m0) / 2));
        }
    }
    let (_, tsc, mono) = best.expect("three tries");
    let off = |c: libc::clockid_t| {
        let m0 = read(libc::CLOCK_MONOTONIC);
        let v = read(c);
        let m1 = read(libc::CLOCK_MONOTONIC);
        v - (m0 + (m1 - m0) / 2)
    };
    HostSample {
        tsc,
        mono,
        raw: mono + off(libc::CLOCK_MONOTONIC_RAW),
        real: mono + off(libc::CLOCK_REALTIME),
        boot: mono + off(libc::CLOCK_BOOTTIME),
        tai: mono + off(libc::CLOCK_TAI),
    }
}

/// Whether the host TSC can carry guest time: invariant (CPUID 0x8000_0007 EDX bit 8, Linux's
/// constant_tsc and nonstop_tsc). Asked once per process (a CPUID exits to the outer
/// hypervisor when there is one).
pub fn tsc_usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
        max >= 0x8000_0007 && core::arch::x86_64::__cpuid(0x8000_0007).edx & (1 << 8) != 0
    })
}

/// The resolution of the _COARSE clocks on this host, ns.
pub fn coarse_res() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill in.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec * 1_000_000_000 + ts.tv_nsec) as u64
}

/// Write `p` (or, when None, an invalid page: every call goes to the system call) into the
/// time page at `page`, under its sequence count.
///
/// # Safety
/// `page` must point at a 4096-byte, 8-aligned page of guest memory that stays mapped for the
/// call and that nothing in this process accesses other than through atomics meanwhile (the
/// guest reads it concurrently: it is the page's only other user).
pub unsafe fn publish(page: *mut u8, p: Option<&Params>, coarse_res_ns: u64) {
    use guest::vvar as v;
    // SAFETY: the offsets lie inside the page and are aligned for their width (the caller's
    // page is 8-aligned); the caller guarantees only atomic access meanwhile.
    let (u32_at, u64_at) = unsafe {
        (
            |o: usize| AtomicU32::from_ptr(page.add(o) as *mut u32),
            |o: usize| AtomicU64::from_ptr(page.add(o) as *mut u64),
        )
    };
    let seq = u32_at(v::SEQ);
    let odd = seq.load(Ordering::Relaxed) | 1;
    seq.store(odd, Ordering::Relaxed);
    fence(Ordering::Release);
    match p {
        Some(p) => {
            u64_at(v::TSC_BASE).store(p.tsc_base, Ordering::Relaxed);
            u64_at(v::MONO_NS).store(p.mono_ns, Ordering::Relaxed);
            u64_at(v::MONO_MULT).store(p.mono_mult, Ordering::Relaxed);
            u64_at(v::RAW_NS).store(p.raw_ns, Ordering::Relaxed);
            u64_at(v::RAW_MULT).store(p.raw_mult, Ordering::Relaxed);
            u64_at(v::REALTIME_OFF).store(p.realtime_off as u64, Ordering::Relaxed);
            u64_at(v::BOOTTIME_OFF).store(p.boottime_off as u64, Ordering::Relaxed);
            u64_at(v::TAI_OFF).store(p.tai_off as u64, Ordering::Relaxed);
            u64_at(v::COARSE_RES_NS).store(coarse_res_ns, Ordering::Relaxed);
            u32_at(v::CPU).store(0, Ordering::Relaxed);
            u32_at(v::NODE).store(0, Ordering::Relaxed);
            u32_at(v::FLAGS).store(v::VALID, Ordering::Relaxed);
        }
        None => u32_at(v::FLAGS).store(0, Ordering::Relaxed),
    }
    seq.store(odd.wrapping_add(1), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    const KHZ: u64 = 2_600_000;

    /// A host whose TSC runs at `khz_true` while KVM says KHZ, from `t0` ns.
    fn host(ns: i64, khz_true: u64) -> HostSample {
        HostSample {
            tsc: 1_000_000 + (ns as u128 * khz_true as u128 / 1_000_000) as u64,
            mono: ns,
            raw: ns,
            real: ns + 1_700_000_000_000_000_000,
            boot: ns,
            tai: ns + 1_700_000_037_000_000_000,
        }
    }

    #[test]
    fn the_first_page_reads_the_host_plus_the_offsets() {
        let mut c = GuestClock::new(100, KHZ);
        let s = host(10_000_000_000, KHZ);
        c.update(
            &s,
            &Offsets {
                mono: 7,
                raw: 11,
                boot: 9,
                realtime: -3,
            },
        );
        let t = s.tsc;
        assert_eq!(c.now(libc::CLOCK_MONOTONIC, t), Some(s.mono + 7));
        assert_eq!(c.now(libc::CLOCK_MONOTONIC_RAW, t), Some(s.raw + 11));
        assert_eq!(c.now(libc::CLOCK_REALTIME, t), Some(s.real - 3));
        assert_eq!(c.now(libc::CLOCK_BOOTTIME, t), Some(s.boot + 9));
        assert_eq!(c.now(libc::CLOCK_TAI, t), Some(s.tai - 3));
        assert_eq!(c.now(libc::CLOCK_PROCESS_CPUTIME_ID, t), None);
        // One ms of TSC later: one ms later (to the ns the 32.32 rate keeps).
        let later = c.now(libc::CLOCK_MONOTONIC, t + KHZ).unwrap();
        assert!((later - (s.mono + 7 + 1_000_000)).abs() <= 1, "{later}");
    }

    /// A host whose TSC really runs 100 ppm faster than KVM said: the page never goes back,
    /// and once a second has passed it stays within a microsecond of the host.
    #[test]
    fn a_wrong_rate_is_steered_out_without_going_back() {
        let khz_true = KHZ + KHZ / 10_000;
        let mut c = GuestClock::new(0, KHZ);
        let mut last = i64::MIN;
        let mut worst_late = 0i64;
        for step in 0..400i64 {
            let ns = 5_000_000_000 + step * 250_000_000;
            let s = host(ns, khz_true);
            // Read just before the update, then update, then read at the same TSC.
            if c.params().is_some() {
                let before = c.now(libc::CLOCK_MONOTONIC, s.tsc).unwrap();
                assert!(before >= last, "went back at step {step}");
                last = before;
                if step > 20 {
                    worst_late = worst_late.max((before - s.mono).abs());
                }
            }
            c.update(&s, &Offsets::default());
            let after = c.now(libc::CLOCK_MONOTONIC, s.tsc).unwrap();
            assert!(after >= last, "update went back at step {step}");
            last = after;
        }
        assert!(worst_late < 1_000, "off by {worst_late} ns");
    }

    #[test]
    fn a_host_clock_far_ahead_is_caught_up_with_a_step_forward() {
        let mut c = GuestClock::new(0, KHZ);
        let s = host(1_000_000_000, KHZ);
        c.update(&s, &Offsets::default());
        let mut s2 = host(2_000_000_000, KHZ);
        s2.mono += 50_000_000;
        c.update(&s2, &Offsets::default());
        assert_eq!(c.now(libc::CLOCK_MONOTONIC, s2.tsc), Some(s2.mono));
    }

    #[test]
    fn boottime_and_tai_keep_their_exact_relations_through_reading_noise() {
        for noise in [-40i64, -1, 0, 1, 40] {
            let mut c = GuestClock::new(0, KHZ);
            let mut s = host(1_000_000_000, KHZ);
            s.boot = s.mono + noise;
            s.tai = s.real + 37_000_000_000 + noise;
            c.update(&s, &Offsets::default());
            let t = s.tsc + 12_345;
            let (m, b) = (
                c.now(libc::CLOCK_MONOTONIC, t),
                c.now(libc::CLOCK_BOOTTIME, t),
            );
            assert_eq!(m, b, "noise {noise}");
            let (r, tai) = (c.now(libc::CLOCK_REALTIME, t), c.now(libc::CLOCK_TAI, t));
            assert_eq!(tai.unwrap() - r.unwrap(), 37_000_000_000, "noise {noise}");
        }
        // A host that was suspended for a while: its boot clock is ahead by that much.
        let mut c = GuestClock::new(0, KHZ);
        let mut s = host(1_000_000_000, KHZ);
        s.boot = s.mono + 3_000_000_000;
        c.update(&s, &Offsets::default());
        assert_eq!(c.now(libc::CLOCK_BOOTTIME, s.tsc), Some(s.boot));
    }

    #[test]
    fn a_wall_clock_step_shows_but_reading_noise_does_not() {
        let mut c = GuestClock::new(0, KHZ);
        let s = host(1_000_000_000, KHZ);
        let p0 = c.update(&s, &Offsets::default());
        let mut s2 = host(1_250_000_000, KHZ);
        s2.real += 300; // noise
        assert_eq!(
            c.update(&s2, &Offsets::default()).realtime_off,
            p0.realtime_off
        );
        let mut s3 = host(1_500_000_000, KHZ);
        s3.real -= 3_600_000_000_000; // settimeofday an hour back
        let p3 = c.update(&s3, &Offsets::default());
        assert_eq!(c.now(libc::CLOCK_REALTIME, s3.tsc), Some(s3.real));
        assert!(p3.realtime_off < p0.realtime_off);
    }

    #[test]
    fn the_page_is_written_under_its_sequence_count() {
        #[repr(align(8))]
        struct Page([u8; 4096]);
        let mut page = Page([0; 4096]);
        let p = Params {
            tsc_base: 1,
            mono_ns: 2,
            mono_mult: 3,
            raw_ns: 4,
            raw_mult: 5,
            realtime_off: -6,
            boottime_off: 7,
            tai_off: 8,
        };
        // SAFETY: a local, aligned page nothing else touches.
        unsafe { publish(page.0.as_mut_ptr(), Some(&p), 4_000_000) };
        let u64_at = |p: &Page, o: usize| u64::from_le_bytes(p.0[o..o + 8].try_into().unwrap());
        let u32_at = |p: &Page, o: usize| u32::from_le_bytes(p.0[o..o + 4].try_into().unwrap());
        use guest::vvar as v;
        assert_eq!(u32_at(&page, v::SEQ), 2);
        assert_eq!(u32_at(&page, v::FLAGS), v::VALID);
        assert_eq!(u64_at(&page, v::TSC_BASE), 1);
        assert_eq!(u64_at(&page, v::RAW_MULT), 5);
        assert_eq!(u64_at(&page, v::REALTIME_OFF) as i64, -6);
        assert_eq!(u64_at(&page, v::COARSE_RES_NS), 4_000_000);
        // SAFETY: as above.
        unsafe { publish(page.0.as_mut_ptr(), None, 0) };
        assert_eq!(u32_at(&page, v::SEQ), 4);
        assert_eq!(u32_at(&page, v::FLAGS), 0);
    }
}
