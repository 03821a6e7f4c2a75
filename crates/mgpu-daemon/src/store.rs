//! The durable job store: SQLite in WAL mode with synchronous commits.
//!
//! One writer thread owns the write connection and applies operations in the order they were
//! sent. It drains whatever is queued into one transaction (group commit), so concurrent submits
//! share an fsync. A submit waits for its commit before the client hears its id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context, Result};
use mgpu_core::{Gate, Hold, JobId, JobRequest, JobState, Millis, TargetState};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::exec::LaunchSpec;

/// The checkpointer's rest between two checkpoints: commits in the meantime are checkpointed
/// together.
const CHECKPOINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Schema migrations; entry `i` brings `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    uid           INTEGER NOT NULL,
    user          TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    state         TEXT    NOT NULL,
    gpus          INTEGER NOT NULL,
    mem_mib       INTEGER,
    time_limit_s  INTEGER,
    spec          TEXT    NOT NULL,
    submitted_at  INTEGER NOT NULL,
    started_at    INTEGER,
    ended_at      INTEGER,
    gpu_ids       TEXT,
    pid           INTEGER,
    exit_code     INTEGER,
    signal        INTEGER,
    message       TEXT,
    restarts      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs(state);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN nice INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN no_requeue INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN max_restarts INTEGER;
ALTER TABLE jobs ADD COLUMN warn_signal INTEGER;
ALTER TABLE jobs ADD COLUMN warn_secs INTEGER;
ALTER TABLE jobs ADD COLUMN queued_at INTEGER;
ALTER TABLE jobs ADD COLUMN attached INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_ended ON jobs(ended_at);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN array TEXT;
CREATE INDEX jobs_array ON jobs(json_extract(array, '$.job')) WHERE array IS NOT NULL;
CREATE TABLE array_specs (
    array_id  INTEGER PRIMARY KEY,
    spec      TEXT    NOT NULL
);
"#,
    ENVS_MIGRATION,
    // The most GPU memory a job used on one of its GPUs (NVML), like sacct's MaxRSS.
    "ALTER TABLE jobs ADD COLUMN peak_gpu_mem_mib INTEGER;",
    // Run time of a job's earlier runs (ended by context switches), for accounting.
    r#"
ALTER TABLE jobs ADD COLUMN earlier_runs_ms INTEGER NOT NULL DEFAULT 0;
"#,
    // Slurm's --begin: the job may not start before this time (ms since the epoch).
    "ALTER TABLE jobs ADD COLUMN begin_at INTEGER;",
    // Holds and dependencies of waiting jobs (JSON), and the drained GPUs and server.
    r#"
ALTER TABLE jobs ADD COLUMN hold TEXT;
ALTER TABLE jobs ADD COLUMN dependency TEXT;
CREATE TABLE drains (
    target  TEXT    PRIMARY KEY,
    reason  TEXT    NOT NULL,
    at      INTEGER NOT NULL
);
"#,
    // A context-switched job's fair-share key floor (mgpu_core::Job::min_key): after a restart
    // it stays behind the jobs that were waiting when it was requeued.
    "ALTER TABLE jobs ADD COLUMN min_key INTEGER;",
    FINISHED_TRIM_MIGRATION,
];

/// What a finished job's launch record keeps, as SQL of the record column `$col`: its
/// command (at most 1 KiB of it, else the program alone, cut at 1 KiB), its working
/// directory if that is short (a `--notify` command is started there), its umask and
/// notification; no batch script, no `-o`/`-e` patterns, no venv, no submit directory. A
/// finished job never runs again; accounting and `mgpu_control show job` read other columns.
/// What stays is a few KiB at most, however large the job's record was while it waited.
macro_rules! trimmed_spec {
    ($col:literal) => {
        concat!(
            "CASE WHEN ",
            $col,
            " = '' OR NOT json_valid(",
            $col,
            ") THEN ",
            $col,
            " ELSE json_set(json_remove(",
            "CASE WHEN length(json_extract(",
            $col,
            ", '$.command')) <= 1024 THEN ",
            $col,
            " ELSE json_set(",
            $col,
            ", '$.command', ",
            "json_array(substr(json_extract(",
            $col,
            ", '$.command[0]'), 1, 1024))) END, ",
            "'$.script', '$.output', '$.error', '$.submit_dir'), ",
            "'$.venv', 'off', ",
            "'$.cwd', CASE WHEN length(json_quote(json_extract(",
            $col,
            ", '$.cwd'))) <= 1024 ",
            "THEN json_extract(",
            $col,
            ", '$.cwd') ELSE '' END) END"
        )
    };
}

/// Finished jobs keep no launch data (see `Op::Ended`): the records that ended before this
/// rule are trimmed once, and three indexes keep per-event and per-request work small:
/// `jobs_array_live` finds whether a job array has a task left without walking its ended
/// tasks; `jobs_usage` answers `mgpu_acct --summary` from the index alone, never reading a
/// row (whose launch record may be large while the job waits); `jobs_array_task` finds task
/// `ID_TASK` without walking the array's tasks (up to 10,000 such names in one request);
/// `jobs_finished_by_user` finds a user's oldest finished jobs past their bound.
const FINISHED_TRIM_MIGRATION: &str = concat!(
    "CREATE INDEX jobs_array_live ON jobs(json_extract(array, '$.job'))
         WHERE array IS NOT NULL AND state IN ('PENDING', 'RUNNING');
     CREATE INDEX jobs_usage ON jobs(ended_at, uid, state, gpus, started_at, earlier_runs_ms, user);
     CREATE INDEX jobs_array_task ON jobs(json_extract(array, '$.job'), json_extract(array, '$.task'))
         WHERE array IS NOT NULL;
     CREATE INDEX jobs_finished_by_user ON jobs(uid, id) WHERE state NOT IN ('PENDING', 'RUNNING');
     UPDATE jobs SET env_id = NULL, spec = ",
    trimmed_spec!("spec"),
    " WHERE state NOT IN ('PENDING', 'RUNNING');
     UPDATE array_specs SET env_id = NULL, spec = ",
    trimmed_spec!("spec"),
    " WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE array IS NOT NULL
                          AND json_extract(array, '$.job') = array_specs.array_id
                          AND state IN ('PENDING', 'RUNNING'));
     DELETE FROM envs WHERE
         NOT EXISTS (SELECT 1 FROM jobs WHERE env_id = envs.id)
         AND NOT EXISTS (SELECT 1 FROM array_specs WHERE env_id = envs.id);"
);

/// Each distinct environment once (content-addressed: SHA-256 of its JSON); launch records
/// refer to it and keep an empty `env`. Existing records are moved over by `move_envs`.
const ENVS_MIGRATION: &str = r#"
CREATE TABLE envs (
    id    INTEGER PRIMARY KEY,
    hash  BLOB    NOT NULL UNIQUE,
    env   TEXT    NOT NULL
);
ALTER TABLE jobs ADD COLUMN env_id INTEGER;
ALTER TABLE array_specs ADD COLUMN env_id INTEGER;
CREATE INDEX jobs_env ON jobs(env_id) WHERE env_id IS NOT NULL;
CREATE INDEX array_specs_env ON array_specs(env_id) WHERE env_id IS NOT NULL;
"#;

/// The schema version that introduced the `envs` table.
fn envs_version() -> usize {
    MIGRATIONS
        .iter()
        .position(|m| *m == ENVS_MIGRATION)
        .expect("the envs migration is listed")
        + 1
}

/// A job's launch record (its own, or, with an empty `spec`, its job array's, kept once per
/// array) and its environment (kept once per distinct environment).
const SPEC_OF_JOB: &str = "SELECT COALESCE(NULLIF(j.spec, ''), a.spec), e.env FROM jobs j
     LEFT JOIN array_specs a ON j.spec = '' AND a.array_id = json_extract(j.array, '$.job')
     LEFT JOIN envs e ON e.id = COALESCE(j.env_id, a.env_id)
     WHERE j.id = ?1";

/// A launch record as stored: its environment is kept apart (see [`env_row`]).
#[derive(serde::Serialize)]
struct StoredSpec<'a> {
    command: &'a [String],
    cwd: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    submit_dir: &'a Option<String>,
    env: [(); 0],
    venv: &'a mgpu_proto::Venv,
    umask: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_mem_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    script: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: &'a Option<String>,
    notify: Option<&'a mgpu_proto::Notify>,
}

/// `spec` as stored, and the id of its environment's row (none for an empty environment).
fn stored_spec(tx: &rusqlite::Transaction, spec: &LaunchSpec) -> Result<(String, Option<i64>)> {
    let text = serde_json::to_string(&StoredSpec {
        command: &spec.command,
        cwd: &spec.cwd,
        submit_dir: &spec.submit_dir,
        env: [],
        venv: &spec.venv,
        umask: spec.umask,
        cpus: spec.cpus,
        host_mem_mib: spec.host_mem_mib,
        script: &spec.script,
        output: &spec.output,
        error: &spec.error,
        notify: spec.notify.as_ref(),
    })?;
    let env = if spec.env.is_empty() {
        None
    } else {
        Some(env_row(tx, &serde_json::to_string(&spec.env)?)?)
    };
    Ok((text, env))
}

/// The row holding environment `env` (JSON), added if new.
fn env_row(tx: &rusqlite::Transaction, env: &str) -> Result<i64> {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(env.as_bytes()).to_vec();
    tx.prepare_cached(
        "INSERT INTO envs (hash, env) VALUES (?1, ?2) ON CONFLICT (hash) DO NOTHING",
    )?
    .execute(params![hash, env])?;
    Ok(tx
        .prepare_cached("SELECT id FROM envs WHERE hash = ?1")?
        .query_row([hash], |r| r.get(0))?)
}

/// Migration [`ENVS_MIGRATION`]: moves the environments out of the existing launch records.
fn move_envs(tx: &rusqlite::Transaction) -> Result<()> {
    for table in ["jobs", "array_specs"] {
        let key = if table == "jobs" { "id" } else { "array_id" };
        let rows: Vec<(i64, String)> = tx
            .prepare(&format!(
                "SELECT {key}, spec FROM {table} WHERE spec != '' AND env_id IS NULL
                   AND json_array_length(spec, '$.env') > 0"
            ))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, text) in rows {
            // An unreadable record is left as it is (it reads as it always did).
            let Ok(spec) = serde_json::from_str::<LaunchSpec>(&text) else {
                continue;
            };
            let (text, env) = stored_spec(tx, &spec)?;
            tx.execute(
                &format!("UPDATE {table} SET spec = ?2, env_id = ?3 WHERE {key} = ?1"),
                params![id, text, env],
            )?;
        }
    }
    Ok(())
}

/// A job as first recorded.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub request: JobRequest,
    pub spec: LaunchSpec,
    pub submitted_at: Millis,
    /// An `mgpu_srun` is attached to it (if that client dies, the job goes too).
    pub attached: bool,
    /// Its hold and dependencies, if any.
    pub gate: Gate,
}

/// A job array as first recorded: its tasks share one launch record.
#[derive(Debug, Clone)]
pub struct NewArray {
    pub spec: LaunchSpec,
    pub submitted_at: Millis,
    /// Each task's id and request; the first id is the array's.
    pub tasks: Vec<(JobId, JobRequest)>,
    /// The hold and dependencies of every task.
    pub gate: Gate,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Ending {
    pub state: JobState,
    pub at: Millis,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: Option<String>,
}

enum Op {
    Insert(Box<NewJob>, oneshot::Sender<Result<(), String>>),
    /// A job array's tasks, committed together.
    InsertArray(Box<NewArray>, oneshot::Sender<Result<(), String>>),
    Started {
        id: JobId,
        at: Millis,
        gpus: Vec<u32>,
        pid: u32,
    },
    Ended(JobId, Ending),
    /// The most GPU memory the job used on one GPU so far (kept if larger).
    GpuPeak(JobId, u64),
    Requeued {
        id: JobId,
        at: Millis,
        restarts: u32,
        min_key: Option<i64>,
    },
    Flush(oneshot::Sender<()>),
    /// A waiting job is held (or released: `None`).
    SetHold(JobId, Option<Hold>),
    /// A waiting job's request changed (`mgpu_control update`).
    Updated(JobId, Box<JobRequest>),
    /// A GPU (`gpu:N`) or the server (`server`) is drained (with a reason), or resumed.
    SetDrain(String, Option<(String, Millis)>),
    /// Run on the store's thread once everything sent before it is committed.
    AfterCommit(Box<dyn FnOnce() + Send>),
    /// Records of jobs that ended before a time, and of each user's finished jobs past the
    /// newest so many.
    Purge(
        Millis,
        Option<u64>,
        oneshot::Sender<Result<Vec<JobId>, String>>,
    ),
}

/// A job that was queued or running when the previous server stopped.
#[derive(Debug, Clone)]
pub struct RecoveredJob {
    pub id: JobId,
    pub request: JobRequest,
    /// Its argv (for display: the rest of its launch record is read when it starts); a job
    /// array's tasks share one.
    pub command: Arc<[String]>,
    /// When it last entered the queue (its submission, or its latest requeue).
    pub submitted_at: Millis,
    pub started_at: Option<Millis>,
    pub gpus: Vec<u32>,
    pub restarts: u32,
    /// Submitted by an attached `mgpu_srun`.
    pub attached: bool,
    /// Not before this time (`--begin`).
    pub begin_at: Option<Millis>,
    /// Its hold and dependencies (pending jobs).
    pub gate: Gate,
    /// Its fair-share key floor from its latest requeue (`mgpu_core::Job::min_key`).
    pub min_key: Option<i64>,
}

/// What the store held at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    pub next_job_id: JobId,
    /// Pending jobs in queue (id) order.
    pub pending: Vec<RecoveredJob>,
    /// Jobs recorded as running: their supervisors may still be running them.
    pub running: Vec<RecoveredJob>,
    /// Drained GPUs (`gpu:N`) and server (`server`), with their reasons.
    pub drains: Vec<(String, String)>,
    /// The latest runs that completed or timed out, oldest first, at most
    /// [`RUN_TIMES_RECOVERED`]: `(uid, name, run ms, time limit s)`, to rebuild the learned
    /// run-time estimates and how much of their limits users' jobs use.
    pub run_times: Vec<(u32, String, Millis, Option<u64>)>,
}

/// How many finished runs are read back at startup for the run-time estimates (per user the
/// estimator keeps far fewer; the query stays bounded however long the history is).
pub const RUN_TIMES_RECOVERED: u32 = 20_000;

/// The owner and state of a recorded job.
/// Filters of an accounting query (already authorised).
#[derive(Debug, Clone, Default)]
pub struct AcctFilter {
    pub uid: Option<u32>,
    pub job: Option<JobId>,
    pub since: Option<Millis>,
    pub state: Option<JobState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    pub uid: u32,
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: Option<String>,
    /// Its `--mem` and the most GPU memory it used on one GPU, where measured.
    pub mem_mib: Option<u64>,
    pub peak_gpu_mem_mib: Option<u64>,
}

pub struct Store {
    ops: Mutex<mpsc::Sender<Op>>,
    /// For lookups by key (a job's state, owner, launch record): quick, and some are made on
    /// the server's event loop, so they never wait behind a scan.
    reader: Mutex<Connection>,
    /// For scans any user can ask for (accounting, usage), run on blocking threads: a long
    /// one holds up only the next scan.
    scanner: Mutex<Connection>,
    pub path: PathBuf,
    /// Test hook: when set, the writer stops without applying what is still queued (a crash).
    dead: Arc<AtomicBool>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Commit latency and failures of the writer (for metrics).
    pub stats: Arc<crate::metrics::StoreStats>,
}

/// One user's finished jobs over a period (see [`Store::usage`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageTotals {
    pub uid: u32,
    pub user: String,
    pub jobs: u64,
    pub completed: u64,
    /// GPUs held times milliseconds run, all runs counted.
    pub gpu_ms: u64,
}

fn open_conn(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("cannot open the job database {}", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .with_context(|| format!("{} is not a usable SQLite database", path.display()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("could not switch {} to WAL mode", path.display());
    }
    // FULL: every commit is fsynced before a submit is acknowledged.
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        bail!(
            "the job database has schema version {version}, newer than this mgpu understands ({}); refusing to touch it",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("migrating the job database to version {}", i + 1))?;
        if i + 1 == envs_version() {
            move_envs(&tx).context("moving environments into their own table")?;
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `dir` and reads what must be recovered.
    pub fn open(dir: &Path) -> Result<(Store, Recovered)> {
        let path = dir.join("mgpu.db");
        // Private (it holds every user's environment): SQLite gives its -wal and -shm files
        // the database's mode.
        for suffix in ["", "-wal", "-shm"] {
            let mut name = path.clone().into_os_string();
            name.push(suffix);
            crate::safe_fs::private_file(Path::new(&name), suffix.is_empty())?;
        }
        let mut conn = open_conn(&path)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .with_context(|| format!("{} is corrupt", path.display()))?;
        if check != "ok" {
            bail!("the job database {} is corrupt: {check}", path.display());
        }
        migrate(&mut conn)?;
        let recovered = recover(&conn)?;
        let reader = open_conn(&path)?;
        let scanner = open_conn(&path)?;
        // Commits never checkpoint the WAL themselves (that would stall a submit now and then
        // for milliseconds); a background thread does it soon after commits, without blocking
        // writers, so that little is left to copy at a time. Once a checkpoint catches up, the
        // log restarts from its beginning and is cut back to 64 MiB (under unbroken load it
        // can still grow).
        conn.execute_batch("PRAGMA wal_autocheckpoint=0; PRAGMA journal_size_limit=67108864;")?;
        let checkpointer = open_conn(&path)?;
        let (committed, commits) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("mgpu-checkpoint".into())
            .spawn(move || {
                while commits.recv().is_ok() {
                    if let Err(e) = checkpointer.execute_batch("PRAGMA wal_checkpoint(PASSIVE);") {
                        tracing::warn!(error = %e, "checkpointing the job database failed");
                    }
                    std::thread::sleep(CHECKPOINT_PAUSE);
                }
            })
            .context("starting the checkpoint thread")?;
        let (tx, rx) = mpsc::channel();
        let dead = Arc::new(AtomicBool::new(false));
        let dead_w = dead.clone();
        let stats: Arc<crate::metrics::StoreStats> = Arc::default();
        let stats_w = stats.clone();
        let handle = std::thread::Builder::new()
            .name("mgpu-store".into())
            .spawn(move || writer(conn, rx, dead_w, committed, stats_w))
            .context("starting the store thread")?;
        Ok((
            Store {
                ops: Mutex::new(tx),
                reader: Mutex::new(reader),
                scanner: Mutex::new(scanner),
                path,
                dead,
                writer: Mutex::new(Some(handle)),
                stats,
            },
            recovered,
        ))
    }

    /// Simulates a crash: what is not committed yet is lost. Returns once the writer is gone.
    pub fn crash(self) {
        self.dead.store(true, Ordering::SeqCst);
        let (tx, _rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        drop(self.ops);
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
    }

    fn send(&self, op: Op) {
        // The writer only stops when the process exits.
        let _ = self.ops.lock().unwrap().send(op);
    }

    /// Records a new job; resolves once it is durable.
    pub fn insert(&self, job: NewJob) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Insert(Box::new(job), tx));
        rx
    }

    /// Records a job array's tasks in one transaction: all of them, or none.
    pub fn insert_array(&self, array: NewArray) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::InsertArray(Box::new(array), tx));
        rx
    }

    pub fn started(&self, id: JobId, at: Millis, gpus: Vec<u32>, pid: u32) {
        self.send(Op::Started { id, at, gpus, pid });
    }

    pub fn ended(&self, id: JobId, ending: Ending) {
        self.send(Op::Ended(id, ending));
    }

    /// Records that the job used up to `mib` of GPU memory on one GPU (a larger figure on
    /// record stays).
    pub fn gpu_peak(&self, id: JobId, mib: u64) {
        self.send(Op::GpuPeak(id, mib));
    }

    /// The job goes back to PENDING (it will run again), e.g. when the server shuts down.
    /// The job is back in the queue (at `at`) for its run number `restarts`, with the key
    /// floor the core gave it (`Job::min_key`) (idempotent).
    pub fn requeued(&self, id: JobId, at: Millis, restarts: u32, min_key: Option<i64>) {
        self.send(Op::Requeued {
            id,
            at,
            restarts,
            min_key,
        });
    }

    /// Records a hold or release; durable once [`Store::flush`] returns.
    pub fn set_hold(&self, id: JobId, hold: Option<Hold>) {
        self.send(Op::SetHold(id, hold));
    }

    /// Records a waiting job's changed request.
    pub fn updated(&self, id: JobId, request: JobRequest) {
        self.send(Op::Updated(id, Box::new(request)));
    }

    /// Records a drain (`Some((reason, at))`) or a resume of `target` (`gpu:N` or `server`).
    pub fn set_drain(&self, target: String, drain: Option<(String, Millis)>) {
        self.send(Op::SetDrain(target, drain));
    }

    /// What the records say of a job the core does not hold, for its dependents.
    pub fn target_state(&self, id: JobId) -> Result<TargetState> {
        let conn = self.reader.lock().unwrap();
        let state: Option<String> = conn
            .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
            .query_row([id as i64], |r| r.get(0))
            .optional()?;
        Ok(match state.as_deref().map(JobState::parse) {
            None => TargetState::Gone,
            Some(Some(s)) if s.is_terminal() => TargetState::Ended(s),
            Some(Some(_)) => TargetState::Live,
            Some(None) => TargetState::Ended(JobState::Failed),
        })
    }

    /// The recorded tasks of job array `array` and what the records say of each.
    pub fn array_states(&self, array: JobId) -> Result<Vec<(JobId, TargetState)>> {
        let conn = self.reader.lock().unwrap();
        let mut stmt = conn.prepare_cached(
            "SELECT id, state FROM jobs WHERE array IS NOT NULL
               AND json_extract(array, '$.job') = ?1",
        )?;
        let rows = stmt.query_map([array as i64], |r| {
            Ok((r.get::<_, i64>(0)? as JobId, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, state) = row?;
            out.push((
                id,
                match JobState::parse(&state) {
                    Some(s) if s.is_terminal() => TargetState::Ended(s),
                    Some(_) => TargetState::Live,
                    None => TargetState::Ended(JobState::Failed),
                },
            ));
        }
        Ok(out)
    }

    /// The job that is task `task` of job array `array`, if recorded.
    pub fn array_task_job(&self, array: JobId, task: u32) -> Result<Option<JobId>> {
        let conn = self.reader.lock().unwrap();
        let id = conn
            .prepare_cached(ARRAY_TASK_SQL)?
            .query_row(params![array as i64, task], |r| r.get::<_, i64>(0))
            .optional()?;
        Ok(id.map(|id| id as JobId))
    }

    /// Waits until everything sent so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        let _ = rx.await;
    }

    /// Runs `f` on the store's thread once everything sent so far is committed: for clean-ups
    /// that must wait for a commit, without a round trip through the caller.
    pub fn after_commit(&self, f: impl FnOnce() + Send + 'static) {
        self.send(Op::AfterCommit(Box::new(f)));
    }

    /// Finished jobs matching `f`, in id order, at most `limit` after id `after`.
    pub fn finished_jobs(
        &self,
        f: &AcctFilter,
        after: JobId,
        limit: usize,
    ) -> Result<Vec<mgpu_proto::AcctRecord>> {
        if f.job.is_some() {
            // One job: by its key, not a scan in id order.
            return Ok(self
                .finished_job(f)?
                .filter(|r| r.id > after && limit > 0)
                .into_iter()
                .collect());
        }
        let conn = self.scanner.lock().unwrap();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ACCT_COLUMNS} FROM jobs
             WHERE state NOT IN ('PENDING', 'RUNNING') AND id > ?1
               AND (?2 IS NULL OR uid = ?2)
               AND (?3 IS NULL OR ended_at >= ?3) AND (?4 IS NULL OR state = ?4)
             ORDER BY id LIMIT ?5"
        ))?;
        let rows = stmt.query_map(
            params![
                after as i64,
                f.uid,
                f.since.map(|t| t as i64),
                f.state.map(|s| s.as_str()),
                limit as i64
            ],
            acct_record,
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The finished job `f.job` if it matches `f`: a lookup by key, on the connection for
    /// lookups (the server makes it on its event loop for `mgpu_control show job`).
    pub fn finished_job(&self, f: &AcctFilter) -> Result<Option<mgpu_proto::AcctRecord>> {
        let Some(id) = f.job else {
            return Ok(None);
        };
        let conn = self.reader.lock().unwrap();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {ACCT_COLUMNS} FROM jobs
             WHERE id = ?1 AND state NOT IN ('PENDING', 'RUNNING')
               AND (?2 IS NULL OR uid = ?2)
               AND (?3 IS NULL OR ended_at >= ?3) AND (?4 IS NULL OR state = ?4)"
        ))?;
        Ok(stmt
            .query_row(
                params![
                    id as i64,
                    f.uid,
                    f.since.map(|t| t as i64),
                    f.state.map(|s| s.as_str())
                ],
                acct_record,
            )
            .optional()?)
    }

    /// Per user, the jobs that ended in `[since, until)` (of `uid` only, if given): how many,
    /// and their GPU time over all their runs (a GROUP BY: one row per user).
    pub fn usage(
        &self,
        since: Option<Millis>,
        until: Option<Millis>,
        uid: Option<u32>,
    ) -> Result<Vec<UsageTotals>> {
        let conn = self.scanner.lock().unwrap();
        let mut stmt = conn.prepare_cached(USAGE_SQL)?;
        let rows = stmt.query_map(
            params![
                since.map_or(0, |t| t.min(i64::MAX as u64) as i64),
                until.map_or(i64::MAX, |t| t.min(i64::MAX as u64) as i64),
                uid
            ],
            |r| {
                Ok(UsageTotals {
                    uid: r.get(0)?,
                    user: r.get(1)?,
                    jobs: r.get::<_, i64>(2)?.max(0) as u64,
                    completed: r.get::<_, i64>(3)?.max(0) as u64,
                    gpu_ms: r.get::<_, Option<i64>>(4)?.unwrap_or(0).max(0) as u64,
                })
            },
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Runs of finished jobs that ended at or after `since` (for fair-share usage history):
    /// `(uid, gpus, mem_mib, gpu ids, started_at, ended_at)`.
    #[allow(clippy::type_complexity)]
    pub fn recent_runs(
        &self,
        since: Millis,
    ) -> Result<Vec<(u32, u32, Option<u64>, Vec<u32>, Millis, Millis)>> {
        let conn = self.scanner.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT uid, gpus, mem_mib, gpu_ids, started_at, ended_at FROM jobs
             WHERE ended_at >= ?1 AND started_at IS NOT NULL
               AND state NOT IN ('PENDING', 'RUNNING')",
        )?;
        let rows = stmt.query_map([since as i64], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, Option<i64>>(2)?.map(|m| m as u64),
                r.get::<_, Option<String>>(3)?
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|g| g.parse().ok())
                    .collect(),
                r.get::<_, i64>(4)? as Millis,
                r.get::<_, i64>(5)? as Millis,
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Deletes records of jobs that ended before `before`, and of each user's finished jobs
    /// past the newest `keep_per_user`; returns their ids (their logs go too).
    pub async fn purge(
        &self,
        before: Millis,
        keep_per_user: Option<u64>,
    ) -> Result<Vec<JobId>, String> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Purge(before, keep_per_user, tx));
        rx.await.map_err(|_| "the store stopped".to_string())?
    }

    /// The launch record (argv, working directory, environment...) of a job.
    pub fn launch_spec(&self, id: JobId) -> Result<LaunchSpec> {
        let conn = self.reader.lock().unwrap();
        let (text, env): (String, Option<String>) = conn
            .prepare_cached(SPEC_OF_JOB)?
            .query_row([id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
            .with_context(|| format!("job {id} has no launch record"))?;
        let unreadable = || format!("job {id}'s launch record is unreadable");
        let mut spec: LaunchSpec = serde_json::from_str(&text).with_context(unreadable)?;
        if let Some(env) = env {
            spec.env = serde_json::from_str(&env).with_context(unreadable)?;
        }
        Ok(spec)
    }

    /// Launch records of unfinished jobs: (job, owner, record's key (the job's id, or its job
    /// array's), the record's size with its environment).
    pub fn launch_charges(&self) -> Result<Vec<(JobId, u32, JobId, u64)>> {
        let conn = self.scanner.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT j.id, j.uid, COALESCE(json_extract(j.array, '$.job'), j.id),
                    COALESCE(length(NULLIF(j.spec, '')), length(a.spec), 0)
                      + COALESCE(length(e.env), 0)
             FROM jobs j
             LEFT JOIN array_specs a ON j.spec = '' AND a.array_id = json_extract(j.array, '$.job')
             LEFT JOIN envs e ON e.id = COALESCE(j.env_id, a.env_id)
             WHERE j.state IN ('PENDING', 'RUNNING')",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as JobId,
                r.get::<_, u32>(1)?,
                r.get::<_, i64>(2)? as JobId,
                r.get::<_, i64>(3)? as u64,
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Every recorded job's owner and, once it finished, when it ended (for the log books).
    pub fn log_owners(&self) -> Result<Vec<(JobId, u32, Option<Millis>)>> {
        let conn = self.scanner.lock().unwrap();
        let mut stmt = conn.prepare(
            "SELECT id, uid, CASE WHEN state IN ('PENDING', 'RUNNING') THEN NULL
                                  ELSE COALESCE(ended_at, 0) END FROM jobs",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as JobId,
                r.get::<_, u32>(1)?,
                r.get::<_, Option<i64>>(2)?.map(|t| t as Millis),
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The job array task a recorded job is, if any.
    pub fn array_task(&self, id: JobId) -> Result<Option<mgpu_core::ArrayTask>> {
        let conn = self.reader.lock().unwrap();
        let text: Option<String> = conn
            .prepare_cached("SELECT array FROM jobs WHERE id = ?1")?
            .query_row([id as i64], |r| r.get(0))
            .optional()?
            .flatten();
        Ok(array_of(text))
    }

    /// Owner and outcome of a recorded job.
    pub fn summary(&self, id: JobId) -> Result<Option<JobSummary>> {
        let conn = self.reader.lock().unwrap();
        let row = conn
            .query_row(
                "SELECT uid, state, exit_code, signal, message, mem_mib, peak_gpu_mem_mib
                 FROM jobs WHERE id = ?1",
                [id as i64],
                |r| {
                    Ok((
                        (r.get::<_, u32>(0)?, r.get::<_, String>(1)?),
                        r.get::<_, Option<i32>>(2)?,
                        r.get::<_, Option<i32>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                },
            )
            .optional()?;
        Ok(row.map(
            |((uid, state), exit_code, signal, message, mem, peak)| JobSummary {
                uid,
                state: JobState::parse(&state).unwrap_or(JobState::Failed),
                exit_code,
                signal,
                message,
                mem_mib: mem.map(|m| m as u64),
                peak_gpu_mem_mib: peak.map(|m| m as u64),
            },
        ))
    }
}

/// The columns of an accounting record, in the order [`acct_record`] reads them.
const ACCT_COLUMNS: &str = "id, user, name, state, exit_code, signal, submitted_at, started_at,
    ended_at, gpus, gpu_ids, mem_mib, restarts, message, array, peak_gpu_mem_mib, earlier_runs_ms";

fn acct_record(r: &rusqlite::Row) -> rusqlite::Result<mgpu_proto::AcctRecord> {
    Ok(mgpu_proto::AcctRecord {
        id: r.get::<_, i64>(0)? as JobId,
        user: r.get(1)?,
        name: r.get(2)?,
        state: JobState::parse(&r.get::<_, String>(3)?).unwrap_or(JobState::Failed),
        exit_code: r.get(4)?,
        signal: r.get(5)?,
        submitted_at: r.get::<_, i64>(6)? as Millis,
        started_at: r.get::<_, Option<i64>>(7)?.map(|t| t as Millis),
        ended_at: r.get::<_, Option<i64>>(8)?.map(|t| t as Millis),
        gpus: r.get(9)?,
        gpu_ids: r
            .get::<_, Option<String>>(10)?
            .unwrap_or_default()
            .split(',')
            .filter_map(|g| g.parse().ok())
            .collect(),
        mem_mib: r.get::<_, Option<i64>>(11)?.map(|m| m as u64),
        restarts: r.get(12)?,
        message: r.get(13)?,
        array: array_of(r.get(14)?),
        peak_gpu_mem_mib: r.get::<_, Option<i64>>(15)?.map(|m| m as u64),
        earlier_runs_s: r.get::<_, i64>(16)?.max(0) as u64 / 1000,
        earlier_runs_ms: Some(r.get::<_, i64>(16)?.max(0) as u64),
    })
}

fn recover(conn: &Connection) -> Result<Recovered> {
    let seq: Option<i64> = conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'jobs'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let max_id: Option<i64> = conn.query_row("SELECT MAX(id) FROM jobs", [], |r| r.get(0))?;
    let next_job_id = seq.unwrap_or(0).max(max_id.unwrap_or(0)) as JobId + 1;
    // The command of each job array with tasks left, read once for all its tasks.
    let mut array_commands: HashMap<JobId, Arc<[String]>> = HashMap::new();
    {
        let mut stmt = conn.prepare(
            "SELECT array_id, json_extract(spec, '$.command') FROM array_specs
             WHERE array_id IN (SELECT json_extract(array, '$.job') FROM jobs
                                WHERE array IS NOT NULL AND state IN ('PENDING', 'RUNNING'))",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?))
        })?;
        for row in rows {
            let (id, command) = row.context("reading the job arrays' launch records")?;
            if let Some(c) = command.and_then(|c| serde_json::from_str::<Vec<String>>(&c).ok()) {
                array_commands.insert(id as JobId, c.into());
            }
        }
    }
    let read = |state: &str| -> Result<Vec<RecoveredJob>> {
        let mut stmt = conn.prepare(
            "SELECT id, uid, user, name, gpus, mem_mib, time_limit_s,
                    CASE WHEN spec = '' THEN NULL ELSE json_extract(spec, '$.command') END,
                    COALESCE(queued_at, submitted_at), restarts,
                    started_at, gpu_ids, nice, no_requeue, max_restarts, warn_signal, warn_secs,
                    attached, array, begin_at, hold, dependency, min_key
             FROM jobs WHERE state = ?1 ORDER BY COALESCE(queued_at, submitted_at), id",
        )?;
        let rows = stmt.query_map([state], |r| {
            Ok((
                r.get::<_, i64>(0)? as JobId,
                JobRequest {
                    uid: r.get(1)?,
                    user: r.get(2)?,
                    name: r.get(3)?,
                    gpus: r.get(4)?,
                    mem_mib: r.get::<_, Option<i64>>(5)?.map(|m| m as u64),
                    time_limit_s: r.get::<_, Option<i64>>(6)?.map(|t| t as u64),
                    nice: r.get(12)?,
                    no_requeue: r.get(13)?,
                    max_restarts: r.get(14)?,
                    warn_signal: match (r.get::<_, Option<i32>>(15)?, r.get::<_, Option<i64>>(16)?)
                    {
                        (Some(signal), Some(secs)) => Some(mgpu_core::WarnSignal {
                            signal,
                            secs_before: secs as u64,
                        }),
                        _ => None,
                    },
                    array: None,
                },
                r.get::<_, Option<String>>(7)?,
                r.get::<_, i64>(8)? as Millis,
                r.get::<_, u32>(9)?,
                r.get::<_, Option<i64>>(10)?.map(|t| t as Millis),
                r.get::<_, Option<String>>(11)?,
                r.get::<_, bool>(17)?,
                r.get::<_, Option<String>>(18)?,
                r.get::<_, Option<i64>>(19)?.map(|t| t as Millis),
                (
                    r.get::<_, Option<String>>(20)?,
                    r.get::<_, Option<String>>(21)?,
                    r.get::<_, Option<i64>>(22)?,
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                mut request,
                command,
                submitted_at,
                restarts,
                started_at,
                gpu_ids,
                attached,
                array,
                begin_at,
                (hold, dependency, min_key),
            ) = row.context("reading the queued jobs (a launch record may be corrupt)")?;
            // A hold or dependency keeps a job from running: never drop one that is unreadable.
            let gate = Gate {
                hold: hold
                    .map(|h| serde_json::from_str::<Hold>(&h))
                    .transpose()
                    .with_context(|| format!("job {id} has an unreadable hold"))?,
                dependency: dependency
                    .map(|d| serde_json::from_str::<mgpu_core::Dependency>(&d))
                    .transpose()
                    .with_context(|| format!("job {id} has an unreadable dependency"))?,
            };
            // A task's index decides what it computes: never run it without.
            request.array = array
                .map(|a| serde_json::from_str::<mgpu_core::ArrayTask>(&a))
                .transpose()
                .with_context(|| format!("job {id} has an unreadable job array record"))?;
            let command: Arc<[String]> = match (command, request.array) {
                (Some(c), _) => serde_json::from_str::<Vec<String>>(&c).ok().map(Into::into),
                (None, Some(a)) => array_commands.get(&a.job).cloned(),
                (None, None) => None,
            }
            .with_context(|| format!("job {id} has an unreadable launch record"))?;
            let gpus = gpu_ids
                .unwrap_or_default()
                .split(',')
                .filter(|g| !g.is_empty())
                .map(|g| g.parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("job {id} has unreadable GPU ids"))?;
            out.push(RecoveredJob {
                id,
                request,
                command,
                submitted_at,
                started_at,
                gpus,
                restarts,
                attached,
                begin_at,
                gate,
                min_key,
            });
        }
        Ok(out)
    };
    let drains = conn
        .prepare("SELECT target, reason FROM drains ORDER BY target")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut run_times = {
        let mut stmt = conn.prepare(
            "SELECT uid, name, ended_at - started_at, time_limit_s FROM jobs
             WHERE ended_at IS NOT NULL AND started_at IS NOT NULL
               AND state IN ('COMPLETED', 'TIMEOUT')
             ORDER BY ended_at DESC, id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([RUN_TIMES_RECOVERED], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?.max(0) as Millis,
                r.get::<_, Option<i64>>(3)?.map(|t| t.max(0) as u64),
            ))
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    run_times.reverse();
    Ok(Recovered {
        next_job_id,
        pending: read("PENDING")?,
        running: read("RUNNING")?,
        drains,
        run_times,
    })
}

/// A job array task as recorded (JSON), for accounting (an unreadable one shows as none).
fn array_of(text: Option<String>) -> Option<mgpu_core::ArrayTask> {
    serde_json::from_str(&text?).ok()
}

fn writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Op>,
    dead: Arc<AtomicBool>,
    committed: mpsc::SyncSender<()>,
    stats: Arc<crate::metrics::StoreStats>,
) {
    while let Ok(first) = rx.recv() {
        if dead.load(Ordering::SeqCst) {
            return;
        }
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 4096 {
                break;
            }
        }
        let mut purged = Vec::new();
        let began = std::time::Instant::now();
        let mut result = apply(&mut conn, &batch, &mut purged).map_err(|e| format!("{e:#}"));
        stats.commit(began.elapsed(), result.is_ok());
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing the job database failed");
            // New submissions are refused (their clients hear it); state changes of known jobs
            // must not be lost, so they are retried until they stick.
            let (refused, kept): (Vec<Op>, Vec<Op>) = batch
                .into_iter()
                .partition(|op| matches!(op, Op::Insert(..) | Op::InsertArray(..) | Op::Purge(..)));
            for op in refused {
                match op {
                    Op::Insert(_, done) | Op::InsertArray(_, done) => {
                        let _ = done.send(Err(e.clone()));
                    }
                    Op::Purge(_, _, done) => {
                        let _ = done.send(Err(e.clone()));
                    }
                    _ => {}
                }
            }
            batch = kept;
            let mut delay = std::time::Duration::from_millis(100);
            loop {
                let began = std::time::Instant::now();
                let applied = apply(&mut conn, &batch, &mut purged);
                stats.commit(began.elapsed(), applied.is_ok());
                match applied {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "retrying the job database write");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
            result = Ok(());
        }
        if batch
            .iter()
            .any(|op| !matches!(op, Op::Flush(_) | Op::AfterCommit(_)))
        {
            // Wakes the checkpointer (a wake-up already pending is enough).
            let _ = committed.try_send(());
        }
        for op in batch {
            match op {
                Op::Insert(_, done) | Op::InsertArray(_, done) => {
                    let _ = done.send(result.clone());
                }
                Op::Flush(done) => {
                    let _ = done.send(());
                }
                Op::AfterCommit(f) => run_after_commit(f),
                Op::Purge(_, _, done) => {
                    let _ = done.send(result.clone().map(|_| std::mem::take(&mut purged)));
                }
                _ => {}
            }
        }
    }
}

/// Runs a clean-up queued with [`Store::after_commit`]; one that panics must not take the
/// store's thread with it.
fn run_after_commit(f: Box<dyn FnOnce() + Send>) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        tracing::error!("a clean-up after a commit panicked");
    }
}

/// Records one new pending job; `spec` is its launch record (JSON), or empty for a job array's
/// task (the array's record is kept once, in `array_specs`).
fn insert_row(
    tx: &rusqlite::Transaction,
    id: JobId,
    r: &JobRequest,
    (spec, env_id): (&str, Option<i64>),
    submitted_at: Millis,
    attached: bool,
    gate: &Gate,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO jobs (id, uid, user, name, state, gpus, mem_mib, time_limit_s, spec,
                           submitted_at, nice, no_requeue, max_restarts, warn_signal, warn_secs,
                           attached, array, env_id, hold, dependency)
         VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                 ?16, ?17, ?18, ?19)",
    )?
    .execute(params![
        id as i64,
        r.uid,
        r.user,
        r.name,
        r.gpus,
        r.mem_mib.map(|m| m as i64),
        r.time_limit_s.map(|t| t as i64),
        spec,
        submitted_at as i64,
        r.nice,
        r.no_requeue,
        r.max_restarts,
        r.warn_signal.map(|w| w.signal),
        r.warn_signal.map(|w| w.secs_before as i64),
        attached,
        r.array.map(|a| serde_json::to_string(&a)).transpose()?,
        env_id,
        gate.hold.map(|h| serde_json::to_string(&h)).transpose()?,
        gate.dependency
            .as_ref()
            .map(serde_json::to_string)
            .transpose()?,
    ])?;
    Ok(())
}

/// A new job's `--begin` time, if it has one.
fn set_begin_at(tx: &rusqlite::Transaction, id: JobId, at: Option<Millis>) -> Result<()> {
    if let Some(at) = at {
        tx.prepare_cached("UPDATE jobs SET begin_at = ?2 WHERE id = ?1")?
            .execute(params![id as i64, at as i64])?;
    }
    Ok(())
}

/// The job that is task `?2` of job array `?1` (by `jobs_array_task`).
const ARRAY_TASK_SQL: &str =
    "SELECT id FROM jobs INDEXED BY jobs_array_task WHERE array IS NOT NULL
   AND json_extract(array, '$.job') = ?1 AND json_extract(array, '$.task') = ?2";

const ARRAY_HAS_LIVE_TASK_SQL: &str = "SELECT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_array_live
   WHERE array IS NOT NULL
   AND json_extract(array, '$.job') = ?1 AND state IN ('PENDING', 'RUNNING'))";

/// Per user: jobs that ended in `[?1, ?2)` (of uid `?3` only, if given), how many completed,
/// GPU-milliseconds over all their runs. Answered from a range of `jobs_usage` alone (the
/// bounds are always given: 0 and i64::MAX for none).
const USAGE_SQL: &str = "SELECT uid, MAX(user), COUNT(*), SUM(state = 'COMPLETED'),
        SUM(gpus * (COALESCE(MAX(ended_at - started_at, 0), 0) + MAX(earlier_runs_ms, 0)))
    FROM jobs INDEXED BY jobs_usage
    WHERE ended_at >= ?1 AND ended_at < ?2 AND state NOT IN ('PENDING', 'RUNNING')
      AND (?3 IS NULL OR uid = ?3)
    GROUP BY uid ORDER BY uid";

/// Deletes each user's finished jobs past their newest `keep` (oldest first), adding their
/// ids to `purged`: one pass over the index of finished jobs finds the users past it.
fn purge_past_keep(tx: &rusqlite::Transaction, keep: u64, purged: &mut Vec<JobId>) -> Result<()> {
    let over: Vec<u32> = tx
        .prepare_cached(
            "SELECT uid FROM jobs INDEXED BY jobs_finished_by_user
             WHERE state NOT IN ('PENDING', 'RUNNING') GROUP BY uid HAVING COUNT(*) > ?1",
        )?
        .query_map([keep as i64], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for uid in over {
        let mut stmt = tx.prepare_cached(
            "DELETE FROM jobs WHERE id IN (
               SELECT id FROM jobs INDEXED BY jobs_finished_by_user
               WHERE uid = ?1 AND state NOT IN ('PENDING', 'RUNNING')
               ORDER BY id DESC LIMIT -1 OFFSET ?2)
             RETURNING id",
        )?;
        let ids = stmt.query_map(params![uid, keep as i64], |r| r.get::<_, i64>(0))?;
        for id in ids {
            purged.push(id? as JobId);
        }
    }
    Ok(())
}

/// Whether job array `array` has a task pending or running (`jobs_array_live` holds only
/// those: no walk over the ended tasks).
fn array_has_live_task(tx: &rusqlite::Transaction, array: i64) -> Result<bool> {
    Ok(tx
        .prepare_cached(ARRAY_HAS_LIVE_TASK_SQL)?
        .query_row([array], |r| r.get(0))?)
}

/// Deletes environment `env` once no launch record refers to it (both lookups are indexed).
fn drop_env_if_unused(tx: &rusqlite::Transaction, env: i64) -> Result<()> {
    tx.prepare_cached(
        "DELETE FROM envs WHERE id = ?1
           AND NOT EXISTS (SELECT 1 FROM jobs WHERE env_id = ?1)
           AND NOT EXISTS (SELECT 1 FROM array_specs WHERE env_id = ?1)",
    )?
    .execute([env])?;
    Ok(())
}

fn apply(conn: &mut Connection, batch: &[Op], purged: &mut Vec<JobId>) -> Result<()> {
    let tx = conn.transaction()?;
    for op in batch {
        match op {
            Op::Insert(job, _) => {
                let (spec, env) = stored_spec(&tx, &job.spec)?;
                insert_row(
                    &tx,
                    job.id,
                    &job.request,
                    (&spec, env),
                    job.submitted_at,
                    job.attached,
                    &job.gate,
                )?;
                set_begin_at(&tx, job.id, job.spec.begin_at)?;
            }
            Op::InsertArray(array, _) => {
                let Some((first, _)) = array.tasks.first() else {
                    continue;
                };
                let (spec, env) = stored_spec(&tx, &array.spec)?;
                tx.prepare_cached(
                    "INSERT INTO array_specs (array_id, spec, env_id) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![*first as i64, spec, env])?;
                for (id, request) in &array.tasks {
                    insert_row(
                        &tx,
                        *id,
                        request,
                        ("", None),
                        array.submitted_at,
                        false,
                        &array.gate,
                    )?;
                    set_begin_at(&tx, *id, array.spec.begin_at)?;
                }
            }
            Op::Started { id, at, gpus, pid } => {
                let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
                tx.prepare_cached(
                    "UPDATE jobs SET state = 'RUNNING', started_at = ?2, gpu_ids = ?3, pid = ?4
                     WHERE id = ?1",
                )?
                .execute(params![*id as i64, *at as i64, ids.join(","), pid])?;
            }
            Op::Ended(id, e) => {
                let (env, array): (Option<i64>, Option<i64>) = tx
                    .prepare_cached(
                        "SELECT env_id, json_extract(array, '$.job') FROM jobs WHERE id = ?1",
                    )?
                    .query_row([*id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?
                    .unwrap_or((None, None));
                tx.prepare_cached(concat!(
                    // A finished job never runs again: its record keeps no environment, no
                    // batch script and at most 1 KiB of command.
                    "UPDATE jobs SET state = ?2, ended_at = ?3, exit_code = ?4, signal = ?5,
                                     message = ?6, env_id = NULL, spec = ",
                    trimmed_spec!("spec"),
                    " WHERE id = ?1"
                ))?
                .execute(params![
                    *id as i64,
                    e.state.as_str(),
                    e.at as i64,
                    e.exit_code,
                    e.signal,
                    e.message
                ])?;
                // The job array's shared record, once its last task ended (the index holds
                // only live tasks: no walk over the ended ones).
                let array_env = match array {
                    Some(a) if !array_has_live_task(&tx, a)? => {
                        let env: Option<i64> = tx
                            .prepare_cached("SELECT env_id FROM array_specs WHERE array_id = ?1")?
                            .query_row([a], |r| r.get(0))
                            .optional()?
                            .flatten();
                        tx.prepare_cached(concat!(
                            "UPDATE array_specs SET env_id = NULL, spec = ",
                            trimmed_spec!("spec"),
                            " WHERE array_id = ?1"
                        ))?
                        .execute([a])?;
                        env
                    }
                    _ => None,
                };
                for env in [env, array_env].into_iter().flatten() {
                    drop_env_if_unused(&tx, env)?;
                }
            }
            Op::GpuPeak(id, mib) => {
                tx.prepare_cached(
                    "UPDATE jobs SET peak_gpu_mem_mib = MAX(COALESCE(peak_gpu_mem_mib, 0), ?2)
                     WHERE id = ?1",
                )?
                .execute(params![*id as i64, *mib as i64])?;
            }
            Op::Requeued {
                id,
                at,
                restarts,
                min_key,
            } => {
                tx.prepare_cached(
                    // The run that ends here is added to the earlier runs (once: a repeated
                    // op finds started_at already cleared).
                    "UPDATE jobs SET state = 'PENDING', started_at = NULL, gpu_ids = NULL,
                                     pid = NULL, restarts = ?3, queued_at = ?2, min_key = ?4,
                                     earlier_runs_ms = earlier_runs_ms
                                         + COALESCE(MAX(?2 - started_at, 0), 0)
                     WHERE id = ?1",
                )?
                .execute(params![*id as i64, *at as i64, *restarts, *min_key])?;
            }
            Op::SetHold(id, hold) => {
                tx.prepare_cached("UPDATE jobs SET hold = ?2 WHERE id = ?1")?
                    .execute(params![
                        *id as i64,
                        hold.map(|h| serde_json::to_string(&h)).transpose()?
                    ])?;
            }
            Op::Updated(id, r) => {
                tx.prepare_cached(
                    "UPDATE jobs SET name = ?2, nice = ?3, gpus = ?4, mem_mib = ?5,
                                     time_limit_s = ?6 WHERE id = ?1",
                )?
                .execute(params![
                    *id as i64,
                    r.name,
                    r.nice,
                    r.gpus,
                    r.mem_mib.map(|m| m as i64),
                    r.time_limit_s.map(|t| t as i64)
                ])?;
            }
            Op::SetDrain(target, drain) => match drain {
                Some((reason, at)) => {
                    tx.prepare_cached(
                        "INSERT INTO drains (target, reason, at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (target) DO UPDATE SET reason = ?2, at = ?3",
                    )?
                    .execute(params![target, reason, *at as i64])?;
                }
                None => {
                    tx.prepare_cached("DELETE FROM drains WHERE target = ?1")?
                        .execute([target])?;
                }
            },
            Op::Flush(_) | Op::AfterCommit(_) => {}
            Op::Purge(before, keep_per_user, _) => {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM jobs WHERE state NOT IN ('PENDING', 'RUNNING') AND ended_at < ?1
                     RETURNING id",
                )?;
                let ids = stmt.query_map([*before as i64], |r| r.get::<_, i64>(0))?;
                for id in ids {
                    purged.push(id? as JobId);
                }
                drop(stmt);
                if let Some(keep) = keep_per_user {
                    purge_past_keep(&tx, *keep, purged)?;
                }
                if !purged.is_empty() {
                    tx.execute(
                        "DELETE FROM array_specs WHERE NOT EXISTS
                           (SELECT 1 FROM jobs WHERE array IS NOT NULL
                              AND json_extract(array, '$.job') = array_specs.array_id)",
                        [],
                    )?;
                }
                // Environments of jobs that ended are no longer referred to.
                tx.execute(
                    "DELETE FROM envs WHERE
                       NOT EXISTS (SELECT 1 FROM jobs WHERE env_id = envs.id)
                       AND NOT EXISTS (SELECT 1 FROM array_specs WHERE env_id = envs.id)",
                    [],
                )?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::LaunchSpec;
    use mgpu_proto::Venv;

    fn job(id: JobId) -> NewJob {
        NewJob {
            gate: Default::default(),
            id,
            request: JobRequest {
                uid: 1000,
                user: "alice".into(),
                name: "n".into(),
                gpus: 1,
                mem_mib: Some(100),
                time_limit_s: None,
                nice: 0,
                no_requeue: false,
                max_restarts: None,
                warn_signal: None,
                array: None,
            },
            spec: LaunchSpec {
                command: vec!["true".into()],
                cwd: "/".into(),
                env: vec![],
                venv: Venv::Off,
                umask: None,
                ..Default::default()
            },
            submitted_at: 5,
            attached: false,
        }
    }

    /// How a test's job ended, with no exit code, signal or message.
    fn ending(state: JobState, at: Millis) -> Ending {
        Ending {
            state,
            at,
            exit_code: None,
            signal: None,
            message: None,
        }
    }

    /// Everything a launch record holds comes back from the store: the job's limits too (they
    /// are applied at each run, after a restart as well).
    #[tokio::test]
    async fn a_launch_record_keeps_the_jobs_limits() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = job(3);
        j.spec.env = vec![("PATH".into(), "/bin".into())];
        j.spec.cpus = Some(2);
        j.spec.host_mem_mib = Some(256);
        j.spec.umask = Some(0o22);
        let spec = j.spec.clone();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.insert(j).await.unwrap().unwrap();
            assert_eq!(store.launch_spec(3).unwrap(), spec);
        }
        let (store, _) = Store::open(dir.path()).unwrap();
        assert_eq!(store.launch_spec(3).unwrap(), spec);
    }

    /// A job array's tasks share one launch record; each keeps its index across a restart;
    /// the record goes once the last task's record is purged.
    #[tokio::test]
    async fn job_array_tasks_share_one_launch_record() {
        let dir = tempfile::tempdir().unwrap();
        let template = job(0);
        let tasks: Vec<(JobId, JobRequest)> = (0..3)
            .map(|i| {
                let array = mgpu_core::ArrayTask {
                    job: 10,
                    task: i * 2,
                    count: 3,
                    min: 0,
                    max: 4,
                    limit: None,
                };
                (
                    10 + u64::from(i),
                    JobRequest {
                        array: Some(array),
                        ..template.request.clone()
                    },
                )
            })
            .collect();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store
                .insert_array(NewArray {
                    gate: Default::default(),
                    spec: template.spec.clone(),
                    submitted_at: 5,
                    tasks,
                })
                .await
                .unwrap()
                .unwrap();
            let ending = |at| Ending {
                state: JobState::Completed,
                at,
                exit_code: Some(0),
                signal: None,
                message: None,
            };
            store.started(10, 6, vec![0], 99);
            store.ended(10, ending(7));
            store.flush().await;
            let acct = store.finished_jobs(&AcctFilter::default(), 0, 10).unwrap();
            assert_eq!(acct[0].array.unwrap().task, 0);
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.next_job_id, 13);
        let pending: Vec<(JobId, u32)> = rec
            .pending
            .iter()
            .map(|j| (j.id, j.request.array.unwrap().task))
            .collect();
        assert_eq!(pending, [(11, 2), (12, 4)]);
        assert_eq!(&rec.pending[1].command[..], ["true"]);
        assert!(Arc::ptr_eq(
            &rec.pending[0].command,
            &rec.pending[1].command
        ));
        assert_eq!(store.launch_spec(12).unwrap().command, ["true"]);
        // Purging the finished task keeps the record the waiting ones need.
        assert_eq!(store.purge(100, None).await.unwrap(), [10]);
        assert_eq!(store.launch_spec(11).unwrap().cwd, "/");
        for id in [11, 12] {
            store.ended(
                id,
                Ending {
                    state: JobState::Cancelled,
                    at: 8,
                    exit_code: None,
                    signal: None,
                    message: None,
                },
            );
        }
        assert_eq!(store.purge(100, None).await.unwrap(), [11, 12]);
        let left: i64 = store
            .reader
            .lock()
            .unwrap()
            .query_row("SELECT COUNT(*) FROM array_specs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn pending_jobs_and_ids_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, rec) = Store::open(dir.path()).unwrap();
            assert_eq!(rec.next_job_id, 1);
            for id in 1..=3 {
                store.insert(job(id)).await.unwrap().unwrap();
            }
            store.started(1, 10, vec![0], 99);
            store.ended(
                3,
                Ending {
                    state: JobState::Cancelled,
                    at: 11,
                    exit_code: None,
                    signal: None,
                    message: None,
                },
            );
            store.flush().await;
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.next_job_id, 4);
        assert_eq!(rec.pending.len(), 1);
        assert_eq!(rec.pending[0].id, 2);
        assert_eq!(rec.running.len(), 1);
        assert_eq!(rec.running[0].id, 1);
        assert_eq!(rec.running[0].gpus, vec![0]);
        assert_eq!(rec.running[0].started_at, Some(10));
        assert_eq!(
            store.summary(3).unwrap().unwrap().state,
            JobState::Cancelled
        );
        assert_eq!(store.summary(9).unwrap(), None);
    }

    /// A requeued job's key floor is written with its requeue and read back at startup; a
    /// later requeue without one (switched while the server was down: the recovery computes
    /// it anew) replaces it; a job never requeued has none.
    #[tokio::test]
    async fn a_requeued_jobs_key_floor_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            for id in 1..=3 {
                store.insert(job(id)).await.unwrap().unwrap();
            }
            store.started(1, 1_000, vec![0], 1);
            store.requeued(1, 5_000, 1, Some(-7_000_000_000_123));
            store.started(3, 1_000, vec![1], 3);
            store.requeued(3, 5_000, 1, Some(42));
            store.started(3, 6_000, vec![1], 3);
            store.requeued(3, 9_000, 2, None);
            store.flush().await;
        }
        let (_store, rec) = Store::open(dir.path()).unwrap();
        let floor = |id: JobId| rec.pending.iter().find(|j| j.id == id).unwrap().min_key;
        assert_eq!(floor(1), Some(-7_000_000_000_123));
        assert_eq!(floor(2), None);
        assert_eq!(floor(3), None);
        let one = rec.pending.iter().find(|j| j.id == 1).unwrap();
        assert_eq!((one.submitted_at, one.restarts), (5_000, 1));
    }

    #[tokio::test]
    async fn holds_dependencies_updates_and_drains_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let dep = mgpu_core::Dependency {
            any: false,
            items: vec![mgpu_core::DepItem {
                kind: mgpu_core::DepKind::AfterOk,
                job: 1,
                tasks: 0,
            }],
            text: "afterok:1".into(),
        };
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            store.insert(job(1)).await.unwrap().unwrap();
            let mut j = job(2);
            j.gate.dependency = Some(dep.clone());
            store.insert(j).await.unwrap().unwrap();
            store.set_hold(1, Some(Hold::Admin));
            let mut r = job(1).request;
            r.name = "renamed".into();
            r.gpus = 2;
            store.updated(1, r);
            store.set_drain("gpu:1".into(), Some(("fan".into(), 5)));
            store.set_drain("server".into(), Some(("upgrade".into(), 6)));
            store.set_drain("server".into(), None);
            store.flush().await;
            assert_eq!(store.target_state(1).unwrap(), TargetState::Live);
            assert_eq!(store.target_state(7).unwrap(), TargetState::Gone);
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        let one = rec.pending.iter().find(|j| j.id == 1).unwrap();
        assert_eq!(one.gate.hold, Some(Hold::Admin));
        assert_eq!(
            (one.request.name.as_str(), one.request.gpus),
            ("renamed", 2)
        );
        let two = rec.pending.iter().find(|j| j.id == 2).unwrap();
        assert_eq!(two.gate.dependency, Some(dep));
        assert_eq!(two.gate.hold, None);
        assert_eq!(rec.drains, vec![("gpu:1".to_string(), "fan".to_string())]);
        store.ended(
            1,
            Ending {
                state: JobState::Failed,
                at: 9,
                exit_code: Some(1),
                signal: None,
                message: None,
            },
        );
        store.flush().await;
        assert_eq!(
            store.target_state(1).unwrap(),
            TargetState::Ended(JobState::Failed)
        );
    }

    #[tokio::test]
    async fn finished_run_times_are_read_back_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            // (id, state, start, end): only runs that completed or timed out teach anything.
            let runs = [
                (1, JobState::Completed, 100, 700),
                (2, JobState::Failed, 100, 200),
                (3, JobState::Timeout, 50, 400),
                (4, JobState::Cancelled, 10, 900),
            ];
            for (id, state, start, end) in runs {
                let mut new = job(id);
                if id == 3 {
                    new.request.time_limit_s = Some(1);
                }
                store.insert(new).await.unwrap().unwrap();
                store.started(id, start, vec![0], 99);
                store.ended(
                    id,
                    Ending {
                        state,
                        at: end,
                        exit_code: None,
                        signal: None,
                        message: None,
                    },
                );
            }
            store.insert(job(5)).await.unwrap().unwrap();
            store.flush().await;
        }
        let (_, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(
            rec.run_times,
            vec![
                (1000, "n".to_string(), 350, Some(1)),
                (1000, "n".to_string(), 600, None)
            ]
        );
    }

    #[test]
    fn a_database_of_the_previous_schema_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Written as the first release did: schema 1 only.
            let conn = Connection::open(dir.path().join("mgpu.db")).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO jobs (id, uid, user, name, state, gpus, spec, submitted_at)
                 VALUES (7, 1000, 'alice', 'old', 'PENDING', 1,
                         '{\"command\":[\"true\"],\"cwd\":\"/\",\"env\":[],\"venv\":\"auto\"}', 3)",
                [],
            )
            .unwrap();
            // A finished job from before finished jobs were trimmed: its script goes.
            conn.execute(
                "INSERT INTO jobs (id, uid, user, name, state, gpus, spec, submitted_at)
                 VALUES (6, 1000, 'alice', 'old', 'COMPLETED', 1,
                         '{\"command\":[\"sh\"],\"cwd\":\"/\",\"env\":[[\"A\",\"b\"]],\"venv\":\"auto\",\"script\":\"echo hi\"}', 3)",
                [],
            )
            .unwrap();
        }
        let (_store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.next_job_id, 8);
        assert_eq!(rec.pending.len(), 1);
        assert_eq!(rec.pending[0].request.nice, 0);
        assert_eq!(&rec.pending[0].command[..], ["true"]);
        let conn = Connection::open(dir.path().join("mgpu.db")).unwrap();
        let v: usize = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len());
        let spec: String = conn
            .query_row("SELECT spec FROM jobs WHERE id = 6", [], |r| r.get(0))
            .unwrap();
        assert!(
            !spec.contains("script") && !spec.contains("\"b\""),
            "{spec}"
        );
        let envs: i64 = conn
            .query_row("SELECT COUNT(*) FROM envs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(envs, 0);
    }

    fn count(store: &Store, sql: &str) -> i64 {
        store
            .reader
            .lock()
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    /// Each distinct environment is stored once; jobs (and job arrays) read theirs back; purging
    /// the last job that uses one removes it.
    #[tokio::test]
    async fn each_distinct_environment_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let env = |v: &str| {
            vec![
                ("PATH".to_string(), "/bin".to_string()),
                ("X".into(), v.into()),
            ]
        };
        for (id, x) in [(1, "a"), (2, "a"), (3, "b"), (4, "a")] {
            let mut j = job(id);
            j.spec.env = env(x);
            store.insert(j).await.unwrap().unwrap();
        }
        let mut array = job(0);
        array.spec.env = env("b");
        let task = |i| mgpu_core::ArrayTask {
            job: 10,
            task: i,
            count: 2,
            min: 0,
            max: 1,
            limit: None,
        };
        store
            .insert_array(NewArray {
                gate: Default::default(),
                spec: array.spec.clone(),
                submitted_at: 5,
                tasks: (0..2)
                    .map(|i| {
                        let request = JobRequest {
                            array: Some(task(i)),
                            ..array.request.clone()
                        };
                        (10 + u64::from(i), request)
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .unwrap();
        // An empty environment needs no row.
        store.insert(job(5)).await.unwrap().unwrap();
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 2);
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM jobs WHERE spec LIKE '%\"X\"%'"
            ),
            0,
            "launch records keep no environment of their own"
        );
        assert_eq!(store.launch_spec(2).unwrap().env, env("a"));
        assert_eq!(store.launch_spec(3).unwrap().env, env("b"));
        assert_eq!(store.launch_spec(11).unwrap().env, env("b"));
        assert_eq!(store.launch_spec(11).unwrap().command, ["true"]);
        assert!(store.launch_spec(5).unwrap().env.is_empty());
        let end = |store: &Store, id| {
            store.ended(
                id,
                Ending {
                    state: JobState::Completed,
                    at: 8,
                    exit_code: Some(0),
                    signal: None,
                    message: None,
                },
            )
        };
        // "b" is still used by the array after job 3 goes; "a" after jobs 1 and 2.
        for id in [1, 2, 3] {
            end(&store, id);
        }
        assert_eq!(store.purge(100, None).await.unwrap(), [1, 2, 3]);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 2);
        for id in [4, 10, 11] {
            end(&store, id);
        }
        store.purge(100, None).await.unwrap();
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 0);
        assert!(store.launch_spec(5).unwrap().env.is_empty());
    }

    /// A finished job's record keeps no environment, no batch script and at most 1 KiB of
    /// command, and an environment no other record uses goes at once, not at the purge
    /// (found by an attack review: a user's submit-and-cancel cycles grew the database by
    /// gigabytes that stayed for the retention period).
    #[tokio::test]
    async fn finished_jobs_keep_no_launch_data() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut j = job(1);
        j.spec.command = vec!["python".into(), "x".repeat(100_000)];
        j.spec.env = vec![("X".into(), "y".repeat(100_000))];
        j.spec.script = Some("#!/bin/sh\n".to_string() + &"# padding\n".repeat(50_000));
        // Long, escaped paths (found by a later attack review: 150 KB per cancelled job).
        let odd = format!("/{}", "\u{1}".repeat(4000));
        j.spec.cwd = odd.clone();
        j.spec.submit_dir = Some(odd.clone());
        j.spec.output = Some(odd.clone());
        j.spec.error = Some(odd.clone());
        j.spec.venv = Venv::Dir(odd.clone());
        j.spec.notify = Some(mgpu_proto::Notify {
            command: Some("echo done".into()),
            ..Default::default()
        });
        store.insert(j).await.unwrap().unwrap();
        // Another job with the same environment keeps it while it waits.
        let mut k = job(2);
        k.spec.env = vec![("X".into(), "y".repeat(100_000))];
        store.insert(k).await.unwrap().unwrap();
        let ended = |state| ending(state, 8);
        store.ended(1, ended(JobState::Cancelled));
        store.flush().await;
        assert_eq!(
            count(&store, "SELECT length(spec) < 200 FROM jobs WHERE id = 1"),
            1
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM jobs WHERE env_id IS NOT NULL"),
            1
        );
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 1);
        let spec = store.launch_spec(1).unwrap();
        assert_eq!(spec.command, ["python"]);
        assert_eq!(spec.script, None);
        // What a notification at the end needs stays (the directory: where short enough).
        assert_eq!(spec.notify.unwrap().command.as_deref(), Some("echo done"));
        assert_eq!(spec.cwd, "");
        assert_eq!(
            (spec.output, spec.error, spec.submit_dir),
            (None, None, None)
        );
        store.ended(2, ended(JobState::Completed));
        store.flush().await;
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 0);
    }

    /// Each user keeps at most the newest `keep` finished records (found by an attack review:
    /// submitting and cancelling jobs in a loop grew the database without bound); waiting
    /// jobs and other users' records stay.
    #[tokio::test]
    async fn a_users_finished_records_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        for id in 1..=6 {
            let mut j = job(id);
            j.request.uid = if id == 6 { 2000 } else { 1000 };
            store.insert(j).await.unwrap().unwrap();
        }
        for id in [1, 2, 3, 4, 6] {
            store.ended(id, ending(JobState::Cancelled, 10 + id));
        }
        store.flush().await;
        let mut purged = store.purge(0, Some(2)).await.unwrap();
        purged.sort();
        assert_eq!(purged, [1, 2]);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM jobs"), 4);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM jobs WHERE id = 5"), 1);
        assert!(store.purge(0, Some(2)).await.unwrap().is_empty());
    }

    /// A job array's shared record keeps its script and environment while a task is left,
    /// and is trimmed like a job's when the last one ends.
    #[tokio::test]
    async fn a_job_arrays_record_is_trimmed_when_its_last_task_ends() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let mut template = job(0);
        template.spec.env = vec![("X".into(), "y".repeat(10_000))];
        template.spec.script = Some("#!/bin/sh\ntrue\n".into());
        let tasks: Vec<(JobId, JobRequest)> = (0..3)
            .map(|i| {
                let array = mgpu_core::ArrayTask {
                    job: 10,
                    task: i,
                    count: 3,
                    min: 0,
                    max: 2,
                    limit: None,
                };
                let request = JobRequest {
                    array: Some(array),
                    ..template.request.clone()
                };
                (10 + u64::from(i), request)
            })
            .collect();
        store
            .insert_array(NewArray {
                gate: Default::default(),
                spec: template.spec.clone(),
                submitted_at: 5,
                tasks,
            })
            .await
            .unwrap()
            .unwrap();
        let ended = |state| ending(state, 8);
        store.started(10, 6, vec![0], 99);
        store.ended(10, ended(JobState::Completed));
        store.ended(12, ended(JobState::Cancelled));
        store.flush().await;
        // Task 11 waits: it still needs the script and the environment.
        let spec = store.launch_spec(11).unwrap();
        assert!(spec.script.is_some());
        assert_eq!(spec.env.len(), 1);
        store.started(11, 9, vec![0], 98);
        store.ended(11, ended(JobState::Failed));
        store.flush().await;
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 0);
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM array_specs WHERE env_id IS NULL
                   AND json_extract(spec, '$.script') IS NULL"
            ),
            1
        );
        assert_eq!(store.launch_spec(12).unwrap().command, ["true"]);
    }

    /// The per-event and per-request queries that must not grow with the records use their
    /// indexes: whether an array has a task left (at every task's end) reads only live tasks;
    /// the usage summary (any user may ask) reads the index alone, never a row; a task named
    /// `ID_TASK` is found without a walk over its array.
    #[test]
    fn the_queries_that_must_stay_small_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let plan = |sql: &str, args: &[Option<i64>]| -> String {
            let conn = store.reader.lock().unwrap();
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.join("; ")
        };
        let live = plan(ARRAY_HAS_LIVE_TASK_SQL, &[Some(5)]);
        assert!(live.contains("jobs_array_live"), "{live}");
        let task = plan(ARRAY_TASK_SQL, &[Some(5), Some(3)]);
        assert!(task.contains("jobs_array_task"), "{task}");
        for args in [
            [Some(0), Some(i64::MAX), None],
            [Some(1), Some(9), Some(1000)],
        ] {
            let usage = plan(USAGE_SQL, &args);
            // A range of the index, never the whole of it (found by a review: an optional
            // bound written `?1 IS NULL OR ...` read every record ever kept).
            assert!(
                usage.contains(
                    "SEARCH jobs USING COVERING INDEX jobs_usage (ended_at>? AND ended_at<?)"
                ),
                "{usage}"
            );
        }
    }

    /// A job's GPU memory peak is kept (the larger figure wins, across writes) and read back by
    /// the accounting and the summary.
    #[tokio::test]
    async fn the_gpu_memory_peak_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        store.insert(job(1)).await.unwrap().unwrap();
        store.gpu_peak(1, 5_000);
        store.gpu_peak(1, 3_000);
        store.ended(
            1,
            Ending {
                state: JobState::OutOfMemory,
                at: 8,
                exit_code: None,
                signal: Some(15),
                message: None,
            },
        );
        store.flush().await;
        assert_eq!(
            store.summary(1).unwrap().unwrap().peak_gpu_mem_mib,
            Some(5_000)
        );
        let recs = store.finished_jobs(&AcctFilter::default(), 0, 10).unwrap();
        assert_eq!(recs[0].peak_gpu_mem_mib, Some(5_000));
    }

    #[tokio::test]
    async fn usage_counts_every_run_of_the_jobs_that_ended_in_the_period() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let end = |state| Ending {
            state,
            at: 0,
            exit_code: None,
            signal: None,
            message: None,
        };
        // Job 1 (alice, 2 GPUs): a run of 10 s ended by a context switch, then one of 5 s.
        let mut two = job(1);
        two.request.gpus = 2;
        store.insert(two).await.unwrap().unwrap();
        store.started(1, 1_000, vec![0, 1], 1);
        store.requeued(1, 11_000, 1, None);
        store.started(1, 20_000, vec![0, 1], 2);
        store.ended(
            1,
            Ending {
                at: 25_000,
                ..end(JobState::Completed)
            },
        );
        // Job 2 (alice): cancelled before it ran.
        store.insert(job(2)).await.unwrap().unwrap();
        store.ended(
            2,
            Ending {
                at: 30_000,
                ..end(JobState::Cancelled)
            },
        );
        // Job 3 (bob, 1 GPU): 4 s, ending later.
        let mut bob = job(3);
        bob.request.uid = 1001;
        bob.request.user = "bob".into();
        store.insert(bob).await.unwrap().unwrap();
        store.started(3, 50_000, vec![0], 3);
        store.ended(
            3,
            Ending {
                at: 54_000,
                ..end(JobState::Failed)
            },
        );
        // Job 4 (bob): still running, not counted.
        let mut running = job(4);
        running.request.uid = 1001;
        store.insert(running).await.unwrap().unwrap();
        store.started(4, 50_000, vec![1], 4);
        store.flush().await;

        let all = store.usage(None, None, None).unwrap();
        assert_eq!(
            all,
            vec![
                UsageTotals {
                    uid: 1000,
                    user: "alice".into(),
                    jobs: 2,
                    completed: 1,
                    gpu_ms: 2 * (10_000 + 5_000),
                },
                UsageTotals {
                    uid: 1001,
                    user: "bob".into(),
                    jobs: 1,
                    completed: 0,
                    gpu_ms: 4_000,
                },
            ]
        );
        // The period is by end time: [since, until).
        let early = store.usage(None, Some(54_000), None).unwrap();
        assert_eq!(early.iter().map(|u| u.uid).collect::<Vec<_>>(), vec![1000]);
        let late = store.usage(Some(30_001), None, None).unwrap();
        assert_eq!(late.iter().map(|u| u.uid).collect::<Vec<_>>(), vec![1001]);
        let bob = store.usage(None, None, Some(1001)).unwrap();
        assert_eq!((bob.len(), bob[0].jobs), (1, 1));
        assert!(store.usage(Some(100_000), None, None).unwrap().is_empty());
    }

    /// A database from before environments had their own table: its launch records give up
    /// their environments, which read back the same.
    #[test]
    fn environments_of_an_older_database_move_to_their_own_table() {
        let dir = tempfile::tempdir().unwrap();
        let spec = |x: &str| {
            format!(
                r#"{{"command":["true"],"cwd":"/","env":[["PATH","/bin"],["X","{x}"]],"venv":"auto"}}"#
            )
        };
        {
            let mut conn = Connection::open(dir.path().join("mgpu.db")).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &MIGRATIONS[..envs_version() - 1] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", envs_version() - 1)
                .unwrap();
            for (id, x) in [(1, "a"), (2, "a"), (3, "b")] {
                tx.execute(
                    "INSERT INTO jobs (id, uid, user, name, state, gpus, spec, submitted_at)
                     VALUES (?1, 1000, 'alice', 'old', 'PENDING', 1, ?2, 3)",
                    params![id, spec(x)],
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
        let (store, rec) = Store::open(dir.path()).unwrap();
        assert_eq!(rec.pending.len(), 3);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM envs"), 2);
        let x = |id| {
            let env = store.launch_spec(id).unwrap().env;
            assert_eq!(env[0], ("PATH".to_string(), "/bin".to_string()));
            env[1].1.clone()
        };
        assert_eq!((x(1), x(2), x(3)), ("a".into(), "a".into(), "b".into()));
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM jobs WHERE json_array_length(spec, '$.env') > 0"
            ),
            0
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("mgpu.db")).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(format!("{err:#}").contains("newer"));
    }

    #[test]
    fn corrupt_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mgpu.db"), vec![0x42u8; 8192]).unwrap();
        assert!(Store::open(dir.path()).is_err());
    }
}
