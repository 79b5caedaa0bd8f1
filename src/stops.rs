//! A process stopped at home while it runs on another node. At home, a stop (SIGSTOP, or
//! SIGTSTP, SIGTTIN or SIGTTOU at their default action) stops the process's `mosvm run`, as
//! the kernel stops any process, and its parent (a shell) sees it stopped; the guest itself
//! runs in a guest host elsewhere, which nobody stopped. The home node looks at its
//! processes' state every [`LOOK_EVERY`] and tells the host ([`Body::Stopped`]), which stops
//! or continues the guest host with SIGSTOP and SIGCONT. The guest's own SIGCONT comes from
//! home over the link, as every signal sent to it does.

use crate::gossip::{self, Body};
use crate::node::Shared;
use std::time::{Duration, Instant};

/// How often the home node looks.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(100);
/// A stop is told again this often while it holds (a datagram may be lost)...
const RETELL: Duration = Duration::from_secs(1);
/// ...and a continue for this long after it.
const RETELL_CONTINUE: Duration = Duration::from_secs(3);

/// Whether process `pid` is stopped (`T`, or `t` under a tracer), from /proc/PID/stat.
pub(crate) fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|st| st == "T" || st == "t")
}

/// What the home node told about one process's stops.
pub(crate) struct StopWatch {
    /// Last state told (None: nothing yet).
    told: Option<bool>,
    generation: u64,
    sent: Instant,
    changed: Instant,
}

impl StopWatch {
    pub(crate) fn new() -> StopWatch {
        StopWatch {
            told: None,
            generation: 0,
            sent: Instant::now(),
            changed: Instant::now(),
        }
    }

    /// Look at registered process `pid`: `mosvm ps` says "stopped" while it is; when it runs
    /// away, its host is told of each change, and again while it holds.
    pub(crate) fn look(&mut self, shared: &Shared, pid: u32) {
        let stopped = is_stopped(pid);
        let mut st = shared.lock().expect("state lock");
        let st = &mut *st;
        let here = &st.name;
        let Some(p) = st.procs.get_mut(&pid) else {
            return;
        };
        match (stopped, p.info.state.as_str()) {
            (true, "running") => p.info.state = "stopped".into(),
            (false, "stopped") => p.info.state = "running".into(),
            _ => {}
        }
        if p.info.node == *here {
            self.told = None;
            return;
        }
        let host = gossip::node_id(&p.info.node);
        let changed = match self.told {
            None => stopped,
            Some(t) => t != stopped,
        };
        if changed {
            self.generation += 1;
            self.told = Some(stopped);
            self.changed = Instant::now();
        } else if self.told.is_none()
            || self.sent.elapsed() < RETELL
            || (!stopped && self.changed.elapsed() > RETELL_CONTINUE)
        {
            return;
        }
        self.sent = Instant::now();
        if let Some(tx) = &st.balancer {
            let body = Body::Stopped {
                pid: gossip::cluster_pid(gossip::node_id(here), pid),
                stopped,
                generation: self.generation,
            };
            let _ = tx.send(crate::balance::Event::Send { to: host, body });
        }
        if changed {
            tracing::info!(
                pid,
                node = p.info.node,
                "process {} at home: telling its host",
                if stopped { "stopped" } else { "continued" }
            );
        }
    }
}
