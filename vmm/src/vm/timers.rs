//! POSIX per-process timers (timer_create(2), timer_settime(2), timer_gettime(2),
//! timer_getoverrun(2), timer_delete(2)): host timers of the VMM process, whose signals reach
//! the guest like any other (`si_timerid` translated to the guest's id). They travel with the
//! guest: captured as what is left of them and re-created on the destination.

use super::{Step, Vm, EFAULT, EINVAL};

/// One guest timer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct PosixTimer {
    /// The id the guest knows it by.
    pub guest_id: i32,
    /// The host timer behind it (not carried: re-created on arrival).
    #[serde(skip)]
    pub host_id: i32,
    pub clock: i32,
    /// The guest's `struct sigevent` (64 bytes).
    pub sigevent: Vec<u8>,
    /// What was left of it when captured: interval and value, ns.
    pub left: [u64; 2],
}

const SIGEV_SIGNAL: i32 = 0;
const SIGEV_NONE: i32 = 1;
const SIGEV_THREAD_ID: i32 = 4;
/// `si_code` of a timer's signal.
pub(super) const SI_TIMER: i32 = -2;

fn errno() -> i64 {
    super::last_errno()
}

/// The host `struct sigevent` for a guest one: signals go to this process (or, for
/// SIGEV_THREAD_ID, to the host thread running the guest's thread it names; `host_of` gives
/// it for the guest's tids, None for others).
fn host_sigevent(guest: &[u8], host_of: &dyn Fn(i64) -> Option<i32>) -> Result<[u8; 64], i64> {
    let mut ev = [0u8; 64];
    ev.copy_from_slice(&guest[..64]);
    let signo = i32::from_le_bytes(ev[8..12].try_into().expect("4"));
    let notify = i32::from_le_bytes(ev[12..16].try_into().expect("4"));
    match notify {
        SIGEV_NONE => {}
        SIGEV_SIGNAL | SIGEV_THREAD_ID => {
            if !(1..=64).contains(&signo) {
                return Err(EINVAL);
            }
            if notify == SIGEV_THREAD_ID {
                let tid = i32::from_le_bytes(ev[16..20].try_into().expect("4"));
                let host = host_of(tid as i64).ok_or(EINVAL)?;
                ev[16..20].copy_from_slice(&host.to_le_bytes());
            }
        }
        _ => return Err(EINVAL),
    }
    Ok(ev)
}

fn host_create(clock: i32, ev: &[u8; 64]) -> Result<i32, i64> {
    let mut id = 0i32;
    // SAFETY: `ev` is a 64-byte struct sigevent and `id` a writable kernel_timer_t.
    let r = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            clock,
            ev.as_ptr(),
            &mut id as *mut i32,
        )
    };
    if r < 0 {
        return Err(errno());
    }
    Ok(id)
}

fn ns_to_timespec(ns: u64) -> [i64; 2] {
    [(ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as i64]
}

impl Vm {
    fn timer(&self, id: u64) -> Result<&PosixTimer, i64> {
        self.timers
            .iter()
            .find(|t| t.guest_id as u64 == id & 0xffff_ffff)
            .ok_or(EINVAL)
    }

    /// The timer calls, by number.
    pub(super) fn posix_timer(&mut self, nr: i64, a: [u64; 6]) -> Result<Step, i64> {
        match nr {
            libc::SYS_timer_create => {
                let clock = a[0] as i32;
                let guest_id = (0..)
                    .find(|i| !self.timers.iter().any(|t| t.guest_id == *i))
                    .expect("a free id");
                let guest_ev = if a[1] != 0 {
                    self.read_guest::<64>(a[1])?.to_vec()
                } else {
                    // NULL: SIGEV_SIGNAL with SIGALRM and the timer's id as the value.
                    let mut ev = vec![0u8; 64];
                    ev[..4].copy_from_slice(&guest_id.to_le_bytes());
                    ev[8..12].copy_from_slice(&libc::SIGALRM.to_le_bytes());
                    ev
                };
                let ev = host_sigevent(&guest_ev, &|t| self.host_of(t))?;
                // Check the output before creating anything.
                self.write_guest(a[2], &[0u8; 4])?;
                let host_id = host_create(clock, &ev)?;
                self.timers.push(PosixTimer {
                    guest_id,
                    host_id,
                    clock,
                    sigevent: guest_ev,
                    left: [0, 0],
                });
                self.write_guest(a[2], &guest_id.to_le_bytes())?;
                Ok(Step::Ret(0))
            }
            libc::SYS_timer_settime => {
                let (host, clock) = {
                    let t = self.timer(a[0])?;
                    (t.host_id, t.clock)
                };
                let b = self.read_guest::<32>(a[2])?;
                let mut new = [0i64; 4];
                for (i, w) in new.iter_mut().enumerate() {
                    *w = i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8"));
                }
                if a[1] as i32 & libc::TIMER_ABSTIME != 0 && (new[2] != 0 || new[3] != 0) {
                    // An absolute expiry on the guest's clock, in the host's terms.
                    let mut ts = libc::timespec {
                        tv_sec: new[2],
                        tv_nsec: new[3],
                    };
                    super::time::shift_ts(&mut ts, -self.clock_offset(clock));
                    new[2] = ts.tv_sec;
                    new[3] = ts.tv_nsec;
                }
                let mut old = [0i64; 4];
                // SAFETY: `new` and `old` are 32-byte struct itimerspecs.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_timer_settime,
                        host,
                        a[1] as i32,
                        new.as_ptr(),
                        old.as_mut_ptr(),
                    )
                };
                if r < 0 {
                    return Err(errno());
                }
                if a[3] != 0 {
                    let mut o = [0u8; 32];
                    for (i, w) in old.iter().enumerate() {
                        o[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
                    }
                    self.write_guest(a[3], &o)?;
                }
                Ok(Step::Ret(0))
            }
            libc::SYS_timer_gettime => {
                let host = self.timer(a[0])?.host_id;
                let mut cur = [0u8; 32];
                // SAFETY: `cur` is a 32-byte struct itimerspec.
                let r = unsafe { libc::syscall(libc::SYS_timer_gettime, host, cur.as_mut_ptr()) };
                if r < 0 {
                    return Err(errno());
                }
                self.write_guest(a[1], &cur).map_err(|_| EFAULT)?;
                Ok(Step::Ret(0))
            }
            libc::SYS_timer_getoverrun => {
                let host = self.timer(a[0])?.host_id;
                // SAFETY: no memory arguments.
                let r = unsafe { libc::syscall(libc::SYS_timer_getoverrun, host) };
                if r < 0 {
                    return Err(errno());
                }
                Ok(Step::Ret(r))
            }
            _ => {
                let t = self.timer(a[0])?;
                let (host, guest) = (t.host_id, t.guest_id);
                // SAFETY: no memory arguments.
                unsafe { libc::syscall(libc::SYS_timer_delete, host) };
                // Its signal no longer pends (timer_delete(2); Linux frees its queue entry).
                self.take_host();
                self.timers.retain(|t| t.host_id != host);
                self.sig.drop_queued(|info| {
                    let code = i32::from_le_bytes(info[8..12].try_into().expect("4"));
                    let id = i32::from_le_bytes(info[16..20].try_into().expect("4"));
                    code == SI_TIMER && id == guest
                });
                Ok(Step::Ret(0))
            }
        }
    }

    /// The guest thread a SIGEV_THREAD_ID timer signals (by host timer id).
    pub(super) fn timer_thread(&self, host_id: i32) -> Option<i64> {
        let t = self.timers.iter().find(|t| t.host_id == host_id)?;
        let ev = t.sigevent.get(..20)?;
        let notify = i32::from_le_bytes(ev[12..16].try_into().expect("4"));
        (notify == SIGEV_THREAD_ID)
            .then(|| i32::from_le_bytes(ev[16..20].try_into().expect("4")) as i64)
    }

    /// A host timer's signal names the host's timer id: the guest knows another.
    pub(super) fn guest_timer_id(&self, host_id: i32) -> Option<i32> {
        self.timers
            .iter()
            .find(|t| t.host_id == host_id)
            .map(|t| t.guest_id)
    }

    /// What is left of every timer, to carry them (see [`PosixTimer::left`]).
    pub(super) fn timers_now(&self) -> Vec<PosixTimer> {
        self.timers
            .iter()
            .map(|t| {
                let mut cur = [0i64; 4];
                // SAFETY: `cur` is a 32-byte struct itimerspec.
                unsafe { libc::syscall(libc::SYS_timer_gettime, t.host_id, cur.as_mut_ptr()) };
                let ns = |s: i64, n: i64| (s.max(0) as u64) * 1_000_000_000 + n.max(0) as u64;
                PosixTimer {
                    left: [ns(cur[0], cur[1]), ns(cur[2], cur[3])],
                    ..t.clone()
                }
            })
            .collect()
    }

    /// Delete every host timer (the guest has gone elsewhere).
    pub(super) fn drop_host_timers(&mut self) {
        for t in self.timers.drain(..) {
            // SAFETY: no memory arguments.
            unsafe { libc::syscall(libc::SYS_timer_delete, t.host_id) };
        }
    }
}

/// Re-create carried timers on this host (armed with what was left of them).
pub(super) fn recreate(
    timers: Vec<PosixTimer>,
    host_of: &dyn Fn(i64) -> Option<i32>,
) -> Vec<PosixTimer> {
    timers
        .into_iter()
        .filter_map(|mut t| {
            let ev = host_sigevent(&t.sigevent, host_of).ok()?;
            t.host_id = host_create(t.clock, &ev).ok()?;
            let [iv, val] = t.left;
            let (i, v) = (ns_to_timespec(iv), ns_to_timespec(val));
            let spec = [i[0], i[1], v[0], v[1]];
            if val != 0 {
                // SAFETY: `spec` is a 32-byte struct itimerspec; the old value is not wanted.
                unsafe {
                    libc::syscall(libc::SYS_timer_settime, t.host_id, 0, spec.as_ptr(), 0usize)
                };
            }
            Some(t)
        })
        .collect()
}
