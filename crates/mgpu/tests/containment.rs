//! Containment of jobs (needs root and real accounts; skipped otherwise): no user can make a
//! root process wait on code of theirs, and per-job cgroup limits hold.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A background loop run as `user` (real uid, gid and groups); killed on drop.
struct AsUser(Child);

impl AsUser {
    fn start(user: &TestUser, script: &str) -> AsUser {
        let child = Command::new("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--init-groups")
            .args(["--", "/bin/bash", "-c", script])
            .current_dir(&user.home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        AsUser(child)
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An account of its own for a test whose attack hits every process of its user (`kill -1`):
/// no other test's processes may be among them.
fn own_user(name: &str) -> Option<TestUser> {
    test_users()?;
    Some(ensure_account(name, &[]))
}

/// Processes of `uid` that are stopped (state T), with their command names.
fn stopped_processes_of(uid: u32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let real_uid = field("Uid:").split_whitespace().next().map(str::to_string);
        if real_uid == Some(uid.to_string()) && field("State:").starts_with('T') {
            out.push((pid, field("Name:")));
        }
    }
    out
}

/// Item 1 of the isolation issue: the user stops the job's first process while it walks a
/// very long PATH as the user (between dropping privileges and exec). No root process may be
/// left waiting on it: root's cancel ends the job, and its GPU goes to another user's job.
#[test]
fn a_job_stopped_before_exec_is_still_cancelled_and_frees_its_gpu() {
    let Some((a, _)) = test_users() else { return };
    // Its own account: the attack stops every process of its user.
    let b = own_user("mgpu-test-stop").unwrap();
    let s = Server::start("1x24GiB", &[]);
    // The GPU is taken, so that b's job starts while b's stopper already runs (b's own srun
    // would be stopped too otherwise).
    let blocker = s.detached(&["--no-venv", "--", "sleep", "600"]);
    s.wait_state(blocker, "RUNNING");
    let mut path: String = (0..12_000).map(|i| format!("/n/{i}:")).collect();
    path.push_str("/usr/bin:/bin");
    let mut c = s.cmd_as(&b, "mgpu_srun");
    c.env("PATH", &path)
        .args(["--detach", "--parsable", "--no-venv", "--", "sleep", "600"]);
    let job = s.submit(c);
    s.wait_state(job, "PENDING");
    let stopper = AsUser::start(&b, "while :; do kill -STOP -1 2>/dev/null; done");
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
    s.wait_state(job, "RUNNING");
    // Wait until the stopper caught a process of the job (before or after its exec).
    wait_until(Duration::from_secs(120), || {
        !stopped_processes_of(b.uid).is_empty()
    });
    let caught = stopped_processes_of(b.uid);
    drop(stopper);
    eprintln!("stopped processes of {}: {caught:?}", b.name);
    s.ok("mgpu_cancel", &[&job.to_string()]);
    // A bounded wait: a supervisor stuck on the stopped process never ends the job.
    s.wait_gone(job);
    assert_eq!(s.acct(job)["state"], "CANCELLED", "{}", s.server_log());
    // Its GPU is free: another user's job runs and completes.
    let next = s.detached_as(&a, &["--no-venv", "--", "true"]);
    s.wait_gone(next);
    assert_eq!(s.acct(next)["state"], "COMPLETED");
    // Nothing of b's job is left, stopped or not.
    wait_until(Duration::from_secs(60), || {
        stopped_processes_of(b.uid).is_empty()
    });
}

/// Pids of processes whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The daemon's last resort: a job whose supervisor does not carry out a stop (here: the
/// supervisor is stopped) is killed by the daemon itself once the grace period and a margin
/// have passed; the job ends CANCELLED when the supervisor comes back.
#[test]
fn the_daemon_kills_a_job_its_supervisor_did_not_stop() {
    if !is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let s = Server::start("1x24GiB", &["--grace-period", "1"]);
    // A command line of this test's own (the search looks at every process of the machine).
    let secs = format!("6093.{}", std::process::id());
    let marker = ["sleep", secs.as_str()];
    let job = s.detached(&["--no-venv", "--", marker[0], marker[1]]);
    s.wait_state(job, "RUNNING");
    let mut leader = Vec::new();
    wait_until(Duration::from_secs(60), || {
        leader = pids_running(&marker);
        !leader.is_empty()
    });
    let supervisor = nix::unistd::Pid::from_raw(parent_of(leader[0]));
    nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGSTOP).unwrap();
    s.ok("mgpu_cancel", &[&job.to_string()]);
    // Killed although its supervisor never heard the stop (a bounded wait).
    wait_until(Duration::from_secs(120), || {
        pids_running(&marker).is_empty()
    });
    nix::sys::signal::kill(supervisor, nix::sys::signal::Signal::SIGCONT).unwrap();
    s.wait_gone(job);
    assert_eq!(s.acct(job)["state"], "CANCELLED");
    assert!(
        s.server_log().contains("outlived its stop deadline"),
        "{}",
        s.server_log()
    );
}

/// Cgroup directories of run `job` under supervisor `pid`, in every cgroup hierarchy mounted.
fn job_cgroups(job: u64, pid: u32) -> Vec<std::path::PathBuf> {
    fn walk(dir: &std::path::Path, name: &str, depth: u32, out: &mut Vec<std::path::PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        std::path::Path::new("/sys/fs/cgroup"),
        &format!("job-{job}-{pid}"),
        8,
        &mut out,
    );
    out
}

/// The cgroups of a running job, once its process is in them.
fn running_cgroups(s: &Server, job: u64) -> Vec<std::path::PathBuf> {
    let pid = supervisor_of(s, job);
    let mut dirs = Vec::new();
    wait_until(Duration::from_secs(60), || {
        dirs = job_cgroups(job, pid);
        dirs.iter().any(|d| {
            std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
        })
    });
    dirs
}

/// The supervisor pid the server logged for `job`'s start.
fn supervisor_of(s: &Server, job: u64) -> u32 {
    let started = |l: &&str| l.contains("job started") && l.contains(&format!("job={job} "));
    // Logged just after the job shows as running.
    wait_until(Duration::from_secs(60), || {
        s.server_log().lines().any(|l| started(&l))
    });
    let log = s.server_log();
    let line = log.lines().find(started).unwrap();
    line.split("supervisor=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Start errors of a job run as its user are shown as they always were (127 not found, 126
/// not executable, with the reason), and a failed start leaves no cgroup behind.
#[test]
fn a_failed_start_is_reported_and_leaves_no_cgroup() {
    let Some((a, _)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let script = s.scratch.join("not-executable");
    write_file(&script, "#!/bin/sh\necho hi\n", 0o644);
    for (argv, code, says) in [
        (
            vec!["no-such-command-here"],
            127,
            "cannot execute 'no-such-command-here': No such file",
        ),
        (vec![script.to_str().unwrap()], 126, "Permission denied"),
    ] {
        let out = s
            .cmd_as(&a, "mgpu_srun")
            .env("PATH", "/usr/bin:/bin")
            .args(["--no-venv", "--"])
            .args(&argv)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    }
    for job in [1, 2] {
        assert_eq!(s.acct(job)["state"], "FAILED");
        assert!(
            s.log(job).contains("mgpu: cannot execute"),
            "{}",
            s.log(job)
        );
        let pid = supervisor_of(&s, job);
        // The supervisor removes the cgroup before it reports the end.
        assert_eq!(job_cgroups(job, pid), Vec::<std::path::PathBuf>::new());
    }
}

/// Skips (with the reason) where this machine has no cgroup controller for `c`.
fn enforces(c: mgpu_daemon::cgroup::Controller) -> bool {
    let ok = mgpu_daemon::cgroup::layout().enforces(c);
    if !ok {
        eprintln!("skipping: no {} cgroup controller here", c.name());
    }
    ok
}

/// The value of `file` in whichever of the job's cgroups has it.
fn cgroup_value(dirs: &[std::path::PathBuf], file: &str) -> Option<String> {
    dirs.iter()
        .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
        .map(|v| v.trim().to_string())
}

/// Processes whose real uid is `uid`.
fn processes_of(uid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next())
                    == Some(uid.to_string().as_str())
            })
        })
        .count()
}

/// Item 7: a fork bomb is bounded by the server's --job-pids-max, another user's job still
/// runs to completion, and cancelling the bomb leaves nothing behind.
#[test]
fn a_fork_bomb_is_bounded_by_pids_max() {
    use mgpu_daemon::cgroup::Controller;
    let Some((a, _)) = test_users() else { return };
    if !enforces(Controller::Pids) {
        return;
    }
    // Its own account: its processes are counted.
    let bomber = own_user("mgpu-test-bomb").unwrap();
    let s = Server::start("2x24GiB", &["--job-pids-max", "40"]);
    let bomb = s.detached_as(
        &bomber,
        &[
            "--no-venv",
            "--",
            "bash",
            "-c",
            "f() { while :; do f & sleep 0.1; done; }; f",
        ],
    );
    s.wait_state(bomb, "RUNNING");
    let dirs = running_cgroups(&s, bomb);
    assert_eq!(
        cgroup_value(&dirs, "pids.max").as_deref(),
        Some("40"),
        "{dirs:?}"
    );
    // The bomb reaches its bound and stays there.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cgroup_value(&dirs, "pids.events").is_none_or(|e| e.ends_with(" 0")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the bomb never reached pids.max: {dirs:?} {:?} {} processes; {}",
            cgroup_value(&dirs, "pids.events"),
            processes_of(bomber.uid),
            s.log(bomb)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..20 {
        assert!(
            processes_of(bomber.uid) <= 40,
            "{} processes",
            processes_of(bomber.uid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--no-venv", "--", "echo", "still-served"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "still-served\n", "{}", text(&out.stderr));
    s.ok("mgpu_cancel", &[&bomb.to_string()]);
    s.wait_gone(bomb);
    assert_eq!(s.acct(bomb)["state"], "CANCELLED");
    // (Orphans that were exiting as the job ended may wait a moment for their reaper.)
    wait_until(Duration::from_secs(60), || processes_of(bomber.uid) == 0);
    assert_eq!(
        job_cgroups(bomb, supervisor_of(&s, bomb)),
        Vec::<std::path::PathBuf>::new()
    );
}

/// One user's jobs share one bound on processes (--user-pids-max), in a parent cgroup of the
/// user's below which every job's cgroup sits: two jobs that each stay within their own cap
/// (--job-pids-max) cannot together pass it, and another user's job still runs. The parent
/// stays after the jobs are gone.
#[test]
fn a_users_jobs_together_are_bounded_by_user_pids_max() {
    use mgpu_daemon::cgroup::Controller;
    let Some((a, _)) = test_users() else { return };
    if !enforces(Controller::Pids) {
        return;
    }
    // Its own account: its processes are counted, and its bound is no other test's.
    let spawner = own_user("mgpu-test-upids").unwrap();
    // (A GPU left for the other user's job.)
    let s = Server::start(
        "3x24GiB",
        &["--job-pids-max", "40", "--user-pids-max", "60"],
    );
    // Each job's fork bomb forks until it can fork no more (a shell whose fork fails exits,
    // the others fork on); its main process forks nothing after it, and stays.
    let spawn = [
        "--no-venv",
        "--",
        "bash",
        "-c",
        "f() { while :; do f & sleep 0.1; done; }; f & exec sleep 300",
    ];
    let first = s.detached_as(&spawner, &spawn);
    let second = s.detached_as(&spawner, &spawn);
    s.wait_state(first, "RUNNING");
    s.wait_state(second, "RUNNING");
    let dirs = running_cgroups(&s, first);
    let user_dir = format!("user-{}", spawner.uid);
    let parents: Vec<std::path::PathBuf> = dirs
        .iter()
        .map(|d| d.parent().unwrap().to_path_buf())
        .collect();
    assert!(
        parents
            .iter()
            .all(|p| p.file_name().unwrap() == user_dir.as_str()),
        "{dirs:?}"
    );
    assert_eq!(cgroup_value(&dirs, "pids.max").as_deref(), Some("40"));
    assert_eq!(
        cgroup_value(&parents, "pids.max").as_deref(),
        Some("60"),
        "{parents:?}"
    );
    let second_dirs = running_cgroups(&s, second);
    assert!(
        second_dirs
            .iter()
            .all(|d| parents.contains(&d.parent().unwrap().to_path_buf())),
        "{second_dirs:?} {parents:?}"
    );
    // Together they reach the user's bound (each alone would stop at 40: 80 in all).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // (Cgroup v1 counts a failed fork in the job's pids.events only: the count is what tells.)
    while cgroup_value(&parents, "pids.current").as_deref() != Some("60") {
        assert!(
            std::time::Instant::now() < deadline,
            "the user's bound was never reached: {:?}, {} processes; {:?} {:?}",
            cgroup_value(&parents, "pids.current"),
            processes_of(spawner.uid),
            s.job(first),
            s.job(second),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        let n = processes_of(spawner.uid);
        assert!(n <= 60, "{n} processes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--no-venv", "--", "echo", "still-served"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "still-served\n", "{}", text(&out.stderr));
    s.ok("mgpu_cancel", &[&first.to_string(), &second.to_string()]);
    s.wait_gone(first);
    s.wait_gone(second);
    wait_until(Duration::from_secs(60), || processes_of(spawner.uid) == 0);
    assert!(
        parents.iter().all(|p| p.is_dir()),
        "the user's parent stays"
    );
}

/// A user at their bound (--user-pids-max) cannot start one more job: its first process is
/// not let in past the bound (joining a cgroup is not counted against pids.max, only forking
/// is), so many small jobs cannot add up past it either.
#[test]
fn a_users_job_cannot_start_past_the_users_bound() {
    use mgpu_daemon::cgroup::Controller;
    if test_users().is_none() || !enforces(Controller::Pids) {
        return;
    }
    let holder = own_user("mgpu-test-upids2").unwrap();
    let s = Server::start(
        "2x24GiB",
        &["--job-pids-max", "45", "--user-pids-max", "45"],
    );
    // 44 sleepers and its main process: exactly the user's bound (bash's brace expansion and
    // exec fork nothing more).
    let full = s.detached_as(
        &holder,
        &[
            "--no-venv",
            "--mem",
            "1G",
            "--",
            "bash",
            "-c",
            "for i in {1..44}; do sleep 300 & done; exec sleep 300",
        ],
    );
    s.wait_state(full, "RUNNING");
    wait_until(Duration::from_secs(120), || processes_of(holder.uid) == 45);
    let out = s
        .cmd_as(&holder, "mgpu_srun")
        .args(["--no-venv", "--mem", "1G", "--", "echo", "past-the-bound"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Resource temporarily unavailable"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(processes_of(holder.uid), 45);
    s.ok("mgpu_cancel", &[&full.to_string()]);
    s.wait_gone(full);
    wait_until(Duration::from_secs(60), || processes_of(holder.uid) == 0);
}

/// Item 7: a job over its --host-mem is killed by the OOM killer and ends OUT_OF_MEMORY.
#[test]
fn a_job_over_its_host_memory_ends_out_of_memory() {
    use mgpu_daemon::cgroup::Controller;
    let Some((a, _)) = test_users() else { return };
    if !enforces(Controller::Memory) {
        return;
    }
    let s = Server::start("1x24GiB", &[]);
    // tail keeps a "line" with no newline in memory: 512 MiB of it.
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args([
            "--host-mem",
            "64M",
            "--no-venv",
            "--",
            "bash",
            "-c",
            "head -c 512M /dev/zero | tail",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("OUT_OF_MEMORY"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(s.acct(1)["state"], "OUT_OF_MEMORY");
    // Within its limit, the same job completes.
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args([
            "--host-mem",
            "64M",
            "--no-venv",
            "--",
            "bash",
            "-c",
            "head -c 8M /dev/zero | tail | wc -c",
        ])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "8388608", "{}", text(&out.stderr));
    assert_eq!(s.acct(2)["state"], "COMPLETED");
}

/// Item 7: --cpus (and -c, --cpus-per-task) and --host-mem, or the server's defaults, are
/// written into the job's cgroups.
#[test]
fn cpu_and_memory_limits_are_written_to_the_jobs_cgroups() {
    use mgpu_daemon::cgroup::Controller;
    let Some((a, _)) = test_users() else { return };
    if !enforces(Controller::Cpu) || !enforces(Controller::Memory) {
        return;
    }
    let s = Server::start(
        "2x24GiB",
        &["--default-cpus", "1", "--default-host-mem", "1G"],
    );
    let cpu_quota = |dirs: &[std::path::PathBuf]| {
        cgroup_value(dirs, "cpu.max")
            .map(|v| v.split_whitespace().next().unwrap().to_string())
            .or_else(|| cgroup_value(dirs, "cpu.cfs_quota_us"))
    };
    let mem_limit = |dirs: &[std::path::PathBuf]| {
        cgroup_value(dirs, "memory.max").or_else(|| cgroup_value(dirs, "memory.limit_in_bytes"))
    };
    for (args, quota, mem) in [
        (
            vec!["--cpus", "2", "--host-mem", "256M"],
            "200000",
            256u64 << 20,
        ),
        (vec!["-c", "3"], "300000", 1 << 30),
        (vec!["--cpus-per-task=1"], "100000", 1 << 30),
        (vec![], "100000", 1 << 30),
    ] {
        let mut all = vec!["--no-venv"];
        all.extend(&args);
        all.extend(["--", "sleep", "600"]);
        let job = s.detached_as(&a, &all);
        s.wait_state(job, "RUNNING");
        let dirs = running_cgroups(&s, job);
        assert_eq!(
            cpu_quota(&dirs).as_deref(),
            Some(quota),
            "{args:?}: {dirs:?}"
        );
        assert_eq!(
            mem_limit(&dirs),
            Some(mem.to_string()),
            "{args:?}: {dirs:?}"
        );
        s.ok("mgpu_cancel", &[&job.to_string()]);
        s.wait_gone(job);
    }
}

/// Item 7: requests over the server's caps are refused at submit, and nothing is queued.
#[test]
fn limits_over_the_caps_are_refused() {
    let Some((a, _)) = test_users() else { return };
    let s = Server::start("1x24GiB", &["--max-cpus", "2", "--max-host-mem", "1G"]);
    for (args, says) in [
        (["--cpus", "3"], "over this server's cap of 2 CPUs"),
        (["--host-mem", "2G"], "over this server's cap of 1024 MiB"),
        (["--cpus", "0"], "at least 1"),
    ] {
        let out = s
            .cmd_as(&a, "mgpu_srun")
            .args(["--detach", "--no-venv"])
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_fails_with(&out, says);
    }
    assert_eq!(s.queue_json()["jobs"], serde_json::json!([]));
    let out = s.cmd("mgpu_acct").args(["--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["jobs"], serde_json::json!([]), "nothing was recorded");
    // A default over the cap is refused at start.
    let out = server_cmd(s.dir.join("x.sock"), s.dir.join("xs"), s.dir.join("xl"))
        .args([
            "--simulate-gpus",
            "1x1GiB",
            "--default-cpus",
            "4",
            "--max-cpus",
            "2",
        ])
        .output()
        .unwrap();
    assert_fails_with(&out, "--default-cpus 4 is over --max-cpus 2");
}

/// Found by an attack review: a `--notify` command joined only its v2 cgroup, which has no
/// pids controller on a hybrid machine, and forked 300 processes past `--user-pids-max 64`.
/// It now joins every hierarchy's cgroup before its exec: what it starts is bounded.
#[test]
fn a_notification_is_bounded_by_the_pids_limits() {
    use mgpu_daemon::cgroup::Controller;
    let Some((a, _)) = test_users() else { return };
    if !enforces(Controller::Pids) {
        return;
    }
    let s = Server::start(
        "1x24GiB",
        &[
            "--job-pids-max",
            "10",
            "--user-pids-max",
            "20",
            "--notify-time-limit",
            "30",
        ],
    );
    let count = s.scratch.join("forked");
    // A line for each sleep it could start (`sh` stops at the first fork that fails).
    let notify = format!(
        "for i in $(seq 40); do sleep 5 & echo x >> {0}; done; echo done >> {0}",
        count.display()
    );
    s.detached_as(&a, &["--notify", &notify, "--", "true"]);
    wait_until(Duration::from_secs(60), || count.exists());
    std::thread::sleep(Duration::from_secs(2));
    let text = std::fs::read_to_string(&count).unwrap();
    let n = text.lines().filter(|l| *l == "x").count();
    assert!(!text.contains("done"), "all 40 forks succeeded: {text}");
    // (The shell itself is counted in the same cgroup.)
    assert!(n < 10, "{n} processes started by the notification");
}
