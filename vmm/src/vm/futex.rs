//! futex(2): a single-threaded guest's own futexes, and the host's futex for words in shared
//! mappings (a POSIX named semaphore, a process-shared mutex).

use super::{last_errno, shift_ts, Step, Vm, EAGAIN, ENOSYS, EPERM, ESRCH, ETIMEDOUT};
use crate::mm::VmaKind;

const LOCK_PI: u64 = 6;
const UNLOCK_PI: u64 = 7;
const TRYLOCK_PI: u64 = 8;
const LOCK_PI2: u64 = 13;
const EDEADLK: i64 = libc::EDEADLK as i64;

impl Vm {
    pub(super) fn futex(&mut self, a: [u64; 6]) -> Result<Step, i64> {
        const WAIT: u64 = 0;
        const WAKE: u64 = 1;
        const WAIT_BITSET: u64 = 9;
        const WAKE_BITSET: u64 = 10;
        if let Some(host) = self.shared_futex(a[0]) {
            return self.host_futex(host, a);
        }
        match a[1] & 0x7f {
            WAIT | WAIT_BITSET => {
                let cur = u32::from_le_bytes(self.read_guest::<4>(a[0])?);
                if cur != a[2] as u32 {
                    return Err(EAGAIN);
                }
                // One thread: nobody can wake us. Honour a timeout; otherwise this is a deadlock.
                if a[3] != 0 {
                    let clock = if a[1] & 0x7f == WAIT_BITSET && a[1] & 256 != 0 {
                        libc::CLOCK_REALTIME
                    } else {
                        libc::CLOCK_MONOTONIC
                    };
                    let flags = if a[1] & 0x7f == WAIT_BITSET {
                        libc::TIMER_ABSTIME
                    } else {
                        0
                    };
                    return match self.sleep(clock, flags, a[3], 0) {
                        // A move stops the wait: FUTEX_WAIT is issued again and goes on
                        // toward the same end (vm/timed.rs), still ending in ETIMEDOUT.
                        Err(e) if e == super::ERESTART_BLOCK => {
                            self.cur.restart = None;
                            Err(super::ERESTART)
                        }
                        Err(e) => Err(e),
                        Ok(Step::Ret(_)) => Err(ETIMEDOUT),
                        Ok(step) => Ok(step),
                    };
                }
                // No other thread can wake it: only a signal's handler can (sem_post in a
                // handler); without one it waits for ever, as natively.
                match self.wait_signal(None, None) {
                    super::signal::Woken::Pause => Err(super::ERESTART),
                    super::signal::Woken::Later => Ok(self.redo(None)),
                    _ => Err(super::EINTR),
                }
            }
            WAKE | WAKE_BITSET => Ok(Step::Ret(0)),
            LOCK_PI | LOCK_PI2 | TRYLOCK_PI | UNLOCK_PI => self.pi_futex(a[0], a[1] & 0x7f),
            _ => Err(ENOSYS),
        }
    }

    /// The priority-inheritance futex operations for the process's one thread (futex(2),
    /// "Priority-inheritance futexes"): the word holds the owner's TID. Locking a free word
    /// takes it (keeping FUTEX_OWNER_DIED), locking one's own is EDEADLK; a word owned by a
    /// TID that is not this thread's belongs to no live thread: LOCK_PI gives ESRCH,
    /// TRYLOCK_PI EAGAIN. Unlocking a word one does not own is EPERM.
    fn pi_futex(&mut self, uaddr: u64, op: u64) -> Result<Step, i64> {
        const TID_MASK: u32 = 0x3fff_ffff;
        const OWNER_DIED: u32 = 0x4000_0000;
        let tid = self.pid as u32;
        let val = u32::from_le_bytes(self.read_guest::<4>(uaddr)?);
        let owner = val & TID_MASK;
        match op {
            UNLOCK_PI if owner != tid => Err(EPERM),
            UNLOCK_PI => {
                self.write_guest(uaddr, &0u32.to_le_bytes())?;
                Ok(Step::Ret(0))
            }
            _ if owner == tid => Err(EDEADLK),
            _ if owner == 0 => {
                self.write_guest(uaddr, &(tid | (val & OWNER_DIED)).to_le_bytes())?;
                Ok(Step::Ret(0))
            }
            TRYLOCK_PI => Err(EAGAIN),
            _ => Err(ESRCH),
        }
    }

    /// The host address behind `uaddr` when it lies in a shared mapping (file, memfd, SysV
    /// segment): its futex is shared with other processes (a POSIX named semaphore, a
    /// process-shared mutex), so the host's futex must wait and wake on it.
    pub(super) fn shared_futex(&self, uaddr: u64) -> Option<u64> {
        let (start, v) = self.space.vma_at(uaddr)?;
        if !matches!(v.kind, VmaKind::Shared | VmaKind::Shm) {
            return None;
        }
        let gpa = v.window_at(start, uaddr)?;
        self.space.mem.window_ref()?.host_addr(gpa)
    }

    /// futex(2) on a shared mapping, made by the host on the VMM's mapping of the same pages:
    /// FUTEX_WAIT/WAKE and their BITSET forms, with the guest's flags (PRIVATE, CLOCK_REALTIME)
    /// and timeout (an absolute one on the guest's clock is moved to the host's). Other
    /// operations there are ENOSYS. A wait is interrupted (and reissued) when the guest moves
    /// or `mosvm run` gets a signal.
    pub(super) fn host_futex(&mut self, host: u64, a: [u64; 6]) -> Result<Step, i64> {
        const WAIT: u64 = 0;
        const WAKE: u64 = 1;
        const WAIT_BITSET: u64 = 9;
        const WAKE_BITSET: u64 = 10;
        let op = a[1] & 0x7f;
        if !matches!(op, WAIT | WAKE | WAIT_BITSET | WAKE_BITSET) {
            return Err(ENOSYS);
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let timeout = if matches!(op, WAIT | WAIT_BITSET) && a[3] != 0 {
            let b = self.read_timeout(a[3])?;
            ts.tv_sec = i64::from_le_bytes(b[..8].try_into().expect("8"));
            ts.tv_nsec = i64::from_le_bytes(b[8..].try_into().expect("8"));
            if op == WAIT_BITSET && ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
                let clock = if a[1] & 256 != 0 {
                    libc::CLOCK_REALTIME
                } else {
                    libc::CLOCK_MONOTONIC
                };
                shift_ts(&mut ts, -self.clock_offset(clock));
            }
            &ts as *const libc::timespec as u64
        } else {
            a[3]
        };
        // `timeout` is NULL, the guest's value for a wake (a count, not a pointer), or `ts`.
        // SAFETY: `host` is in the VMM's own shared mapping of the guest's pages (the file
        // window), checked by the kernel (EFAULT past a truncated file's end); `ts` lives on.
        let r = unsafe { libc::syscall(libc::SYS_futex, host, a[1], a[2], timeout, 0u64, a[5]) };
        if r < 0 {
            return Err(last_errno());
        }
        Ok(Step::Ret(r as i64))
    }
}
