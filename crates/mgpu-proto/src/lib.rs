//! # mgpu-proto
//!
//! The wire protocol between `mgpu_scheduler_server` and its clients.
//!
//! A connection carries length-delimited frames (4-byte big-endian length, at most
//! [`MAX_FRAME_LEN`] bytes). The first byte of each frame says what it holds:
//! - `0`: a JSON control message ([`Request`] from clients, [`Response`] from the server);
//! - `1` / `2`: raw bytes of a job's stdout / stderr.
//!
//! Every connection starts with [`Request::Hello`] carrying [`PROTOCOL_VERSION`]; the server
//! answers [`Response::Welcome`] or, on a version mismatch, a clear [`Response::Error`]. Then the
//! client sends one request. Identity is never part of a message: the server takes it from the
//! kernel (`SO_PEERCRED`).

pub mod codec;

pub use mgpu_core::{ArrayTask, WarnSignal};
use mgpu_core::{JobId, JobState, Millis};
use serde::{Deserialize, Serialize};

pub use codec::{read_frame, write_frame, Frame, FrameCodec};

/// Bumped on every incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;
/// Upper bound of one frame (a submit carries the environment and argv, which the kernel caps
/// at a few MiB).
pub const MAX_FRAME_LEN: usize = 8 << 20;
/// Bounds the server applies to what clients send, by kind: the hello, `queue`, `log`, `acct`,
/// `attach` and `cancel_attached` requests are small; a cancel names at most 10,000 ids; a
/// submit carries at most 1 MiB of argv and 1 MiB of environment (the kernel's own bound is
/// smaller), doubled for JSON escapes. The request's `type` must come first in its JSON.
pub const MAX_SMALL_FRAME: usize = 64 << 10;
pub const MAX_CANCEL_FRAME: usize = 256 << 10;
/// Most job ids one cancel request may name (their JSON stays under [`MAX_CANCEL_FRAME`]);
/// `mgpu_cancel` sends more in several requests.
pub const MAX_CANCEL_IDS: usize = 10_000;
pub const MAX_SUBMIT_FRAME: usize = 4 << 20;
/// Where a root server listens unless `--socket` or `MGPU_SOCKET` says otherwise: in a
/// directory only root can write to (`/run/mgpu`, systemd's `RuntimeDirectory=mgpu`), so that
/// nobody can take the path before the server starts.
pub const DEFAULT_SOCKET: &str = "/run/mgpu/mgpu.sock";
/// The default of earlier releases, in world-writable `/tmp`, where anyone could take the path
/// first. Clients that find only this one say what to do.
pub const OLD_DEFAULT_SOCKET: &str = "/tmp/mgpu_scheduler.sock";
/// Environment variable overriding the default socket for server and clients alike.
pub const SOCKET_ENV: &str = "MGPU_SOCKET";

use std::path::{Path, PathBuf};

/// The socket named by `--socket` (`explicit`) or `$MGPU_SOCKET`, if any.
pub fn explicit_socket(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    std::env::var_os(SOCKET_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// Where a single-user server of user `uid` listens by default: in a directory of its own,
/// `$XDG_RUNTIME_DIR/mgpu` (the user's private runtime directory), else `/tmp/mgpu-UID`.
pub fn personal_socket(uid: u32) -> PathBuf {
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("mgpu"),
        None => PathBuf::from(format!("/tmp/mgpu-{uid}")),
    };
    dir.join("mgpu.sock")
}

/// The server's socket: `--socket`, else `$MGPU_SOCKET`, else [`DEFAULT_SOCKET`] for a root
/// server (`uid` 0) and [`personal_socket`] for anyone else's.
pub fn server_socket(explicit: Option<&Path>, uid: u32) -> PathBuf {
    explicit_socket(explicit).unwrap_or_else(|| match uid {
        0 => DEFAULT_SOCKET.into(),
        _ => personal_socket(uid),
    })
}

/// The socket a client of user `uid` uses: `--socket`, else `$MGPU_SOCKET`, else the root
/// server's [`DEFAULT_SOCKET`], or, where that does not exist, the user's own single-user
/// server's [`personal_socket`] if it exists.
pub fn client_socket(explicit: Option<&Path>, uid: u32) -> PathBuf {
    if let Some(p) = explicit_socket(explicit) {
        return p;
    }
    let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
    if uid != 0 && !exists(Path::new(DEFAULT_SOCKET)) {
        let own = personal_socket(uid);
        if exists(&own) {
            return own;
        }
    }
    DEFAULT_SOCKET.into()
}

/// What to tell a client that found no server at the default socket (nothing named one),
/// when something sits at the old default: that the default moved, and how to use the old
/// path if it must.
pub fn moved_socket_hint(explicit: Option<&Path>) -> Option<String> {
    moved_hint(
        explicit_socket(explicit).is_some(),
        std::fs::symlink_metadata(OLD_DEFAULT_SOCKET).is_ok(),
    )
}

fn moved_hint(named: bool, old_exists: bool) -> Option<String> {
    if named || !old_exists {
        return None;
    }
    Some(format!(
        "note: the default socket moved from {OLD_DEFAULT_SOCKET} (where anyone could create it) \
         to {DEFAULT_SOCKET}; something is still at the old path. If your administrator still \
         runs the server there, set {SOCKET_ENV}={OLD_DEFAULT_SOCKET} (or --socket), but only if \
         you trust whoever made it: ask them to move the server to the new default"
    ))
}

/// Messages a client sends.
// One request at a time per connection, decoded and handled at once: a submit's size does not
// multiply anywhere, so it is not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        client: String,
    },
    Submit(SubmitRequest),
    Queue(QueueRequest),
    Cancel(CancelRequest),
    Log(LogRequest),
    /// Sent by an attached `mgpu_srun` on its submit connection (Ctrl-C): cancel that job.
    CancelAttached,
    /// Re-attach to a job (an `mgpu_srun` whose server restarted): the output from `log_offset`
    /// on, then live events as after a submit. `CancelAttached` works on this connection too.
    Attach(AttachRequest),
    /// Accounting: finished jobs.
    Acct(AcctRequest),
    /// A usage summary per user over a period, with each user's fair-share standing.
    Usage(UsageRequest),
    /// `mgpu_control`: hold, release, update or show jobs; drain and resume GPUs or the server.
    Control(ControlRequest),
}

/// What `mgpu_acct --summary` asks for. Owners see their own row; root sees all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRequest {
    /// Jobs that ended at or after this time.
    pub since: Option<Millis>,
    /// ... and before this time.
    pub until: Option<Millis>,
    /// Only this user (others' need root).
    pub user: Option<String>,
}

/// What `mgpu_control` asks for (owner or root; drains: root only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlRequest {
    /// Hold pending jobs (ids as written: `12`, or `12_3` for one task of job array 12; a job
    /// array's id holds all its waiting tasks).
    Hold {
        jobs: Vec<String>,
    },
    Release {
        jobs: Vec<String>,
    },
    /// Change a job: `Key=Value` items (TimeLimit, Name, Nice, Gpus, Mem).
    Update {
        job: String,
        changes: Vec<(String, String)>,
    },
    /// Every field of a job, `scontrol show job`-like.
    Show {
        job: String,
    },
    DrainGpu {
        index: u32,
        reason: Option<String>,
    },
    ResumeGpu {
        index: u32,
    },
    DrainServer {
        reason: Option<String>,
    },
    ResumeServer,
    /// The job ids that ids as written stand for (`12_3`: task 3 of job array 12, finished or
    /// not), answered as `Control { lines }`, one id a line; for the clients that take Slurm's
    /// `ID_TASK` (`mgpu_cancel`, `mgpu_log`, `mgpu_acct -j`, `mgpu_queue -j`).
    Resolve {
        jobs: Vec<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcctRequest {
    /// Only this user's jobs (others' need root).
    pub user: Option<String>,
    /// Only the caller's own jobs (the default for non-root callers).
    pub me: bool,
    pub job: Option<JobId>,
    /// Only jobs that ended at or after this time.
    pub since: Option<Millis>,
    pub state: Option<JobState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub job: JobId,
    /// How far into the job's log the client already has the output.
    pub log_offset: u64,
}

/// How to treat Python virtual environments for a job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Venv {
    /// Activate `~/venv` if `~/venv/bin/activate` exists.
    #[default]
    Auto,
    /// Activate this venv directory.
    Dir(String),
    /// Do not activate any venv.
    Off,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub name: Option<String>,
    pub gpus: u32,
    pub mem_mib: Option<u64>,
    pub time_limit_s: Option<u64>,
    /// argv; never joined into a shell string.
    pub command: Vec<String>,
    /// Absolute working directory (entered with the user's own privileges).
    pub cwd: String,
    /// The directory the client was run from, where it differs from `cwd` (`--chdir`): the
    /// job's `SLURM_SUBMIT_DIR`, as Slurm sets it. Absent from older clients: `cwd` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_dir: Option<String>,
    /// The client's environment, passed to the job (Slurm's `--export=ALL`).
    pub env: Vec<(String, String)>,
    pub venv: Venv,
    /// Stay connected: receive progress, output and the exit status on this connection.
    pub attach: bool,
    /// The submitter's umask, for the job.
    #[serde(default)]
    pub umask: Option<u32>,
    /// At its time limit the job ends as TIMEOUT instead of going back to the queue.
    #[serde(default)]
    pub no_requeue: bool,
    /// How often the job may be context-switched before it ends as TIMEOUT.
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// Send this signal this many seconds before the time limit (Slurm's `--signal`).
    #[serde(default)]
    pub signal: Option<WarnSignal>,
    /// Lower the job's priority (0 or more; only root may go below 0).
    #[serde(default)]
    pub nice: i32,
    /// Submit a job array: one task (a job of its own) per index, in this order, with ids
    /// that follow each other. Never attached.
    #[serde(default)]
    pub array: Option<Vec<u32>>,
    /// With `array`: at most this many tasks wait in the queue or run at once (`%N`).
    #[serde(default)]
    pub array_limit: Option<u32>,
    /// CPUs for the job (a cgroup quota) [default: the server's].
    #[serde(default)]
    pub cpus: Option<u32>,
    /// Host memory for the job, in MiB (a cgroup limit) [default: the server's].
    #[serde(default)]
    pub host_mem_mib: Option<u64>,
    /// A batch script's content (`mgpu_sbatch`), read by the client as the user: the job runs
    /// a copy of it (`command[0]` names the script, the rest are its arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Also write the job's stdout (and its stderr, unless `error` is given) to this file,
    /// opened as the user, relative to `cwd` (Slurm's `--output`, `%j %A %a %x %u %%` patterns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Also write the job's stderr to this file (Slurm's `--error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Not before this time (ms since the epoch; Slurm's `--begin`): pending with REASON
    /// `BeginTime` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_at: Option<u64>,
    /// Slurm's `--dependency` as written (`afterok:12:13,singleton`).
    #[serde(default)]
    pub dependency: Option<String>,
    /// Submit held (`--hold`): it waits until `mgpu_control release`.
    #[serde(default)]
    pub hold: bool,
    /// Tell the user when the job begins or ends (`--notify`, `--mail-type`/`--mail-user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Box<Notify>>,
    /// An attached job whose stdin is the client's: the server makes a pipe and answers
    /// [`Response::StdinPipe`] carrying its write end (`SCM_RIGHTS`); the client copies its
    /// stdin into it (the job reads the other end). Clients never pass descriptors to the
    /// server.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// `--pty`: the job gets a terminal of this size (rows, columns); its stdin pipe then
    /// carries the keystrokes as [`pty_frame`]s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<[u16; 2]>,
}

/// One message from `mgpu_srun --pty` to its job's terminal: kind (0: keystrokes, 1: window
/// size as rows and columns, big-endian u16s), length (big-endian u16), data.
pub fn pty_frame(kind: u8, data: &[u8]) -> Vec<u8> {
    let n = data.len().min(u16::MAX as usize);
    let mut f = Vec::with_capacity(3 + n);
    f.push(kind);
    f.extend_from_slice(&(n as u16).to_be_bytes());
    f.extend_from_slice(&data[..n]);
    f
}

/// How a job's owner is told that it began or ended: a command run as them when it ends, and/or
/// mail through the local sendmail (sent as them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    /// `sh -c COMMAND` when the job ends (`--notify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Where mail goes (`--mail-user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mail_user: Option<String>,
    /// When mail is sent: `BEGIN`, `END`, `FAIL` (`--mail-type`, ALL expanded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mail_types: Vec<String>,
    /// The job's name, filled in by the server (for `MGPU_JOB_NAME` and the mail).
    #[serde(default)]
    pub job_name: String,
}

/// Longest `--notify` command accepted, in bytes.
pub const MAX_NOTIFY_COMMAND: usize = 4096;

impl Notify {
    /// Checks what a client sent: a clear error for anything the server would not run.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = &self.command {
            // (Control characters other than tabs and newlines have no place in a shell
            // command, and take six bytes each in the job's stored record.)
            let odd = c
                .chars()
                .any(|ch| ch.is_control() && ch != '\t' && ch != '\n');
            if c.trim().is_empty() || c.len() > MAX_NOTIFY_COMMAND || odd {
                return Err(format!(
                    "--notify needs a command of at most {MAX_NOTIFY_COMMAND} bytes (run by sh -c as you when the job ends)"
                ));
            }
        }
        if let Some(a) = &self.mail_user {
            let ok = !a.is_empty()
                && a.len() <= 254
                && !a.starts_with('-')
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._%+-@".contains(c));
            if !ok {
                return Err(format!(
                    "invalid --mail-user '{a}': give one address (user@host) or a local user name"
                ));
            }
        }
        // Each type once (found by an attack review: 650,000 repeats, 3.9 MB, were kept).
        if self.mail_types.len() > 3 {
            return Err("--mail-type takes each of BEGIN, END and FAIL at most once".into());
        }
        for t in &self.mail_types {
            if !matches!(t.as_str(), "BEGIN" | "END" | "FAIL") {
                return Err(format!(
                    "invalid mail type '{t}': use BEGIN, END, FAIL, ALL or NONE"
                ));
            }
        }
        if self.mail_user.is_some() == self.mail_types.is_empty() {
            return Err("--mail-user and --mail-type go together".into());
        }
        Ok(())
    }
}

/// Largest batch script `mgpu_sbatch` sends (its content travels in the submit frame).
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;

/// A parsed `--array` value: the task indices, sorted and without repeats, and the cap on
/// tasks at once (`%N`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArraySpec {
    pub indices: Vec<u32>,
    pub limit: Option<u32>,
}

/// Most tasks one job array may have.
pub const MAX_ARRAY_TASKS: usize = 10_000;
/// Highest task index of a job array.
pub const MAX_ARRAY_INDEX: u32 = 4_000_000;

/// Parses a Slurm-style array spec: `0-999`, `1,3,5-9`, `0-99:5` (every 5th), optionally
/// followed by `%N` (at most N tasks at once). Indices come out sorted and without repeats.
pub fn parse_array_spec(text: &str) -> Result<ArraySpec, String> {
    let bad = |why: &str| {
        format!("invalid --array '{text}': {why} (e.g. 0-99, 1,3,5-9, 0-99:5 or 0-99%4)")
    };
    let (spec, limit) = match text.split_once('%') {
        Some((spec, n)) => match n.trim().parse::<u32>() {
            Ok(n) if n > 0 => (spec, Some(n)),
            _ => return Err(bad("%N needs a whole number of tasks, at least 1")),
        },
        None => (text, None),
    };
    let number = |t: &str| -> Result<u32, String> {
        let n: u32 = t
            .trim()
            .parse()
            .map_err(|_| bad(&format!("'{t}' is not an index")))?;
        if n > MAX_ARRAY_INDEX {
            return Err(bad(&format!("indices go up to {MAX_ARRAY_INDEX}")));
        }
        Ok(n)
    };
    let mut out = std::collections::BTreeSet::new();
    for part in spec.split(',') {
        if part.trim().is_empty() {
            return Err(bad("empty element"));
        }
        let (range, step) = match part.split_once(':') {
            Some((r, st)) => (r, number(st)?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(bad("the step must be at least 1"));
        }
        let (lo, hi) = match range.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(range)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad(&format!("{lo} is above {hi}")));
        }
        for i in (lo..=hi).step_by(step as usize) {
            out.insert(i);
            if out.len() > MAX_ARRAY_TASKS {
                return Err(bad(&format!("at most {MAX_ARRAY_TASKS} tasks")));
            }
        }
    }
    Ok(ArraySpec {
        indices: out.into_iter().collect(),
        limit,
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRequest {
    /// Only jobs of this user name.
    pub user: Option<String>,
    /// Only the caller's own jobs (identity from the kernel).
    pub me: bool,
    pub job: Option<JobId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelRequest {
    Jobs(Vec<JobId>),
    /// Every unfinished task of the job array with this id.
    Array(JobId),
    User(String),
    /// All of the caller's own jobs (all jobs for root).
    All,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRequest {
    pub job: JobId,
    pub follow: bool,
}

/// Messages the server sends. Externally tagged (`{"queue": {...}}`): a large message (a
/// queue of 100,000 jobs) decodes in one pass, without buffering it first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Welcome {
        protocol: u32,
        server_version: String,
        /// True when the server runs as root and jobs run as their submitters.
        multi_user: bool,
    },
    /// The request was refused or failed; nothing was changed.
    Error {
        message: String,
    },
    /// The job is accepted (and durable).
    Submitted {
        job: JobId,
    },
    /// The job array is accepted (and durable): its tasks are jobs `first` to
    /// `first + tasks - 1`; `first` is also the array's id.
    SubmittedArray {
        first: JobId,
        tasks: u32,
    },
    /// The job waits in the queue.
    Pending {
        job: JobId,
        position: usize,
        reason: String,
    },
    /// The job got its GPUs and is being started; its output starts at `log_offset` in its log.
    Started {
        job: JobId,
        gpus: Vec<u32>,
        #[serde(default)]
        log_offset: u64,
    },
    /// A one-line note for the user's stderr.
    Notice {
        message: String,
    },
    /// The job is over and its processes are gone.
    Finished(JobOutcome),
    /// The queue: GPUs and the first jobs; more jobs follow in `QueueJobs` until `QueueEnd`.
    Queue(QueueSnapshot),
    QueueJobs {
        jobs: Vec<JobInfo>,
    },
    QueueEnd,
    Cancelled {
        results: Vec<CancelResult>,
    },
    /// Some accounting records; more may follow until `AcctEnd`.
    AcctRecords {
        records: Vec<AcctRecord>,
    },
    AcctEnd,
    /// No more log data follows.
    LogEnd {
        job: JobId,
        state: Option<JobState>,
    },
    /// The answer to [`Request::Usage`].
    Usage(UsageReport),
    /// What a control request did, one line per job (or for the drain); `ok` is false when
    /// some part was refused (those lines say why).
    Control {
        lines: Vec<String>,
        ok: bool,
    },
    /// A job's fields, `Key=Value` (`mgpu_control show job`).
    JobDetail {
        fields: Vec<(String, String)>,
    },
    /// The write end of the job's stdin pipe comes with this frame's bytes (`SCM_RIGHTS`;
    /// see `SubmitRequest::stdin`): write your stdin into it, close it at its end.
    StdinPipe,
}

/// GPU usage per user over a period, and each user's fair-share standing now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The server's clock when the report was made.
    pub now: Millis,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    /// The server's scheduling policy (the standing orders jobs only under `fair`).
    pub policy: String,
    /// Fair-share usage halves every this many seconds.
    pub half_life_s: u64,
    /// GPUs on the server (the standing counts usage in whole-machine seconds).
    pub gpus: u32,
    pub users: Vec<UserUsageRow>,
}

/// One user's row of a [`UsageReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserUsageRow {
    pub user: String,
    pub uid: u32,
    /// Jobs that ended in the period.
    pub jobs: u64,
    /// ... of which completed.
    pub completed: u64,
    /// GPUs held times hours run by those jobs, every run counted (context switches too).
    pub gpu_hours: f64,
    /// Pending and running jobs now.
    pub pending: u64,
    pub running: u64,
    /// Fair-share standing now: decayed GPU-hours, weight, and the priority it costs (s).
    pub fairshare_gpu_hours: f64,
    pub weight: f64,
    pub fairshare_priority_s: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOutcome {
    pub job: JobId,
    pub state: JobState,
    /// Exit code, when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when the process was killed by one.
    pub signal: Option<i32>,
    /// Why it failed to start or was stopped, when known.
    pub message: Option<String>,
}

impl JobOutcome {
    /// The exit code a shell would show: the code, or 128+signal; 1 when neither is known.
    pub fn shell_code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResult {
    pub job: JobId,
    pub outcome: CancelStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelStatus {
    /// Removed from the queue.
    Cancelled,
    /// Running: its processes are being stopped (SIGTERM, then SIGKILL after the grace period).
    Stopping,
    AlreadyStopping,
    NotFound,
    PermissionDenied,
}

/// The queue as `mgpu_queue` shows it. Times are milliseconds since the epoch on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The server's clock when the snapshot was taken.
    pub now: Millis,
    /// The server's scheduling policy.
    #[serde(default)]
    pub policy: String,
    pub gpus: Vec<GpuInfo>,
    pub jobs: Vec<JobInfo>,
    /// The whole server is drained (nothing new starts), with the reason given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_drained: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub total_mib: u64,
    /// Memory reserved by mgpu jobs (the whole GPU for an exclusive job).
    pub reserved_mib: u64,
    /// Memory in use as the driver reports it (simulated GPUs report the reservations).
    pub used_mib: u64,
    pub jobs: Vec<JobId>,
    /// Percent of time a kernel ran, where the GPU reports it.
    #[serde(default)]
    pub util_pct: Option<u32>,
    /// Processes on it that belong to no mgpu job (someone bypassing the scheduler).
    #[serde(default)]
    pub foreign: Vec<ForeignProcess>,
    /// Drained by an administrator (no new jobs), with the reason given, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<String>,
}

/// A process on a GPU that belongs to no mgpu job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignProcess {
    pub pid: u32,
    /// Its owner's name (or uid), when known.
    pub user: Option<String>,
    pub used_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: JobId,
    pub user: String,
    pub name: String,
    pub state: JobState,
    /// Number of GPUs asked for.
    pub gpus: u32,
    /// GPUs held while running.
    pub gpu_ids: Vec<u32>,
    pub mem_mib: Option<u64>,
    /// Effective limit (own limit capped by the server's `--max-job-time`).
    pub time_limit_s: Option<u64>,
    pub submitted_at: Millis,
    pub started_at: Option<Millis>,
    pub restarts: u32,
    pub reason: Option<String>,
    pub command: Vec<String>,
    /// Scheduling priority of a pending job (seconds-equivalent; higher goes first).
    #[serde(default)]
    pub priority: Option<f64>,
    /// Expected start of a pending job, where one is known (its reservation).
    #[serde(default)]
    pub est_start: Option<Millis>,
    /// A pending job that waits behind the reservation (REASON `Reservation` or `Priority`):
    /// the job holding it, and when that one is expected to start, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind: Option<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind_start: Option<Millis>,
    /// The job array it belongs to, and its index there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayTask>,
    /// GPU memory its processes use, per GPU index (NVML), where measured: the GPUs it holds,
    /// and any other GPU it uses.
    #[serde(default)]
    pub used_mib: Option<std::collections::BTreeMap<u32, u64>>,
    /// The most GPU memory it used on one GPU so far (MiB), where measured.
    #[serde(default)]
    pub peak_mib: Option<u64>,
    /// How long the scheduler expects it to run (ms; for its order and backfilling, never to
    /// end it), and where that comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_source: Option<mgpu_core::EstimateSource>,
}

/// One finished job, as `mgpu_acct` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcctRecord {
    pub id: JobId,
    pub user: String,
    pub name: String,
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub submitted_at: Millis,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub gpus: u32,
    pub gpu_ids: Vec<u32>,
    pub mem_mib: Option<u64>,
    pub restarts: u32,
    /// Run time of its runs before the last, in seconds (each ended by a context switch);
    /// kept for clients that do not read `earlier_runs_ms`.
    #[serde(default)]
    pub earlier_runs_s: u64,
    /// The same in ms (`None` from a server that sent only seconds), so that GPU-hours keep
    /// fractions of seconds and add up to what `mgpu_acct --summary` counts.
    #[serde(default)]
    pub earlier_runs_ms: Option<u64>,
    pub message: Option<String>,
    /// The job array it belonged to, and its index there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayTask>,
    /// The most GPU memory it used on one of its GPUs (MiB), where measured (NVML).
    #[serde(default)]
    pub peak_gpu_mem_mib: Option<u64>,
}

impl AcctRecord {
    /// Run time of all its runs in whole seconds (the earlier ones ended by context switches).
    pub fn total_elapsed_s(&self) -> u64 {
        self.total_elapsed_ms() / 1000
    }

    /// Run time of all its runs in ms.
    pub fn total_elapsed_ms(&self) -> u64 {
        let earlier = (self.earlier_runs_ms).unwrap_or(self.earlier_runs_s.saturating_mul(1000));
        self.elapsed_ms().saturating_add(earlier)
    }

    /// Run time of its last run in whole seconds.
    pub fn elapsed_s(&self) -> u64 {
        self.elapsed_ms() / 1000
    }

    /// Run time of its last run in ms.
    pub fn elapsed_ms(&self) -> u64 {
        match (self.started_at, self.ended_at) {
            (Some(s), Some(e)) => e.saturating_sub(s),
            _ => 0,
        }
    }

    /// GPUs held times hours run, over all its runs: from ms, as the usage summary counts
    /// them, so that the rows add up to its total (whole seconds lost up to 1 s a job).
    pub fn gpu_hours(&self) -> f64 {
        self.gpus as f64 * self.total_elapsed_ms() as f64 / 3_600_000.0
    }
}

/// Parses a memory amount: MiB by default, or with a unit (`512M`, `10G`, `10GiB`).
pub fn parse_mem_mib(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let bad = || format!("invalid memory '{text}': give MiB (e.g. 10240) or a unit (10G, 512M)");
    let (num, factor) = if let Some(n) = t
        .strip_suffix("gib")
        .or(t.strip_suffix("gb"))
        .or(t.strip_suffix('g'))
    {
        (n, 1024)
    } else if let Some(n) = t
        .strip_suffix("mib")
        .or(t.strip_suffix("mb"))
        .or(t.strip_suffix('m'))
    {
        (n, 1)
    } else {
        (t.as_str(), 1)
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(factor).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a submission's notification may hold is bounded as stored, not only in bytes
    /// sent (found by an attack review: 650,000 repeated mail types, and control characters
    /// that take six bytes each in the stored record).
    #[test]
    fn notifications_are_bounded() {
        let mail = |types: Vec<&str>| Notify {
            mail_user: Some("alice".into()),
            mail_types: types.into_iter().map(String::from).collect(),
            ..Default::default()
        };
        assert!(mail(vec!["BEGIN", "END", "FAIL"]).validate().is_ok());
        assert!(mail(vec!["END"; 4]).validate().is_err());
        let cmd = |c: &str| Notify {
            command: Some(c.into()),
            ..Default::default()
        };
        assert!(cmd("echo done\n\techo again").validate().is_ok());
        assert!(cmd("echo \u{1}").validate().is_err());
        assert!(cmd(&"x".repeat(MAX_NOTIFY_COMMAND + 1)).validate().is_err());
    }

    #[test]
    fn gpu_hours_keep_fractions_of_seconds() {
        let rec = AcctRecord {
            id: 1,
            user: "alice".into(),
            name: "n".into(),
            state: JobState::Completed,
            exit_code: Some(0),
            signal: None,
            submitted_at: 0,
            started_at: Some(10_000),
            ended_at: Some(11_999),
            gpus: 2,
            gpu_ids: vec![0, 1],
            mem_mib: None,
            restarts: 1,
            earlier_runs_s: 2,
            earlier_runs_ms: Some(2_500),
            message: None,
            array: None,
            peak_gpu_mem_mib: None,
        };
        // Whole seconds to show; ms to count, as the usage summary does.
        assert_eq!((rec.elapsed_s(), rec.total_elapsed_s()), (1, 4));
        assert_eq!(rec.total_elapsed_ms(), 4_499);
        assert!((rec.gpu_hours() - 2.0 * 4.499 / 3600.0).abs() < 1e-12);
        // From a server that sends only seconds.
        let old = AcctRecord {
            earlier_runs_ms: None,
            ..rec
        };
        assert_eq!(old.total_elapsed_ms(), 3_999);
    }

    #[test]
    fn array_specs() {
        let indices = |s: &str| parse_array_spec(s).unwrap().indices;
        assert_eq!(indices("0-3"), vec![0, 1, 2, 3]);
        assert_eq!(indices("7,1,3-5"), vec![1, 3, 4, 5, 7]);
        assert_eq!(indices("0-10:5"), vec![0, 5, 10]);
        assert_eq!(indices("2,2,1-2"), vec![1, 2]);
        assert_eq!(indices("42"), vec![42]);
        assert_eq!(indices("0-9999").len(), MAX_ARRAY_TASKS);
        assert_eq!(indices("0-9999,0-9999,0").len(), MAX_ARRAY_TASKS);
        assert_eq!(parse_array_spec("0-3").unwrap().limit, None);
        assert_eq!(
            parse_array_spec("0-9%2").unwrap(),
            ArraySpec {
                indices: (0..10).collect(),
                limit: Some(2)
            }
        );
        for bad in [
            "",
            "1,",
            "a-b",
            "5-1",
            "0-9:0",
            "-1",
            "0-10000",
            "0-4000001",
            "1-2-3",
            "0-9%0",
            "0-9%",
            "0-9%x",
            "%3",
        ] {
            assert!(parse_array_spec(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;

    #[test]
    fn only_an_unnamed_default_with_something_at_the_old_path_gets_the_hint() {
        let hint = moved_hint(false, true).unwrap();
        assert!(
            hint.contains("MGPU_SOCKET=/tmp/mgpu_scheduler.sock"),
            "{hint}"
        );
        assert!(
            hint.contains("/run/mgpu/mgpu.sock") && hint.contains("trust"),
            "{hint}"
        );
        assert_eq!(moved_hint(true, true), None);
        assert_eq!(moved_hint(false, false), None);
    }

    #[test]
    fn defaults() {
        assert_eq!(
            server_socket(Some(Path::new("/x/s.sock")), 0),
            PathBuf::from("/x/s.sock")
        );
        // $XDG_RUNTIME_DIR/mgpu/mgpu.sock, else /tmp/mgpu-1000/mgpu.sock.
        let own = personal_socket(1000);
        assert!(own.ends_with("mgpu.sock"), "{}", own.display());
        assert!(
            own.parent().unwrap().ends_with("mgpu") || own.starts_with("/tmp/mgpu-1000"),
            "{}",
            own.display()
        );
        assert_eq!(
            Path::new(DEFAULT_SOCKET).parent(),
            Some(Path::new("/run/mgpu"))
        );
    }
}
