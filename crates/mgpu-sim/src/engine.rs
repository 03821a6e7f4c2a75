//! The replay engine: a discrete-event loop in virtual time, and the schedulers it drives.
//!
//! Events at the same instant are handled as the daemon would see them: ends first (their GPUs
//! are free), then submissions, then one scheduling pass. Real policies run through
//! [`mgpu_core::Scheduler`] exactly as the daemon drives it; the baselines that are not server
//! policies (strict FIFO, oracle shortest-job-first) live here, on the same GPU placement.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::ops::Bound::{Excluded, Unbounded};

use anyhow::bail;
use mgpu_core::placement::{self, GpuState};
use mgpu_core::{
    Config, GpuSpec, JobId, JobRequest, JobState, Millis, Policy, Scheduler, TimeAction,
};

use crate::workload::SimJob;

/// What the engine needs from a scheduler. Jobs are named by their index in the workload.
pub trait SimScheduler {
    fn submit(&mut self, job: usize, request: JobRequest, true_duration_ms: Millis, now: Millis);
    /// The job's processes are gone; `timed_out`: it was stopped at its time limit.
    fn finish(&mut self, job: usize, timed_out: bool);
    /// Jobs to start now, with the GPU indices they get.
    fn schedule(&mut self, now: Millis) -> Vec<(usize, Vec<u32>)>;
    /// Time-limit decisions due now: jobs to stop, and whether each goes back to the queue
    /// (a context switch) or ends (TIMEOUT). Schedulers without time limits have none.
    fn time_actions(&mut self, _now: Millis) -> Vec<(usize, Stop)> {
        Vec::new()
    }
    /// A job stopped for a context switch is back in the queue.
    fn requeue(&mut self, _job: usize, _now: Millis) {}
    /// When [`SimScheduler::time_actions`] may next have something to do.
    fn next_deadline(&self, _now: Millis) -> Option<Millis> {
        None
    }
}

/// How a job is stopped at its time limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Context switch: it goes back to the queue and later restarts from its command.
    Requeue,
    /// It ends as TIMEOUT.
    Timeout,
}

/// Which scheduler a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimPolicy {
    /// Head-of-line blocking: nothing starts while the oldest job waits.
    StrictFifo,
    /// One of the server's policies (`Fifo` is first-fit).
    Core(Policy),
    /// Shortest true duration first, first-fit: a near-bound on mean wait (it knows the future).
    OracleSjf,
}

impl SimPolicy {
    pub const ALL: [SimPolicy; 5] = [
        SimPolicy::StrictFifo,
        SimPolicy::Core(Policy::Fifo),
        SimPolicy::Core(Policy::Backfill),
        SimPolicy::Core(Policy::Fair),
        SimPolicy::OracleSjf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SimPolicy::StrictFifo => "strict-fifo",
            SimPolicy::Core(Policy::Fifo) => "fifo-firstfit",
            SimPolicy::Core(p) => p.as_str(),
            SimPolicy::OracleSjf => "oracle-sjf",
        }
    }

    pub fn parse(s: &str) -> Option<SimPolicy> {
        match s.to_ascii_lowercase().as_str() {
            "fifo" | "first-fit" => Some(SimPolicy::Core(Policy::Fifo)),
            "strict" => Some(SimPolicy::StrictFifo),
            "sjf" => Some(SimPolicy::OracleSjf),
            other => SimPolicy::ALL.into_iter().find(|p| p.name() == other),
        }
    }

    /// A fresh scheduler of this kind on `gpus`; `config` is used by the core policies.
    pub fn build(self, gpus: &[GpuSpec], config: &Config) -> Box<dyn SimScheduler> {
        match self {
            SimPolicy::Core(policy) => Box::new(CoreScheduler::new(
                gpus,
                Config {
                    policy,
                    ..config.clone()
                },
            )),
            SimPolicy::StrictFifo => Box::new(Baseline::new(gpus, BaselineOrder::StrictFifo)),
            SimPolicy::OracleSjf => Box::new(Baseline::new(gpus, BaselineOrder::OracleSjf)),
        }
    }
}

/// How a job's replay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It ran to its end.
    Completed,
    /// Stopped at its time limit for good (no requeue, or out of restarts).
    Timeout,
    /// The server would refuse it (wider than the server, more memory than a GPU has, ...): it
    /// never runs and is left out of the measures, but counted.
    Refused,
}

/// When each job started (its last run) and ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub start_ms: Millis,
    pub end_ms: Millis,
    /// GPU-equivalents it used (mem/total per shared GPU).
    pub share: f64,
    /// Context switches it went through (each restarted it from its command).
    pub restarts: u32,
    /// GPU-equivalent milliseconds of its earlier runs, lost to context switches.
    pub lost_share_ms: f64,
    /// Its earlier runs, each stopped by a context switch: (start, stop, GPU-equivalents).
    pub earlier_runs: Vec<(Millis, Millis, f64)>,
    pub end: End,
}

/// The request a job makes of the scheduler.
pub fn request_of(job: &SimJob) -> JobRequest {
    JobRequest {
        uid: job.uid,
        user: job.user.clone(),
        name: String::new(),
        gpus: job.gpus,
        mem_mib: job.mem_mib,
        time_limit_s: job.time_limit_s,
        nice: 0,
        no_requeue: false,
        max_restarts: None,
        warn_signal: None,
        array: None,
    }
}

/// Replays `jobs` to the end; every job the server accepts must run to its end or time out.
///
/// Per instant, as the daemon sees events: ends first (their GPUs are free), then submissions,
/// then what the daemon does after every event — scheduling passes until nothing more starts,
/// then the time-limit decisions ([`mgpu_core::Scheduler::time_actions`]). A switched job's
/// processes are taken to be gone at once: it is requeued at the same instant (the daemon's
/// exit event) and the passes run again; it restarts from its command later, its earlier run
/// lost. A timer wakes the loop at the core's next deadline, as the daemon's one timer does.
/// Jobs the daemon would refuse ([`mgpu_core::Scheduler::check_feasible`]) are refused.
pub fn replay(
    jobs: &[SimJob],
    gpus: &[GpuSpec],
    scheduler: &mut dyn SimScheduler,
) -> anyhow::Result<Vec<Outcome>> {
    let judge = Scheduler::new(gpus.to_vec(), Config::default(), 1);
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (jobs[i].submit_ms, i));
    let mut arrivals = order.into_iter().peekable();
    // (end, job, run): an entry whose run is not the job's current one is stale.
    let mut ends: BinaryHeap<Reverse<(Millis, usize, u32)>> = BinaryHeap::new();
    let mut outcomes: Vec<Option<Outcome>> = vec![None; jobs.len()];
    let mut run_of: Vec<u32> = vec![0; jobs.len()];
    let mut running: Vec<bool> = vec![false; jobs.len()];
    let mut deadline: Option<Millis> = None;
    let spec_of: HashMap<u32, &GpuSpec> = gpus.iter().map(|g| (g.index, g)).collect();
    loop {
        while let Some(&Reverse((_, job, run))) = ends.peek() {
            if running[job] && run_of[job] == run {
                break;
            }
            ends.pop(); // stale: that run was stopped
        }
        let next_arrival = arrivals.peek().map(|&i| jobs[i].submit_ms);
        let next_end = ends.peek().map(|Reverse((t, _, _))| *t);
        let now = match (next_arrival, next_end, deadline) {
            (None, None, _) => break,
            (a, e, d) => a
                .unwrap_or(Millis::MAX)
                .min(e.unwrap_or(Millis::MAX))
                .min(d.unwrap_or(Millis::MAX)),
        };
        while let Some(&Reverse((t, job, run))) = ends.peek() {
            if t != now {
                break;
            }
            ends.pop();
            if running[job] && run_of[job] == run {
                running[job] = false;
                scheduler.finish(job, false);
            }
        }
        while let Some(&i) = arrivals.peek() {
            if jobs[i].submit_ms != now {
                break;
            }
            arrivals.next();
            let request = request_of(&jobs[i]);
            if judge.check_feasible(&request).is_err() {
                outcomes[i] = Some(Outcome {
                    start_ms: now,
                    end_ms: now,
                    share: 0.0,
                    restarts: 0,
                    lost_share_ms: 0.0,
                    earlier_runs: Vec::new(),
                    end: End::Refused,
                });
                continue;
            }
            scheduler.submit(i, request, jobs[i].duration_ms, now);
        }
        loop {
            let starts = scheduler.schedule(now);
            let progressed = !starts.is_empty();
            for (job, held) in starts {
                if running[job]
                    || outcomes[job]
                        .as_ref()
                        .is_some_and(|o| o.end != End::Completed)
                {
                    bail!("job {job} started while running or after it ended");
                }
                if outcomes[job]
                    .as_ref()
                    .is_some_and(|o| o.restarts == run_of[job])
                {
                    bail!("job {job} started twice");
                }
                let end_ms = now.saturating_add(jobs[job].duration_ms);
                let share = match jobs[job].mem_mib {
                    None => held.len() as f64,
                    Some(mem) => held
                        .iter()
                        .map(|i| (mem as f64 / spec_of[i].total_mib as f64).min(1.0))
                        .sum(),
                };
                let (lost, earlier_runs) = outcomes[job]
                    .take()
                    .map_or((0.0, Vec::new()), |o| (o.lost_share_ms, o.earlier_runs));
                outcomes[job] = Some(Outcome {
                    start_ms: now,
                    end_ms,
                    share,
                    restarts: run_of[job],
                    lost_share_ms: lost,
                    earlier_runs,
                    end: End::Completed,
                });
                running[job] = true;
                ends.push(Reverse((end_ms, job, run_of[job])));
            }
            let actions = scheduler.time_actions(now);
            let stopped = !actions.is_empty();
            for (job, stop) in actions {
                if !running[job] {
                    bail!("job {job} stopped while not running");
                }
                running[job] = false;
                let o = outcomes[job]
                    .as_mut()
                    .expect("a running job has an outcome");
                match stop {
                    Stop::Requeue => {
                        o.lost_share_ms += o.share * (now - o.start_ms) as f64;
                        o.earlier_runs.push((o.start_ms, now, o.share));
                        run_of[job] += 1;
                        scheduler.requeue(job, now);
                    }
                    Stop::Timeout => {
                        o.end_ms = now;
                        o.end = End::Timeout;
                        scheduler.finish(job, true);
                    }
                }
            }
            if !progressed && !stopped {
                break;
            }
        }
        deadline = scheduler.next_deadline(now);
    }
    outcomes
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.ok_or_else(|| anyhow::anyhow!("job {i} never ran")))
        .collect()
}

/// A server policy, through the real core.
pub struct CoreScheduler {
    core: Scheduler,
    index_of: HashMap<JobId, usize>,
    id_of: HashMap<usize, JobId>,
}

impl CoreScheduler {
    pub fn new(gpus: &[GpuSpec], config: Config) -> Self {
        CoreScheduler {
            core: Scheduler::new(gpus.to_vec(), config, 1),
            index_of: HashMap::new(),
            id_of: HashMap::new(),
        }
    }

    pub fn core(&self) -> &Scheduler {
        &self.core
    }
}

impl SimScheduler for CoreScheduler {
    fn submit(&mut self, job: usize, request: JobRequest, _true_duration_ms: Millis, now: Millis) {
        // The engine refuses what the server would refuse, so the core accepts the rest.
        let id = self
            .core
            .submit(request, now)
            .expect("the engine refuses jobs the server would refuse");
        self.index_of.insert(id, job);
        self.id_of.insert(job, id);
    }

    fn finish(&mut self, job: usize, timed_out: bool) {
        let id = self.id_of.remove(&job).expect("a started job");
        self.index_of.remove(&id);
        let state = if timed_out {
            JobState::Timeout
        } else {
            JobState::Completed
        };
        self.core.finish(id, state);
    }

    fn schedule(&mut self, now: Millis) -> Vec<(usize, Vec<u32>)> {
        self.core
            .schedule(now)
            .into_iter()
            .map(|a| (self.index_of[&a.job], a.gpus))
            .collect()
    }

    fn time_actions(&mut self, now: Millis) -> Vec<(usize, Stop)> {
        self.core
            .time_actions(now)
            .into_iter()
            .filter_map(|a| match a {
                TimeAction::Warn { .. } => None,
                TimeAction::Requeue { job } => Some((self.index_of[&job], Stop::Requeue)),
                TimeAction::Timeout { job } => Some((self.index_of[&job], Stop::Timeout)),
            })
            .collect()
    }

    fn requeue(&mut self, job: usize, now: Millis) {
        self.core.requeue(self.id_of[&job], now);
    }

    fn next_deadline(&self, now: Millis) -> Option<Millis> {
        self.core.next_deadline(now)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BaselineOrder {
    StrictFifo,
    OracleSjf,
}

/// The baselines that are not server policies, on the core's GPU placement.
struct Baseline {
    order: BaselineOrder,
    gpus: Vec<GpuState>,
    requests: HashMap<usize, JobRequest>,
    /// Strict FIFO's queue.
    fifo: VecDeque<usize>,
    /// SJF's queue: (true duration, job).
    by_duration: BTreeSet<(Millis, usize)>,
    /// Pending jobs per shape (SJF stops scanning once every shape is blocked).
    shapes: HashMap<(u32, Option<u64>), usize>,
}

impl Baseline {
    fn new(gpus: &[GpuSpec], order: BaselineOrder) -> Self {
        Baseline {
            order,
            gpus: gpus.iter().cloned().map(GpuState::new).collect(),
            requests: HashMap::new(),
            fifo: VecDeque::new(),
            by_duration: BTreeSet::new(),
            shapes: HashMap::new(),
        }
    }

    fn start(&mut self, job: usize, started: &mut Vec<(usize, Vec<u32>)>) -> bool {
        let request = &self.requests[&job];
        let Some(chosen) = placement::choose(&self.gpus, request) else {
            return false;
        };
        placement::reserve(&mut self.gpus, &chosen, job as JobId, request);
        started.push((job, chosen));
        true
    }
}

impl SimScheduler for Baseline {
    fn submit(&mut self, job: usize, request: JobRequest, true_duration_ms: Millis, _now: Millis) {
        *self
            .shapes
            .entry((request.gpus, request.mem_mib))
            .or_default() += 1;
        self.requests.insert(job, request);
        match self.order {
            BaselineOrder::StrictFifo => self.fifo.push_back(job),
            BaselineOrder::OracleSjf => {
                self.by_duration.insert((true_duration_ms, job));
            }
        }
    }

    fn finish(&mut self, job: usize, _timed_out: bool) {
        let request = self.requests.remove(&job).expect("a started job");
        placement::release(&mut self.gpus, job as JobId, &request);
    }

    fn schedule(&mut self, _now: Millis) -> Vec<(usize, Vec<u32>)> {
        let mut started = Vec::new();
        match self.order {
            BaselineOrder::StrictFifo => {
                while let Some(&job) = self.fifo.front() {
                    if !self.start(job, &mut started) {
                        break;
                    }
                    self.fifo.pop_front();
                }
            }
            BaselineOrder::OracleSjf => {
                let mut blocked: HashSet<(u32, Option<u64>)> = HashSet::new();
                let mut after: Option<(Millis, usize)> = None;
                loop {
                    let next = match after {
                        None => self.by_duration.iter().next(),
                        Some(k) => self.by_duration.range((Excluded(k), Unbounded)).next(),
                    };
                    let Some(&(duration, job)) = next else { break };
                    after = Some((duration, job));
                    if !placement::any_capacity(&self.gpus) || blocked.len() == self.shapes.len() {
                        break;
                    }
                    let shape = {
                        let r = &self.requests[&job];
                        (r.gpus, r.mem_mib)
                    };
                    if blocked.contains(&shape) {
                        continue;
                    }
                    if self.start(job, &mut started) {
                        self.by_duration.remove(&(duration, job));
                        let left = self.shapes.get_mut(&shape).expect("counted");
                        *left -= 1;
                        if *left == 0 {
                            self.shapes.remove(&shape);
                        }
                    } else {
                        blocked.insert(shape);
                    }
                }
            }
        }
        if self.order == BaselineOrder::StrictFifo {
            for (job, _) in &started {
                let r = &self.requests[job];
                let shape = (r.gpus, r.mem_mib);
                let left = self.shapes.get_mut(&shape).expect("counted");
                *left -= 1;
                if *left == 0 {
                    self.shapes.remove(&shape);
                }
            }
        }
        started
    }
}
