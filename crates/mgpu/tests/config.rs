//! The configuration file and per-user limits, through the real binaries: `--check-config`,
//! limits with real accounts (needs root for those; skipped otherwise), SIGHUP reloads.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// A configuration file with `text`, in a private directory of its own.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mgpu.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, path)
}

fn check_config(path: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("mgpu_scheduler_server"))
        .arg("--check-config")
        .arg("--config")
        .arg(path)
        .args(extra)
        .output()
        .unwrap()
}

fn hup(s: &Server) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

fn reason(s: &Server, id: u64) -> String {
    s.job(id).unwrap()["reason"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `--check-config` prints the effective configuration (the command line over the file) and
/// exits 0; a bad file exits 1 naming the key, and starts nothing.
#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong_in_a_bad_one() {
    let (dir, good) = config_file(
        "policy = \"backfill\"\nmax_restarts = 3\nuser_weight = { root = 2 }\n\
         [limits]\nmax_gpus_per_user = 2\nmax_time = \"1-00:00:00\"\n\
         [limits.users.root]\nmax_jobs_per_user = 1\n",
    );
    let socket = dir.path().join("never.sock");
    let out = check_config(
        &good,
        &["--max-restarts", "5", "--socket", socket.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    for line in [
        "policy = \"backfill\"",
        "max_restarts = 5",
        "user_weight = [\"root=2\"]",
        "min_slice = 60",
        "[limits]",
        "max_gpus_per_user = 2",
        "[limits.users.root]",
    ] {
        assert!(shown.lines().any(|l| l == line), "{line} in {shown}");
    }
    assert!(!socket.exists(), "--check-config started a server");
    // What it prints is a valid configuration in turn.
    let (_d2, again) = config_file(&shown);
    assert!(check_config(&again, &[]).status.success());

    for (bad, needle) in [
        ("bogus = 1", "unknown key 'bogus'"),
        ("policy = \"nope\"", "key 'policy': invalid value 'nope'"),
        ("max_restarts = \"x\"", "key 'max_restarts'"),
        ("check_config = true", "unknown key 'check_config'"),
        ("[limits]\nmax_gpu = 1", "unknown field `max_gpu`"),
        ("[limits]\nmax_time = \"soon\"", "max_time"),
        (
            "[limits.groups.g]\nmax_jobs_per_user = -1",
            "limits.groups.g",
        ),
        ("max_restarts = ", "TOML parse error at line 1"),
        (
            "default_cpus = 8\nmax_cpus = 4",
            "--default-cpus 8 is over --max-cpus 4",
        ),
        ("log_quota = \"lots\"", "--log-quota: invalid size 'lots'"),
        (
            "user_weight = { no-such-user-here = 2 }",
            "no such user: no-such-user-here",
        ),
    ] {
        let (_d, path) = config_file(bad);
        let out = check_config(&path, &[]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        assert!(
            text(&out.stderr).contains(needle),
            "{bad}: {}",
            text(&out.stderr)
        );
    }
    let out = check_config(&dir.path().join("missing.toml"), &[]);
    assert_fails_with(&out, "does not exist");
    // A link, and (as root) a file others may write or that is not root's, are refused.
    let link = dir.path().join("link.toml");
    std::os::unix::fs::symlink(&good, &link).unwrap();
    assert_fails_with(&check_config(&link, &[]), "is a symbolic link");
    if is_root() {
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert_fails_with(&check_config(&good, &[]), "writable by its group");
        std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
        if let Some((a, _)) = test_users() {
            nix::unistd::chown(&good, Some(nix::unistd::Uid::from_raw(a.uid)), None).unwrap();
            assert_fails_with(&check_config(&good, &[]), "not root");
        }
    }
}

/// A user at her GPU limit: her next job waits with the limit as its REASON (in the queue,
/// the table and the attached srun's message) and holds nothing back: another user's job
/// behind it starts, even with a policy that reserves for blocked jobs. Root is exempt.
#[test]
fn gpu_limit_holds_a_users_next_job_while_another_users_starts() {
    let Some((a, b)) = test_users() else { return };
    let (_d, cfg) = config_file(
        "policy = \"backfill\"\nreserve_after = 0\nreserve_after_wait_factor = 0\n\
         [limits]\nmax_gpus_per_user = 1\n",
    );
    let s = Server::start("4x24GiB", &["--config", cfg.to_str().unwrap()]);
    let a1 = s.detached_as(&a, &["--", "sleep", "120"]);
    s.wait_state(a1, "RUNNING");
    let a2 = s.detached_as(&a, &["--", "sleep", "120"]);
    let b1 = s.detached_as(&b, &["--", "sleep", "120"]);
    s.wait_state(b1, "RUNNING");
    assert_eq!(s.job(a2).unwrap()["state"], "PENDING");
    assert_eq!(reason(&s, a2), "QOSMaxGpuPerUser");
    let table = text(&s.cmd("mgpu_queue").output().unwrap().stdout);
    assert!(table.contains("QOSMaxGpuPerUser"), "{table}");
    // The attached srun says the same.
    let mut srun = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--", "echo", "done"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // (Kept open to the end: the srun writes more to it.)
    let mut err = BufReader::new(srun.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("QOSMaxGpuPerUser: "), "{line}");
    // Root is exempt: two jobs of its own run side by side.
    let r1 = s.detached(&["--", "sleep", "120"]);
    let r2 = s.detached(&["--", "sleep", "120"]);
    s.wait_state(r1, "RUNNING");
    s.wait_state(r2, "RUNNING");
    for id in [r1, r2, a2] {
        s.ok("mgpu_cancel", &[&id.to_string()]);
    }
    s.ok("mgpu_cancel", &[&a1.to_string()]);
    // Her first job gone, the srun's job runs.
    let out = srun.wait_with_output().unwrap();
    assert!(out.status.success(), "{line}");
    assert_eq!(text(&out.stdout), "done\n");
    drop(err);
}

/// The limit on waiting jobs is checked at submit (a job array counts each task), per user.
#[test]
fn pending_jobs_limit_refuses_at_submit() {
    let Some((a, b)) = test_users() else { return };
    let (_d, cfg) = config_file("[limits]\nmax_pending_jobs_per_user = 2\n");
    let s = Server::start("1x24GiB", &["--config", cfg.to_str().unwrap()]);
    let holder = s.detached(&["--", "sleep", "120"]);
    s.wait_state(holder, "RUNNING");
    s.detached_as(&a, &["--", "true"]);
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--array", "0-1", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "max_pending_jobs_per_user");
    s.detached_as(&a, &["--", "true"]);
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--detach", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(
        &out,
        "you have 2 jobs waiting and at most 2 may wait per user",
    );
    s.detached_as(&b, &["--", "true"]);
    s.detached_as(&b, &["--", "true"]);
}

/// A time limit over the maximum is refused (as in Slurm); a job without one gets the
/// default. A group entry beats the defaults, a user entry beats the groups; root is exempt.
#[test]
fn max_time_is_refused_and_default_time_applied() {
    let Some((a, b)) = test_users() else { return };
    // (mgpu-test-a is in mgpu-test-grp, mgpu-test-b is not.)
    let (_d, cfg) = config_file(
        "[limits]\nmax_time = \"1:00:00\"\ndefault_time = 10\n\
         [limits.groups.mgpu-test-grp]\nmax_time = \"2:00:00\"\n\
         [limits.users.mgpu-test-b]\ndefault_time = \"5\"\n",
    );
    let s = Server::start("1x24GiB", &["--config", cfg.to_str().unwrap()]);
    let holder = s.detached(&["--time", "3:00:00", "--", "sleep", "120"]);
    s.wait_state(holder, "RUNNING");
    assert_eq!(s.job(holder).unwrap()["time_limit_s"], 3 * 3600);
    let out = s
        .cmd_as(&b, "mgpu_srun")
        .args(["--detach", "--time", "1:30:00", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "QOSMaxWallDurationPerJobLimit");
    assert_fails_with(&out, "longer than the longest allowed per job, 1:00:00");
    // An explicit "no limit" is not "no -t": it is over the maximum too (found by a review:
    // it was given the default instead).
    let out = s
        .cmd_as(&b, "mgpu_srun")
        .args(["--detach", "--time", "UNLIMITED", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "QOSMaxWallDurationPerJobLimit");
    assert_fails_with(&out, "its time limit UNLIMITED is longer");
    let a_long = s.detached_as(&a, &["--time", "1:30:00", "--", "true"]);
    assert_eq!(s.job(a_long).unwrap()["time_limit_s"], 5400);
    let a_default = s.detached_as(&a, &["--", "true"]);
    assert_eq!(s.job(a_default).unwrap()["time_limit_s"], 600);
    let b_default = s.detached_as(&b, &["--", "true"]);
    assert_eq!(s.job(b_default).unwrap()["time_limit_s"], 300);
    let root_none = s.detached(&["--", "true"]);
    assert!(s.job(root_none).unwrap()["time_limit_s"].is_null());
}

/// `mgpu_control update` applies the owner's max_time as a submit does: no limit (0 or
/// UNLIMITED) or one over the maximum is refused with the submit's message and changes
/// nothing; a limit within it is taken; root is exempt.
#[test]
fn update_cannot_lift_a_users_max_time() {
    let Some((a, _)) = test_users() else { return };
    let (_d, cfg) = config_file("[limits]\nmax_time = \"1:00:00\"\n");
    let s = Server::start("1x24GiB", &["--config", cfg.to_str().unwrap()]);
    let id = s.detached_as(&a, &["--hold", "--time", "30", "--", "true"]);
    let sid = id.to_string();
    let update = |t: &str| {
        s.cmd_as(&a, "mgpu_control")
            .args(["update", &sid, &format!("TimeLimit={t}")])
            .output()
            .unwrap()
    };
    for t in ["0", "UNLIMITED", "2:00:00", "366-00:00:00"] {
        let out = update(t);
        assert_fails_with(&out, "QOSMaxWallDurationPerJobLimit");
        assert_fails_with(&out, "longer than the longest allowed per job, 1:00:00");
        assert_eq!(s.job(id).unwrap()["time_limit_s"], 1800, "after {t}");
    }
    let out = update("1:00:00");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(s.job(id).unwrap()["time_limit_s"], 3600);
    s.ok("mgpu_control", &["update", &sid, "TimeLimit=0"]);
    assert!(s.job(id).unwrap()["time_limit_s"].is_null());
    s.ok("mgpu_control", &["update", &sid, "TimeLimit=3:00:00"]);
    assert_eq!(s.job(id).unwrap()["time_limit_s"], 3 * 3600);
    s.ok("mgpu_cancel", &[&sid]);
}

/// SIGHUP applies a changed limit at once (a held job starts), logs each change, and reports
/// what needs a restart; an invalid file changes nothing and says why.
#[test]
fn sighup_reloads_limits_and_keeps_the_old_config_when_the_new_one_is_invalid() {
    let Some((a, _)) = test_users() else { return };
    let (_d, cfg) = config_file("[limits]\nmax_gpus_per_user = 1\n");
    let s = Server::start("2x24GiB", &["--config", cfg.to_str().unwrap()]);
    let a1 = s.detached_as(&a, &["--", "sleep", "120"]);
    s.wait_state(a1, "RUNNING");
    let a2 = s.detached_as(&a, &["--", "sleep", "120"]);
    assert_eq!(reason(&s, a2), "QOSMaxGpuPerUser");

    std::fs::write(&cfg, "[limits]\nmax_gpus_per_user = \"two\"\n").unwrap();
    hup(&s);
    wait_until(Duration::from_secs(20), || {
        s.server_log()
            .contains("the configuration is invalid, keeping the one in effect")
    });
    assert!(
        s.server_log().contains("max_gpus_per_user"),
        "{}",
        s.server_log()
    );
    assert_eq!(reason(&s, a2), "QOSMaxGpuPerUser");

    std::fs::write(
        &cfg,
        "retention_days = 30\n[limits]\nmax_gpus_per_user = 2\n",
    )
    .unwrap();
    hup(&s);
    s.wait_state(a2, "RUNNING");
    let log = s.server_log();
    assert!(
        log.contains("config reloaded: limits.max_gpus_per_user 1 -> 2"),
        "{log}"
    );
    assert!(
        log.contains("config reloaded: retention_days 90 -> 30 needs a restart"),
        "{log}"
    );
}

/// The commented default configuration that ships (`packaging/mgpu.toml`) shows every option
/// of the server; as it is, it is valid (and sets nothing), and its `[limits]` example,
/// uncommented, is valid too.
#[test]
fn the_shipped_default_config_lists_every_option_and_is_valid() {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging/mgpu.toml");
    let shown = std::fs::read_to_string(&shipped).unwrap();
    let server = mgpu::commands().remove(0);
    assert_eq!(server.get_name(), "mgpu_scheduler_server");
    for arg in server.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || ["config", "check-config", "help", "version"].contains(&long) {
            continue;
        }
        let key = long.replace('-', "_");
        assert!(
            shown.lines().any(|l| l.starts_with(&format!("# {key} = "))),
            "packaging/mgpu.toml does not show the option {key} (add it, commented, with its default)"
        );
    }
    let (_d, as_is) = config_file(&shown);
    let out = check_config(&as_is, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let limits: String = shown
        .lines()
        .skip_while(|l| *l != "# [limits]")
        .map(|l| l.strip_prefix("# ").unwrap_or(""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(limits.contains("max_gpus_per_user = 0"), "{limits}");
    // (The example's group and user may not exist here: that is a warning, not an error.)
    let (_d2, uncommented) = config_file(&limits);
    let out = check_config(&uncommented, &[]);
    assert!(out.status.success(), "{limits}: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("[limits.users.alice]"));
}

/// `size_weight = 0` (a file key, like `--size-weight 0`) keeps first-come first-served order
/// within a user: of two waiting jobs, the one submitted first (with the longer time limit)
/// goes first. Reloaded without it (the default, shortest first), the shorter job goes first,
/// and starts first once the blocker holding the only GPU is gone. Bad values are refused by
/// `--check-config`, naming the option.
#[test]
fn size_weight_zero_keeps_fifo_within_a_user_and_the_default_starts_the_shorter_first() {
    let (_d, cfg) = config_file("size_weight = 0\n");
    for bad in [["--size-weight", "nan"], ["--fair-age-factor", "0"]] {
        let out = check_config(&cfg, &bad);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(bad[0]), "{}", text(&out.stderr));
    }
    let s = Server::start("1x24GiB", &["--config", cfg.to_str().unwrap()]);
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let long = s.detached(&["-t", "1:00:00", "--", "true"]);
    let go = tempfile::tempdir().unwrap();
    let wait = format!(
        "while [ ! -e {0} ]; do sleep 0.1; done",
        go.path().join("go").display()
    );
    let short = s.detached(&["-t", "5:00", "--", "sh", "-c", &wait]);
    assert_eq!(s.pending_order(), vec![long, short]);

    std::fs::write(&cfg, "").unwrap();
    hup(&s);
    wait_until(Duration::from_secs(20), || {
        s.server_log()
            .contains("config reloaded: size_weight 0 -> ")
    });
    assert_eq!(s.pending_order(), vec![short, long]);
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
    // The short job holds the GPU until told to end: the long one is still waiting.
    s.wait_state(short, "RUNNING");
    assert_eq!(s.job(long).unwrap()["state"], "PENDING");
    std::fs::write(go.path().join("go"), "").unwrap();
    assert_eq!(s.acct(long)["state"], "COMPLETED");
}
