//! Time: the guest's clocks (monotonic carried across moves, wall clock the home node's: the
//! paper's gettimeofday rule) and sleeping on them.

use super::{Step, Vm, EINTR, EINVAL};
use crate::clock;
use crate::memory::PAGE;
use std::time::{Duration, Instant};

pub(super) fn is_monotonic(clock: i32) -> bool {
    matches!(
        clock,
        libc::CLOCK_MONOTONIC
            | libc::CLOCK_MONOTONIC_RAW
            | libc::CLOCK_MONOTONIC_COARSE
            | libc::CLOCK_BOOTTIME
    )
}

pub(super) fn shift_ts(ts: &mut libc::timespec, ns: i64) {
    let t = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128 + ns as i128;
    let t = t.max(0);
    ts.tv_sec = (t / 1_000_000_000) as i64;
    ts.tv_nsec = (t % 1_000_000_000) as i64;
}

/// `ns` (signed) as a timespec.
pub(super) fn ns_timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000),
    }
}

pub(super) fn timespec_bytes(ts: &libc::timespec) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&ts.tv_sec.to_le_bytes());
    b[8..].copy_from_slice(&ts.tv_nsec.to_le_bytes());
    b
}

/// A relative sleep a move stopped (Linux's restart block for nanosleep): its end on the
/// guest's `clock` (ns; the guest's clocks travel with it) and where its remainder goes.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct SleepRestart {
    clock: i32,
    end_ns: i64,
    rem: u64,
}

/// This host's `clock`, ns.
pub(super) fn host_now(c: i32) -> i128 {
    clock::read(c) as i128
}

impl Vm {
    pub(super) fn sleep(
        &mut self,
        clock: i32,
        flags: i32,
        req: u64,
        rem: u64,
    ) -> Result<Step, i64> {
        let b = self.read_timeout(req)?;
        let mut ts = libc::timespec {
            tv_sec: i64::from_le_bytes(b[..8].try_into().expect("8")),
            tv_nsec: i64::from_le_bytes(b[8..].try_into().expect("8")),
        };
        if ts.tv_sec < 0 || !(0..1_000_000_000).contains(&ts.tv_nsec) {
            return Err(EINVAL);
        }
        if flags & libc::TIMER_ABSTIME != 0 {
            // The guest's deadline is on its own clock (monotonic carried across moves, wall
            // clock the home node's).
            shift_ts(&mut ts, -self.clock_offset(clock));
        }
        // A relative sleep ends at a fixed time (as Linux's timer does): being interrupted
        // or stopped on the way does not add to it.
        let relative = flags & libc::TIMER_ABSTIME == 0;
        // It measures an interval: on the wall clock (glibc's nanosleep is a relative
        // CLOCK_REALTIME sleep) a change of that clock, here or in a move's estimate of the
        // home node's, neither stretches nor shortens it (clock_nanosleep(2)).
        let clock = match clock {
            libc::CLOCK_REALTIME | libc::CLOCK_TAI if relative => libc::CLOCK_MONOTONIC,
            c => c,
        };
        if relative {
            let end = host_now(clock) + ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
            ts.tv_sec = (end / 1_000_000_000) as i64;
            ts.tv_nsec = (end % 1_000_000_000) as i64;
        }
        self.sleep_until(clock, flags, ts, relative.then_some(rem))
    }

    /// restart_syscall(2): go on with the sleep a move stopped (see [`SleepRestart`]); EINTR
    /// when there is none.
    pub(super) fn restart_syscall(&mut self) -> Result<Step, i64> {
        // (Kept until the call ends: a thread's sleep is handled again after each wait.)
        let Some(r) = self.cur.restart else {
            return Err(EINTR);
        };
        let end = r.end_ns as i128 - self.clock_offset(r.clock) as i128;
        let ts = libc::timespec {
            tv_sec: (end / 1_000_000_000) as i64,
            tv_nsec: (end % 1_000_000_000) as i64,
        };
        self.sleep_until(r.clock, 0, ts, Some(r.rem))
    }

    /// Sleep until `ts` on this host's `clock` (a relative sleep's end, with `rem` its
    /// remainder's address, or an absolute one).
    fn sleep_until(
        &mut self,
        clock: i32,
        flags: i32,
        ts: libc::timespec,
        rem: Option<u64>,
    ) -> Result<Step, i64> {
        let relative = rem.is_some();
        let rem = rem.unwrap_or(0);
        let now = host_now;
        let mut left = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if self.th.mt.is_some() {
            // The other threads go on: look, wait without the process lock, look again.
            let end_ns = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
            let until = *self.cur.redo_until.get_or_insert_with(|| {
                let d = (end_ns - now(clock)).max(0) as u64;
                Instant::now() + Duration::from_nanos(d)
            });
            let done = if relative {
                Instant::now() >= until
            } else {
                now(clock) >= end_ns
            };
            if done {
                return Ok(Step::Ret(0));
            }
            if relative && self.pause.requested() && !self.signal_ready() {
                // (A relative sleep's end is `until`, fixed when it started.)
                let left = until.saturating_duration_since(Instant::now()).as_nanos() as i128;
                return Err(self.stop_sleep(clock, now(clock) + left, rem));
            }
            if self.signal_ready() || self.pause.requested() {
                if rem != 0 && relative {
                    let l = until.saturating_duration_since(Instant::now());
                    left.tv_sec = l.as_secs() as i64;
                    left.tv_nsec = l.subsec_nanos() as i64;
                    self.write_guest(rem, &timespec_bytes(&left))?;
                }
                return Err(EINTR);
            }
            return Ok(self.redo(Some(until)));
        }
        loop {
            // SAFETY: both timespecs are valid for the duration of the call.
            let r = unsafe {
                libc::clock_nanosleep(clock, flags | libc::TIMER_ABSTIME, &ts, &mut left)
            };
            if r != libc::EINTR {
                if r != 0 {
                    return Err(r as i64);
                }
                return Ok(Step::Ret(0));
            }
            // A signal that reaches a handler (or ends the guest) interrupts the sleep; one
            // the guest ignores or blocks does not (nanosleep(2)).
            if relative && self.pause.requested() && !self.signal_ready() {
                let end = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
                return Err(self.stop_sleep(clock, end, rem));
            }
            if self.signal_ready() || self.pause.requested() {
                if rem != 0 && relative {
                    let end = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
                    let l = (end - now(clock)).max(0);
                    left.tv_sec = (l / 1_000_000_000) as i64;
                    left.tv_nsec = (l % 1_000_000_000) as i64;
                    self.write_guest(rem, &timespec_bytes(&left))?;
                }
                return Err(EINTR);
            }
        }
    }

    /// A relative sleep stops for a move: it goes on through restart_syscall(2) toward the
    /// same end (`end`, ns on this host's `clock`), as Linux resumes one after a stop.
    fn stop_sleep(&mut self, clock: i32, end: i128, rem: u64) -> i64 {
        let end_ns = (end + self.clock_offset(clock) as i128) as i64;
        self.cur.restart = Some(SleepRestart { clock, end_ns, rem });
        super::ERESTART_BLOCK
    }

    /// The guest's wall-clock time: its home node's.
    pub(super) fn guest_realtime(&self) -> libc::timespec {
        if let Some(ns) = self.guest_time(libc::CLOCK_REALTIME) {
            return ns_timespec(ns);
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to fill in.
        unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
        shift_ts(&mut ts, self.offsets.realtime);
        ts
    }

    /// How far the guest's view of `clock` is ahead of this host's.
    pub(super) fn clock_offset(&self, clock: i32) -> i64 {
        match clock {
            libc::CLOCK_MONOTONIC_RAW => self.offsets.raw,
            libc::CLOCK_BOOTTIME => self.offsets.boot,
            c if is_monotonic(c) => self.offsets.mono,
            libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE | libc::CLOCK_TAI => {
                self.offsets.realtime
            }
            _ => 0,
        }
    }

    /// The guest's `clock` now, ns: its time page's line, else the host's clock and offset.
    pub(super) fn guest_now(&self, clock: i32) -> i64 {
        self.guest_time(clock)
            .unwrap_or_else(|| host_now(clock) as i64 + self.clock_offset(clock))
    }

    /// The guest's `clock` as its time page gives it now, ns (None: the page does not
    /// describe that clock, or there is no page).
    pub(super) fn guest_time(&self, clock: i32) -> Option<i64> {
        self.clock.as_ref()?.now(clock, clock::host_tsc())
    }

    /// Start the guest's clocks on this vCPU set (a new VM, a migrated or forked guest's).
    /// The time page is written when the guest is about to run ([`Vm::renew_clock`]).
    pub(super) fn start_clock(&mut self) {
        self.clock = self.vcpu.0.as_ref().and_then(crate::cpu::guest_clock);
    }

    /// Write the time page afresh before the guest runs (again): valid, or marked invalid
    /// when the host TSC cannot carry time. Pages written into guest memory since the last
    /// time (a migration's, a fork's) may have brought another host's.
    pub(super) fn renew_clock(&mut self) {
        if self.clock.is_some() {
            self.refresh_clock(true);
        } else {
            self.publish_clock(None);
        }
    }

    /// Write the time page again if it is older than [`clock::REFRESH_NS`] (`force`: now).
    pub(super) fn refresh_clock(&mut self, force: bool) {
        let Some(c) = self.clock.as_mut() else {
            return;
        };
        if !force && clock::host_mono().saturating_sub(c.updated) < clock::REFRESH_NS {
            return;
        }
        let p = c.update(&clock::sample(), &self.offsets);
        self.publish_clock(Some(&p));
    }

    fn publish_clock(&self, p: Option<&clock::Params>) {
        let mem = &self.space.mem;
        let Some(gpa) = mem
            .translate(guest::VVAR_KVA)
            .filter(|g| g + PAGE <= mem.size())
        else {
            return;
        };
        // SAFETY: the time page's frame is a page-aligned frame of guest RAM (checked above),
        // which the guest mapping keeps mapped while `self` lives; the VMM touches it nowhere
        // else, and the guest only reads it (its user mapping is read-only).
        unsafe { clock::publish(mem.host_base().add(gpa as usize), p, clock::coarse_res()) };
        // (A migration rewrites the page before the guest resumes; it is still sent, so that
        // every change to guest memory reaches the destination.)
        mem.mark_dirty(gpa, PAGE);
    }
}
