//! The isolation stress test (issue 12, "Done means"): one user floods the server every way
//! she can at once, while another user's jobs run and her `mgpu_queue` keeps answering. Her
//! jobs all end COMPLETED with their whole output, and the server's peak memory stays under
//! [`RSS_BOUND_MIB`]. Runs as real unprivileged accounts (needs root; skipped otherwise).

mod common;

use std::time::{Duration, Instant};

use common::attack::{attack_helper_main, peak_rss_kib, Attacker};
use common::*;
use serde_json::Value;

/// The server's peak resident memory allowed under the flood. Measured: see the README's
/// security section (about 100 MiB for a debug build with 100k queued jobs); the bound leaves
/// room for a slower machine's scheduling, not for a reply built whole (50k jobs took 1.7 GB).
const RSS_BOUND_MIB: u64 = 256;

/// The attacker side (run by [`Attacker::start`]; does nothing otherwise).
#[test]
#[ignore]
fn attack_helper() {
    attack_helper_main();
}

fn acct(s: &Server, id: u64) -> Value {
    let out = s
        .cmd("mgpu_acct")
        .args(["--json", "-j", &id.to_string()])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["jobs"][0].clone()
}

/// A job printing numbered lines for about `secs` seconds; its log ends with `done N`.
fn chatty(secs: u32) -> String {
    numbered_lines_job(secs, 0, "0.005")
}

/// Her `mgpu_queue` answers (her own jobs; the whole queue is 100k rows).
fn her_queue_answers(s: &Server, b: &TestUser) {
    let out = s.cmd_as(b, "mgpu_queue").arg("--me").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn one_user_floods_while_another_works() {
    let Some((a, b)) = test_users() else { return };
    let t0 = Instant::now();
    // The chatty job's log is capped (64 MiB): the flood must not fill the disk.
    // Each job has at most 64 processes: the fork bomb below ends there.
    let s = Server::start("2x24GiB", &["--max-log-size", "64", "--job-pids-max", "64"]);
    let mut hers = vec![
        s.detached_as(&b, &["--mem", "1", "--", "bash", "-c", &chatty(40)]),
        s.detached_as(&b, &["--mem", "1", "--", "bash", "-c", &chatty(40)]),
    ];

    // 100k queued jobs: arrays of 10,000 tasks, one running at a time each, sharing a GPU.
    for _ in 0..10 {
        s.detached_as(
            &a,
            &["--array", "0-9999%1", "--mem", "1", "--", "sleep", "600"],
        );
    }
    eprintln!("{:?}: 100k jobs queued", t0.elapsed());
    // A chatty job (about 6 MB/s) followed by 20 connections that never read.
    let noisy = s.detached_as(
        &a,
        &[
            "--mem",
            "1",
            "--",
            "bash",
            "-c",
            "while :; do head -c 65536 /dev/zero | tr '\\0' x; sleep 0.01; done",
        ],
    );
    // A fork bomb, bounded by its cgroup's pids.max (its leader just sleeps: a bash that
    // cannot fork gives up and exits, which would end the job). Where this machine has no pids
    // controller (the server says so at start), a bounded flood of 300 processes instead.
    let bounded = mgpu_daemon::cgroup::layout().enforces(mgpu_daemon::cgroup::Controller::Pids);
    let bomb_script = if bounded {
        "f() { while :; do f & sleep 0.1; done; }; f & exec sleep 600"
    } else {
        eprintln!("no pids cgroup controller here: a bounded process flood instead of a fork bomb");
        "for i in $(seq 300); do sleep 600 & done; wait"
    };
    let bomb = s.detached_as(&a, &["--mem", "1", "--", "bash", "-c", bomb_script]);
    let followers = Attacker::start(&s, &a, &format!("follow-noread {noisy} 20"));
    let listings = Attacker::start(&s, &a, "queue-noread 20");
    let partial = Attacker::start(&s, &a, &format!("partial 16 {}", 4 << 20));
    eprintln!("{:?}: flood in place ({})", t0.elapsed(), partial.report);
    assert!(partial.report.contains("per user"), "{}", partial.report);

    // Her work goes on: two more jobs, and her queue answers throughout.
    hers.push(s.detached_as(&b, &["--mem", "1", "--", "bash", "-c", &chatty(10)]));
    hers.push(s.detached_as(&b, &["--mem", "1", "--", "bash", "-c", &chatty(10)]));
    let (mut answers, mut slowest) = (0, Duration::ZERO);
    while hers.iter().any(|&id| acct(&s, id).is_null()) {
        assert!(
            // (A liveness bound with room for a loaded machine.)
            t0.elapsed() < Duration::from_secs(300),
            "her jobs did not finish: {}",
            s.server_log()
        );
        let t = Instant::now();
        her_queue_answers(&s, &b);
        slowest = slowest.max(t.elapsed());
        answers += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "{:?}: her jobs finished ({answers} queue answers meanwhile, the slowest in {slowest:?})",
        t0.elapsed()
    );
    for &id in &hers {
        let rec = acct(&s, id);
        assert_eq!(rec["state"], "COMPLETED", "{rec}");
        assert_numbered_lines(&s.log(id), 0);
    }
    // The fork bomb ran all along, within its bound, and ends with its cancel.
    let bomb_now = acct(&s, bomb);
    assert!(
        bomb_now.is_null(),
        "the fork bomb ended by itself: {bomb_now}"
    );
    s.ok("mgpu_cancel", &[&bomb.to_string()]);
    wait_until(Duration::from_secs(120), || !acct(&s, bomb).is_null());
    assert_eq!(acct(&s, bomb)["state"], "CANCELLED");

    let rss = peak_rss_kib(s.pid()) >> 10;
    eprintln!("{:?}: server peak RSS {rss} MiB", t0.elapsed());
    drop((followers, listings, partial));
    assert!(
        rss < RSS_BOUND_MIB,
        "server peak RSS {rss} MiB, over {RSS_BOUND_MIB} MiB"
    );
    s.ok("mgpu_cancel", &["--user", &a.name]);
}
