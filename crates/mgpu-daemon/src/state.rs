//! The daemon's shared state and the glue between the scheduler core and the outside world.
//!
//! [`Daemon`] owns the core behind one mutex (never held across an `.await`). Every event
//! (submit, exit, cancel, GPU usage change) mutates the core and immediately runs a scheduling
//! pass, which starts whatever the core decides: there is no polling tick.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mgpu_core::{Assignment, JobId, JobState, Millis, Requester, Scheduler};
use mgpu_proto::JobOutcome;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::broadcast;

use crate::exec::{self, Launch, LaunchSpec};
use crate::store::{Ending, Store};
use crate::users;

/// Capacity of a job's event channel; a subscriber further behind loses output (and is told).
const EVENT_CAPACITY: usize = 512;
const READ_CHUNK: usize = 64 * 1024;

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What subscribers (attached `mgpu_srun`, `mgpu_log --follow`) of a job hear.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Started {
        gpus: Vec<u32>,
    },
    /// Output bytes; `offset` is where they start in the job's log file.
    Output {
        stream: Stream,
        offset: u64,
        data: Bytes,
    },
    /// The job will not run now after all (the server is shutting down); it stays queued.
    Requeued {
        message: String,
    },
    Finished(JobOutcome),
}

/// Settings fixed at startup.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_dir: PathBuf,
    pub grace: Duration,
    /// Running as root: jobs run as their submitters.
    pub multi_user: bool,
    pub server_uid: u32,
}

struct RunningJob {
    pgid: i32,
    stopping: bool,
}

pub struct Inner {
    pub sched: Scheduler,
    /// Launch details of pending and running jobs.
    pub specs: HashMap<JobId, LaunchSpec>,
    running: HashMap<JobId, RunningJob>,
    watchers: HashMap<JobId, broadcast::Sender<JobEvent>>,
    /// Memory in use per GPU index, as the backend last reported it.
    pub gpu_used: HashMap<u32, u64>,
    pub shutting_down: bool,
}

pub struct Daemon {
    inner: Mutex<Inner>,
    pub store: Store,
    pub settings: Settings,
}

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

impl Daemon {
    pub fn new(
        sched: Scheduler,
        specs: HashMap<JobId, LaunchSpec>,
        store: Store,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Daemon {
            inner: Mutex::new(Inner {
                sched,
                specs,
                running: HashMap::new(),
                watchers: HashMap::new(),
                gpu_used: HashMap::new(),
                shutting_down: false,
            }),
            store,
            settings,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a caller may do: root (or the server's own user in single-user mode) manages all.
    pub fn requester(&self, uid: u32) -> Requester {
        Requester {
            uid,
            is_admin: uid == 0 || (!self.settings.multi_user && uid == self.settings.server_uid),
        }
    }

    pub fn log_path(&self, id: JobId) -> PathBuf {
        self.settings.log_dir.join(format!("job-{id}.log"))
    }

    /// A receiver of `id`'s events from now on.
    pub fn subscribe(&self, inner: &mut Inner, id: JobId) -> broadcast::Receiver<JobEvent> {
        inner
            .watchers
            .entry(id)
            .or_insert_with(|| broadcast::channel(EVENT_CAPACITY).0)
            .subscribe()
    }

    /// Starts everything the core says can start now.
    pub fn schedule(self: &Arc<Self>, inner: &mut Inner) {
        if inner.shutting_down {
            return;
        }
        loop {
            let starts = inner.sched.schedule(now_ms());
            if starts.is_empty() {
                break;
            }
            for a in starts {
                self.launch(inner, a);
            }
        }
    }

    fn launch(self: &Arc<Self>, inner: &mut Inner, a: Assignment) {
        let id = a.job;
        let job = inner.sched.job(id).expect("assigned job exists").clone();
        let Some(spec) = inner.specs.get(&id).cloned() else {
            self.fail_start(
                inner,
                id,
                "mgpu: internal error: launch record missing".into(),
                1,
            );
            return;
        };
        let uid = if self.settings.multi_user {
            job.request.uid
        } else {
            self.settings.server_uid
        };
        let account = match users::account(uid) {
            Ok(a) => a,
            Err(e) => {
                self.fail_start(
                    inner,
                    id,
                    format!("mgpu: cannot run as uid {uid}: {e:#}"),
                    1,
                );
                return;
            }
        };
        let mut log = match self.open_log(id) {
            Ok(f) => f,
            Err(e) => {
                self.fail_start(inner, id, format!("mgpu: cannot open the job log: {e}"), 1);
                return;
            }
        };
        let launch = Launch {
            job: id,
            name: &job.request.name,
            account: &account,
            gpus: &a.gpus,
            restarts: job.restarts,
            spec: &spec,
            switch_user: self.settings.multi_user,
        };
        match exec::start(&launch) {
            Ok(started) => {
                let pid = started.child.id().unwrap_or(0);
                tracing::info!(job = id, user = %account.name, gpus = ?a.gpus, pid, "job started");
                inner.running.insert(
                    id,
                    RunningJob {
                        pgid: pid as i32,
                        stopping: false,
                    },
                );
                self.store.started(id, now_ms(), a.gpus.clone(), pid);
                let tx = inner
                    .watchers
                    .entry(id)
                    .or_insert_with(|| broadcast::channel(EVENT_CAPACITY).0)
                    .clone();
                let _ = tx.send(JobEvent::Started { gpus: a.gpus });
                let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
                tokio::spawn(monitor(
                    self.clone(),
                    id,
                    started,
                    LogSink {
                        file: log,
                        offset,
                        tx,
                    },
                ));
            }
            Err(e) => {
                let _ = writeln!(log, "{}", e.message);
                self.fail_start(inner, id, e.message, e.code);
            }
        }
    }

    fn open_log(&self, id: JobId) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.log_path(id))
    }

    fn fail_start(&self, inner: &mut Inner, id: JobId, message: String, code: i32) {
        tracing::warn!(job = id, %message, "job failed to start");
        inner.sched.finish(id, JobState::Failed);
        if let Ok(mut log) = self.open_log(id) {
            let _ = writeln!(log, "{message}");
        }
        self.record_end(
            inner,
            JobOutcome {
                job: id,
                state: JobState::Failed,
                exit_code: Some(code),
                signal: None,
                message: Some(message),
            },
        );
    }

    /// Persists a job's end and tells its subscribers.
    pub fn record_end(&self, inner: &mut Inner, outcome: JobOutcome) {
        let id = outcome.job;
        inner.specs.remove(&id);
        inner.running.remove(&id);
        self.store.ended(
            id,
            Ending {
                state: outcome.state,
                at: now_ms(),
                exit_code: outcome.exit_code,
                signal: outcome.signal,
                message: outcome.message.clone(),
            },
        );
        if let Some(tx) = inner.watchers.remove(&id) {
            let _ = tx.send(JobEvent::Finished(outcome));
        }
    }

    /// The job's processes are gone: record how it ended and schedule what can now start.
    fn job_exited(self: &Arc<Self>, id: JobId, status: std::io::Result<std::process::ExitStatus>) {
        let mut inner = self.lock();
        let stopping = inner.running.get(&id).is_some_and(|r| r.stopping);
        let (exit_code, signal) = match &status {
            Ok(s) => (s.code(), s.signal()),
            Err(_) => (None, None),
        };
        let state = if stopping {
            JobState::Cancelled
        } else if exit_code == Some(0) {
            JobState::Completed
        } else {
            JobState::Failed
        };
        if inner.shutting_down && stopping {
            // Stopped by the shutdown, not by its owner: it goes back to the queue.
            inner.sched.finish(id, JobState::Cancelled);
            inner.running.remove(&id);
            self.store.requeued(id);
            if let Some(tx) = inner.watchers.remove(&id) {
                let _ = tx.send(JobEvent::Requeued {
                    message: format!(
                        "the mgpu server is shutting down: job {id} was stopped and requeued; it runs again when the server is back"
                    ),
                });
            }
            return;
        }
        tracing::info!(
            job = id,
            ?exit_code,
            ?signal,
            state = state.as_str(),
            "job ended"
        );
        inner.sched.finish(id, state);
        let message = status
            .err()
            .map(|e| format!("mgpu: waiting for the job failed: {e}"));
        self.record_end(
            &mut inner,
            JobOutcome {
                job: id,
                state,
                exit_code,
                signal,
                message,
            },
        );
        self.schedule(&mut inner);
    }

    /// Stops a running job: SIGTERM to its process group now, SIGKILL after the grace period.
    /// Its GPUs stay booked until its processes are gone.
    pub fn stop(self: &Arc<Self>, inner: &mut Inner, id: JobId) {
        let Some(run) = inner.running.get_mut(&id) else {
            return;
        };
        run.stopping = true;
        let pgid = run.pgid;
        tracing::info!(job = id, pgid, "stopping job (SIGTERM)");
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
        let daemon = self.clone();
        let grace = self.settings.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let inner = daemon.lock();
            // Only while the job is still ours: its group id cannot be reused before then.
            if inner.running.get(&id).is_some_and(|r| r.pgid == pgid) {
                tracing::info!(job = id, pgid, "grace period over (SIGKILL)");
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        });
    }

    /// Is `pid` part of a running job (its session)? For telling foreign GPU processes apart.
    pub fn is_job_process(&self, pid: u32) -> bool {
        let Some(sid) = session_of(pid) else {
            return false;
        };
        self.lock().running.values().any(|r| r.pgid == sid)
    }

    /// Stops every running job; they are requeued. Returns once their processes are gone (or
    /// after the grace period plus a margin).
    pub async fn shutdown(self: &Arc<Self>) {
        let ids: Vec<JobId> = {
            let mut inner = self.lock();
            inner.shutting_down = true;
            let ids: Vec<JobId> = inner.running.keys().copied().collect();
            for id in &ids {
                self.stop(&mut inner, *id);
            }
            // Attached clients of pending jobs: their jobs stay queued.
            let pending: Vec<JobId> = inner.watchers.keys().copied().collect();
            for id in pending {
                if !inner.running.contains_key(&id) {
                    if let Some(tx) = inner.watchers.remove(&id) {
                        let _ = tx.send(JobEvent::Requeued {
                            message: format!(
                                "the mgpu server is shutting down: job {id} stays queued and runs when the server is back"
                            ),
                        });
                    }
                }
            }
            ids
        };
        if !ids.is_empty() {
            tracing::info!(jobs = ids.len(), "waiting for running jobs to stop");
        }
        let deadline = tokio::time::Instant::now() + self.settings.grace + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline && !self.lock().running.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.store.flush().await;
    }
}

/// The session id of a process, from /proc.
fn session_of(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// Where a running job's output goes: its log file, then its subscribers.
struct LogSink {
    file: File,
    offset: u64,
    tx: broadcast::Sender<JobEvent>,
}

async fn pump(fd: OwnedFd, stream: Stream, sink: Arc<Mutex<LogSink>>) {
    let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = s.file.write_all(&buf[..n]) {
            tracing::warn!(error = %e, "writing a job log failed");
        }
        let offset = s.offset;
        s.offset += n as u64;
        let _ = s.tx.send(JobEvent::Output {
            stream,
            offset,
            data: Bytes::copy_from_slice(&buf[..n]),
        });
    }
}

/// Kills whatever is left of a job's process group and waits (bounded) until it is empty.
async fn reap_group(pgid: i32) {
    let pg = Pid::from_raw(pgid);
    let _ = killpg(pg, Signal::SIGKILL);
    for _ in 0..300 {
        if killpg(pg, None) == Err(nix::errno::Errno::ESRCH) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(pgid, "processes of the job's group did not go away");
}

/// Follows one run of a job until its processes are gone.
async fn monitor(daemon: Arc<Daemon>, id: JobId, started: exec::Started, sink: LogSink) {
    let exec::Started {
        mut child,
        stdout,
        stderr,
    } = started;
    let pgid = child.id().unwrap_or(0) as i32;
    let sink = Arc::new(Mutex::new(sink));
    let out = tokio::spawn(pump(stdout, Stream::Stdout, sink.clone()));
    let err = tokio::spawn(pump(stderr, Stream::Stderr, sink.clone()));
    let status = child.wait().await;
    // The job is over when its main process is: stragglers in its group die with it.
    reap_group(pgid).await;
    // Drain what is still in the pipes; a process that escaped the group could keep them open
    // forever, so this is bounded.
    let (abort_out, abort_err) = (out.abort_handle(), err.abort_handle());
    if tokio::time::timeout(Duration::from_secs(2), async {
        let _ = out.await;
        let _ = err.await;
    })
    .await
    .is_err()
    {
        tracing::warn!(
            job = id,
            "job output still open after its processes ended; closing it"
        );
        abort_out.abort();
        abort_err.abort();
    }
    daemon.job_exited(id, status);
}
