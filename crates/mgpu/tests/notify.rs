//! "Tell me when it ends": `mgpu_srun --notify CMD` and `--mail-type`/`--mail-user` through
//! the local sendmail, both run as the job's owner, never as root.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Waits for a file the notification writes (written to a temporary name, then renamed).
fn wait_file(path: &Path) -> String {
    wait_until(Duration::from_secs(30), || path.exists());
    std::fs::read_to_string(path).unwrap()
}

/// The command runs as the job's owner, with the job's id, name, state and exit code; a
/// pending job cancelled after a restart still notifies (the request is durable).
#[test]
fn notify_runs_as_the_owner_with_the_outcome_and_survives_a_restart() {
    let Some((a, b)) = test_users() else { return };
    let mut s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.display().to_string();
    let notify = format!(
        "{{ env | grep ^MGPU_JOB_; id -u; }} > {dir}/n.$MGPU_JOB_ID.tmp && mv {dir}/n.$MGPU_JOB_ID.tmp {dir}/n.$MGPU_JOB_ID"
    );
    let failed = s.detached_as(
        &a,
        &[
            "-J", "my-run", "--notify", &notify, "--", "sh", "-c", "exit 3",
        ],
    );
    let got = wait_file(&s.scratch.join(format!("n.{failed}")));
    assert!(got.contains(&format!("MGPU_JOB_ID={failed}\n")), "{got}");
    assert!(got.contains("MGPU_JOB_NAME=my-run\n"), "{got}");
    assert!(got.contains("MGPU_JOB_STATE=FAILED\n"), "{got}");
    assert!(got.contains("MGPU_JOB_EXIT_CODE=3\n"), "{got}");
    assert!(got.ends_with(&format!("{}\n", a.uid)), "{got}");
    let meta = std::fs::metadata(s.scratch.join(format!("n.{failed}"))).unwrap();
    assert_eq!(meta.uid(), a.uid, "written as the owner, not root");
    // Durable: a job that waits while the server restarts notifies when it ends.
    let blocker = s.detached_as(&b, &["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let waiting = s.detached_as(&b, &["--notify", &notify, "--", "true"]);
    s.restart();
    let out = s
        .cmd_as(&b, "mgpu_cancel")
        .arg(waiting.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = wait_file(&s.scratch.join(format!("n.{waiting}")));
    assert!(got.contains("MGPU_JOB_STATE=CANCELLED\n"), "{got}");
    assert!(got.ends_with(&format!("{}\n", b.uid)), "{got}");
    let meta = std::fs::metadata(s.scratch.join(format!("n.{waiting}"))).unwrap();
    assert_eq!(meta.uid(), b.uid);
}

/// Found by an attack review: a job that ended while no server ran (killed with -9) was
/// recorded at the restart, but its notification never ran. It runs now, with the outcome.
#[test]
fn a_job_that_ends_while_no_server_runs_still_notifies() {
    let Some((a, _)) = test_users() else { return };
    let mut s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.display().to_string();
    let notify =
        format!("echo $MGPU_JOB_STATE $MGPU_JOB_EXIT_CODE > {dir}/n.tmp && mv {dir}/n.tmp {dir}/n");
    let script = format!("while [ ! -e {dir}/go ]; do sleep 0.05; done; touch {dir}/ended; exit 4");
    let id = s.detached_as(&a, &["--notify", &notify, "--", "sh", "-c", &script]);
    s.wait_state(id, "RUNNING");
    s.kill9();
    std::fs::write(s.scratch.join("go"), "").unwrap();
    wait_until(Duration::from_secs(60), || s.scratch.join("ended").exists());
    // (Its supervisor records the end once the job's processes are gone.)
    std::thread::sleep(Duration::from_secs(1));
    s.restart();
    assert_eq!(wait_file(&s.scratch.join("n")), "FAILED 4\n");
    assert!(
        s.server_log()
            .contains("recorded the end of a job from before the restart"),
        "the job ended after the restart: the test did not test it\n{}",
        s.server_log()
    );
}

/// A directory for a test's sendmail and what it writes, which the job's owner (who runs the
/// mail program) may write to.
fn mail_dir() -> tempfile::TempDir {
    let tmp = tempfile::Builder::new()
        .prefix("mgpu-mail-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    tmp
}

/// Mail goes through the machine's sendmail, run as the job's owner, on BEGIN and END (ALL);
/// without a sendmail, mail is refused at submit with what to use instead; Slurm's other mail
/// types are refused by name.
#[test]
fn mail_is_sent_as_the_owner_through_sendmail_or_refused() {
    let Some((a, _)) = test_users() else { return };
    let tmp = mail_dir();
    let sendmail = tmp.path().join("sendmail");
    let out = tmp.path().display().to_string();
    write_file(
        &sendmail,
        &format!(
            "#!/bin/sh\n{{ id -u; echo \"$*\"; cat; }} > {out}/m.$$.tmp && mv {out}/m.$$.tmp {out}/m.$$\n"
        ),
        0o755,
    );
    let s = Server::start("1x24GiB", &["--sendmail", sendmail.to_str().unwrap()]);
    let id = s.detached_as(
        &a,
        &[
            "-J",
            "mailed",
            "--mail-type=ALL",
            "--mail-user",
            "someone@example.org",
            "--",
            "true",
        ],
    );
    let mut mails: Vec<String> = Vec::new();
    wait_until(Duration::from_secs(30), || {
        mails = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| {
                let p = e.unwrap().path();
                let n = p.file_name().unwrap().to_str().unwrap().to_string();
                (n.starts_with("m.") && !n.ends_with(".tmp"))
                    .then(|| std::fs::read_to_string(p).unwrap())
            })
            .collect();
        mails.len() == 2
    });
    mails.sort_by_key(|m| !m.contains("Began"));
    for m in &mails {
        assert!(
            m.starts_with(&format!("{}\n-oi -- someone@example.org\n", a.uid)),
            "{m}"
        );
        assert!(m.contains("To: someone@example.org\n"), "{m}");
    }
    assert!(
        mails[0].contains(&format!("Subject: mgpu Job_id={id} Name=mailed Began")),
        "{}",
        mails[0]
    );
    assert!(
        mails[1].contains("Ended, COMPLETED, ExitCode 0"),
        "{}",
        mails[1]
    );
    let nomail = Server::start("1x24GiB", &["--sendmail", "/nonexistent/sendmail"]);
    assert_fails_with(
        &nomail
            .cmd("mgpu_srun")
            .args(["--mail-type=END", "--", "true"])
            .output()
            .unwrap(),
        "this machine cannot send mail (no /nonexistent/sendmail); use --notify",
    );
    assert_fails_with(
        &nomail
            .cmd("mgpu_srun")
            .args(["--mail-type=TIME_LIMIT", "--", "true"])
            .output()
            .unwrap(),
        "mail type 'TIME_LIMIT' is not supported",
    );
    assert!(nomail.queue_json()["jobs"].as_array().unwrap().is_empty());
}

/// A notification that does not end is killed (its whole process group) after the server's
/// --notify-time-limit; the server is not held up by it.
#[test]
fn a_notification_that_hangs_is_killed() {
    let Some((a, _)) = test_users() else { return };
    let s = Server::start("1x24GiB", &["--notify-time-limit", "1"]);
    let dir = s.scratch.display().to_string();
    // (The second one leaves the process group: its cgroup takes it, where there is one.)
    let notify = format!(
        "sleep 1000 & echo $! > {dir}/pid.tmp; setsid sleep 1000 & echo $! >> {dir}/pid.tmp; \
         mv {dir}/pid.tmp {dir}/pid; wait"
    );
    s.detached_as(&a, &["--notify", &notify, "--", "true"]);
    let pids: Vec<i32> = wait_file(&s.scratch.join("pid"))
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    // Meanwhile the server serves others.
    s.ok("mgpu_queue", &[]);
    let cgroups = mgpu_daemon::cgroup::jobs_base().is_some();
    for pid in pids.iter().take(if cgroups { 2 } else { 1 }) {
        wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |st| st.contains(") Z "))
        });
    }
    if !cgroups {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pids[1]),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A job's END notification that starts while its BEGIN mail still runs gets a cgroup of
/// its own: what it leaves behind outside its session is killed when it ends, and the mail
/// is sent. Both used to be named after the job and the daemon, so on pure cgroup v2 the
/// second ran without one (found by reading the code in an attack review). On a hybrid
/// layout like CI's the two shared a v1 cgroup, and this test passed then too.
#[test]
fn overlapping_notifications_of_one_job_are_each_contained() {
    let Some((a, _)) = test_users() else { return };
    if mgpu_daemon::cgroup::jobs_base().is_none() {
        return; // Without cgroups a process that leaves the session is not followed.
    }
    let tmp = mail_dir();
    // A slow mail program: the BEGIN mail still runs when the job has ended.
    let sendmail = tmp.path().join("sendmail");
    let mailed = tmp.path().join("mailed");
    write_file(
        &sendmail,
        &format!(
            "#!/bin/sh\ncat > /dev/null; sleep 3; touch {}\n",
            mailed.display()
        ),
        0o755,
    );
    let s = Server::start("1x24GiB", &["--sendmail", sendmail.to_str().unwrap()]);
    let dir = s.scratch.display().to_string();
    // (The pid is the sleep's own: setsid may fork before it execs.)
    let notify = format!(
        "setsid sh -c 'echo $$ > {dir}/pid.tmp; mv {dir}/pid.tmp {dir}/pid; exec sleep 1000' & \
         while [ ! -e {dir}/pid ]; do sleep 0.05; done"
    );
    s.detached_as(
        &a,
        &[
            "--mail-type=BEGIN",
            "--mail-user",
            "someone@example.org",
            "--notify",
            &notify,
            "--",
            "true",
        ],
    );
    let pid: i32 = wait_file(&s.scratch.join("pid")).trim().parse().unwrap();
    wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| st.contains(") Z "))
    });
    // And the END notification's clean-up did not take the BEGIN mail with it.
    wait_until(Duration::from_secs(30), || mailed.exists());
}

/// One user's many hanging notifications do not hold back another user's: at most 2 of a
/// user's run at once and users take turns, so B's runs while A's 20 still hang; A's then all
/// run once they may end.
#[test]
fn one_users_hanging_notifications_do_not_hold_back_anothers() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &["--notify-time-limit", "300"]);
    let dir = s.scratch.display().to_string();
    let hang = format!("touch {dir}/a.$MGPU_JOB_ID; while [ ! -e {dir}/go ]; do sleep 0.1; done");
    let ids: Vec<u64> = (0..20)
        .map(|_| s.detached_as(&a, &["--notify", &hang, "--", "true"]))
        .collect();
    let started = || {
        ids.iter()
            .filter(|id| s.scratch.join(format!("a.{id}")).exists())
            .count()
    };
    wait_until(Duration::from_secs(60), || started() == 2);
    s.detached_as(&b, &["--notify", &format!("touch {dir}/b"), "--", "true"]);
    wait_until(Duration::from_secs(60), || s.scratch.join("b").exists());
    assert_eq!(
        started(),
        2,
        "at most 2 of one user's notifications run at once"
    );
    std::fs::write(s.scratch.join("go"), "").unwrap();
    wait_until(Duration::from_secs(120), || started() == ids.len());
}

/// A notification command gets a login's limits (limits.conf), as a job does, not the
/// daemon's raised open-files limit.
#[test]
fn a_notification_gets_a_logins_limits() {
    let Some((a, _)) = test_users() else { return };
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(
        conf.path().join("limits.conf"),
        format!("{} - nofile 1234\n", a.name),
    )
    .unwrap();
    let s = Server::start(
        "1x24GiB",
        &["--limits-conf-dir", conf.path().to_str().unwrap()],
    );
    let dir = s.scratch.display().to_string();
    let notify = format!("echo $(ulimit -Sn) $(ulimit -Hn) > {dir}/n.tmp; mv {dir}/n.tmp {dir}/n");
    s.detached_as(&a, &["--notify", &notify, "--", "true"]);
    assert_eq!(wait_file(&s.scratch.join("n")).trim(), "1234 1234");
}
