//! The durable job store: SQLite in WAL mode with synchronous commits.
//!
//! One writer thread owns the write connection and applies operations in the order they were
//! sent. It drains whatever is queued into one transaction (group commit), so concurrent submits
//! share an fsync. A submit waits for its commit before the client hears its id.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

use anyhow::{bail, Context, Result};
use mgpu_core::{JobId, JobRequest, JobState, Millis};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::exec::LaunchSpec;

/// Schema migrations; entry `i` brings `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
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
"#];

/// A job as first recorded.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub request: JobRequest,
    pub spec: LaunchSpec,
    pub submitted_at: Millis,
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
    Started {
        id: JobId,
        at: Millis,
        gpus: Vec<u32>,
        pid: u32,
    },
    Ended(JobId, Ending),
    Requeued {
        id: JobId,
    },
    Flush(oneshot::Sender<()>),
}

/// What the store held at startup.
#[derive(Debug, Default)]
pub struct Recovered {
    pub next_job_id: JobId,
    /// Pending jobs in queue (id) order.
    pub pending: Vec<(JobId, JobRequest, LaunchSpec, Millis, u32)>,
    /// Jobs recorded as running by a daemon that died; their outcome is unknown.
    pub interrupted: Vec<JobId>,
}

/// The owner and state of a recorded job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSummary {
    pub uid: u32,
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: Option<String>,
}

pub struct Store {
    ops: Mutex<mpsc::Sender<Op>>,
    reader: Mutex<Connection>,
    pub path: PathBuf,
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
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `dir` and reads what must be recovered.
    pub fn open(dir: &Path) -> Result<(Store, Recovered)> {
        let path = dir.join("mgpu.db");
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
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("mgpu-store".into())
            .spawn(move || writer(conn, rx))
            .context("starting the store thread")?;
        Ok((
            Store {
                ops: Mutex::new(tx),
                reader: Mutex::new(reader),
                path,
            },
            recovered,
        ))
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

    pub fn started(&self, id: JobId, at: Millis, gpus: Vec<u32>, pid: u32) {
        self.send(Op::Started { id, at, gpus, pid });
    }

    pub fn ended(&self, id: JobId, ending: Ending) {
        self.send(Op::Ended(id, ending));
    }

    /// The job goes back to PENDING (it will run again), e.g. when the server shuts down.
    pub fn requeued(&self, id: JobId) {
        self.send(Op::Requeued { id });
    }

    /// Waits until everything sent so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Flush(tx));
        let _ = rx.await;
    }

    /// Owner and outcome of a recorded job.
    pub fn summary(&self, id: JobId) -> Result<Option<JobSummary>> {
        let conn = self.reader.lock().unwrap();
        let row = conn
            .query_row(
                "SELECT uid, state, exit_code, signal, message FROM jobs WHERE id = ?1",
                [id as i64],
                |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<i32>>(2)?,
                        r.get::<_, Option<i32>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                    ))
                },
            )
            .optional()?;
        Ok(
            row.map(|(uid, state, exit_code, signal, message)| JobSummary {
                uid,
                state: JobState::parse(&state).unwrap_or(JobState::Failed),
                exit_code,
                signal,
                message,
            }),
        )
    }
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
    let mut pending = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT id, uid, user, name, gpus, mem_mib, time_limit_s, spec, submitted_at, restarts
         FROM jobs WHERE state = 'PENDING' ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)? as JobId,
            JobRequest {
                uid: r.get(1)?,
                user: r.get(2)?,
                name: r.get(3)?,
                gpus: r.get(4)?,
                mem_mib: r.get::<_, Option<i64>>(5)?.map(|m| m as u64),
                time_limit_s: r.get::<_, Option<i64>>(6)?.map(|t| t as u64),
                nice: 0,
            },
            r.get::<_, String>(7)?,
            r.get::<_, i64>(8)? as Millis,
            r.get::<_, u32>(9)?,
        ))
    })?;
    for row in rows {
        let (id, request, spec, submitted_at, restarts) = row?;
        let spec: LaunchSpec = serde_json::from_str(&spec)
            .with_context(|| format!("job {id} has an unreadable launch record"))?;
        pending.push((id, request, spec, submitted_at, restarts));
    }
    let interrupted = conn
        .prepare("SELECT id FROM jobs WHERE state = 'RUNNING' ORDER BY id")?
        .query_map([], |r| r.get::<_, i64>(0))?
        .map(|r| r.map(|id| id as JobId))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Recovered {
        next_job_id,
        pending,
        interrupted,
    })
}

fn writer(mut conn: Connection, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 4096 {
                break;
            }
        }
        let result = apply(&mut conn, &batch).map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing the job database failed");
        }
        for op in batch {
            match op {
                Op::Insert(_, done) => {
                    let _ = done.send(result.clone());
                }
                Op::Flush(done) => {
                    let _ = done.send(());
                }
                _ => {}
            }
        }
    }
}

fn apply(conn: &mut Connection, batch: &[Op]) -> Result<()> {
    let tx = conn.transaction()?;
    for op in batch {
        match op {
            Op::Insert(job, _) => {
                let r = &job.request;
                tx.prepare_cached(
                    "INSERT INTO jobs (id, uid, user, name, state, gpus, mem_mib, time_limit_s,
                                       spec, submitted_at)
                     VALUES (?1, ?2, ?3, ?4, 'PENDING', ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(params![
                    job.id as i64,
                    r.uid,
                    r.user,
                    r.name,
                    r.gpus,
                    r.mem_mib.map(|m| m as i64),
                    r.time_limit_s.map(|t| t as i64),
                    serde_json::to_string(&job.spec)?,
                    job.submitted_at as i64,
                ])?;
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
                tx.prepare_cached(
                    "UPDATE jobs SET state = ?2, ended_at = ?3, exit_code = ?4, signal = ?5,
                                     message = ?6
                     WHERE id = ?1",
                )?
                .execute(params![
                    *id as i64,
                    e.state.as_str(),
                    e.at as i64,
                    e.exit_code,
                    e.signal,
                    e.message
                ])?;
            }
            Op::Requeued { id } => {
                tx.prepare_cached(
                    "UPDATE jobs SET state = 'PENDING', started_at = NULL, gpu_ids = NULL,
                                     pid = NULL, restarts = restarts + 1
                     WHERE id = ?1",
                )?
                .execute(params![*id as i64])?;
            }
            Op::Flush(_) => {}
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
            id,
            request: JobRequest {
                uid: 1000,
                user: "alice".into(),
                name: "n".into(),
                gpus: 1,
                mem_mib: Some(100),
                time_limit_s: None,
                nice: 0,
            },
            spec: LaunchSpec {
                command: vec!["true".into()],
                cwd: "/".into(),
                env: vec![],
                venv: Venv::Off,
            },
            submitted_at: 5,
        }
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
        assert_eq!(rec.pending[0].0, 2);
        assert_eq!(rec.interrupted, vec![1]);
        assert_eq!(
            store.summary(3).unwrap().unwrap().state,
            JobState::Cancelled
        );
        assert_eq!(store.summary(9).unwrap(), None);
    }

    #[test]
    fn corrupt_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mgpu.db"), vec![0x42u8; 8192]).unwrap();
        assert!(Store::open(dir.path()).is_err());
    }
}
