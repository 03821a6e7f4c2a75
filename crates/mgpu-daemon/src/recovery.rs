//! Rebuilding the scheduler from the store at startup, so that a restart (clean or `kill -9`)
//! loses no job and runs none twice:
//! - jobs recorded as running are re-adopted when their supervisor still lives (their GPUs are
//!   booked again before anything new is scheduled), recorded with their real exit status when
//!   the supervisor finished meanwhile, and marked FAILED when it vanished without a record;
//! - pending jobs go back into the queue in their original order.

use std::collections::{HashMap, HashSet};

use mgpu_core::{Config, GpuSpec, JobId, JobState, Millis, Scheduler, TargetState};

use crate::handlers::queue::{display_command, ShownCommand};
use crate::state::outcome_of;
use crate::store::{Ending, Recovered, RecoveredJob};
use crate::supervisor::{ExitRecord, StopReason};

/// What a job's newest run directory says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunProbe {
    /// The job has no run directory: never started (or its end is already recorded).
    NoRun,
    /// Run `run` was prepared but never forked (no marker, no supervisor): it did not run.
    NotForked { run: u32 },
    /// Run `run`'s supervisor wrote its exit record.
    Exited { run: u32, rec: ExitRecord },
    /// Run `run`'s supervisor is alive (its socket answers); the job holds these GPUs since
    /// `started_at`.
    Alive {
        run: u32,
        gpus: Vec<u32>,
        started_at: Millis,
    },
    /// Run `run` was forked, but its supervisor is gone without a record.
    Gone { run: u32 },
}

/// The result: a scheduler holding the live and queued jobs, and what to record in the store.
pub struct Plan {
    pub sched: Scheduler,
    /// Shown commands of the live jobs.
    pub commands: HashMap<JobId, ShownCommand>,
    /// Running jobs to reconnect to, with their run number.
    pub adopt: Vec<(JobId, u32)>,
    /// Runs that could not be re-booked (e.g. their GPU is no longer managed): their
    /// supervisors must be told to stop.
    pub orphaned: Vec<(JobId, u32)>,
    /// Ends to record.
    pub ended: Vec<(JobId, Ending)>,
    /// Jobs context-switched while the server was down: (job, when, its next run number, its
    /// key floor: behind the queue as it was).
    pub requeued: Vec<(JobId, Millis, u32, Option<i64>)>,
    /// Runs whose supervisor is gone: whatever is left of them must be killed.
    pub lost_runs: Vec<(JobId, u32)>,
    /// Run directories of finished runs to remove once the store has the outcome.
    pub finished_runs: Vec<(JobId, u32)>,
    /// Runs that never started, moved aside (see `run::ABANDONED_PREFIX`): removed once their
    /// job's requeue is committed.
    pub abandoned_runs: Vec<(JobId, u32)>,
    /// Live jobs that had an attached `mgpu_srun`: cancelled unless it comes back.
    pub attached: Vec<JobId>,
}

pub fn recover(
    gpus: Vec<GpuSpec>,
    config: Config,
    recovered: Recovered,
    now: Millis,
    probe: impl Fn(JobId) -> RunProbe,
    target: impl Fn(JobId) -> TargetState,
) -> Plan {
    let mut sched = Scheduler::new(gpus, config, recovered.next_job_id);
    // Run-time estimates are learned from the records before any job is restored, so the
    // restored jobs are estimated as they were before the restart.
    for (uid, name, run_ms, time_limit_s) in &recovered.run_times {
        let request = mgpu_core::JobRequest {
            uid: *uid,
            name: name.clone(),
            time_limit_s: *time_limit_s,
            ..Default::default()
        };
        sched.learn_run(&request, *run_ms);
    }
    let mut specs: HashMap<JobId, ShownCommand> = HashMap::new();
    // A job array's tasks share their shown command.
    let mut shown_arrays: HashMap<JobId, ShownCommand> = HashMap::new();
    let mut shown = |job: &RecoveredJob| match job.request.array {
        Some(a) => shown_arrays
            .entry(a.job)
            .or_insert_with(|| display_command(&job.command))
            .clone(),
        None => display_command(&job.command),
    };
    let (mut adopt, mut orphaned, mut ended) = (Vec::new(), Vec::new(), Vec::new());
    let (mut requeued, mut lost_runs, mut finished_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut abandoned_runs = Vec::new();
    let failed = |message: &str| Ending {
        state: JobState::Failed,
        at: now,
        exit_code: None,
        signal: None,
        message: Some(message.to_string()),
    };
    // Started runs come first: their GPUs are taken before anything new is placed. Jobs
    // switched while the server was down go to the end, after the queue as it was.
    let (mut queued, mut switched) = (Vec::new(), Vec::new());
    let attached: Vec<JobId> = recovered
        .running
        .iter()
        .chain(&recovered.pending)
        .filter(|j| j.attached)
        .map(|j| j.id)
        .collect();
    for mut job in recovered.running.into_iter().chain(recovered.pending) {
        let recorded_running = job.started_at.is_some();
        match probe(job.id) {
            RunProbe::NoRun if !recorded_running => queued.push(job),
            // Recorded as running, but no trace of any run: its outcome cannot be known.
            RunProbe::NoRun => ended.push((
                job.id,
                failed("mgpu: the job's run directory vanished while the server was down; its outcome is unknown"),
            )),
            RunProbe::NotForked { run } => {
                // Prepared, never started: it simply runs (again) from the queue, under the
                // same run number (its directory was moved aside for it).
                job.restarts = run;
                abandoned_runs.push((job.id, run));
                queued.push(job);
            }
            RunProbe::Exited { run, rec }
                if rec.stopped == Some(StopReason::Requeue) && rec.start_error.is_none() =>
            {
                job.restarts = run + 1;
                job.submitted_at = rec.ended_at;
                requeued.push((job.id, rec.ended_at, run + 1));
                finished_runs.push((job.id, run));
                switched.push(job);
            }
            RunProbe::Exited { run, rec } => {
                let o = outcome_of(job.id, &rec);
                ended.push((
                    job.id,
                    Ending {
                        state: o.state,
                        at: rec.ended_at,
                        exit_code: o.exit_code,
                        signal: o.signal,
                        message: o.message,
                    },
                ));
                finished_runs.push((job.id, run));
            }
            RunProbe::Alive {
                run,
                gpus,
                started_at,
            } => {
                // The run's own record is the truth (the store may lag behind it).
                let command = shown(&job);
                match sched.restore_running(
                    job.id,
                    job.request,
                    gpus,
                    job.submitted_at,
                    started_at,
                    run,
                ) {
                    Ok(()) => {
                        specs.insert(job.id, command);
                        adopt.push((job.id, run));
                    }
                    Err(e) => {
                        orphaned.push((job.id, run));
                        ended.push((
                            job.id,
                            failed(&format!("mgpu: could not re-adopt the job after a restart: {e}")),
                        ));
                    }
                }
            }
            RunProbe::Gone { run } => {
                ended.push((
                    job.id,
                    failed("mgpu: the job's supervisor vanished while the server was down; its outcome is unknown"),
                ));
                lost_runs.push((job.id, run));
                finished_runs.push((job.id, run));
            }
        }
    }
    queued.sort_by_key(|j| (j.submitted_at, j.id));
    // Dependency targets that ended here are known from this recovery, the others from the
    // records (looked up by id, only for targets the core does not hold).
    let ended_here: HashMap<JobId, JobState> = ended.iter().map(|(id, e)| (*id, e.state)).collect();
    let switched_ids: HashSet<JobId> = switched.iter().map(|j| j.id).collect();
    for job in queued.into_iter().chain(switched) {
        // A job requeued before keeps its place behind the jobs waiting then; one switched
        // while the server was down goes behind the queue as it was, as a requeue does.
        let min_key = if switched_ids.contains(&job.id) {
            Some(sched.requeue_floor())
        } else {
            job.min_key
        };
        let command = shown(&job);
        let job_array = job.request.array.map(|a| a.job);
        let lookup = |t: JobId| match ended_here.get(&t) {
            Some(s) => TargetState::Ended(*s),
            None => target(t),
        };
        match sched.restore_pending_gated_behind(
            job.id,
            job.request,
            job.submitted_at,
            job.restarts,
            job.gate,
            min_key,
            lookup,
        ) {
            Ok(()) => {
                // A begin time that has passed is over (it would re-enter the job anew).
                if let Some(at) = job.begin_at.filter(|&at| at > now) {
                    sched.defer_until(job.id, at);
                }
                specs.insert(job.id, command);
            }
            Err(e) => {
                // Jobs restored before that wait on it learn that it ended.
                sched.target_ended(job.id, job_array, JobState::Failed);
                ended.push((
                    job.id,
                    failed(&format!("mgpu: refused after a restart: {e}")),
                ))
            }
        }
    }
    // Requeued jobs behind the jobs that entered the queue before them, under the weights of
    // this start (their recorded floors were keys under the last ones).
    sched.settle_floors();
    let requeued = requeued
        .into_iter()
        .map(|(id, at, restarts)| {
            let min_key = sched.queue_floor(id);
            (id, at, restarts, min_key)
        })
        .collect();
    Plan {
        sched,
        commands: specs,
        adopt,
        orphaned,
        ended,
        requeued,
        lost_runs,
        finished_runs,
        abandoned_runs,
        attached,
    }
}

#[cfg(test)]
mod tests {
    //! Property test of the core and the store together: any sequence of submits, starts,
    //! exits, cancels and crashes (with supervisors finishing while the server is down) loses
    //! no job and starts none twice.

    use std::collections::{HashMap, HashSet};

    use mgpu_core::{JobRequest, Requester};
    use mgpu_proto::Venv;
    use proptest::prelude::*;

    use super::*;
    use crate::exec::LaunchSpec;
    use crate::store::{NewJob, Store};

    #[derive(Debug, Clone)]
    enum Op {
        Submit {
            gpus: u32,
            mem: Option<u64>,
        },
        Exit(usize),
        Cancel(usize),
        /// Crash; supervisors whose index bit is set finish while the server is down.
        Crash(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u32..3, prop_oneof![Just(None), (1000u64..20_000).prop_map(Some)])
                .prop_map(|(gpus, mem)| Op::Submit { gpus, mem }),
            3 => any::<usize>().prop_map(Op::Exit),
            1 => any::<usize>().prop_map(Op::Cancel),
            1 => any::<u8>().prop_map(Op::Crash),
        ]
    }

    fn gpus() -> Vec<GpuSpec> {
        (0..2)
            .map(|i| GpuSpec {
                index: i,
                name: "sim".into(),
                total_mib: 24_000,
            })
            .collect()
    }

    /// What the run directories hold: the supervisors' view of the world.
    #[derive(Debug, Clone)]
    enum Run {
        Alive(Vec<u32>),
        Exited(ExitRecord),
    }

    fn exit_record(code: i32) -> ExitRecord {
        ExitRecord {
            exit_code: Some(code),
            signal: None,
            start_error: None,
            stopped: None,
            ended_at: 1,
            oom_killed: false,
        }
    }

    /// Run times learned before a restart are rebuilt from the records before the queue is
    /// restored: a job still waiting keeps the estimate its user's history gives it.
    #[tokio::test]
    async fn restored_jobs_are_estimated_from_the_recorded_runs() {
        let dir = tempfile::tempdir().unwrap();
        let request = JobRequest {
            uid: 1,
            user: "u".into(),
            name: "train".into(),
            gpus: 1,
            ..Default::default()
        };
        let spec = || LaunchSpec {
            command: vec!["true".into()],
            cwd: "/".into(),
            venv: Venv::Off,
            ..Default::default()
        };
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            for (id, minutes) in [(1, 10), (2, 12)] {
                store
                    .insert(NewJob {
                        id,
                        request: request.clone(),
                        spec: spec(),
                        submitted_at: 0,
                        attached: false,
                        gate: Default::default(),
                    })
                    .await
                    .unwrap()
                    .unwrap();
                store.started(id, 1_000, vec![0], 9);
                store.ended(
                    id,
                    crate::store::Ending {
                        state: JobState::Completed,
                        at: 1_000 + minutes * 60_000,
                        exit_code: Some(0),
                        signal: None,
                        message: None,
                    },
                );
            }
            store
                .insert(NewJob {
                    id: 3,
                    request: request.clone(),
                    spec: spec(),
                    submitted_at: 0,
                    attached: false,
                    gate: Default::default(),
                })
                .await
                .unwrap()
                .unwrap();
            store.flush().await;
        }
        let (_, rec) = Store::open(dir.path()).unwrap();
        let sched = recover(
            gpus(),
            Config::default(),
            rec,
            0,
            |_| RunProbe::NoRun,
            |_| TargetState::Gone,
        )
        .sched;
        assert_eq!(sched.job(3).unwrap().estimate_ms(), 11 * 60_000);
        assert_eq!(sched.estimate_ms(&request), 11 * 60_000);
    }

    /// A job switched while the server was down goes behind the queue as it was, whatever
    /// its estimate (here a 10 s limit against a waiting job's 24 h default), and its floor is
    /// in the plan for the store.
    #[tokio::test]
    async fn a_job_switched_while_the_server_was_down_goes_behind_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let request = |limit: Option<u64>| JobRequest {
            uid: 1,
            user: "u".into(),
            name: "j".into(),
            gpus: 1,
            time_limit_s: limit,
            ..Default::default()
        };
        {
            let (store, _) = Store::open(dir.path()).unwrap();
            for (id, limit) in [(1, Some(10)), (2, None)] {
                store
                    .insert(NewJob {
                        id,
                        request: request(limit),
                        spec: LaunchSpec {
                            command: vec!["true".into()],
                            cwd: "/".into(),
                            venv: Venv::Off,
                            ..Default::default()
                        },
                        submitted_at: 0,
                        attached: false,
                        gate: Default::default(),
                    })
                    .await
                    .unwrap()
                    .unwrap();
            }
            store.started(1, 1_000, vec![0], 9);
            store.flush().await;
        }
        let (_, rec) = Store::open(dir.path()).unwrap();
        let switched = ExitRecord {
            exit_code: None,
            signal: Some(15),
            start_error: None,
            stopped: Some(StopReason::Requeue),
            ended_at: 12_000,
            oom_killed: false,
        };
        let plan = recover(
            vec![gpus().remove(0)],
            Config::default(),
            rec,
            20_000,
            |id| match id {
                1 => RunProbe::Exited {
                    run: 0,
                    rec: switched.clone(),
                },
                _ => RunProbe::NoRun,
            },
            |_| TargetState::Gone,
        );
        assert_eq!(plan.sched.queue_position(2), Some(1));
        assert_eq!(plan.sched.queue_position(1), Some(2));
        let floor = plan.sched.queue_floor(1);
        assert!(floor.is_some());
        assert_eq!(plan.requeued, vec![(1, 12_000, 1, floor)]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn no_job_is_lost_or_run_twice(ops in prop::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let (store, rec) = Store::open(dir.path()).unwrap();
            let mut store = Some(store);
            let mut sched = recover(gpus(), Config::default(), rec, 0, |_| RunProbe::NoRun, |_| TargetState::Gone).sched;
            let mut runs: HashMap<JobId, Run> = HashMap::new();
            let mut starts: HashMap<JobId, usize> = HashMap::new();
            let mut submitted: Vec<JobId> = Vec::new();
            let mut ended: HashSet<JobId> = HashSet::new();
            let root = Requester { uid: 0, is_admin: true };
            for (t, op) in ops.into_iter().enumerate() {
                let now = t as Millis;
                let st = store.as_ref().unwrap();
                match op {
                    Op::Submit { gpus, mem } => {
                        let request = JobRequest {
                            uid: 1, user: "u".into(), name: "j".into(), gpus, mem_mib: mem,
                            time_limit_s: None, nice: 0, no_requeue: false, max_restarts: None,
                            warn_signal: None,
                            array: None,
                        };
                        let id = sched.next_job_id();
                        let spec = LaunchSpec { command: vec!["true".into()], cwd: "/".into(), env: vec![], venv: Venv::Off, umask: None, ..Default::default() };
                        rt.block_on(st.insert(NewJob { id, request: request.clone(), spec, submitted_at: now, attached: false, gate: Default::default() })).unwrap().unwrap();
                        sched.restore_pending(id, request, now, 0).unwrap();
                        submitted.push(id);
                    }
                    Op::Exit(k) => {
                        let running: Vec<JobId> = sched.jobs_in_order()
                            .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
                        if !running.is_empty() {
                            let id = running[k % running.len()];
                            runs.insert(id, Run::Exited(exit_record(0)));
                            sched.finish(id, JobState::Completed);
                            st.ended(id, Ending { state: JobState::Completed, at: now, exit_code: Some(0), signal: None, message: None });
                            rt.block_on(st.flush());
                            runs.remove(&id); // run directory removed after the commit
                            prop_assert!(ended.insert(id));
                        }
                    }
                    Op::Cancel(k) => {
                        if !submitted.is_empty() {
                            let id = submitted[k % submitted.len()];
                            if let mgpu_core::CancelOutcome::Removed(_) = sched.cancel(id, root) {
                                st.ended(id, Ending { state: JobState::Cancelled, at: now, exit_code: None, signal: None, message: None });
                                // The cancel handler answers only once this is committed.
                                rt.block_on(st.flush());
                                prop_assert!(ended.insert(id));
                            }
                        }
                    }
                    Op::Crash(mask) => {
                        // The server dies, losing what the store had not committed; some
                        // supervisors finish meanwhile.
                        store.take().unwrap().crash();
                        for (i, (_, run)) in runs.iter_mut().enumerate() {
                            if mask & (1 << (i % 8)) != 0 {
                                if let Run::Alive(_) = run {
                                    *run = Run::Exited(exit_record(3));
                                }
                            }
                        }
                        let (st2, rec) = Store::open(dir.path()).unwrap();
                        let plan = recover(gpus(), Config::default(), rec, now, |id| match runs.get(&id) {
                            None => RunProbe::NoRun,
                            Some(Run::Exited(r)) => RunProbe::Exited { run: 0, rec: r.clone() },
                            Some(Run::Alive(g)) => RunProbe::Alive { run: 0, gpus: g.clone(), started_at: 0 },
                        }, |_| TargetState::Gone);
                        for (id, ending) in &plan.ended {
                            st2.ended(*id, ending.clone());
                            prop_assert!(ended.insert(*id), "job {} ended twice", id);
                        }
                        // Run directories go only once the ends are committed (as in the daemon).
                        rt.block_on(st2.flush());
                        for (id, _) in &plan.ended {
                            runs.remove(id);
                        }
                        prop_assert!(plan.orphaned.is_empty());
                        sched = plan.sched;
                        store = Some(st2);
                    }
                }
                // Start what fits, recording the start as the daemon does (run dir first).
                for a in sched.schedule(now) {
                    runs.insert(a.job, Run::Alive(a.gpus.clone()));
                    *starts.entry(a.job).or_default() += 1;
                    store.as_ref().unwrap().started(a.job, now, a.gpus, 1);
                }
                for id in &submitted {
                    let live = sched.job(*id).is_some();
                    prop_assert!(live != ended.contains(id), "job {} lost or duplicated", id);
                    prop_assert!(starts.get(id).copied().unwrap_or(0) <= 1, "job {} started twice", id);
                }
            }
            // The store agrees with the model after a final restart.
            let st = store.take().unwrap();
            rt.block_on(st.flush());
            drop(st);
            let (_, rec) = Store::open(dir.path()).unwrap();
            let live: HashSet<JobId> = rec.pending.iter().chain(&rec.running).map(|j| j.id).collect();
            for id in &submitted {
                prop_assert_eq!(live.contains(id), !ended.contains(id), "store disagrees on job {}", id);
            }
        }
    }
}
