//! Futexes of a process with several threads: the host's futex(2) on the guest's words, and
//! what a thread's exit does to them (robust list, clear_child_tid).

use super::super::{last_errno, Step, Vm, EFAULT, EINVAL, ENOSYS};
use super::Op;
use std::sync::atomic::Ordering;

/// futex(2) operations and flags.
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAKE: u64 = 1;
const FUTEX_REQUEUE: u64 = 3;
const FUTEX_CMP_REQUEUE: u64 = 4;
const FUTEX_WAKE_OP: u64 = 5;
const FUTEX_LOCK_PI: u64 = 6;
const FUTEX_UNLOCK_PI: u64 = 7;
const FUTEX_TRYLOCK_PI: u64 = 8;
const FUTEX_WAIT_BITSET: u64 = 9;
const FUTEX_WAKE_BITSET: u64 = 10;
const FUTEX_WAIT_REQUEUE_PI: u64 = 11;
const FUTEX_CMP_REQUEUE_PI: u64 = 12;
const FUTEX_LOCK_PI2: u64 = 13;
const FUTEX_CLOCK_REALTIME: u64 = 256;
const FUTEX_CMD_MASK: u64 = !(128 | 256);
/// Robust futex word bits (futex(2), "Robust futexes").
const FUTEX_WAITERS: u32 = 0x8000_0000;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
/// Most entries of a robust list walked at thread exit (Linux's ROBUST_LIST_LIMIT).
const ROBUST_LIST_LIMIT: usize = 2048;

impl Vm {
    /// exit(2) of one thread while others go on: its robust futexes are released and its
    /// clear_child_tid word zeroed and woken (set_tid_address(2)).
    pub(in crate::vm) fn exit_thread(&mut self) {
        self.release_robust_list();
        if self.clear_child_tid != 0 {
            if let Some(h) = self.futex_word(self.clear_child_tid) {
                // SAFETY: `h` is the host address of a mapped, aligned guest word.
                let w = unsafe { &*(h as *const std::sync::atomic::AtomicU32) };
                w.store(0, Ordering::SeqCst);
                self.space.mem.mark_dirty_va(self.clear_child_tid);
                // SAFETY: a futex wake on that word (as the kernel does at thread exit).
                unsafe { libc::syscall(libc::SYS_futex, h, FUTEX_WAKE, 1, 0, 0, 0) };
            }
        }
        if self.tid != i64::from(self.cur.host) && self.tid != self.pid {
            // A thread started away from home: its id was held at home for it.
            let _ = self.call_deputy(
                crate::deputy::RELEASE_TID as i64,
                [self.tid as u64, 0, 0, 0, 0, 0],
                vec![],
            );
        }
        self.th.thread_exited = true;
    }

    /// The host address of the aligned, mapped guest futex word at `va`.
    pub(super) fn futex_word(&mut self, va: u64) -> Option<u64> {
        if !va.is_multiple_of(4) || self.space.accessible(va, 4, false) != 4 {
            return None;
        }
        self.space.fault_in_range(va, 4);
        self.space.mem.futex_addr(va)
    }

    /// Walk the exiting thread's robust list (get_robust_list(2)): each futex it holds gets
    /// FUTEX_OWNER_DIED and one waiter woken, as Linux's `exit_robust_list`.
    pub(super) fn release_robust_list(&mut self) {
        let head = self.robust_list;
        if head == 0 {
            return;
        }
        let read = |vm: &mut Vm, va: u64| vm.read_guest::<8>(va).ok().map(u64::from_le_bytes);
        let (Some(first), Some(offset), Some(pending)) = (
            read(self, head),
            read(self, head + 8),
            read(self, head + 16),
        ) else {
            return;
        };
        let mut entry = first;
        let mut n = 0;
        while entry != head && entry != 0 && n < ROBUST_LIST_LIMIT {
            let next = read(self, entry & !1);
            if entry != pending {
                self.futex_death((entry & !1).wrapping_add(offset));
            }
            let Some(next) = next else { break };
            entry = next;
            n += 1;
        }
        if pending != 0 {
            self.futex_death((pending & !1).wrapping_add(offset));
        }
    }

    /// One robust futex of an exiting thread (Linux's `handle_futex_death`).
    pub(super) fn futex_death(&mut self, va: u64) {
        let Some(h) = self.futex_word(va) else { return };
        // SAFETY: `h` is the host address of a mapped, aligned guest word.
        let w = unsafe { &*(h as *const std::sync::atomic::AtomicU32) };
        let mut cur = w.load(Ordering::SeqCst);
        loop {
            if cur & FUTEX_TID_MASK != self.tid as u32 {
                return;
            }
            let new = (cur & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
            match w.compare_exchange(cur, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        self.space.mem.mark_dirty_va(va);
        if cur & FUTEX_WAITERS != 0 {
            // SAFETY: a shared futex wake on that word, as the kernel's.
            unsafe { libc::syscall(libc::SYS_futex, h, FUTEX_WAKE, 1, 0, 0, 0) };
        }
    }

    /// futex(2) for a process with several threads: the host's futex on the host addresses
    /// of the guest's words, so waiters and wakers on any vCPU (and, for shared mappings, in
    /// other processes) meet. Waits run without the process lock.
    pub(in crate::vm) fn futex_mt(&mut self, a: [u64; 6]) -> Result<Step, i64> {
        let op = a[1];
        let cmd = op & FUTEX_CMD_MASK;
        if !a[0].is_multiple_of(4) {
            return Err(EINVAL);
        }
        let addr = self.futex_word(a[0]).ok_or(EFAULT)?;
        let two = matches!(
            cmd,
            FUTEX_REQUEUE
                | FUTEX_CMP_REQUEUE
                | FUTEX_WAKE_OP
                | FUTEX_WAIT_REQUEUE_PI
                | FUTEX_CMP_REQUEUE_PI
        );
        let addr2 = if two {
            if !a[4].is_multiple_of(4) {
                return Err(EINVAL);
            }
            self.futex_word(a[4]).ok_or(EFAULT)?
        } else {
            0
        };
        if matches!(
            cmd,
            FUTEX_LOCK_PI
                | FUTEX_LOCK_PI2
                | FUTEX_UNLOCK_PI
                | FUTEX_TRYLOCK_PI
                | FUTEX_WAIT_REQUEUE_PI
                | FUTEX_CMP_REQUEUE_PI
        ) {
            // The host's priority inheritance knows owners by host tid: right only while
            // every thread's guest tid is its host thread's (the process never moved).
            if !self.tids_are_hosts() {
                if self.warned.insert(0x7000_0006) {
                    crate::say!(
                        "mosvm: {}: priority-inheritance futexes after a migration are not \
                         supported",
                        self.program.display()
                    );
                }
                return Err(ENOSYS);
            }
            self.th.pi = true;
        }
        let host = |addr: u64, val: u64, t: u64| {
            // SAFETY: host addresses of mapped guest words; `t` is the guest's count (val2)
            // for the requeue and wake-op operations, never a pointer here.
            let r = unsafe { libc::syscall(libc::SYS_futex, addr, op, val, t, addr2, a[5]) };
            if r < 0 {
                Err(last_errno())
            } else {
                Ok(Step::Ret(r as i64))
            }
        };
        match cmd {
            FUTEX_WAKE_OP => {
                // The host kernel writes the second word: dirty for a migration's copy.
                let r = host(addr, a[2], a[3]);
                self.space.mem.mark_dirty_va(a[4]);
                r
            }
            FUTEX_WAKE | FUTEX_WAKE_BITSET | FUTEX_REQUEUE | FUTEX_CMP_REQUEUE
            | FUTEX_CMP_REQUEUE_PI => host(addr, a[2], a[3]),
            FUTEX_UNLOCK_PI | FUTEX_TRYLOCK_PI => host(addr, a[2], 0),
            FUTEX_WAIT
            | FUTEX_WAIT_BITSET
            | FUTEX_LOCK_PI
            | FUTEX_LOCK_PI2
            | FUTEX_WAIT_REQUEUE_PI => {
                let timeout = if a[3] != 0 {
                    let b = self.read_timeout(a[3])?;
                    let mut ts = libc::timespec {
                        tv_sec: i64::from_le_bytes(b[..8].try_into().expect("8")),
                        tv_nsec: i64::from_le_bytes(b[8..].try_into().expect("8")),
                    };
                    // Absolute timeouts are on the guest's clock: CLOCK_REALTIME for
                    // LOCK_PI, else as FUTEX_CLOCK_REALTIME says.
                    let absolute = cmd != FUTEX_WAIT;
                    if absolute && ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec) {
                        let clock = if cmd == FUTEX_LOCK_PI || op & FUTEX_CLOCK_REALTIME != 0 {
                            libc::CLOCK_REALTIME
                        } else {
                            libc::CLOCK_MONOTONIC
                        };
                        super::super::shift_ts(&mut ts, -self.clock_offset(clock));
                    }
                    Some(ts)
                } else {
                    None
                };
                Ok(Step::Block(Op::Futex {
                    addr,
                    op,
                    val: a[2],
                    timeout,
                    addr2,
                    val3: a[5],
                }))
            }
            _ => Err(ENOSYS),
        }
    }
}
