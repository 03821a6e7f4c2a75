//! What the root server creates and opens on disk: planted links and other users' directories
//! are refused (state, log, run and socket directories), private files stay private, and run
//! directories of ended jobs do not pile up. Attacks are planted by a real unprivileged account.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs `program args` as `user` (which must succeed).
fn as_user(user: &TestUser, program: &str, args: &[&Path]) {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--init-groups")
        .arg("--")
        .arg(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} as {}: {}",
        user.name,
        text(&out.stderr)
    );
}

/// A temp directory with `mode`, owned by root.
fn dir_with_mode(prefix: &str, mode: u32) -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Runs a server that must refuse to start; a server that starts anyway is killed and the
/// test fails (rather than hang).
#[track_caller]
fn refused(mut cmd: Command, needle: &str) {
    let mut child = cmd
        .args(["--simulate-gpus", "1x24GiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the server started: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out: Output = child.wait_with_output().unwrap();
    assert_fails_with(&out, needle);
}

/// A user plants links and directories of theirs in a world-writable (sticky) directory where
/// root's server is to keep its state, logs, run directories or socket: the server refuses
/// each with a clear error, and what the links point to is left untouched (before, root
/// followed the link and chmodded its target 0700).
#[test]
fn planted_links_and_foreign_directories_are_refused_and_left_untouched() {
    let Some((a, _)) = test_users() else { return };
    let shared = dir_with_mode("mgpu-shared-", 0o1777);
    let t = shared.path();
    let ours = dir_with_mode("mgpu-ours-", 0o755);
    let d = ours.path();
    // Stands for a system directory (/etc): root's, mode 0755.
    let victim = d.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    as_user(&a, "ln", &[Path::new("-s"), &victim, &t.join("link")]);
    as_user(&a, "mkdir", &[&t.join("theirs")]);
    as_user(
        &a,
        "ln",
        &[Path::new("-s"), &t.join("theirs"), &t.join("link2")],
    );
    let cases: &[(&str, PathBuf, &str)] = &[
        ("--state-dir", t.join("link"), "is a symbolic link"),
        ("--log-dir", t.join("link"), "is a symbolic link"),
        ("--run-dir", t.join("link"), "is a symbolic link"),
        ("--state-dir", t.join("theirs"), "owned by uid"),
        ("--log-dir", t.join("theirs"), "owned by uid"),
        // Theirs on the way: they could swap what is inside.
        ("--state-dir", t.join("theirs/state"), "owned by uid"),
        ("--run-dir", t.join("theirs/runs"), "owned by uid"),
        (
            "--log-dir",
            t.join("link2/logs"),
            "symbolic link owned by uid",
        ),
    ];
    for (flag, path, needle) in cases {
        let pick = |f: &str, default: PathBuf| if f == *flag { path.clone() } else { default };
        let mut cmd = server_cmd(
            d.join("s.sock"),
            pick("--state-dir", d.join("state")),
            pick("--log-dir", d.join("logs")),
        );
        cmd.arg("--run-dir").arg(pick("--run-dir", d.join("runs")));
        refused(cmd, needle);
        assert_eq!(mode(&victim), 0o755, "{flag} {}", path.display());
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(t.join("theirs")).unwrap().count(), 0);
    }
    // The same places, made properly, are fine.
    let mut cmd = server_cmd(d.join("s.sock"), t.join("state"), t.join("logs"));
    cmd.arg("--run-dir").arg(t.join("runs"));
    let mut server = cmd
        .args(["--simulate-gpus", "1x24GiB"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(d.join("s.sock")).is_ok()
    });
    for p in ["state", "logs", "runs"] {
        assert_eq!(mode(&t.join(p)), 0o700, "{p}");
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// The socket's directory: one a user planted (theirs, or their link) is refused, so nobody
/// can make root's server listen where they control the path.
#[test]
fn a_socket_directory_planted_by_a_user_is_refused() {
    let Some((a, _)) = test_users() else { return };
    let shared = dir_with_mode("mgpu-shared-", 0o1777);
    let t = shared.path();
    let ours = dir_with_mode("mgpu-ours-", 0o755);
    let d = ours.path();
    // Stands for /run/mgpu, created by the user before the server.
    as_user(&a, "mkdir", &[&t.join("mgpu")]);
    as_user(
        &a,
        "ln",
        &[Path::new("-s"), &t.join("mgpu"), &t.join("mgpu-link")],
    );
    for (socket, needle) in [
        (t.join("mgpu/mgpu.sock"), "owned by uid"),
        (t.join("mgpu-link/mgpu.sock"), "symbolic link owned by uid"),
    ] {
        refused(server_cmd(&socket, d.join("state"), d.join("logs")), needle);
        assert_eq!(std::fs::read_dir(t.join("mgpu")).unwrap().count(), 0);
    }
    // Root's own directory that others can write to and that is not sticky: refused too.
    let open = dir_with_mode("mgpu-open-", 0o777);
    refused(
        server_cmd(
            open.path().join("mgpu.sock"),
            d.join("state"),
            d.join("logs"),
        ),
        "not sticky",
    );
}

/// A single-user server with no --socket listens in its user's runtime directory
/// ($XDG_RUNTIME_DIR/mgpu, created 0700), and that user's clients find it there by default.
#[test]
fn a_single_user_servers_default_socket_is_private_and_found_by_its_user() {
    let Some((_, b)) = test_users() else { return };
    let base = dir_with_mode("mgpu-xdg-", 0o755);
    let xdg = base.path().join("run-user");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(
        &xdg,
        Some(nix::unistd::Uid::from_raw(b.uid)),
        Some(nix::unistd::Gid::from_raw(b.gid)),
    )
    .unwrap();
    let as_b = |program: &str| {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", b.uid))
            .arg(format!("--regid={}", b.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(bin(program))
            .env_remove("MGPU_SOCKET")
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("HOME", &b.home)
            .current_dir(&b.home);
        c
    };
    let mut server = as_b("mgpu_scheduler_server");
    server
        .arg("--state-dir")
        .arg(xdg.join("state"))
        .arg("--log-dir")
        .arg(xdg.join("logs"))
        .args(["--simulate-gpus", "1x24GiB"])
        .stderr(Stdio::null());
    let mut server = server.spawn().unwrap();
    let socket = xdg.join("mgpu/mgpu.sock");
    wait_until(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    assert_eq!(mode(&xdg.join("mgpu")), 0o700);
    // (Where a root server runs here, its socket comes first.)
    if !Path::new(mgpu_proto::DEFAULT_SOCKET).exists() {
        let out = as_b("mgpu_queue").output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = server.wait();
}

/// The job database (with its -wal and -shm) and launch records hold every user's
/// environment: they are 0600 (before: 0644), also when an older version left them open.
#[test]
fn the_database_and_launch_records_are_private() {
    let mut s = Server::start("1x24GiB", &[]);
    let id = s.detached(&["--", "sleep", "300"]);
    s.wait_state(id, "RUNNING");
    let launch = s.state_dir.join(format!("runs/{id}/r0/launch.json"));
    assert_eq!(mode(&launch), 0o600);
    for f in ["mgpu.db", "mgpu.db-wal", "mgpu.db-shm"] {
        assert_eq!(mode(&s.state_dir.join(f)), 0o600, "{f}");
    }
    s.ok("mgpu_cancel", &[&id.to_string()]);
    s.wait_gone(id);
    s.stop();
    for f in ["mgpu.db", "mgpu.db-wal", "mgpu.db-shm"] {
        let p = s.state_dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    s.restart();
    for f in ["mgpu.db", "mgpu.db-wal", "mgpu.db-shm"] {
        let p = s.state_dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
}

/// A job whose end was committed just before the server died leaves its run directory behind
/// (it is removed only after the commit): the next start removes it.
#[test]
fn run_directories_of_jobs_that_ended_before_a_crash_are_removed() {
    let mut s = Server::start("1x24GiB", &[]);
    let id = s.detached(&["--", "true"]);
    s.wait_gone(id);
    s.acct(id);
    s.kill9();
    // What the crash left: the ended job's run directory, as its supervisor wrote it.
    let job_dir = s.state_dir.join(format!("runs/{id}"));
    std::fs::create_dir_all(job_dir.join("r0")).unwrap();
    std::fs::write(job_dir.join("r0/launch.json"), "{}").unwrap();
    std::fs::write(job_dir.join("r0/exit.json"), "{}").unwrap();
    s.restart();
    assert!(!job_dir.exists(), "the ended job's run directory is left");
    // Jobs that still run keep theirs.
    let live = s.detached(&["--", "sleep", "300"]);
    s.wait_state(live, "RUNNING");
    s.kill9();
    s.restart();
    assert_eq!(s.job(live).unwrap()["state"], "RUNNING");
    assert!(s.state_dir.join(format!("runs/{live}/r0")).exists());
}

/// A single-user server told nothing keeps its database, job logs and run directories below
/// `$XDG_STATE_HOME/mgpu` (not `~/.mgpu/logs`, as earlier releases did); one that finds an
/// earlier release's job logs in `~/.mgpu/logs` (and none in the new place) keeps using that
/// directory, so those logs stay readable, and says how to move them.
#[test]
fn a_single_user_server_keeps_its_files_below_xdg_state_home_and_old_logs_stay_readable() {
    let Some((_, b)) = test_users() else { return };
    let base = dir_with_mode("mgpu-layout-", 0o755);
    let owned_by_b = |p: &Path| {
        std::fs::create_dir_all(p).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).unwrap();
        nix::unistd::chown(
            p,
            Some(nix::unistd::Uid::from_raw(b.uid)),
            Some(nix::unistd::Gid::from_raw(b.gid)),
        )
        .unwrap();
    };
    let runtime = base.path().join("run-user");
    owned_by_b(&runtime);
    let as_b = |program: &str, state_home: &Path| {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", b.uid))
            .arg(format!("--regid={}", b.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(bin(program))
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("XDG_STATE_HOME", state_home)
            .env("HOME", &b.home)
            .current_dir(&b.home);
        // The server finds its default socket there; clients are pointed at it (a root
        // server's default socket, where there is one, would come first).
        if program == "mgpu_scheduler_server" {
            c.env_remove("MGPU_SOCKET");
        } else {
            c.env("MGPU_SOCKET", runtime.join("mgpu/mgpu.sock"));
        }
        c
    };
    // Starts a server with no directory flags, runs one job printing `word`, stops the
    // server; returns the server's log.
    let run_one = |state_home: &Path, word: &str| -> (u64, String) {
        let log = base.path().join(format!("server-{word}.log"));
        let mut server = as_b("mgpu_scheduler_server", state_home)
            .args(["--simulate-gpus", "1x24GiB"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(runtime.join("mgpu/mgpu.sock")).is_ok()
        });
        let out = as_b("mgpu_srun", state_home)
            .args(["--", "echo", word])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(word), "{}", text(&out.stdout));
        let listed = as_b("mgpu_acct", state_home)
            .args(["--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        let id = v["jobs"][0]["id"].as_u64().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = server.wait();
        (id, std::fs::read_to_string(&log).unwrap())
    };

    let fresh = base.path().join("state-fresh");
    owned_by_b(&fresh);
    let (id, _) = run_one(&fresh, "fresh");
    let state = fresh.join("mgpu");
    assert!(state.join("mgpu.db").exists());
    assert!(state.join("runs").is_dir());
    let log = std::fs::read_to_string(state.join(format!("logs/job-{id}.log"))).unwrap();
    assert!(log.contains("fresh"), "{log}");

    // An earlier release's logs in ~/.mgpu/logs (of the server's user, from the password
    // database).
    let old_logs = b.home.join(".mgpu/logs");
    let _ = std::fs::remove_dir_all(b.home.join(".mgpu"));
    owned_by_b(&b.home.join(".mgpu"));
    owned_by_b(&old_logs);
    std::fs::write(old_logs.join("job-1000000.log"), "from before\n").unwrap();
    let upgraded = base.path().join("state-upgraded");
    owned_by_b(&upgraded);
    let (id, server_log) = run_one(&upgraded, "upgraded");
    let log = std::fs::read_to_string(old_logs.join(format!("job-{id}.log")));
    let _ = std::fs::remove_dir_all(b.home.join(".mgpu"));
    assert!(log.unwrap().contains("upgraded"));
    assert!(!upgraded.join("mgpu/logs").exists());
    assert!(
        server_log.contains("job logs stay in") && server_log.contains("mgpu/logs"),
        "{server_log}"
    );
}
