//! Isolation (issue 12, items 2, 5 and 9): one user's connections cannot stall the server or
//! take its memory, a stalled server kills no job, and a refused client hears why. The attacks
//! run as a real unprivileged account (needs root; skipped otherwise).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::attack::{attack_helper_main, peak_rss_kib, Attacker};
use common::*;
use serde_json::Value;

/// The attacker side of these tests (run by [`Attacker::start`]; does nothing otherwise).
#[test]
#[ignore]
fn attack_helper() {
    attack_helper_main();
}

/// The finished job's accounting record, once it has one.
fn finished(s: &Server, id: u64, limit: Duration) -> Value {
    let mut rec = Value::Null;
    wait_until(limit, || {
        let out = s
            .cmd("mgpu_acct")
            .args(["--json", "-j", &id.to_string()])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        rec = v["jobs"][0].clone();
        !rec.is_null()
    });
    rec
}

/// The job's state as `mgpu_queue -j` shows it (a short listing, whatever the queue's size).
fn state_of(s: &Server, id: u64) -> Option<String> {
    let out = s
        .cmd("mgpu_queue")
        .args(["--json", "-j", &id.to_string()])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["jobs"][0]["state"].as_str().map(str::to_string)
}

/// Queues `n` pending jobs of `user` fast: job arrays of 10,000 tasks that run one at a time
/// (`%1`) and share a GPU with everyone (a few MiB each).
fn flood_queue(s: &Server, user: &TestUser, n: usize) -> Vec<u64> {
    (0..n.div_ceil(10_000))
        .map(|_| {
            s.detached_as(
                user,
                &["--array", "0-9999%1", "--mem", "1", "--", "sleep", "600"],
            )
        })
        .collect()
}

/// A job printing numbered lines for about `secs` seconds; its log ends with `done N`.
fn chatty(secs: u32) -> String {
    numbered_lines_job(secs, 0, "0.002")
}

/// The same with `pad` zeros after each line's number (more output per line).
fn chatty_padded(secs: u32, pad: usize) -> String {
    numbered_lines_job(secs, pad, "0.002")
}

/// Item 2: twenty `queue` requests whose answers are never read, with ~50k queued jobs, used to
/// make the server build and hold every reply (1.7 GB) and stall it until supervisors gave up
/// on it, and then a healthy job of another user was killed. Now each reply goes out page by
/// page under a write deadline from a bounded snapshot: the other user's queue answers, her
/// running job completes with all its output, and the server's memory stays bounded.
#[test]
fn never_reading_queue_clients_stall_no_one_and_kill_no_job() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &[]);
    let job = s.detached_as(&b, &["--mem", "1", "--", "bash", "-c", &chatty(25)]);
    let t = Instant::now();
    flood_queue(&s, &a, 50_000);
    eprintln!("queued 50,000 jobs in {:?}", t.elapsed());
    let attack = Attacker::start(&s, &a, "queue-noread 20");
    // Her listing of the whole queue still comes, whole.
    let t = Instant::now();
    for _ in 0..3 {
        let out = s.cmd_as(&b, "mgpu_queue").arg("--json").output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["jobs"].as_array().unwrap().len() >= 50_000);
    }
    eprintln!(
        "3 listings of 50,000 jobs for another user in {:?}",
        t.elapsed()
    );
    let rec = finished(&s, job, Duration::from_secs(300));
    let rss = peak_rss_kib(s.pid());
    eprintln!("server peak RSS: {} MiB", rss >> 10);
    drop(attack);
    assert_eq!(rec["state"], "COMPLETED", "{rec}\n{}", s.server_log());
    assert_numbered_lines(&s.log(job), 0);
    // Measured: about 60 MiB (debug build); the old server took over 1 GiB.
    assert!(rss < 400 << 10, "server peak RSS {} MiB", rss >> 10);
    assert!(state_of(&s, job).is_none());
}

/// Item 2: a server stopped (SIGSTOP) for a minute while another user's chatty job runs, then
/// resumed, loses no job: the supervisor gives up on the link once 1 MiB waits for the server
/// (the job prints 1 KB lines every few ms) and keeps the output in the log, the server links
/// to it again (it is alive: its lock says so), and the job ends COMPLETED with its whole
/// output; a follower of the log misses nothing either.
#[test]
fn a_server_stopped_for_a_minute_loses_no_job() {
    let Some((_a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    // (About 1 KB a line: well over 1 MiB waits within the minute even on a loaded machine.)
    let job = s.detached_as(&b, &["--", "bash", "-c", &chatty_padded(70, 1000)]);
    wait_until(Duration::from_secs(120), || {
        state_of(&s, job).as_deref() == Some("RUNNING")
    });
    let follower = s
        .cmd_as(&b, "mgpu_log")
        .args(["--follow", &job.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read as it comes, as a terminal would: a follower that stops reading is dropped.
    let mut follower = follower;
    let mut stdout = follower.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut buf).unwrap();
        buf
    });
    std::thread::sleep(Duration::from_secs(2));
    let pid = nix::unistd::Pid::from_raw(s.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(60));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let rec = finished(&s, job, Duration::from_secs(180));
    assert_eq!(rec["state"], "COMPLETED", "{rec}\n{}", s.server_log());
    assert!(
        s.server_log()
            .contains("linked again to the job's supervisor"),
        "the link never broke: the test did not test it"
    );
    let log = s.log(job);
    assert_numbered_lines(&log, 1000);
    let out = follower.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&reader.join().unwrap()),
        log,
        "the follower missed output"
    );
}

/// Item 5: unfinished frames are bounded by the request's type (a submit's header over 4 MiB
/// is refused at once) and, together, by a memory budget per user: one user's 16 unfinished
/// 4 MiB submits are partly refused with a clear reason, and another user is served.
#[test]
fn unfinished_frames_are_bounded_per_user() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let big = Attacker::start(&s, &a, &format!("partial 2 {}", 8 << 20));
    assert!(
        big.report.starts_with("refused=2 ") && big.report.contains("too large"),
        "{}",
        big.report
    );
    let many = Attacker::start(&s, &a, &format!("partial 16 {}", 4 << 20));
    eprintln!("{}", many.report);
    let refused: usize = many.report["refused=".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // (7 fit in the 32 MiB budget at once.)
    assert!(
        refused >= 1 && many.report.contains("per user"),
        "{}",
        many.report
    );
    // Meanwhile another user is served.
    let out = s
        .cmd_as(&b, "mgpu_srun")
        .args(["--", "echo", "served"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "served\n");
    let rss = peak_rss_kib(s.pid());
    eprintln!("server peak RSS: {} MiB", rss >> 10);
    // Measured: 45 MiB (debug build), the budget (32 MiB) included.
    assert!(rss < 100 << 10, "server peak RSS {} MiB", rss >> 10);
}

/// Item 9: a client over the per-user connection cap hears why, instead of a bare "Broken
/// pipe"; other users are not affected.
#[test]
fn a_client_over_the_connection_cap_is_told_why() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let _held = Attacker::start(&s, &a, "hold 256");
    let out = s.cmd_as(&a, "mgpu_queue").output().unwrap();
    assert_fails_with(&out, "256 connections");
    assert!(!text(&out.stderr).contains("Broken pipe"));
    let out = s.cmd_as(&b, "mgpu_queue").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Whoever keeps the server's queue of connections not yet accepted full (here the server is
/// stopped while it fills up; a user connecting in a loop faster than it accepts does the
/// same) does not make another user's command fail: it waits its turn, and is served once
/// the server accepts again.
#[test]
fn a_full_connection_queue_makes_other_users_wait_not_fail() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Some((_a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let pid = nix::unistd::Pid::from_raw(s.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let addr = UnixAddr::new(&s.socket).unwrap();
    let mut queued = Vec::new();
    let full = (0..100_000).any(|_| {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let r = connect(sock.as_raw_fd(), &addr);
        queued.push(sock);
        r == Err(nix::errno::Errno::EAGAIN)
    });
    assert!(full, "the queue never filled up");
    let victim = s
        .cmd_as(&b, "mgpu_queue")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut victim = victim;
    let early = victim.try_wait().unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    drop(queued);
    let out = victim.wait_with_output().unwrap();
    assert!(
        early.is_none(),
        "mgpu_queue gave up while the queue was full: {}",
        text(&out.stderr)
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Item 5: followers that never read cost the server no memory for the output they do not
/// take: a job printing 100 MB with 20 such followers of its log, and the server's memory stays
/// small; the job completes.
#[test]
fn never_reading_followers_hold_no_output() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let start = peak_rss_kib(s.pid());
    // It prints once its followers are in place.
    let go = s.scratch.join("go");
    let job = s.detached_as(
        &a,
        &[
            "--",
            "bash",
            "-c",
            &format!(
                "while [ ! -e {} ]; do sleep 0.05; done; head -c 100000000 /dev/zero | tr '\\0' x; echo",
                go.display()
            ),
        ],
    );
    let followers = Attacker::start(&s, &a, &format!("follow-noread {job} 20"));
    std::fs::write(&go, "").unwrap();
    let rec = finished(&s, job, Duration::from_secs(300));
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    let rss = peak_rss_kib(s.pid());
    eprintln!("server peak RSS: {} MiB", rss >> 10);
    drop(followers);
    // Measured: 11 MiB at start, 16 MiB at the peak (debug build); the old server kept the
    // last 512 chunks of output (32 MiB) for followers that do not read.
    assert!(
        rss < start + (12 << 10),
        "server peak RSS {} MiB, {} MiB at start",
        rss >> 10,
        start >> 10
    );
}

/// The write deadline drops an attached `mgpu_srun` that stops reading (here: stopped with
/// SIGSTOP while its job prints), but its job goes on, and once it reads again it re-attaches
/// and gets every byte.
#[test]
fn an_attached_srun_that_stops_reading_keeps_its_job() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let mut srun = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--", "bash", "-c", "seq 1 400000; sleep 30; echo end"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(srun.id() as i32);
    let mut stdout = srun.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    });
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // Past the server's write deadline (20 s).
    std::thread::sleep(Duration::from_secs(25));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let status = srun.wait().unwrap();
    let out = reader.join().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut srun.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    let want: String = (1..=400_000).map(|i| format!("{i}\n")).collect::<String>() + "end\n";
    assert!(
        out == want,
        "output differs ({} bytes, {} expected): {err}",
        out.len(),
        want.len()
    );
}

/// Whether this kernel can refuse descriptors passed on a UNIX socket (`SO_PASSRIGHTS`,
/// Linux 6.16+).
fn kernel_refuses_rights() -> bool {
    use std::os::fd::AsRawFd;
    let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap();
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads the int we own.
    unsafe {
        libc::setsockopt(
            x.as_raw_fd(),
            libc::SOL_SOCKET,
            83, // SO_PASSRIGHTS
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Review finding 1: a user passes the server a descriptor whose last close waits (a TCP
/// socket with a full send buffer, a peer that never reads, SO_LINGER 600 s) on 2 bytes after
/// its hello. The kernel refuses it (SO_PASSRIGHTS: the sender's sendmsg fails with EPERM) and
/// the server keeps answering root. (60 s is a liveness bound, not a timing assertion: the
/// close, run by the server, would hold its thread 600 s.)
#[test]
fn a_passed_descriptor_never_stalls_the_server() {
    let Some((a, _b)) = test_users() else { return };
    if !kernel_refuses_rights() {
        eprintln!("skipping: this kernel has no SO_PASSRIGHTS (before 6.16); the server warns of it at startup (docs/security.md)");
        return;
    }
    let s = Server::start("1x24GiB", &[]);
    let attack = Attacker::start(&s, &a, "pass-lingering");
    let report = attack.report.clone();
    eprintln!("{report}");
    let mut queue = s
        .cmd("mgpu_queue")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut status = None;
    while t.elapsed() < Duration::from_secs(60) {
        status = queue.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = queue.kill();
    }
    let _ = queue.wait();
    eprintln!("mgpu_queue answered in {:?}", t.elapsed());
    drop(attack);
    assert!(
        status.is_some_and(|st| st.success()),
        "the server did not answer root within 60 s after a user passed it a lingering socket ({report})\n{}",
        s.server_log()
    );
    assert_eq!(
        report, "sendmsg=EPERM",
        "the kernel should refuse the descriptor"
    );
}
