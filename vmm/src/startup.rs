//! What this process found when it started, recorded before Rust's runtime changes it.
//!
//! Before `main`, the standard library opens `/dev/null` on any of descriptors 0, 1, 2 that is
//! closed and sets SIGPIPE to ignored. Both belong to the program `mosvm run` starts: a program
//! started with `<&-` sees EBADF on descriptor 0 and gets 0 from its first `open`, and one
//! started with SIGPIPE ignored keeps it ignored (execve(2): "the dispositions of ignored
//! signals are left unchanged"). A constructor in `.init_array` runs before the runtime's
//! set-up (which `main` calls) and records both.

use std::sync::atomic::{AtomicU8, Ordering};

/// Bit n: descriptor n (0, 1, 2) was closed. Bit 3: SIGPIPE was ignored. Bit 7: recorded.
static FOUND: AtomicU8 = AtomicU8::new(0);

const SIGPIPE_IGNORED: u8 = 1 << 3;
const RECORDED: u8 = 1 << 7;

extern "C" fn record() {
    let mut found = RECORDED;
    for fd in 0..3 {
        // SAFETY: F_GETFD on a descriptor number touches no memory.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            found |= 1 << fd;
        }
    }
    if disposition(libc::SIGPIPE) == Some(libc::SIG_IGN) {
        found |= SIGPIPE_IGNORED;
    }
    FOUND.store(found, Ordering::SeqCst);
}

/// This process's handler for signal `sig` now (SIG_DFL, SIG_IGN or a function), through the
/// raw call: the C library's wrapper refuses its own signals 32 and 33. None if it fails.
pub(crate) fn disposition(sig: i32) -> Option<libc::sighandler_t> {
    let mut old = [0u64; 4];
    // SAFETY: querying a disposition into a 32-byte struct kernel_sigaction.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            std::ptr::null::<u64>(),
            old.as_mut_ptr(),
            8,
        )
    };
    (r == 0).then_some(old[0] as libc::sighandler_t)
}

/// Run [`record`] with the C library's constructors, before the runtime's set-up.
#[used]
#[link_section = ".init_array"]
static RECORD: extern "C" fn() = record;

/// Whether standard descriptor `fd` (0, 1 or 2) was closed when the process started. False when
/// nothing was recorded (a test harness, a library user whose constructors did not run).
pub fn std_fd_was_closed(fd: i32) -> bool {
    (0..3).contains(&fd) && FOUND.load(Ordering::SeqCst) & (1 << fd) != 0
}

/// Whether SIGPIPE was ignored when the process started (the runtime ignores it afterwards).
pub fn sigpipe_was_ignored() -> bool {
    FOUND.load(Ordering::SeqCst) & SIGPIPE_IGNORED != 0
}
