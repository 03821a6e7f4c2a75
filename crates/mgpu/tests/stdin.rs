//! An attached job's stdin is the user's: `echo hi | mgpu_srun -- cat` prints hi. The server
//! makes a pipe and passes its write end to srun (`SCM_RIGHTS`, server to client only: the
//! server never takes a user's descriptor), srun copies its stdin into it; the job's first run
//! gets the read end as its stdin (the daemon never reads or writes it: the kernel's pipe
//! buffer, the writer's own backpressure, EOF as srun's input ends or srun goes away).

mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;

/// Piped input reaches the attached job, several MB of it whole, also when the job waited in
/// the queue first; a detached job's stdin stays /dev/null.
#[test]
fn piped_stdin_reaches_the_attached_job() {
    let s = Server::start("1x24GiB", &[]);
    let big = 6 * 1024 * 1024 + 7;
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "sh", "-c", "wc -c; echo end"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = srun.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = big;
        while left > 0 {
            let n = left.min(chunk.len());
            input.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
    });
    let out = srun.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
        [big.to_string().as_str(), "end"]
    );
    // A job that waits first gets its stdin when it starts.
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    srun.stdin
        .take()
        .unwrap()
        .write_all(b"after the wait\n")
        .unwrap();
    wait_until(std::time::Duration::from_secs(30), || {
        s.pending_order().len() == 1
    });
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
    let out = srun.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "after the wait\n");
    // Detached: /dev/null, whatever srun's stdin.
    let mut det = s
        .cmd("mgpu_srun")
        .args(["--detach", "--parsable", "--", "sh", "-c", "cat; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    det.stdin
        .take()
        .unwrap()
        .write_all(b"not for the job\n")
        .unwrap();
    let out = det.wait_with_output().unwrap();
    let id: u64 = text(&out.stdout).trim().parse().unwrap();
    s.acct(id);
    assert_eq!(s.log(id), "done\n");
}

/// Two users' attached jobs each read their own user's input, as that user; the job's stdin
/// is the user's own descriptor, so nothing another user sends can reach it.
#[test]
fn each_user_feeds_only_their_own_job() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &[]);
    let spawn = |u: &TestUser| {
        s.cmd_as(u, "mgpu_srun")
            .args(["--", "sh", "-c", "id -u; cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut ja, mut jb) = (spawn(&a), spawn(&b));
    ja.stdin.take().unwrap().write_all(b"from a\n").unwrap();
    jb.stdin.take().unwrap().write_all(b"from b\n").unwrap();
    let (oa, ob) = (
        ja.wait_with_output().unwrap(),
        jb.wait_with_output().unwrap(),
    );
    assert!(oa.status.success(), "{}", text(&oa.stderr));
    assert!(ob.status.success(), "{}", text(&ob.stderr));
    assert_eq!(text(&oa.stdout), format!("{}\nfrom a\n", a.uid));
    assert_eq!(text(&ob.stdout), format!("{}\nfrom b\n", b.uid));
}
