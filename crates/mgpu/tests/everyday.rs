//! Everyday polish a Slurm user expects: local times read back by `--since`, tables that fit
//! the terminal, quiet ends on closed pipes, pending jobs' logs, unknown jobs, Ctrl-C twice,
//! usage with every form, `--long` detail.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::process::Stdio;

use common::*;

/// A command's stdout is a pipe nobody reads (its read end is closed before it writes).
fn closed_pipe() -> Stdio {
    let (reader, writer): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

fn acct_table(s: &Server, tz: &str, args: &[&str]) -> String {
    let out = s
        .cmd("mgpu_acct")
        .env("TZ", tz)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The ENDED column of a table's first row.
fn ended(table: &str) -> String {
    let header = table.lines().next().unwrap();
    let col = header
        .split_whitespace()
        .position(|c| c == "ENDED")
        .unwrap();
    table
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(col)
        .unwrap()
        .to_string()
}

/// Times are printed in the user's zone (TZ), like Slurm's, and `--since`/`--until` read back
/// exactly what was printed, in that zone; the JSON's RFC 3339 times are read too.
#[test]
fn times_are_local_and_since_reads_what_acct_prints() {
    let s = Server::start("1x24GiB", &[]);
    let id = s.detached(&["--", "true"]);
    let rec = s.acct(id);
    let utc = ended(&acct_table(&s, "UTC", &[]));
    let india = ended(&acct_table(&s, "IST-5:30", &[]));
    let t = |x: &str| {
        let p = |a: usize, b: usize| x[a..b].parse::<i64>().unwrap();
        p(11, 13) * 3600 + p(14, 16) * 60 + p(17, 19)
    };
    let diff = (t(&india) - t(&utc)).rem_euclid(86400);
    assert_eq!(diff, 5 * 3600 + 1800, "UTC {utc}, IST {india}");
    // What was printed, typed back in the same zone: the job ended within that second.
    let since = acct_table(&s, "IST-5:30", &["--since", &india]);
    assert!(since.contains(&format!(" {id} ")), "{since}");
    let until = acct_table(&s, "IST-5:30", &["--until", &india]);
    assert!(!until.contains(&format!(" {id} ")), "{until}");
    // The same text read in another zone is another moment (5:30 later): nothing since then.
    let later = acct_table(&s, "UTC", &["--since", &india]);
    assert!(!later.contains(&format!(" {id} ")), "{later}");
    let json_time = rec["ended_at"].as_str().unwrap();
    let from_json = acct_table(&s, "UTC", &["-S", json_time]);
    assert!(from_json.contains(&format!(" {id} ")), "{from_json}");
    for form in ["today", "now-1hour", "2h", "yesterday"] {
        let t = acct_table(&s, "IST-5:30", &["--since", form]);
        assert!(t.contains(&format!(" {id} ")), "{form}: {t}");
    }
    assert_fails_with(
        &s.cmd("mgpu_acct")
            .args(["--since", "soonish"])
            .output()
            .unwrap(),
        "invalid time 'soonish'",
    );
    // mgpu_top's clock names the zone.
    let screen = s
        .cmd("mgpu_top")
        .env("TZ", "IST-5:30")
        .args(["--once", "120x10"])
        .output()
        .unwrap();
    assert!(
        text(&screen.stdout)
            .lines()
            .next()
            .unwrap()
            .contains(" IST"),
        "{}",
        text(&screen.stdout)
    );
}

/// mgpu_acct and mgpu_top fit 80 and 100 columns: names are cut with an ellipsis, numbers
/// never (whole ids, states, times and GPU-hours), less useful columns go first.
#[test]
fn tables_fit_80_and_100_columns() {
    let s = Server::start("1x24GiB", &[]);
    let long = "a-very-long-job-name-that-would-never-fit-in-a-narrow-terminal-x";
    let done = s.detached(&["-J", long, "--", "true"]);
    let rec = s.acct(done);
    let blocker = s.detached(&["-J", long, "--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let waiting = s.detached(&["-J", long, "--", "true"]);
    for width in [80usize, 100] {
        let out = s
            .cmd("mgpu_acct")
            .env("COLUMNS", width.to_string())
            .output()
            .unwrap();
        let table = text(&out.stdout);
        assert!(
            table.lines().all(|l| l.chars().count() <= width),
            "{width}:\n{table}"
        );
        assert!(table.contains('…') && !table.contains(long), "{table}");
        let row = table.lines().nth(1).unwrap();
        assert!(row.starts_with(&format!(" {done} ")), "{row}");
        assert!(
            row.contains(" COMPLETED ")
                && row.contains(&format!("{:.3}", rec["gpu_hours"].as_f64().unwrap())),
            "{row}"
        );
        assert!(
            row.contains(&ended(&table)) && ended(&table).len() == 19,
            "{row}"
        );
        let screen = s
            .cmd("mgpu_top")
            .args(["--once", &format!("{width}x20")])
            .output()
            .unwrap();
        let screen = text(&screen.stdout);
        assert!(
            screen.lines().all(|l| l.chars().count() <= width),
            "{screen}"
        );
        for (id, state) in [(blocker, "RUNNING"), (waiting, "PENDING")] {
            let row = screen
                .lines()
                .find(|l| l.trim_start_matches('│').starts_with(&format!("{id} ")))
                .unwrap_or_else(|| panic!("no row for {id}:\n{screen}"));
            assert!(
                row.contains(&format!(" {state} ")) && row.contains('…'),
                "{row}"
            );
        }
        assert!(screen.contains("24576/24576"), "{screen}");
    }
    // Without a width (a pipe), nothing is cut.
    let wide = text(
        &s.cmd("mgpu_acct")
            .env_remove("COLUMNS")
            .output()
            .unwrap()
            .stdout,
    );
    assert!(wide.contains(long) && wide.contains("SUBMITTED"), "{wide}");
}

/// Every client writing to a closed pipe ends quietly: no panic, no "Broken pipe" message,
/// exit 0 or 141 (as if killed by SIGPIPE).
#[test]
fn clients_end_quietly_on_a_closed_pipe() {
    let s = Server::start("1x24GiB", &[]);
    let id = s.detached(&["--", "seq", "1", "200000"]);
    s.acct(id);
    let cases: Vec<Vec<&str>> = vec![
        vec!["mgpu_log", "ID"],
        vec!["mgpu_acct", "--json"],
        vec!["mgpu_acct"],
        vec!["mgpu_queue"],
        vec!["mgpu_queue", "--json"],
        vec!["mgpu_srun", "--", "seq", "1", "200000"],
        vec!["mgpu_srun", "--detach", "--", "true"],
        vec!["mgpu_top", "--once", "80x10"],
    ];
    let id = id.to_string();
    for case in cases {
        let args: Vec<&str> = case[1..]
            .iter()
            .map(|a| if *a == "ID" { id.as_str() } else { a })
            .collect();
        let out = s
            .cmd(case[0])
            .args(&args)
            .stdout(closed_pipe())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0) | Some(141)),
            "{case:?}: {:?} {err}",
            out.status
        );
        assert!(
            !err.contains("panicked") && !err.to_lowercase().contains("broken pipe"),
            "{case:?}: {err}"
        );
    }
}

/// `mgpu_log` of a pending job says it is pending; with --follow it waits for the job to start
/// and prints its output.
#[test]
fn log_of_a_pending_job_says_so_and_follow_waits() {
    let s = Server::start("1x24GiB", &[]);
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let id = s.detached(&["--", "echo", "finally"]);
    let out = s.cmd("mgpu_log").arg(id.to_string()).output().unwrap();
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("job {id} is pending")),
        "{}",
        text(&out.stderr)
    );
    let mut follow = s
        .cmd("mgpu_log")
        .args(["-f", &id.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(follow.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("waiting for it to start"), "{line}");
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
    let mut printed = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    assert!(follow.wait().unwrap().success());
    assert_eq!(printed, "finally\n");
}

/// `mgpu_queue -j` of a job that is not there fails like squeue's "Invalid job id"; `--long`
/// shows one Key=Value detail view; `mgpu_cancel` alone shows every form; one GPU is "1 GPU".
#[test]
fn unknown_jobs_long_view_usage_and_singular_gpu() {
    let s = Server::start("1x24GiB", &[]);
    assert_fails_with(
        &s.cmd("mgpu_queue").args(["-j", "9999"]).output().unwrap(),
        "no such pending or running job: 9999",
    );
    let id = s.detached(&["-J", "detail", "-t", "5", "--", "sleep", "120"]);
    s.wait_state(id, "RUNNING");
    let long = s.ok("mgpu_queue", &["-j", &id.to_string(), "--long"]);
    for kv in [
        format!("JobId={id} JobName=detail"),
        "JobState=RUNNING".into(),
        "TimeLimit=5:00".into(),
        "NumGPUs=1 GPUIds=0".into(),
        "Command=sleep 120".into(),
    ] {
        assert!(long.contains(&kv), "{kv}: {long}");
    }
    let usage = s.cmd("mgpu_cancel").output().unwrap();
    assert!(!usage.status.success());
    for form in ["ID [ID...]", "--array ID", "-u USER", "--all", "-t STATE"] {
        assert!(
            text(&usage.stderr).contains(form),
            "{}",
            text(&usage.stderr)
        );
    }
    assert_fails_with(
        &s.cmd("mgpu_srun")
            .args(["--mem", "30G", "--", "true"])
            .output()
            .unwrap(),
        "asks for 1 GPU with 30720 MiB each but only 0 GPUs here have",
    );
}

/// A signal to an attached srun gives its code (130 for Ctrl-C, 143 for SIGTERM), not the
/// job's end (143 from the SIGTERM the job got); before the job started srun says that
/// nothing runs, and that the job was cancelled.
#[test]
fn srun_interrupted_exits_with_the_signals_code_running_or_pending() {
    let s = Server::start("1x24GiB", &[]);
    let signal = |srun: &std::process::Child, sig| {
        let pid = nix::unistd::Pid::from_raw(srun.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    };
    // Running, no trap: the job dies of the SIGTERM it got (143), srun exits 130.
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "sh", "-c", "echo ready; sleep 60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(srun.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    signal(&srun, nix::sys::signal::Signal::SIGINT);
    let mut err = String::new();
    srun.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(srun.wait().unwrap().code(), Some(130), "{err}");
    assert!(err.contains("waiting for its processes to end"), "{err}");
    // Pending behind a job holding the only GPU.
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    for (sig, code) in [
        (nix::sys::signal::Signal::SIGINT, 130),
        (nix::sys::signal::Signal::SIGTERM, 143),
    ] {
        let mut srun = s
            .cmd("mgpu_srun")
            .args(["--", "true"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(srun.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.contains("queued") || line.contains("waits"), "{line}");
        signal(&srun, sig);
        let mut rest = String::new();
        err.read_to_string(&mut rest).unwrap();
        assert_eq!(srun.wait().unwrap().code(), Some(code), "{sig}: {rest}");
        assert!(
            rest.contains("(it has not started)") && rest.contains(" cancelled\n"),
            "{rest}"
        );
        assert!(!rest.contains("processes"), "{rest}");
    }
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
}

/// After Ctrl-C srun exits non-zero (130) even when the job's trap exits 0; a second Ctrl-C
/// says what it waits for.
#[test]
fn ctrl_c_twice_says_what_it_waits_for_and_exits_non_zero() {
    let s = Server::start("1x24GiB", &["--grace-period", "30"]);
    let mut srun = s
        .cmd("mgpu_srun")
        .args([
            "--",
            "bash",
            "-c",
            "trap 'sleep 2; exit 0' TERM; echo ready; sleep 60 & wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(srun.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let mut err = BufReader::new(srun.stderr.take().unwrap());
    let pid = nix::unistd::Pid::from_raw(srun.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    line.clear();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("cancelling job"), "{line}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    line.clear();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains("still waiting for job") && line.contains("grace period"),
        "{line}"
    );
    let status = srun.wait().unwrap();
    assert_eq!(status.code(), Some(130));
}
