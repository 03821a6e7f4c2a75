//! The per-job supervisor (like Slurm's `slurmstepd`): one per running job, independent of the
//! daemon's life. It is forked by the launcher (see [`crate::launcher`]), or, as a fallback,
//! this binary started with `--supervise RUN_DIR`; one thread drives it.
//!
//! It starts the job (see [`crate::exec`]), is the child subreaper of everything the job forks
//! (so processes that leave the job's process group are still found), writes the job's output to
//! its log, and records the exit status in `RUN_DIR/exit.json` once every process of the job is
//! gone (durably when no daemon heard it). The daemon talks to it over `RUN_DIR/sock` (the run directory is private to
//! root): it receives the output live and the exit, and sends stop requests. When the daemon
//! dies the job keeps running; a restarted daemon reconnects and carries on.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use mgpu_core::Millis;
use mgpu_proto::{write_frame, Frame, FrameCodec};
use nix::fcntl::{Flock, FlockArg};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, killpg, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio_util::codec::Decoder;

use crate::cgroup::JobCgroup;
use crate::exec::{self, Launch};

pub const LAUNCH_FILE: &str = "launch.json";

/// This supervisor's job cgroups, where the machine offers any (one job per supervisor).
static CGROUP: std::sync::OnceLock<Option<JobCgroup>> = std::sync::OnceLock::new();
pub const EXIT_FILE: &str = "exit.json";
pub const SOCKET_FILE: &str = "sock";
/// How long output is still collected after every process of the job is gone.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How long the end of a run waits for its `-o`/`-e` writer threads to write what is queued
/// (a file whose writes hang delays only its own job's end, by this much).
const OUTPUT_FILES_LIMIT: Duration = Duration::from_secs(5);
/// Bytes waiting for a daemon that does not read before its link is dropped (the output is in
/// the log; the daemon links again and reads what it missed from there).
const MAX_OUTBOX: usize = 1 << 20;
/// How long the last messages of a run (its end) may take to reach the daemon.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Written just before the job is forked: without it, a run never started. It holds the path
/// of the run's cgroup, when it has one.
pub const FORKED_FILE: &str = "forked";
/// Written by a restarted server that found the run prepared but never started (no `forked`
/// mark): a supervisor that comes late (forked by the previous server's launcher just before
/// that server died) must not start the job, which is queued again. See [`abandon`].
pub const ABANDONED_FILE: &str = "abandoned";
const STOOD_DOWN: &str =
    "a restarted server took this run for never started and queued its job again: not starting it";
/// Where runs started by earlier versions recorded their cgroup.
const LEGACY_CGROUP_FILE: &str = "cgroup";

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
    /// Over its GPU memory reservation on a GPU it shares with other jobs: ends as
    /// OUT_OF_MEMORY.
    GpuMemory {
        gpu: u32,
        used_mib: u64,
        reserved_mib: u64,
    },
}

impl StopReason {
    /// What the job's log and its `mgpu_srun` are told when it is stopped for GPU memory.
    pub fn gpu_memory_note(&self) -> Option<String> {
        match *self {
            StopReason::GpuMemory {
                gpu,
                used_mib,
                reserved_mib,
            } => Some(format!(
                "mgpu: the job used {used_mib} MiB of GPU memory on GPU {gpu}, over its \
                 reservation of {reserved_mib} MiB (--mem), on a GPU it shares with other jobs: \
                 stopped before it could make them run out of memory (OUT_OF_MEMORY)"
            )),
            _ => None,
        }
    }
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
    /// Discard the job's further output (a log quota is used up), after `note` in the log.
    StopLog { note: String },
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
    /// The OOM killer killed a process of the job (over its memory limit).
    #[serde(default)]
    pub oom_killed: bool,
}

/// Kills whatever is left in a run's cgroups (when it had any) and waits, bounded, until they
/// are empty, then removes them: for runs whose supervisor is gone or does not stop its job.
pub fn kill_run_cgroup(run_dir: &Path) -> bool {
    let dirs = recorded_cgroups(run_dir);
    if dirs.is_empty() {
        return false;
    }
    JobCgroup::from_dirs(dirs).remove_within(Duration::from_secs(2));
    true
}

/// The cgroup directories a run's supervisor recorded before it forked the job (none where it
/// has none), as they are still there. Recorded whole, wherever they were made (directly
/// under `mgpu-jobs` before per-user parents, below `user-UID` since), so a restarted daemon
/// finds the runs of any version.
pub fn recorded_cgroups(run_dir: &Path) -> Vec<PathBuf> {
    let recorded = std::fs::read_to_string(run_dir.join(FORKED_FILE))
        .ok()
        .filter(|d| !d.is_empty())
        .or_else(|| std::fs::read_to_string(run_dir.join(LEGACY_CGROUP_FILE)).ok());
    // One directory a line (v2, then v1 hierarchies); only cgroup directories of ours.
    recorded
        .unwrap_or_default()
        .lines()
        .filter(|d| Path::new(d).join("cgroup.procs").exists())
        .map(PathBuf::from)
        .collect()
}

/// Kills what is left of a job from outside its supervisor (the daemon, when a stop is
/// overdue or the supervisor vanished): through the run's cgroup where it has one. Without
/// one, its process group `pgid`, but only if that id may still be the job's: the leader's
/// pid is free for reuse once its supervisor collected it, so a group whose leader now runs
/// as another user than the job's `uid` is someone else's and is left alone. (A group whose
/// leader is gone keeps its id only while members of it live: then they are the job's.)
pub fn kill_job_remains(run_dir: &Path, pgid: i32, uid: u32) {
    if kill_run_cgroup(run_dir) || pgid <= 0 {
        return;
    }
    // The real uid, from `status` (the owner of /proc/PID is root for a process that is not
    // dumpable).
    let status = std::fs::read_to_string(format!("/proc/{pgid}/status"));
    let leader_ok = match &status {
        Err(_) => true,
        Ok(status) => {
            let real_uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next())
                .and_then(|id| id.parse::<u32>().ok());
            real_uid == Some(uid) && stat_field(pgid, 2) == Some(pgid)
        }
    };
    if leader_ok {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Whether a live supervisor holds `run_dir` (it locks it before anything else).
pub fn is_supervised(run_dir: &Path) -> bool {
    match File::open(run_dir) {
        Ok(dir) => Flock::lock(dir, FlockArg::LockExclusiveNonblock).is_err(),
        Err(_) => false,
    }
}

/// Marks a run that was prepared but never started as abandoned, so that no supervisor starts
/// it later: Ok(true) when done. Ok(false) when a supervisor marked it started first.
///
/// Each side writes its own mark, then looks for the other's: the supervisor writes `forked`
/// and then checks for `abandoned` before it starts the job (see [`run`]). Whichever order the
/// two happen in, they never both go ahead.
pub fn abandon(run_dir: &Path) -> io::Result<bool> {
    File::create(run_dir.join(ABANDONED_FILE))?;
    Ok(!run_dir.join(FORKED_FILE).exists())
}

/// Whether `name` exists in the directory `dir` (a descriptor, not a path that may have been
/// replaced).
fn exists_at(dir: RawFd, name: &str) -> bool {
    let name = std::ffi::CString::new(name).expect("no NUL in our file names");
    // SAFETY: a NUL-terminated name relative to a directory descriptor the caller holds.
    unsafe { libc::faccessat(dir, name.as_ptr(), libc::F_OK, libc::AT_SYMLINK_NOFOLLOW) == 0 }
}

/// Writes `data` to `name` in the directory `dir` (a descriptor). Fails in a directory that
/// was removed.
fn write_at(dir: RawFd, name: &str, data: &[u8]) -> io::Result<()> {
    let name = std::ffi::CString::new(name).expect("no NUL in our file names");
    // SAFETY: a NUL-terminated name relative to a directory descriptor the caller holds; the
    // returned descriptor is owned by the File.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(data)
}

/// Locks a run directory for its one supervisor. Another supervisor may hold it for a moment
/// (one that came too late for its run and is about to stand down), so this waits a little.
fn lock_run(run_dir: &Path) -> Result<Flock<File>> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let dir = File::open(run_dir).context("opening the run directory")?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(held) => return Ok(held),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => anyhow::bail!("another supervisor already runs this run"),
        }
    }
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

fn now_ms() -> Millis {
    crate::state::now_ms()
}

/// Entry point of `mgpu_scheduler_server --supervise RUN_DIR`.
pub fn main(run_dir: &Path, launch_id: Option<u64>) -> std::process::ExitCode {
    if supervise(run_dir, launch_id) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Supervises the run in `run_dir` to its end; false when that failed (the reason goes to
/// stderr: the server's log). `launch_id` is the attempt the daemon started us for: a run
/// directory prepared anew for another attempt is not ours.
pub fn supervise(run_dir: &Path, launch_id: Option<u64>) -> bool {
    match run(run_dir, launch_id) {
        Ok(()) => true,
        Err(e) => {
            // Not eprintln: the server that started us may be gone, and its stderr with it.
            let _ = writeln!(
                io::stderr(),
                "mgpu supervisor of {}: {e:#}",
                run_dir.display()
            );
            false
        }
    }
}

fn run(run_dir: &Path, launch_id: Option<u64>) -> Result<()> {
    // One supervisor per run, whatever became of the request that started it (a launcher that
    // died after forking makes the daemon ask again). Held until we exit; not inherited by
    // the job (close-on-exec, and the job's child closes everything else). Our marks are
    // looked up and written through it, not through the path (which a restarted server may
    // have removed and prepared anew).
    let only_one = lock_run(run_dir)?;
    let dir = only_one.as_raw_fd();
    if exists_at(dir, ABANDONED_FILE) {
        anyhow::bail!("{STOOD_DOWN}");
    }
    let launch: Launch = serde_json::from_slice(
        &std::fs::read(run_dir.join(LAUNCH_FILE)).context("reading launch.json")?,
    )
    .context("parsing launch.json")?;
    if launch_id.is_some_and(|id| id != launch.launch_id) {
        anyhow::bail!("the run directory was prepared anew for another attempt: not starting it");
    }
    // Orphans of the job are re-parented to us rather than to init, so none escapes.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    // Before the job exists, so that no exit goes unnoticed.
    let mut sigchld = sigchld_fd()?;
    let sock_path = run_dir.join(SOCKET_FILE);
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).context("binding the supervisor socket")?;
    listener.set_nonblocking(true)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&launch.log_path)
        .with_context(|| format!("opening {}", launch.log_path.display()))?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut sup = Supervisor {
        log,
        offset,
        log_budget: launch.max_log_bytes.unwrap_or(u64::MAX),
        log_note: Some(match launch.log_note.as_str() {
            "" => "\nmgpu: this job reached the server's log size limit; further output is discarded\n".into(),
            n => n.to_string(),
        }),
        conn: None,
        pgid: 0,
        stop: None,
        leader_done: false,
        exit: None,
        kill_at: None,
        outputs: None,
    };
    // The daemon that started us holds the other end of our stdin: our first link.
    let initial = initial_link();
    // The job's stdin, when its mgpu_srun gave one: the first thing on the link. Ours only
    // until the job has it.
    let stdin = match (&initial, launch.stdin) {
        (Some(link), true) => take_stdin(link),
        _ => None,
    };
    // With --pty it carries keystrokes for the job's terminal, relayed below.
    let (stdin, keys) = match launch.pty {
        Some(_) => (None, stdin),
        None => (stdin, None),
    };
    // The job's supervisor must outlive an out-of-memory job, or the job escapes its books.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    let limits = crate::cgroup::Limits {
        pids_max: launch.pids_max,
        cpus: launch.spec.cpus,
        mem_bytes: launch.spec.host_mem_mib.map(|m| m.saturating_mul(1 << 20)),
        user_pids_max: launch.user_pids_max,
    };
    let mut cgroup_error = None;
    let cgroup = CGROUP
        .get_or_init(|| {
            JobCgroup::create(launch.job, launch.uid, &limits).unwrap_or_else(|e| {
                cgroup_error = Some(e);
                None
            })
        })
        .as_ref();
    let cgroup_paths: Vec<&[u8]> = cgroup
        .into_iter()
        .flat_map(JobCgroup::dirs)
        .map(|d| d.as_os_str().as_encoded_bytes())
        .collect();
    // Our mark first, then theirs (see `abandon`). Not starting after all: no cgroup is left.
    let marked = write_at(dir, FORKED_FILE, &cgroup_paths.join(&b'\n'))
        .context("marking the run as started")
        .and_then(|()| {
            if exists_at(dir, ABANDONED_FILE) {
                anyhow::bail!("{STOOD_DOWN}");
            }
            Ok(())
        });
    if let Err(e) = marked {
        if let Some(cg) = cgroup {
            cg.remove();
        }
        return Err(e);
    }
    // Resolved now, in the job's parent: the forked child only makes async-signal-safe calls.
    let account = match launch.account.clone() {
        Some(a) => Ok(a),
        None => crate::users::account(launch.uid),
    };
    let started = match account {
        _ if cgroup_error.is_some() => Err(exec::StartError {
            message: format!("mgpu: {}", cgroup_error.unwrap_or_default()),
            code: 1,
        }),
        Ok(account) => exec::start_with_stdin(
            &launch,
            &account,
            cgroup,
            stdin.as_ref().map(std::os::fd::AsFd::as_fd),
        ),
        Err(e) => Err(exec::StartError {
            message: format!("mgpu: cannot run as uid {}: {e:#}", launch.uid),
            code: 1,
        }),
    };
    // The job has its stdin now; we do not keep a copy.
    drop(stdin);
    if let (Some(keys), Ok(started)) = (keys, &started) {
        if let Ok(master) = started.stdout.try_clone() {
            std::thread::spawn(move || relay_keys(keys, master));
        }
    }
    let started = match started {
        Ok(started) => started,
        Err(e) => {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            let msg = format!("{}\n", e.message);
            let _ = sup.log.write_all(msg.as_bytes());
            sup.offset += msg.len() as u64;
            let record = ExitRecord {
                exit_code: Some(e.code),
                signal: None,
                start_error: Some(e.message),
                stopped: None,
                ended_at: now_ms(),
                oom_killed: false,
            };
            write_exit(run_dir, &record)?;
            sup.exit = Some(record);
            if let Some(conn) = initial {
                sup.register(conn);
            }
            sup.finish_link();
            sync_unheard(&mut sup, run_dir);
            return Ok(());
        }
    };
    let record = run_job(&mut sup, started, &listener, &mut sigchld, initial);
    // The -o/-e files get what is queued for them before the end is told (a bounded wait).
    if let Some(w) = sup.outputs.take() {
        w.finish(OUTPUT_FILES_LIMIT);
    }
    write_exit(run_dir, &record)?;
    sup.exit = Some(record.clone());
    sup.send(&Frame::control(&SupervisorMsg::Exited(record)));
    sup.finish_link();
    sync_unheard(&mut sup, run_dir);
    Ok(())
}

/// The daemon records the end of a run durably in its own store once it hears of it; when no
/// daemon heard it (none was connected), the run's own record and log are made durable here,
/// for the next daemon to find even after an OS crash. (A daemon that heard the end and then
/// crashed before committing it leaves `exit.json` in the page cache for its successor.)
fn sync_unheard(sup: &mut Supervisor, run_dir: &Path) {
    if sup.conn.is_none() {
        sync_exit(run_dir);
        let _ = sup.log.sync_data();
    }
}

/// Our stdin, when it is a socket (the daemon's end of the initial link).
/// `mgpu_srun --pty`'s keystrokes and window sizes ([`mgpu_proto::pty_frame`]s, through the
/// job's stdin pipe, made by the daemon) to the job's terminal, until srun goes away (the end
/// of the pipe) or sends garbage. Its own thread: a blocking copy through a 64 KiB buffer, so
/// a job that does not read its terminal makes srun wait, never the supervisor's loop.
fn relay_keys(keys: std::os::fd::OwnedFd, master: std::os::fd::OwnedFd) {
    use std::io::{Read, Write};
    let mut from = File::from(keys);
    let mut to = File::from(master);
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let mut head = [0u8; 3];
        if from.read_exact(&mut head).is_err() {
            return;
        }
        let n = u16::from_be_bytes([head[1], head[2]]) as usize;
        // mgpu_srun never sends an empty frame: one is garbage (a stream of zeros would make
        // this loop spin without ever waiting), and ends the relay like the end of input.
        if n == 0 || from.read_exact(&mut buf[..n]).is_err() {
            return;
        }
        match head[0] {
            0 => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            1 if n == 4 => {
                let ws = libc::winsize {
                    ws_row: u16::from_be_bytes([buf[0], buf[1]]),
                    ws_col: u16::from_be_bytes([buf[2], buf[3]]),
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads the winsize we own; the kernel signals the
                // terminal's foreground group (SIGWINCH).
                unsafe { libc::ioctl(to.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
            }
            _ => return,
        }
    }
}

/// Passes `fd` (a job's stdin: the read end of the pipe the daemon made, never a user's
/// descriptor) to a supervisor over its new link: one byte carrying it.
pub fn give_stdin(link: &UnixStream, fd: &std::os::fd::OwnedFd) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [io::IoSlice::new(b"i")];
    if let Err(e) = sendmsg::<()>(link.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None) {
        tracing::warn!(error = %e, "cannot pass the job's stdin to its supervisor");
    }
}

/// Takes the job's stdin from the daemon's link (sent by [`give_stdin`] before any frame),
/// waiting at most 10 s; `None` (stdin `/dev/null`) when it does not come.
fn take_stdin(link: &UnixStream) -> Option<std::os::fd::OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let _ = link.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let got = recvmsg::<()>(
        link.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    );
    let _ = link.set_read_timeout(None);
    let msg = got.ok()?;
    let mut fd = None;
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for f in list {
                // SAFETY: the kernel just gave us this descriptor.
                let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(f) };
                fd.get_or_insert(owned);
            }
        }
    }
    fd
}

fn initial_link() -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    let is_socket = nix::sys::stat::fstat(0)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .unwrap_or(false);
    // SAFETY: fd 0 is open (fstat succeeded) and nothing else in this process owns it.
    is_socket.then(|| unsafe { UnixStream::from_raw_fd(0) })
}

/// A supervisor's state. One thread drives it: a `poll` loop over the job's output pipes, the
/// daemon's link, the socket a restarted daemon connects to, and a signalfd for `SIGCHLD` (no
/// helper threads: they cost more to start and stop than a short job runs; only a job with
/// `-o`/`-e` files gets writer threads, see [`crate::outfiles`]).
struct Supervisor {
    log: File,
    offset: u64,
    /// Bytes this run may still add to the log.
    log_budget: u64,
    /// Said in the log when the budget is used up; `None` once said (output is discarded).
    log_note: Option<String>,
    /// The daemon's connection, when one is registered.
    conn: Option<Link>,
    pgid: i32,
    stop: Option<StopReason>,
    /// The job's main process has exited: a stop arriving now has nothing to stop.
    leader_done: bool,
    exit: Option<ExitRecord>,
    /// When to SIGKILL what a stop's SIGTERM left alive.
    kill_at: Option<Instant>,
    /// `-o`/`-e`: the threads writing the job's output into the files its process opened as
    /// its user (this loop never writes or closes those files itself).
    outputs: Option<crate::outfiles::OutputWriters>,
}

/// The daemon's connection: commands arrive as control frames. Writes never block: what the
/// daemon has not taken yet waits in `outbox` (bounded by [`MAX_OUTBOX`]).
struct Link {
    stream: UnixStream,
    outbox: Vec<u8>,
    inbox: BytesMut,
    /// Decodes frames across reads (it remembers a header whose body is still to come).
    codec: FrameCodec,
}

impl Link {
    /// Reads what the daemon sent (once, or all there is when `drain`) and returns the whole
    /// commands in it, and whether the link is finished (closed, or garbled).
    fn receive(&mut self, drain: bool) -> (Vec<SupervisorCmd>, bool) {
        let mut closed = false;
        let mut buf = [0u8; 4096];
        loop {
            match nix::sys::socket::recv(
                self.stream.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => closed = true,
                Ok(n) => {
                    self.inbox.extend_from_slice(&buf[..n]);
                    if drain {
                        continue;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => closed = true,
            }
            break;
        }
        let mut commands = Vec::new();
        loop {
            match self.codec.decode(&mut self.inbox) {
                Ok(Some(frame)) => {
                    if let Ok(cmd) = frame.parse::<SupervisorCmd>() {
                        commands.push(cmd);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        (commands, closed)
    }
}

impl Supervisor {
    /// Sends a frame to the daemon without ever waiting for it: a failed connection, or one
    /// with [`MAX_OUTBOX`] bytes the daemon has not taken, is dropped (the daemon links again
    /// and catches up from the log).
    fn send(&mut self, frame: &Frame) {
        if let Some(link) = self.conn.as_mut() {
            let _ = write_frame(&mut link.outbox, frame);
            self.flush_link();
            if self
                .conn
                .as_ref()
                .is_some_and(|l| l.outbox.len() > MAX_OUTBOX)
            {
                self.drop_link();
            }
        }
    }

    /// Writes what the daemon's socket takes now.
    fn flush_link(&mut self) {
        let Some(link) = self.conn.as_mut() else {
            return;
        };
        let mut sent = 0;
        let mut failed = false;
        while sent < link.outbox.len() {
            match nix::sys::socket::send(
                link.stream.as_raw_fd(),
                &link.outbox[sent..],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        link.outbox.drain(..sent);
        if failed {
            self.drop_link();
        }
    }

    /// The run is over: its last messages go out, waiting for the daemon a bounded time.
    fn finish_link(&mut self) {
        let deadline = Instant::now() + FINAL_WRITE_TIMEOUT;
        loop {
            let Some(link) = self.conn.as_ref() else {
                return;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if link.outbox.is_empty() || left.is_zero() {
                return;
            }
            let mut fds = [PollFd::new(link.stream.as_fd(), PollFlags::POLLOUT)];
            let ms =
                PollTimeout::try_from(left.as_millis().max(1) as i32).unwrap_or(PollTimeout::ZERO);
            let _ = poll(&mut fds, ms);
            self.flush_link();
        }
    }

    /// Drops the daemon's link. Commands it sent before it went are still carried out (a
    /// restarted daemon stopping a job it cannot take back sends a stop and hangs up at once).
    fn drop_link(&mut self) {
        if let Some(mut link) = self.conn.take() {
            let (commands, _) = link.receive(true);
            // The daemon must see the end to reconnect.
            let _ = link.stream.shutdown(std::net::Shutdown::Both);
            for cmd in commands {
                self.command(cmd);
            }
        }
    }

    /// Makes `stream` the daemon link: hello (with the log offset its data continues from),
    /// and the exit if it is already known.
    fn register(&mut self, stream: UnixStream) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        self.conn = Some(Link {
            stream,
            outbox: Vec::new(),
            inbox: BytesMut::new(),
            codec: FrameCodec::default(),
        });
        let hello = SupervisorMsg::Hello {
            pgid: self.pgid,
            log_offset: self.offset,
        };
        self.send(&Frame::control(&hello));
        if let Some(exit) = self.exit.clone() {
            self.send(&Frame::control(&SupervisorMsg::Exited(exit)));
        }
    }

    /// A connection on our socket: a restarted daemon (only our own uid may drive us).
    fn accept(&mut self, listener: &UnixListener) {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let me = nix::unistd::geteuid().as_raw();
        match nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) if c.uid() == me => self.register(conn),
            _ => {}
        }
    }

    /// Output of the job: into the log (within its budget) and to the daemon.
    fn output(&mut self, tag: u8, bytes: &[u8]) {
        self.output_to_files(tag, bytes);
        let Some(note) = &self.log_note else {
            return; // over the limit: drained, not kept
        };
        let keep = (bytes.len() as u64).min(self.log_budget) as usize;
        self.log_budget -= keep as u64;
        let mut data = Bytes::copy_from_slice(&bytes[..keep]);
        if self.log_budget == 0 {
            // (Also when the run starts with nothing left: its first output says so.)
            let mut with_note = data.to_vec();
            with_note.extend_from_slice(note.as_bytes());
            data = Bytes::from(with_note);
            self.log_note = None;
        }
        let _ = self.log.write_all(&data);
        self.offset += data.len() as u64;
        let frame = if tag == 1 {
            Frame::Stdout(data)
        } else {
            Frame::Stderr(data)
        };
        self.send(&frame);
    }

    /// The job's output, also into its `-o`/`-e` files: handed to their writer threads, never
    /// waited for (a file that does not keep up loses output, said once in the log).
    fn output_to_files(&mut self, tag: u8, bytes: &[u8]) {
        let Some(note) = self.outputs.as_mut().and_then(|w| w.write(tag, bytes)) else {
            return;
        };
        // (The server's log, as the supervisor's other complaints.)
        let _ = writeln!(
            io::stderr(),
            "mgpu supervisor (pgid {}): {}",
            self.pgid,
            note.trim()
        );
        let _ = self.log.write_all(note.as_bytes());
        self.offset += note.len() as u64;
        self.send(&Frame::Stderr(Bytes::from(note)));
    }

    /// Reads what the daemon sent and carries out its commands.
    fn read_link(&mut self) {
        let Some(link) = self.conn.as_mut() else {
            return;
        };
        let (commands, closed) = link.receive(false);
        if closed {
            self.conn = None;
        }
        for cmd in commands {
            self.command(cmd);
        }
    }

    fn command(&mut self, cmd: SupervisorCmd) {
        match cmd {
            SupervisorCmd::Stop { grace_ms, reason } => {
                if self.leader_done {
                    return; // it ended by itself: its natural exit stands
                }
                let first = self.stop.is_none();
                // A cancel overrides a context switch already under way (no new signals).
                if first || reason == StopReason::Cancel {
                    self.stop = Some(reason);
                }
                if let (true, Some(note)) = (first, reason.gpu_memory_note()) {
                    let note = format!("\n{note}\n");
                    let _ = self.log.write_all(note.as_bytes());
                    self.offset += note.len() as u64;
                    self.send(&Frame::Stderr(Bytes::from(note)));
                }
                if self.pgid > 0 && first {
                    kill_all(self.pgid, Signal::SIGTERM);
                    // (An absurdly long grace period means no SIGKILL at all.)
                    self.kill_at = Instant::now().checked_add(Duration::from_millis(grace_ms));
                }
            }
            SupervisorCmd::Signal { signal } => {
                if let (true, Ok(sig)) = (self.pgid > 0, Signal::try_from(signal)) {
                    kill_all(self.pgid, sig);
                }
            }
            SupervisorCmd::StopLog { note } => {
                if self.log_note.take().is_some() {
                    // Like a used-up budget, but now: the note, then nothing more.
                    self.log_budget = 0;
                    let _ = self.log.write_all(note.as_bytes());
                    self.offset += note.len() as u64;
                    self.send(&Frame::Stderr(Bytes::from(note)));
                }
            }
        }
    }
}

/// Blocks `SIGCHLD` and returns a descriptor that reads it (the job's child unblocks it).
fn sigchld_fd() -> Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    mask.thread_block().context("blocking SIGCHLD")?;
    SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .context("creating a signalfd")
}

/// Reads what is available on a pipe into `sup`; false at its end. The data lands in `buf`'s
/// spare capacity, which is never zeroed: a job with little output touches (and so faults in)
/// few of its pages.
fn pump(pipe: &mut File, tag: u8, buf: &mut Vec<u8>, sup: &mut Supervisor) -> bool {
    loop {
        buf.clear();
        // SAFETY: read(2) writes at most `capacity` bytes into the buffer, and only the `n`
        // bytes it wrote are used.
        let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.capacity()) };
        match n {
            0 => return false,
            n if n > 0 => {
                unsafe { buf.set_len(n as usize) };
                sup.output(tag, buf);
                return true;
            }
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
}

/// Runs the job to its end: reaps everything, collects output, serves the daemon. Returns how
/// the leader ended.
fn run_job(
    sup: &mut Supervisor,
    started: exec::Started,
    listener: &UnixListener,
    sigchld: &mut SignalFd,
    initial: Option<UnixStream>,
) -> ExitRecord {
    let exec::Started {
        pid: leader,
        stdout,
        stderr,
        report,
        outputs,
    } = started;
    sup.outputs = outputs;
    sup.pgid = leader;
    // Linked before any output is read, so the daemon gets all of it live.
    if let Some(conn) = initial {
        sup.register(conn);
    }
    let mut pipes = Pipes([Some(File::from(stdout)), Some(File::from(stderr))]);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut leader_status = None;
    // Until the leader exits: reap whatever ends (orphans included) as it ends.
    while leader_status.is_none() {
        let timeout = match sup.kill_at {
            Some(at) => {
                let ms = at.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::ZERO)
            }
            None => PollTimeout::NONE,
        };
        // Fixed slots: pipes, then SIGCHLD, the socket and the daemon link.
        let (ready, sig_ready, accept_ready, link_ready) = {
            let mut fds = Vec::with_capacity(5);
            let [s0, s1] = pipes.poll_slots(&mut fds);
            let s_sig = poll_slot(&mut fds, Some(sigchld.as_fd()));
            let s_acc = poll_slot(&mut fds, Some(listener.as_fd()));
            let s_link = sup.conn.as_ref().map(|l| {
                // Writable too, while output waits for the daemon.
                let out = if l.outbox.is_empty() {
                    PollFlags::empty()
                } else {
                    PollFlags::POLLOUT
                };
                fds.push(PollFd::new(l.stream.as_fd(), PollFlags::POLLIN | out));
                fds.len() - 1
            });
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
            let is = |s| is_ready(&fds, s);
            ([is(s0), is(s1)], is(s_sig), is(s_acc), is(s_link))
        };
        // Output first: what the job wrote before it ended comes before its end.
        pipes.pump_ready(ready, &mut buf, sup);
        if sig_ready {
            while let Ok(Some(_)) = sigchld.read_signal() {}
        }
        if sig_ready || sup.kill_at.is_some() {
            leader_status = reap(leader);
        }
        if accept_ready {
            sup.accept(listener);
        }
        if link_ready {
            sup.read_link();
            sup.flush_link();
        }
        if sup.kill_at.is_some_and(|at| Instant::now() >= at) {
            sup.kill_at = None;
            // (Once the leader is collected its pid is free: see `kill_all`.)
            kill_all(
                if leader_status.is_none() { leader } else { 0 },
                Signal::SIGKILL,
            );
        }
    }
    sup.leader_done = true;
    // The job is over when its main process is: everything it left behind dies with it (like
    // Slurm), including processes that escaped its group. Repeat until nothing is left, in case
    // something forked while we were killing.
    loop {
        kill_all(0, Signal::SIGKILL);
        match waitpid(
            Pid::from_raw(-1),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    // Everything the job started is gone: the rest of its output, to the end of the pipes. A
    // process outside the job that its owner handed a pipe to could keep it open for ever, so
    // the wait for the end is bounded.
    let deadline = Instant::now() + DRAIN_LIMIT;
    while pipes.0.iter().any(Option::is_some) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ready = {
            let mut fds = Vec::with_capacity(2);
            let slots = pipes.poll_slots(&mut fds);
            let timeout =
                PollTimeout::try_from(left.as_millis().max(1) as i32).unwrap_or(PollTimeout::ZERO);
            if let Err(e) = poll(&mut fds, timeout) {
                if e != nix::errno::Errno::EINTR {
                    break;
                }
            }
            slots.map(|s| is_ready(&fds, s))
        };
        pipes.pump_ready(ready, &mut buf, sup);
    }
    let mut oom_killed = false;
    if let Some(cg) = CGROUP.get().and_then(Option::as_ref) {
        oom_killed = cg.oom_killed();
        // Nothing may be left in the job's cgroup before its GPUs are freed.
        cg.remove();
    }
    // A forked leader that failed before its exec left the reason on its report pipe.
    if let Some(e) = report.and_then(exec::StartReport::read) {
        let msg = format!("{}\n", e.message);
        let _ = sup.log.write_all(msg.as_bytes());
        sup.offset += msg.len() as u64;
        return ExitRecord {
            exit_code: Some(e.code),
            signal: None,
            start_error: Some(e.message),
            stopped: None,
            ended_at: now_ms(),
            oom_killed: false,
        };
    }
    let (exit_code, signal) = leader_status.unwrap_or((None, None));
    ExitRecord {
        exit_code,
        signal,
        start_error: None,
        stopped: sup.stop,
        ended_at: now_ms(),
        oom_killed,
    }
}

/// The job's stdout and stderr, each until it reaches its end.
struct Pipes([Option<File>; 2]);

impl Pipes {
    /// Adds the pipes still open to the poll set; returns their slots.
    fn poll_slots<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) -> [Option<usize>; 2] {
        self.0
            .each_ref()
            .map(|p| poll_slot(fds, p.as_ref().map(|f| f.as_fd())))
    }

    /// Reads the pipes poll found ready into `sup` (stdout then stderr); a pipe at its end is
    /// closed.
    fn pump_ready(&mut self, ready: [bool; 2], buf: &mut Vec<u8>, sup: &mut Supervisor) {
        for (i, tag) in [(0, 1u8), (1, 2u8)] {
            if ready[i] && !self.0[i].as_mut().is_some_and(|p| pump(p, tag, buf, sup)) {
                self.0[i] = None;
            }
        }
    }
}

/// Whether poll reported anything for `slot`.
fn is_ready(fds: &[PollFd<'_>], slot: Option<usize>) -> bool {
    slot.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
}

/// Adds `fd` (when there is one) to the poll set; returns its slot.
fn poll_slot<'a>(fds: &mut Vec<PollFd<'a>>, fd: Option<BorrowedFd<'a>>) -> Option<usize> {
    fd.map(|fd| {
        fds.push(PollFd::new(fd, PollFlags::POLLIN));
        fds.len() - 1
    })
}

/// Reaps every child that has ended; returns the leader's status once it is among them.
#[allow(clippy::type_complexity)]
fn reap(leader: i32) -> Option<(Option<i32>, Option<i32>)> {
    let mut status = None;
    loop {
        match waitpid(
            Pid::from_raw(-1),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == leader => {
                status = Some((Some(code), None));
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid.as_raw() == leader => {
                status = Some((None, Some(sig as i32)));
            }
            Ok(WaitStatus::StillAlive) => return status,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            // No children at all: the leader cannot still be running.
            Err(_) => return status.or(Some((None, None))),
        }
    }
}

/// Signals the job's process group and every descendant of this supervisor (processes that
/// left the group with setsid or a double fork are re-parented to us). `pgid` 0: only the
/// descendants. Once the leader is collected, its pid (the group's id) is free for the kernel
/// to give to anyone's new process as soon as no member of the group is left, so the group is
/// no longer signalled by its id: its members are all our descendants anyway.
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
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), sig);
    }
    for pid in descendants(std::process::id() as i32) {
        // Members of the group already got it: a signal must arrive once.
        if pgid <= 0 || stat_field(pid, 2) != Some(pgid) {
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

/// Writes `exit.json` atomically (a temp file renamed into place; [`sync_exit`] makes it
/// durable where needed).
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

#[cfg(test)]
mod tests {

    /// Found by an attack review: the daemon killed a stopped job's process group by its id
    /// after the leader was collected, when that id could be another user's new session
    /// (steered there by the attacker). Without a cgroup, a group whose leader runs as
    /// another user than the job's is left alone; the job's own is killed.
    #[test]
    fn a_group_id_now_anothers_is_not_killed_for_a_job() {
        use std::os::unix::process::CommandExt;
        let no_cgroup = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("100");
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut leader = cmd.spawn().unwrap();
        let pgid = leader.id() as i32;
        // A job of another user: its group id is not this process's group.
        super::kill_job_remains(no_cgroup.path(), pgid, me.wrapping_add(4242));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            leader.try_wait().unwrap().is_none(),
            "another user's group was killed"
        );
        // The job's own: killed.
        super::kill_job_remains(no_cgroup.path(), pgid, me);
        let status = leader.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
    }

    /// An empty keystroke frame (garbage: a stream of zeros) ends the --pty relay, even while
    /// its pipe stays open (review finding 9: it used to loop on such frames).
    #[test]
    fn the_pty_relay_stops_at_an_empty_frame() {
        use std::io::Write;
        let (keys, write) = nix::unistd::pipe().unwrap();
        let mut write = std::fs::File::from(write);
        write.write_all(&[0u8; 3 * 100]).unwrap();
        let master = std::os::fd::OwnedFd::from(std::fs::File::create("/dev/null").unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            super::relay_keys(keys, master);
            let _ = tx.send(());
        });
        // A liveness bound, not a timing assertion.
        assert!(rx.recv_timeout(std::time::Duration::from_secs(30)).is_ok());
        drop(write);
    }

    /// A stop for GPU memory, echoed back in the exit record (which a restarted daemon reads),
    /// makes the job OUT_OF_MEMORY with the figures; a cancel that came first still wins.
    #[test]
    fn a_gpu_memory_stop_survives_the_exit_record_and_ends_out_of_memory() {
        let reason = StopReason::GpuMemory {
            gpu: 3,
            used_mib: 10_240,
            reserved_mib: 4_096,
        };
        let rec = ExitRecord {
            exit_code: None,
            signal: Some(15),
            start_error: None,
            stopped: Some(reason),
            ended_at: 1,
            oom_killed: false,
        };
        let rec: ExitRecord = serde_json::from_str(&serde_json::to_string(&rec).unwrap()).unwrap();
        assert_eq!(rec.stopped, Some(reason));
        let o = crate::state::outcome_of(9, &rec);
        assert_eq!(o.state, mgpu_core::JobState::OutOfMemory);
        let m = o.message.unwrap();
        assert!(
            m.contains("10240 MiB") && m.contains("GPU 3") && m.contains("4096 MiB"),
            "{m}"
        );
        let cancelled = ExitRecord {
            stopped: Some(StopReason::Cancel),
            ..rec
        };
        assert_eq!(
            crate::state::outcome_of(9, &cancelled).state,
            mgpu_core::JobState::Cancelled
        );
    }

    use super::*;

    #[test]
    fn a_locked_run_directory_is_supervised() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_supervised(dir.path()));
        let held = Flock::lock(
            File::open(dir.path()).unwrap(),
            FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        assert!(is_supervised(dir.path()));
        drop(held);
        assert!(!is_supervised(dir.path()));
        assert!(!is_supervised(&dir.path().join("missing")));
    }

    /// A run that a restarted server abandoned (prepared, never started, queued again) is not
    /// started by a supervisor that comes late; a run a supervisor marked started is not
    /// abandoned; a supervisor does not take a run prepared for another attempt.
    #[test]
    fn an_abandoned_run_is_never_started() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FORKED_FILE), "").unwrap();
        assert!(!abandon(dir.path()).unwrap(), "a started run was abandoned");
        std::fs::remove_file(dir.path().join(FORKED_FILE)).unwrap();
        assert!(abandon(dir.path()).unwrap());
        let err = run(dir.path(), None).unwrap_err();
        assert!(format!("{err:#}").contains("not starting it"), "{err:#}");
        assert!(!dir.path().join(FORKED_FILE).exists());

        // Prepared anew (a fresh launch record) for another attempt than ours.
        let fresh = tempfile::tempdir().unwrap();
        let launch = Launch {
            job: 1,
            name: "j".into(),
            uid: 0,
            account: None,
            gpus: vec![0],
            restarts: 0,
            started_at: 0,
            spec: Default::default(),
            switch_user: false,
            log_path: fresh.path().join("log"),
            max_log_bytes: None,
            log_note: String::new(),
            launch_id: 7,
            array: None,
            pids_max: None,
            user_pids_max: None,
            rlimits: Vec::new(),
            mem_mib: None,
            gpu_total_mib: None,
            stdin: false,
            pty: None,
        };
        std::fs::write(
            fresh.path().join(LAUNCH_FILE),
            serde_json::to_vec(&launch).unwrap(),
        )
        .unwrap();
        let err = run(fresh.path(), Some(8)).unwrap_err();
        assert!(format!("{err:#}").contains("another attempt"), "{err:#}");
        assert!(!fresh.path().join(FORKED_FILE).exists());
    }

    /// The supervisor's own check, after its mark: a run abandoned while the supervisor was
    /// setting up is not started (and the mark check reads through the directory descriptor).
    #[test]
    fn marks_are_read_through_the_locked_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_run(dir.path()).unwrap();
        assert!(!exists_at(held.as_raw_fd(), ABANDONED_FILE));
        write_at(held.as_raw_fd(), FORKED_FILE, b"x").unwrap();
        assert_eq!(std::fs::read(dir.path().join(FORKED_FILE)).unwrap(), b"x");
        assert!(abandon(dir.path()).is_ok_and(|done| !done));
        assert!(exists_at(held.as_raw_fd(), ABANDONED_FILE));
        // A removed directory takes no new marks.
        let gone = tempfile::tempdir().unwrap();
        let held_gone = lock_run(gone.path()).unwrap();
        std::fs::remove_dir(gone.path()).unwrap();
        assert!(write_at(held_gone.as_raw_fd(), FORKED_FILE, b"").is_err());
    }
}
