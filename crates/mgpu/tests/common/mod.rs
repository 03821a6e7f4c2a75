//! Test harness: each test starts its own server binary on a private temp socket with simulated
//! GPUs and drives the real client binaries, optionally as real non-root users.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod attack;

pub const PROGRAMS: &[&str] = &[
    "mgpu_scheduler_server",
    "mgpu_srun",
    "mgpu_sbatch",
    "mgpu_queue",
    "mgpu_cancel",
    "mgpu_log",
    "mgpu_acct",
    "mgpu_top",
    "mgpu_control",
];

fn exe(name: &str) -> PathBuf {
    match name {
        "mgpu_scheduler_server" => env!("CARGO_BIN_EXE_mgpu_scheduler_server").into(),
        "mgpu_srun" => env!("CARGO_BIN_EXE_mgpu_srun").into(),
        "mgpu_sbatch" => env!("CARGO_BIN_EXE_mgpu_sbatch").into(),
        "mgpu_queue" => env!("CARGO_BIN_EXE_mgpu_queue").into(),
        "mgpu_cancel" => env!("CARGO_BIN_EXE_mgpu_cancel").into(),
        "mgpu_log" => env!("CARGO_BIN_EXE_mgpu_log").into(),
        "mgpu_acct" => env!("CARGO_BIN_EXE_mgpu_acct").into(),
        "mgpu_top" => env!("CARGO_BIN_EXE_mgpu_top").into(),
        "mgpu_control" => env!("CARGO_BIN_EXE_mgpu_control").into(),
        other => panic!("unknown program {other}"),
    }
}

/// Where this test process put the binaries (removed when it exits).
static BIN_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_bin_dir() {
    if let Some(dir) = BIN_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The binaries, linked (or copied) once per test process into a world-readable directory so
/// test users can run them wherever the checkout lives. The directory goes when the process
/// exits: copies of every binary per test run would fill the disk.
pub fn bin(name: &str) -> PathBuf {
    let dir = BIN_DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("mgpu-bins-")
            .tempdir()
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for p in PROGRAMS {
            let to = dir.join(p);
            // (A link shares the build output's own mode: cargo makes it 0755.)
            if std::fs::hard_link(exe(p), &to).is_err() {
                std::fs::copy(exe(p), &to).unwrap();
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        dir
    });
    static CLEANUP: std::sync::Once = std::sync::Once::new();
    // SAFETY: registers a plain function to run at exit (once the directory is known).
    CLEANUP.call_once(|| unsafe {
        libc::atexit(remove_bin_dir);
    });
    dir.join(name)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A real local account for multi-user tests.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

fn sh(cmd: &mut Command) -> Output {
    cmd.output().expect("running a setup command")
}

/// A lock shared by every test process on this machine (concurrent test binaries, and other
/// checkouts' runs): held while the guard lives. `name` names the lock file in the temp
/// directory.
pub fn machine_lock(name: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::temp_dir().join(format!("mgpu-test-{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock {}", path.display());
    file
}

/// Runs an account command until it succeeds (another process may hold the account files'
/// lock for a moment: "cannot lock /etc/passwd; try again later"); `ok` also accepts an exit
/// code (e.g. useradd's 9: the account exists).
fn account_cmd(args: &[&str], ok: &[i32]) {
    let mut last = String::new();
    for _ in 0..50 {
        let out = sh(Command::new(args[0]).args(&args[1..]));
        if out.status.success() || out.status.code().is_some_and(|c| ok.contains(&c)) {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{args:?}: {last}");
}

/// Creates (idempotently) the account `name` (with its own group and home). Serialised with
/// every other test process on this machine: concurrent test binaries create the same accounts.
pub fn ensure_account(name: &str, groups: &[&str]) -> TestUser {
    let _lock = machine_lock("accounts");
    for g in groups {
        if !sh(Command::new("getent").args(["group", g]))
            .status
            .success()
        {
            // 9: created meanwhile.
            account_cmd(&["groupadd", g], &[9]);
        }
    }
    if !sh(Command::new("id").arg("-u").arg(name)).status.success() {
        // 9: created meanwhile by a concurrent run.
        account_cmd(&["useradd", "-m", "-U", "-s", "/bin/bash", name], &[9]);
    }
    for g in groups {
        let member = sh(Command::new("id").args(["-Gn", name]));
        if !text(&member.stdout).split_whitespace().any(|x| x == *g) {
            account_cmd(&["usermod", "-aG", g, name], &[]);
        }
    }
    lookup(name)
}

/// Creates (idempotently) the test group and users `mgpu-test-a` (also in `mgpu-test-grp`) and
/// `mgpu-test-b`. `None` when not root: those tests are skipped.
pub fn test_users() -> Option<(TestUser, TestUser)> {
    if !is_root() {
        eprintln!("skipping: multi-user tests need root");
        return None;
    }
    static USERS: OnceLock<(TestUser, TestUser)> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    Some(
        USERS
            .get_or_init(|| {
                (
                    ensure_account("mgpu-test-a", &["mgpu-test-grp"]),
                    ensure_account("mgpu-test-b", &[]),
                )
            })
            .clone(),
    )
}

fn lookup(name: &str) -> TestUser {
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    std::fs::create_dir_all(&u.dir).unwrap();
    nix::unistd::chown(&u.dir, Some(u.uid), Some(u.gid)).unwrap();
    TestUser {
        name: name.into(),
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
        home: u.dir,
    }
}

pub struct Server {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    /// A world-writable scratch directory jobs can write to.
    pub scratch: PathBuf,
    gpus: String,
    extra: Vec<String>,
    /// Extra environment of the server process.
    env: Vec<(String, std::ffi::OsString)>,
    child: Option<Child>,
    pub stderr_path: PathBuf,
}

impl Server {
    /// A server with simulated GPUs (`2x24GiB` and a 2 s grace period unless overridden).
    pub fn start(gpus: &str, extra: &[&str]) -> Server {
        Self::start_with_env(gpus, extra, &[])
    }

    /// The same, with extra environment for the server (with `--nvml-lib` in `extra`, `gpus`
    /// is not used: NVML says what GPUs there are).
    pub fn start_with_env(gpus: &str, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Server {
        let tmp = tempfile::Builder::new()
            .prefix("mgpu-test-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let scratch = dir.join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o1777)).unwrap();
        // The server's own configuration file (empty): never the machine's /etc/mgpu/mgpu.toml.
        std::fs::write(dir.join("mgpu.toml"), "").unwrap();
        let mut s = Server {
            socket: dir.join("mgpu.sock"),
            state_dir: dir.join("state"),
            log_dir: dir.join("logs"),
            stderr_path: dir.join("server.log"),
            scratch,
            dir,
            _tmp: tmp,
            gpus: gpus.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.into())).collect(),
            child: None,
        };
        s.launch();
        s
    }

    pub fn server_command(&self) -> Command {
        let mut c = Command::new(bin("mgpu_scheduler_server"));
        c.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--log-dir")
            .arg(&self.log_dir);
        if !self.extra.iter().any(|e| e == "--nvml-lib") {
            c.arg("--simulate-gpus").arg(&self.gpus);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        if !self.extra.iter().any(|e| e == "--grace-period") {
            c.args(["--grace-period", "2"]);
        }
        // Tests switch jobs with 1 s limits (the default minimum slice is 60 s).
        if !self.extra.iter().any(|e| e == "--min-slice") {
            c.args(["--min-slice", "1"]);
        }
        if !self.extra.iter().any(|e| e == "--config") {
            c.arg("--config").arg(self.dir.join("mgpu.toml"));
        }
        c.args(&self.extra).env("MGPU_LOG", "debug");
        c
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let child = self
            .server_command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until(Duration::from_secs(60), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited early ({status}): {}", self.server_log());
            }
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
    }

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM and wait (the clean shutdown path).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The simulated GPUs of the next (re)start.
    pub fn set_gpus(&mut self, gpus: &str) {
        self.gpus = gpus.into();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// A client command as root (the test's own user).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(bin(program));
        // An attached srun passes its stdin to its job: never the test runner's own.
        c.env("MGPU_SOCKET", &self.socket)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        c
    }

    /// Runs a client command as root, which must succeed; returns its stdout.
    pub fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.cmd(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// A client command run as `user` (real uid, gid and groups switched by setpriv).
    pub fn cmd_as(&self, user: &TestUser, program: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(bin(program))
            .env("MGPU_SOCKET", &self.socket)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name)
            .current_dir(&user.home)
            .stdin(Stdio::null());
        c
    }

    pub fn queue_json(&self) -> Value {
        let out = self.cmd("mgpu_queue").arg("--json").output().unwrap();
        assert!(
            out.status.success(),
            "mgpu_queue failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The job's entry in `mgpu_queue --json`, if it is still pending or running.
    pub fn job(&self, id: u64) -> Option<Value> {
        self.queue_json()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == id)
            .cloned()
    }

    pub fn wait_gone(&self, id: u64) {
        wait_until(Duration::from_secs(120), || self.job(id).is_none());
    }

    /// Waits until the job is in `state`; fails at once (with its record) if it ended first:
    /// a job must be held where the test looks for it.
    pub fn wait_state(&self, id: u64, state: &str) {
        wait_until(Duration::from_secs(120), || match self.job(id) {
            Some(j) => j["state"] == state,
            None => panic!(
                "job {id} ended before it was seen {state}: {}",
                self.acct(id)
            ),
        });
    }

    /// The job's log as root reads it with `mgpu_log`.
    pub fn log(&self, id: u64) -> String {
        text(
            &self
                .cmd("mgpu_log")
                .arg(id.to_string())
                .output()
                .unwrap()
                .stdout,
        )
    }

    /// Ids of the pending jobs, in the order `mgpu_queue --json` lists them (priority order).
    pub fn pending_order(&self) -> Vec<u64> {
        self.queue_json()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "PENDING")
            .map(|j| j["id"].as_u64().unwrap())
            .collect()
    }

    /// Submits `mgpu_srun --detach --parsable ARGS` as root; returns the job id.
    pub fn detached(&self, args: &[&str]) -> u64 {
        let mut c = self.cmd("mgpu_srun");
        c.args(["--detach", "--parsable"]).args(args);
        self.submit(c)
    }

    /// The same as `user`.
    pub fn detached_as(&self, user: &TestUser, args: &[&str]) -> u64 {
        let mut c = self.cmd_as(user, "mgpu_srun");
        c.args(["--detach", "--parsable"]).args(args);
        self.submit(c)
    }

    /// The job's `mgpu_acct --json` record, waiting for it to land (right after the job leaves
    /// the queue).
    pub fn acct(&self, id: u64) -> Value {
        let mut rec = Value::Null;
        wait_until(Duration::from_secs(60), || {
            let out = self
                .cmd("mgpu_acct")
                .args(["--json", "-j", &id.to_string()])
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            rec = v["jobs"][0].clone();
            !rec.is_null()
        });
        rec
    }

    /// `kill -9` of the server: its jobs live on under their supervisors.
    pub fn kill9(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    /// Submits detached; returns the job id.
    pub fn submit(&self, mut cmd: Command) -> u64 {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "submit failed: {}", text(&out.stderr));
        text(&out.stdout)
            .trim()
            .parse()
            .expect("--parsable prints the id")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Jobs outlive the server (their supervisors re-attach to the next one): end them so
        // that no test leaves processes behind.
        if self.child.is_some() {
            let _ = self.cmd("mgpu_cancel").arg("--all").output();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let out = self.cmd("mgpu_queue").arg("--json").output();
                let empty = out
                    .ok()
                    .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
                    .is_none_or(|v| v["jobs"].as_array().is_none_or(|a| a.is_empty()));
                if empty {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.stop();
    }
}

/// Asserts that a command failed and said `needle` on stderr.
#[track_caller]
pub fn assert_fails_with(out: &Output, needle: &str) {
    assert!(
        !out.status.success(),
        "expected a failure; it succeeded: {}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains(needle), "{}", text(&out.stderr));
}

/// A server command with its own socket, state and log directories (no GPU flags).
pub fn server_cmd(
    socket: impl AsRef<Path>,
    state: impl AsRef<Path>,
    logs: impl AsRef<Path>,
) -> Command {
    let mut c = Command::new(bin("mgpu_scheduler_server"));
    c.arg("--socket")
        .arg(socket.as_ref())
        .arg("--state-dir")
        .arg(state.as_ref())
        .arg("--log-dir")
        .arg(logs.as_ref());
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `cond` until it holds; panics after `limit` (a liveness bound, not a timing assertion).
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn write_file(path: &Path, content: &str, mode: u32) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A job script printing numbered lines (`line 1`, `line 2`, ..., each followed by `pad` zeros
/// when `pad` > 0) every `pause` seconds for about `secs` seconds; its output ends with `done N`.
pub fn numbered_lines_job(secs: u32, pad: usize, pause: &str) -> String {
    let pad = padding(pad);
    format!(
        "i=0; end=$((SECONDS+{secs})); while [ $SECONDS -lt $end ]; do i=$((i+1)); echo \"line $i{pad}\"; sleep {pause}; done; echo \"done $i\""
    )
}

/// Asserts that `log` holds the whole output of [`numbered_lines_job`]: every line once, in
/// order, then `done N`.
pub fn assert_numbered_lines(log: &str, pad: usize) {
    let pad = padding(pad);
    let lines: Vec<&str> = log.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    let n: usize = last
        .strip_prefix("done ")
        .unwrap_or_else(|| panic!("the log does not end with done N: {last:?}"))
        .parse()
        .unwrap();
    assert_eq!(lines.len(), n + 1, "lines missing or repeated");
    for (i, l) in lines[..n].iter().enumerate() {
        assert_eq!(*l, format!("line {}{pad}", i + 1));
    }
}

fn padding(pad: usize) -> String {
    if pad == 0 {
        String::new()
    } else {
        format!(" {}", "0".repeat(pad))
    }
}
