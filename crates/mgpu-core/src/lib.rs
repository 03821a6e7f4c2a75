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
//!
//! Which job goes first is the [`Policy`] of [`Config`]: FIFO first-fit, FIFO with EASY
//! backfilling, or fair-share with EASY backfilling (the default); see [`policy`] and `pass.rs`.

mod begin;
pub(crate) mod estimate;
mod gate;
pub mod limits;
mod pass;
pub mod placement;
pub mod policy;
pub mod timefmt;
mod timelimit;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use estimate::Estimator;
pub use gate::{
    parse_dependency, ControlError, DepItem, DepKind, DepSpec, DepTarget, Dependency, Gate, Hold,
    JobUpdate, TargetState, MAX_DEP_ITEMS, MAX_DEP_TEXT,
};
pub use limits::{LimitHit, UserLimits, UserRunning};
use pass::Reservation;
pub use placement::GpuState;
use policy::UserUsage;
pub use policy::{FairKnob, FairShareConfig, Policy, UserStanding};
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Slurm-style niceness (fair policy): 60 s of priority per point; users may only lower
    /// their own priority (0 or more), root may raise a job's (negative).
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
    /// The job is one task of a job array (metadata: tasks are scheduled as separate jobs).
    #[serde(default)]
    pub array: Option<ArrayTask>,
}

/// One task of a job array (`mgpu_srun --array`): each task is a job with an id of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayTask {
    /// The array's id: the id of its first task.
    pub job: JobId,
    /// This task's index (`MGPU_ARRAY_TASK_ID`).
    pub task: u32,
    /// How many tasks the array has, and its lowest and highest index.
    pub count: u32,
    pub min: u32,
    pub max: u32,
    /// At most this many of the array's tasks wait in the queue or run at once (Slurm's
    /// `%N`); the others are held back, in task order.
    #[serde(default)]
    pub limit: Option<u32>,
}

/// A job array with a cap on its tasks: how many are in the queue or running, and which wait
/// behind the cap (by id, which is task order).
#[derive(Debug, Clone)]
struct Throttle {
    uid: u32,
    limit: u32,
    live: u32,
    held: BTreeSet<JobId>,
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
    /// Killed by the OOM killer, over its host memory limit.
    OutOfMemory,
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
            JobState::OutOfMemory => "OUT_OF_MEMORY",
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
            "OUT_OF_MEMORY" | "OOM" => JobState::OutOfMemory,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running)
    }
}

/// Where a job's expected run time ([`Job::estimate_ms`]) comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EstimateSource {
    /// Its effective time limit (its own, capped by the server's `--max-job-time`).
    TimeLimit,
    /// The mean of its user's last `runs` finished runs: of jobs with the same name
    /// (`same_name`), else of any name.
    Learned { runs: u32, same_name: bool },
    /// The server's default estimate (`--default-estimate`): no limit, no agreeing history.
    Default,
}

impl EstimateSource {
    /// Says where it comes from, for `mgpu_control show job` and `mgpu_queue -l`, given the
    /// job's name: `TimeLimit`, `UserHistory(4 runs named train.sh)`, `UserHistory(4 runs, any
    /// name)` or `ServerDefault`.
    pub fn describe(&self, name: &str) -> String {
        match self {
            EstimateSource::TimeLimit => "TimeLimit".into(),
            EstimateSource::Learned {
                runs,
                same_name: true,
            } => format!("UserHistory({runs} runs named {name})"),
            EstimateSource::Learned {
                runs,
                same_name: false,
            } => format!("UserHistory({runs} runs, any name)"),
            EstimateSource::Default => "ServerDefault".into(),
        }
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
    /// How long it is expected to run (ms), fixed when it enters the queue: see
    /// [`Scheduler::estimate_ms`].
    estimate_ms: u64,
    /// Where `estimate_ms` comes from.
    estimate_source: EstimateSource,
    /// The run time the shortest-first order assumes ([`Scheduler::order_estimate_ms`]): a time
    /// limit scaled by how much of their limits the user's recent jobs used, a learned
    /// estimate as it is, the typical recent run for a job nothing is known of.
    order_ms: u64,
    /// Its fair-share key is at least this: a context-switched job goes behind every job that
    /// was waiting when it was requeued, however short it is.
    min_key: i64,
    /// A job array's task held back by the array's cap: pending, but not in the queue until
    /// a task of its array leaves.
    held: bool,
    /// Held or waiting on dependencies: pending, but parked out of the queue (see `gate.rs`).
    gate: Option<Box<gate::Gated>>,
}

impl Job {
    fn new(
        id: JobId,
        request: JobRequest,
        state: JobState,
        submitted_at: Millis,
        restarts: u32,
    ) -> Job {
        Job {
            id,
            request,
            state,
            submitted_at,
            started_at: None,
            gpus: Vec::new(),
            restarts,
            cancel_requested: false,
            stopping: None,
            warned: false,
            queue_key: 0,
            estimate_ms: 0,
            estimate_source: EstimateSource::Default,
            order_ms: 0,
            min_key: i64::MIN,
            held: false,
            gate: None,
        }
    }

    /// How long the scheduler expects it to run (ms), for backfilling and ordering: its time
    /// limit, else its user's learned run time, else the default estimate. Fixed when it
    /// entered the queue (or was restored running).
    pub fn estimate_ms(&self) -> u64 {
        self.estimate_ms
    }

    /// Where [`Job::estimate_ms`] comes from.
    pub fn estimate_source(&self) -> EstimateSource {
        self.estimate_source
    }

    /// The floor of its fair-share key, set when it was context-switched and requeued (it
    /// goes behind every job waiting then): the shell records it with the requeue and hands
    /// it back to [`Scheduler::restore_pending_gated_behind`] after a restart. `None`: no floor.
    pub fn min_key(&self) -> Option<i64> {
        (self.min_key != i64::MIN).then_some(self.min_key)
    }
}

/// Why a submission is refused outright (it could never run here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("a job needs at least one GPU (--gpus must be 1 or more)")]
    NoGpus,
    #[error("--mem must be more than 0 MiB")]
    ZeroMemory,
    #[error("the job asks for {asked} GPU{} but this machine has only {have}", plural(*asked as usize))]
    TooManyGpus { asked: u32, have: u32 },
    #[error(
        "the job asks for {asked} GPU{} with {mem_mib} MiB each but only {have} GPU{} here {} that much memory (largest: {largest_mib} MiB)",
        plural(*asked as usize), plural(*have as usize), if *have == 1 { "has" } else { "have" }
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
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Global cap on any job's time slice, in seconds (0: none).
    pub max_job_time_s: Option<u64>,
    /// No job is context-switched before it has run this long, whatever its slice: bounds how
    /// often jobs with tiny slices can be switched (a switch costs a stop and a restart).
    pub min_slice_s: u64,
    /// Context switches a job that sets no `--max-restarts` of its own may have; past them it
    /// ends as TIMEOUT at its limit, so a job that cannot checkpoint does not loop forever
    /// (`None`: no cap).
    pub default_max_restarts: Option<u32>,
    /// Which job goes first (default [`Policy::Fair`]).
    pub policy: Policy,
    /// How long a job without any time limit is assumed to run, for reservations (default 24 h),
    /// when its user has no history to learn from (or `learn_estimates` is off).
    pub default_estimate_s: u64,
    /// Estimate jobs without a time limit from their user's recent finished runs (same job
    /// name first, then any), see [`Scheduler::learn_run`]; default on.
    pub learn_estimates: bool,
    /// A blocked job gets the reservation only once it has waited this long (backfilling
    /// policies; 0: at once, plain EASY backfilling). Until then jobs start first-fit: a
    /// reservation planned from estimates holds GPUs idle, which pays only against
    /// starvation.
    pub reserve_after_s: u64,
    /// ... and only once it has waited this many times longer than jobs do of late (moving
    /// averages of the waits of the jobs started, all users' or its own user's, whichever is
    /// less; for a user who has started none of late, only `reserve_after_s` counts): a job
    /// is starved when it waits far longer than the others, not when everyone waits long (0: no
    /// such condition).
    pub reserve_after_wait_factor: f64,
    /// Fair-share settings (used by [`Policy::Fair`]).
    pub fair: FairShareConfig,
    /// Limits on what each user runs at once, by uid, as the shell resolved them (absent:
    /// none); see [`limits`].
    pub user_limits: HashMap<u32, UserLimits>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_job_time_s: None,
            min_slice_s: 0,
            default_max_restarts: None,
            policy: Policy::default(),
            default_estimate_s: 24 * 3600,
            learn_estimates: true,
            reserve_after_s: 2 * 3600,
            reserve_after_wait_factor: 96.0,
            fair: FairShareConfig::default(),
            user_limits: HashMap::new(),
        }
    }
}

/// The resources a job asks for: GPU count and per-GPU memory (`None`: exclusive). Two jobs of
/// the same shape fit, or do not fit, on the same GPUs.
pub(crate) type Shape = (u32, Option<u64>);

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
    /// Pending jobs per user in the user's own order (fair-share key, then queue key).
    user_queues: HashMap<u32, BTreeMap<(i64, u64), JobId>>,
    /// Pending jobs per shape, by estimated run time: lets a pass stop once no shape can start.
    shapes: HashMap<Shape, BTreeSet<(u64, JobId)>>,
    /// Recent GPU usage per user (fair share).
    usage: HashMap<u32, UserUsage>,
    /// Changes of users' running shares (uid, delta) from `finish`/`restore_running`, which get
    /// no clock: they take effect at the time of the next [`Scheduler::schedule`].
    rate_changes: Vec<(u32, f64)>,
    /// Jobs submitted since the last full pass; only these can newly fit when nothing was freed.
    fresh: Vec<JobId>,
    /// Resources were freed (or foreign usage changed) since the last full pass, so every
    /// pending job must be looked at and the reservation planned afresh.
    full_pass_needed: bool,
    /// The highest-priority blocked job's reservation (backfilling policies). It is kept until
    /// that job starts, so jobs of higher priority that arrive later cannot starve it either.
    reservation: Option<Reservation>,
    /// Earliest expected end of a running job: past it without a `finish`, the reservation's
    /// plan is stale and the next pass must be a full one.
    recheck_at: Option<Millis>,
    /// The `now` of the latest pass: priorities shown between passes are as of then.
    last_now: Millis,
    /// Moving average of the waits (ms) of the jobs started of late: what "waiting long" means
    /// now, for [`Config::reserve_after_wait_factor`].
    recent_wait_ms: f64,
    /// Starts averaged into `recent_wait_ms` (up to 64: the first ones weigh equally).
    recent_starts: u32,
    /// The same per user (the last 16 starts of the user weigh): a user whose jobs wait little
    /// of late while one of theirs is blocked for long is being starved.
    recent_wait_by_user: HashMap<u32, f64>,
    /// Job arrays with a cap on their tasks (`%N`), by array id.
    /// (Ordered: the arrays' id ranges do not overlap, so held tasks list in id order.)
    throttles: BTreeMap<JobId, Throttle>,
    /// Jobs over their reservation on a GPU they share, since the first reading that saw it.
    over_since: HashMap<JobId, Millis>,
    /// The last trial that found switching the overdue jobs served nobody: a trial copies the
    /// whole scheduler, so it is not repeated on every event (see [`Scheduler::time_actions`]).
    no_switch: Option<timelimit::NoSwitch>,
    /// Passes that found something new (a job submitted, ended, requeued or changed, a reload,
    /// a reservation's plan gone stale): a standing "switching serves nobody" is tried again
    /// within [`timelimit::SWITCH_RETRIAL_MS`] after one.
    queue_changes: u64,
    /// What each user's running jobs hold (for [`Config::user_limits`]).
    running_totals: limits::RunningTotals,
    /// Pending jobs waiting for their `--begin` time (see `begin.rs`), by time and by id.
    deferred: BTreeSet<(Millis, JobId)>,
    deferred_at: BTreeMap<JobId, Millis>,
    /// How many deferred jobs each user has (users with none absent).
    deferred_by_user: HashMap<u32, usize>,
    /// Pending jobs parked by a hold or dependencies (by id), and how many per user.
    parked: BTreeSet<JobId>,
    parked_by_user: HashMap<u32, usize>,
    /// Dependency items of parked jobs per user.
    dep_items_by_user: HashMap<u32, usize>,
    /// Per dependency target: the parked jobs that wait on it.
    dependents: HashMap<JobId, Vec<JobId>>,
    /// Per job array that parked jobs wait on as a whole: what is known of its tasks, and
    /// those jobs.
    array_watches: HashMap<JobId, gate::ArrayWatch>,
    /// Arrays whose watch had, when last looked at, no task left and no job waiting (the
    /// oldest dropped first past [`gate::MAX_IDLE_WATCHES`]).
    idle_watches: std::collections::VecDeque<JobId>,
    /// Live (pending or running) jobs per user and name, for `singleton`.
    names: HashMap<(u32, String), BTreeSet<JobId>>,
    /// Running jobs per user and name (users and names with none absent): whether one runs
    /// is what a `singleton` check asks, without walking the name's live jobs.
    running_names: HashMap<(u32, String), usize>,
    /// Parked `singleton` jobs per user and name.
    singleton_waiters: HashMap<(u32, String), BTreeSet<JobId>>,
    /// Parked jobs whose gate may have opened: looked at by the next pass.
    recheck: Vec<JobId>,
    /// The whole server is drained: nothing new starts.
    server_drained: bool,
    /// Run times learned from finished jobs, per user (and job name).
    estimator: Estimator,
    /// Runs that ended since the last pass: (uid, name, started at). `finish` gets no clock:
    /// they are learned at the time of the next [`Scheduler::schedule`], as usage is.
    to_learn: Vec<(u32, String, Millis, Option<Millis>)>,
    /// Weighted usage (GPU-s) below which a user's blocked job reserves at once, as of the
    /// latest pass ([`FairShareConfig::reserve_below_share`]; negative: nobody).
    share_bar: f64,
    /// The user flooding the queue now, if any (see [`FairShareConfig::flood_factor`]), with
    /// the number of their waiting jobs; fixed per pass.
    flooder: Option<(u32, usize)>,
    /// The typical run is known and the waiting jobs nothing is known of are ordered as it
    /// (see [`Scheduler::order_unknown_jobs_as_typical`]).
    typical_known: bool,
}

/// A running job measured over its GPU memory reservation on one GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overuse {
    pub job: JobId,
    pub gpu: u32,
    pub used_mib: u64,
    /// Its reservation there (0 on a GPU it does not hold).
    pub reserved_mib: u64,
}

/// What to do about jobs over their GPU memory reservations ([`Scheduler::memory_actions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryAction {
    /// Over its reservation on a GPU it shares with other jobs, for at least the tolerance:
    /// it threatens its neighbours and is to be stopped.
    Stop(Overuse),
    /// Over its reservation, but nobody else is on that GPU: nobody to protect yet (its use is
    /// charged, so newcomers are only placed next to what it really uses).
    Alone(Overuse),
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
            user_queues: HashMap::new(),
            shapes: HashMap::new(),
            usage: HashMap::new(),
            rate_changes: Vec::new(),
            fresh: Vec::new(),
            full_pass_needed: false,
            reservation: None,
            recheck_at: None,
            last_now: 0,
            recent_wait_ms: 0.0,
            recent_starts: 0,
            recent_wait_by_user: HashMap::new(),
            no_switch: None,
            queue_changes: 0,
            throttles: BTreeMap::new(),
            over_since: HashMap::new(),
            running_totals: Default::default(),
            deferred: BTreeSet::new(),
            deferred_at: BTreeMap::new(),
            deferred_by_user: HashMap::new(),
            parked: BTreeSet::new(),
            parked_by_user: HashMap::new(),
            dep_items_by_user: HashMap::new(),
            dependents: HashMap::new(),
            array_watches: HashMap::new(),
            idle_watches: std::collections::VecDeque::new(),
            names: HashMap::new(),
            running_names: HashMap::new(),
            singleton_waiters: HashMap::new(),
            recheck: Vec::new(),
            server_drained: false,
            estimator: Estimator::default(),
            to_learn: Vec::new(),
            share_bar: -1.0,
            flooder: None,
            typical_known: false,
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

    /// Pending jobs, in all (held array tasks too).
    pub fn pending_count(&self) -> usize {
        self.pending.len()
            + self.throttles.values().map(|t| t.held.len()).sum::<usize>()
            + self.deferred_count(None)
            + self.parked.len()
    }

    /// Pending jobs of one user (held array tasks too).
    pub fn pending_count_of(&self, uid: u32) -> usize {
        let held: usize = self
            .throttles
            .values()
            .filter(|t| t.uid == uid)
            .map(|t| t.held.len())
            .sum();
        self.user_queues.get(&uid).map_or(0, BTreeMap::len)
            + held
            + self.deferred_count(Some(uid))
            + self.parked_by_user.get(&uid).copied().unwrap_or(0)
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn running_len(&self) -> usize {
        self.jobs.len() - self.pending_count()
    }

    /// The time slice a job gets: its own limit capped by the server's global one. A limit of
    /// 0 means no limit (as in Slurm), never a zero slice.
    pub fn effective_limit_s(&self, request: &JobRequest) -> Option<u64> {
        let own = request.time_limit_s.filter(|&s| s > 0);
        match (own, self.config.max_job_time_s.filter(|&s| s > 0)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How long a job is assumed to run, in ms, for backfilling and ordering: its effective
    /// limit, else (with [`Config::learn_estimates`]) what its user's recent runs of the same
    /// name, or of any name, took on average, else the configured default estimate.
    pub fn estimate_ms(&self, request: &JobRequest) -> u64 {
        self.estimate(request).0
    }

    /// [`Scheduler::estimate_ms`] and where it comes from.
    pub fn estimate(&self, request: &JobRequest) -> (u64, EstimateSource) {
        if let Some(limit) = self.effective_limit_s(request) {
            return (limit.saturating_mul(1000), EstimateSource::TimeLimit);
        }
        let learned = self
            .config
            .learn_estimates
            .then(|| self.estimator.learned(request.uid, &request.name))
            .flatten();
        match learned {
            Some((ms, runs, same_name)) => (ms.max(1), EstimateSource::Learned { runs, same_name }),
            None => (
                self.config.default_estimate_s.saturating_mul(1000),
                EstimateSource::Default,
            ),
        }
    }

    /// The run time learned from the user's history, if any (and learning is on).
    pub fn learned_estimate_ms(&self, request: &JobRequest) -> Option<u64> {
        if !self.config.learn_estimates {
            return None;
        }
        self.estimator
            .estimate(request.uid, &request.name)
            .map(|ms| ms.max(1))
    }

    /// Feeds the estimator with one finished run (`run_ms` long) of a job like `request` (its
    /// user and name count). [`Scheduler::finish`] does this itself for jobs that complete or
    /// time out; the shell calls it at startup with the recent history from its records, oldest
    /// first, before jobs are restored.
    pub fn learn_run(&mut self, request: &JobRequest, run_ms: Millis) {
        let limit_ms = self
            .effective_limit_s(request)
            .map(|s| s.saturating_mul(1000));
        self.estimator
            .learn(request.uid, &request.name, run_ms, limit_ms);
    }

    /// The run time the shortest-first order assumes for a job estimated at `estimate_ms` from
    /// `source` (with [`Config::learn_estimates`]; else the estimate itself): a time limit is
    /// scaled by the share of their limits the user's recent jobs used, so that generous limits
    /// do not push a job back against jobs with tight ones or none; a job nothing is known of
    /// counts as the typical recent run (the median of all users' last 256, at most 16 of them
    /// one user's, never more than the default), not as the default estimate, which only reservations need to be cautious;
    /// a learned estimate is taken as it is.
    pub fn order_estimate_ms(
        &self,
        request: &JobRequest,
        estimate_ms: u64,
        source: EstimateSource,
    ) -> u64 {
        match source {
            EstimateSource::TimeLimit if self.config.learn_estimates => self
                .estimator
                .limit_use(request.uid)
                .map_or(estimate_ms, |used| {
                    (estimate_ms as f64 * used).round() as u64
                })
                .max(1),
            EstimateSource::Default if self.config.learn_estimates => self
                .estimator
                .typical_run()
                .map_or(estimate_ms, |t| t.min(estimate_ms))
                .max(1),
            _ => estimate_ms,
        }
    }

    /// The typical run has just become known (the first [`estimate::MIN_TYPICAL_RUNS`] runs
    /// of a server without history have ended): the waiting jobs nothing was known of, ordered
    /// until now as the default estimate (24 h), are estimated again as the same jobs
    /// submitted now would be (as the typical run, or from their user's runs where those now
    /// agree). Without this, the first jobs of a new server would stay 7
    /// doublings behind every later one. Once only: later, a waiting job keeps the order
    /// estimate made when it entered the queue (re-keying as the median drifts was measured
    /// worse, docs/scheduling.md). O(n log n), once.
    fn order_unknown_jobs_as_typical(&mut self) {
        self.typical_known = true;
        if !self.config.learn_estimates {
            return;
        }
        let unknown: Vec<JobId> = self
            .pending
            .values()
            .copied()
            .filter(|id| self.jobs[id].estimate_source == EstimateSource::Default)
            .collect();
        for id in unknown {
            let job = self.jobs.remove(&id).expect("a pending job");
            self.unindex_pending(&job);
            self.index_pending(job);
        }
        // A re-keyed job may now stand behind a switched job's floor: that job goes back
        // behind it.
        self.settle_floors();
        // The order changed: this pass looks at the whole queue.
        self.full_pass_needed = true;
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
        self.enter(id, request, now, 0);
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
        self.restore_pending_behind(id, request, submitted_at, restarts, None)
    }

    /// [`Scheduler::restore_pending`] of a job that was requeued with the key floor `min_key`
    /// ([`Job::min_key`]): it keeps its place behind the jobs that were waiting then.
    pub fn restore_pending_behind(
        &mut self,
        id: JobId,
        request: JobRequest,
        submitted_at: Millis,
        restarts: u32,
        min_key: Option<i64>,
    ) -> Result<(), SubmitError> {
        self.check_feasible(&request)?;
        self.next_job_id = self.next_job_id.max(id + 1);
        let min_key = min_key.unwrap_or(i64::MIN);
        self.enter_behind(id, request, submitted_at, restarts, min_key);
        Ok(())
    }

    /// A new pending job enters the queue, unless it is a task of a job array whose cap is
    /// reached: then it is held until a task of that array leaves.
    fn enter(&mut self, id: JobId, request: JobRequest, now: Millis, restarts: u32) {
        self.enter_behind(id, request, now, restarts, i64::MIN);
    }

    /// [`Scheduler::enter`] with a floor for its fair-share key (`i64::MIN`: none).
    fn enter_behind(
        &mut self,
        id: JobId,
        request: JobRequest,
        now: Millis,
        restarts: u32,
        min_key: i64,
    ) {
        self.name_entered(id, &request);
        if let Some(t) = self.throttle_of(&request) {
            if t.live >= t.limit {
                t.held.insert(id);
                // Its place in the queue is kept for it (it enters there when let in), but it
                // is in none of the queue's indexes while held.
                let key = self.next_queue_key;
                self.next_queue_key += 1;
                let job = Job {
                    held: true,
                    queue_key: key,
                    min_key,
                    ..Job::new(id, request, JobState::Pending, now, restarts)
                };
                self.jobs.insert(id, job);
                return;
            }
            t.live += 1;
        }
        self.insert_pending(id, request, now, restarts, min_key);
    }

    /// The cap of the job array `request` is a task of, if it has one (made on its first task).
    fn throttle_of(&mut self, request: &JobRequest) -> Option<&mut Throttle> {
        let a = request.array?;
        let limit = a.limit?;
        Some(self.throttles.entry(a.job).or_insert_with(|| Throttle {
            uid: request.uid,
            limit,
            live: 0,
            held: BTreeSet::new(),
        }))
    }

    /// Forgets the cap of an array with no task left waiting or running.
    fn forget_throttle_if_done(&mut self, array: JobId) {
        if self
            .throttles
            .get(&array)
            .is_some_and(|t| t.live == 0 && t.held.is_empty())
        {
            self.throttles.remove(&array);
        }
    }

    /// A task of a capped job array left (ended, or cancelled while waiting): the next held
    /// task of that array, if any, enters the queue.
    fn task_left(&mut self, request: &JobRequest) {
        let Some(array) = request.array.filter(|a| a.limit.is_some()).map(|a| a.job) else {
            return;
        };
        let Some(t) = self.throttles.get_mut(&array) else {
            return;
        };
        t.live = t.live.saturating_sub(1);
        let next = if t.live < t.limit {
            t.held.pop_first()
        } else {
            None
        };
        if next.is_some() {
            t.live += 1;
        }
        self.forget_throttle_if_done(array);
        if let Some(next) = next {
            let job = self.jobs.remove(&next).expect("a held task is a job");
            // At the place in the queue its submission gave it, not at the end.
            self.index_pending(Job { held: false, ..job });
        }
    }

    /// A pending job at the end of the queue.
    fn insert_pending(
        &mut self,
        id: JobId,
        request: JobRequest,
        now: Millis,
        restarts: u32,
        min_key: i64,
    ) {
        let key = self.next_queue_key;
        self.next_queue_key += 1;
        self.index_pending(Job {
            queue_key: key,
            min_key,
            ..Job::new(id, request, JobState::Pending, now, restarts)
        });
    }

    /// Puts a pending job into the queue's indexes at its `queue_key`.
    fn index_pending(&mut self, mut job: Job) {
        (job.estimate_ms, job.estimate_source) = self.estimate(&job.request);
        job.order_ms = self.order_estimate_ms(&job.request, job.estimate_ms, job.estimate_source);
        let id = job.id;
        let key = job.queue_key;
        let user_key = self.user_key(&job);
        self.user_queues
            .entry(job.request.uid)
            .or_default()
            .insert(user_key, id);
        self.shapes
            .entry((job.request.gpus, job.request.mem_mib))
            .or_default()
            .insert((job.estimate_ms, id));
        self.jobs.insert(id, job);
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
        self.name_started(&request);
        self.running_totals.add(
            request.uid,
            request.gpus,
            limits::mem_charge(&self.gpus, &gpus, &request),
        );
        // Charged from the next pass on: the core has no clock here.
        let share = placement::usage_share(&self.gpus, &gpus, &request);
        self.rate_changes.push((request.uid, share));
        self.next_job_id = self.next_job_id.max(id + 1);
        self.name_entered(id, &request);
        let key = self.next_queue_key;
        self.next_queue_key += 1;
        // A running task of a capped array counts against the cap.
        if let Some(t) = self.throttle_of(&request) {
            t.live += 1;
        }
        let (estimate_ms, estimate_source) = self.estimate(&request);
        let order_ms = self.order_estimate_ms(&request, estimate_ms, estimate_source);
        let job = Job {
            started_at: Some(started_at),
            gpus,
            queue_key: key,
            estimate_ms,
            estimate_source,
            order_ms,
            ..Job::new(id, request, JobState::Running, submitted_at, restarts)
        };
        self.jobs.insert(id, job);
        Ok(())
    }

    /// Decides what starts now, by the configured [`Policy`]. The returned jobs are RUNNING from
    /// here on and hold their GPUs until [`Scheduler::finish`].
    ///
    /// Cost: when nothing was freed since the last call only newly submitted jobs are tried
    /// (nothing else can have become startable), so a submit into a long queue does not rescan
    /// it; a full pass stops as soon as no remaining shape of job could start.
    pub fn schedule(&mut self, now: Millis) -> Vec<Assignment> {
        self.schedule_pass(now, false)
    }

    /// `rescan_all`: consider every pending job even when only fresh ones can start (tests).
    fn schedule_pass(&mut self, now: Millis, rescan_all: bool) -> Vec<Assignment> {
        self.last_now = self.last_now.max(now);
        self.release_begun(now);
        self.charge_rate_changes(now);
        for (uid, name, started_at, limit_ms) in std::mem::take(&mut self.to_learn) {
            self.estimator
                .learn(uid, &name, now.saturating_sub(started_at), limit_ms);
        }
        if !self.typical_known && self.estimator.typical_run().is_some() {
            self.order_unknown_jobs_as_typical();
        }
        self.share_bar = self.compute_share_bar(now);
        self.flooder = self.compute_flooder();
        self.recheck_gates();
        if self.server_drained {
            return Vec::new();
        }
        // While a context switch is in progress nothing starts: the switched jobs' processes
        // go one by one, and what the first ones free must not be taken (by one of them,
        // restarting at once, or by anyone else) before the job the switch was made for can
        // have it all. The pass that follows the last exit decides, as `time_actions` planned.
        if self.switch_in_progress() {
            return Vec::new();
        }
        // A running job past its expected end makes the reservation's plan stale.
        let stale_plan = self.reservation.is_some() && self.recheck_at.is_some_and(|t| now > t);
        let replan = std::mem::take(&mut self.full_pass_needed) || stale_plan;
        let fresh = std::mem::take(&mut self.fresh);
        if replan || !fresh.is_empty() {
            self.queue_changes += 1;
        }
        // A job waited long enough for the reservation: a full pass finds it.
        if replan || rescan_all || self.seeks_reservation(now) {
            self.full_pass(now, replan)
        } else {
            self.fresh_pass(fresh, now)
        }
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
            // Deferred (--begin) and parked (hold, dependencies) jobs are in no queue index.
            JobState::Pending if self.deferred_at.contains_key(&id) || job.gate.is_some() => {
                self.forget_deferred(id);
                let mut job = self.jobs.remove(&id).expect("job exists");
                job.state = JobState::Cancelled;
                self.job_left(&job, JobState::Cancelled);
                CancelOutcome::Removed(Box::new(job))
            }
            JobState::Pending if job.held => {
                let mut job = self.jobs.remove(&id).expect("job exists");
                if let Some(array) = job.request.array.map(|a| a.job) {
                    if let Some(t) = self.throttles.get_mut(&array) {
                        t.held.remove(&id);
                    }
                    self.forget_throttle_if_done(array);
                }
                job.state = JobState::Cancelled;
                self.job_left(&job, JobState::Cancelled);
                CancelOutcome::Removed(Box::new(job))
            }
            JobState::Pending => {
                let mut job = self.jobs.remove(&id).expect("job exists");
                self.unindex_pending(&job);
                self.task_left(&job.request);
                if self.reservation.as_ref().is_some_and(|r| r.job == id) {
                    // Jobs held back for its sake may start now.
                    self.reservation = None;
                    self.full_pass_needed = true;
                }
                job.state = JobState::Cancelled;
                self.job_left(&job, JobState::Cancelled);
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
        let share = placement::usage_share(&self.gpus, &job.gpus, &job.request);
        self.rate_changes.push((job.request.uid, -share));
        placement::release(&mut self.gpus, id, &job.request);
        self.uncount_running(&job);
        self.over_since.remove(&id);
        self.full_pass_needed = true;
        self.task_left(&job.request);
        // A run that went to its end (or its limit) says how long such jobs take; a cancelled
        // or failed one may say nothing of the kind.
        if matches!(state, JobState::Completed | JobState::Timeout) {
            if let Some(started_at) = job.started_at {
                let limit_ms = self
                    .effective_limit_s(&job.request)
                    .map(|s| s.saturating_mul(1000));
                self.to_learn.push((
                    job.request.uid,
                    job.request.name.clone(),
                    started_at,
                    limit_ms,
                ));
            }
        }
        job.state = state;
        self.job_left(&job, state);
        Some(job)
    }

    /// Updates the GPU memory used by processes mgpu did not start (seen through NVML).
    pub fn set_foreign_usage(&mut self, index: u32, used_mib: u64) {
        if let Some(gpu) = self.gpus.iter_mut().find(|g| g.spec.index == index) {
            // Less foreign memory may let jobs start; any change moves the reservation's plan.
            if used_mib < gpu.foreign_mib
                || (used_mib != gpu.foreign_mib && self.reservation.is_some())
            {
                self.full_pass_needed = true;
            }
            gpu.foreign_mib = used_mib;
        }
    }

    /// Records one reading of GPU `index`: the memory each running job's processes use there
    /// (jobs not listed use none). A memory job is charged the larger of its reservation and
    /// its use, so a job using more than it reserved keeps newcomers off that memory. Readings
    /// of jobs that are not running are ignored.
    pub fn set_job_usage(&mut self, index: u32, used: &[(JobId, u64)]) {
        let Some(pos) = self.gpus.iter().position(|g| g.spec.index == index) else {
            return;
        };
        let mut used_by = BTreeMap::new();
        let mut excess = 0u64;
        for &(id, mib) in used {
            let Some(job) = self.jobs.get(&id).filter(|j| j.state == JobState::Running) else {
                continue;
            };
            let slot: &mut u64 = used_by.entry(id).or_default();
            let before = slot.saturating_sub(self.gpus[pos].reservation_of(id, &job.request));
            *slot = slot.saturating_add(mib);
            let after = slot.saturating_sub(self.gpus[pos].reservation_of(id, &job.request));
            excess = excess - before + after;
        }
        let gpu = &mut self.gpus[pos];
        // Less charged memory may let jobs start; any change moves the reservation's plan.
        if excess < gpu.excess_mib || (excess != gpu.excess_mib && self.reservation.is_some()) {
            self.full_pass_needed = true;
        }
        gpu.excess_mib = excess;
        gpu.used_by = used_by;
    }

    /// The jobs over their GPU memory reservations as of the latest readings, and what to do:
    /// a memory job over its reservation on a GPU it shares with other jobs for `tolerance_ms`
    /// (counted from the first reading at `now` that saw it so) is to be stopped; one alone on
    /// the GPU is only reported. Exclusive jobs own their GPUs and are never stopped for
    /// memory. One action per job, for its GPU with the most memory over (shared GPUs first).
    pub fn memory_actions(&mut self, now: Millis, tolerance_ms: u64) -> Vec<MemoryAction> {
        let mut worst: BTreeMap<JobId, (bool, Overuse)> = BTreeMap::new();
        for gpu in &self.gpus {
            for (&id, &used_mib) in &gpu.used_by {
                let Some(job) = self.jobs.get(&id) else {
                    continue;
                };
                if job.request.is_exclusive() {
                    continue;
                }
                let reserved_mib = gpu.reservation_of(id, &job.request);
                if used_mib <= reserved_mib {
                    continue;
                }
                let shared = gpu.jobs().iter().any(|&other| other != id);
                let over = Overuse {
                    job: id,
                    gpu: gpu.spec.index,
                    used_mib,
                    reserved_mib,
                };
                let key = |s: bool, o: &Overuse| (s, o.used_mib - o.reserved_mib);
                let e = worst.entry(id).or_insert((shared, over));
                if key(shared, &over) > key(e.0, &e.1) {
                    *e = (shared, over);
                }
            }
        }
        self.over_since
            .retain(|id, _| worst.get(id).is_some_and(|w| w.0));
        let mut actions = Vec::new();
        for (id, (shared, over)) in worst {
            if !shared {
                actions.push(MemoryAction::Alone(over));
                continue;
            }
            let since = *self.over_since.entry(id).or_insert(now);
            if now.saturating_sub(since) >= tolerance_ms {
                actions.push(MemoryAction::Stop(over));
            }
        }
        actions
    }

    /// Running jobs (by id) then pending jobs in priority order (as of the latest pass).
    pub fn jobs_in_order(&self) -> impl Iterator<Item = &Job> {
        let mut running: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .collect();
        running.sort_by_key(|j| j.id);
        let held = self.throttles.values().flat_map(|t| t.held.iter());
        running
            .into_iter()
            .chain(self.pending_in_priority_order().map(|id| &self.jobs[&id]))
            .chain(held.map(|id| &self.jobs[id]))
            .chain(self.deferred.iter().map(|(_, id)| &self.jobs[id]))
            .chain(self.parked_ids().map(|id| &self.jobs[id]))
    }

    /// 1-based position of a pending job in priority order (O(queue length); for display only).
    pub fn queue_position(&self, id: JobId) -> Option<usize> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Pending || self.is_parked(job) {
            return None;
        }
        if self.config.policy != Policy::Fair {
            return Some(self.pending.range(..job.queue_key).count() + 1);
        }
        self.pending_in_priority_order()
            .position(|j| j == id)
            .map(|p| p + 1)
    }

    /// Sets the limits of one user's running jobs (from the next pass on; jobs running keep
    /// running). Unlimited clears them.
    pub fn set_user_limits(&mut self, uid: u32, limits: UserLimits) {
        let old = self.user_limits_of(uid);
        if old == limits {
            return;
        }
        if limits.is_unlimited() {
            self.config.user_limits.remove(&uid);
        } else {
            self.config.user_limits.insert(uid, limits);
        }
        // Looser limits may let waiting jobs start; a reservation held by a job that may not
        // start now is planned afresh.
        self.full_pass_needed = true;
    }

    /// The limits of one user's running jobs.
    pub fn user_limits_of(&self, uid: u32) -> UserLimits {
        self.config
            .user_limits
            .get(&uid)
            .copied()
            .unwrap_or_default()
    }

    /// What one user's running jobs hold now.
    pub fn user_running(&self, uid: u32) -> UserRunning {
        self.running_totals.of(uid)
    }

    /// The uids with jobs waiting or running.
    pub fn uids(&self) -> BTreeSet<u32> {
        self.jobs.values().map(|j| j.request.uid).collect()
    }

    /// Replaces the configuration (a reload): waiting jobs are re-indexed under it (their
    /// estimates and fair-share keys may change) and the next pass looks at all of them; jobs
    /// running keep running.
    pub fn reconfigure(&mut self, config: Config) {
        let pending: Vec<JobId> = self.pending.values().copied().collect();
        let mut jobs = Vec::with_capacity(pending.len());
        for id in pending {
            let job = self.jobs.remove(&id).expect("a pending job");
            self.unindex_pending(&job);
            jobs.push(job);
        }
        let tau_before = self.config.fair.tau_s();
        let now = self.last_now;
        self.charge_rate_changes(now);
        self.config = config;
        if tau_before != self.config.fair.tau_s() {
            // Usage so far stays; it decays at the new rate from here on.
            for usage in self.usage.values_mut() {
                usage.change_rate(now, tau_before, 0.0);
            }
        }
        for job in jobs {
            self.index_pending(job);
        }
        // Requeued jobs' floors were keys under the old weights.
        self.settle_floors();
        self.full_pass_needed = true;
    }

    /// A pending job's key floor after a context switch ([`Job::min_key`]), for the records:
    /// restored with it, the job is requeued again (see [`Scheduler::settle_floors`]).
    pub fn queue_floor(&self, id: JobId) -> Option<i64> {
        self.jobs.get(&id).and_then(Job::min_key)
    }

    /// Puts every requeued job in the queue (one with a key floor) behind every job that
    /// entered the queue before it, under the current weights: after the weights changed, or
    /// after a restart restored the queue (in the order the jobs entered it). O(n log n).
    pub fn settle_floors(&mut self) {
        let ids: Vec<JobId> = self.pending.values().copied().collect();
        let mut max_key = i64::MIN;
        for id in ids {
            let job = &self.jobs[&id];
            if job.min_key != i64::MIN {
                let floor = max_key.saturating_add(1);
                if floor != job.min_key {
                    let old = self.user_key(job);
                    let uid = job.request.uid;
                    self.jobs.get_mut(&id).expect("a pending job").min_key = floor;
                    let new = self.user_key(&self.jobs[&id]);
                    if let Some(queue) = self.user_queues.get_mut(&uid) {
                        queue.remove(&old);
                        queue.insert(new, id);
                    }
                }
            }
            max_key = max_key.max(self.user_key(&self.jobs[&id]).0);
        }
    }

    /// The limit that starting a pending job (on `chosen`, where known) would take its user
    /// past, if any.
    pub(crate) fn limit_hit(&self, job: &Job, chosen: Option<&[u32]>) -> Option<LimitHit> {
        let limits = self.config.user_limits.get(&job.request.uid)?;
        let mem = match (limits.max_gpu_mem_mib, chosen) {
            (None, _) => 0,
            (Some(_), Some(held)) => limits::mem_charge(&self.gpus, held, &job.request),
            (Some(_), None) => limits::min_mem_charge(&self.gpus, &job.request),
        };
        limits::check(
            limits,
            &self.running_totals.of(job.request.uid),
            &job.request,
            mem,
        )
    }

    /// Is a user at one of their running limits (so that none of their jobs can start)?
    pub(crate) fn user_saturated(&self, uid: u32) -> bool {
        let Some(l) = self.config.user_limits.get(&uid) else {
            return false;
        };
        let r = self.running_totals.of(uid);
        l.max_jobs.is_some_and(|m| r.jobs >= m)
            || l.max_gpus.is_some_and(|m| r.gpus >= m)
            || l.max_gpu_mem_mib.is_some_and(|m| r.gpu_mem_mib >= m)
    }

    /// A running job stops holding its GPUs: its user's running totals drop.
    pub(crate) fn uncount_running(&mut self, job: &Job) {
        self.name_stopped(&job.request);
        let mem = limits::mem_charge(&self.gpus, &job.gpus, &job.request);
        self.running_totals
            .remove(job.request.uid, job.request.gpus, mem);
    }

    /// Short Slurm-style reason a pending job waits, or `None` when it is not pending:
    /// - `Resources`: it waits for GPUs to free up (with a backfilling policy: it holds the
    ///   reservation, see [`Scheduler::est_start`]);
    /// - `Priority`: it does not fit now and a job of higher priority holds the reservation;
    /// - `Reservation`: it would fit now, but starting it would delay the reserved job;
    /// - `JobArrayTaskLimit`: its job array already has as many tasks waiting or running as its
    ///   cap allows;
    /// - `QOSMaxJobsPerUser`, `QOSMaxGpuPerUser`, `QOSMaxGpuMemPerUser`: starting it would take
    ///   its user past a limit of [`Config::user_limits`] (see [`limits`]).
    /// - `BeginTime`: it may not start before its `--begin` time.
    pub fn pending_reason(&self, id: JobId) -> Option<&'static str> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Pending {
            return None;
        }
        if let Some(g) = &job.gate {
            return Some(g.reason());
        }
        if self.deferred_at.contains_key(&id) {
            return Some("BeginTime");
        }
        if job.held {
            return Some("JobArrayTaskLimit");
        }
        if self.server_drained {
            return Some("ServerDrained");
        }
        if self.blocked_by_drain(&job.request) {
            return Some("GpuDrained");
        }
        if let Some(hit) = self.limit_hit(job, None) {
            return Some(hit.reason());
        }
        let Some(reservation) = self.reservation.as_ref() else {
            return Some("Resources");
        };
        Some(if reservation.job == id {
            "Resources"
        } else if placement::choose(&self.gpus, &job.request).is_some() {
            "Reservation"
        } else {
            "Priority"
        })
    }

    /// Is `job` pending but parked out of the queue (held, waiting on dependencies or its begin
    /// time)? Such a job has no place, priority or fixed estimate yet.
    fn is_parked(&self, job: &Job) -> bool {
        job.state == JobState::Pending
            && (job.held || job.gate.is_some() || self.deferred_at.contains_key(&job.id))
    }

    /// A job's expected run time (ms) and where it comes from: the one fixed when it entered
    /// the queue, or, for a pending job parked out of it (held, waiting on dependencies or
    /// its begin time, a capped array's task), the one it would get entering now.
    pub fn job_estimate(&self, id: JobId) -> Option<(u64, EstimateSource)> {
        let job = self.jobs.get(&id)?;
        Some(if self.is_parked(job) {
            self.estimate(&job.request)
        } else {
            (job.estimate_ms, job.estimate_source)
        })
    }

    /// The run time the shortest-first order counts for job `id` (ms): see
    /// [`Scheduler::order_estimate_ms`]; for a job parked out of the queue, what it would get
    /// entering now.
    pub fn job_order_estimate(&self, id: JobId) -> Option<u64> {
        let job = self.jobs.get(&id)?;
        Some(if self.is_parked(job) {
            let (ms, source) = self.estimate(&job.request);
            self.order_estimate_ms(&job.request, ms, source)
        } else {
            job.order_ms
        })
    }

    /// A pending job's priority as of the latest pass (higher goes first), in seconds: for
    /// [`Policy::Fair`] waiting time minus the fair-share and nice penalties, for the FIFO
    /// policies the waiting time.
    pub fn priority(&self, id: JobId) -> Option<f64> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Pending || self.is_parked(job) {
            return None;
        }
        let now = self.last_now;
        Some(match self.config.policy {
            Policy::Fair => {
                self.fair_priority(job, self.user_priority_term(job.request.uid, now), now)
            }
            Policy::Fifo | Policy::Backfill => now.saturating_sub(job.submitted_at) as f64 / 1000.0,
        })
    }

    /// When a pending job is expected to start at the latest, where that is known: for the job
    /// holding the reservation, from the running jobs' time limits (or the default estimate).
    pub fn est_start(&self, id: JobId) -> Option<Millis> {
        if let Some(at) = self.begin_at(id) {
            return Some(at);
        }
        let r = self.reservation.as_ref()?;
        if r.job != id || self.jobs.get(&id)?.state != JobState::Pending {
            return None;
        }
        r.start_at
    }

    /// The job holding the reservation, if any (backfilling policies).
    pub fn reserved_job(&self) -> Option<JobId> {
        self.reservation.as_ref().map(|r| r.job)
    }

    /// A user's decayed GPU usage in GPU-seconds at `now` (for display and accounting).
    /// Charges a run that ended before this scheduler existed (usage history after a restart):
    /// `gpus` held with `request` from `started_at` to `ended_at`.
    pub fn charge_history(
        &mut self,
        request: &JobRequest,
        gpus: &[u32],
        started_at: Millis,
        ended_at: Millis,
        now: Millis,
    ) {
        let share = placement::usage_share(&self.gpus, gpus, request);
        let tau = self.config.fair.tau_s();
        self.usage.entry(request.uid).or_default().add_past(
            now,
            tau,
            share,
            started_at,
            ended_at.min(now),
        );
    }

    pub fn user_usage_gpu_s(&self, uid: u32, now: Millis) -> f64 {
        self.usage
            .get(&uid)
            .map_or(0.0, |u| u.at(now, self.config.fair.tau_s()))
    }

    /// A human sentence saying what a pending job waits for. It starts with the job's
    /// [`Scheduler::pending_reason`] (the queue's REASON), so the two never disagree, and names
    /// the reservation it waits behind, if any.
    pub fn wait_detail(&self, id: JobId) -> Option<String> {
        let job = self.jobs.get(&id)?;
        let code = self.pending_reason(id)?;
        if let Some(g) = &job.gate {
            return Some(self.gate_detail(job, g));
        }
        if code == "ServerDrained" {
            return Some(format!(
                "{code}: the server is drained for maintenance; nothing new starts until an administrator resumes it (mgpu_control resume server)"
            ));
        }
        if code == "GpuDrained" {
            let in_service = self.gpus.iter().filter(|g| !g.drained).count();
            return Some(format!(
                "{code}: needs {} GPU{}, only {in_service} in service (the others are drained for maintenance)",
                job.request.gpus,
                plural(job.request.gpus as usize)
            ));
        }
        if self.deferred_at.contains_key(&id) {
            return Some(format!("{code}: it may not start before its --begin time"));
        }
        if let (true, Some(a)) = (job.held, job.request.array) {
            return Some(format!(
                "{code}: at most {} tasks of job array {} wait or run at once",
                a.limit.unwrap_or(0),
                a.job
            ));
        }
        if let Some(hit) = self.limit_hit(job, None) {
            let l = self.user_limits_of(job.request.uid);
            let u = self.running_totals.of(job.request.uid);
            let why = match hit {
                LimitHit::Jobs => format!(
                    "the user runs {} job{} already, the most one user may run at once",
                    u.jobs,
                    plural(u.jobs as usize)
                ),
                LimitHit::Gpus => format!(
                    "it needs {} GPU{}; the user's running jobs hold {} of the {} one user may hold at once",
                    job.request.gpus,
                    plural(job.request.gpus as usize),
                    u.gpus,
                    l.max_gpus.unwrap_or(0)
                ),
                LimitHit::GpuMem => format!(
                    "it reserves at least {} MiB of GPU memory; the user's running jobs reserve {} of the {} MiB one user may reserve at once",
                    limits::min_mem_charge(&self.gpus, &job.request),
                    u.gpu_mem_mib,
                    l.max_gpu_mem_mib.unwrap_or(0)
                ),
            };
            return Some(format!(
                "{code}: {why} (a limit set by the administrator); it starts when the user's running jobs leave room"
            ));
        }
        let r = &job.request;
        let needs = match r.mem_mib {
            None => {
                let free = self.gpus.iter().filter(|g| g.is_idle()).count();
                format!(
                    "needs {} whole GPU{}, {} free now",
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
                    "needs {} GPU{} with {} MiB free each, {} such now",
                    r.gpus,
                    plural(r.gpus as usize),
                    mem,
                    fitting
                )
            }
        };
        let by = |start: Option<Millis>| match start {
            Some(t) if t > self.last_now => format!(
                "expected to start within {}",
                timefmt::format_duration((t - self.last_now).div_ceil(1000))
            ),
            Some(_) => "expected to start as soon as a running job ends".to_string(),
            None => "start unknown: memory used outside mgpu blocks it".to_string(),
        };
        let reserved = self.reservation.as_ref().map(|res| (res.job, res.start_at));
        Some(match (code, reserved) {
            ("Resources", Some((rid, start))) if rid == id => {
                format!("{code}: {needs}; it holds the reservation, {}", by(start))
            }
            ("Reservation", Some((rid, start))) => {
                let estimate = match self.effective_limit_s(r) {
                    Some(s) => format!("its time limit, {}", timefmt::format_duration(s)),
                    None => format!(
                        "{}, the estimate for a job without a time limit ({})",
                        timefmt::format_duration(job.estimate_ms.div_ceil(1000)),
                        if matches!(job.estimate_source, EstimateSource::Learned { .. }) {
                            "from your recent runs"
                        } else {
                            "the server's default"
                        }
                    ),
                };
                format!(
                    "{code}: it fits now, but it would delay job {rid}, which holds the reservation ({}): it may run for {estimate}; a --time-limit that ends before then lets it start now",
                    by(start)
                )
            }
            ("Priority", Some((rid, start))) => format!(
                "{code}: {needs}; job {rid} of higher priority goes first (it holds the reservation, {})",
                by(start)
            ),
            _ => format!("{code}: {needs}"),
        })
    }
}

/// Per-user views for reports and metrics (O(users), never O(jobs)).
impl Scheduler {
    /// A user's fair-share standing at `now`: what [`Policy::Fair`] orders their jobs by.
    pub fn standing(&self, uid: u32, now: Millis) -> UserStanding {
        UserStanding {
            uid,
            usage_gpu_s: self.user_usage_gpu_s(uid, now),
            weight: self.config.fair.weight(uid),
            priority_s: self.user_priority_term(uid, now),
        }
    }

    /// The standing of every user with recent usage or a job in the queue, by uid.
    pub fn standings(&self, now: Millis) -> Vec<UserStanding> {
        let mut uids: BTreeSet<u32> = self.usage.keys().copied().collect();
        uids.extend(self.user_queues.keys().copied());
        uids.extend(self.throttles.values().map(|t| t.uid));
        uids.into_iter().map(|u| self.standing(u, now)).collect()
    }

    /// Pending jobs per user (held array tasks too), by uid.
    pub fn pending_by_user(&self) -> BTreeMap<u32, usize> {
        let mut out: BTreeMap<u32, usize> = self
            .user_queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(uid, q)| (*uid, q.len()))
            .collect();
        for t in self.throttles.values() {
            if !t.held.is_empty() {
                *out.entry(t.uid).or_default() += t.held.len();
            }
        }
        out
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
impl Scheduler {
    /// A pass that looks at every pending job, under the same reservation (tests compare it
    /// with the incremental pass).
    fn schedule_rescanning_all(&mut self, now: Millis) -> Vec<Assignment> {
        self.schedule_pass(now, true)
    }
}

#[cfg(test)]
mod tests;
