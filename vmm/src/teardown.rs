//! Ending `mosvm run` without making its parent wait for the VM's teardown.
//!
//! When a process exits, the kernel unmaps its memory and closes its descriptors before its
//! parent hears of the exit. For `mosvm run` that is KVM destroying the VM (its vCPU, its
//! memory slots, its shadow page tables: ~0.5 ms here) and the guest memory going: time the
//! native program's parent never waits for. So the exit hands both to a child made with
//! `clone(CLONE_VM | CLONE_FILES)`, which shares the memory and the descriptor table: the
//! parent's own exit then releases neither, its parent gets the exit status at once, and the
//! child closes every descriptor (the standard ones, pipes and sockets first: they come before
//! KVM's in number order, so readers see end-of-file and the node sees the process go right
//! away), then exits, letting the memory go.

/// Bytes of stack for the child: it makes two system calls and nothing else.
const STACK: usize = 16 * 1024;

extern "C" fn closer(_: *mut libc::c_void) -> libc::c_int {
    // SAFETY: close_range and _exit take no pointers. Nothing else runs here: the child must
    // not allocate or take a lock (the parent's other threads, gone now, may have held one).
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        libc::_exit(0)
    }
}

/// Exit this process with `code` at once, the VM's teardown left to a child (see the module's
/// text). Standard output is flushed first. Falls back to a plain exit if the child cannot be
/// made.
pub fn exit_leaving_teardown(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: a private anonymous mapping for the child's stack; never unmapped (the child
    // runs on it until it exits; the memory goes with the last user of this address space).
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack != libc::MAP_FAILED {
        // Exit signal 0: nobody waits for the child (it is reparented when this process exits).
        // SAFETY: `closer` runs on its own stack (STACK bytes, top passed, 16-aligned) in this
        // address space and only makes its two calls; no CLONE_SETTLS, so no thread-local state.
        unsafe {
            libc::clone(
                closer,
                (stack as *mut u8).add(STACK) as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_FS,
                std::ptr::null_mut(),
            );
        }
    }
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(code) }
}
