//! What keeps a pending job out of the queue besides its array's cap: a hold (`--hold`,
//! `mgpu_control hold`) and dependencies (`--dependency`, Slurm's meaning).
//!
//! A gated job is *parked*: pending, but in none of the queue's indexes, so a pass never sees
//! it. Its dependencies are settled by events, never by rescanning: each dependency target
//! lists its dependents, and when a target starts or ends only those are looked at (O(deps)
//! per event, whatever the number of finished jobs). Targets that ended before the job entered
//! the core are settled from what the shell looks up ([`TargetState`]). A job whose gate opens
//! enters the queue at the place its submission gave it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{JobId, JobState, Requester, Scheduler};

/// Who holds a job: its owner (`JobHeldUser`) or root (`JobHeldAdmin`, which only root may
/// release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    User,
    Admin,
}

/// Slurm's dependency types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepKind {
    /// The target started (or ended).
    After,
    /// The target ended, however.
    AfterAny,
    /// The target ended COMPLETED (exit 0).
    AfterOk,
    /// The target ended in any other terminal state (failed, cancelled, timed out, ...).
    AfterNotOk,
    /// No other job of the same user and name is running, nor an earlier one pending.
    Singleton,
}

impl DepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DepKind::After => "after",
            DepKind::AfterAny => "afterany",
            DepKind::AfterOk => "afterok",
            DepKind::AfterNotOk => "afternotok",
            DepKind::Singleton => "singleton",
        }
    }
}

/// One dependency on one job (`job` is 0 for `singleton`), or, with `tasks` > 0, on every task
/// of the job array `job` (its tasks are jobs `job` to `job + tasks - 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepItem {
    pub kind: DepKind,
    pub job: JobId,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tasks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What is known of a job array that jobs wait on: its tasks not ended yet, whether one
/// ended otherwise than COMPLETED, whether one started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ArrayCount {
    live: u32,
    bad: bool,
    started: bool,
}

impl ArrayCount {
    /// What the items on the array depend on: a change of it may settle some, any other
    /// change (one more task of many ended) settles none.
    fn flags(self) -> (bool, bool, bool) {
        (self.live == 0, self.bad, self.started)
    }
}

/// A job array that jobs wait on as a whole: its count, taken when the first of them entered
/// and followed by its tasks' starts and ends, and the parked jobs whose item on it is still
/// open. A task's event costs O(1) unless it changes what the items depend on
/// ([`ArrayCount::flags`]), which happens at most three times in the array's life; only then
/// are its dependents looked at.
/// Counts of finished job arrays kept with no job waiting on them (see
/// `Scheduler::watch_idle`): each costs a few dozen bytes, and saves the next job that names
/// its array a count of its tasks.
pub const MAX_IDLE_WATCHES: usize = 4096;

#[derive(Debug, Clone, Default)]
pub(crate) struct ArrayWatch {
    tasks: u32,
    count: ArrayCount,
    dependents: BTreeSet<JobId>,
}

/// Status of an item on a whole job array: `after` once a task started (or all ended), the
/// others once every task ended (`afterok`: all COMPLETED; `afternotok`: one did not), `afterok`
/// never again as soon as one task did not complete.
fn array_status(kind: DepKind, c: ArrayCount) -> Status {
    let done = c.live == 0;
    match kind {
        DepKind::After if c.started || done => Status::Met,
        DepKind::AfterAny if done => Status::Met,
        DepKind::AfterOk if c.bad => Status::Never,
        DepKind::AfterOk if done => Status::Met,
        DepKind::AfterNotOk if done && c.bad => Status::Met,
        DepKind::AfterNotOk if done => Status::Never,
        _ => Status::Wait,
    }
}

/// A job's dependencies with their targets resolved to job ids (a job array's id stands for
/// all its tasks). `any`: one satisfied item is enough (`?`), else all must be (`,`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    pub any: bool,
    pub items: Vec<DepItem>,
    /// As the user wrote it (for display).
    #[serde(default)]
    pub text: String,
}

/// A target as the user wrote it: a job (or a whole job array, by its id), or one task of an
/// array (`ID_TASK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepTarget {
    Job(JobId),
    Task(JobId, u32),
}

/// A parsed `--dependency` value, before its targets are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepSpec {
    pub any: bool,
    pub items: Vec<(DepKind, Option<DepTarget>)>,
}

/// Most dependency items one job may have (a whole job array is one).
pub const MAX_DEP_ITEMS: usize = 64;
/// Longest `--dependency` text.
pub const MAX_DEP_TEXT: usize = 4096;

/// Parses Slurm's `--dependency` syntax: `afterok:5:6,afterany:7_2,singleton` (all of them)
/// or `afterok:5?afternotok:6` (any one).
pub fn parse_dependency(text: &str) -> Result<DepSpec, String> {
    let bad = |why: String| {
        format!(
            "invalid --dependency '{text}': {why} (e.g. afterok:12, afterany:12:13, \
             afternotok:12, after:12, afterok:12_3, singleton; ',' joins conditions that must \
             all hold, '?' ones of which any one is enough)"
        )
    };
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty".into()));
    }
    if t.len() > MAX_DEP_TEXT {
        return Err(format!(
            "invalid --dependency: longer than {MAX_DEP_TEXT} bytes"
        ));
    }
    let (any, parts): (bool, Vec<&str>) = match (t.contains(','), t.contains('?')) {
        (true, true) => return Err(bad("',' and '?' cannot be mixed".into())),
        (false, true) => (true, t.split('?').collect()),
        _ => (false, t.split(',').collect()),
    };
    let mut items = Vec::new();
    for part in parts {
        let mut words = part.split(':');
        let kind = match words
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "after" => DepKind::After,
            "afterany" => DepKind::AfterAny,
            "afterok" => DepKind::AfterOk,
            "afternotok" => DepKind::AfterNotOk,
            "singleton" => DepKind::Singleton,
            "aftercorr" | "afterburstbuffer" => {
                return Err(bad(format!(
                    "'{}' is not supported by mgpu",
                    part.split(':').next().unwrap_or("")
                )))
            }
            "" => return Err(bad("empty condition".into())),
            other => return Err(bad(format!("unknown type '{other}'"))),
        };
        let targets: Vec<&str> = words.collect();
        if kind == DepKind::Singleton {
            if !targets.is_empty() {
                return Err(bad("singleton takes no job ids".into()));
            }
            items.push((kind, None));
            continue;
        }
        if targets.is_empty() {
            return Err(bad(format!("{} needs at least one job id", kind.as_str())));
        }
        for target in targets {
            let target = target.trim();
            // Slurm's `after:ID+MINUTES` is not supported: say so rather than ignore it.
            if target.contains('+') {
                return Err(bad("a delay ('+minutes') is not supported".into()));
            }
            let id = |s: &str| {
                s.parse::<JobId>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(format!("'{target}' is not a job id")))
            };
            let t = match target.split_once('_') {
                Some((job, task)) => DepTarget::Task(
                    id(job)?,
                    task.parse()
                        .map_err(|_| bad(format!("'{target}' is not a job array task")))?,
                ),
                None => DepTarget::Job(id(target)?),
            };
            items.push((kind, Some(t)));
        }
    }
    if items.len() > MAX_DEP_ITEMS {
        return Err(bad(format!("at most {MAX_DEP_ITEMS} job ids")));
    }
    Ok(DepSpec { any, items })
}

/// What keeps a new job out of the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    pub hold: Option<Hold>,
    pub dependency: Option<Dependency>,
}

impl Gate {
    pub fn is_open(&self) -> bool {
        self.hold.is_none() && self.dependency.is_none()
    }
}

/// What the shell knows of a target the core does not hold (it ended before, or it is being
/// restored after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Pending or running (it enters the core too, e.g. later in a recovery).
    Live,
    Ended(JobState),
    /// Its record is gone (purged after the retention time): as in Slurm, the dependency on
    /// it is lifted.
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Wait,
    Met,
    Never,
}

/// A parked job's gate as the core tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gated {
    pub(crate) hold: Option<Hold>,
    dependency: Option<Dependency>,
    status: Vec<Status>,
    /// Waits in `singleton_waiters`.
    singleton: bool,
}

/// Why a job is parked, for the queue's REASON.
impl Gated {
    fn dependency_status(&self) -> Status {
        let Some(dep) = &self.dependency else {
            return Status::Met;
        };
        let mut met = 0;
        let mut never = 0;
        for s in &self.status {
            match s {
                Status::Met => met += 1,
                Status::Never => never += 1,
                Status::Wait => {}
            }
        }
        let n = self.status.len();
        if dep.any {
            if met > 0 || n == 0 {
                Status::Met
            } else if never == n {
                Status::Never
            } else {
                Status::Wait
            }
        } else if never > 0 {
            Status::Never
        } else if met == n {
            Status::Met
        } else {
            Status::Wait
        }
    }

    pub(crate) fn reason(&self) -> &'static str {
        match self.hold {
            Some(Hold::User) => "JobHeldUser",
            Some(Hold::Admin) => "JobHeldAdmin",
            None if self.dependency_status() == Status::Never => "DependencyNeverSatisfied",
            None => "Dependency",
        }
    }
}

/// Status of one item given how its target ended (or `None`: it started).
fn settle(kind: DepKind, ended: Option<JobState>) -> Option<Status> {
    Some(match (kind, ended) {
        (DepKind::After, _) => Status::Met,
        (_, None) => return None,
        (DepKind::AfterAny, Some(_)) => Status::Met,
        (DepKind::AfterOk, Some(JobState::Completed)) => Status::Met,
        (DepKind::AfterOk, Some(_)) => Status::Never,
        (DepKind::AfterNotOk, Some(JobState::Completed)) => Status::Never,
        (DepKind::AfterNotOk, Some(_)) => Status::Met,
        (DepKind::Singleton, _) => return None,
    })
}

/// Why a hold or release was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("no such pending or running job")]
    NotFound,
    #[error("permission denied (it belongs to another user)")]
    PermissionDenied,
    #[error("it is no longer pending (only pending jobs can be held)")]
    NotPending,
    #[error("it is held by root; only root can release it")]
    AdminHold,
    #[error("it is not held")]
    NotHeld,
    #[error("{0}")]
    Invalid(String),
}

/// A change to a job (`mgpu_control update`); `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobUpdate {
    pub name: Option<String>,
    pub nice: Option<i32>,
    pub gpus: Option<u32>,
    /// `Some(None)`: whole GPUs (exclusive).
    pub mem_mib: Option<Option<u64>>,
    /// `Some(None)` or `Some(Some(0))`: no limit of its own.
    pub time_limit_s: Option<Option<u64>>,
    /// Slurm's relative `TimeLimit=+N` / `-N`: seconds added to the job's current limit
    /// (negative: taken from it), instead of `time_limit_s`.
    pub time_limit_change_s: Option<i64>,
}

impl JobUpdate {
    /// The time limit this update gives a job whose limit is `current` (`None`: none of its
    /// own): `Ok(None)` when it leaves the limit as it is, `Ok(Some(None))` for no limit. A
    /// relative change needs a limit to change and must leave some time.
    pub fn time_limit_for(
        &self,
        current: Option<u64>,
    ) -> Result<Option<Option<u64>>, ControlError> {
        let Some(change) = self.time_limit_change_s else {
            return Ok(self.time_limit_s.map(|t| t.filter(|&s| s > 0)));
        };
        let Some(current) = current.filter(|&s| s > 0) else {
            return Err(ControlError::Invalid(
                "it has no time limit, so TimeLimit=+N/-N has nothing to add to or take from: \
                 give the new limit (e.g. TimeLimit=2:00:00)"
                    .into(),
            ));
        };
        let limit = i64::try_from(current)
            .ok()
            .and_then(|c| c.checked_add(change))
            .filter(|&s| s > 0)
            .ok_or_else(|| {
                ControlError::Invalid(format!(
                    "TimeLimit change of {}{} would leave no time: its limit is {}",
                    if change < 0 { "-" } else { "+" },
                    crate::timefmt::format_duration(change.unsigned_abs()),
                    crate::timefmt::format_duration(current)
                ))
            })?;
        Ok(Some(Some(limit as u64)))
    }
}

impl Scheduler {
    /// Queues a job that may be gated (held, or waiting on dependencies), with a known id
    /// (submission, or recovery after a restart). Targets the core does not hold are looked up
    /// with `lookup`. The gate is settled at the next [`Scheduler::schedule`].
    pub fn restore_pending_gated(
        &mut self,
        id: JobId,
        request: crate::JobRequest,
        submitted_at: crate::Millis,
        restarts: u32,
        gate: Gate,
        lookup: impl Fn(JobId) -> TargetState,
    ) -> Result<(), crate::SubmitError> {
        self.restore_pending_gated_behind(id, request, submitted_at, restarts, gate, None, lookup)
    }

    /// [`Scheduler::restore_pending_gated`] of a job that was requeued with the key floor
    /// `min_key` ([`crate::Job::min_key`]): after a restart it stays behind the jobs that were
    /// waiting when it was requeued.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_pending_gated_behind(
        &mut self,
        id: JobId,
        request: crate::JobRequest,
        submitted_at: crate::Millis,
        restarts: u32,
        gate: Gate,
        min_key: Option<i64>,
        lookup: impl Fn(JobId) -> TargetState,
    ) -> Result<(), crate::SubmitError> {
        if gate.is_open() {
            return self.restore_pending_behind(id, request, submitted_at, restarts, min_key);
        }
        self.check_feasible(&request)?;
        self.next_job_id = self.next_job_id.max(id + 1);
        let key = self.next_queue_key;
        self.next_queue_key += 1;
        self.name_entered(id, &request);
        let uid = request.uid;
        let mut job = crate::Job {
            queue_key: key,
            min_key: min_key.unwrap_or(i64::MIN),
            ..crate::Job::new(id, request, JobState::Pending, submitted_at, restarts)
        };
        let mut gated = Gated {
            hold: gate.hold,
            status: Vec::new(),
            singleton: false,
            dependency: None,
        };
        if let Some(dep) = gate.dependency {
            for item in &dep.items {
                if item.tasks > 0 && item.kind != DepKind::Singleton {
                    // A whole job array: its tasks are counted once, when the first job that
                    // waits on it enters, then followed by events; the count is kept also for
                    // jobs whose item is settled at once (`after` on a running array), so
                    // that each of them does not count the tasks again.
                    let c = match self.array_watches.get(&item.job) {
                        Some(w) if w.tasks == item.tasks => w.count,
                        _ => {
                            let c = self.count_array(item.job, item.tasks, &lookup);
                            let w = self.array_watches.entry(item.job).or_default();
                            *w = ArrayWatch {
                                tasks: item.tasks,
                                count: c,
                                dependents: std::mem::take(&mut w.dependents),
                            };
                            self.watch_idle(item.job);
                            c
                        }
                    };
                    let status = array_status(item.kind, c);
                    if status == Status::Wait {
                        if let Some(w) = self.array_watches.get_mut(&item.job) {
                            w.dependents.insert(id);
                        }
                    }
                    gated.status.push(status);
                    continue;
                }
                let status = if item.kind == DepKind::Singleton {
                    gated.singleton = true;
                    Status::Wait
                } else {
                    match self.jobs.get(&item.job) {
                        Some(t) if t.state == JobState::Running => {
                            settle(item.kind, None).unwrap_or(Status::Wait)
                        }
                        Some(_) => Status::Wait,
                        None => match lookup(item.job) {
                            TargetState::Live => Status::Wait,
                            TargetState::Gone => Status::Met,
                            TargetState::Ended(s) => {
                                settle(item.kind, Some(s)).unwrap_or(Status::Met)
                            }
                        },
                    }
                };
                if status == Status::Wait && item.kind != DepKind::Singleton {
                    let list = self.dependents.entry(item.job).or_default();
                    if list.last() != Some(&id) {
                        list.push(id);
                    }
                }
                gated.status.push(status);
            }
            *self.dep_items_by_user.entry(uid).or_default() += dep.items.len();
            gated.dependency = Some(dep);
        }
        if gated.singleton {
            self.singleton_waiters
                .entry((job.request.uid, job.request.name.clone()))
                .or_default()
                .insert(id);
        }
        job.gate = Some(Box::new(gated));
        self.jobs.insert(id, job);
        self.parked.insert(id);
        *self.parked_by_user.entry(uid).or_default() += 1;
        self.recheck.push(id);
        Ok(())
    }

    /// What a dependent entering now knows of the job array `array` of `tasks` tasks.
    /// O(tasks).
    fn count_array(
        &self,
        array: JobId,
        tasks: u32,
        lookup: &impl Fn(JobId) -> TargetState,
    ) -> ArrayCount {
        let mut c = ArrayCount::default();
        for task in array..array + JobId::from(tasks) {
            match self.jobs.get(&task) {
                Some(t) => {
                    c.live += 1;
                    c.started |= t.state == JobState::Running;
                }
                None => match lookup(task) {
                    TargetState::Live => c.live += 1,
                    TargetState::Ended(s) => {
                        c.bad |= s != JobState::Completed;
                        // It ran, unless it was cancelled (perhaps while waiting).
                        c.started |= s != JobState::Cancelled;
                    }
                    TargetState::Gone => {}
                },
            }
        }
        c
    }

    /// Settles the gates of the jobs marked for a look (at the start of a pass): a job whose
    /// gate opened enters the queue.
    pub(crate) fn recheck_gates(&mut self) {
        let mut ids = std::mem::take(&mut self.recheck);
        // Each job once, however many events named it (every job of a name that leaves names
        // the name's first singleton waiter).
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            let Some(g) = job.gate.as_ref() else {
                continue;
            };
            if g.singleton {
                let key = (job.request.uid, job.request.name.clone());
                // Blocked by an earlier job of the name (running or waiting ahead), or by a
                // later one that runs already (one running at a time, as in Slurm).
                // (A running job of the name is earlier or later: counted, not looked for,
                // so the check costs the same however many jobs share the name.)
                let earlier = self
                    .names
                    .get(&key)
                    .is_some_and(|s| s.range(..id).next().is_some())
                    || self.running_names.contains_key(&key);
                let dep = g.dependency.as_ref().expect("a singleton is a dependency");
                let pos = dep
                    .items
                    .iter()
                    .position(|i| i.kind == DepKind::Singleton)
                    .expect("listed");
                let status = if earlier { Status::Wait } else { Status::Met };
                let g = self.jobs.get_mut(&id).unwrap().gate.as_mut().unwrap();
                g.status[pos] = status;
            }
            let job = &self.jobs[&id];
            let g = job.gate.as_ref().unwrap();
            if g.hold.is_none() && g.dependency_status() == Status::Met {
                self.unpark(id);
            }
        }
    }

    /// A parked job enters the queue at its place (or waits behind its array's cap).
    fn unpark(&mut self, id: JobId) {
        let mut job = self.jobs.remove(&id).expect("a parked job");
        let g = job.gate.take().expect("parked");
        self.forget_dep_items(id, job.request.uid, &g);
        self.parked.remove(&id);
        if let Some(c) = self.parked_by_user.get_mut(&job.request.uid) {
            *c -= 1;
            if *c == 0 {
                self.parked_by_user.remove(&job.request.uid);
            }
        }
        if g.singleton {
            self.forget_singleton_waiter(id, &job.request);
        }
        if let Some(t) = self.throttle_of(&job.request) {
            if t.live >= t.limit {
                t.held.insert(id);
                job.held = true;
                self.jobs.insert(id, job);
                return;
            }
            t.live += 1;
        }
        self.index_pending(job);
    }

    /// A parked job stops waiting (its gate opened, or it left): its dependency items no
    /// longer count against its user, and no job array's watch keeps it.
    fn forget_dep_items(&mut self, id: JobId, uid: u32, g: &Gated) {
        if let Some(dep) = &g.dependency {
            for item in dep.items.iter().filter(|i| i.tasks > 0) {
                if let Some(w) = self.array_watches.get_mut(&item.job) {
                    w.dependents.remove(&id);
                    self.watch_idle(item.job);
                }
            }
        }
        let n = g.dependency.as_ref().map_or(0, |d| d.items.len());
        if let Some(c) = self.dep_items_by_user.get_mut(&uid) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.dep_items_by_user.remove(&uid);
            }
        }
    }

    /// Dependency targets of a user's waiting jobs, in all (what the daemon bounds per user).
    pub fn dependency_targets_of(&self, uid: u32) -> usize {
        self.dep_items_by_user.get(&uid).copied().unwrap_or(0)
    }

    fn forget_singleton_waiter(&mut self, id: JobId, request: &crate::JobRequest) {
        let key = (request.uid, request.name.clone());
        if let Some(w) = self.singleton_waiters.get_mut(&key) {
            w.remove(&id);
            if w.is_empty() {
                self.singleton_waiters.remove(&key);
            }
        }
    }

    /// A job of this user and name is live now (for `singleton`).
    pub(crate) fn name_entered(&mut self, id: JobId, request: &crate::JobRequest) {
        self.names
            .entry((request.uid, request.name.clone()))
            .or_default()
            .insert(id);
    }

    /// A job of this user and name is no longer live (it left, or was renamed): the first
    /// `singleton` job waiting on that name gets a look.
    fn name_left(&mut self, id: JobId, request: &crate::JobRequest) {
        let key = (request.uid, request.name.clone());
        if let Some(set) = self.names.get_mut(&key) {
            set.remove(&id);
            if set.is_empty() {
                self.names.remove(&key);
            }
        }
        if let Some(first) = self
            .singleton_waiters
            .get(&key)
            .and_then(|w| w.first().copied())
        {
            self.recheck.push(first);
        }
    }

    /// A job of this user and name started running (for `singleton`).
    pub(crate) fn name_started(&mut self, request: &crate::JobRequest) {
        *self
            .running_names
            .entry((request.uid, request.name.clone()))
            .or_default() += 1;
    }

    /// A running job of this user and name stopped running (ended or requeued).
    pub(crate) fn name_stopped(&mut self, request: &crate::JobRequest) {
        let key = (request.uid, request.name.clone());
        if let Some(n) = self.running_names.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.running_names.remove(&key);
            }
        }
    }

    /// A job left the core for good (ended, or cancelled while pending): its dependents and
    /// the next `singleton` job of its name get a look.
    pub(crate) fn job_left(&mut self, job: &crate::Job, state: JobState) {
        self.name_left(job.id, &job.request);
        if let Some(g) = &job.gate {
            self.forget_dep_items(job.id, job.request.uid, g);
            self.parked.remove(&job.id);
            if let Some(c) = self.parked_by_user.get_mut(&job.request.uid) {
                *c -= 1;
                if *c == 0 {
                    self.parked_by_user.remove(&job.request.uid);
                }
            }
            self.forget_singleton_waiter(job.id, &job.request);
        }
        self.target_event(job.id, job.request.array.map(|a| a.job), Some(state));
    }

    /// A dependency target (a task of job array `array`, if any) started (`ended`: `None`) or
    /// ended: its dependents' items are settled.
    pub(crate) fn target_event(
        &mut self,
        target: JobId,
        array: Option<JobId>,
        ended: Option<JobState>,
    ) {
        if let Some(array) = array {
            self.array_task_event(array, ended);
        }
        let dependents = if ended.is_some() {
            self.dependents.remove(&target).unwrap_or_default()
        } else {
            match self.dependents.get(&target) {
                Some(d) => d.clone(),
                None => return,
            }
        };
        for dep_id in dependents {
            let Some(g) = self.jobs.get_mut(&dep_id).and_then(|j| j.gate.as_mut()) else {
                continue;
            };
            let Some(dep) = g.dependency.as_ref() else {
                continue;
            };
            let mut changed = false;
            for (i, item) in dep.items.iter().enumerate() {
                if item.job == target && item.tasks == 0 && g.status[i] == Status::Wait {
                    if let Some(s) = settle(item.kind, ended) {
                        g.status[i] = s;
                        changed = true;
                    }
                }
            }
            if changed {
                self.recheck.push(dep_id);
            }
        }
    }

    /// A task of job array `array` started or ended: the array's count follows, and the jobs
    /// that wait on the whole array get a look when that changes what their items depend on.
    fn array_task_event(&mut self, array: JobId, ended: Option<JobState>) {
        let Some(w) = self.array_watches.get_mut(&array) else {
            return;
        };
        let before = w.count.flags();
        match ended {
            Some(s) => {
                w.count.live = w.count.live.saturating_sub(1);
                w.count.bad |= s != JobState::Completed;
                // It ran, unless it was cancelled (as a fresh count sees it).
                w.count.started |= s != JobState::Cancelled;
            }
            None => w.count.started = true,
        }
        if w.count.flags() == before || w.dependents.is_empty() {
            if w.dependents.is_empty() {
                self.watch_idle(array);
            }
            return;
        }
        let count = w.count;
        let dependents = std::mem::take(&mut w.dependents);
        let mut still = BTreeSet::new();
        for dep_id in dependents {
            let Some(g) = self.jobs.get_mut(&dep_id).and_then(|j| j.gate.as_mut()) else {
                continue;
            };
            let Some(dep) = g.dependency.as_ref() else {
                continue;
            };
            let mut changed = false;
            let mut waits = false;
            for (i, item) in dep.items.iter().enumerate() {
                if item.job != array || item.tasks == 0 || g.status[i] != Status::Wait {
                    continue;
                }
                let s = array_status(item.kind, count);
                if s != Status::Wait {
                    g.status[i] = s;
                    changed = true;
                } else {
                    waits = true;
                }
            }
            if changed {
                self.recheck.push(dep_id);
            }
            if waits {
                still.insert(dep_id);
            }
        }
        if let Some(w) = self.array_watches.get_mut(&array) {
            w.dependents = still;
        }
        self.watch_idle(array);
    }

    /// A watch that no job waits on stays while its array has tasks left (events keep its
    /// count, and it saves the next dependent a count); once the array has none, at most
    /// [`MAX_IDLE_WATCHES`] such finished counts are kept, the oldest dropped first.
    fn watch_idle(&mut self, array: JobId) {
        let Some(w) = self.array_watches.get(&array) else {
            return;
        };
        if !w.dependents.is_empty() || w.count.live > 0 {
            return;
        }
        self.idle_watches.push_back(array);
        while self.idle_watches.len() > MAX_IDLE_WATCHES {
            let Some(old) = self.idle_watches.pop_front() else {
                break;
            };
            if self
                .array_watches
                .get(&old)
                .is_some_and(|w| w.dependents.is_empty() && w.count.live == 0)
            {
                self.array_watches.remove(&old);
            }
        }
    }

    /// Whether the core keeps a count of job array `array`'s tasks.
    #[cfg(test)]
    pub(crate) fn array_is_counted(&self, array: JobId) -> bool {
        self.array_watches.contains_key(&array)
    }

    /// How many jobs wait on the whole job array `array`.
    #[cfg(test)]
    pub(crate) fn array_watch_len(&self, array: JobId) -> usize {
        self.array_watches
            .get(&array)
            .map_or(0, |w| w.dependents.len())
    }

    /// A job the core does not hold ended (e.g. one refused during a recovery; `array`: the job
    /// array it is a task of): its dependents are settled.
    pub fn target_ended(&mut self, target: JobId, array: Option<JobId>, state: JobState) {
        self.target_event(target, array, Some(state));
    }

    /// Holds a pending job: it leaves the queue (keeping its place) until released.
    pub fn hold(&mut self, id: JobId, by: Requester) -> Result<Hold, ControlError> {
        let job = self.jobs.get(&id).ok_or(ControlError::NotFound)?;
        if !by.may_manage(job.request.uid) {
            return Err(ControlError::PermissionDenied);
        }
        if job.state != JobState::Pending {
            return Err(ControlError::NotPending);
        }
        if self.deferred_at.contains_key(&id) {
            return Err(ControlError::Invalid(
                "it waits for its --begin time: hold it once that has come, or cancel it".into(),
            ));
        }
        let kind = if by.is_admin && by.uid == 0 && job.request.uid != 0 {
            Hold::Admin
        } else {
            Hold::User
        };
        if let Some(g) = self.jobs.get_mut(&id).unwrap().gate.as_mut() {
            // An admin hold stays one.
            if g.hold != Some(Hold::Admin) {
                g.hold = Some(kind);
            }
            return Ok(g.hold.unwrap());
        }
        let mut job = self.jobs.remove(&id).unwrap();
        if job.held {
            let array = job.request.array.map(|a| a.job).expect("a held task");
            if let Some(t) = self.throttles.get_mut(&array) {
                t.held.remove(&id);
            }
            self.forget_throttle_if_done(array);
            job.held = false;
        } else {
            self.unindex_pending(&job);
            self.task_left(&job.request);
            if self.reservation.as_ref().is_some_and(|r| r.job == id) {
                self.reservation = None;
                self.full_pass_needed = true;
            }
        }
        job.gate = Some(Box::new(Gated {
            hold: Some(kind),
            dependency: None,
            status: Vec::new(),
            singleton: false,
        }));
        self.parked.insert(id);
        *self.parked_by_user.entry(job.request.uid).or_default() += 1;
        self.jobs.insert(id, job);
        Ok(kind)
    }

    /// Releases a held job: it enters the queue at its old place once its dependencies, if
    /// any, are satisfied. Only root releases an admin hold.
    pub fn release(&mut self, id: JobId, by: Requester) -> Result<(), ControlError> {
        let job = self.jobs.get_mut(&id).ok_or(ControlError::NotFound)?;
        if !by.may_manage(job.request.uid) {
            return Err(ControlError::PermissionDenied);
        }
        let Some(g) = job.gate.as_mut().filter(|g| g.hold.is_some()) else {
            return Err(ControlError::NotHeld);
        };
        if g.hold == Some(Hold::Admin) && !(by.is_admin && by.uid == 0) {
            return Err(ControlError::AdminHold);
        }
        g.hold = None;
        self.recheck.push(id);
        Ok(())
    }

    /// Changes a job: a pending one's name, niceness, GPU request and time limit; a running
    /// one's name and time limit (its owner may only lower it, root may raise it too).
    pub fn update(&mut self, id: JobId, by: Requester, u: JobUpdate) -> Result<(), ControlError> {
        let job = self.jobs.get(&id).ok_or(ControlError::NotFound)?;
        if !by.may_manage(job.request.uid) {
            return Err(ControlError::PermissionDenied);
        }
        if u.nice.is_some_and(|n| n < 0) && !by.is_admin {
            return Err(ControlError::Invalid(
                "only root may raise a job's priority (negative Nice)".into(),
            ));
        }
        let mut request = job.request.clone();
        if let Some(n) = &u.name {
            request.name = n.clone();
        }
        if let Some(n) = u.nice {
            request.nice = n;
        }
        if let Some(g) = u.gpus {
            request.gpus = g;
        }
        if let Some(m) = u.mem_mib {
            request.mem_mib = m;
        }
        if let Some(t) = u.time_limit_for(job.request.time_limit_s)? {
            request.time_limit_s = t;
        }
        if job.state == JobState::Running {
            if u.nice.is_some() || u.gpus.is_some() || u.mem_mib.is_some() {
                return Err(ControlError::Invalid(
                    "it is running: only its time limit and name can change".into(),
                ));
            }
            let limit = |t: Option<u64>| t.filter(|&s| s > 0).unwrap_or(u64::MAX);
            if !by.is_admin && limit(request.time_limit_s) > limit(job.request.time_limit_s) {
                return Err(ControlError::Invalid(
                    "only root may raise the time limit of a running job (you may lower it)".into(),
                ));
            }
        } else if job.state != JobState::Pending {
            return Err(ControlError::NotFound);
        }
        self.check_feasible(&request)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let mut job = self.jobs.remove(&id).unwrap();
        let queued = job.state == JobState::Pending
            && !job.held
            && job.gate.is_none()
            && !self.deferred_at.contains_key(&id);
        if queued {
            self.unindex_pending(&job);
        }
        let renamed = job.request.name != request.name;
        if renamed {
            // Out of the old name's set (and waiters of it get a look), into the new one's.
            self.name_left(id, &job.request);
            if job.gate.as_ref().is_some_and(|g| g.singleton) {
                self.forget_singleton_waiter(id, &job.request);
                self.singleton_waiters
                    .entry((request.uid, request.name.clone()))
                    .or_default()
                    .insert(id);
                self.recheck.push(id);
            }
            self.name_entered(id, &request);
            if job.state == JobState::Running {
                // It runs under its new name now (for `singleton`).
                self.name_stopped(&job.request);
                self.name_started(&request);
            }
        }
        job.request = request;
        if queued {
            self.index_pending(job);
        } else {
            self.jobs.insert(id, job);
        }
        if self.reservation.as_ref().is_some_and(|r| r.job == id) {
            self.reservation = None;
        }
        self.full_pass_needed = true;
        self.no_switch = None;
        Ok(())
    }

    /// Takes a GPU out of service (`drained`) or back: a drained GPU gets no new jobs, those
    /// on it run on. Returns false for an unknown GPU.
    pub fn set_gpu_drained(&mut self, index: u32, drained: bool) -> bool {
        let Some(g) = self.gpus.iter_mut().find(|g| g.spec.index == index) else {
            return false;
        };
        if g.drained != drained {
            g.drained = drained;
            self.reservation = None;
            self.full_pass_needed = true;
        }
        true
    }

    /// Drains the whole server: nothing new starts (running jobs run on) until resumed.
    pub fn set_server_drained(&mut self, drained: bool) {
        if self.server_drained != drained {
            self.server_drained = drained;
            self.reservation = None;
            self.full_pass_needed = true;
        }
    }

    pub fn server_drained(&self) -> bool {
        self.server_drained
    }

    /// A pending job that cannot start until a drained GPU is back: fewer GPUs in service
    /// could hold it than it asks for.
    pub(crate) fn blocked_by_drain(&self, request: &crate::JobRequest) -> bool {
        let in_service = self
            .gpus
            .iter()
            .filter(|g| !g.drained && request.mem_mib.is_none_or(|m| g.spec.total_mib >= m))
            .count();
        in_service < request.gpus as usize
    }

    /// The parked jobs (held or waiting on dependencies), in id order.
    pub(crate) fn parked_ids(&self) -> impl Iterator<Item = &JobId> {
        self.parked.iter()
    }

    /// Jobs gated (held, or waiting on dependencies).
    pub fn parked_len(&self) -> usize {
        self.parked.len()
    }

    /// A human sentence for a parked job's REASON.
    pub(crate) fn gate_detail(&self, job: &crate::Job, g: &Gated) -> String {
        let code = g.reason();
        match g.hold {
            Some(Hold::User) => {
                return format!(
                    "{code}: held by its owner; 'mgpu_control release {}' lets it run",
                    job.id
                )
            }
            Some(Hold::Admin) => return format!("{code}: held by root; only root can release it"),
            None => {}
        }
        let dep = g.dependency.as_ref().expect("parked for its dependencies");
        let waiting: Vec<String> = dep
            .items
            .iter()
            .zip(&g.status)
            .filter(|(_, s)| {
                **s == if code == "Dependency" {
                    Status::Wait
                } else {
                    Status::Never
                }
            })
            .take(8)
            .map(|(i, _)| match i.kind {
                DepKind::Singleton => "singleton (another job of the same name)".to_string(),
                k if i.tasks > 0 => {
                    format!("{}:{} (job array, {} tasks)", k.as_str(), i.job, i.tasks)
                }
                k => format!("{}:{}", k.as_str(), i.job),
            })
            .collect();
        if code == "DependencyNeverSatisfied" {
            format!(
                "{code}: {} can no longer be satisfied; the job stays pending until you cancel it (mgpu_cancel {})",
                waiting.join(", "),
                job.id
            )
        } else {
            format!("{code}: waits for {}", waiting.join(", "))
        }
    }

    /// The job's hold, if it is held.
    pub fn hold_of(&self, id: JobId) -> Option<Hold> {
        self.jobs.get(&id)?.gate.as_ref()?.hold
    }

    /// The job's unsettled dependencies, as written, if it waits on any.
    pub fn dependency_of(&self, id: JobId) -> Option<&Dependency> {
        self.jobs.get(&id)?.gate.as_ref()?.dependency.as_ref()
    }
}
