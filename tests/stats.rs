//! `mosvm run --stats` wherever the process runs: one line per move (`mosvm-migration`, from
//! whichever host made it) and one line when it ends (`{"exits":...}`, from wherever it ends),
//! all on the user's stderr at home.

#[macro_use]
mod common;

use common::cluster::{client, keygen, loopback_cluster, wait_registered};
use common::Case;

/// Runs the threaded ticker with `--stats`, moves it to each of `stops` in turn, and returns
/// its stderr once it ended.
fn stats_lines(stops: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let nodes = loopback_cluster(dir.path(), &["home", "b", "c"], &[&key, &key, &key]);
    let run = Case::image("dynamic", "mtticker")
        .args(["400", "2000000", "16"])
        .socket(&nodes[0].sock)
        .mosvm_flag("--stats")
        .spawn_mosvm();
    wait_registered(&nodes[0].sock, run.pid());
    // Its threads are started (a move while they are being made can fail: README, limits).
    std::thread::sleep(std::time::Duration::from_millis(300));
    for to in stops {
        let m = client(
            &nodes[0].sock,
            &["migrate", &run.pid().to_string(), to, "--wait"],
        );
        let err = String::from_utf8_lossy(&m.stderr);
        assert!(m.status.success(), "the move to {to}: {err}");
    }
    let got = run.finish();
    assert_eq!(got.shell_status(), 0, "{}", got.stderr_text());
    got.stderr_text()
}

fn count(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

#[test]
fn stats_of_moves_and_of_the_end_reach_home_from_every_host() {
    require_kvm!();
    // Ends away: the move home made, one made by b, and the end on c.
    let err = stats_lines(&["b", "c"]);
    assert_eq!(count(&err, "mosvm-migration {"), 2, "{err}");
    assert_eq!(count(&err, "{\"exits\":"), 1, "{err}");
    // Comes home: the move made by c arrives with the process.
    let err = stats_lines(&["c", "home"]);
    assert_eq!(count(&err, "mosvm-migration {"), 2, "{err}");
    assert_eq!(count(&err, "{\"exits\":"), 1, "{err}");
}
