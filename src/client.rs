//! The client commands: `ps`, `nodes`, `mon`, `migrate`, `lock`/`unlock` and `ctl`, each
//! one request to the node's control socket and its answer printed.

use crate::control;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct MigrateArgs {
    /// Home pid, as `mosvm ps` shows it.
    pid: u32,
    /// Destination node: a peer's name or address.
    node: String,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Return only once the move is done (exit 1 if it fails, with the reason).
    #[arg(long)]
    wait: bool,
    /// Move by post-copy: the process resumes on NODE at once and its memory follows (fetched
    /// when touched). Its home or NODE failing before all of it has arrived loses the
    /// process. Only from home. Default: pre-copy, turning to post-copy when the process
    /// writes memory faster than the link carries it.
    #[arg(long, conflicts_with = "precopy")]
    postcopy: bool,
    /// Move by pre-copy only (a process writing too fast is slowed down until it fits).
    #[arg(long)]
    precopy: bool,
}

#[derive(clap::Args)]
pub(crate) struct MonArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    interval: f64,
    /// Stop after this many refreshes.
    #[arg(long)]
    count: Option<u32>,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

#[derive(clap::Args)]
pub(crate) struct PidArgs {
    /// Home pid, as `mosvm ps` shows it.
    pid: u32,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

pub(crate) fn client(
    socket: Option<&Path>,
    req: control::Request,
) -> Result<control::Reply, ExitCode> {
    answered(control::call(&control::socket_path(socket), &req))
}

/// The node's reply, or the exit code after a one-line error (the node's, or why it could not
/// be asked).
fn answered(r: anyhow::Result<control::Reply>) -> Result<control::Reply, ExitCode> {
    match r {
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

/// A reply of the expected kind, or the exit code after a one-line error.
pub(crate) fn expect<T>(
    r: Result<control::Reply, ExitCode>,
    pick: impl FnOnce(control::Reply) -> Option<T>,
) -> Result<T, ExitCode> {
    let r = r?;
    let shown = format!("{r:?}");
    pick(r).ok_or_else(|| {
        eprintln!("mosvm: unexpected answer from the node: {shown}");
        ExitCode::from(1)
    })
}

pub(crate) fn get_procs(socket: Option<&Path>) -> Result<Vec<control::ProcInfo>, ExitCode> {
    expect(client(socket, control::Request::Ps), |r| match r {
        control::Reply::Procs { procs } => Some(procs),
        _ => None,
    })
}

/// `mosvm migrate`: ask the home node to move the process; with `--wait`, wait for this
/// request's outcome (the node answers when the move is done or has failed).
pub(crate) fn migrate_cmd(a: MigrateArgs) -> ExitCode {
    let sock = a.socket.as_deref();
    let req = control::Request::Migrate {
        pid: a.pid,
        to: a.node.clone(),
        wait: a.wait,
        mode: match (a.postcopy, a.precopy) {
            (true, _) => crate::control::MoveMode::Postcopy,
            (_, true) => crate::control::MoveMode::Precopy,
            _ => crate::control::MoveMode::Auto,
        },
    };
    // With --wait the node answers when this request's move is over, and with its outcome
    // (never another request's).
    let answer = match control::call(&control::socket_path(sock), &req) {
        Err(e) if a.wait && e.to_string() == control::NO_ANSWER => {
            // A node stopped (or restarting) while the move was under way: whether it
            // happened is not known here.
            eprintln!(
                "mosvm: the node stopped before the move of process {} was over; it may have \
                 moved (`mosvm ps` tells, once the node is back)",
                a.pid
            );
            return ExitCode::from(1);
        }
        r => answered(r),
    };
    match expect(answer, |r| match r {
        control::Reply::Ok => Some(None),
        control::Reply::Moved { node } => Some(Some(node)),
        _ => None,
    }) {
        Ok(Some(node))
            if node != a.node
                && a.node != "home"
                && a.node.parse::<std::net::SocketAddr>().is_err() =>
        {
            eprintln!(
                "mosvm migrate: process {} moved to {node}, not {}",
                a.pid, a.node
            );
            ExitCode::from(1)
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

pub(crate) fn get_nodes(socket: Option<&Path>) -> Result<Vec<control::NodeInfo>, ExitCode> {
    expect(client(socket, control::Request::Nodes), |r| match r {
        control::Reply::Nodes { nodes } => Some(nodes),
        _ => None,
    })
}

pub(crate) fn procs_table(procs: &[control::ProcInfo]) -> String {
    let mut out = format!(
        "{:>8} {:<10} {:<14} {:>8} {:>9} {:>4} {:<7} {:<4} PROGRAM\n",
        "PID", "NODE", "STATE", "CPU(s)", "MEM(MiB)", "MIGR", "WHY", "LOCK"
    );
    for p in procs {
        // A guest hosted here for another node: its moves and lock are its home's to know.
        let hosted = p.state.starts_with("guest of");
        out += &format!(
            "{:>8} {:<10} {:<14} {:>8.2} {:>9.1} {:>4} {:<7} {:<4} {}\n",
            p.pid,
            p.node,
            p.state,
            p.cpu_s,
            p.mem_bytes as f64 / (1 << 20) as f64,
            if hosted {
                "-".to_string()
            } else {
                p.migrations.to_string()
            },
            p.moved_by.as_deref().unwrap_or("-"),
            match (hosted, p.locked, &p.pinned) {
                (true, _, _) => "-",
                (false, true, _) => "yes",
                (false, false, Some(_)) => "home",
                (false, false, None) => "no",
            },
            p.program
        );
    }
    out
}

pub(crate) fn nodes_table(nodes: &[control::NodeInfo]) -> String {
    let mut out = format!(
        "{:<12} {:<22} {:>5} {:>5} {:>6} {:>10} {:>10} {:>7}\n",
        "NODE", "ADDRESS", "CPUS", "SPEED", "LOAD", "FREE(MiB)", "MEM(MiB)", "AGE(s)"
    );
    for n in nodes {
        let name = if n.name.is_empty() { "?" } else { &n.name };
        let name = if n.up {
            name.to_string()
        } else {
            format!("{name} (down)")
        };
        out += &match n.age_s {
            Some(age) => format!(
                "{:<12} {:<22} {:>5.2} {:>5.2} {:>6.2} {:>10} {:>10} {:>7.1}\n",
                name,
                n.addr,
                n.cpus,
                n.speed,
                n.load,
                n.free_mem >> 20,
                n.total_mem >> 20,
                age
            ),
            None => format!(
                "{:<12} {:<22} {:>5} {:>5} {:>6} {:>10} {:>10} {:>7}\n",
                name, n.addr, "-", "-", "-", "-", "-", "never"
            ),
        };
    }
    out
}

pub(crate) fn ps(a: ListArgs) -> ExitCode {
    match get_procs(a.socket.as_deref()) {
        Ok(p) if a.json => println!("{}", serde_json::to_string_pretty(&p).unwrap_or_default()),
        Ok(p) => print!("{}", procs_table(&p)),
        Err(code) => return code,
    }
    ExitCode::SUCCESS
}

pub(crate) fn nodes(a: ListArgs) -> ExitCode {
    match get_nodes(a.socket.as_deref()) {
        Ok(n) if a.json => println!("{}", serde_json::to_string_pretty(&n).unwrap_or_default()),
        Ok(n) => print!("{}", nodes_table(&n)),
        Err(code) => return code,
    }
    ExitCode::SUCCESS
}

/// `mosvm mon`: the node's view of the cluster and its processes, refreshed in place.
pub(crate) fn mon(a: MonArgs) -> ExitCode {
    use std::io::Write as _;
    if !(a.interval.is_finite() && (0.1..=86_400.0).contains(&a.interval)) {
        eprintln!(
            "mosvm: --interval {}: must be from 0.1 to 86400 seconds",
            a.interval
        );
        return ExitCode::from(2);
    }
    let mut shown = 0;
    let sock = control::socket_path(a.socket.as_deref());
    // Both views, or why the node could not give them.
    let fetch = || -> anyhow::Result<(Vec<control::NodeInfo>, Vec<control::ProcInfo>)> {
        let n = match control::call(&sock, &control::Request::Nodes)? {
            control::Reply::Nodes { nodes } => nodes,
            other => anyhow::bail!("unexpected answer from the node: {other:?}"),
        };
        let p = match control::call(&sock, &control::Request::Ps)? {
            control::Reply::Procs { procs } => procs,
            other => anyhow::bail!("unexpected answer from the node: {other:?}"),
        };
        Ok((n, p))
    };
    loop {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
        let mut frame = String::new();
        if tty {
            // Clear the screen and go home, then draw.
            frame += "\x1b[2J\x1b[H";
        }
        match fetch() {
            Ok((n, p)) => frame += &format!("{}\n{}", nodes_table(&n), procs_table(&p)),
            // No node to watch at all: one line, as for any client.
            Err(e) if shown == 0 => {
                eprintln!("mosvm: {e:#}");
                return ExitCode::from(1);
            }
            // The node went away (restarted, stopped): say so and look again.
            Err(e) => {
                frame += &format!(
                    "the node is gone ({e:#}); looking again every {} s\n",
                    a.interval
                )
            }
        }
        if !tty {
            frame += "\n";
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(frame.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            // The reader went away (`mosvm mon | head`): that ends the watch.
            return ExitCode::SUCCESS;
        }
        drop(out);
        shown += 1;
        if a.count.is_some_and(|c| shown >= c) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(a.interval));
    }
}

pub(crate) fn lock(a: PidArgs, locked: bool) -> ExitCode {
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

#[derive(clap::Args)]
pub(crate) struct CtlArgs {
    /// stay, nostay, lstay, nolstay, block, noblock, expel, bring, speed, status.
    verb: String,
    /// The value for `speed`.
    #[arg(allow_negative_numbers = true)]
    value: Option<f64>,
    /// Print `status` as JSON.
    #[arg(long)]
    json: bool,
    /// The node's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// `mosvm ctl VERB [VALUE]`.
pub(crate) fn ctl(a: CtlArgs) -> ExitCode {
    let req = control::Request::Ctl {
        verb: a.verb.clone(),
        value: a.value,
    };
    match client(a.socket.as_deref(), req) {
        Ok(control::Reply::Status { status }) if a.json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(control::Reply::Status { status }) => {
            print!("{}", status_text(&status));
            ExitCode::SUCCESS
        }
        Ok(control::Reply::Ok) => ExitCode::SUCCESS,
        Ok(other) => {
            eprintln!("mosvm: unexpected answer {other:?}");
            ExitCode::from(1)
        }
        Err(code) => code,
    }
}

fn status_text(s: &crate::admin::Status) -> String {
    let mut out = format!(
        "node      {}\npolicy    {}\nscope     {}\n",
        s.name, s.policy, s.scope
    );
    let flags: Vec<&str> = [
        (s.admin.stay, "stay"),
        (s.admin.lstay, "lstay"),
        (s.admin.block, "block"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect();
    out += &format!(
        "settings  {}\n",
        if flags.is_empty() {
            "-".to_string()
        } else {
            flags.join(" ")
        }
    );
    if let Some(e) = &s.own {
        out += &format!(
            "capacity  {:.2} CPUs x speed {:.2}\nload      {:.2} ({:.1} runnable)\nmemory    {} MiB free of {} MiB\n",
            e.cpus, e.speed, e.load, s.runnable, e.free_mem_mb, e.total_mem_mb
        );
    }
    out += &format!(
        "processes {} at home, {} away, {} guests\nnodes up  {}\n",
        s.home_here, s.home_away, s.guests, s.nodes_up
    );
    let show = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    out += &format!("sent      {}\n", show(&s.counters.sent));
    out += &format!("received  {}\n", show(&s.counters.received));
    out += &format!("rejected  {}\n", show(&s.counters.rejected));
    out += &format!("moves     {}\n", show(&s.counters.migrations));
    out
}
