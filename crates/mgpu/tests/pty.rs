//! `mgpu_srun --pty`: the job runs on a terminal of its own (its controlling terminal, owned
//! by its user), sized like srun's; keystrokes (Ctrl-C included) and window size changes reach
//! it. srun itself runs under `script`, which gives it a terminal.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use common::*;

/// `script -qec CMD /dev/null` as `user` (or root), stdin piped, output read by the test.
fn in_terminal(s: &Server, user: Option<&TestUser>, cmd: &str) -> std::process::Child {
    let mut c = match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .arg("--init-groups")
                .arg("--")
                .arg("script")
                .env("HOME", &u.home)
                .current_dir(&u.home);
            c
        }
        None => {
            let mut c = Command::new("script");
            c.current_dir(&s.dir);
            c
        }
    };
    // script(1) runs CMD with $SHELL: fix it, so the test does not depend on the caller's.
    c.args(["-qec", cmd, "/dev/null"])
        .env("SHELL", "/bin/sh")
        .env("MGPU_SOCKET", &s.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn have_script() -> bool {
    Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The job's stdin is a terminal of the right size, its controlling one, owned by its user
/// (mode 0600);
/// window size changes follow.
#[test]
fn pty_gives_the_job_its_own_terminal_sized_like_sruns() {
    let Some((a, _)) = test_users() else { return };
    if !have_script() {
        eprintln!("skipping: no script(1)");
        return;
    }
    let s = Server::start("1x24GiB", &[]);
    let srun = bin("mgpu_srun").display().to_string();
    let job = "tty; stty size; stat -c %U:%a \\$(tty); trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.1; done";
    let cmd = format!(
        "stty rows 30 cols 100; {srun} --pty -- sh -c \"{job}\" </dev/tty & sleep 0.5; while [ ! -e ready.flag ]; do sleep 0.1; done; stty rows 40 cols 120; wait"
    );
    let mut child = in_terminal(&s, Some(&a), &cmd);
    let _keep_open = child.stdin.take();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "ended early: {seen}");
        seen.push_str(&line);
        if line.starts_with("ready") {
            break;
        }
    }
    let lines: Vec<&str> = seen.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{seen}");
    assert_eq!(lines[1], "30 100", "{seen}");
    // Its alone: no group (a shared primary group) may write into it (review finding 8).
    assert_eq!(
        lines[2],
        format!("{}:600", a.name),
        "the terminal is the job user's alone: {seen}"
    );
    std::fs::write(a.home.join("ready.flag"), "").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let _ = std::fs::remove_file(a.home.join("ready.flag"));
    let status = child.wait().unwrap();
    assert!(rest.contains("40 120"), "{rest}");
    assert!(status.success(), "{rest}");
}

/// Without a terminal, --pty is refused at once and nothing is submitted.
#[test]
fn pty_without_a_terminal_is_refused() {
    let s = Server::start("1x24GiB", &[]);
    assert_fails_with(
        &s.cmd("mgpu_srun").args(["--pty", "bash"]).output().unwrap(),
        "--pty needs a terminal on stdin",
    );
    assert!(s.queue_json()["jobs"].as_array().unwrap().is_empty());
}

/// Keystrokes reach an interactive shell, and Ctrl-C reaches the job as SIGINT (through its
/// terminal), not srun.
#[test]
fn keystrokes_and_ctrl_c_reach_the_job() {
    if !have_script() {
        eprintln!("skipping: no script(1)");
        return;
    }
    let s = Server::start("1x24GiB", &[]);
    let srun = bin("mgpu_srun").display().to_string();
    let mut child = in_terminal(&s, None, &format!("{srun} --pty -- sh"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"echo hello-$((1+2))\r").unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("hello-3\r\n") {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "ended early: {seen}");
        seen.push_str(&line);
    }
    input
        .write_all(b"trap 'echo got-int; exit 5' INT; echo armed; while :; do sleep 0.1; done\r")
        .unwrap();
    while !seen.contains("armed\r\n") || !seen.ends_with("armed\r\n") {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "ended early: {seen}");
        seen.push_str(&line);
    }
    input.write_all(b"\x03").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(rest.contains("got-int"), "{seen}{rest}");
    assert_eq!(status.code(), Some(5), "{seen}{rest}");
}

/// A terminal session ends at its time limit: never context-switched and restarted from its
/// command (where a plain job would be, with others waiting).
#[test]
fn a_pty_session_ends_at_its_time_limit() {
    if !have_script() {
        eprintln!("skipping: no script(1)");
        return;
    }
    let s = Server::start("1x24GiB", &[]);
    let srun = bin("mgpu_srun").display().to_string();
    let mut child = in_terminal(
        &s,
        None,
        &format!("{srun} --pty -t 1s -- sh -c 'echo on; sleep 60'"),
    );
    let _keep_open = child.stdin.take();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "on\r\n");
    let waiting = s.detached(&["--", "true"]);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "{rest}");
    assert!(rest.contains("TIMEOUT"), "{rest}");
    s.acct(waiting);
    let acct = s.ok("mgpu_acct", &["--json", "--state", "TIMEOUT"]);
    assert!(acct.contains("\"restarts\": 0"), "{acct}");
}
