//! The daemon's shared state and the glue between the scheduler core and the outside world.
//!
//! [`Daemon`] owns the core behind one mutex (never held across an `.await`). Every event
//! (submit, exit, cancel, GPU usage change) mutates the core and immediately runs a scheduling
//! pass, which starts whatever the core decides: there is no polling tick.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use mgpu_core::{Assignment, JobId, JobState, Millis, Requester, Scheduler, Stopping, TimeAction};
use mgpu_proto::{Frame, FrameCodec, JobOutcome};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};
use tokio_util::codec::Framed;

use crate::exec::{Launch, LaunchSpec};
use crate::handlers::queue::ShownCommand;
use crate::launcher::Launcher;
use crate::store::{Ending, Store};
use crate::supervisor::{self, ExitRecord, StopReason, SupervisorCmd, SupervisorMsg};

/// How long after a stop's grace period the daemon kills a job that is still there itself.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Capacity of a job's event channel (events are small: output stays in the log file); a
/// subscriber further behind reads what it missed from the log.
const EVENT_CAPACITY: usize = 512;
/// Longest wait between attempts to reach a live supervisor whose link broke.
const RELINK_MAX_WAIT: Duration = Duration::from_secs(2);
/// How long a command to a supervisor may take to send before the link counts as broken.
const LINK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
        log_offset: u64,
    },
    /// `len` bytes of output, in the job's log file from `offset` (read from there: events
    /// hold no output, so a subscriber that does not read costs the server nothing).
    Output {
        stream: Stream,
        offset: u64,
        len: u64,
    },
    /// The job will not run now after all (the server is shutting down); it stays queued.
    Requeued {
        message: String,
    },
    /// A note for the job's attached `mgpu_srun` (e.g. over its GPU memory reservation).
    Notice {
        message: String,
    },
    Finished(JobOutcome),
}

/// Settings fixed at startup.
#[derive(Debug, Clone)]
pub struct Settings {
    pub log_dir: PathBuf,
    /// Run directories of running jobs (under the state directory).
    pub runs_dir: PathBuf,
    pub grace: Duration,
    /// Output kept per job (all its runs).
    pub max_log_bytes: Option<u64>,
    /// Running as root: jobs run as their submitters.
    pub multi_user: bool,
    pub server_uid: u32,
    /// Most jobs one user may have waiting, and most waiting in all: a bound on the daemon's
    /// memory and the store, whatever clients send.
    pub max_pending_per_user: usize,
    pub max_pending: usize,
    /// Per-job cgroup limits: the server's defaults and caps.
    pub job_limits: crate::cgroup::LimitSettings,
    /// Log bytes kept per user and in all (see [`crate::logquota`]).
    pub log_quota_per_user: Option<u64>,
    pub log_quota: Option<u64>,
    /// Launch records (argv, environment) of one user's unfinished jobs, at most.
    pub max_launch_data_per_user: Option<u64>,
    /// ... and all users' together.
    pub max_launch_data: Option<u64>,
    /// Where `limits.conf` and `limits.d` are (`/etc/security`): jobs get a login's limits.
    pub limits_conf_dir: PathBuf,
}

struct RunningJob {
    /// The job's process group, once its supervisor said hello (0 before).
    pgid: i32,
    /// Its cgroup directories, once its supervisor said hello (empty: none, or not yet).
    cgroups: Vec<std::path::PathBuf>,
    stopping: Option<StopReason>,
    /// Commands to its supervisor (few per run, so unbounded: a stop is never dropped).
    cmds: mpsc::UnboundedSender<SupervisorCmd>,
}

/// What an administrator took out of service, with the reasons given (`mgpu_control drain`).
#[derive(Debug, Clone, Default)]
pub struct Drains {
    pub server: Option<String>,
    pub gpus: std::collections::BTreeMap<u32, String>,
}

pub struct Inner {
    pub sched: Scheduler,
    /// Drained GPUs and server (the core knows them too; this keeps the reasons).
    pub drains: Drains,
    /// Launch details of pending and running jobs.
    /// Commands of pending and running jobs, as shown (cut after 1 KiB). The full launch
    /// record (argv, environment...) stays in the store until the job starts: a long queue
    /// costs little memory.
    pub commands: HashMap<JobId, ShownCommand>,
    running: HashMap<JobId, RunningJob>,
    watchers: HashMap<JobId, broadcast::Sender<JobEvent>>,
    /// Memory in use per GPU index, as the backend last reported it.
    pub gpu_used: HashMap<u32, u64>,
    /// The latest reading of each GPU (utilisation, foreign processes), where NVML reads it.
    pub gpu_readings: HashMap<u32, crate::gpu::Usage>,
    /// Per job: the most GPU memory it used on one GPU (all its runs), and how much of that
    /// is on record in the store.
    pub gpu_peaks: HashMap<JobId, (u64, u64)>,
    pub shutting_down: bool,
    /// Jobs an `mgpu_srun` re-attached to since this server started.
    pub reattached: std::collections::HashSet<JobId>,
    /// When the timer must wake next (the core's next time-limit deadline).
    deadline: Option<Millis>,
    /// The next job id to hand out (ids are taken before a job is durable and queued).
    next_job_id: JobId,
    /// New jobs per user that have ids but are not queued yet (being recorded): they count
    /// against the queue limits like waiting ones.
    admitting: HashMap<u32, usize>,
    /// The per-user and per-group limits of the configuration (replaced on reload).
    pub limits: Arc<crate::config::LimitRules>,
    /// The stdin of attached jobs not started yet: the read end of a pipe the daemon made,
    /// whose write end went to their `mgpu_srun` (closing it never blocks); handed to the
    /// first run's supervisor.
    pub stdin: HashMap<JobId, (OwnedFd, Option<[u16; 2]>)>,
}

impl Inner {
    /// Jobs whose runs have a supervisor (or are starting one).
    pub fn running_jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.running.keys().copied()
    }

    /// Why a running job is being stopped by the daemon, if it is.
    pub fn stop_reason(&self, id: JobId) -> Option<StopReason> {
        self.running.get(&id)?.stopping
    }

    /// Takes `n` consecutive ids for new jobs of `uid`, if the queue limits leave room for
    /// them; until [`Inner::admitted`], they count as waiting.
    pub fn admit(&mut self, settings: &Settings, uid: u32, n: usize) -> Result<JobId, String> {
        let mine =
            self.sched.pending_count_of(uid) + self.admitting.get(&uid).copied().unwrap_or(0);
        if mine + n > settings.max_pending_per_user {
            return Err(format!(
                "you have {mine} jobs waiting; at most {} may wait per user (the server's \
                 --max-pending-per-user)",
                settings.max_pending_per_user
            ));
        }
        let all = self.sched.pending_count() + self.admitting.values().sum::<usize>();
        if all + n > settings.max_pending {
            return Err(format!(
                "the queue is full: {all} jobs are waiting, at most {} may (the server's \
                 --max-pending); try again later",
                settings.max_pending
            ));
        }
        *self.admitting.entry(uid).or_default() += n;
        let first = self.take_job_id();
        self.next_job_id = first + n as JobId;
        Ok(first)
    }

    /// Jobs of `uid` waiting, or being admitted.
    pub fn waiting_of(&self, uid: u32) -> usize {
        self.sched.pending_count_of(uid) + self.admitting.get(&uid).copied().unwrap_or(0)
    }

    /// `n` jobs taken by [`Inner::admit`] are queued, or were given up.
    pub fn admitted(&mut self, uid: u32, n: usize) {
        if let Some(c) = self.admitting.get_mut(&uid) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.admitting.remove(&uid);
            }
        }
    }

    /// A fresh job id: unique, increasing, never reused.
    fn take_job_id(&mut self) -> JobId {
        let id = self.next_job_id.max(self.sched.next_job_id());
        self.next_job_id = id + 1;
        id
    }
}

pub struct Daemon {
    inner: Mutex<Inner>,
    /// Re-arms [`Daemon::run_timer`] when the next deadline changes.
    timer: tokio::sync::Notify,
    pub store: Store,
    pub settings: Settings,
    /// Forks the supervisors of new runs.
    pub launcher: Launcher,
    /// The books of job logs on disk (locked after `inner`, never before it).
    pub logs: Mutex<crate::logquota::LogBook>,
    /// What each user's unfinished jobs' launch records take in the store.
    pub launches: Mutex<crate::logquota::LaunchBook>,
    /// Figures for the metrics endpoint (kept whether or not it is served).
    pub metrics: crate::metrics::Metrics,
    /// Runs `--notify` commands and sends `--mail-type` mail (see [`crate::notify`]).
    pub notifier: crate::notify::Notifier,
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
        commands: HashMap<JobId, ShownCommand>,
        store: Store,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Daemon {
            timer: tokio::sync::Notify::new(),
            inner: Mutex::new(Inner {
                sched,
                drains: Drains::default(),
                commands,
                running: HashMap::new(),
                watchers: HashMap::new(),
                gpu_used: HashMap::new(),
                gpu_readings: HashMap::new(),
                gpu_peaks: HashMap::new(),
                shutting_down: false,
                reattached: Default::default(),
                deadline: None,
                next_job_id: 1,
                admitting: HashMap::new(),
                limits: Default::default(),
                stdin: HashMap::new(),
            }),
            logs: Mutex::new(crate::logquota::LogBook::new(crate::logquota::Quotas {
                per_job: settings.max_log_bytes,
                per_user: settings.log_quota_per_user,
                total: settings.log_quota,
            })),
            launches: Mutex::new(crate::logquota::LaunchBook::new(
                settings.max_launch_data_per_user,
                settings.max_launch_data,
            )),
            metrics: crate::metrics::Metrics::new(&store.stats),
            store,
            notifier: Default::default(),
            settings,
            launcher: Launcher::default(),
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
        let event = std::time::Instant::now();
        loop {
            let starts = inner.sched.schedule(now_ms());
            if starts.is_empty() {
                break;
            }
            for a in starts {
                self.launch(inner, a, event);
            }
        }
        self.enforce_time_limits(inner);
    }

    /// Carries out the core's time-limit decisions and re-arms the one timer for the next.
    fn enforce_time_limits(self: &Arc<Self>, inner: &mut Inner) {
        let now = now_ms();
        for action in inner.sched.time_actions(now) {
            match action {
                TimeAction::Warn { job, signal } => {
                    tracing::info!(job, signal, "sending the time-limit warning signal");
                    if let Some(run) = inner.running.get(&job) {
                        let _ = run.cmds.send(SupervisorCmd::Signal { signal });
                    }
                }
                TimeAction::Requeue { job } => {
                    tracing::info!(job, "time slice over and others wait: context switch");
                    self.stop(inner, job, StopReason::Requeue);
                }
                TimeAction::Timeout { job } => {
                    tracing::info!(job, "time limit reached");
                    self.stop(inner, job, StopReason::Timeout);
                }
            }
        }
        let next = inner.sched.next_deadline(now);
        if next != inner.deadline {
            inner.deadline = next;
            self.timer.notify_one();
        }
    }

    /// Wakes up at the next time-limit deadline (and only then): no polling tick.
    pub async fn run_timer(self: Arc<Self>) {
        loop {
            let deadline = self.lock().deadline;
            let wait = deadline.map(|d| Duration::from_millis(d.saturating_sub(now_ms())));
            tokio::select! {
                _ = self.timer.notified() => continue,
                _ = async {
                    match wait {
                        Some(w) => tokio::time::sleep(w).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let mut inner = self.lock();
                    inner.deadline = None;
                    self.schedule(&mut inner);
                }
            }
        }
    }

    fn launch(self: &Arc<Self>, inner: &mut Inner, a: Assignment, event: std::time::Instant) {
        let id = a.job;
        let job = inner.sched.job(id).expect("assigned job exists").clone();
        self.metrics.run_decided(job.submitted_at, event);
        let uid = if self.settings.multi_user {
            job.request.uid
        } else {
            self.settings.server_uid
        };
        let launch = Launch {
            job: id,
            name: job.request.name.clone(),
            uid,
            account: None,
            gpus: a.gpus.clone(),
            restarts: job.restarts,
            started_at: job.started_at.unwrap_or_else(now_ms),
            // Read from the store off the lock, just before the run.
            spec: LaunchSpec::default(),
            switch_user: self.settings.multi_user,
            log_path: self.log_path(id),
            max_log_bytes: self.settings.max_log_bytes,
            log_note: String::new(),
            launch_id: new_launch_id(),
            stdin: false,
            pty: None,
            array: job.request.array,
            pids_max: self.settings.job_limits.pids_max,
            user_pids_max: self.settings.job_limits.user_pids_max,
            rlimits: Vec::new(),
            mem_mib: job.request.mem_mib,
            gpu_total_mib: inner
                .sched
                .gpus()
                .iter()
                .filter(|g| a.gpus.contains(&g.spec.index))
                .map(|g| g.spec.total_mib)
                .max(),
        };
        // Registered now, so that a cancel arriving while the supervisor starts is queued for
        // it rather than lost.
        let cmd_rx = register_run(inner, id);
        let (stdin, pty) = match inner.stdin.remove(&id) {
            Some((fd, pty)) => (Some(fd), pty),
            None => (None, None),
        };
        let launch = Launch {
            stdin: stdin.is_some(),
            pty,
            ..launch
        };
        tokio::spawn(start_run(self.clone(), launch, cmd_rx, event, stdin));
    }

    /// Re-adopts run `run` of a job whose supervisor outlived the previous daemon.
    pub fn adopt(self: &Arc<Self>, inner: &mut Inner, id: JobId, run: u32) {
        let cmd_rx = register_run(inner, id);
        tokio::spawn(supervise_link(self.clone(), id, run, None, cmd_rx));
    }

    /// The directory of all runs of a job.
    pub fn job_dir(&self, id: JobId) -> PathBuf {
        self.settings.runs_dir.join(id.to_string())
    }

    /// The directory of one run of a job: each run has its own, so cleaning up after one run
    /// never touches the next.
    pub fn run_dir(&self, id: JobId, run: u32) -> PathBuf {
        self.job_dir(id).join(format!("r{run}"))
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
        tracing::warn!(job = id, ?message, "job failed to start");
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

    /// Tells a running job's attached `mgpu_srun` something (one line).
    pub fn notify(&self, inner: &Inner, id: JobId, message: String) {
        if let Some(tx) = inner.watchers.get(&id) {
            let _ = tx.send(JobEvent::Notice { message });
        }
    }

    /// Persists a job's end and tells its subscribers.
    pub fn record_end(&self, inner: &mut Inner, outcome: JobOutcome) {
        let id = outcome.job;
        self.metrics.job_ended(outcome.state);
        inner.commands.remove(&id);
        inner.stdin.remove(&id);
        inner.running.remove(&id);
        self.logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finished(id, now_ms());
        (self.launches.lock().unwrap_or_else(|p| p.into_inner())).release(id);
        if let Some((peak, _)) = inner.gpu_peaks.remove(&id) {
            self.store.gpu_peak(id, peak);
        }
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
        self.notifier.ended(&outcome);
        if let Some(tx) = inner.watchers.remove(&id) {
            let _ = tx.send(JobEvent::Finished(outcome));
        }
    }

    /// Counts a running job's run that ends now in the metrics (its GPU time).
    fn count_run(&self, inner: &Inner, id: JobId, switched: bool) {
        if let Some(job) = inner.sched.job(id).filter(|j| j.state == JobState::Running) {
            let ms = crate::metrics::run_ms(job.started_at, now_ms());
            self.metrics
                .run_ended(&job.request.user, job.gpus.len(), ms, switched);
        }
    }

    /// The job's processes are gone: record how it ended and schedule what can now start.
    fn job_exited(self: &Arc<Self>, id: JobId, run: u32, rec: ExitRecord) {
        let mut inner = self.lock();
        if inner
            .sched
            .job(id)
            .is_none_or(|j| j.state != JobState::Running)
        {
            return;
        }
        // The supervisor's record says whether a stop took effect (a job that exited by itself
        // while a stop was on its way ended naturally). Only a cancel that arrived during a
        // switch or timeout overrides the reason the supervisor acted on.
        let mut rec = rec;
        if rec.stopped.is_some()
            && inner.sched.job(id).and_then(|j| j.stopping) == Some(Stopping::Cancel)
        {
            rec.stopped = Some(StopReason::Cancel);
        }
        let switched = rec.stopped == Some(StopReason::Requeue) && rec.start_error.is_none();
        self.count_run(&inner, id, switched);
        if switched {
            inner.sched.requeue(id, now_ms());
            let position = inner.sched.queue_position(id).unwrap_or(0);
            tracing::info!(job = id, position, "job context-switched and requeued");
            inner.running.remove(&id);
            let min_key = inner.sched.queue_floor(id);
            self.store.requeued(id, now_ms(), run + 1, min_key);
            if let Some(tx) = inner.watchers.get(&id) {
                let _ = tx.send(JobEvent::Requeued {
                    message: format!(
                        "job {id} reached its time slice while others waited: it was preempted and requeued (position {position}); it runs again from its command with MGPU_RESTART_COUNT set"
                    ),
                });
            }
        } else {
            let outcome = outcome_of(id, &rec);
            tracing::info!(job = id, exit_code = ?rec.exit_code, signal = ?rec.signal, state = outcome.state.as_str(), "job ended");
            inner.sched.finish(id, outcome.state);
            self.record_end(&mut inner, outcome);
        }
        // Its run directory goes before anything is scheduled (the next run has its own).
        self.forget_run_dir(id, run);
        self.schedule(&mut inner);
    }

    /// The supervisor vanished without recording an exit (killed, or the machine rebooted):
    /// whatever is left of the job is killed before its GPUs are given back.
    fn job_lost(self: &Arc<Self>, id: JobId, run: u32) {
        let run_dir = self.run_dir(id, run);
        let inner = self.lock();
        let pgid = inner.running.get(&id).map_or(0, |r| r.pgid);
        let Some(uid) = inner
            .sched
            .job(id)
            .filter(|j| j.state == JobState::Running)
            .map(|j| j.request.uid)
        else {
            return;
        };
        drop(inner);
        // Its cgroup, if it had one, holds everything; else its group, if still its own.
        supervisor::kill_job_remains(&run_dir, pgid, uid);
        let mut inner = self.lock();
        self.count_run(&inner, id, false);
        if inner.sched.finish(id, JobState::Failed).is_none() {
            return;
        }
        tracing::warn!(
            job = id,
            "the job's supervisor is gone without an exit record"
        );
        self.record_end(
            &mut inner,
            JobOutcome {
                job: id,
                state: JobState::Failed,
                exit_code: None,
                signal: None,
                message: Some("mgpu: the job's supervisor died; its outcome is unknown".into()),
            },
        );
        self.forget_run_dir(id, run);
        self.schedule(&mut inner);
    }

    /// Removes a finished run's directory once its end is committed to the store (by the
    /// store's thread, right after that commit).
    pub fn forget_run_dir(&self, id: JobId, run: u32) {
        let (run_dir, job_dir) = (self.run_dir(id, run), self.job_dir(id));
        self.store.after_commit(move || {
            let _ = std::fs::remove_dir_all(run_dir);
            // Only succeeds once no run is left (a next run recreates it; see spawn_supervisor).
            let _ = std::fs::remove_dir(job_dir);
        });
    }

    fn job_output(self: &Arc<Self>, id: JobId, stream: Stream, offset: u64, len: u64) {
        let inner = self.lock();
        for (job, note) in self.log_grew(id, offset + len) {
            if let Some(run) = inner.running.get(&job) {
                let _ = run.cmds.send(SupervisorCmd::StopLog { note });
            }
        }
        if let Some(tx) = inner.watchers.get(&id) {
            let _ = tx.send(JobEvent::Output {
                stream,
                offset,
                len,
            });
        }
    }

    /// The stop under way for a running job, as a command to (re)send its supervisor.
    fn stop_command(&self, id: JobId) -> Option<SupervisorCmd> {
        let reason = self.lock().running.get(&id)?.stopping?;
        Some(SupervisorCmd::Stop {
            grace_ms: self.settings.grace.as_millis() as u64,
            reason,
        })
    }

    /// What a supervisor's hello tells: the job's process group, and (from the run directory)
    /// its cgroups.
    fn set_members(&self, id: JobId, pgid: i32, cgroups: Vec<std::path::PathBuf>) {
        if let Some(r) = self.lock().running.get_mut(&id) {
            r.pgid = pgid;
            r.cgroups = cgroups;
        }
    }

    /// Stops a running job: its supervisor sends SIGTERM to all its processes now and SIGKILL
    /// after the grace period. Its GPUs stay booked until its processes are gone.
    pub fn stop(self: &Arc<Self>, inner: &mut Inner, id: JobId, reason: StopReason) {
        let Some(run) = inner.running.get_mut(&id) else {
            return;
        };
        match run.stopping {
            // Already stopping for this reason, or for a cancel (which nothing overrides).
            Some(r) if r == reason || r == StopReason::Cancel => return,
            // A cancel during a context switch: the supervisor only updates the reason.
            Some(_) if reason != StopReason::Cancel => return,
            _ => {}
        }
        run.stopping = Some(reason);
        tracing::info!(job = id, ?reason, "stopping job");
        let cmd = SupervisorCmd::Stop {
            grace_ms: self.settings.grace.as_millis() as u64,
            reason,
        };
        if run.cmds.send(cmd).is_err() {
            tracing::warn!(job = id, "cannot reach the job's supervisor to stop it");
        }
        // The last resort, should the supervisor not end the job in time.
        if let (Some(run), Ok(rt)) = (
            inner.sched.job(id).map(|j| j.restarts),
            tokio::runtime::Handle::try_current(),
        ) {
            let (daemon, after) = (self.clone(), self.settings.grace + STOP_MARGIN);
            rt.spawn(async move {
                tokio::time::sleep(after).await;
                daemon.stop_overdue(id, run);
            });
        }
    }

    /// A stop's deadline passed and run `run` of the job still holds its GPUs (its supervisor
    /// is stuck, or lost its way): the daemon kills the run's cgroups and process group itself.
    fn stop_overdue(self: &Arc<Self>, id: JobId, run: u32) {
        let (pgid, uid) = {
            let inner = self.lock();
            match (inner.running.get(&id), inner.sched.job(id)) {
                (Some(r), Some(j)) if j.restarts == run => (r.pgid, j.request.uid),
                _ => return,
            }
        };
        tracing::warn!(job = id, "the job outlived its stop deadline: killing it");
        // Not by its group id alone: the job's leader may be gone and its pid someone else's
        // by now (its supervisor collects it before it reports the end).
        let run_dir = self.run_dir(id, run);
        tokio::task::spawn_blocking(move || supervisor::kill_job_remains(&run_dir, pgid, uid));
    }

    /// The running jobs' processes, for telling foreign GPU processes apart.
    pub fn job_processes(&self) -> crate::gpu::JobProcesses {
        let jobs: Vec<crate::gpu::RunningJob> = self
            .lock()
            .running
            .iter()
            .map(|(id, r)| crate::gpu::RunningJob {
                job: *id,
                leader: r.pgid,
                cgroups: r.cgroups.clone(),
            })
            .collect();
        crate::gpu::JobProcesses::of(jobs)
    }

    /// Stops serving. Running jobs keep running under their supervisors and are re-adopted by
    /// the next server; queued jobs stay queued in the store.
    pub async fn shutdown(self: &Arc<Self>) {
        {
            let mut inner = self.lock();
            inner.shutting_down = true;
            // Attached clients hear the connection close and reconnect to the next server.
            inner.watchers.clear();
        }
        self.store.flush().await;
    }
}

/// The user-visible outcome of a run.
pub fn outcome_of(id: JobId, rec: &ExitRecord) -> JobOutcome {
    let state = if rec.start_error.is_some() {
        JobState::Failed
    } else if rec.stopped == Some(StopReason::Cancel) {
        JobState::Cancelled
    } else if let Some(StopReason::GpuMemory { .. }) = rec.stopped {
        JobState::OutOfMemory
    } else if rec.oom_killed {
        JobState::OutOfMemory
    } else if rec.stopped == Some(StopReason::Timeout) {
        JobState::Timeout
    } else if rec.exit_code == Some(0) {
        JobState::Completed
    } else {
        JobState::Failed
    };
    JobOutcome {
        job: id,
        state,
        exit_code: rec.exit_code,
        signal: rec.signal,
        message: rec.start_error.clone().or_else(|| match rec.stopped {
            Some(r @ StopReason::GpuMemory { .. }) if state == JobState::OutOfMemory => {
                r.gpu_memory_note()
            }
            _ => None,
        }),
    }
}

/// A fresh id for an attempt at starting a run: unique within this server (a counter) and
/// across servers (it starts at the time this one started, in nanoseconds).
fn new_launch_id() -> u64 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        std::sync::atomic::AtomicU64::new(now.max(1))
    });
    next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Marks the start of a run after the first in the job's log (every run's output is kept);
/// returns where this run's output begins.
fn mark_run(launch: &Launch) -> anyhow::Result<u64> {
    let first_run = launch.restarts == 0;
    // A first run starts a fresh log: anything there is stale (e.g. from a previous database
    // whose ids were reused) and must not be shown to this job's owner.
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&launch.log_path)?;
    if first_run {
        log.set_len(0)?;
    }
    if launch.restarts > 0 {
        writeln!(
            log,
            "==> mgpu: job {}, run {} (after {} context switch{}) <==",
            launch.job,
            launch.restarts,
            launch.restarts,
            if launch.restarts == 1 { "" } else { "es" }
        )?;
    }
    Ok(log.metadata()?.len())
}

/// Prepares the run directory (with the launch record) and starts the job's supervisor in
/// its own session, with one end of a socket pair as its stdin: the link exists before the job
/// starts, so no output is missed. The supervisor is forked by the launcher (see
/// [`crate::launcher`]), or, when that fails, started as this binary in `--supervise` mode.
/// Returns its pid and our end of the link.
fn spawn_supervisor(
    launcher: &Launcher,
    job_dir: &Path,
    run_dir: &Path,
    launch: &Launch,
) -> anyhow::Result<(u32, std::os::unix::net::UnixStream)> {
    use anyhow::Context;
    // A leftover of this very run cannot be live (a run is started once); clear it.
    let _ = std::fs::remove_dir_all(run_dir);
    // The job directory may be removed under us, as the previous run is cleaned up: then it is
    // made again.
    let mut tries = 0;
    loop {
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(job_dir) {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                return Err(e).with_context(|| format!("creating {}", job_dir.display()));
            }
        }
        match std::fs::DirBuilder::new().mode(0o700).create(run_dir) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
            Err(e) => return Err(e).with_context(|| format!("creating {}", run_dir.display())),
        }
    }
    // Written before the job starts: after a daemon crash the run directory is the proof that
    // the job was started, so it is never started twice. (No fsync: a daemon crash keeps the
    // page cache; an OS crash kills the job too, and then running it again is the right thing.)
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(run_dir.join(supervisor::LAUNCH_FILE))
        .context("writing launch.json")?;
    f.write_all(&serde_json::to_vec(launch)?)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("socketpair")?;
    let pid = match launcher.spawn_supervisor(run_dir, launch.launch_id, theirs.as_fd()) {
        Ok(pid) => pid,
        Err(e) => {
            tracing::warn!(job = launch.job, error = %e, "the launcher cannot start supervisors; starting one directly");
            exec_supervisor(run_dir, launch.launch_id, theirs)?
        }
    };
    Ok((pid, ours))
}

/// Starts a supervisor by exec'ing this binary in `--supervise` mode (the fallback when the
/// launcher is unavailable; slower by the cost of an exec).
fn exec_supervisor(
    run_dir: &Path,
    launch_id: u64,
    link: std::os::unix::net::UnixStream,
) -> anyhow::Result<u32> {
    use anyhow::Context;
    let mut cmd = crate::launcher::helper_command(OwnedFd::from(link));
    cmd.arg("--supervise")
        .arg(run_dir)
        .arg("--launch-id")
        .arg(launch_id.to_string());
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .context("spawning the supervisor")?;
    let pid = child.id().unwrap_or(0);
    // Reap it when it ends (a re-adopted supervisor is init's child instead).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(pid)
}

/// Books a running job's entry; returns where commands for its supervisor arrive.
fn register_run(inner: &mut Inner, id: JobId) -> mpsc::UnboundedReceiver<SupervisorCmd> {
    let (cmds, rx) = mpsc::unbounded_channel();
    inner.running.insert(
        id,
        RunningJob {
            pgid: 0,
            cgroups: Vec::new(),
            stopping: None,
            cmds,
        },
    );
    rx
}

/// Starts a run's supervisor off the scheduling path (its durable launch record and the fork
/// take a few milliseconds, which must not hold the daemon's lock), then follows it.
async fn start_run(
    daemon: Arc<Daemon>,
    launch: Launch,
    cmds: mpsc::UnboundedReceiver<SupervisorCmd>,
    event: std::time::Instant,
    stdin: Option<OwnedFd>,
) {
    let id = launch.job;
    let run = launch.restarts;
    let started_at = launch.started_at;
    let gpus = launch.gpus.clone();
    let (job_dir, run_dir) = (daemon.job_dir(id), daemon.run_dir(id, run));
    let store_daemon = daemon.clone();
    let spawned = tokio::task::spawn_blocking(move || {
        let store_spec = store_daemon.store.launch_spec(id);
        let mut launch = launch;
        launch.spec = store_spec?;
        // The account is resolved here, off the daemon's lock, in the process whose user
        // database modules are already loaded; the supervisor forks the job with it.
        launch.account = crate::users::account(launch.uid).ok();
        let settings = &store_daemon.settings;
        let (multi, dir) = (settings.multi_user, &settings.limits_conf_dir);
        launch.rlimits = crate::userlimits::for_run(multi, dir, launch.account.as_ref());
        let log_offset = mark_run(&launch)?;
        store_daemon.log_run_starts(&mut launch, log_offset);
        let (pid, link) = spawn_supervisor(&store_daemon.launcher, &job_dir, &run_dir, &launch)?;
        if let Some(fd) = stdin {
            // The first thing on the link, before any frame: the supervisor takes it before
            // it starts the job (see `supervisor::take_stdin`). Our own pipe's read end.
            supervisor::give_stdin(&link, &fd);
        }
        anyhow::Ok((pid, link, log_offset))
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    match spawned {
        Ok((pid, link, log_offset)) => {
            daemon.metrics.run_launched(event);
            if let Some(tx) = daemon.lock().watchers.get(&id) {
                let _ = tx.send(JobEvent::Started {
                    gpus: gpus.clone(),
                    log_offset,
                });
            }
            tracing::info!(job = id, gpus = ?gpus, supervisor = pid, "job started");
            if run == 0 {
                daemon.notifier.began(id);
            }
            daemon.store.started(id, started_at, gpus, pid);
            supervise_link(daemon, id, run, Some(link), cmds).await;
        }
        Err(e) => {
            let mut inner = daemon.lock();
            daemon.fail_start(
                &mut inner,
                id,
                format!("mgpu: cannot start the job's supervisor: {e:#}"),
                1,
            );
            daemon.forget_run_dir(id, run);
            daemon.schedule(&mut inner);
        }
    }
}

/// The daemon's side of one job's supervisor link: relays output to subscribers, delivers
/// stop commands, and records the end.
///
/// A link that breaks (the supervisor gave up on a daemon that did not read, or this daemon
/// was stopped) says nothing about the job: whether the supervisor is alive is decided only from
/// the process itself (it holds a lock on its run directory while it lives). While it is, the
/// link is made again on its socket (with backoff), the stop under way is sent again, and the
/// output missed meanwhile is in the log, where followers read it. Only a supervisor that is
/// gone counts: its `exit.json` says how the job ended, and without one the job is lost.
async fn supervise_link(
    daemon: Arc<Daemon>,
    id: JobId,
    run: u32,
    initial: Option<std::os::unix::net::UnixStream>,
    mut cmds: mpsc::UnboundedReceiver<SupervisorCmd>,
) {
    let run_dir = daemon.run_dir(id, run);
    let mut link = initial.and_then(|s| {
        s.set_nonblocking(true)
            .ok()
            .and_then(|_| UnixStream::from_std(s).ok())
    });
    // A command taken from the channel but not delivered (the link broke under it).
    let mut undelivered = None;
    let mut wait = Duration::from_millis(20);
    let mut broken_once = false;
    loop {
        let stream = match link.take() {
            Some(s) => Some(s),
            None => UnixStream::connect(run_dir.join(supervisor::SOCKET_FILE))
                .await
                .ok(),
        };
        if let Some(stream) = stream {
            // Only root's supervisor is at the other end; nothing is ever passed to us on it.
            let _ = crate::conn::refuse_rights(std::os::fd::AsFd::as_fd(&stream));
            if broken_once {
                tracing::info!(job = id, "linked again to the job's supervisor");
            }
            let resend = daemon.stop_command(id);
            match run_link(
                &daemon,
                id,
                run,
                stream,
                &mut cmds,
                &mut undelivered,
                resend,
            )
            .await
            {
                LinkEnd::Exited => return,
                LinkEnd::Broken { heard } => {
                    if heard {
                        wait = Duration::from_millis(20);
                    }
                }
            }
        }
        // The link is down: the process decides, never the socket.
        if !supervisor::is_supervised(&run_dir) {
            match supervisor::read_exit(&run_dir) {
                Some(rec) => daemon.job_exited(id, run, rec),
                None => daemon.job_lost(id, run),
            }
            return;
        }
        if !broken_once {
            broken_once = true;
            tracing::warn!(
                job = id,
                "the link to the job's supervisor broke; the supervisor lives on, linking again"
            );
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RELINK_MAX_WAIT);
    }
}

/// How a link to a supervisor ended.
enum LinkEnd {
    /// The job's end was heard and recorded.
    Exited,
    /// The link broke; `heard`: the supervisor said hello on it first.
    Broken { heard: bool },
}

/// Serves one link to a supervisor until the job's end or the link's.
async fn run_link(
    daemon: &Arc<Daemon>,
    id: JobId,
    run: u32,
    stream: UnixStream,
    cmds: &mut mpsc::UnboundedReceiver<SupervisorCmd>,
    undelivered: &mut Option<SupervisorCmd>,
    resend: Option<SupervisorCmd>,
) -> LinkEnd {
    let mut conn = Framed::new(stream, FrameCodec::default());
    let mut offset = 0u64;
    let mut heard = false;
    // A stop sent on an earlier link may have been lost with it: sent again (a supervisor
    // already stopping ignores it), then whatever was not delivered.
    if let Some(cmd) = resend {
        if !send_cmd(&mut conn, cmd, &mut None).await {
            return LinkEnd::Broken { heard };
        }
    }
    if let Some(cmd) = undelivered.take() {
        if !send_cmd(&mut conn, cmd, undelivered).await {
            return LinkEnd::Broken { heard };
        }
    }
    loop {
        tokio::select! {
            frame = conn.next() => match frame {
                Some(Ok(Frame::Control(b))) => match Frame::Control(b).parse::<SupervisorMsg>() {
                    Ok(SupervisorMsg::Hello { pgid, log_offset }) => {
                        heard = true;
                        offset = log_offset;
                        // Recorded before the job was forked, so there by its hello.
                        let run_dir = daemon.run_dir(id, run);
                        let cgroups = tokio::task::spawn_blocking(move || {
                            supervisor::recorded_cgroups(&run_dir)
                        })
                        .await
                        .unwrap_or_default();
                        daemon.set_members(id, pgid, cgroups);
                    }
                    Ok(SupervisorMsg::Exited(rec)) => {
                        daemon.job_exited(id, run, rec);
                        return LinkEnd::Exited;
                    }
                    Err(e) => tracing::warn!(job = id, error = %e, "bad message from supervisor"),
                },
                Some(Ok(Frame::Stdout(d))) => {
                    let n = d.len() as u64;
                    daemon.job_output(id, Stream::Stdout, offset, n);
                    offset += n;
                }
                Some(Ok(Frame::Stderr(d))) => {
                    let n = d.len() as u64;
                    daemon.job_output(id, Stream::Stderr, offset, n);
                    offset += n;
                }
                _ => return LinkEnd::Broken { heard },
            },
            Some(cmd) = cmds.recv() => {
                if !send_cmd(&mut conn, cmd, undelivered).await {
                    return LinkEnd::Broken { heard };
                }
            }
        }
    }
}

/// Sends a command to a supervisor within [`LINK_WRITE_TIMEOUT`]; false (and the command kept
/// for the next link) when the link failed.
async fn send_cmd(
    conn: &mut Framed<UnixStream, FrameCodec>,
    cmd: SupervisorCmd,
    undelivered: &mut Option<SupervisorCmd>,
) -> bool {
    let frame = Frame::control(&cmd);
    match tokio::time::timeout(LINK_WRITE_TIMEOUT, conn.send(frame)).await {
        Ok(Ok(())) => true,
        _ => {
            *undelivered = Some(cmd);
            false
        }
    }
}
