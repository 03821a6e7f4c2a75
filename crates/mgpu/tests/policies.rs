//! Scheduling policies from the real binaries: backfill around a reservation, fair-share order,
//! and what `mgpu_queue` says about waiting jobs.

mod common;

use common::*;

#[test]
fn backfill_reserves_for_the_big_job_and_fills_around_it() {
    // Plain EASY backfilling: the blocked job is reserved for at once.
    let s = Server::start(
        "2x24GiB",
        &[
            "--policy",
            "backfill",
            "--reserve-after",
            "0",
            "--reserve-after-wait-factor",
            "0",
        ],
    );
    let a = s.detached(&["-t", "60s", "--", "sleep", "300"]);
    s.wait_state(a, "RUNNING");
    let big = s.detached(&["--gpus", "2", "-t", "60s", "--", "true"]);
    let long = s.detached(&["-t", "1000s", "--", "sleep", "300"]);
    // It would fit on the free GPU, but would still run when the big job is due.
    assert_eq!(s.job(long).unwrap()["reason"], "Reservation");
    // (Its limit leaves a slow machine time to look before it passes it and is switched.)
    let short = s.detached(&["-t", "20s", "--", "sleep", "300"]);
    // The short job fits before the reservation; the long one would delay the big job.
    s.wait_state(short, "RUNNING");
    let q = s.queue_json();
    let job = |id: u64| {
        q["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(job(big)["state"], "PENDING");
    assert!(
        job(big)["est_start"].as_str().is_some(),
        "the reserved job has an estimated start"
    );
    assert_eq!(job(long)["state"], "PENDING");
    assert_eq!(job(long)["reason"], "Priority");
    assert!(job(long)["priority"].is_number());
    let table = text(&s.cmd("mgpu_queue").output().unwrap().stdout);
    assert!(
        table.contains("start by") && table.contains("policy: backfill"),
        "{table}"
    );
}

#[test]
fn fair_share_puts_a_light_user_before_a_heavy_one() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start(
        "1x24GiB",
        &[
            "--policy",
            "fair",
            "--reserve-after",
            "0",
            "--reserve-after-wait-factor",
            "0",
        ],
    );
    // a uses the GPU for a while (until the test lets her job go) and queues more; b arrives
    // later with one job.
    let go = s.scratch.join("go");
    let first = {
        let mut c = s.cmd_as(&a, "mgpu_srun");
        c.args(["--detach", "--parsable", "--", "bash", "-c"])
            .arg(format!(
                "while [ ! -e {} ]; do sleep 0.05; done",
                go.display()
            ));
        s.submit(c)
    };
    s.wait_state(first, "RUNNING");
    let a_more: Vec<u64> = (0..3)
        .map(|_| {
            let mut c = s.cmd_as(&a, "mgpu_srun");
            c.args(["--detach", "--parsable", "--", "sleep", "2"]);
            s.submit(c)
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let b_job = {
        let mut c = s.cmd_as(&b, "mgpu_srun");
        c.args(["--detach", "--parsable", "--", "sleep", "300"]);
        s.submit(c)
    };
    // b has used nothing: its job goes ahead of a's waiting ones.
    let order = s.pending_order();
    assert_eq!(order[0], b_job, "{order:?}");
    assert_eq!(&order[1..], &a_more[..], "FIFO within one user");
    std::fs::write(&go, "").unwrap();
    // a's first waiting job already holds the reservation (a reservation is kept, so nobody
    // starves); b's job runs right after it, before a's others.
    s.wait_state(b_job, "RUNNING");
    assert_eq!(s.job(a_more[1]).unwrap()["state"], "PENDING");
    assert_eq!(s.job(a_more[2]).unwrap()["state"], "PENDING");
}

#[test]
fn only_root_may_raise_priority() {
    let Some((a, _)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--nice", "-5", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "only root");
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--nice", "5", "--no-venv", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A waiting job's expected run time and where it comes from, in `mgpu_queue --json`,
/// `mgpu_queue -l` and `mgpu_control show job`: its time limit; the server's default while its
/// user has no history; then the mean of the user's finished runs (of the same name, else of
/// any name) once they agree.
#[test]
fn a_waiting_jobs_estimate_says_where_it_comes_from() {
    let s = Server::start("1x24GiB", &[]);
    let entry = |id: u64| s.job(id).unwrap();
    let show = |id: u64| s.ok("mgpu_control", &["show", "job", &id.to_string()]);
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let fresh = s.detached(&["-J", "est", "--", "true"]);
    let limited = s.detached(&["-t", "5:00", "--", "true"]);
    let j = entry(fresh);
    assert_eq!(j["estimate_source"], "default", "{j}");
    assert_eq!(j["estimate_s"], 86400, "{j}");
    assert!(j["estimate_runs"].is_null(), "{j}");
    let shown = show(fresh);
    assert!(shown.contains("Estimate=1-00:00:00"), "{shown}");
    assert!(shown.contains("EstimateFrom=ServerDefault"), "{shown}");
    // Fewer than 16 finished runs on this server: no typical run yet, the order counts 24 h.
    assert!(shown.contains("OrderedAs=1-00:00:00"), "{shown}");
    let j = entry(limited);
    assert_eq!(j["estimate_source"], "time_limit", "{j}");
    assert_eq!(j["estimate_s"], 300, "{j}");
    let shown = show(limited);
    assert!(shown.contains("EstimateFrom=TimeLimit"), "{shown}");
    // No finished runs with a limit yet: the limit is not scaled.
    assert!(shown.contains("OrderedAs=5:00"), "{shown}");
    let long = s.ok("mgpu_queue", &["-l"]);
    assert!(
        long.contains("Estimate=5:00 EstimateFrom=TimeLimit"),
        "{long}"
    );
    for id in [fresh, limited, blocker] {
        s.ok("mgpu_cancel", &[&id.to_string()]);
    }
    // Two finished runs of `est` that agree (about 1 s each; cancelled runs teach nothing).
    for _ in 0..2 {
        let id = s.detached(&["-J", "est", "--", "sleep", "1"]);
        assert_eq!(s.acct(id)["state"], "COMPLETED");
    }
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let same = s.detached(&["-J", "est", "--", "true"]);
    let other = s.detached(&["-J", "other", "--", "true"]);
    let j = entry(same);
    assert_eq!(j["estimate_source"], "learned", "{j}");
    assert_eq!(j["estimate_runs"], 2, "{j}");
    assert_eq!(j["estimate_same_name"], true, "{j}");
    let secs = j["estimate_s"].as_u64().unwrap();
    assert!((1..=60).contains(&secs), "{j}");
    let shown = show(same);
    assert!(
        shown.contains("EstimateFrom=UserHistory(2 runs named est)"),
        "{shown}"
    );
    let j = entry(other);
    assert_eq!(j["estimate_source"], "learned", "{j}");
    assert_eq!(j["estimate_same_name"], false, "{j}");
    assert!(show(other).contains("EstimateFrom=UserHistory(2 runs, any name)"));
    for id in [same, other, blocker] {
        s.ok("mgpu_cancel", &[&id.to_string()]);
    }
}
