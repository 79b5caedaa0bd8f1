//! `mosvm`: the command-line front end. Thin: it parses arguments and composes the crates
//! (`vmm` for the micro-VM and the deputy, `balancer` for the simulator, `migrate` for the
//! cluster).

mod control;
mod node;

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    Ps(ListArgs),
    /// Never migrate process PID.
    Lock(PidArgs),
    /// Let process PID migrate again.
    Unlock(PidArgs),
    /// This node's view of the cluster.
    Nodes(ListArgs),
}

#[derive(clap::Args)]
struct NodeArgs {
    /// TOML config file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Address for peers, e.g. 10.0.0.1:7420.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A peer's address (repeatable).
    #[arg(long)]
    peer: Vec<std::net::SocketAddr>,
    /// Control socket (default: MOSVM_SOCKET, else $XDG_RUNTIME_DIR/mosvm.sock or /run/mosvm/mosvm.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// State directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PidArgs {
    /// Home pid, as `mosvm ps` shows it.
    pid: u32,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
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
    /// The program (a path, or a name looked up on PATH).
    program: OsString,
    /// Its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
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

fn run(a: RunArgs) -> ExitCode {
    let mem = match vmm::vm::parse_size(&a.mem) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mosvm: --mem: {e}");
            return ExitCode::from(2);
        }
    };
    let program = match find_program(&a.program) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mosvm: {e}");
            return ExitCode::from(127);
        }
    };
    let mut argv = vec![a.program.clone().into_vec()];
    argv.extend(a.args.into_iter().map(OsStringExt::into_vec));
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
    let deputy = Box::new(vmm::deputy::HostDeputy::new().with_exe(&program));
    let mut vm = match vmm::vm::Vm::new(program, argv, envp, deputy, opts) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("mosvm: {e}");
            let code = match e {
                vmm::vm::SetupError::Load(_) => 126,
                vmm::vm::SetupError::Host(_) => 1,
            };
            return ExitCode::from(code);
        }
    };
    register(a.socket.as_deref(), &vm);
    let outcome = vm.run();
    if vm.wants_stats() {
        eprintln!("{}", vm.stats_json());
    }
    match outcome {
        Ok(o) => ExitCode::from(o.code() as u8),
        Err(e) => {
            eprintln!("mosvm: {e:#}");
            ExitCode::from(70)
        }
    }
}

/// Register with the home node when one is reachable; run standalone otherwise. A thread
/// keeps the registration (the node sees the process end when it closes), reports guest
/// memory and applies the node's commands.
fn register(socket: Option<&Path>, vm: &vmm::vm::Vm) {
    use std::io::{BufRead, Write};
    let path = control::socket_path(socket);
    let Ok(stream) = std::os::unix::net::UnixStream::connect(&path) else {
        return;
    };
    let req = control::Request::Register {
        pid: std::process::id(),
        program: vm.program().display().to_string(),
        locked: vm.locked(),
    };
    let view = vm.memory_view();
    let lock = vm.lock_flag();
    let Ok(mut w) = stream.try_clone() else {
        return;
    };
    let mut line = serde_json::to_string(&req).unwrap_or_default();
    line.push('\n');
    if w.write_all(line.as_bytes()).is_err() {
        return;
    }
    let mut r = std::io::BufReader::new(stream);
    let mut answer = String::new();
    if r.read_line(&mut answer).is_err() {
        return;
    }
    std::thread::spawn(move || {
        let _ = r
            .get_ref()
            .set_read_timeout(Some(std::time::Duration::from_secs(1)));
        loop {
            let mut l = String::new();
            match r.read_line(&mut l) {
                Ok(0) => return,
                Ok(_) => {
                    if let Ok(control::Command::SetLocked { locked }) = serde_json::from_str(&l) {
                        lock.store(locked, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            let mut u = serde_json::to_string(&control::Update::Memory { bytes: view.used() })
                .unwrap_or_default();
            u.push('\n');
            if w.write_all(u.as_bytes()).is_err() {
                return;
            }
        }
    });
}

fn client(socket: Option<&Path>, req: control::Request) -> Result<control::Reply, ExitCode> {
    match control::call(&control::socket_path(socket), &req) {
        Ok(control::Reply::Error { message }) => {
            eprintln!("mosvm: {message}");
            Err(ExitCode::from(1))
        }
        Ok(r) => Ok(r),
        Err(e) => {
            eprintln!("mosvm: {e:#}");
            Err(ExitCode::from(1))
        }
    }
}

fn ps(a: ListArgs) -> ExitCode {
    let procs = match client(a.socket.as_deref(), control::Request::Ps) {
        Ok(control::Reply::Procs { procs }) => procs,
        Ok(other) => {
            eprintln!("mosvm: unexpected answer from the node: {other:?}");
            return ExitCode::from(1);
        }
        Err(code) => return code,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&procs).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:>8} {:<10} {:<9} {:>8} {:>9} {:>4} {:<4} PROGRAM",
        "PID", "NODE", "STATE", "CPU(s)", "MEM(MiB)", "MIGR", "LOCK"
    );
    for p in procs {
        println!(
            "{:>8} {:<10} {:<9} {:>8.2} {:>9.1} {:>4} {:<4} {}",
            p.pid,
            p.node,
            p.state,
            p.cpu_s,
            p.mem_bytes as f64 / (1 << 20) as f64,
            p.migrations,
            if p.locked { "yes" } else { "no" },
            p.program
        );
    }
    ExitCode::SUCCESS
}

fn nodes(a: ListArgs) -> ExitCode {
    let nodes = match client(a.socket.as_deref(), control::Request::Nodes) {
        Ok(control::Reply::Nodes { nodes }) => nodes,
        Ok(other) => {
            eprintln!("mosvm: unexpected answer from the node: {other:?}");
            return ExitCode::from(1);
        }
        Err(code) => return code,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&nodes).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    println!(
        "{:<12} {:<22} {:>4} {:>6} {:>10} {:>8}",
        "NODE", "ADDRESS", "CPUS", "LOAD", "FREE(MiB)", "AGE(s)"
    );
    for n in nodes {
        if n.age_s.is_finite() {
            println!(
                "{:<12} {:<22} {:>4} {:>6.2} {:>10} {:>8.1}",
                n.name,
                n.addr,
                n.cpus,
                n.load,
                n.free_mem >> 20,
                n.age_s
            );
        } else {
            println!(
                "{:<12} {:<22} {:>4} {:>6} {:>10} {:>8}",
                "?", n.addr, "-", "-", "-", "never"
            );
        }
    }
    ExitCode::SUCCESS
}

fn lock(a: PidArgs, locked: bool) -> ExitCode {
    let req = if locked {
        control::Request::Lock { pid: a.pid }
    } else {
        control::Request::Unlock { pid: a.pid }
    };
    match client(a.socket.as_deref(), req) {
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
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
    if a.socket.is_some() {
        cfg.socket = a.socket;
    }
    if a.state_dir.is_some() {
        cfg.state_dir = a.state_dir;
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Node(a) => node_main(a),
        Cmd::Ps(a) => ps(a),
        Cmd::Lock(a) => lock(a, true),
        Cmd::Unlock(a) => lock(a, false),
        Cmd::Nodes(a) => nodes(a),
        Cmd::Sim(a) => match balancer::sim::cli::run(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mosvm sim: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
