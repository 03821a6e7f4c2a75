//! # mgpu-core
//!
//! The pure scheduling state machine of mgpu. It knows GPUs (with memory), jobs and the queue,
//! and decides which job runs where. It does no I/O, starts no threads and never reads a clock:
//! time is passed in by the caller, so the same inputs always give the same decisions. The daemon
//! drives it with real events; tests (and the trace simulator) drive it in virtual time.
//!
//! The shell's contract:
//! 1. [`Scheduler::submit`] a job (validated against what the machine can *ever* offer),
//! 2. call [`Scheduler::schedule`] after every event and start what it returns,
//! 3. report the end of every started job with [`Scheduler::finish`] once its processes are gone
//!    (only then are its GPUs free again).

pub mod placement;
pub mod timefmt;
mod timelimit;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

pub use placement::GpuState;
pub use timelimit::{Stopping, TimeAction, WarnSignal};

/// A job's unique id. Ids increase and are never reused.
pub type JobId = u64;
/// Milliseconds since the Unix epoch; the core never reads a clock, callers pass it in.
pub type Millis = u64;

/// A GPU the scheduler manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// The device index as the driver numbers it (what `CUDA_VISIBLE_DEVICES` takes).
    pub index: u32,
    pub name: String,
    pub total_mib: u64,
}

/// What a job asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Kernel-verified uid of the submitter.
    pub uid: u32,
    /// The submitter's user name (from the password database, for display and filters).
    pub user: String,
    pub name: String,
    /// Number of GPUs (at least 1).
    pub gpus: u32,
    /// GPU memory needed on *each* of its GPUs. `None`: the job takes its GPUs exclusively.
    pub mem_mib: Option<u64>,
    /// The job's own time limit in seconds, if any.
    pub time_limit_s: Option<u64>,
    /// Slurm-style niceness: users may only lower their own priority (0 or more).
    #[serde(default)]
    pub nice: i32,
    /// Past its limit the job ends as TIMEOUT instead of going back to the queue.
    #[serde(default)]
    pub no_requeue: bool,
    /// Context switches allowed before it ends as TIMEOUT instead.
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// Signal sent ahead of the limit.
    #[serde(default)]
    pub warn_signal: Option<WarnSignal>,
}

impl JobRequest {
    pub fn is_exclusive(&self) -> bool {
        self.mem_mib.is_none()
    }
}

/// Life-cycle states, Slurm-style names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Timeout,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::Timeout => "TIMEOUT",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s.to_ascii_uppercase().as_str() {
            "PENDING" | "PD" => JobState::Pending,
            "RUNNING" | "R" => JobState::Running,
            "COMPLETED" | "CD" => JobState::Completed,
            "FAILED" | "F" => JobState::Failed,
            "CANCELLED" | "CA" => JobState::Cancelled,
            "TIMEOUT" | "TO" => JobState::Timeout,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running)
    }
}

/// A job the scheduler tracks (pending or running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub request: JobRequest,
    pub state: JobState,
    pub submitted_at: Millis,
    pub started_at: Option<Millis>,
    /// Indices of the GPUs it holds while running.
    pub gpus: Vec<u32>,
    pub restarts: u32,
    /// Set once a cancel was asked for a running job; it keeps its GPUs until it is gone.
    pub cancel_requested: bool,
    /// Why a running job is being stopped, once it is.
    pub stopping: Option<Stopping>,
    /// Its warning signal of this run is due or sent.
    pub warned: bool,
    /// Position key in the pending queue (smaller runs first).
    queue_key: u64,
}

/// Why a submission is refused outright (it could never run here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("a job needs at least one GPU (--gpus must be 1 or more)")]
    NoGpus,
    #[error("--mem must be more than 0 MiB")]
    ZeroMemory,
    #[error("the job asks for {asked} GPUs but this machine has only {have}")]
    TooManyGpus { asked: u32, have: u32 },
    #[error(
        "the job asks for {asked} GPUs with {mem_mib} MiB each but only {have} GPUs here have that much memory (largest: {largest_mib} MiB)"
    )]
    TooMuchMemory {
        asked: u32,
        mem_mib: u64,
        have: u32,
        largest_mib: u64,
    },
    #[error("the job has an empty command")]
    EmptyCommand,
}

/// Who asks for an operation on a job: kernel-verified, never client-claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requester {
    pub uid: u32,
    /// Root (or, in single-user mode, the server's own user) may act on every job.
    pub is_admin: bool,
}

impl Requester {
    pub fn may_manage(&self, job_uid: u32) -> bool {
        self.is_admin || self.uid == job_uid
    }
}

/// Result of [`Scheduler::cancel`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending: it is gone from the queue now. The record is returned for bookkeeping.
    Removed(Box<Job>),
    /// It is running: the shell must stop its processes, then call [`Scheduler::finish`].
    MustStop,
    /// A cancel was already asked for; its processes are being stopped.
    AlreadyStopping,
    NotFound,
    PermissionDenied,
}

/// A scheduling decision: start `job` on these GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub job: JobId,
    pub gpus: Vec<u32>,
}

/// Server-wide settings the core needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// Global cap on any job's time slice, in seconds.
    pub max_job_time_s: Option<u64>,
}

/// The scheduler state machine.
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: Config,
    gpus: Vec<GpuState>,
    jobs: HashMap<JobId, Job>,
    /// Pending jobs by queue key: FIFO order.
    pending: BTreeMap<u64, JobId>,
    next_job_id: JobId,
    next_queue_key: u64,
    /// Jobs submitted since the last full pass; only these can newly fit when nothing was freed.
    fresh: Vec<JobId>,
    /// Resources were freed since the last full pass, so every pending job must be looked at.
    full_pass_needed: bool,
}

impl Scheduler {
    /// A scheduler for these GPUs whose first job id will be `next_job_id`.
    pub fn new(gpus: Vec<GpuSpec>, config: Config, next_job_id: JobId) -> Self {
        Scheduler {
            config,
            gpus: gpus.into_iter().map(GpuState::new).collect(),
            jobs: HashMap::new(),
            pending: BTreeMap::new(),
            next_job_id: next_job_id.max(1),
            next_queue_key: 0,
            fresh: Vec::new(),
            full_pass_needed: false,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn gpus(&self) -> &[GpuState] {
        &self.gpus
    }

    pub fn next_job_id(&self) -> JobId {
        self.next_job_id
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn running_len(&self) -> usize {
        self.jobs.len() - self.pending.len()
    }

    /// The time slice a job gets: its own limit capped by the server's global one.
    pub fn effective_limit_s(&self, request: &JobRequest) -> Option<u64> {
        match (request.time_limit_s, self.config.max_job_time_s) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Refuses a request this machine could never satisfy, whatever else runs.
    pub fn check_feasible(&self, request: &JobRequest) -> Result<(), SubmitError> {
        if request.gpus == 0 {
            return Err(SubmitError::NoGpus);
        }
        let have = self.gpus.len() as u32;
        if request.gpus > have {
            return Err(SubmitError::TooManyGpus {
                asked: request.gpus,
                have,
            });
        }
        if let Some(mem) = request.mem_mib {
            if mem == 0 {
                return Err(SubmitError::ZeroMemory);
            }
            let big_enough = self.gpus.iter().filter(|g| g.spec.total_mib >= mem).count() as u32;
            if big_enough < request.gpus {
                return Err(SubmitError::TooMuchMemory {
                    asked: request.gpus,
                    mem_mib: mem,
                    have: big_enough,
                    largest_mib: self
                        .gpus
                        .iter()
                        .map(|g| g.spec.total_mib)
                        .max()
                        .unwrap_or(0),
                });
            }
        }
        Ok(())
    }

    /// Queues a job at the end of the queue. Returns its new id.
    pub fn submit(&mut self, request: JobRequest, now: Millis) -> Result<JobId, SubmitError> {
        self.check_feasible(&request)?;
        let id = self.next_job_id;
        self.next_job_id += 1;
        self.insert_pending(id, request, now, 0);
        Ok(id)
    }

    /// Re-inserts a pending job with a known id (recovery after a restart), at the end of the
    /// queue. Ids below it are never handed out again.
    pub fn restore_pending(
        &mut self,
        id: JobId,
        request: JobRequest,
        submitted_at: Millis,
        restarts: u32,
    ) -> Result<(), SubmitError> {
        self.check_feasible(&request)?;
        self.next_job_id = self.next_job_id.max(id + 1);
        self.insert_pending(id, request, submitted_at, restarts);
        Ok(())
    }

    fn insert_pending(&mut self, id: JobId, request: JobRequest, now: Millis, restarts: u32) {
        let key = self.next_queue_key;
        self.next_queue_key += 1;
        self.jobs.insert(
            id,
            Job {
                id,
                request,
                state: JobState::Pending,
                submitted_at: now,
                started_at: None,
                gpus: Vec::new(),
                restarts,
                cancel_requested: false,
                stopping: None,
                warned: false,
                queue_key: key,
            },
        );
        self.pending.insert(key, id);
        self.fresh.push(id);
    }

    /// Re-inserts a job that is still running (re-adopted after a daemon restart) on exactly the
    /// GPUs it holds, before anything new is scheduled. Fails if those GPUs cannot take it.
    pub fn restore_running(
        &mut self,
        id: JobId,
        request: JobRequest,
        gpus: Vec<u32>,
        submitted_at: Millis,
        started_at: Millis,
        restarts: u32,
    ) -> Result<(), String> {
        self.check_feasible(&request).map_err(|e| e.to_string())?;
        if gpus.len() as u32 != request.gpus {
            return Err(format!(
                "job {id} holds {} GPUs but asked for {}",
                gpus.len(),
                request.gpus
            ));
        }
        for idx in &gpus {
            let Some(g) = self.gpus.iter().find(|g| g.spec.index == *idx) else {
                return Err(format!(
                    "job {id} holds GPU {idx}, which is not managed now"
                ));
            };
            let fits = match request.mem_mib {
                None => g.is_idle(),
                Some(m) => g.exclusive.is_none() && g.spec.total_mib - g.reserved_mib >= m,
            };
            if !fits {
                return Err(format!("job {id}'s GPU {idx} is already taken"));
            }
        }
        placement::reserve(&mut self.gpus, &gpus, id, &request);
        self.next_job_id = self.next_job_id.max(id + 1);
        let key = self.next_queue_key;
        self.next_queue_key += 1;
        self.jobs.insert(
            id,
            Job {
                id,
                request,
                state: JobState::Running,
                submitted_at,
                started_at: Some(started_at),
                gpus,
                restarts,
                cancel_requested: false,
                stopping: None,
                warned: false,
                queue_key: key,
            },
        );
        Ok(())
    }

    /// Decides what starts now: first-come first-served among the jobs that fit. The returned
    /// jobs are RUNNING from here on and hold their GPUs until [`Scheduler::finish`].
    ///
    /// Cost: when nothing was freed since the last call only newly submitted jobs are tried,
    /// so a submit into a long queue does not rescan it.
    pub fn schedule(&mut self, now: Millis) -> Vec<Assignment> {
        let candidates: Vec<JobId> = if self.full_pass_needed {
            self.full_pass_needed = false;
            self.fresh.clear();
            self.pending.values().copied().collect()
        } else {
            std::mem::take(&mut self.fresh)
        };
        let mut started = Vec::new();
        // A shape that did not fit will not fit later in this pass: placements only take.
        let mut failed_shapes: HashSet<(u32, Option<u64>)> = HashSet::new();
        for id in candidates {
            if !placement::any_capacity(&self.gpus) {
                break;
            }
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            if job.state != JobState::Pending {
                continue;
            }
            let shape = (job.request.gpus, job.request.mem_mib);
            if failed_shapes.contains(&shape) {
                continue;
            }
            match placement::choose(&self.gpus, &job.request) {
                Some(chosen) => {
                    placement::reserve(&mut self.gpus, &chosen, id, &job.request);
                    let job = self.jobs.get_mut(&id).expect("job exists");
                    self.pending.remove(&job.queue_key);
                    job.state = JobState::Running;
                    job.started_at = Some(now);
                    job.gpus = chosen.clone();
                    started.push(Assignment {
                        job: id,
                        gpus: chosen,
                    });
                }
                None => {
                    failed_shapes.insert(shape);
                }
            }
        }
        // Jobs not tried because capacity ran out stay pending; a later release re-scans.
        started
    }

    /// Asks to cancel a job on behalf of `by`.
    pub fn cancel(&mut self, id: JobId, by: Requester) -> CancelOutcome {
        let Some(job) = self.jobs.get_mut(&id) else {
            return CancelOutcome::NotFound;
        };
        if !by.may_manage(job.request.uid) {
            return CancelOutcome::PermissionDenied;
        }
        match job.state {
            JobState::Pending => {
                let key = job.queue_key;
                self.pending.remove(&key);
                let mut job = self.jobs.remove(&id).expect("job exists");
                job.state = JobState::Cancelled;
                CancelOutcome::Removed(Box::new(job))
            }
            _ if job.cancel_requested => CancelOutcome::AlreadyStopping,
            _ => {
                // A cancel also overrides a context switch in progress: it must not come back.
                job.cancel_requested = true;
                job.stopping = Some(Stopping::Cancel);
                CancelOutcome::MustStop
            }
        }
    }

    /// Records the end of a running job (its processes are gone): frees its GPUs and forgets it.
    /// `state` is its terminal state. Returns the job record, or `None` if it was not running.
    pub fn finish(&mut self, id: JobId, state: JobState) -> Option<Job> {
        debug_assert!(state.is_terminal());
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Running {
            return None;
        }
        let mut job = self.jobs.remove(&id).expect("job exists");
        placement::release(&mut self.gpus, id, &job.request);
        self.full_pass_needed = true;
        job.state = state;
        Some(job)
    }

    /// Updates the GPU memory used by processes mgpu did not start (seen through NVML).
    pub fn set_foreign_usage(&mut self, index: u32, used_mib: u64) {
        if let Some(gpu) = self.gpus.iter_mut().find(|g| g.spec.index == index) {
            if used_mib < gpu.foreign_mib {
                self.full_pass_needed = true;
            }
            gpu.foreign_mib = used_mib;
        }
    }

    /// Running jobs (by id) then pending jobs in queue order.
    pub fn jobs_in_order(&self) -> impl Iterator<Item = &Job> {
        let mut running: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .collect();
        running.sort_by_key(|j| j.id);
        running
            .into_iter()
            .chain(self.pending.values().map(|id| &self.jobs[id]))
    }

    /// 1-based position of a pending job in the queue (O(queue length); for display only).
    pub fn queue_position(&self, id: JobId) -> Option<usize> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Pending {
            return None;
        }
        Some(self.pending.range(..job.queue_key).count() + 1)
    }

    /// Short Slurm-style reason a pending job waits (`Resources`), or `None` when not pending.
    pub fn pending_reason(&self, id: JobId) -> Option<&'static str> {
        let job = self.jobs.get(&id)?;
        (job.state == JobState::Pending).then_some("Resources")
    }

    /// A human sentence saying what a pending job waits for.
    pub fn wait_detail(&self, id: JobId) -> Option<String> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Pending {
            return None;
        }
        let r = &job.request;
        Some(match r.mem_mib {
            None => {
                let free = self.gpus.iter().filter(|g| g.is_idle()).count();
                format!(
                    "waiting for resources: needs {} whole GPU{}, {} free now",
                    r.gpus,
                    plural(r.gpus as usize),
                    free
                )
            }
            Some(mem) => {
                let fitting = self
                    .gpus
                    .iter()
                    .filter(|g| g.exclusive.is_none() && g.free_mib() >= mem)
                    .count();
                format!(
                    "waiting for resources: needs {} GPU{} with {} MiB free each, {} such now",
                    r.gpus,
                    plural(r.gpus as usize),
                    mem,
                    fitting
                )
            }
        })
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests;
