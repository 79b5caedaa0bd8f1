//! `mosvm`: the command-line front end. Thin: it parses arguments and composes the crates
//! (`vmm` for the micro-VM and the deputy, `balancer` for the simulator, `migrate` for the
//! cluster).

mod admin;
mod balance;
mod capacity;
mod client;
mod control;
mod datagrams;
mod forkaway;
mod gossip;
mod guesthost;
mod hostchan;
mod hosting;
mod jail;
mod link;
mod migration;
mod node;
mod peers;
mod registration;
mod stops;
mod wire;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use registration::{current_of, register, send_update, Announce, Registration};

#[derive(Parser)]
#[command(
    name = "mosvm",
    version,
    about = "MOSIX-style process migration: every process in its own KVM micro-VM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROGRAM in a micro-VM, with this terminal, environment and working directory.
    Run(RunArgs),
    /// Simulate the resource-sharing algorithms on a virtual cluster (see SIMULATION.md).
    Sim(balancer::sim::cli::SimArgs),
    /// The per-node host service.
    Node(NodeArgs),
    /// Processes whose home is this node, wherever they run.
    Ps(client::ListArgs),
    /// Never migrate process PID.
    Lock(client::PidArgs),
    /// Let process PID migrate again.
    Unlock(client::PidArgs),
    /// This node's view of the cluster.
    Nodes(client::ListArgs),
    /// Move process PID to NODE (a peer's name or address), or back home.
    Migrate(client::MigrateArgs),
    /// Live view of this node's cluster and processes.
    Mon(client::MonArgs),
    /// Administer this node: stay, nostay, lstay, nolstay, block, noblock, expel, bring,
    /// speed N, status.
    Ctl(client::CtlArgs),
    /// Create the cluster key (copy the directory to every node).
    Keygen(KeygenArgs),
    /// Run a guest that arrived from another node (started by `mosvm node`).
    #[command(hide = true)]
    GuestHost,
}

/// Where `mosvm keygen` writes the cluster key and `mosvm node` looks for it by default.
const DEFAULT_KEY_DIR: &str = "/etc/mosvm";

#[derive(clap::Args)]
struct KeygenArgs {
    /// Directory to write cluster.crt and cluster.key into.
    #[arg(long, default_value = DEFAULT_KEY_DIR)]
    dir: PathBuf,
    /// Replace an existing key.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// TOML config file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Address for peers, e.g. 10.0.0.1:7420 or node1.example:7420.
    #[arg(long, value_parser = node::host_addr)]
    listen: Option<std::net::SocketAddr>,
    /// A peer: ADDR or NAME=ADDR, ADDR being IP:PORT or HOST:PORT (repeatable).
    #[arg(long)]
    peer: Vec<String>,
    /// Control socket (default: MOSVM_SOCKET, else $XDG_RUNTIME_DIR/mosvm.sock or /run/mosvm/mosvm.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory with the cluster key (from `mosvm keygen`); required to serve peers (default:
    /// /etc/mosvm, where `mosvm keygen` writes it, when it holds a key).
    #[arg(long)]
    key_dir: Option<PathBuf>,
    /// Automatic migration: mosix (default), opportunity-cost, or off (manual moves only).
    #[arg(long)]
    policy: Option<String>,
    /// Seconds between gossip messages and balancing decisions (default 1).
    #[arg(long, allow_negative_numbers = true)]
    step: Option<f64>,
    /// Relative CPU speed, 1.0 = the reference CPU (default: measured at start).
    #[arg(long, allow_negative_numbers = true)]
    speed: Option<f64>,
    /// Give the node a cgroup of its own with this CPU capacity, in CPUs (e.g. 0.5; needs root).
    #[arg(long, allow_negative_numbers = true)]
    cpus: Option<f64>,
    /// Give the node a cgroup of its own with this memory limit (512M, 2G; needs root).
    #[arg(long)]
    memory: Option<String>,
    /// Record the balancer's inputs and decisions to FILE (replay with `mosvm sim --replay`).
    #[arg(long)]
    balancer_trace: Option<PathBuf>,
    /// Move processes away when free memory falls below this fraction of the node's (default 0.05).
    #[arg(long, allow_negative_numbers = true)]
    usher_free: Option<f64>,
    /// Serve Prometheus metrics over HTTP on ADDR (e.g. 127.0.0.1:9420).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Memory kept touched for arriving guests (256M, 1G; 0: none; at most half the node's
    /// memory; default: 256M, at most a sixteenth of it).
    #[arg(long)]
    pool: Option<String>,
}

/// The least `--mem` a program can run in: the VM's own tables, a small program, its stack
/// and the C library's first heap.
const MIN_MEM: u64 = 4 << 20;

impl RunArgs {
    /// Say so (one line) if `mem` bytes are below [`MIN_MEM`].
    fn mem_too_small(&self, mem: u64) -> bool {
        if mem >= MIN_MEM {
            return false;
        }
        eprintln!(
            "mosvm: --mem {}: too small, at least {}M (the VM's own tables, the program, its \
             stack and heap)",
            self.mem,
            MIN_MEM >> 20
        );
        true
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest memory limit (e.g. 512M, 2G).
    #[arg(long, default_value = "2G")]
    mem: String,
    /// Never migrate this process.
    #[arg(long)]
    lock: bool,
    /// Print one line per syscall on stderr: name, arguments, result, local/home, latency.
    #[arg(long)]
    trace: bool,
    /// Print the run's counters (exits, local/home syscalls, phase times) as JSON on stderr.
    #[arg(long)]
    stats: bool,
    /// The home node's control socket (default: MOSVM_SOCKET, else the default path); without a
    /// node the program runs standalone.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The program (a path, or a name looked up on PATH) and its arguments: everything from
    /// the program on is the program's, options included.
    #[arg(
        value_name = "PROGRAM [ARGS]",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// For a `#!` script: its interpreter, with argv [interpreter, optional argument, the
/// script's path, the script's arguments]; anything else unchanged. Interpreters that are
/// scripts themselves are followed a few levels, as Linux does.
fn script_interpreter(
    mut program: PathBuf,
    mut argv: Vec<Vec<u8>>,
) -> Result<(PathBuf, Vec<Vec<u8>>), String> {
    use std::io::Read;
    for _ in 0..4 {
        let mut head = [0u8; 256];
        let n = std::fs::File::open(&program)
            .and_then(|mut f| f.read(&mut head))
            .unwrap_or(0);
        let Some((interp, arg)) = vmm::loader::parse_shebang(&head[..n]) else {
            return Ok((program, argv));
        };
        let mut new = vec![interp.clone()];
        new.extend(arg);
        new.push(program.into_os_string().into_vec());
        new.extend(argv.into_iter().skip(1));
        argv = new;
        program = PathBuf::from(OsString::from_vec(interp));
    }
    Err(format!(
        "{}: too many levels of #! interpreters",
        program.display()
    ))
}

fn find_program(p: &OsString) -> Result<PathBuf, String> {
    let path = Path::new(p);
    if p.as_encoded_bytes().contains(&b'/') {
        return if path.exists() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("{}: no such file", path.display()))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&search) {
        let cand = dir.join(path);
        if let Ok(md) = std::fs::metadata(&cand) {
            use std::os::unix::fs::PermissionsExt;
            if md.is_file() && md.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(format!("{}: command not found", path.display()))
}

/// Whether the caller may execute `path` (execute permission for its effective ids, and a
/// regular file), as execve(2) checks: the error otherwise.
fn may_execute(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: faccessat reads the NUL-terminated path it is given.
    if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::X_OK, libc::AT_EACCESS) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(())
}

fn run(a: RunArgs) -> ExitCode {
    let mem = match vmm::vm::parse_size(&a.mem) {
        Ok(m) if m > vmm::vm::MAX_MEM => {
            eprintln!(
                "mosvm: --mem {}: at most {} GiB (guest physical memory ends where the file \
                 window begins)",
                a.mem,
                vmm::vm::MAX_MEM >> 30
            );
            return ExitCode::from(2);
        }
        Ok(m) => m,
        Err(e) => {
            eprintln!("mosvm: --mem: {e}");
            return ExitCode::from(2);
        }
    };
    if a.mem_too_small(mem) {
        return ExitCode::from(2);
    }
    // A node named by --socket or MOSVM_SOCKET must be there: a mistyped path never turns
    // into a run without a node. (Without either, no node at the default path is fine.)
    let named = a.socket.clone().or_else(control::env_socket);
    if let Some(path) = named {
        if let Err(e) = std::os::unix::net::UnixStream::connect(&path) {
            eprintln!(
                "mosvm: no mosvm node at {} ({e}); start one there, or leave out --socket and \
                 MOSVM_SOCKET to run without a node",
                path.display()
            );
            return ExitCode::from(1);
        }
    }
    let mut command = a.command.into_iter();
    let Some(prog_arg) = command.next() else {
        eprintln!("mosvm: no program given");
        return ExitCode::from(2);
    };
    let program = match find_program(&prog_arg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mosvm: {e}");
            return ExitCode::from(127);
        }
    };
    // execve(2) wants execute permission (EACCES), for the caller's effective ids.
    if let Err(e) = may_execute(&program) {
        let why = match e.raw_os_error() {
            Some(libc::EACCES) => "Permission denied".to_string(),
            _ => e.to_string(),
        };
        eprintln!("mosvm: {}: {why}", program.display());
        return ExitCode::from(126);
    }
    let mut argv = vec![prog_arg.into_vec()];
    argv.extend(command.map(OsStringExt::into_vec));
    // A `#!` script runs its interpreter, as execve(2) does (binfmt_script).
    let (program, argv) = match script_interpreter(program, argv) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("mosvm: {e}");
            return ExitCode::from(126);
        }
    };
    let envp: Vec<Vec<u8>> = std::env::vars_os()
        .map(|(k, v)| {
            let mut e = k.into_vec();
            e.push(b'=');
            e.extend(v.into_vec());
            e
        })
        .collect();
    let opts = vmm::vm::Options {
        mem,
        mem_label: a.mem.clone(),
        trace: a.trace,
        lock: a.lock,
        stats: a.stats,
    };
    vmm::vm::install_signal_handlers();
    let deputy = Box::new(
        vmm::deputy::HostDeputy::new()
            .inheriting()
            .with_exe(&program),
    );
    let vm = match vmm::vm::Vm::new(program, argv, envp, deputy, opts) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("mosvm: {e}");
            let code = match e {
                vmm::vm::SetupError::Load(l) if l.not_found() => 127,
                vmm::vm::SetupError::Load(_) => 126,
                vmm::vm::SetupError::Host(_) => 1,
            };
            return ExitCode::from(code);
        }
    };
    // The guest's limits are taken; the VMM's own descriptors get room beyond them.
    vmm::deputy::raise_own_nofile();
    let reg = register(a.socket.as_deref(), Announce::of(&vm), None);
    match run_guest(vm, reg, a.socket.as_deref()) {
        Ok((status, vm)) => {
            if let Some(vm) = vm.filter(|vm| vm.wants_stats()) {
                eprintln!("{}", vm.stats_json());
            }
            match vmm::vm::Outcome::from_wire(status) {
                // Killed: `mosvm run` dies of the same signal, so its parent sees what it
                // would natively.
                vmm::vm::Outcome::Signaled(sig) => vmm::vm::die_by(sig),
                // (The VM's teardown is left to a child: the parent of `mosvm run` hears
                // of the exit as soon as it would natively.)
                vmm::vm::Outcome::Exited(code) => {
                    vmm::teardown::exit_leaving_teardown(code as u8 as i32)
                }
            }
        }
        Err(e) => {
            eprintln!("mosvm: {e:#}");
            ExitCode::from(70)
        }
    }
}

/// Run the guest here until it ends, or until it moves to another node; then serve its
/// deputy calls from home until it ends there.
fn run_guest(
    mut vm: vmm::vm::Vm,
    mut reg: Option<Registration>,
    socket: Option<&Path>,
) -> anyhow::Result<(i32, Option<vmm::vm::Vm>)> {
    loop {
        if let Some(out) = vm.run_or_pause()? {
            return Ok((out.to_wire(), Some(vm)));
        }
        if vm.take_forked() {
            // This is a forked child: the parent's registration threads did not come along
            // (leave their remains alone); the child registers as a process of its own
            // (once the node answers, if it is restarting just now).
            let home = reg.as_ref().map(|r| r.home.clone());
            if let Some(r) = reg.take() {
                r.abandon();
            }
            reg = register(socket, Announce::of(&vm), home.as_deref());
            continue;
        }
        let pause = vm.pause_handle();
        let job = reg
            .as_ref()
            .and_then(|r| r.jobs.recv_timeout(std::time::Duration::from_secs(5)).ok());
        let Some(mut job) = job else {
            pause.clear();
            continue;
        };
        let reg = reg.as_ref().expect("a job came from the registration");
        reg.busy.store(false, std::sync::atomic::Ordering::SeqCst);
        let switched = migration::switch_vm(&mut job.link, &mut vm, &job.switch, &mut job.report);
        let push = match switched {
            Ok(push) => push,
            Err(e) => {
                send_update(
                    &reg.updates,
                    &control::Update::MigrationFailed {
                        reason: format!("{e:#}"),
                        id: None,
                    },
                );
                if e.downcast_ref::<migration::Lost>().is_some() {
                    // It may run there now: it must not run here too.
                    eprintln!(
                        "mosvm: lost the process while it moved to {} by post-copy ({e:#}); it \
                         cannot continue",
                        job.to
                    );
                    return Ok((link::LOST_HOST_STATUS as i32, None));
                }
                pause.clear();
                continue;
            }
        };
        // A post-copy's report is complete once its last page has arrived.
        let stats = vm.wants_stats();
        if stats && push.is_none() {
            let json = serde_json::to_string(&job.report).unwrap_or_default();
            eprintln!("mosvm-migration {json}");
        }
        let postcopy = push.map(|p| Postcopy {
            push: p,
            report: job.report.clone(),
            stats,
        });
        // The node's next `migrate` goes to the guest's new host: route it there before the
        // node learns of the move (the VM left here may take a while to drop).
        if let Ok(mut r) = reg.remote.lock() {
            *r = Some(job.link.clone());
        }
        send_update(
            &reg.updates,
            &control::Update::Moved {
                node: job.to.clone(),
                id: None,
            },
        );
        let mut deputy = vm.into_deputy();
        match serve_remote(job.link, &mut deputy, reg, &job.to, &job.cert, postcopy)? {
            Ok(back) => vm = back,
            Err(status) => return Ok((status, None)),
        }
    }
}

/// A post-copy under way from home: its push, and its report (printed with `--stats` once the
/// last page has arrived).
struct Postcopy {
    push: migration::Push,
    report: migration::Report,
    stats: bool,
}

/// Serve the guest's deputy calls from home while it runs elsewhere, until it exits (`Err`
/// with its status), the link is lost (`Err(112)`), or it comes home (`Ok` with the VM, which
/// then runs here again). `postcopy`: the move to `first_host` was by post-copy, and its
/// pages are still being pushed.
fn serve_remote(
    link: wire::Wire,
    deputy: &mut Box<dyn vmm::deputy::Deputy>,
    reg: &Registration,
    first_host: &str,
    cert: &[u8],
    postcopy: Option<Postcopy>,
) -> anyhow::Result<Result<vmm::vm::Vm, i32>> {
    let mut link = link;
    let mut host = first_host.to_string();
    let set_remote = |w: Option<wire::Wire>| {
        if let Ok(mut r) = reg.remote.lock() {
            *r = w;
        }
    };
    // (The reports are taken on another thread: they reach only what may be shared.)
    let (updates, remote_cpu_ns) = (&reg.updates, &reg.remote_cpu_ns);
    // The node logs it and `mosvm migrate` reports it; the program's stderr stays its own.
    let on_failed = |reason: String| {
        send_update(
            updates,
            &control::Update::MigrationFailed { reason, id: None },
        );
    };
    // CPU time on the current host, as last reported; earlier hosts' is in `reg.remote_cpu_ns`.
    let here = std::sync::atomic::AtomicU64::new(0);
    let on_usage = |cpu_ns: u64, mem_bytes: u64| {
        here.store(cpu_ns, std::sync::atomic::Ordering::SeqCst);
        let before = remote_cpu_ns.load(std::sync::atomic::Ordering::SeqCst);
        let cpu_s = (before + cpu_ns) as f64 / 1e9;
        send_update(updates, &control::Update::Remote { cpu_s, mem_bytes });
    };
    let host_done = || {
        reg.remote_cpu_ns.fetch_add(
            here.swap(0, std::sync::atomic::Ordering::SeqCst),
            std::sync::atomic::Ordering::SeqCst,
        );
    };
    let postcopy = std::sync::Mutex::new(postcopy);
    let on_postcopy = |m: migrate::Message| {
        let mut pc = postcopy.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = pc.as_mut() else { return };
        match m {
            migrate::Message::PageRequest { pages } => p.push.request(pages),
            migrate::Message::PostcopyDone { faults } => {
                p.push.finish(faults, &mut p.report);
                if p.stats {
                    let json = serde_json::to_string(&p.report).unwrap_or_default();
                    eprintln!("mosvm-migration {json}");
                }
                *pc = None;
            }
            _ => {}
        }
    };
    // Where the guest runs now and the link to it: a child forked there is told the first,
    // and closes its copy of the second.
    let now = std::sync::Mutex::new((host.clone(), link.raw_fd()));
    let (socket, home, reg_fds, program) = (&reg.socket, &reg.home, reg.fds, &reg.program);
    let on_fork = |d: &mut dyn vmm::deputy::Deputy, f: link::ForkAway| {
        let (host, link_fd) = now.lock().map(|n| n.clone()).unwrap_or_default();
        let parent = forkaway::Parent {
            socket: socket.clone(),
            home: home.clone(),
            host,
            cert: cert.to_vec(),
            program: program.lock().map(|p| p.clone()).unwrap_or_default(),
            fds: vec![link_fd, reg_fds[0], reg_fds[1]],
        };
        forkaway::become_childs_deputy(d, f, &parent)
    };
    let end = loop {
        set_remote(Some(link.clone()));
        if let Ok(mut n) = now.lock() {
            *n = (host.clone(), link.raw_fd());
        }
        let end = link::serve_home(
            link.clone(),
            &mut **deputy,
            &on_failed,
            &on_usage,
            &on_postcopy,
            &on_fork,
        );
        host_done();
        match end {
            // The guest moved on: connect its deputy channel to the new host.
            link::HomeEnd::Moved { node, addr, token } => {
                link.shutdown();
                let hello = migrate::Hello::new(
                    reg.home.as_str(),
                    migrate::Purpose::Deputy,
                    migration::host_features(),
                    Some(token),
                );
                let next = addr
                    .parse()
                    .map_err(anyhow::Error::from)
                    .and_then(|a| wire::connect(a, cert, hello));
                match next {
                    Ok(w) => {
                        send_update(
                            &reg.updates,
                            &control::Update::Moved {
                                node: node.clone(),
                                id: None,
                            },
                        );
                        link = w;
                        host = node;
                    }
                    Err(e) => {
                        set_remote(None);
                        eprintln!("mosvm: cannot reach the process on {node} at {addr}: {e:#}");
                        return Ok(Err(link::LOST_HOST_STATUS as i32));
                    }
                }
            }
            end => break end,
        }
    };
    let clear = || set_remote(None);
    let offer = match end {
        link::HomeEnd::Exited(status) => return Ok(Err(status)),
        link::HomeEnd::Moved { .. } => unreachable!("handled above"),
        link::HomeEnd::Lost => {
            clear();
            let arriving = postcopy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .is_some();
            let while_ = if arriving {
                " while its memory was still moving there (post-copy)"
            } else {
                ""
            };
            eprintln!(
                "mosvm: lost the node running the process ({host}){while_}; it cannot continue"
            );
            return Ok(Err(link::LOST_HOST_STATUS as i32));
        }
        link::HomeEnd::Coming(offer, inbox, running) => (offer, inbox, running),
    };
    let (offer, inbox, running) = offer;
    // Coming home: receive it over the link while still serving its deputy calls.
    let writer = link;
    let mut conn = migration::Routed {
        writer: writer.clone(),
        inbox,
    };
    // The guest may exit on its host before the move is through: its status is the process's.
    let mut exited = None;
    let received = migration::receive(&mut conn, Some(offer), None, None, &mut |m| {
        match m {
            migrate::Message::DeputyRequest(r) => {
                let ok = running.serve(&writer, &std::sync::Mutex::new(&mut **deputy), r, &on_fork);
                anyhow::ensure!(ok, "the link closed");
            }
            migrate::Message::Say { line } => eprintln!("{line}"),
            migrate::Message::Exit { status } => {
                exited = Some(status);
                anyhow::bail!("the guest exited ({status}) while coming home")
            }
            _ => {}
        }
        Ok(())
    });
    clear();
    let (prepared, state) = match received {
        Ok(a) => (a.prepared, a.state),
        Err(_) if exited.is_some() => return Ok(Err(exited.unwrap_or_default())),
        Err(e) => {
            eprintln!("mosvm: bringing the process home failed: {e:#}");
            return Ok(Err(link::LOST_HOST_STATUS as i32));
        }
    };
    let deputy = std::mem::replace(
        deputy,
        Box::new(vmm::deputy::HostDeputy::with_stdio([-1, -1, -1])),
    );
    let mut vm = vmm::vm::Vm::restore_prepared(prepared, state, deputy)?;
    vm.share_program_cell(reg.program.clone());
    migration::Conn::send(&mut conn, &migrate::Message::Resumed)?;
    // What its last host still says (the `--stats` report of this move) until it lets go.
    let inbox = conn.inbox.clone();
    std::thread::spawn(move || {
        link::block_host_signals();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let Ok(inbox) = inbox.lock() else { return };
        while let Ok(m) =
            inbox.recv_timeout(until.saturating_duration_since(std::time::Instant::now()))
        {
            if let migrate::Message::Say { line } = m {
                eprintln!("{line}");
            }
        }
    });
    send_update(
        &reg.updates,
        &control::Update::Moved {
            node: reg.home.clone(),
            id: None,
        },
    );
    if let Ok(mut c) = reg.current.lock() {
        *c = Some(current_of(&vm));
    }
    Ok(Ok(vm))
}

fn node_main(a: NodeArgs) -> ExitCode {
    let mut cfg = match &a.config {
        Some(p) => match node::Config::load(p) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("mosvm node: {e:#}");
                return ExitCode::from(2);
            }
        },
        None => node::Config::default(),
    };
    if a.name.is_some() {
        cfg.name = a.name;
    }
    if a.listen.is_some() {
        cfg.listen = a.listen;
    }
    if !a.peer.is_empty() {
        cfg.peers = a.peer;
    }
    if let Err(e) = cfg
        .peers
        .iter()
        .try_for_each(|p| node::parse_peer(p).map(|_| ()))
    {
        eprintln!("mosvm node: {e:#}");
        return ExitCode::from(2);
    }
    // A flag given on the command line wins over the config file.
    macro_rules! flags_win {
        ($($f:ident),*) => { $( if a.$f.is_some() { cfg.$f = a.$f; } )* };
    }
    flags_win!(
        socket,
        state_dir,
        key_dir,
        policy,
        step,
        speed,
        cpus,
        memory,
        balancer_trace,
        usher_free,
        metrics,
        pool
    );
    if cfg.key_dir.is_none() {
        let default = Path::new(DEFAULT_KEY_DIR);
        if default.join(migrate::tls::CERT_FILE).exists() {
            cfg.key_dir = Some(default.to_path_buf());
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOSVM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match node::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosvm node: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `mosvm run ...` parsed with only the `run` subcommand built: building every subcommand's
/// parser takes a quarter of a millisecond, which every guest would pay on its way up. Help
/// and errors read as those of the full parser (see the test `run_alone_parses_as_the_whole`).
fn run_alone() -> Option<RunArgs> {
    use clap::{CommandFactory, FromArgMatches};
    let mut args = std::env::args_os();
    let bin = args.next()?;
    if args.next()? != "run" {
        return None;
    }
    let m = run_command()
        .try_get_matches_from(std::iter::once(bin).chain(args))
        .unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    Some(RunArgs::from_arg_matches(&m).unwrap_or_else(|e| e.exit()))
}

/// The parser of `mosvm run` alone.
fn run_command() -> clap::Command {
    use clap::Args;
    RunArgs::augment_args(
        clap::Command::new("run")
            .bin_name("mosvm run")
            .about(RUN_ABOUT),
    )
}

/// The `run` subcommand's one-line description (its doc comment in [`Cmd`]).
const RUN_ABOUT: &str =
    "Run PROGRAM in a micro-VM, with this terminal, environment and working directory";

fn main() -> ExitCode {
    if let Some(a) = run_alone() {
        return run(a);
    }
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Node(a) => node_main(a),
        Cmd::Ps(a) => client::ps(a),
        Cmd::Lock(a) => client::lock(a, true),
        Cmd::Unlock(a) => client::lock(a, false),
        Cmd::Nodes(a) => client::nodes(a),
        Cmd::Migrate(a) => client::migrate_cmd(a),
        Cmd::Keygen(a) => match migrate::tls::keygen_with(&a.dir, a.force) {
            Ok(()) => {
                println!("cluster key written to {}", a.dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mosvm keygen: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::GuestHost => guesthost::main(),
        Cmd::Mon(a) => client::mon(a),
        Cmd::Ctl(a) => client::ctl(a),
        Cmd::Sim(a) => match balancer::sim::cli::run(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mosvm sim: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// What `mosvm run ARGS` says through the whole parser and through `run` alone: help,
    /// errors, and what is parsed, the same.
    #[test]
    fn run_alone_parses_as_the_whole() {
        for args in [
            &["--help"][..],
            &["-h"],
            &["--bogus"],
            &[],
            &["--mem"],
            &["--mem", "1G", "--stats", "prog", "--help", "x"],
            &["--lock", "--", "prog", "-a"],
        ] {
            let whole = Cli::command()
                .try_get_matches_from(["mosvm", "run"].iter().chain(args.iter()).copied());
            let alone =
                run_command().try_get_matches_from(["mosvm"].iter().chain(args.iter()).copied());
            match (whole, alone) {
                (Err(w), Err(a)) => {
                    let a = a.format(&mut Cli::command());
                    assert_eq!(w.kind(), a.kind(), "{args:?}");
                    assert_eq!(w.render().to_string(), a.render().to_string(), "{args:?}");
                }
                (Ok(w), Ok(a)) => {
                    let (_, w) = w.subcommand().expect("run");
                    let ids = |m: &clap::ArgMatches| -> Vec<String> {
                        m.ids()
                            .map(|i| format!("{i}={:?}", m.value_source(i.as_str())))
                            .collect()
                    };
                    assert_eq!(ids(w), ids(&a), "{args:?}");
                    assert_eq!(
                        w.get_raw("command").map(|v| v.collect::<Vec<_>>()),
                        a.get_raw("command").map(|v| v.collect::<Vec<_>>()),
                        "{args:?}"
                    );
                }
                (w, a) => panic!("{args:?}: whole {w:?}, alone {a:?}"),
            }
        }
    }
}
