//! Property tests: random input sequences for the core, random small scenarios for the
//! simulator. Case counts are small so the suite stays fast.

use balancer::sim::engine::{simulate, SimConfig, SimPolicy};
use balancer::sim::workload::{Job, NodeSpec, Scenario, ScenarioSpec, WorkloadKind};
use balancer::{
    Action, Config, Input, LoadEntry, MigrationReason, Node, Params, PolicyKind, ProcessInfo, Time,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;

#[derive(Clone, Debug)]
enum Op {
    Tick,
    Sample(u32, u64),
    Gossip(u32, f32, u16, u32),
    Start(u64, u32, u32, u64, bool),
    End(u64),
    Lock(u64, bool),
    Reply(u32, u64, bool),
    Request(u32, u64, u32, f32),
    Manual(u64, u32),
    Done(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Tick),
        2 => (0u32..20, 0u64..20_000).prop_map(|(r, m)| Op::Sample(r, m)),
        3 => (0u32..6, 0f32..4.0, 1u16..8, 0u32..16_000).prop_map(|(n, l, c, f)| Op::Gossip(n, l, c, f)),
        3 => (0u64..12, 0u32..6, 1u32..4096, 0u64..100_000, any::<bool>()).prop_map(|(p, h, m, a, l)| Op::Start(p, h, m, a, l)),
        1 => (0u64..12).prop_map(Op::End),
        1 => (0u64..12, any::<bool>()).prop_map(|(p, l)| Op::Lock(p, l)),
        2 => (0u32..6, 0u64..12, any::<bool>()).prop_map(|(n, p, a)| Op::Reply(n, p, a)),
        1 => (0u32..6, 0u64..12, 1u32..4096, 0f32..5.0).prop_map(|(n, p, m, l)| Op::Request(n, p, m, l)),
        1 => (0u64..12, 0u32..6).prop_map(|(p, n)| Op::Manual(p, n)),
        1 => (0u64..12).prop_map(Op::Done),
    ]
}

fn to_input(op: &Op) -> Input {
    match *op {
        Op::Tick => Input::Tick,
        Op::Sample(r, m) => Input::LoadSample {
            runnable: f64::from(r),
            used_mem_mb: m,
        },
        Op::Gossip(n, l, c, f) => Input::Gossip {
            from: n,
            entries: vec![LoadEntry {
                node: n,
                load: l,
                cpus: f32::from(c),
                speed: 1.0,
                free_mem_mb: f,
                total_mem_mb: 16_000,
                age_ms: 10,
            }],
        },
        Op::Start(p, h, m, a, l) => {
            let mut i = ProcessInfo::new(p, h, m);
            i.age_ms = a;
            i.cpu_work = a as f64 / 2000.0;
            i.locked = l;
            Input::ProcessStarted(i)
        }
        Op::End(p) => Input::ProcessEnded { pid: p },
        Op::Lock(p, l) => Input::SetLock { pid: p, locked: l },
        Op::Reply(n, p, a) => Input::MigrationReply {
            from: n,
            pid: p,
            accepted: a,
        },
        Op::Request(n, p, m, l) => Input::MigrationRequest {
            from: n,
            pid: p,
            mem_mb: m,
            from_rate: l,
            reason: MigrationReason::Balance,
        },
        Op::Manual(p, n) => Input::ManualMigrate { pid: p, to: n },
        Op::Done(p) => Input::MigrationDone { pid: p, to: 1 },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// No automatic action moves a locked process; nothing is sent to or migrated onto the
    /// node itself; at most one gossip message per tick; only resident processes move.
    #[test]
    fn core_never_moves_locked_or_to_itself(
        ops in proptest::collection::vec(op(), 1..120),
        oc in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let me = 0u32;
        let mut cfg = Config::new(me, 2.0, 1.0, 8192);
        cfg.policy = if oc { PolicyKind::OpportunityCost } else { PolicyKind::Mosix };
        cfg.params.min_age_secs = 0.0;
        let mut n = Node::new(cfg);
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        for peer in 0..6 {
            n.handle(Input::NodeJoined { node: peer }, Time::ZERO, &mut r);
        }
        let mut t = 0u64;
        for o in &ops {
            t += 250_000;
            let locked: BTreeSet<u64> = n.processes().filter(|p| p.info.locked).map(|p| p.info.pid).collect();
            let resident: BTreeSet<u64> = n.processes().map(|p| p.info.pid).collect();
            let manual = matches!(o, Op::Manual(..));
            let acts = n.handle(to_input(o), Time(t), &mut r);
            let mut gossips = 0;
            for a in &acts {
                match a {
                    Action::SendGossip { to, .. } => { gossips += 1; prop_assert_ne!(*to, me); }
                    Action::SendMigrationRequest { to, pid, .. } => {
                        prop_assert_ne!(*to, me);
                        prop_assert!(!locked.contains(pid), "request for locked {pid}");
                        prop_assert!(resident.contains(pid));
                    }
                    Action::Migrate { to, pid, reason } => {
                        prop_assert_ne!(*to, me);
                        prop_assert!(resident.contains(pid));
                        if *reason != MigrationReason::Manual {
                            prop_assert!(!locked.contains(pid), "auto migration of locked {pid}");
                        } else {
                            prop_assert!(manual);
                        }
                    }
                    Action::SendMigrationReply { to, .. } => prop_assert_ne!(*to, me),
                    _ => {}
                }
            }
            prop_assert!(gossips <= 1);
        }
    }

    /// Processes are conserved by every policy: each is at all times on exactly one node, in
    /// transit, or done, and with a long enough drain all complete.
    #[test]
    fn simulator_conserves_processes(
        nodes in proptest::collection::vec((1u32..5, 0.5f64..2.0, 512u64..4096), 2..6),
        jobs in proptest::collection::vec((0f64..60.0, 0usize..6, 0.1f64..30.0, 8u32..600, 0f64..1.0), 0..40),
        policy in proptest::sample::select(SimPolicy::ALL.to_vec()),
        seed in any::<u64>(),
    ) {
        let specs: Vec<NodeSpec> = nodes.iter().map(|&(c, s, m)| NodeSpec { cpus: c, speed: s, mem_mb: m, joins_at: 0.0 }).collect();
        let mut js: Vec<Job> = jobs.iter().map(|&(a, h, w, m, f)| Job {
            arrival: a, home: (h % specs.len()) as u32, work: w, mem_mb: m, home_fraction: f,
        }).collect();
        js.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
        let sc = Scenario { nodes: specs, jobs: js };
        let cfg = SimConfig {
            spec: ScenarioSpec { kind: WorkloadKind::Pareto, nodes: sc.nodes.len() as u32, duration: 60.0, load: 0.5, mean_work: 10.0, pareto_ratio: 100.0, home_bound: 0.2, uniform_arrivals: false, max_cpus: 8, seed },
            policy,
            params: Params::default(),
            swim: false,
            latency: 0.001,
            stats_every: 5.0,
            drain: 100_000.0,
            herd_window: 5.0,
            sample_every: 10.0,
            thrash: 10.0,
            check_invariants: true,
        };
        let st = simulate(&cfg, &sc);
        prop_assert_eq!(st.invariant_violations, 0);
        prop_assert_eq!(st.completed, sc.jobs.len() as u64);
        prop_assert_eq!(st.unfinished, 0);
    }
}
