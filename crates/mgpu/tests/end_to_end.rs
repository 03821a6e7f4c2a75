//! End-to-end behaviour of the real binaries: submit, stream, queue, cancel, logs, placement.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn attached_srun_streams_output_and_exit_code() {
    let s = Server::start("2x24GiB", &[]);
    let out = s
        .cmd("mgpu_srun")
        .args([
            "--",
            "bash",
            "-c",
            "echo out-line; echo err-line >&2; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out-line\n", "nothing extra on stdout");
    assert!(text(&out.stderr).contains("err-line"));

    // Killed by a signal: 128 + signal number.
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "bash", "-c", "kill -KILL $$"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(137));
}

#[test]
fn job_environment_is_set() {
    let s = Server::start("2x24GiB", &[]);
    let out = s
        .cmd("mgpu_srun")
        .args(["--gpus", "2", "--job-name", "envtest", "--no-venv", "--"])
        .args(["bash", "-c", "echo $CUDA_VISIBLE_DEVICES,$CUDA_DEVICE_ORDER,$MGPU_JOB_NAME,$MGPU_JOB_ID,$FROM_CLIENT,$(pwd)"])
        .env("FROM_CLIENT", "kept")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    let parts: Vec<&str> = line.trim().split(',').collect();
    assert_eq!(&parts[..2], ["0", "1"]);
    assert_eq!(parts[2], "PCI_BUS_ID");
    assert_eq!(parts[3], "envtest");
    assert!(parts[4].parse::<u64>().is_ok());
    assert_eq!(parts[5], "kept");
    assert_eq!(
        parts[6],
        s.dir.to_str().unwrap(),
        "runs in srun's directory"
    );

    let out = s
        .cmd("mgpu_srun")
        .args(["--chdir", s.scratch.to_str().unwrap(), "--", "pwd"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), s.scratch.to_str().unwrap());
}

/// The supervisor blocks SIGCHLD and ignores SIGPIPE; the job must inherit neither (a job
/// ignoring SIGPIPE turns `yes | head` into "Broken pipe" errors).
#[test]
fn jobs_start_with_default_signal_handling() {
    let s = Server::start("1x24GiB", &[]);
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let masks: Vec<u64> = text(&out.stdout)
        .lines()
        .map(|l| u64::from_str_radix(l.split('\t').nth(1).unwrap(), 16).unwrap())
        .collect();
    // Signals 32 and 33 (bits 31, 32) are the C library's own and left as they are.
    let ours = !(0b11u64 << 31);
    assert_eq!(masks.len(), 2);
    assert_eq!(masks[0] & ours, 0, "nothing blocked: {masks:x?}");
    assert_eq!(masks[1] & ours, 0, "nothing ignored: {masks:x?}");
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "sh", "-c", "yes | head -n 1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "y\n");
    assert_eq!(text(&out.stderr), "", "no broken pipe errors");
}

#[test]
fn detach_and_parsable_give_increasing_ids() {
    let s = Server::start("1x24GiB", &[]);
    let out = s
        .cmd("mgpu_srun")
        .args(["--detach", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let first: u64 = text(&out.stdout)
        .trim()
        .strip_prefix("Submitted job ")
        .expect("Submitted job ID")
        .parse()
        .unwrap();
    // Over before the next two come: else both wait, and the shorter one (third) goes first.
    s.acct(first);
    let second = s.submit({
        let mut c = s.cmd("mgpu_srun");
        c.args(["--detach", "--parsable", "--", "sleep", "300"]);
        c
    });
    let third = s.detached(&["-t", "1:00:00", "-J", "third", "--", "sleep", "5"]);
    assert!(first < second && second < third);
    s.wait_state(second, "RUNNING");
    let q = s.queue_json();
    let jobs = q["jobs"].as_array().unwrap();
    assert_eq!(jobs[0]["id"], second);
    assert_eq!(jobs[0]["state"], "RUNNING");
    assert!(jobs[0]["started_at"].as_str().unwrap().contains('T'));
    assert_eq!(jobs[1]["id"], third);
    assert_eq!(jobs[1]["state"], "PENDING");
    assert_eq!(jobs[1]["reason"], "Resources");
    assert_eq!(jobs[1]["time_limit_s"], 3600);
    assert_eq!(jobs[1]["name"], "third");
    assert!(jobs[1]["started_at"].is_null());
    assert_eq!(jobs[1]["command"], serde_json::json!(["sleep", "5"]));
    assert_eq!(q["gpus"][0]["reserved_mib"], 24576);
    assert_eq!(q["gpus"][0]["total_mib"], 24576);

    // The human table has both sections.
    let table = text(&s.cmd("mgpu_queue").output().unwrap().stdout);
    for word in [
        "JOBID",
        "REASON",
        "Resources",
        "third",
        "RESERVED/USED/TOTAL",
        "UNLIMITED",
        "1:00:00",
    ] {
        assert!(table.contains(word), "{word} missing from:\n{table}");
    }
    // -j filters.
    let one = s
        .cmd("mgpu_queue")
        .args(["--json", "-j", &third.to_string()])
        .output()
        .unwrap();
    let one: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    assert_eq!(one["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn impossible_and_malformed_jobs_are_refused_at_once() {
    let s = Server::start("2x24GiB", &[]);
    let cases: &[(&[&str], &str)] = &[
        (&["--gpus", "3", "--", "true"], "only 2"),
        (&["--mem", "30000", "--", "true"], "memory"),
        (&["--gpus", "0", "--", "true"], "at least one GPU"),
        (&["--"], "no command"),
        (
            &["--chdir", "/nonexistent/dir", "--", "true"],
            "working directory",
        ),
        (&["--bogus-flag", "--", "true"], "--bogus-flag"),
        (&["--time-limit", "soon", "--", "true"], "invalid time"),
        // Bidi overrides and invisible characters would let a name pose as another.
        (&["-J", "train\u{202E}gpj.exe", "--", "true"], "U+202E"),
        (&["-J", "a\u{2066}b", "--", "true"], "U+2066"),
        (&["-J", "\u{200B}", "--", "true"], "U+200B"),
        (&["-J", "x\u{FEFF}", "--", "true"], "U+FEFF"),
    ];
    for (args, needle) in cases {
        let out = s.cmd("mgpu_srun").args(*args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = text(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected '{needle}' in: {err}"
        );
    }
    assert!(
        s.queue_json()["jobs"].as_array().unwrap().is_empty(),
        "nothing queued"
    );
}

#[test]
fn memory_jobs_share_and_exclusive_jobs_never_overlap() {
    let s = Server::start("2x24GiB", &[]);
    // Two memory jobs fit on one GPU together.
    let a = s.detached(&["--mem", "10000", "--", "sleep", "300"]);
    let b = s.detached(&["--mem", "10000", "--", "sleep", "300"]);
    s.wait_state(a, "RUNNING");
    s.wait_state(b, "RUNNING");
    let q = s.queue_json();
    assert_eq!(
        s.job(a).unwrap()["gpu_ids"],
        s.job(b).unwrap()["gpu_ids"],
        "packed together"
    );
    let shared = s.job(a).unwrap()["gpu_ids"][0].as_u64().unwrap() as usize;
    assert_eq!(q["gpus"][shared]["reserved_mib"], 20000);
    // A third does not fit beside them but takes the other GPU.
    let c3 = s.detached(&["--mem", "10000", "--", "sleep", "300"]);
    s.wait_state(c3, "RUNNING");
    assert_ne!(s.job(c3).unwrap()["gpu_ids"], s.job(a).unwrap()["gpu_ids"]);
    assert!(s
        .cmd("mgpu_cancel")
        .arg("--all")
        .status()
        .unwrap()
        .success());
    for id in [a, b, c3] {
        s.wait_gone(id);
    }

    // Exclusive jobs: record which GPUs each held and when; no GPU is ever held twice at once.
    let script = format!(
        "echo $CUDA_VISIBLE_DEVICES $(date +%s%N) > {dir}/$MGPU_JOB_ID; sleep 0.3; echo $(date +%s%N) >> {dir}/$MGPU_JOB_ID",
        dir = s.scratch.display()
    );
    let ids: Vec<u64> = (0..6)
        .map(|i| {
            let gpus = if i % 3 == 0 { "2" } else { "1" };
            s.detached(&["--gpus", gpus, "--", "bash", "-c", &script])
        })
        .collect();
    for id in &ids {
        s.wait_gone(*id);
    }
    let mut spans: Vec<(u32, u128, u128)> = Vec::new();
    for id in &ids {
        let content = std::fs::read_to_string(s.scratch.join(id.to_string())).unwrap();
        let mut lines = content.lines();
        let first: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        let end: u128 = lines.next().unwrap().trim().parse().unwrap();
        let start: u128 = first[1].parse().unwrap();
        for g in first[0].split(',') {
            spans.push((g.parse().unwrap(), start, end));
        }
    }
    for (i, x) in spans.iter().enumerate() {
        for y in &spans[i + 1..] {
            assert!(
                x.0 != y.0 || x.2 <= y.1 || y.2 <= x.1,
                "GPU {} held by two exclusive jobs at once: {x:?} {y:?}",
                x.0
            );
        }
    }
}

#[test]
fn waiting_job_starts_when_resources_free_up() {
    let s = Server::start("1x24GiB", &[]);
    let blocker = s.detached(&["--", "sleep", "300"]);
    s.wait_state(blocker, "RUNNING");
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "echo", "finally"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(srun.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains("queued") && line.contains("Resources: needs 1 whole GPU, 0 free now"),
        "{line}"
    );
    assert!(s
        .cmd("mgpu_cancel")
        .arg(blocker.to_string())
        .status()
        .unwrap()
        .success());
    let out = srun.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "finally\n");
}

#[test]
fn ctrl_c_cancels_the_job_and_waits_for_its_processes() {
    let s = Server::start("1x24GiB", &[]);
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "bash", "-c", "trap 'echo got-term; sleep 0.5; echo cleaned; exit 7' TERM; echo ready; sleep 60 & wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(srun.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(srun.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = srun.wait().unwrap();
    assert_eq!(
        rest, "got-term\ncleaned\n",
        "the job's cleanup ran and was streamed"
    );
    // Interrupted: Ctrl-C's code, not the trap's.
    assert_eq!(status.code(), Some(130));
    // srun returned only after the job was gone.
    assert!(s.queue_json()["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn cancel_kills_a_job_ignoring_sigterm_after_the_grace_period() {
    // (A grace period long enough to look at the queue within it on a loaded machine.)
    let s = Server::start("1x24GiB", &["--grace-period", "10"]);
    let mut srun = s
        .cmd("mgpu_srun")
        .args([
            "--",
            "bash",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(srun.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let id = s.queue_json()["jobs"][0]["id"].as_u64().unwrap();
    let c = s.cmd("mgpu_cancel").arg(id.to_string()).output().unwrap();
    assert!(c.status.success(), "{}", text(&c.stderr));
    // Within the grace period it still holds its GPU.
    let job = s.job(id).expect("still there during the grace period");
    assert_eq!(job["reason"], "Cancelling");
    assert_eq!(s.queue_json()["gpus"][0]["jobs"][0], id);
    let status = srun.wait().unwrap();
    assert_eq!(status.code(), Some(137), "SIGKILLed");
    assert!(s.job(id).is_none());
}

#[test]
fn cancel_pending_job_and_unknown_ids() {
    let s = Server::start("1x24GiB", &[]);
    let running = s.detached(&["--", "sleep", "300"]);
    let pending = s.detached(&["--", "sleep", "300"]);
    s.wait_state(running, "RUNNING");
    assert!(s
        .cmd("mgpu_cancel")
        .arg(pending.to_string())
        .status()
        .unwrap()
        .success());
    assert!(s.job(pending).is_none(), "pending job cancelled at once");
    let out = s.cmd("mgpu_cancel").arg("99999").output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no such"));
    assert!(s
        .cmd("mgpu_cancel")
        .arg(running.to_string())
        .status()
        .unwrap()
        .success());
    s.wait_gone(running);
}

#[test]
fn failed_start_is_reported_and_the_server_carries_on() {
    let s = Server::start("1x24GiB", &[]);
    let out = s
        .cmd("mgpu_srun")
        .args(["--no-venv", "--", "/no/such/program", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
    let err = text(&out.stderr);
    assert!(
        err.contains("FAILED") && err.contains("/no/such/program"),
        "{err}"
    );
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "echo", "still-works"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "still-works\n");
}

#[test]
fn log_keeps_output_and_follows_live() {
    let s = Server::start("1x24GiB", &[]);
    // (The pauses keep the two streams' order in the log, which the supervisor reads stdout
    // first when both have something, also on a loaded machine.)
    let id = s.detached(&[
        "--",
        "bash",
        "-c",
        "echo one; sleep 1; echo two >&2; sleep 1; echo three",
    ]);
    let follow = s
        .cmd("mgpu_log")
        .args(["--follow", &id.to_string()])
        .output()
        .unwrap();
    assert!(follow.status.success(), "{}", text(&follow.stderr));
    assert_eq!(text(&follow.stdout), "one\ntwo\nthree\n");
    let again = s.cmd("mgpu_log").arg(id.to_string()).output().unwrap();
    assert_eq!(text(&again.stdout), "one\ntwo\nthree\n");
    // Log files are private to the server's user.
    let meta = std::fs::metadata(s.log_dir.join(format!("job-{id}.log"))).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077,
        0
    );
    let missing = s.cmd("mgpu_log").arg("424242").output().unwrap();
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no such job"));
}

#[test]
fn pending_jobs_survive_a_restart_and_ids_continue() {
    let mut s = Server::start("1x24GiB", &[]);
    let running = s.detached(&["--", "sleep", "300"]);
    s.wait_state(running, "RUNNING");
    let pending: Vec<u64> = (0..3)
        .map(|i| s.detached(&["-J", &format!("p{i}"), "--", "sleep", "300"]))
        .collect();
    let started_at = s.job(running).unwrap()["started_at"].clone();
    s.restart();
    let q = s.queue_json();
    let ids: Vec<u64> = q["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    // The running job kept running under its supervisor; the queue kept its order.
    let mut expected = vec![running];
    expected.extend(&pending);
    assert_eq!(ids, expected, "same jobs, same order");
    let next = s.detached(&["--", "true"]);
    assert!(next > *pending.last().unwrap(), "ids are never reused");
    let job = s.job(running).unwrap();
    assert_eq!(job["state"], "RUNNING");
    assert_eq!(job["started_at"], started_at, "the same run, re-adopted");
    assert_eq!(job["restarts"], 0);
    s.cmd("mgpu_cancel").arg("--all").status().unwrap();
    std::thread::sleep(Duration::from_millis(10));
}

/// A second supervisor for a run that has one refuses to start (whatever asked for it), and
/// the run goes on untouched.
#[test]
fn a_run_has_at_most_one_supervisor() {
    let s = Server::start("1x24GiB", &[]);
    // Held running until the second supervisor has been refused.
    let go = s.scratch.join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo finished",
        go.display()
    );
    let id = s.detached(&["--", "sh", "-c", &script]);
    s.wait_state(id, "RUNNING");
    let run_dir = s.state_dir.join("runs").join(id.to_string()).join("r0");
    wait_until(Duration::from_secs(60), || run_dir.join("sock").exists());
    let out = Command::new(bin("mgpu_scheduler_server"))
        .arg("--supervise")
        .arg(&run_dir)
        .output()
        .unwrap();
    assert_fails_with(&out, "another supervisor already runs this run");
    std::fs::write(&go, "").unwrap();
    s.wait_gone(id);
    assert_eq!(s.acct(id)["state"], "COMPLETED");
    assert_eq!(s.log(id), "finished\n");
}

/// Someone outside the job holding its output pipe open (its owner can, through /proc)
/// does not keep the job from ending.
#[test]
fn an_outside_holder_of_the_output_pipe_does_not_hang_the_end() {
    let s = Server::start("1x24GiB", &[]);
    let pidfile = s.scratch.join("pid");
    // The job runs until the test holds its output pipe.
    let go = s.scratch.join("go");
    let script = format!(
        "echo $$ > {}; while [ ! -e {} ]; do sleep 0.05; done; echo done",
        pidfile.display(),
        go.display()
    );
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = None;
    wait_until(Duration::from_secs(60), || {
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
        held = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{}/fd/1", pid.trim()))
            .ok();
        held.is_some()
    });
    std::fs::write(&go, "").unwrap();
    // (Bounded: before the fix the supervisor waited for the pipe's end for ever.)
    let mut status = None;
    wait_until(Duration::from_secs(60), || {
        status = srun.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    let mut out = String::new();
    std::io::Read::read_to_string(srun.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(out, "done\n");
    drop(held);
}

/// `--array`: one job per index with ids that follow each other, `MGPU_ARRAY_*` in each
/// task's environment, the index shown in the queue and accounting, kept across a restart,
/// and `mgpu_cancel --array` for all unfinished tasks. Bad arrays change nothing.
#[test]
fn job_arrays() {
    let mut s = Server::start("2x24GiB", &[]);
    let script = format!(
        "echo $MGPU_ARRAY_JOB_ID $MGPU_ARRAY_TASK_ID $MGPU_ARRAY_TASK_COUNT $MGPU_ARRAY_TASK_MIN $MGPU_ARRAY_TASK_MAX > {}/$MGPU_JOB_ID",
        s.scratch.display()
    );
    let first = s.submit({
        let mut c = s.cmd("mgpu_srun");
        c.args([
            "--array",
            "0-4,9",
            "--parsable",
            "--mem",
            "10G",
            "-J",
            "sweep",
            "--",
        ])
        .args(["bash", "-c", &script]);
        c
    });
    let ids: Vec<u64> = (first..first + 6).collect();
    for id in &ids {
        s.wait_gone(*id);
    }
    for (id, task) in ids.iter().zip([0, 1, 2, 3, 4, 9]) {
        let seen = std::fs::read_to_string(s.scratch.join(id.to_string())).unwrap();
        assert_eq!(seen.trim(), format!("{first} {task} 6 0 9"), "job {id}");
        let rec = s.acct(*id);
        assert_eq!(rec["state"], "COMPLETED");
        assert_eq!(rec["name"], "sweep");
        assert_eq!(rec["array_job"], first);
        assert_eq!(rec["array_task"], task);
    }
    let table = text(&s.cmd("mgpu_acct").output().unwrap().stdout);
    assert!(table.contains("sweep[9]"), "{table}");

    // A job submitted from inside a task is not a task of that array.
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "bash", "-c", "echo ${MGPU_ARRAY_TASK_ID-unset}"])
        .env("MGPU_ARRAY_TASK_ID", "3")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "unset");

    // Waiting tasks keep their place in the array across a restart, and go together.
    let said = s.ok(
        "mgpu_srun",
        &[
            "--array", "1-3", "--gpus", "2", "-J", "hold", "--", "sleep", "300",
        ],
    );
    let hold: u64 = said
        .trim()
        .strip_prefix("Submitted array job ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{said}"))
        .parse()
        .unwrap();
    assert!(
        said.contains(&format!("(3 tasks: jobs {hold}-{})", hold + 2)),
        "{said}"
    );
    s.wait_state(hold, "RUNNING");
    s.restart();
    let q = s.queue_json();
    let jobs = q["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "{q}");
    for (j, (id, task)) in jobs.iter().zip([(hold, 1), (hold + 1, 2), (hold + 2, 3)]) {
        assert_eq!(j["id"], id);
        assert_eq!(j["array_job"], hold);
        assert_eq!(j["array_task"], task);
    }
    // Waiting tasks with the same reason share a row (none holds a reservation: by default
    // only a starving job does).
    let table = text(&s.cmd("mgpu_queue").output().unwrap().stdout);
    assert!(table.contains("hold[2-3]"), "{table}");
    let table = text(&s.cmd("mgpu_queue").arg("-r").output().unwrap().stdout);
    assert!(table.contains("hold[3]"), "{table}");
    // Any task's id names its array.
    s.ok("mgpu_cancel", &["--array", &(hold + 2).to_string()]);
    for id in hold..hold + 3 {
        s.wait_gone(id);
        assert_eq!(s.acct(id)["state"], "CANCELLED");
    }
    let out = s
        .cmd("mgpu_cancel")
        .args(["--array", &hold.to_string()])
        .output()
        .unwrap();
    assert_fails_with(&out, "no pending or running tasks");

    // Refused whole: nothing is queued and no id is used.
    for args in [
        &["--array", "0-9%0", "--", "true"][..],
        &["--array", "0-3", "--gpus", "3", "--", "true"],
        &["--array", "0-10000", "--", "true"],
    ] {
        let out = s.cmd("mgpu_srun").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
    }
    assert!(s.queue_json()["jobs"].as_array().unwrap().is_empty());
    let next = s.detached(&["--", "true"]);
    assert_eq!(next, hold + 3);

    // A finished task's id still names its array.
    let arr = s.detached(&[
        "--array",
        "1-3",
        "--gpus",
        "2",
        "--",
        "bash",
        "-c",
        "test $MGPU_ARRAY_TASK_ID = 1 || sleep 300",
    ]);
    s.wait_gone(arr);
    s.wait_state(arr + 1, "RUNNING");
    s.ok("mgpu_cancel", &["--array", &arr.to_string()]);
    assert_eq!(s.acct(arr)["state"], "COMPLETED");
    for id in [arr + 1, arr + 2] {
        s.wait_gone(id);
        assert_eq!(s.acct(id)["state"], "CANCELLED");
    }
}

/// Waiting jobs are bounded per user and in all (`--max-pending-per-user`, `--max-pending`):
/// what would pass a bound is refused whole, with a message, and changes nothing.
#[test]
fn queue_limits_bound_waiting_jobs() {
    let s = Server::start(
        "1x24GiB",
        &["--max-pending-per-user", "4", "--max-pending", "6"],
    );
    let holder = s.detached(&["--", "sleep", "300"]);
    s.wait_state(holder, "RUNNING");
    let out = s
        .cmd("mgpu_srun")
        .args(["--array", "0-4", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "at most 4 may wait per user");
    let first = s.detached(&["--array", "0-2", "--", "true"]);
    s.detached(&["--", "true"]);
    let out = s
        .cmd("mgpu_srun")
        .args(["--detach", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "you have 4 jobs waiting");
    assert_eq!(s.queue_json()["jobs"].as_array().unwrap().len(), 5);
    // Room again once some leave.
    s.ok("mgpu_cancel", &["--array", &first.to_string()]);
    s.detached(&["--array", "0-2", "--", "true"]);
}

/// `--array 0-5%2`: at most two tasks at once, however many GPUs are free; the others wait
/// as `JobArrayTaskLimit` and follow in task order as tasks end.
#[test]
fn a_job_array_cap_limits_its_tasks_at_once() {
    let s = Server::start("4x24GiB", &[]);
    let first = s.detached(&["--array", "0-5%2", "--", "sleep", "300"]);
    s.wait_state(first, "RUNNING");
    s.wait_state(first + 1, "RUNNING");
    let q = s.queue_json();
    let jobs = q["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 6);
    for j in &jobs[2..] {
        assert_eq!(j["state"], "PENDING", "{q}");
        assert_eq!(j["reason"], "JobArrayTaskLimit", "{q}");
    }
    let table = s.ok("mgpu_queue", &[]);
    assert!(table.contains("JobArrayTaskLimit"), "{table}");
    s.ok("mgpu_cancel", &[&first.to_string()]);
    s.wait_state(first + 2, "RUNNING");
    assert_eq!(s.job(first + 3).unwrap()["reason"], "JobArrayTaskLimit");
    s.ok("mgpu_cancel", &["--array", &first.to_string()]);
    for id in first..first + 6 {
        s.wait_gone(id);
    }
}

/// `mgpu_top` is for terminals: from a script it refuses and says what to use instead.
#[test]
fn the_dashboard_refuses_without_a_terminal() {
    let s = Server::start("1x24GiB", &[]);
    let out = s.cmd("mgpu_top").output().unwrap();
    assert_fails_with(&out, "needs a terminal");
    let out = s.cmd("mgpu_top").args(["-n", "0"]).output().unwrap();
    assert_fails_with(&out, "--interval");
}

/// `mgpu_acct --json | head`: a reader that stops early ends the client quietly (no panic, no
/// error message, exit 0).
#[test]
fn clients_end_quietly_when_their_reader_goes_away() {
    let s = Server::start("1x24GiB", &[]);
    let done = s.detached(&["--", "bash", "-c", "seq 1 1000"]);
    s.wait_gone(done);
    s.acct(done);
    let cases: &[(&str, &[&str])] = &[
        ("mgpu_acct", &["--json"]),
        ("mgpu_acct", &[]),
        ("mgpu_queue", &["--json"]),
        ("mgpu_queue", &[]),
        ("mgpu_log", &[&done.to_string()]),
        ("mgpu_srun", &["--detach", "--", "true"]),
    ];
    for (program, args) in cases {
        // A pipe whose reader is already gone: the first write fails with EPIPE.
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let out = s
            .cmd(program)
            .args(*args)
            .stdout(std::process::Stdio::from(writer))
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{program} {args:?}: {} {}",
            out.status,
            text(&out.stderr)
        );
    }
}

/// The issue's case: with a job without a limit running, a wide job holds the reservation
/// (start in about 24 h), so a 1-GPU job without a limit waits although a GPU is free. (The
/// default reserves only for a starving job now, see the README.) The
/// attached srun says why, as the queue's REASON does (and names the reserved job), instead of
/// "needs 1 GPU, 1 free now".
#[test]
fn srun_and_the_queue_give_the_same_reason_for_a_wait() {
    // (Reserved for at once: by default only a starving job is.)
    let s = Server::start(
        "2x24GiB",
        &["--reserve-after", "0", "--reserve-after-wait-factor", "0"],
    );
    let blocker = s.detached(&["--", "sleep", "300"]);
    s.wait_state(blocker, "RUNNING");
    let wide = s.detached(&["--gpus", "2", "--", "true"]);
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "echo", "finally"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(srun.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!(
            "Reservation: it fits now, but it would delay job {wide}, which holds the reservation"
        )),
        "{line}"
    );
    let q = s.queue_json();
    let me = q["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["state"] == "PENDING" && j["id"] != wide)
        .unwrap()
        .clone();
    assert_eq!(me["reason"], "Reservation", "{me}");
    assert_eq!(me["behind_job"], wide, "{me}");
    let table = text(&s.cmd("mgpu_queue").output().unwrap().stdout);
    assert!(
        table.contains(&format!("Reservation (job {wide}, start by")),
        "{table}"
    );
    for id in [blocker, wide] {
        s.cmd("mgpu_cancel").arg(id.to_string()).status().unwrap();
    }
    let out = srun.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "finally\n");
}

/// Unknown flags, mistyped flags and Slurm flags mgpu does not take never become the job's
/// command: each is refused at once, in one line naming it, and nothing is submitted.
#[test]
fn unknown_and_unsupported_flags_are_refused_before_anything_is_submitted() {
    let s = Server::start("2x24GiB", &[]);
    let cases: &[(&[&str], &str)] = &[
        (&["--gres=mps:2", "--", "x"], "invalid --gres 'mps:2'"),
        (
            &["--gres=gpu:2,shard:1", "--", "x"],
            "invalid --gres 'gpu:2,shard:1': 'shard:1' cannot be honoured",
        ),
        (
            &["--memm", "10G", "true"],
            "unknown option '--memm' (did you mean --mem?)",
        ),
        (&["--foo"], "unknown option '--foo'"),
        (&["--gpus", "1", "-y", "true"], "unknown option '-y'"),
        (&["-d", "afterok", "true"], "invalid --dependency 'afterok'"),
        (
            &["--dependency=afterok:5?after:x", "--", "true"],
            "invalid --dependency",
        ),
        (&["--wrap", "echo hi"], "--wrap is mgpu_sbatch's"),
        (&["-p", "gpu", "true"], "-p: mgpu has no partitions"),
        (
            &["--partition=gpu", "true"],
            "--partition: mgpu has no partitions",
        ),
        (
            &["-N", "2", "true"],
            "--nodes 2: mgpu runs jobs on this one machine",
        ),
        (
            &["--nodes=2", "true"],
            "--nodes 2: mgpu runs jobs on this one machine",
        ),
        (
            &["-w", "node1", "true"],
            "-w: mgpu runs jobs on this one machine",
        ),
        (&["-n", "2", "true"], "--ntasks 2: a job is one command"),
        (&["--ntasks=2", "true"], "--ntasks 2: a job is one command"),
        (&["--time", "soon", "true"], "invalid time limit 'soon'"),
    ];
    for (args, needle) in cases {
        let out = s.cmd("mgpu_srun").args(*args).output().unwrap();
        assert_fails_with(&out, needle);
        let err = text(&out.stderr);
        if !needle.starts_with("invalid") {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        }
        assert!(
            s.queue_json()["jobs"].as_array().unwrap().is_empty(),
            "{args:?} submitted a job"
        );
    }
    // Slurm's -N 1 and -n 1 (common in scripts) mean what a job is here: taken.
    let one = s.detached(&["-N", "1", "-n", "1", "--ntasks-per-node=1", "--", "true"]);
    assert_eq!(s.acct(one)["state"], "COMPLETED");
    // After -- (or after the command's first word) a leading - is the command's own.
    let id = s.detached(&["--", "-x"]);
    // The job may already be over (it fails at exec): the queue shows its command, accounting
    // its name (the command's first word).
    let job = s.job(id).unwrap_or_else(|| s.acct(id));
    let first_word = job["command"][0].as_str().or(job["name"].as_str());
    assert_eq!(first_word, Some("-x"), "{job}");
}

/// `-t`/`--time`/`--time-limit` read Slurm's time format: a bare number is minutes, `0` and
/// UNLIMITED are no limit; attached short values (`-t10`, `-G2`) work.
#[test]
fn time_limits_read_like_slurm() {
    let s = Server::start("2x24GiB", &[]);
    // Both GPUs busy for good: every job below stays pending, with its limit in the queue.
    let blocker = s.detached(&["--gpus", "2", "--", "sleep", "600"]);
    s.wait_state(blocker, "RUNNING");
    let cases: &[(&[&str], Option<u64>)] = &[
        (&["-t", "10"], Some(600)),
        (&["-t10"], Some(600)),
        (&["--time=10"], Some(600)),
        (&["--time-limit", "90"], Some(5400)),
        (&["-t", "1:30"], Some(90)),
        (&["-t", "2:00:00"], Some(7200)),
        (&["-t", "1-2"], Some(93600)),
        (&["-t", "1-2:30"], Some(95400)),
        (&["-t", "1-0:0:5"], Some(86405)),
        (&["-t", "90m"], Some(5400)),
        (&["-t", "30s"], Some(30)),
        (&["-t", "2h"], Some(7200)),
        (&["-t", "1d"], Some(86400)),
        (&["-t", "0"], None),
        (&["-t", "UNLIMITED"], None),
        (&["--time", "infinite"], None),
    ];
    for (flags, want) in cases {
        let mut args = flags.to_vec();
        args.extend(["-G2", "--", "true"]);
        let id = s.detached(&args);
        let job = s.job(id).unwrap();
        assert_eq!(job["time_limit_s"].as_u64(), *want, "{flags:?}: {job}");
        assert_eq!(job["gpus"], 2, "-G2: {job}");
        s.ok("mgpu_cancel", &[&id.to_string()]);
    }
}

/// An attached job's stdin is what is piped into srun (the notice that it was not is gone);
/// from /dev/null there is nothing to say. (More in tests/stdin.rs.)
#[test]
fn srun_piped_stdin_reaches_the_job() {
    use std::io::Write;
    let s = Server::start("1x24GiB", &[]);
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    srun.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = srun.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(
        !text(&out.stderr).contains("stdin"),
        "{}",
        text(&out.stderr)
    );
    let out = s.cmd("mgpu_srun").args(["--", "true"]).output().unwrap();
    assert!(out.status.success());
    assert!(
        !text(&out.stderr).contains("stdin"),
        "{}",
        text(&out.stderr)
    );
}

/// A script with #SBATCH lines given to mgpu_srun gets their options; lines after the first
/// command are not directives (as for sbatch).
#[test]
fn srun_applies_a_scripts_sbatch_lines() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start("2x24GiB", &[]);
    let script = s.dir.join("job.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n# a comment\n#SBATCH --gpus=2\n#SBATCH -t 10\necho ran on $CUDA_VISIBLE_DEVICES\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plain = s.dir.join("plain.sh");
    std::fs::write(
        &plain,
        "#!/bin/sh\necho plain\n#SBATCH --late=ignored-by-sbatch-too\n",
    )
    .unwrap();
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o755)).unwrap();
    for args in [&["--", "./job.sh"][..], &["sh", "job.sh"]] {
        let out = s.cmd("mgpu_srun").args(args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "ran on 0,1\n", "{args:?}");
    }
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "./plain.sh"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "plain\n");
}
