//! Calls with a relative timeout that a move (or a signal no handler takes) stops: issued
//! again, they go on toward the end they had, as Linux's restart of poll(2), select(2) and
//! futex(2) does (their restart blocks, or select's written-back timeout), instead of waiting
//! their whole timeout once more after every move.
//!
//! When such a call starts, its end on the guest's monotonic clock is noted
//! ([`Current::timed_now`](super::thread::Current)); when it is restarted, the note stays
//! ([`Current::timed`]) and travels with the thread. The same call (same number, same
//! arguments) issued next gets the time left: a timeout passed in a register is replaced in
//! the arguments the handler sees, one passed in memory is read through an overlay
//! ([`Current::overlay`]) so the guest's own (const) structure is never written. select,
//! pselect6 and ppoll write back the time left as natively.

use super::Vm;

/// A timed call stopped on its way: its number and arguments (as the guest issued them) and
/// its end on the guest's CLOCK_MONOTONIC, ns.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(super) struct TimedRestart {
    nr: u64,
    args: [u64; 6],
    end_ns: i64,
}

/// Where a call keeps its relative timeout.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Timeout {
    /// Milliseconds in argument `i` (negative: none).
    Ms(usize),
    /// A `struct timespec *` in argument `i` (NULL: none).
    Timespec(usize),
    /// A `struct timeval *` in argument `i` (NULL: none).
    Timeval(usize),
}

/// futex(2)'s FUTEX_WAIT: the one wait whose timeout is relative.
const FUTEX_WAIT: u64 = 0;

/// The relative timeout of call `nr(a)`, if it has one.
fn timeout_of(nr: u64, a: &[u64; 6]) -> Option<Timeout> {
    let t = match nr as i64 {
        libc::SYS_poll => Timeout::Ms(2),
        libc::SYS_epoll_wait | libc::SYS_epoll_pwait => Timeout::Ms(3),
        libc::SYS_ppoll | libc::SYS_rt_sigtimedwait => Timeout::Timespec(2),
        libc::SYS_pselect6 => Timeout::Timespec(4),
        libc::SYS_select => Timeout::Timeval(4),
        libc::SYS_epoll_pwait2 | libc::SYS_semtimedop => Timeout::Timespec(3),
        // FUTEX_PRIVATE_FLAG (128) and FUTEX_CLOCK_REALTIME (256) aside.
        libc::SYS_futex if a[1] & 0x7f == FUTEX_WAIT => Timeout::Timespec(3),
        _ => return None,
    };
    match t {
        Timeout::Ms(i) if (a[i] as i32) < 0 => None,
        Timeout::Timespec(i) | Timeout::Timeval(i) if a[i] == 0 => None,
        t => Some(t),
    }
}

impl Vm {
    /// The guest's CLOCK_MONOTONIC now, ns.
    fn guest_mono_ns(&self) -> i64 {
        crate::clock::host_mono() + self.clock_offset(libc::CLOCK_MONOTONIC)
    }

    /// A call starts (or is handled again): note the end of its timeout, and when it is the
    /// call a move stopped (or the same call handled again after a wait), give it the time
    /// left. Returns the arguments its handler sees.
    pub(super) fn timed_start(&mut self, nr: u64, mut a: [u64; 6]) -> [u64; 6] {
        let Some(t) = timeout_of(nr, &a) else {
            return a;
        };
        let same = |r: &TimedRestart| r.nr == nr && r.args == a;
        let now = self.guest_mono_ns();
        let known = self.cur.timed.take().filter(same);
        let end = match known.or(self.cur.timed_now.filter(same)) {
            Some(r) => r.end_ns,
            None => match self.timeout_ns(t, &a) {
                Some(ns) => now.saturating_add(ns),
                // Not a valid timeout: the handler says so.
                None => {
                    self.timed_end(false);
                    return a;
                }
            },
        };
        self.cur.timed_now = Some(TimedRestart {
            nr,
            args: a,
            end_ns: end,
        });
        let left = (end - now).max(0);
        self.cur.overlay = match t {
            Timeout::Ms(i) => {
                a[i] = (left as u64).div_ceil(1_000_000).min(i32::MAX as u64);
                None
            }
            Timeout::Timespec(i) => Some((a[i], timespec(left, 1))),
            Timeout::Timeval(i) => Some((a[i], timespec(left, 1000))),
        };
        a
    }

    /// The timeout of `a` in ns, `None` when the guest's value is not a valid one.
    fn timeout_ns(&mut self, t: Timeout, a: &[u64; 6]) -> Option<i64> {
        match t {
            Timeout::Ms(i) => Some(i64::from(a[i] as i32) * 1_000_000),
            Timeout::Timespec(i) | Timeout::Timeval(i) => {
                let b = self.read_guest::<16>(a[i]).ok()?;
                let s = i64::from_le_bytes(b[..8].try_into().expect("8"));
                let frac = i64::from_le_bytes(b[8..].try_into().expect("8"));
                let unit = if matches!(t, Timeout::Timeval(_)) {
                    1000
                } else {
                    1
                };
                if s < 0 || !(0..1_000_000_000 / unit).contains(&frac) {
                    return None;
                }
                Some(s.saturating_mul(1_000_000_000).saturating_add(frac * unit))
            }
        }
    }

    /// A call ends (`restarted`: it is undone, to be issued again): keep its end for the
    /// call issued next, or forget it.
    pub(super) fn timed_end(&mut self, restarted: bool) {
        let now = self.cur.timed_now.take();
        self.cur.timed = if restarted { now } else { None };
        self.cur.overlay = None;
    }

    /// A call's 16-byte timeout structure at `va`: the time left when the call is one a move
    /// stopped, else the guest's own.
    pub(super) fn read_timeout(&mut self, va: u64) -> Result<[u8; 16], i64> {
        match self.cur.overlay {
            Some((at, b)) if at == va => Ok(b),
            _ => self.read_guest::<16>(va),
        }
    }
}

/// `ns` as a timespec (`unit` 1) or timeval (`unit` 1000: microseconds, rounded up), as the
/// guest's memory holds it.
fn timespec(ns: i64, unit: i64) -> [u8; 16] {
    let s = ns / 1_000_000_000;
    let frac = ((ns % 1_000_000_000) + unit - 1) / unit;
    let (s, frac) = if frac * unit >= 1_000_000_000 {
        (s + 1, 0)
    } else {
        (s, frac)
    };
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&s.to_le_bytes());
    b[8..].copy_from_slice(&frac.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_found_where_linux_takes_them() {
        let a = [3, 4, 5, 6, 7, 8];
        assert_eq!(timeout_of(libc::SYS_poll as u64, &a), Some(Timeout::Ms(2)));
        assert_eq!(
            timeout_of(libc::SYS_select as u64, &a),
            Some(Timeout::Timeval(4))
        );
        // poll(..., -1) and a NULL timespec wait for ever.
        assert_eq!(
            timeout_of(libc::SYS_poll as u64, &[0, 0, u32::MAX as u64, 0, 0, 0]),
            None
        );
        assert_eq!(
            timeout_of(libc::SYS_ppoll as u64, &[0, 0, 0, 0, 0, 0]),
            None
        );
        // Only FUTEX_WAIT's timeout is relative (FUTEX_WAIT_BITSET's is absolute).
        assert_eq!(
            timeout_of(libc::SYS_futex as u64, &[0, 128, 0, 9, 0, 0]),
            Some(Timeout::Timespec(3))
        );
        assert_eq!(
            timeout_of(libc::SYS_futex as u64, &[0, 128 | 9, 0, 9, 0, 0]),
            None
        );
        assert_eq!(timeout_of(libc::SYS_nanosleep as u64, &a), None);
    }

    #[test]
    fn time_left_is_written_as_the_guest_reads_it() {
        let b = timespec(1_500_000_001, 1);
        assert_eq!(i64::from_le_bytes(b[..8].try_into().unwrap()), 1);
        assert_eq!(i64::from_le_bytes(b[8..].try_into().unwrap()), 500_000_001);
        // A timeval rounds up to the next microsecond, never past a second's end.
        let b = timespec(1_999_999_999, 1000);
        assert_eq!(i64::from_le_bytes(b[..8].try_into().unwrap()), 2);
        assert_eq!(i64::from_le_bytes(b[8..].try_into().unwrap()), 0);
        let b = timespec(2_000_001, 1000);
        assert_eq!(i64::from_le_bytes(b[8..].try_into().unwrap()), 2001);
    }
}
