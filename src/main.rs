//! `mosvm`: the command-line front end. Thin: it parses arguments and composes the crates
//! (`vmm` for the micro-VM and the deputy, `balancer` for the simulator, `migrate` for the
//! cluster).

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Sim(a) => match balancer::sim::cli::run(&a) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mosvm sim: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}
