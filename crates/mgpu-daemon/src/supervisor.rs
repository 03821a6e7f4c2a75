//! The per-job supervisor (like Slurm's `slurmstepd`): the same binary started with
//! `--supervise RUN_DIR`, one per running job, independent of the daemon's life.
//!
//! It starts the job (see [`crate::exec`]), is the child subreaper of everything the job forks
//! (so processes that leave the job's process group are still found), writes the job's output to
//! its log, and records the exit status durably in `RUN_DIR/exit.json` once every process of the
//! job is gone. The daemon talks to it over `RUN_DIR/sock` (the run directory is private to
//! root): it receives the output live and the exit, and sends stop requests. When the daemon
//! dies the job keeps running; a restarted daemon reconnects and carries on.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use mgpu_core::Millis;
use mgpu_proto::{read_frame, write_frame, Frame};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup::JobCgroup;
use crate::exec::{self, Launch};

pub const LAUNCH_FILE: &str = "launch.json";

/// This supervisor's job cgroup, when the machine offers cgroup v2 (one job per supervisor).
static CGROUP: std::sync::OnceLock<Option<JobCgroup>> = std::sync::OnceLock::new();
pub const EXIT_FILE: &str = "exit.json";
pub const SOCKET_FILE: &str = "sock";
/// Written just before the job is forked: without it, a run never started.
pub const FORKED_FILE: &str = "forked";
/// The path of the run's cgroup, when it has one.
pub const CGROUP_FILE: &str = "cgroup";
/// The supervisor's own error output.
pub const ERROR_LOG: &str = "supervisor.log";

/// Why a job is being stopped; echoed back in its [`ExitRecord`] so that the outcome is right
/// even when the daemon restarted in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Its owner or root cancelled it.
    Cancel,
    /// Past its time limit, to be requeued (context switch).
    Requeue,
    /// Past its time limit, not to be requeued.
    Timeout,
}

/// Messages from the supervisor to the daemon (control frames); output comes as data frames,
/// contiguous in the log from the offset in `Hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorMsg {
    Hello {
        /// The job's process group (0 if it failed to start).
        pgid: i32,
        /// Log length when this connection was registered; data frames continue from it.
        log_offset: u64,
    },
    Exited(ExitRecord),
}

/// Commands from the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SupervisorCmd {
    /// SIGTERM to every process of the job now, SIGKILL after `grace_ms`.
    Stop { grace_ms: u64, reason: StopReason },
    /// Deliver a signal to the job's processes.
    Signal { signal: i32 },
}

/// How a run ended, written durably to `exit.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set when the job could not be started; says why.
    pub start_error: Option<String>,
    pub stopped: Option<StopReason>,
    pub ended_at: Millis,
}

/// Kills whatever is left in a run's cgroup (when it had one) and waits, bounded, until it is
/// empty: for runs whose supervisor is gone.
pub fn kill_run_cgroup(run_dir: &Path) {
    let Ok(dir) = std::fs::read_to_string(run_dir.join(CGROUP_FILE)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let (kill, events) = (dir.join("cgroup.kill"), dir.join("cgroup.events"));
    for _ in 0..400 {
        let _ = std::fs::write(&kill, "1");
        match std::fs::read_to_string(&events) {
            Ok(e) if e.lines().any(|l| l == "populated 1") => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => break,
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

/// Reads a run's launch record; `None` when the job was never started there.
pub fn read_launch(run_dir: &Path) -> Option<Launch> {
    let text = std::fs::read(run_dir.join(LAUNCH_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Reads a finished run's record, if the supervisor wrote one.
pub fn read_exit(run_dir: &Path) -> Option<ExitRecord> {
    let text = std::fs::read(run_dir.join(EXIT_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

struct Shared {
    log: File,
    offset: u64,
    /// Bytes this run may still add to the log.
    log_budget: u64,
    /// The daemon's connection, when one is registered.
    conn: Option<UnixStream>,
    pgid: i32,
    stop: Option<StopReason>,
    /// The job's main process has exited: a stop arriving now has nothing to stop.
    leader_done: bool,
    exit: Option<ExitRecord>,
}

type SharedState = Arc<(Mutex<Shared>, Condvar)>;

fn lock(s: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a frame to the daemon; a failed or slow connection is dropped (the daemon reconnects
/// and catches up from the log).
fn send(shared: &mut Shared, frame: &Frame) {
    if let Some(conn) = shared.conn.as_mut() {
        if write_frame(conn, frame).is_err() {
            // Shut it down, not just drop it: the command reader holds a clone, and the daemon
            // must see the end to reconnect.
            let _ = conn.shutdown(std::net::Shutdown::Both);
            shared.conn = None;
        }
    }
}

fn now_ms() -> Millis {
    crate::state::now_ms()
}

/// Entry point of `mgpu_scheduler_server --supervise RUN_DIR`.
pub fn main(run_dir: &Path) -> std::process::ExitCode {
    if supervise(run_dir) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Supervises the run in `run_dir` to its end; false when that failed (the reason is on
/// stderr, the run directory's [`ERROR_LOG`]).
pub fn supervise(run_dir: &Path) -> bool {
    match run(run_dir) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("mgpu supervisor: {e:#}");
            false
        }
    }
}

fn run(run_dir: &Path) -> Result<()> {
    // Orphans of the job are re-parented to us rather than to init, so none escapes.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let launch: Launch = serde_json::from_slice(
        &std::fs::read(run_dir.join(LAUNCH_FILE)).context("reading launch.json")?,
    )
    .context("parsing launch.json")?;
    let sock_path = run_dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).context("binding the supervisor socket")?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&launch.log_path)
        .with_context(|| format!("opening {}", launch.log_path.display()))?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let shared: SharedState = Arc::new((
        Mutex::new(Shared {
            log,
            offset,
            log_budget: launch.max_log_bytes.unwrap_or(u64::MAX),
            conn: None,
            pgid: 0,
            stop: None,
            leader_done: false,
            exit: None,
        }),
        Condvar::new(),
    ));
    // The daemon that started us holds the other end of our stdin: our first link.
    let initial = initial_link();
    {
        let shared = shared.clone();
        std::thread::spawn(move || accept_loop(listener, shared));
    }

    // The job's supervisor must outlive an out-of-memory job, or the job escapes its books.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let cgroup = CGROUP
        .get_or_init(|| JobCgroup::create(launch.job))
        .as_ref();
    if let Some(cg) = cgroup {
        std::fs::write(
            run_dir.join(CGROUP_FILE),
            cg.dir.as_os_str().as_encoded_bytes(),
        )
        .context("recording the job's cgroup")?;
    }
    std::fs::write(run_dir.join(FORKED_FILE), b"").context("marking the run as started")?;
    // Resolved now, in the job's parent: the forked child only makes async-signal-safe calls.
    let account = match launch.account.clone() {
        Some(a) => Ok(a),
        None => crate::users::account(launch.uid),
    };
    let started = match account {
        Ok(account) => exec::start(&launch, &account, cgroup),
        Err(e) => Err(exec::StartError {
            message: format!("mgpu: cannot run as uid {}: {e:#}", launch.uid),
            code: 1,
        }),
    };
    let record = match started {
        Err(e) => {
            let record = {
                let mut s = lock(&shared);
                let msg = format!("{}\n", e.message);
                let _ = s.log.write_all(msg.as_bytes());
                s.offset += msg.len() as u64;
                let _ = s.log.sync_data();
                ExitRecord {
                    exit_code: Some(e.code),
                    signal: None,
                    start_error: Some(e.message),
                    stopped: None,
                    ended_at: now_ms(),
                }
            };
            write_exit(run_dir, &record)?;
            lock(&shared).exit = Some(record.clone());
            if let Some(conn) = initial {
                register(&shared, conn);
            }
            sync_exit(run_dir);
            return Ok(());
        }
        Ok(started) => run_job(started, &shared, initial),
    };
    write_exit(run_dir, &record)?;
    {
        let mut s = lock(&shared);
        s.exit = Some(record.clone());
        send(&mut s, &Frame::control(&SupervisorMsg::Exited(record)));
        shared.1.notify_all();
    }
    // Durable for the case nobody heard it (the daemon was down and the OS then crashed); off
    // the path to the daemon, which records the end in its own store. The log too.
    sync_exit(run_dir);
    let _ = lock(&shared).log.sync_data();
    Ok(())
}

/// Our stdin, when it is a socket (the daemon's end of the initial link).
fn initial_link() -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    let is_socket = nix::sys::stat::fstat(0)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .unwrap_or(false);
    // SAFETY: fd 0 is open (fstat succeeded) and nothing else in this process owns it.
    is_socket.then(|| unsafe { UnixStream::from_raw_fd(0) })
}

/// Makes `conn` the daemon link: hello (with the log offset its data continues from), the
/// exit if it is already known, and a thread reading its commands.
fn register(shared: &SharedState, conn: UnixStream) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let Ok(reader) = conn.try_clone() else {
        return;
    };
    {
        let mut s = lock(shared);
        s.conn = Some(conn);
        let hello = SupervisorMsg::Hello {
            pgid: s.pgid,
            log_offset: s.offset,
        };
        send(&mut s, &Frame::control(&hello));
        if let Some(exit) = s.exit.clone() {
            send(&mut s, &Frame::control(&SupervisorMsg::Exited(exit)));
        }
    }
    let shared = shared.clone();
    std::thread::spawn(move || command_loop(reader, shared));
}

/// Runs the job to its end: reaps everything, collects output. Returns how the leader ended.
fn run_job(
    started: exec::Started,
    shared: &SharedState,
    initial: Option<UnixStream>,
) -> ExitRecord {
    let exec::Started {
        pid: leader,
        stdout,
        stderr,
    } = started;
    lock(shared).pgid = leader;
    shared.1.notify_all();
    // Linked before any output is read, so the daemon gets all of it live.
    if let Some(conn) = initial {
        register(shared, conn);
    }
    let readers = [
        spawn_pump(stdout, 1, shared.clone()),
        spawn_pump(stderr, 2, shared.clone()),
    ];
    let mut leader_status = None;
    // Until the leader exits: reap whatever ends (orphans included) as it ends.
    while leader_status.is_none() {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == leader => {
                leader_status = Some((Some(code), None));
                lock(shared).leader_done = true;
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == leader => {
                leader_status = Some((None, Some(sig as i32)));
                lock(shared).leader_done = true;
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    // The job is over when its main process is: everything it left behind dies with it (like
    // Slurm), including processes that escaped its group. Repeat until nothing is left, in case
    // something forked while we were killing.
    loop {
        kill_all(leader, Signal::SIGKILL);
        match waitpid(
            Pid::from_raw(-1),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    for r in readers {
        let _ = r.join();
    }
    if let Some(cg) = CGROUP.get().and_then(Option::as_ref) {
        // Nothing may be left in the job's cgroup before its GPUs are freed.
        cg.remove();
    }
    let (exit_code, signal) = leader_status.unwrap_or((None, None));
    let s = lock(shared);
    ExitRecord {
        exit_code,
        signal,
        start_error: None,
        stopped: s.stop,
        ended_at: now_ms(),
    }
}

/// Signals the job's process group and every descendant of this supervisor (processes that
/// left the group with setsid or a double fork are re-parented to us).
fn kill_all(pgid: i32, sig: Signal) {
    if let Some(cg) = CGROUP.get().and_then(Option::as_ref) {
        // Everything the job started is in its cgroup, wherever it re-parented itself.
        if sig == Signal::SIGKILL {
            cg.kill();
        } else {
            cg.signal(sig);
        }
        return;
    }
    let _ = killpg(Pid::from_raw(pgid), sig);
    for pid in descendants(std::process::id() as i32) {
        // Members of the group already got it: a signal must arrive once.
        if stat_field(pid, 2) != Some(pgid) {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    }
}

/// All descendants of `root`, from /proc.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Some(ppid) = stat_field(pid, 1) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            if seen.insert(c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Field `n` after the command name in /proc/PID/stat (0: state, 1: ppid, 2: pgrp, 3: session).
pub fn stat_field(pid: i32, n: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(n)?.parse().ok()
}

fn spawn_pump(fd: OwnedFd, tag: u8, shared: SharedState) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut pipe = File::from(fd);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let mut s = lock(&shared);
            if s.log_budget == 0 {
                continue; // over the limit: drained, not kept
            }
            let keep = (n as u64).min(s.log_budget) as usize;
            s.log_budget -= keep as u64;
            let mut data = Bytes::copy_from_slice(&buf[..keep]);
            if s.log_budget == 0 {
                let note = b"\nmgpu: this run reached the server's log size limit; further output is discarded\n";
                let mut with_note = data.to_vec();
                with_note.extend_from_slice(note);
                data = Bytes::from(with_note);
            }
            let _ = s.log.write_all(&data);
            s.offset += data.len() as u64;
            let frame = if tag == 1 {
                Frame::Stdout(data)
            } else {
                Frame::Stderr(data)
            };
            send(&mut s, &frame);
        }
    })
}

fn accept_loop(listener: UnixListener, shared: SharedState) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        // The run directory is root's; still, only our own uid may drive us.
        let me = nix::unistd::geteuid().as_raw();
        match nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) if c.uid() == me => {}
            _ => continue,
        }
        // Wait until the job has a process group (or failed to start) before saying hello.
        {
            let mut s = lock(&shared);
            while s.pgid == 0 && s.exit.is_none() {
                s = shared
                    .1
                    .wait_timeout(s, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        register(&shared, conn);
    }
}

fn command_loop(mut conn: UnixStream, shared: SharedState) {
    while let Ok(Some(frame)) = read_frame(&mut conn) {
        let Ok(cmd) = frame.parse::<SupervisorCmd>() else {
            continue;
        };
        match cmd {
            SupervisorCmd::Stop { grace_ms, reason } => {
                let (pgid, first) = {
                    let mut s = lock(&shared);
                    if s.leader_done {
                        continue; // it ended by itself: its natural exit stands
                    }
                    let first = s.stop.is_none();
                    // A cancel overrides a context switch already under way (no new signals).
                    if first || reason == StopReason::Cancel {
                        s.stop = Some(reason);
                    }
                    (s.pgid, first)
                };
                if pgid > 0 && first {
                    kill_all(pgid, Signal::SIGTERM);
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(grace_ms));
                        if lock(&shared).exit.is_none() {
                            kill_all(pgid, Signal::SIGKILL);
                        }
                    });
                }
            }
            SupervisorCmd::Signal { signal } => {
                let pgid = lock(&shared).pgid;
                if let (true, Ok(sig)) = (pgid > 0, Signal::try_from(signal)) {
                    kill_all(pgid, sig);
                }
            }
        }
    }
}

/// Writes `exit.json` durably (temp file, fsync, rename, fsync of the directory).
fn write_exit(run_dir: &Path, record: &ExitRecord) -> Result<()> {
    // Written whole, then renamed into place: a reader never sees half a record.
    let tmp: PathBuf = run_dir.join("exit.json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(record)?)?;
    std::fs::rename(&tmp, run_dir.join(EXIT_FILE))?;
    Ok(())
}

/// Flushes `exit.json` and its directory entry to disk (the daemon may have removed them).
fn sync_exit(run_dir: &Path) {
    if let Ok(f) = File::open(run_dir.join(EXIT_FILE)) {
        let _ = f.sync_all();
    }
    if let Ok(d) = File::open(run_dir) {
        let _ = d.sync_all();
    }
}
