//! The mosvm micro-VM: one KVM VM and vCPU running one unmodified Linux x86-64 program in
//! ring 3. This crate owns guest memory and page tables (`memory`), the address space (`mm`),
//! the ELF loader (`loader`), vCPU setup (`cpu`), the syscall table and its local handlers
//! (`syscalls`), the deputy that runs home-dependent calls against the host (`deputy`), and the
//! run loop (`vm`).

pub mod bench;
pub mod clock;
pub mod cpu;
pub mod cpuid_cache;
pub mod deputy;
pub mod forward;
pub mod loader;
pub mod memory;
pub mod mm;
pub mod pool;
pub mod postcopy;
pub mod sigframe;
pub mod snapshot;
pub mod startup;
pub mod table;
pub mod teardown;
pub mod vm;
pub mod window;

/// Where the VMM's own messages to the user go (a fault that killed the program, a call it
/// does not support): stderr, unless the embedding program says otherwise ([`say_to`]; a
/// guest host sends them to the process's home, where its user sees them).
static SAY: std::sync::OnceLock<Box<Sayer>> = std::sync::OnceLock::new();

/// What takes the VMM's messages (see [`say_to`]).
type Sayer = dyn Fn(&str) + Send + Sync;

/// Send the VMM's messages to `f` (one line each, without its newline) from now on. Only the
/// first call counts.
pub fn say_to(f: impl Fn(&str) + Send + Sync + 'static) {
    let _ = SAY.set(Box::new(f));
}

/// One message of the VMM's to the user (see [`say_to`]).
pub fn say(line: &str) {
    match SAY.get() {
        Some(f) => f(line),
        None => eprintln!("{line}"),
    }
}

/// [`say`] with `format!` arguments.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {
        $crate::say(&format!($($t)*))
    };
}
