//! Time limits and context switching with real processes and short limits.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Waits until job `id` was context-switched once and waits to run again.
fn wait_switched_out(s: &Server, id: u64) {
    wait_until(Duration::from_secs(60), || {
        s.job(id)
            .is_some_and(|j| j["state"] == "PENDING" && j["restarts"] == 1)
    });
}

#[test]
fn a_job_past_its_slice_is_switched_when_others_wait_and_runs_again_later() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.display().to_string();
    let long = s.detached(&[
        "-t",
        "1s",
        "--",
        "bash",
        "-c",
        &format!(
            "echo run-$MGPU_RESTART_COUNT >> {dir}/long; echo output-$MGPU_RESTART_COUNT; sleep 300"
        ),
    ]);
    s.wait_state(long, "RUNNING");
    // It runs until the test has seen it running.
    let waiting = s.detached(&[
        "--",
        "bash",
        "-c",
        &format!("while [ ! -e {dir}/go ]; do sleep 0.05; done"),
    ]);
    // The long job is preempted for the waiting one, and goes to the end of the queue.
    wait_switched_out(&s, long);
    assert_eq!(s.job(waiting).unwrap()["state"], "RUNNING");
    std::fs::write(s.scratch.join("go"), "").unwrap();
    // When the waiting job is done it runs again from its command, with MGPU_RESTART_COUNT.
    wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(s.scratch.join("long")).unwrap_or_default() == "run-0\nrun-1\n"
    });
    // (Its second run prints just after it writes that file.)
    wait_until(Duration::from_secs(60), || {
        s.log(long).ends_with("output-1\n")
    });
    let log = s.log(long);
    assert!(log.starts_with("output-0\n"), "{log}");
    assert!(
        log.contains("run 1"),
        "each run is marked in the log: {log}"
    );
    assert!(log.ends_with("output-1\n"), "{log}");
}

#[test]
fn a_job_past_its_slice_keeps_running_when_nobody_waits() {
    let s = Server::start("2x24GiB", &[]);
    let id = s.detached(&["-t", "1s", "--", "sleep", "300"]);
    s.wait_state(id, "RUNNING");
    std::thread::sleep(Duration::from_millis(2500));
    let job = s.job(id).unwrap();
    assert_eq!(job["state"], "RUNNING");
    assert_eq!(job["restarts"], 0);
    // The other GPU is free, so a new job does not need this one's: still no switch.
    let other = s.detached(&["--", "sleep", "300"]);
    s.wait_state(other, "RUNNING");
    assert_eq!(s.job(id).unwrap()["restarts"], 0);
}

#[test]
fn no_requeue_ends_as_timeout_and_global_cap_applies() {
    let s = Server::start("1x24GiB", &["--max-job-time", "1"]);
    let out = s
        .cmd("mgpu_srun")
        .args(["-t", "1:00:00", "--no-requeue", "--", "sleep", "30"])
        .output()
        .unwrap();
    // Capped at 1 s by --max-job-time; SIGTERM ended it.
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("TIMEOUT"),
        "{}",
        text(&out.stderr)
    );
    let rec = s
        .cmd("mgpu_acct")
        .args(["--json", "--state", "TIMEOUT"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&rec.stdout).unwrap();
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn grace_period_lets_a_job_save_and_a_job_ignoring_sigterm_is_killed() {
    // (Time enough to save on a loaded machine.)
    let s = Server::start("2x24GiB", &["--grace-period", "10"]);
    let saver = s.detached(&[
        "-t",
        "1s",
        "--no-requeue",
        "--",
        "bash",
        "-c",
        "trap 'echo saving; sleep 1; echo saved; exit 0' TERM; sleep 60 & wait",
    ]);
    let stubborn = s.detached(&[
        "-t",
        "1s",
        "--no-requeue",
        "--",
        "bash",
        "-c",
        "trap '' TERM; while true; do sleep 0.1; done",
    ]);
    s.wait_gone(saver);
    s.wait_gone(stubborn);
    let log = s.log(saver);
    assert_eq!(
        log, "saving\nsaved\n",
        "SIGTERM first, time to save within the grace period"
    );
    assert_eq!(s.acct(saver)["state"], "TIMEOUT");
    let st = s.acct(stubborn);
    assert_eq!(st["state"], "TIMEOUT");
    assert_eq!(st["signal"], 9, "killed after the grace period");
}

#[test]
fn escaped_processes_are_killed_too() {
    let s = Server::start("1x24GiB", &["--grace-period", "1"]);
    let pidfile = s.scratch.join("escaped.pid");
    // A command line of this test's own (pgrep looks at every process of the machine).
    let disowned = format!("sleep 301.{}", std::process::id());
    let id = s.detached(&[
        "-t",
        "1s",
        "--no-requeue",
        "--",
        "bash",
        "-c",
        &format!(
            "setsid sleep 300 & echo $! > {}; (bash -c '{disowned} & disown' &); sleep 300",
            pidfile.display()
        ),
    ]);
    wait_until(Duration::from_secs(60), || {
        pidfile.exists() && !std::fs::read_to_string(&pidfile).unwrap().is_empty()
    });
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    s.wait_gone(id);
    // (The same process: a pid may be reused, by something else.)
    let alive = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c == b"sleep\x00300\x00")
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z");
    assert!(!alive, "the escaped process {pid} survived its job");
    // No `sleep 301.N` (double-forked and disowned) is left either.
    let out = std::process::Command::new("pgrep")
        .args(["-f", &disowned])
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).trim().is_empty(),
        "double-forked process survived"
    );
}

#[test]
fn attached_srun_follows_a_job_across_a_switch_and_gets_the_final_exit_code() {
    let s = Server::start("1x24GiB", &[]);
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["-t", "1s", "--", "bash", "-c", "if [ $MGPU_RESTART_COUNT = 0 ]; then echo first; sleep 300; else echo second; exit 4; fi"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), || {
        s.queue_json()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["state"] == "RUNNING")
    });
    let other = s.detached(&["--", "sleep", "1"]);
    let mut out = String::new();
    srun.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    srun.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = srun.wait().unwrap();
    assert_eq!(out, "first\nsecond\n");
    assert!(
        err.contains("preempted") && err.contains("requeued"),
        "{err}"
    );
    assert_eq!(status.code(), Some(4));
    s.wait_gone(other);
}

#[test]
fn warning_signal_arrives_before_the_limit() {
    let s = Server::start("1x24GiB", &["--grace-period", "1"]);
    let id = s.detached(&[
        "-t",
        "3s",
        "--no-requeue",
        "--signal",
        "USR1@2",
        "--",
        "bash",
        "-c",
        "trap 'echo warned' USR1; for i in $(seq 100); do sleep 0.1; done",
    ]);
    s.wait_gone(id);
    let log = s.log(id);
    assert!(log.contains("warned"), "{log}");
    assert_eq!(s.acct(id)["state"], "TIMEOUT");
}

/// `-t 0` is no limit (as in Slurm), not a zero slice: two such jobs on one GPU do not switch
/// places over and over; the first runs on, the second waits.
#[test]
fn a_zero_time_limit_is_no_limit() {
    let s = Server::start("1x24GiB", &[]);
    let first = s.detached(&["-t", "0", "--", "sleep", "300"]);
    s.wait_state(first, "RUNNING");
    let second = s.detached(&["-t", "0", "--", "sleep", "300"]);
    std::thread::sleep(Duration::from_millis(3000));
    let job = s.job(first).unwrap();
    assert_eq!(
        (job["state"].as_str(), job["restarts"].as_u64()),
        (Some("RUNNING"), Some(0)),
        "{job}"
    );
    assert!(job["time_limit_s"].is_null(), "{job}");
    let waiting = s.job(second).unwrap();
    assert_eq!(waiting["state"], "PENDING");
    assert_eq!(waiting["restarts"], 0);
}

/// However short its limit, a job runs `--min-slice` before it is switched for a waiting job.
#[test]
fn a_job_runs_the_minimum_slice_before_it_is_switched() {
    let s = Server::start("1x24GiB", &["--min-slice", "10"]);
    // (The job cannot have started before this.)
    let submitted = std::time::Instant::now();
    let long = s.detached(&["-t", "1s", "--", "sleep", "300"]);
    s.wait_state(long, "RUNNING");
    let waiting = s.detached(&["--", "sleep", "300"]);
    std::thread::sleep(Duration::from_millis(2500));
    let job = s.job(long).unwrap();
    // Only a look within the minimum slice says anything (a loaded machine may look later).
    if submitted.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            (job["state"].as_str(), job["restarts"].as_u64()),
            (Some("RUNNING"), Some(0)),
            "switched before its minimum slice: {job}"
        );
    }
    // Once it has run its minimum slice, it is switched (its timer fires; no other event).
    wait_until(Duration::from_secs(60), || {
        s.job(long).is_some_and(|j| j["restarts"] == 1)
    });
    s.wait_state(waiting, "RUNNING");
}

/// The output kept per job counts all its runs: a run after a context switch continues its
/// job's budget rather than getting a fresh one.
#[test]
fn a_requeued_run_continues_its_jobs_log_budget() {
    let s = Server::start("1x24GiB", &["--max-log-size", "1", "--min-slice", "1"]);
    let dir = s.scratch.display().to_string();
    let chatty = format!(
        "echo run-$MGPU_RESTART_COUNT >> {dir}/chatty; head -c 700000 /dev/zero | tr '\\0' x; \
         touch {dir}/wrote-$MGPU_RESTART_COUNT; sleep 300"
    );
    let long = s.detached(&["-t", "1s", "--", "bash", "-c", &chatty]);
    s.wait_state(long, "RUNNING");
    // Switched only once its first run wrote all it writes.
    wait_until(Duration::from_secs(120), || {
        s.scratch.join("wrote-0").exists()
    });
    let waiting = s.detached(&["--", "bash", "-c", "sleep 1"]);
    wait_until(Duration::from_secs(120), || {
        std::fs::read_to_string(s.scratch.join("chatty")).unwrap_or_default() == "run-0\nrun-1\n"
    });
    s.wait_gone(waiting);
    wait_until(Duration::from_secs(60), || {
        s.log(long).contains("log size limit per job")
    });
    let log = s.log(long);
    assert!(log.len() < (1 << 20) + 300, "{}", log.len());
    assert!(log.contains("run 1"), "the second run wrote to the log too");
}

/// Restarts are visible and paid for: the queue has a RESTARTS column, the attached srun and
/// the log say so at each switch, `mgpu_acct` counts the restarts and the GPU time of every
/// run; the server's `--max-restarts` ends a job without its own cap as TIMEOUT once used up.
#[test]
fn restarts_are_shown_counted_and_capped_by_the_server_default() {
    let s = Server::start("1x24GiB", &["--max-restarts", "1"]);
    let dir = s.scratch.display().to_string();
    let mut srun = s
        .cmd("mgpu_srun")
        .args([
            "-t",
            "1s",
            "--",
            "bash",
            "-c",
            "echo run-$MGPU_RESTART_COUNT; sleep 300",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let running = || {
        s.queue_json()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == "RUNNING")
            .map(|j| j["id"].as_u64().unwrap())
    };
    wait_until(Duration::from_secs(60), || running().is_some());
    let id = running().unwrap();
    // A waiting job that runs until we let it go.
    let gate = |name: &str| format!("while [ ! -e {dir}/{name} ]; do sleep 0.1; done");
    let first = s.detached(&["--", "bash", "-c", &gate("go1")]);
    wait_switched_out(&s, id);
    s.wait_state(first, "RUNNING");
    // The queue's table shows the restart.
    let out = s.cmd("mgpu_queue").output().unwrap();
    let table = text(&out.stdout);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let col = header.iter().position(|c| *c == "RESTARTS").expect(&table);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .expect(&table)
        .split_whitespace()
        .collect();
    assert_eq!(row[col], "1", "{table}");
    // Another waiting job, then the first one goes: the job runs again, and at its limit
    // (restarts used up) it ends as TIMEOUT instead of being switched again.
    let second = s.detached(&["--", "bash", "-c", &gate("go2")]);
    std::fs::write(s.scratch.join("go1"), "").unwrap();
    let mut err = String::new();
    srun.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let mut out = String::new();
    srun.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    srun.wait().unwrap();
    assert_eq!(out, "run-0\nrun-1\n");
    assert!(
        err.contains("preempted and requeued") && err.contains("TIMEOUT"),
        "{err}"
    );
    assert!(s.log(id).contains("run 1 (after 1 context switch)"));
    let rec = s.acct(id);
    assert_eq!(rec["state"], "TIMEOUT");
    assert_eq!(rec["restarts"], 1);
    // Both runs (each at least 1 s) count.
    let (last, total) = (
        rec["elapsed_s"].as_u64().unwrap(),
        rec["total_elapsed_s"].as_u64().unwrap(),
    );
    assert!(last >= 1 && total > last, "{rec}");
    let gpu_h = rec["gpu_hours"].as_f64().unwrap();
    // (GPU-hours count ms; the seconds shown are rounded down.)
    let counted_s = gpu_h * 3600.0;
    assert!(
        counted_s >= total as f64 && counted_s < total as f64 + 1.0,
        "{rec}"
    );
    std::fs::write(s.scratch.join("go2"), "").unwrap();
    s.wait_gone(second);
}

/// A job switched at the end of its slice goes behind every job waiting then, and stays there
/// across a server restart (its key floor is recorded with the requeue): restored by its own
/// key, its short limit would put it first again.
#[test]
fn a_switched_job_stays_behind_the_waiting_ones_across_a_restart() {
    let mut s = Server::start("1x24GiB", &[]);
    let short = s.detached(&["-t", "1s", "--", "sleep", "300"]);
    s.wait_state(short, "RUNNING");
    // Held until both are in: nobody waits for the GPU before both do.
    let first = s.detached(&["--hold", "--", "sleep", "120"]);
    let second = s.detached(&["--hold", "--", "sleep", "120"]);
    s.ok("mgpu_control", &["release", &format!("{first},{second}")]);
    wait_switched_out(&s, short);
    s.wait_state(first, "RUNNING");
    assert_eq!(s.pending_order(), vec![second, short]);
    s.restart();
    assert_eq!(s.job(first).unwrap()["state"], "RUNNING");
    assert_eq!(s.pending_order(), vec![second, short]);
    for id in [short, second, first] {
        s.ok("mgpu_cancel", &[&id.to_string()]);
    }
}

/// Found by a review: a job that ran, was switched out and was cancelled while waiting to run
/// again was accounted as "cancelled before it started".
#[test]
fn a_switched_job_cancelled_while_waiting_says_it_ran() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.display().to_string();
    let long = s.detached(&["-t", "1s", "--", "sleep", "300"]);
    s.wait_state(long, "RUNNING");
    let waiting = s.detached(&[
        "--",
        "bash",
        "-c",
        &format!("while [ ! -e {dir}/go ]; do sleep 0.05; done"),
    ]);
    wait_switched_out(&s, long);
    s.ok("mgpu_cancel", &[&long.to_string()]);
    std::fs::write(s.scratch.join("go"), "").unwrap();
    s.wait_gone(waiting);
    let acct = s.acct(long);
    assert_eq!(acct["state"], "CANCELLED");
    let message = acct["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("while waiting to run again") && message.contains("1 time"),
        "{acct}"
    );
    assert_eq!(acct["restarts"], 1, "{acct}");
    assert!(acct["gpu_hours"].as_f64().unwrap() > 0.0, "{acct}");
}
