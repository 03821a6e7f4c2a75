//! Durability: `kill -9` of the server with pending, running and attached jobs loses nothing
//! and runs nothing twice; accounting records every end.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

use common::*;

fn runs(s: &Server, name: &str) -> usize {
    std::fs::read_to_string(s.scratch.join(name))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn kill_9_loses_no_job_and_runs_none_twice() {
    let mut s = Server::start("2x24GiB", &[]);
    let dir = s.scratch.display().to_string();
    let mut attached = s
        .cmd("mgpu_srun")
        .args(["-J", "attached", "--", "bash", "-c"])
        // It prints while the server is down (a.go), then once its client is back (b.go).
        .arg(format!("echo run >> {dir}/a.runs; echo before; while [ ! -e {dir}/a.go ]; do sleep 0.05; done; \
                      echo after; echo err-after >&2; touch {dir}/a.ended; \
                      while [ ! -e {dir}/b.go ]; do sleep 0.05; done; echo live-out; echo live-err >&2; exit 5"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(attached.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "before\n");
    let quick = s.submit({
        let mut c = s.cmd("mgpu_srun");
        c.args(["--detach", "--parsable", "--", "bash", "-c"])
            .arg(format!("echo run >> {dir}/q.runs; while [ ! -e {dir}/q.go ]; do sleep 0.05; done; touch {dir}/q.ended; exit 3"));
        c
    });
    let pending: Vec<u64> = (0..3)
        .map(|i| {
            s.submit({
                let mut c = s.cmd("mgpu_srun");
                c.args(["--detach", "--parsable", "--", "bash", "-c"])
                    .arg(format!("echo run >> {dir}/p{i}.runs"));
                c
            })
        })
        .collect();
    s.wait_state(quick, "RUNNING");
    let order = s.pending_order();
    assert_eq!(order, pending);

    s.kill9();
    // The quick job ends, and the attached one goes on, while no server runs.
    for go in ["q.go", "a.go"] {
        std::fs::write(s.scratch.join(go), "").unwrap();
    }
    wait_until(Duration::from_secs(60), || {
        s.scratch.join("q.ended").exists() && s.scratch.join("a.ended").exists()
    });
    s.restart();

    // The attached client reconnected and gets the rest of the output and the real exit code.
    // What the job printed while no server ran comes from the log, all on stdout (README); or,
    // if its supervisor had not passed it on yet, as it came.
    let mut stdout = String::new();
    while !stdout.lines().any(|l| l == "after") {
        assert_ne!(out.read_line(&mut stdout).unwrap(), 0, "{stdout}");
    }
    // The client is following the job again: what it prints now streams as it comes.
    std::fs::write(s.scratch.join("b.go"), "").unwrap();
    out.read_to_string(&mut stdout).unwrap();
    let mut err = String::new();
    attached
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = attached.wait().unwrap();
    assert!(stdout.ends_with("live-out\n"), "{stdout}");
    assert_eq!(
        stdout.matches("after").count() - stdout.matches("err-after").count(),
        1
    );
    assert_eq!(
        stdout.matches("err-after").count() + err.matches("err-after").count(),
        1,
        "{stdout}\n{err}"
    );
    assert!(err.contains("live-err"), "stderr stays stderr: {err}");
    assert!(!stdout.contains("live-err"), "{stdout}");
    assert!(err.contains("reconnect"), "{err}");
    assert_eq!(status.code(), Some(5));

    for id in &pending {
        s.wait_gone(*id);
    }
    // Nothing ran twice, nothing was lost.
    for name in ["a.runs", "q.runs", "p0.runs", "p1.runs", "p2.runs"] {
        assert_eq!(runs(&s, name), 1, "{name}");
    }
    let q = s.acct(quick);
    assert_eq!(q["state"], "FAILED");
    assert_eq!(
        q["exit_code"], 3,
        "the real exit status, recorded while the server was down"
    );
    for id in &pending {
        assert_eq!(s.acct(*id)["state"], "COMPLETED");
    }
    let next = s.detached(&["--", "true"]);
    assert!(
        next > *pending.last().unwrap(),
        "ids continue after a crash"
    );
}

#[test]
fn a_running_job_is_re_adopted_and_can_still_be_cancelled() {
    let mut s = Server::start("1x24GiB", &[]);
    let id = s.detached(&["--", "bash", "-c", "echo first; sleep 300"]);
    let waiting = s.detached(&["--", "true"]);
    s.wait_state(id, "RUNNING");
    s.kill9();
    s.restart();
    let job = s.job(id).expect("re-adopted");
    assert_eq!(job["state"], "RUNNING");
    // Its GPU is booked again: the waiting job did not start on it.
    assert_eq!(s.job(waiting).unwrap()["state"], "PENDING");
    assert!(s
        .cmd("mgpu_cancel")
        .arg(id.to_string())
        .status()
        .unwrap()
        .success());
    s.wait_gone(id);
    s.wait_gone(waiting);
    assert_eq!(s.acct(id)["state"], "CANCELLED");
    assert_eq!(s.log(id), "first\n");
}

#[test]
fn accounting_lists_finished_jobs_with_filters() {
    let s = Server::start("1x24GiB", &[]);
    let ok = s.detached(&["-J", "good", "--gpus", "1", "--", "true"]);
    let bad = s.detached(&["-J", "bad", "--mem", "100", "--", "false"]);
    s.wait_gone(ok);
    s.wait_gone(bad);
    let good = s.acct(ok);
    assert_eq!(good["state"], "COMPLETED");
    assert_eq!(good["exit_code"], 0);
    assert_eq!(good["gpus"], 1);
    assert!(good["ended_at"].as_str().unwrap().contains('T'));
    assert!(good["gpu_hours"].as_f64().unwrap() >= 0.0);
    let failed = s
        .cmd("mgpu_acct")
        .args(["--json", "--state", "FAILED"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
    let ids: Vec<u64> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![bad]);
    let table = text(
        &s.cmd("mgpu_acct")
            .args(["--since", "1h"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(
        table.contains("GPU-HOURS") && table.contains("good") && table.contains("bad"),
        "{table}"
    );
    let none = s
        .cmd("mgpu_acct")
        .args(["--json", "--since", "2999-01-01"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&none.stdout).unwrap();
    assert!(v["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn old_records_and_their_logs_are_purged() {
    let mut s = Server::start("1x24GiB", &["--retention-days", "0"]);
    let id = s.detached(&["--", "echo", "x"]);
    s.wait_gone(id);
    let log = s.log_dir.join(format!("job-{id}.log"));
    wait_until(Duration::from_secs(60), || log.exists());
    std::thread::sleep(Duration::from_millis(20));
    // Purging runs at startup (then hourly).
    s.restart();
    wait_until(Duration::from_secs(60), || !log.exists());
    let out = s.cmd("mgpu_acct").args(["--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn a_job_whose_attached_client_died_with_the_server_is_cancelled() {
    let mut s = Server::start("1x24GiB", &["--reattach-window", "3"]);
    let mut attached = s
        .cmd("mgpu_srun")
        .args(["--", "bash", "-c", "echo up; sleep 300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(attached.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let id = s.queue_json()["jobs"][0]["id"].as_u64().unwrap();
    // The server and the client die together; the job lives on under its supervisor.
    s.kill9();
    attached.kill().unwrap();
    attached.wait().unwrap();
    s.restart();
    // Re-adopted first (unless the window has passed already on a slow machine: then its
    // record below says CANCELLED, which a job that was not re-adopted would not be).
    if let Some(job) = s.job(id) {
        assert_eq!(job["state"], "RUNNING", "re-adopted first");
    }
    // Nobody re-attaches within the window: the job is cancelled, as if the client had died
    // while the server watched.
    s.wait_gone(id);
    assert_eq!(s.acct(id)["state"], "CANCELLED");
}

/// `--run-dir` puts the run directories elsewhere (a tmpfs in production); they are found
/// again after a crash, and no second server may share them.
#[test]
fn run_directories_elsewhere_are_readopted_and_exclusive() {
    let elsewhere = tempfile::tempdir().unwrap();
    let run_dir = elsewhere.path().join("runs");
    let mut s = Server::start("1x24GiB", &["--run-dir", run_dir.to_str().unwrap()]);
    let id = s.detached(&["--", "sleep", "300"]);
    s.wait_state(id, "RUNNING");
    // The supervisor binds its socket there once it is up.
    let sock = run_dir.join(id.to_string()).join("r0").join("sock");
    wait_until(Duration::from_secs(60), || sock.exists());
    assert!(!s.state_dir.join("runs").exists());

    let second = server_cmd(
        s.dir.join("second.sock"),
        s.dir.join("state2"),
        s.dir.join("logs2"),
    )
    .arg("--run-dir")
    .arg(&run_dir)
    .args(["--simulate-gpus", "1x24GiB"])
    .output()
    .unwrap();
    assert_fails_with(&second, "another mgpu server is using the run directory");

    s.kill9();
    s.restart();
    assert_eq!(s.job(id).unwrap()["state"], "RUNNING", "re-adopted");
    let out = s.cmd("mgpu_cancel").arg(id.to_string()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    s.wait_gone(id);
    assert_eq!(s.acct(id)["state"], "CANCELLED");
}

/// Whether process `pid`, the job's `sh -c` that execs `sleep 300`, is gone (or only a zombie;
/// a process that reused the pid is another).
fn process_gone(pid: i32) -> bool {
    let ours = |c: &[u8]| c == b"sleep\x00300\x00" || c.starts_with(b"sh\0-c\0");
    if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty() && !ours(&c)) {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                == Some("Z")
        }
    }
}

/// A running job the restarted server cannot take back (its GPUs are gone) is recorded as
/// failed and stopped: it must not go on using GPUs that nobody books.
#[test]
fn a_job_that_cannot_be_readopted_is_stopped() {
    let mut s = Server::start("2x24GiB", &[]);
    let pidfile = s.scratch.join("pid");
    let script = format!("echo $$ > {}; exec sleep 300", pidfile.display());
    let id = s.detached(&["--gpus", "2", "--", "sh", "-c", &script]);
    s.wait_state(id, "RUNNING");
    let mut pid = 0;
    wait_until(Duration::from_secs(60), || {
        pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(0);
        pid > 0
    });
    s.kill9();
    s.set_gpus("1x24GiB");
    s.restart();
    assert_eq!(s.acct(id)["state"], "FAILED");
    wait_until(Duration::from_secs(60), || process_gone(pid));
}
