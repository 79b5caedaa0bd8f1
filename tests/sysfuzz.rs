//! A guest throwing random system calls with wild arguments at its VMM (`images/src/sysfuzz.c`:
//! random numbers, wild and kernel pointers, huge lengths, nested structs pointing anywhere).
//! The VMM must survive every one of them and answer each with a result Linux could give: a
//! value or an errno Linux defines. The same calls are made natively beside it, and the share
//! of identical results is reported (not asserted: a call mosvm does not implement yet changes
//! the state later calls see).

#[macro_use]
mod common;

use std::time::Duration;

use common::{Case, VARIANTS};

const CALLS: usize = 3000;

/// Highest errno Linux defines (EHWPOISON).
const MAX_ERRNO: i64 = 133;

fn results(out: &str, who: &str) -> Vec<(u64, i64)> {
    let mut lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.pop(),
        Some(format!("survived {CALLS} calls").as_str()),
        "{who}: the run did not finish its calls"
    );
    lines
        .iter()
        .map(|l| {
            let (nr, r) = l.split_once(' ').expect("nr result");
            (nr.parse().expect("nr"), r.parse().expect("result"))
        })
        .collect()
}

fn survive(variant: &str, seed: u32) {
    require_kvm!();
    let case = Case::image(variant, "sysfuzz")
        .args([seed.to_string(), CALLS.to_string()])
        .timeout(Duration::from_secs(300));
    let native = case.run_native();
    assert_eq!(
        native.status.code(),
        Some(0),
        "native: {}",
        native.stderr_text()
    );
    let guest = case.run_mosvm();
    let err = guest.stderr_text();
    assert!(!err.contains("panicked"), "the VMM panicked:\n{err}");
    assert_eq!(
        guest.status.code(),
        Some(0),
        "mosvm run: {:?}\n{err}",
        guest.status
    );
    let want = results(&native.stdout_text(), "native");
    let got = results(&guest.stdout_text(), "mosvm");
    assert_eq!(got.len(), CALLS);
    for (i, &(nr, r)) in got.iter().enumerate() {
        assert_eq!(nr, want[i].0, "call {i}: the runs drew different calls");
        assert!(
            r >= 0 || (-MAX_ERRNO..=-1).contains(&r),
            "call {i}: syscall {nr} returned {r}, not a value or an errno Linux defines"
        );
    }
    let same = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| g.1.signum() == w.1.signum() && (g.1 >= 0 || g.1 == w.1))
        .count();
    eprintln!("sysfuzz {variant} seed {seed}: {same}/{CALLS} results identical to native in kind");
}

#[test]
fn glibc_static_seeds() {
    for seed in 1..=3 {
        survive(VARIANTS[0], seed);
    }
}

#[test]
fn musl_static_seeds() {
    for seed in 11..=12 {
        survive(VARIANTS[1], seed);
    }
}

#[test]
fn dynamic_seed() {
    survive(VARIANTS[2], 21);
}
