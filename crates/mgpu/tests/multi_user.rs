//! Multi-user behaviour with real accounts (needs root; skipped otherwise): jobs run as their
//! owners, owners are kernel-verified, and users cannot touch each other's jobs.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn jobs_run_as_their_owner_with_groups() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &[]);
    for user in [&a, &b] {
        let out = s
            .cmd_as(user, "mgpu_srun")
            .args([
                "--no-venv",
                "--",
                "bash",
                "-c",
                "echo $(id -u) $(id -g) $(id -Gn) $USER $HOME $(pwd)",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let line = text(&out.stdout);
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[0], user.uid.to_string());
        assert_eq!(f[1], user.gid.to_string());
        assert_eq!(*f.last().unwrap(), user.home.to_str().unwrap());
        assert!(line.contains(&format!(" {} ", user.name)));
        if user.name == "mgpu-test-a" {
            assert!(
                line.contains("mgpu-test-grp"),
                "supplementary groups set: {line}"
            );
        } else {
            assert!(!line.contains("mgpu-test-grp"), "no foreign groups: {line}");
        }
    }
}

#[test]
fn identity_comes_from_the_kernel_not_the_environment() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("SUDO_UID", "0")
        .env("HOME", "/root")
        .args(["--no-venv", "--", "bash", "-c", "echo $(id -u) $USER $HOME"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{} {} {}", a.uid, a.name, a.home.display())
    );
    let id = s.detached_as(&a, &["--", "sleep", "300"]);
    assert_eq!(s.job(id).unwrap()["user"], a.name.as_str());
    s.cmd("mgpu_cancel").arg(id.to_string()).status().unwrap();
}

#[test]
fn users_cannot_cancel_or_read_each_others_jobs() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &[]);
    let job_b = s.detached_as(&b, &["--", "bash", "-c", "echo secret-of-b; sleep 300"]);
    s.wait_state(job_b, "RUNNING");

    let out = s
        .cmd_as(&a, "mgpu_cancel")
        .arg(job_b.to_string())
        .output()
        .unwrap();
    assert_fails_with(&out, "permission denied");
    let out = s
        .cmd_as(&a, "mgpu_cancel")
        .args(["--user", &b.name])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("permission denied"));
    // Nor b's job arrays.
    let array_b = s.detached_as(&b, &["--array", "0-1", "--", "sleep", "300"]);
    let out = s
        .cmd_as(&a, "mgpu_cancel")
        .args(["--array", &array_b.to_string()])
        .output()
        .unwrap();
    assert_fails_with(&out, "permission denied");
    assert!(s.job(array_b).is_some() && s.job(array_b + 1).is_some());
    // --all only covers a's own jobs.
    assert!(s
        .cmd_as(&a, "mgpu_cancel")
        .arg("--all")
        .status()
        .unwrap()
        .success());
    assert_eq!(
        s.job(job_b).unwrap()["state"],
        "RUNNING",
        "b's job untouched"
    );

    let out = s
        .cmd_as(&a, "mgpu_log")
        .arg(job_b.to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!text(&out.stdout).contains("secret"));
    assert!(text(&out.stderr).contains("permission denied"));
    // The owner and root may read it.
    wait_until(Duration::from_secs(60), || {
        text(
            &s.cmd_as(&b, "mgpu_log")
                .arg(job_b.to_string())
                .output()
                .unwrap()
                .stdout,
        )
        .contains("secret-of-b")
    });
    assert!(s.log(job_b).contains("secret-of-b"));
    // Everyone sees the queue.
    let q = s.cmd_as(&a, "mgpu_queue").arg("--json").output().unwrap();
    assert!(text(&q.stdout).contains(&b.name));
    let mine = s
        .cmd_as(&a, "mgpu_queue")
        .args(["--json", "--me"])
        .output()
        .unwrap();
    assert!(!text(&mine.stdout).contains(&b.name));

    // Accounting: a sees only its own records, and may not ask for b's.
    let out = s
        .cmd_as(&a, "mgpu_acct")
        .args(["--user", &b.name])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("permission denied"));

    // The owner may cancel; root may cancel anyone's.
    let job_b2 = s.detached_as(&b, &["--", "sleep", "300"]);
    assert!(s
        .cmd_as(&b, "mgpu_cancel")
        .arg(job_b.to_string())
        .status()
        .unwrap()
        .success());
    assert!(s
        .cmd("mgpu_cancel")
        .args(["--user", &b.name])
        .status()
        .unwrap()
        .success());
    s.wait_gone(job_b);
    s.wait_gone(job_b2);
    let mine = s.cmd_as(&a, "mgpu_acct").arg("--json").output().unwrap();
    assert!(
        !text(&mine.stdout).contains(&b.name),
        "a sees no record of b"
    );
    let all = s.cmd("mgpu_acct").arg("--json").output().unwrap();
    assert!(text(&all.stdout).contains(&b.name), "root sees all");
}

#[test]
fn venv_is_activated_as_the_user() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    // A custom activate script in a venv the user owns.
    let venv = s.scratch.join(format!("venv-{}", std::process::id()));
    std::fs::create_dir_all(venv.join("bin")).unwrap();
    write_file(
        &venv.join("bin/activate"),
        &format!(
            "export VIRTUAL_ENV={}\nexport ACTIVATED_BY=$(id -un)\n",
            venv.display()
        ),
        0o644,
    );
    let run = |extra: &[&str]| {
        let out = s
            .cmd_as(&a, "mgpu_srun")
            .args(extra)
            .args([
                "--",
                "bash",
                "-c",
                "echo ${VIRTUAL_ENV:-none} ${ACTIVATED_BY:-none}",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    assert_eq!(
        run(&["--venv", venv.to_str().unwrap()]),
        format!("{} {}", venv.display(), a.name)
    );
    assert_eq!(run(&["--no-venv"]), "none none");
    // ~/venv is used by default when present. (Her home is shared with every test process
    // on this machine: one at a time, and it goes again whatever happens.)
    struct HomeVenv(std::path::PathBuf, #[allow(dead_code)] std::fs::File);
    impl Drop for HomeVenv {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let home_venv = HomeVenv(a.home.join("venv"), machine_lock("home-venv"));
    std::fs::create_dir_all(home_venv.0.join("bin")).unwrap();
    write_file(
        &home_venv.0.join("bin/activate"),
        "export VIRTUAL_ENV=home-venv\nexport ACTIVATED_BY=$(id -un)\n",
        0o644,
    );
    let out = run(&[]);
    drop(home_venv);
    assert_eq!(out, format!("home-venv {}", a.name));
}

#[test]
fn working_directory_is_entered_with_the_users_rights() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let private = s.dir.join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--chdir", private.to_str().unwrap(), "--", "ls"])
        .output()
        .unwrap();
    assert_fails_with(&out, "working directory");
    assert!(s.queue_json()["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn clients_refuse_a_server_run_by_another_user() {
    let Some((a, b)) = test_users() else { return };
    // b runs its own server (single-user mode) on a socket a can reach.
    let dir = tempfile::Builder::new()
        .prefix("mgpu-squat-")
        .tempdir()
        .unwrap();
    // Shared like /tmp (sticky: the server refuses a directory anyone could swap).
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let socket = dir.path().join("s.sock");
    let mut server = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", b.uid))
        .arg(format!("--regid={}", b.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(bin("mgpu_scheduler_server"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--log-dir")
        .arg(dir.path().join("logs"))
        .args(["--simulate-gpus", "1x24GiB"])
        .env("HOME", &b.home)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // a must not hand its job to b's server; neither must root.
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", a.uid))
        .arg(format!("--regid={}", a.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(bin("mgpu_srun"))
        .args(["--", "true"])
        .env("MGPU_SOCKET", &socket)
        .current_dir(&a.home)
        .output()
        .unwrap();
    assert_fails_with(&out, "neither root nor you");
    let out = std::process::Command::new(bin("mgpu_queue"))
        .env("MGPU_SOCKET", &socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // b itself may use its own server.
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", b.uid))
        .arg(format!("--regid={}", b.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(bin("mgpu_srun"))
        .args(["--no-venv", "--", "id", "-u"])
        .env("MGPU_SOCKET", &socket)
        .current_dir(&b.home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), b.uid.to_string());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    server.wait().unwrap();
}

/// The bound on all waiting jobs holds across users.
#[test]
fn the_whole_queue_is_bounded_across_users() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start(
        "1x24GiB",
        &["--max-pending-per-user", "4", "--max-pending", "5"],
    );
    let holder = s.detached(&["--", "sleep", "300"]);
    s.wait_state(holder, "RUNNING");
    s.detached_as(&a, &["--array", "0-3", "--", "true"]);
    let out = s
        .cmd_as(&b, "mgpu_srun")
        .args(["--array", "0-1", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "the queue is full");
    s.detached_as(&b, &["--", "true"]);
    assert_eq!(s.queue_json()["jobs"].as_array().unwrap().len(), 6);
}

/// Jobs get the resource limits a login of their user gets: the limits the server was started
/// with, adjusted by limits.conf and limits.d as pam_limits would; not the server's own raised
/// open-files limit.
#[test]
fn jobs_get_a_logins_resource_limits() {
    let Some((a, b)) = test_users() else { return };
    // The server inherits our limits: a soft open-files limit below the hard one, which the
    // server raises for itself (the old code passed that on to every job).
    let (soft, hard) = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur >= lim.rlim_max {
            lim.rlim_cur = lim.rlim_max - 1;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        (lim.rlim_cur, lim.rlim_max)
    };
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(
        conf.path().join("limits.conf"),
        format!(
            "# as pam_limits reads it\n{} - nofile 1234\n* soft nproc 777\n",
            a.name
        ),
    )
    .unwrap();
    std::fs::create_dir(conf.path().join("limits.d")).unwrap();
    std::fs::write(
        conf.path().join("limits.d/90-mgpu-test.conf"),
        "@mgpu-test-grp soft nproc 555\n",
    )
    .unwrap();
    let dir = conf.path().to_str().unwrap();
    let s = Server::start("1x24GiB", &["--limits-conf-dir", dir]);
    let limits = |user| {
        let out = s
            .cmd_as(user, "mgpu_srun")
            .args([
                "--no-venv",
                "--",
                "bash",
                "-c",
                "echo $(ulimit -Sn) $(ulimit -Hn) $(ulimit -Su)",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    // Her own line, and her group's nproc line (a group line beats the wildcard).
    assert_eq!(limits(&a), "1234 1234 555");
    // The server's inherited open-files limits, not its raised ones; the wildcard's nproc.
    let hard = if hard == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        hard.to_string()
    };
    assert_eq!(limits(&b), format!("{soft} {hard} 777"));
}

/// Log quotas: a user whose logs pass her quota loses her oldest logs of finished jobs first
/// (their records stay, and mgpu_log says why), and her running job over the quota keeps running
/// with its log truncated and a note that says so; another user's logs are untouched.
#[test]
fn log_quota_removes_a_users_oldest_logs_and_truncates_her_running_job() {
    let Some((a, b)) = test_users() else { return };
    let mut s = Server::start(
        "1x24GiB",
        &["--log-quota-per-user", "64K", "--log-quota", "1G"],
    );
    let chatty = |s: &Server, user, bytes: usize, then: &str| {
        let script = format!("head -c {bytes} /dev/zero | tr '\\0' x; {then}");
        let mut c = s.cmd_as(user, "mgpu_srun");
        c.args([
            "--detach",
            "--parsable",
            "--no-venv",
            "--",
            "bash",
            "-c",
            &script,
        ]);
        let id = s.submit(c);
        s.wait_gone(id);
        id
    };
    let removed = |s: &Server, id: u64| s.log(id).contains("was removed to keep its owner within");
    let b1 = chatty(&s, &b, 50_000, "true");
    let a1 = chatty(&s, &a, 20_000, "true");
    let a2 = chatty(&s, &a, 20_000, "true");
    let a3 = chatty(&s, &a, 20_000, "true");
    assert_eq!(s.log(a1).len(), 20_000, "within the quota nothing goes");
    // The books are rebuilt from the records and the logs at start-up.
    s.restart();
    // 90,000 bytes: her two oldest logs go.
    let a4 = chatty(&s, &a, 30_000, "true");
    wait_until(Duration::from_secs(60), || {
        removed(&s, a1) && removed(&s, a2)
    });
    assert_eq!(s.log(a3).len(), 20_000);
    assert_eq!(s.log(a4).len(), 30_000);
    let own = s
        .cmd_as(&a, "mgpu_log")
        .arg(a1.to_string())
        .output()
        .unwrap();
    assert!(text(&own.stdout).contains(&format!("mgpu_acct -j {a1}")));
    assert_eq!(s.acct(a1)["state"], "COMPLETED", "the record stays");
    // A job that alone passes the quota: the rest of her logs go, and it is truncated but
    // runs on to its end.
    let done = s.scratch.join("a5-ran-on");
    let a5 = chatty(&s, &a, 200_000, &format!("touch {}", done.display()));
    assert_eq!(s.acct(a5)["state"], "COMPLETED");
    assert!(
        done.exists(),
        "the job kept running after its log was truncated"
    );
    let log = s.log(a5);
    assert!(
        log.contains("its owner's log quota; further output is discarded"),
        "{}",
        &log[log.len().saturating_sub(300)..]
    );
    assert!(log.len() <= 64 * 1024 + 200, "{}", log.len());
    wait_until(Duration::from_secs(60), || {
        removed(&s, a3) && removed(&s, a4)
    });
    // The other user's log is whole.
    assert_eq!(s.log(b1).len(), 50_000);
    assert!(!removed(&s, b1));
}

/// Submits a job as `user` whose launch record is about 31 KB: a 30,000-byte variable in a
/// known, small environment (whatever the test's own).
fn submit_with_big_env(s: &Server, user: &TestUser) -> std::process::Output {
    s.cmd_as(user, "mgpu_srun")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("MGPU_SOCKET", &s.socket)
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("BIG", "x".repeat(30_000))
        .args(["--detach", "--parsable", "--no-venv", "--", "sleep", "300"])
        .output()
        .unwrap()
}

/// What one user's waiting jobs make the daemon store (commands, environments) is bounded per
/// user; her jobs' ends release it, and another user is not affected.
#[test]
fn launch_data_is_bounded_per_user() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &["--max-launch-data-per-user", "100K"]);
    let submit = |user: &TestUser| submit_with_big_env(&s, user);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = submit(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        ids.push(text(&out.stdout).trim().to_string());
    }
    assert_fails_with(&submit(&a), "--max-launch-data-per-user");
    // Her bound is hers alone.
    let out = submit(&b);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Her jobs' ends release it.
    let out = s.cmd_as(&a, "mgpu_cancel").args(&ids).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    for id in &ids {
        s.wait_gone(id.parse().unwrap());
    }
    assert!(submit(&a).status.success());
}

/// ... and over all users together: many users within their own bounds cannot fill the
/// state file system either.
#[test]
fn launch_data_is_bounded_in_all() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start(
        "1x24GiB",
        &[
            "--max-launch-data-per-user",
            "100K",
            "--max-launch-data",
            "110K",
        ],
    );
    let submit = |user: &TestUser| submit_with_big_env(&s, user);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = submit(&a);
        assert!(out.status.success(), "{}", text(&out.stderr));
        ids.push(text(&out.stdout).trim().to_string());
    }
    let out = submit(&b);
    assert_fails_with(&out, "--max-launch-data)");
    let out = s.cmd_as(&a, "mgpu_cancel").arg(&ids[0]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    s.wait_gone(ids[0].parse().unwrap());
    assert!(submit(&b).status.success());
}

/// Two running jobs of one user that together pass her log quota (each within the budget it
/// started with): the daemon truncates the one whose log passed it; it runs on, and what it
/// writes afterwards is discarded.
#[test]
fn log_quota_truncates_a_running_job_when_her_running_jobs_pass_it_together() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &["--log-quota-per-user", "64K"]);
    let dir = s.scratch.display().to_string();
    let wait_for = |f: &str| format!("while [ ! -e {dir}/{f} ]; do sleep 0.05; done");
    // Both start (each with the whole quota as its budget), write 40,000 bytes, and once the
    // test has seen the daemon react, 40,000 more.
    let script = |n: u32| {
        format!(
            "touch {dir}/started-{n}; {}; {}; head -c 40000 /dev/zero | tr '\\0' x; {}; \
             head -c 40000 /dev/zero | tr '\\0' y; touch {dir}/done-{n}; {}",
            wait_for("started-1"),
            wait_for("started-2"),
            wait_for("go"),
            wait_for("end"),
        )
    };
    let ids: Vec<u64> = [1, 2]
        .map(|n| s.detached_as(&a, &["--no-venv", "--", "bash", "-c", &script(n)]))
        .to_vec();
    let note = "its owner's log quota; further output is discarded";
    let mut first = 0;
    wait_until(Duration::from_secs(120), || {
        first = ids
            .iter()
            .copied()
            .find(|id| s.log(*id).contains(note))
            .unwrap_or(0);
        first != 0
    });
    std::fs::write(s.scratch.join("go"), "").unwrap();
    // Both wrote all they had and still run (no finished log yet that could go instead); the
    // other one, growing on past the quota, is truncated too.
    wait_until(Duration::from_secs(120), || {
        s.scratch.join("done-1").exists()
            && s.scratch.join("done-2").exists()
            && ids.iter().all(|id| s.log(*id).contains(note))
    });
    // Each started with a budget larger than all it writes: only the daemon, seeing both logs
    // grow, truncated them; what the first wrote after its note was discarded.
    let log = s.log(first);
    assert!(!log.contains('y'), "{}", log.len());
    assert!(log.trim_end().ends_with("(the job keeps running)"));
    std::fs::write(s.scratch.join("end"), "").unwrap();
    for id in &ids {
        s.wait_gone(*id);
        assert_eq!(s.acct(*id)["state"], "COMPLETED");
    }
}
