//! Unit and property tests of the scheduler core, in virtual time.

use std::collections::HashSet;

use super::*;
use proptest::prelude::*;

fn gpus(mems: &[u64]) -> Vec<GpuSpec> {
    mems.iter()
        .enumerate()
        .map(|(i, &m)| GpuSpec {
            index: i as u32,
            name: format!("sim{i}"),
            total_mib: m,
        })
        .collect()
}

fn req(uid: u32, n: u32, mem: Option<u64>) -> JobRequest {
    JobRequest {
        uid,
        user: format!("u{uid}"),
        name: "job".into(),
        gpus: n,
        mem_mib: mem,
        time_limit_s: None,
        nice: 0,
        no_requeue: false,
        max_restarts: None,
        warn_signal: None,
        array: None,
    }
}

const ROOT: Requester = Requester {
    uid: 0,
    is_admin: true,
};

#[test]
fn refuses_what_never_fits() {
    let s = Scheduler::new(gpus(&[24_000, 24_000, 80_000]), easy(), 1);
    assert_eq!(
        s.check_feasible(&req(1, 4, None)),
        Err(SubmitError::TooManyGpus { asked: 4, have: 3 })
    );
    assert!(matches!(
        s.check_feasible(&req(1, 2, Some(50_000))),
        Err(SubmitError::TooMuchMemory { have: 1, .. })
    ));
    assert_eq!(s.check_feasible(&req(1, 0, None)), Err(SubmitError::NoGpus));
    assert_eq!(
        s.check_feasible(&req(1, 1, Some(0))),
        Err(SubmitError::ZeroMemory)
    );
    assert!(s.check_feasible(&req(1, 1, Some(50_000))).is_ok());
    assert!(s.check_feasible(&req(1, 3, None)).is_ok());
}

#[test]
fn ids_increase_and_continue_from_given_start() {
    let mut s = Scheduler::new(gpus(&[1000]), easy(), 42);
    assert_eq!(s.submit(req(1, 1, None), 0), Ok(42));
    assert_eq!(s.submit(req(1, 1, None), 0), Ok(43));
    assert!(s.submit(req(1, 9, None), 0).is_err());
    assert_eq!(s.submit(req(1, 1, None), 0), Ok(44));
}

#[test]
fn memory_jobs_share_a_gpu_exclusive_ones_do_not() {
    let mut s = Scheduler::new(gpus(&[24_000, 24_000]), easy(), 1);
    let a = s.submit(req(1, 1, Some(10_000)), 0).unwrap();
    let b = s.submit(req(2, 1, Some(10_000)), 0).unwrap();
    let c = s.submit(req(3, 1, None), 0).unwrap();
    let d = s.submit(req(3, 1, None), 0).unwrap();
    let started = s.schedule(0);
    // a and b packed on GPU 0, c takes GPU 1 whole, d waits.
    assert_eq!(
        started,
        vec![
            Assignment {
                job: a,
                gpus: vec![0]
            },
            Assignment {
                job: b,
                gpus: vec![0]
            },
            Assignment {
                job: c,
                gpus: vec![1]
            },
        ]
    );
    assert_eq!(s.job(d).unwrap().state, JobState::Pending);
    assert_eq!(s.pending_reason(d), Some("Resources"));
    assert_eq!(s.queue_position(d), Some(1));
    // Finishing one sharer does not free the GPU for an exclusive job.
    s.finish(a, JobState::Completed).unwrap();
    assert!(s.schedule(1).is_empty());
    s.finish(b, JobState::Completed).unwrap();
    assert_eq!(
        s.schedule(2),
        vec![Assignment {
            job: d,
            gpus: vec![0]
        }]
    );
}

#[test]
fn packing_keeps_whole_gpus_free() {
    let mut s = Scheduler::new(gpus(&[24_000, 24_000, 24_000]), easy(), 1);
    let a = s.submit(req(1, 1, Some(8_000)), 0).unwrap();
    s.schedule(0);
    let b = s.submit(req(1, 1, Some(8_000)), 0).unwrap();
    let started = s.schedule(0);
    assert_eq!(
        started,
        vec![Assignment {
            job: b,
            gpus: vec![0]
        }]
    );
    let c = s.submit(req(1, 2, None), 0).unwrap();
    assert_eq!(
        s.schedule(0),
        vec![Assignment {
            job: c,
            gpus: vec![1, 2]
        }]
    );
    assert_eq!(s.job(a).unwrap().gpus, vec![0]);
}

#[test]
fn fifo_among_jobs_that_fit() {
    let mut s = Scheduler::new(gpus(&[24_000, 24_000]), easy(), 1);
    let a = s.submit(req(1, 1, None), 0).unwrap();
    s.schedule(0);
    let big = s.submit(req(2, 2, None), 0).unwrap();
    let small = s.submit(req(3, 1, None), 0).unwrap();
    // big cannot start, small fits and starts.
    assert_eq!(
        s.schedule(0),
        vec![Assignment {
            job: small,
            gpus: vec![1]
        }]
    );
    s.finish(a, JobState::Completed);
    s.finish(small, JobState::Completed);
    assert_eq!(
        s.schedule(5),
        vec![Assignment {
            job: big,
            gpus: vec![0, 1]
        }]
    );
}

#[test]
fn cancel_rules() {
    let mut s = Scheduler::new(gpus(&[1000]), easy(), 1);
    let running = s.submit(req(1, 1, None), 0).unwrap();
    let pending = s.submit(req(1, 1, None), 0).unwrap();
    s.schedule(0);
    let other = Requester {
        uid: 2,
        is_admin: false,
    };
    let owner = Requester {
        uid: 1,
        is_admin: false,
    };
    assert_eq!(s.cancel(pending, other), CancelOutcome::PermissionDenied);
    assert_eq!(s.cancel(running, other), CancelOutcome::PermissionDenied);
    assert_eq!(s.job(pending).unwrap().state, JobState::Pending);
    assert!(matches!(
        s.cancel(pending, owner),
        CancelOutcome::Removed(_)
    ));
    assert_eq!(s.cancel(pending, owner), CancelOutcome::NotFound);
    assert_eq!(s.cancel(running, ROOT), CancelOutcome::MustStop);
    assert_eq!(s.cancel(running, owner), CancelOutcome::AlreadyStopping);
    // Still holds its GPU until its processes are gone.
    assert_eq!(s.gpus()[0].exclusive, Some(running));
    s.finish(running, JobState::Cancelled).unwrap();
    assert!(s.gpus()[0].is_idle());
}

#[test]
fn foreign_usage_blocks_exclusive_and_shrinks_shared() {
    let mut s = Scheduler::new(gpus(&[24_000]), easy(), 1);
    s.set_foreign_usage(0, 20_000);
    let ex = s.submit(req(1, 1, None), 0).unwrap();
    let big = s.submit(req(1, 1, Some(8_000)), 0).unwrap();
    let small = s.submit(req(1, 1, Some(4_000)), 0).unwrap();
    assert_eq!(
        s.schedule(0),
        vec![Assignment {
            job: small,
            gpus: vec![0]
        }]
    );
    s.finish(small, JobState::Completed);
    s.set_foreign_usage(0, 0);
    // Now the exclusive job (first in line) gets it.
    assert_eq!(
        s.schedule(1),
        vec![Assignment {
            job: ex,
            gpus: vec![0]
        }]
    );
    assert_eq!(s.job(big).unwrap().state, JobState::Pending);
}

#[test]
fn effective_limit_is_capped_by_global() {
    let s = Scheduler::new(
        gpus(&[1]),
        Config {
            max_job_time_s: Some(60),
            ..easy()
        },
        1,
    );
    let mut r = req(1, 1, None);
    assert_eq!(s.effective_limit_s(&r), Some(60));
    r.time_limit_s = Some(30);
    assert_eq!(s.effective_limit_s(&r), Some(30));
    r.time_limit_s = Some(600);
    assert_eq!(s.effective_limit_s(&r), Some(60));
}

/// Checks the GPU books against the running jobs: no over-commit, exclusive never shared.
fn check_invariants(s: &Scheduler) {
    for g in s.gpus() {
        // Foreign processes may grow after a placement; mgpu's own books never exceed the GPU.
        assert!(
            g.reserved_mib <= g.spec.total_mib,
            "GPU {} over-committed: {} reserved > {}",
            g.spec.index,
            g.reserved_mib,
            g.spec.total_mib
        );
        if g.exclusive.is_some() {
            assert!(
                g.sharers.is_empty(),
                "exclusive GPU {} shared",
                g.spec.index
            );
            assert_eq!(g.reserved_mib, 0);
        }
        let sum: u64 = g
            .sharers
            .iter()
            .map(|id| s.job(*id).unwrap().request.mem_mib.unwrap())
            .sum();
        assert_eq!(sum, g.reserved_mib, "reservation books wrong");
        // Measured use beyond the reservations is charged exactly, for running jobs only.
        let excess: u64 = g
            .used_by
            .iter()
            .map(|(id, used)| {
                let job = s.job(*id).expect("measured job tracked");
                assert_eq!(job.state, JobState::Running, "measured job not running");
                used.saturating_sub(g.reservation_of(*id, &job.request))
            })
            .sum();
        assert_eq!(excess, g.excess_mib, "excess books wrong");
    }
    for job in s.jobs_in_order() {
        match job.state {
            JobState::Running => {
                assert_eq!(job.gpus.len() as u32, job.request.gpus);
                for idx in &job.gpus {
                    let g = s.gpus().iter().find(|g| g.spec.index == *idx).unwrap();
                    assert!(g.jobs().contains(&job.id));
                }
            }
            JobState::Pending => {
                assert!(job.gpus.is_empty());
                // srun's wait message and the queue's REASON state the same cause.
                let reason = s.pending_reason(job.id).unwrap();
                let detail = s.wait_detail(job.id).unwrap();
                assert!(
                    detail.starts_with(&format!("{reason}: ")),
                    "{reason} vs {detail}"
                );
            }
            _ => panic!("terminal job still tracked"),
        }
    }
}

fn arb_request() -> impl Strategy<Value = JobRequest> {
    (
        1u32..4,
        1u32..4,
        prop_oneof![Just(None), (1u64..30_000).prop_map(Some)],
    )
        .prop_map(|(uid, n, mem)| req(uid, n, mem))
}

#[derive(Debug, Clone)]
enum Op {
    Submit(JobRequest),
    /// Finish the k-th running job (mod count).
    Finish(usize),
    /// Cancel the k-th known job (mod count).
    Cancel(usize),
    Foreign(u32, u64),
    /// The k-th running job is measured using this much on GPU i (mod count).
    Usage(usize, u32, u64),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => arb_request().prop_map(Op::Submit),
        3 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (0u32..4, prop_oneof![Just(0u64), 0u64..10_000]).prop_map(|(i, m)| Op::Foreign(i, m)),
        2 => (any::<usize>(), 0u32..4, 0u64..40_000).prop_map(|(k, i, m)| Op::Usage(k, i, m)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Under any sequence of events, a GPU is never over-committed, exclusive jobs never share,
    /// and every job is accounted for exactly once (pending, running, or ended).
    #[test]
    fn never_overcommits_and_loses_nothing(
        policy in arb_policy(),
        mems in prop::collection::vec(8_000u64..40_000, 1..5),
        ops in prop::collection::vec(arb_op(), 1..120),
    ) {
        let mut s = Scheduler::new(gpus(&mems), config(policy), 1);
        let mut submitted = Vec::new();
        let mut ended = HashSet::new();
        for (t, op) in ops.into_iter().enumerate() {
            let now = t as Millis;
            match op {
                Op::Submit(r) => {
                    if let Ok(id) = s.submit(r, now) {
                        submitted.push(id);
                    }
                }
                Op::Finish(k) => {
                    let running: Vec<JobId> = s.jobs_in_order()
                        .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
                    if !running.is_empty() {
                        let id = running[k % running.len()];
                        prop_assert!(s.finish(id, JobState::Completed).is_some());
                        prop_assert!(ended.insert(id));
                    }
                }
                Op::Cancel(k) => {
                    if !submitted.is_empty() {
                        let id = submitted[k % submitted.len()];
                        if let CancelOutcome::Removed(_) = s.cancel(id, ROOT) {
                            prop_assert!(ended.insert(id));
                        }
                    }
                }
                Op::Foreign(i, m) => s.set_foreign_usage(i % mems.len() as u32, m),
                Op::Usage(k, i, m) => {
                    let running: Vec<JobId> = s.jobs_in_order()
                        .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
                    if !running.is_empty() {
                        let id = running[k % running.len()];
                        s.set_job_usage(i % mems.len() as u32, &[(id, m)]);
                    }
                }
            }
            let before: Vec<GpuState> = s.gpus().to_vec();
            for a in s.schedule(now) {
                prop_assert!(!ended.contains(&a.job));
                // At placement time the job fit next to what foreign processes use and what
                // jobs use beyond their reservations (each charged max(reservation, use)).
                for idx in &a.gpus {
                    let g = &s.gpus()[*idx as usize];
                    prop_assert!(
                        g.reserved_mib + g.excess_mib + g.foreign_mib <= g.spec.total_mib
                    );
                    if let Some(mem) = s.job(a.job).unwrap().request.mem_mib {
                        let b = &before[*idx as usize];
                        let charged: u64 = b.sharers.iter().map(|j| {
                            let r = s.job(*j).unwrap().request.mem_mib.unwrap();
                            r.max(b.used_by.get(j).copied().unwrap_or(0))
                        }).sum::<u64>() + b.used_by.iter()
                            .filter(|(j, _)| !b.sharers.contains(j) && b.exclusive != Some(**j))
                            .map(|(_, u)| *u).sum::<u64>();
                        prop_assert!(charged + b.foreign_mib + mem <= b.spec.total_mib);
                    }
                }
            }
            check_invariants(&s);
            // Only memory jobs over their reservation on a GPU with another job are stopped.
            for action in s.memory_actions(now, 0) {
                let (MemoryAction::Stop(o) | MemoryAction::Alone(o)) = action;
                let job = s.job(o.job).unwrap();
                prop_assert!(!job.request.is_exclusive());
                let g = s.gpus().iter().find(|g| g.spec.index == o.gpu).unwrap();
                prop_assert_eq!(o.used_mib, g.used_by[&o.job]);
                prop_assert_eq!(o.reserved_mib, g.reservation_of(o.job, &job.request));
                prop_assert!(o.used_mib > o.reserved_mib);
                let shared = g.jobs().iter().any(|&j| j != o.job);
                prop_assert_eq!(matches!(action, MemoryAction::Stop(_)), shared);
            }
            // Every submitted job is in exactly one place.
            for id in &submitted {
                let tracked = s.job(*id).is_some();
                prop_assert!(tracked != ended.contains(id), "job {} lost or duplicated", id);
            }
        }
    }

    /// With no foreign load, every feasible job eventually runs once running jobs end.
    #[test]
    fn every_job_eventually_runs(
        policy in arb_policy(),
        mems in prop::collection::vec(8_000u64..40_000, 1..5),
        reqs in prop::collection::vec(arb_request(), 1..60),
    ) {
        let mut s = Scheduler::new(gpus(&mems), config(policy), 1);
        let ids: Vec<JobId> = reqs.into_iter().filter_map(|r| s.submit(r, 0).ok()).collect();
        let mut ran = HashSet::new();
        let mut now = 0;
        loop {
            for a in s.schedule(now) {
                prop_assert!(ran.insert(a.job), "job {} started twice", a.job);
            }
            check_invariants(&s);
            let running: Vec<JobId> = s.jobs_in_order()
                .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
            if running.is_empty() {
                break;
            }
            // Finish the oldest running job.
            s.finish(running[0], JobState::Completed);
            now += 1;
        }
        prop_assert_eq!(s.pending_len(), 0, "jobs left pending with an idle machine");
        prop_assert_eq!(ran.len(), ids.len());
    }

    /// The incremental pass (only fresh jobs) decides exactly what a full rescan would, with
    /// every policy (no running job passes its expected end here: estimates are not stale).
    #[test]
    fn incremental_pass_matches_full_rescan(
        policy in arb_policy(),
        mems in prop::collection::vec(8_000u64..40_000, 1..5),
        reqs in prop::collection::vec(arb_request(), 1..40),
        early_finishes in prop::collection::vec(any::<usize>(), 0..5),
        reserve_after_s in prop_oneof![Just(0u64), 1u64..30],
        reserve_after_wait_factor in prop_oneof![Just(0.0), Just(2.0)],
    ) {
        let config = Config { reserve_after_s, reserve_after_wait_factor, ..config(policy) };
        let mut inc = Scheduler::new(gpus(&mems), config, 1);
        // Some usage history, so that fair-share priorities differ between users.
        for (k, r) in arb_history(&mems).into_iter().enumerate() {
            let _ = inc.submit(r, k as Millis);
        }
        inc.schedule(0);
        for k in early_finishes {
            let running: Vec<JobId> = inc.jobs_in_order()
                .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
            if !running.is_empty() {
                inc.finish(running[k % running.len()], JobState::Completed);
            }
        }
        inc.schedule(1000);
        let mut full = inc.clone();
        for (t, r) in reqs.into_iter().enumerate() {
            let now = 2000 + 977 * t as Millis;
            let _ = inc.submit(r.clone(), now);
            let _ = full.submit(r, now);
            prop_assert_eq!(inc.schedule(now), full.schedule_rescanning_all(now));
            prop_assert_eq!(inc.reserved_job(), full.reserved_job());
        }
    }

    /// EASY backfilling: once a job holds a reservation it starts by the reserved time, whatever
    /// is submitted or backfilled meanwhile (jobs end exactly at their time limits here).
    #[test]
    fn reserved_job_is_never_delayed(
        fair in any::<bool>(),
        mems in prop::collection::vec(8_000u64..40_000, 1..5),
        jobs in prop::collection::vec((arb_request(), 1u64..50, 0u64..60), 1..60),
    ) {
        let policy = if fair { Policy::Fair } else { Policy::Backfill };
        let mut s = Scheduler::new(gpus(&mems), config(policy), 1);
        let mut arrivals: Vec<(Millis, JobRequest)> = jobs
            .into_iter()
            .map(|(mut r, limit_s, at_s)| {
                r.time_limit_s = Some(limit_s);
                (at_s * 1000, r)
            })
            .collect();
        arrivals.sort_by_key(|a| a.0);
        let mut arrivals = arrivals.into_iter().peekable();
        let mut ends: BTreeMap<(Millis, JobId), ()> = BTreeMap::new();
        let mut promised: HashMap<JobId, Millis> = HashMap::new();
        let mut ids = Vec::new();
        loop {
            let next_arrival = arrivals.peek().map(|a| a.0);
            let next_end = ends.keys().next().map(|k| k.0);
            let now = match (next_arrival, next_end) {
                (None, None) => break,
                (a, e) => a.unwrap_or(Millis::MAX).min(e.unwrap_or(Millis::MAX)),
            };
            while let Some(&(t, id)) = ends.keys().next() {
                if t != now { break; }
                ends.remove(&(t, id));
                s.finish(id, JobState::Completed).unwrap();
            }
            while arrivals.peek().is_some_and(|a| a.0 == now) {
                let (_, r) = arrivals.next().unwrap();
                if let Ok(id) = s.submit(r, now) { ids.push(id); }
            }
            for a in s.schedule(now) {
                if let Some(&at) = promised.get(&a.job) {
                    prop_assert!(now <= at, "job {} reserved for {} started at {}", a.job, at, now);
                }
                let limit = s.job(a.job).unwrap().request.time_limit_s.unwrap();
                ends.insert((now + limit * 1000, a.job), ());
            }
            check_invariants(&s);
            if let Some(r) = s.reserved_job() {
                if let Some(at) = s.est_start(r) {
                    prop_assert!(at > now);
                    promised.entry(r).or_insert(at);
                }
            }
        }
        prop_assert_eq!(s.pending_len() + s.running_len(), 0, "every job ran");
    }
}

fn config(policy: Policy) -> Config {
    Config { policy, ..easy() }
}

/// Plain EASY backfilling: the first blocked job gets the reservation at once (the tests
/// written for it; the default waits, see `reservations_wait_until_a_job_is_starved`).
fn easy() -> Config {
    Config {
        reserve_after_s: 0,
        reserve_after_wait_factor: 0.0,
        ..Config::default()
    }
}

fn arb_policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::Fifo),
        Just(Policy::Backfill),
        Just(Policy::Fair)
    ]
}

/// A fixed mix of earlier jobs by three users, so that they start with unequal usage.
fn arb_history(mems: &[u64]) -> Vec<JobRequest> {
    let n = mems.len() as u32;
    vec![req(1, n, None), req(2, 1, Some(4_000)), req(1, 1, None)]
}

fn timed(uid: u32, n: u32, mem: Option<u64>, limit_s: u64) -> JobRequest {
    JobRequest {
        time_limit_s: Some(limit_s),
        ..req(uid, n, mem)
    }
}

fn started_ids(assignments: &[Assignment]) -> Vec<JobId> {
    assignments.iter().map(|a| a.job).collect()
}

/// The pending jobs' ids in priority order.
fn pending_order(s: &Scheduler) -> Vec<JobId> {
    s.jobs_in_order()
        .filter(|j| j.state == JobState::Pending)
        .map(|j| j.id)
        .collect()
}

#[test]
fn policies_parse_and_default_to_fair() {
    assert_eq!(Config::default().policy, Policy::Fair);
    for p in Policy::ALL {
        assert_eq!(Policy::parse(p.as_str()), Some(p));
    }
    assert_eq!(Policy::parse("FAIR"), Some(Policy::Fair));
    assert_eq!(Policy::parse("sjf"), None);
}

#[test]
fn first_fit_starves_a_wide_job_backfill_reserves_for_it() {
    // 2 GPUs; a 1-GPU job runs, a 2-GPU job waits, 1-GPU jobs keep coming.
    for policy in [Policy::Fifo, Policy::Backfill, Policy::Fair] {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), config(policy), 1);
        let first = s.submit(timed(1, 1, None, 100), 0).unwrap();
        s.schedule(0);
        let wide = s.submit(timed(2, 2, None, 100), 1_000).unwrap();
        let small = s.submit(timed(3, 1, None, 100), 2_000).unwrap();
        let started = started_ids(&s.schedule(2_000));
        match policy {
            // First-fit hands the free GPU to the small job: the wide one keeps waiting.
            Policy::Fifo => assert_eq!(started, vec![small]),
            // The small job would run past the wide job's reservation (t = 100 s): it waits.
            _ => {
                assert!(started.is_empty());
                assert_eq!(s.reserved_job(), Some(wide));
                assert_eq!(s.est_start(wide), Some(100_000));
                assert_eq!(s.pending_reason(wide), Some("Resources"));
                assert_eq!(s.pending_reason(small), Some("Reservation"));
            }
        }
        s.finish(first, JobState::Completed);
        let started = started_ids(&s.schedule(100_000));
        if policy == Policy::Fifo {
            assert!(
                started.is_empty(),
                "wide job still blocked by the small one"
            );
        } else {
            assert_eq!(started, vec![wide]);
            assert_eq!(s.pending_reason(small), Some("Resources"));
        }
    }
}

#[test]
fn backfill_starts_short_jobs_and_jobs_on_gpus_the_reservation_does_not_need() {
    // 3 GPUs: GPU 0 busy until t=100 s, GPU 1 busy until t=1000 s; a 2-GPU job is reserved
    // at t=100 s on GPUs 0 and 2. GPU 2 is free now.
    let mut s = Scheduler::new(gpus(&[1000, 1000, 1000]), config(Policy::Backfill), 1);
    s.submit(timed(1, 1, None, 100), 0).unwrap();
    s.submit(timed(1, 1, None, 1000), 0).unwrap();
    s.schedule(0);
    let wide = s.submit(timed(2, 2, None, 50), 0).unwrap();
    let long = s.submit(timed(3, 1, None, 500), 0).unwrap();
    let short = s.submit(timed(3, 1, None, 100), 0).unwrap();
    // `long` would hold GPU 2 past t=100 s and delay `wide`: it waits; `short` ends in time.
    assert_eq!(started_ids(&s.schedule(0)), vec![short]);
    assert_eq!(s.est_start(wide), Some(100_000));
    assert_eq!(s.pending_reason(long), Some("Priority"));

    // Memory jobs may share the GPU the reserved job does not need at all.
    let mut s = Scheduler::new(gpus(&[1000, 1000]), config(Policy::Backfill), 1);
    let excl = s.submit(timed(1, 1, None, 100), 0).unwrap();
    let shared = s.submit(timed(1, 1, Some(400), 1000), 0).unwrap();
    assert_eq!(started_ids(&s.schedule(0)), vec![excl, shared]);
    let wants_one = s.submit(timed(2, 1, None, 10), 0).unwrap();
    let mem_long = s.submit(timed(3, 1, Some(500), 5000), 0).unwrap();
    let too_big = s.submit(timed(3, 1, Some(700), 5000), 0).unwrap();
    // `wants_one` gets GPU 0 at t=100 s; `mem_long` fits next to `shared` on GPU 1, which the
    // reservation does not need; `too_big` does not fit anywhere now.
    assert_eq!(started_ids(&s.schedule(0)), vec![mem_long]);
    assert_eq!(s.job(mem_long).unwrap().gpus, vec![1]);
    assert_eq!(s.est_start(wants_one), Some(100_000));
    assert_eq!(s.pending_reason(too_big), Some("Priority"));
}

#[test]
fn fair_share_prefers_the_user_who_used_less() {
    let mut s = Scheduler::new(gpus(&[1000]), easy(), 1);
    // User 1 has run the GPU for an hour.
    let hog = s.submit(req(1, 1, None), 0).unwrap();
    s.schedule(0);
    let heavy = s.submit(req(1, 1, None), 10_000).unwrap();
    let light = s.submit(req(2, 1, None), 3_600_000).unwrap();
    assert!(s.schedule(3_600_000).is_empty());
    assert!(s.priority(light).unwrap() > s.priority(heavy).unwrap());
    assert_eq!(s.queue_position(light), Some(1));
    s.finish(hog, JobState::Completed);
    // The later submission of the lighter user goes first.
    assert_eq!(started_ids(&s.schedule(3_600_000)), vec![light]);
    let usage = s.user_usage_gpu_s(1, 3_600_000);
    assert!(
        (usage - 3600.0).abs() < 60.0,
        "about one GPU-hour, decayed: {usage}"
    );
    // With no job running, usage halves every half-life.
    let later = s.user_usage_gpu_s(1, 3_600_000 + 24 * 3_600_000);
    assert!((later - usage / 2.0).abs() < 1e-6);
}

#[test]
fn fair_share_is_fifo_within_a_user_and_honours_nice_and_weights() {
    let mut s = Scheduler::new(gpus(&[1000]), easy(), 1);
    let busy = s.submit(req(9, 1, None), 0).unwrap();
    s.schedule(0);
    let a = s.submit(req(1, 1, None), 1_000).unwrap();
    let b = s.submit(req(1, 1, None), 2_000).unwrap();
    let niced = s
        .submit(
            JobRequest {
                nice: 100,
                ..req(2, 1, None)
            },
            0,
        )
        .unwrap();
    s.schedule(3_000);
    let order = pending_order(&s);
    assert_eq!(order, vec![a, b, niced]);
    // A negative nice (root's to give, as in Slurm) raises a job above earlier ones.
    let raised = s
        .submit(
            JobRequest {
                nice: -100,
                ..req(3, 1, None)
            },
            3_000,
        )
        .unwrap();
    s.schedule(3_000);
    let first = s
        .jobs_in_order()
        .find(|j| j.state == JobState::Pending)
        .map(|j| j.id);
    assert_eq!(first, Some(raised));
    s.cancel(raised, ROOT);
    s.finish(busy, JobState::Completed);
    assert_eq!(started_ids(&s.schedule(3_000)), vec![a]);

    // A user with weight 4 is charged a quarter: after equal usage, their job goes first.
    let mut weights = HashMap::new();
    weights.insert(2, 4.0);
    let cfg = Config {
        fair: FairShareConfig {
            user_weights: weights,
            ..FairShareConfig::default()
        },
        ..easy()
    };
    let mut s = Scheduler::new(gpus(&[1000, 1000]), cfg, 1);
    let r1 = s.submit(req(1, 1, None), 0).unwrap();
    let r2 = s.submit(req(2, 1, None), 0).unwrap();
    s.schedule(0);
    let from1 = s.submit(req(1, 1, None), 1_000).unwrap();
    let from2 = s.submit(req(2, 1, None), 2_000).unwrap();
    s.schedule(3_600_000);
    // Only one GPU frees: the weighted user's later job wins it.
    s.finish(r1, JobState::Completed);
    assert_eq!(started_ids(&s.schedule(3_600_000)), vec![from2]);
    assert!(s.priority(from1).is_some());
    let _ = r2;
}

#[test]
fn memory_jobs_are_charged_their_share_of_a_gpu() {
    let mut s = Scheduler::new(gpus(&[1000]), easy(), 1);
    let quarter = s.submit(req(1, 1, Some(250)), 0).unwrap();
    s.schedule(0);
    s.finish(quarter, JobState::Completed);
    s.schedule(1_000_000);
    let usage = s.user_usage_gpu_s(1, 1_000_000);
    assert!(
        (usage - 250.0).abs() < 5.0,
        "a quarter GPU for 1000 s: {usage}"
    );
}

mod time_limits {
    //! Time limits and context switching, in virtual time.

    use super::*;

    /// First-come first-served: "the end of the queue" is exact there.
    fn fifo() -> Config {
        Config {
            policy: Policy::Fifo,
            ..easy()
        }
    }

    fn limited(uid: u32, n: u32, mem: Option<u64>, limit_s: u64) -> JobRequest {
        JobRequest {
            time_limit_s: Some(limit_s),
            ..req(uid, n, mem)
        }
    }

    #[test]
    fn switched_only_past_its_slice_and_only_when_someone_waits() {
        let mut s = Scheduler::new(gpus(&[24_000]), fifo(), 1);
        let a = s.submit(limited(1, 1, None, 10), 0).unwrap();
        s.schedule(0);
        assert_eq!(s.next_deadline(0), Some(10_000));
        // Past its slice, nobody waiting: keeps running, no timer needed any more.
        assert!(s.time_actions(20_000).is_empty());
        assert_eq!(s.next_deadline(20_000), None);
        // Someone waits for its GPU: switched at once.
        let b = s.submit(req(2, 1, None), 20_500).unwrap();
        let c = s.submit(req(3, 1, None), 20_600).unwrap();
        assert!(s.schedule(20_600).is_empty());
        assert_eq!(s.time_actions(20_600), vec![TimeAction::Requeue { job: a }]);
        // Decided once; it keeps its GPU until its processes are gone.
        assert!(s.time_actions(20_700).is_empty());
        assert_eq!(s.gpus()[0].exclusive, Some(a));
        assert_eq!(s.requeue(a, 21_000), Some(3));
        // Exactly to the end of the queue, one more restart.
        assert_eq!(pending_order(&s), vec![b, c, a]);
        assert_eq!(s.job(a).unwrap().restarts, 1);
        assert_eq!(
            s.schedule(21_000),
            vec![Assignment {
                job: b,
                gpus: vec![0]
            }]
        );
    }

    /// A 10 s job `a` switched at 20 s for `b` (no limit, estimated at 24 h), waiting since 5 s.
    fn switched_for_a_long_job() -> (Scheduler, JobId, JobId) {
        let mut s = Scheduler::new(gpus(&[24_000]), Config::default(), 1);
        let a = s.submit(limited(1, 1, None, 10), 0).unwrap();
        s.schedule(0);
        let b = s.submit(req(1, 1, None), 5_000).unwrap();
        assert!(s.schedule(20_000).is_empty());
        assert_eq!(s.time_actions(20_000), vec![TimeAction::Requeue { job: a }]);
        s.requeue(a, 20_000);
        (s, a, b)
    }

    /// Under fair share a short job goes before a longer one, but a switched job goes behind
    /// every job waiting when it was requeued, however short: else the job it was switched
    /// for (here one without a limit, estimated at 24 h) would never get its GPU.
    #[test]
    fn a_switched_short_job_goes_behind_a_waiting_long_one() {
        let (mut s, a, b) = switched_for_a_long_job();
        assert_eq!(pending_order(&s), vec![b, a]);
        assert_eq!(started_ids(&s.schedule(20_000)), vec![b]);
    }

    /// The floor a switched job got (behind every job waiting then) is handed back on a
    /// restore: restored by its own key alone, the short job would pass the long one again.
    #[test]
    fn a_restored_switched_job_keeps_its_place_behind_the_waiting_ones() {
        let (s, a, b) = switched_for_a_long_job();
        assert_eq!(s.job(b).unwrap().min_key(), None);
        let floor = s.queue_floor(a);
        assert!(floor.is_some());
        let restored = |min_key: Option<i64>| {
            let mut r = Scheduler::new(gpus(&[24_000]), Config::default(), 1);
            r.restore_pending(b, req(1, 1, None), 5_000, 0).unwrap();
            r.restore_pending_gated_behind(
                a,
                limited(1, 1, None, 10),
                20_000,
                1,
                Gate::default(),
                min_key,
                |_| TargetState::Gone,
            )
            .unwrap();
            r
        };
        let mut r = restored(floor);
        assert_eq!(r.job(a).unwrap().min_key(), floor);
        assert_eq!(pending_order(&r), vec![b, a]);
        assert_eq!(started_ids(&r.schedule(20_000)), vec![b]);
        // Without the floor, its own key (10 s limit) puts it first.
        let mut r = restored(None);
        assert_eq!(started_ids(&r.schedule(20_000)), vec![a]);
    }

    /// Review finding: a floor is a key under the weights it was made with. After the weights
    /// change the switched job is still behind the jobs waiting then, and ahead of later ones;
    /// a begin time that comes does not drop the floor either.
    #[test]
    fn a_switched_jobs_place_survives_new_weights_and_a_begin_time() {
        let (mut s, a, b) = switched_for_a_long_job();
        assert_eq!(pending_order(&s), vec![b, a]);
        for age_factor in [0.5, 2.0] {
            let mut config = Config::default();
            config.fair.age_factor = age_factor;
            s.reconfigure(config);
            assert_eq!(pending_order(&s), vec![b, a], "age factor {age_factor}");
        }
        let year = 365 * 24 * 3_600_000;
        let d = s.submit(req(1, 1, None), year).unwrap();
        let mut config = Config::default();
        config.fair.age_factor = 0.5;
        s.reconfigure(config);
        assert_eq!(pending_order(&s), vec![b, a, d]);
        // Deferred to a begin time and back in the queue: the floor stays (b starts now, on the
        // GPU a was switched off).
        s.defer_until(a, year + 1);
        assert_eq!(s.begin_at(a), Some(year + 1));
        assert_eq!(started_ids(&s.schedule(year + 1)), vec![b]);
        assert_eq!(s.begin_at(a), None);
        assert!(
            s.queue_floor(a).is_some(),
            "the floor survives the begin time"
        );
        assert_eq!(pending_order(&s), vec![a, d]);
    }

    #[test]
    fn not_switched_before_its_slice_or_when_waiting_jobs_could_not_use_it() {
        let mut s = Scheduler::new(gpus(&[24_000, 24_000]), fifo(), 1);
        let a = s.submit(limited(1, 1, Some(4_000), 10), 0).unwrap();
        let b = s.submit(req(1, 2, None), 0).unwrap(); // needs both GPUs whole
        let x = s.submit(req(2, 1, None), 0).unwrap(); // takes GPU 1
        s.schedule(0);
        assert_eq!(s.job(x).unwrap().state, JobState::Running);
        assert!(
            s.time_actions(9_999).is_empty(),
            "not before its slice ends"
        );
        // b waits, but freeing a's share of GPU 0 does not let b (2 whole GPUs) start.
        assert!(s.time_actions(10_000).is_empty());
        assert_eq!(s.job(b).unwrap().state, JobState::Pending);
        // Once x is gone, freeing a would let b start: a is switched.
        s.finish(x, JobState::Completed);
        assert!(s.schedule(10_100).is_empty());
        assert_eq!(s.time_actions(10_100), vec![TimeAction::Requeue { job: a }]);
    }

    #[test]
    fn no_requeue_and_max_restarts_end_as_timeout() {
        let mut s = Scheduler::new(gpus(&[24_000, 24_000]), fifo(), 1);
        let a = s
            .submit(
                JobRequest {
                    no_requeue: true,
                    ..limited(1, 1, None, 5)
                },
                0,
            )
            .unwrap();
        let b = s
            .submit(
                JobRequest {
                    max_restarts: Some(1),
                    ..limited(1, 1, None, 5)
                },
                0,
            )
            .unwrap();
        s.schedule(0);
        // Nobody waits, still: --no-requeue means stop at the limit.
        assert_eq!(s.time_actions(5_000), vec![TimeAction::Timeout { job: a }]);
        s.finish(a, JobState::Timeout);
        let w = s.submit(req(2, 2, None), 5_000).unwrap();
        assert_eq!(s.time_actions(5_000), vec![TimeAction::Requeue { job: b }]);
        s.requeue(b, 5_100);
        // w takes both GPUs; b waits; when w ends b runs again, and at its limit (restarts 1)
        // it times out instead of being switched again.
        let started = s.schedule(5_100);
        assert_eq!(started[0].job, w);
        s.finish(w, JobState::Completed);
        s.schedule(6_000);
        s.submit(req(2, 2, None), 6_000).unwrap();
        assert_eq!(s.time_actions(11_000), vec![TimeAction::Timeout { job: b }]);
    }

    /// The server's default cap on restarts applies to jobs that set none of their own; a
    /// job's own value wins.
    #[test]
    fn the_server_default_caps_restarts() {
        let mut s = Scheduler::new(
            gpus(&[24_000]),
            Config {
                default_max_restarts: Some(1),
                ..fifo()
            },
            1,
        );
        let a = s.submit(limited(1, 1, None, 5), 0).unwrap();
        let own = s
            .submit(
                JobRequest {
                    max_restarts: Some(3),
                    ..limited(2, 1, None, 5)
                },
                0,
            )
            .unwrap();
        s.schedule(0);
        assert_eq!(s.time_actions(5_000), vec![TimeAction::Requeue { job: a }]);
        s.requeue(a, 5_000);
        assert_eq!(started_ids(&s.schedule(5_000)), vec![own]);
        // own switches for a, as often as its own cap allows.
        assert_eq!(
            s.time_actions(10_000),
            vec![TimeAction::Requeue { job: own }]
        );
        s.requeue(own, 10_000);
        assert_eq!(started_ids(&s.schedule(10_000)), vec![a]);
        // a has used the server's one restart: at its limit it times out.
        assert_eq!(s.time_actions(15_000), vec![TimeAction::Timeout { job: a }]);
    }

    #[test]
    fn warning_signal_comes_before_the_limit_and_global_cap_applies() {
        let mut s = Scheduler::new(
            gpus(&[24_000]),
            Config {
                max_job_time_s: Some(60),
                ..fifo()
            },
            1,
        );
        let a = s
            .submit(
                JobRequest {
                    warn_signal: Some(WarnSignal {
                        signal: 10,
                        secs_before: 15,
                    }),
                    array: None,
                    ..limited(1, 1, None, 600)
                },
                1_000,
            )
            .unwrap();
        s.schedule(1_000);
        // The global cap (60 s) wins over the job's 600 s.
        assert_eq!(s.slice_end(a), Some(61_000));
        assert_eq!(s.next_deadline(1_000), Some(46_000));
        assert!(s.time_actions(45_999).is_empty());
        assert_eq!(
            s.time_actions(46_000),
            vec![TimeAction::Warn { job: a, signal: 10 }]
        );
        assert_eq!(s.next_deadline(46_000), Some(61_000));
        assert!(s.time_actions(50_000).is_empty(), "warned once");
    }

    /// `-t 0` (and `--max-job-time 0`) is no limit, as in Slurm: never a zero slice that has
    /// two jobs switch places as fast as they can be stopped.
    #[test]
    fn a_zero_limit_means_no_limit() {
        let mut s = Scheduler::new(
            gpus(&[24_000]),
            Config {
                max_job_time_s: Some(0),
                ..fifo()
            },
            1,
        );
        let a = s.submit(limited(1, 1, None, 0), 0).unwrap();
        s.schedule(0);
        let b = s.submit(limited(2, 1, None, 0), 0).unwrap();
        assert_eq!(s.effective_limit_s(&s.job(a).unwrap().request), None);
        assert_eq!(s.slice_end(a), None);
        assert_eq!(s.next_deadline(0), None);
        for now in [0, 1, 1_000, 86_400_000] {
            assert!(s.time_actions(now).is_empty());
        }
        assert_eq!(s.job(a).unwrap().state, JobState::Running);
        assert_eq!(s.job(b).unwrap().state, JobState::Pending);
        // A real cap still applies to a job without its own limit.
        let mut s = Scheduler::new(
            gpus(&[24_000]),
            Config {
                max_job_time_s: Some(30),
                ..fifo()
            },
            1,
        );
        let a = s.submit(limited(1, 1, None, 0), 0).unwrap();
        s.schedule(0);
        assert_eq!(s.slice_end(a), Some(30_000));
    }

    /// However short its slice, a job runs the minimum slice before it can be switched; the
    /// core asks to be woken then.
    #[test]
    fn never_switched_before_the_minimum_slice() {
        let mut s = Scheduler::new(
            gpus(&[24_000]),
            Config {
                min_slice_s: 60,
                ..fifo()
            },
            1,
        );
        let a = s.submit(limited(1, 1, None, 1), 0).unwrap();
        s.schedule(0);
        s.submit(req(2, 1, None), 500).unwrap();
        assert_eq!(s.next_deadline(500), Some(1_000));
        assert!(s.time_actions(1_000).is_empty());
        assert_eq!(s.next_deadline(1_000), Some(60_000));
        assert!(s.time_actions(59_999).is_empty());
        assert_eq!(s.time_actions(60_000), vec![TimeAction::Requeue { job: a }]);
        // --no-requeue is a limit, not a switch: it ends at the limit itself.
        let mut s = Scheduler::new(
            gpus(&[24_000]),
            Config {
                min_slice_s: 60,
                ..fifo()
            },
            1,
        );
        let t = s
            .submit(
                JobRequest {
                    no_requeue: true,
                    ..limited(1, 1, None, 1)
                },
                0,
            )
            .unwrap();
        s.schedule(0);
        assert_eq!(s.time_actions(1_000), vec![TimeAction::Timeout { job: t }]);
    }

    /// The issue's case: a 2-GPU job with `-t 5:00` on 2 GPUs, past its slice, while a job
    /// that fits on what it would free waits — but would not start there (held back for the
    /// reservation of a 4-GPU job, since it has no limit and so is estimated at 24 h).
    /// Switching would only restart the job from scratch on the same GPUs (it ends before the
    /// reservation, so it is backfilled at once): it is never switched, however many slices
    /// pass. A waiting job that does start on what is freed gets it switched.
    #[test]
    fn a_switch_that_would_serve_nobody_does_not_happen() {
        let mut s = Scheduler::new(
            gpus(&[80_000; 4]),
            Config {
                min_slice_s: 60,
                ..easy()
            },
            1,
        );
        let a = s.submit(limited(1, 2, None, 300), 0).unwrap();
        let b = s.submit(limited(2, 2, None, 7_200), 0).unwrap();
        assert_eq!(started_ids(&s.schedule(0)), vec![a, b]);
        let wide = s.submit(req(3, 4, None), 1_000).unwrap();
        let w = s.submit(req(4, 1, None), 2_000).unwrap();
        assert!(s.schedule(2_000).is_empty());
        assert_eq!(s.reserved_job(), Some(wide));
        for slice in 1..=6 {
            let now = slice * 300_000;
            assert!(s.schedule(now).is_empty());
            // (The rule before: w fits on a's GPUs, so a was switched — and restarted at once.)
            let mut trial = s.clone();
            trial.requeue(a, now);
            assert_eq!(started_ids(&trial.schedule(now)), vec![a]);
            assert!(
                s.time_actions(now).is_empty(),
                "switch {slice} would restart job {a} on its own GPUs"
            );
            assert_eq!(s.job(a).unwrap().restarts, 0);
        }
        assert_eq!(s.job(w).unwrap().state, JobState::Pending);
        // A short 2-GPU job (it ends before the reservation) does start on a's GPUs, ahead of
        // a (its user has used nothing): a is switched for it.
        let now = 2_000_000;
        let v = s.submit(limited(5, 2, None, 600), now).unwrap();
        assert!(s.schedule(now).is_empty());
        assert_eq!(s.time_actions(now), vec![TimeAction::Requeue { job: a }]);
        s.requeue(a, now);
        assert_eq!(started_ids(&s.schedule(now)), vec![v]);
        assert_eq!(s.job(a).unwrap().state, JobState::Pending);
    }

    /// 4 GPUs: job a (2 GPUs, a 300 s limit) and job b (2 GPUs, 7,200 s) run; a 4-GPU job and
    /// a 1-GPU job without limits wait. Once a is past its limit, switching it serves nobody
    /// (the 4-GPU job does not fit beside b, and the 1-GPU one, expected to run 24 h, would
    /// delay the 4-GPU job's reservation). Returns a.
    fn switch_serving_nobody() -> (Scheduler, JobId) {
        let mut s = Scheduler::new(
            gpus(&[80_000; 4]),
            Config {
                min_slice_s: 60,
                ..easy()
            },
            1,
        );
        let a = s.submit(limited(1, 2, None, 300), 0).unwrap();
        let b = s.submit(limited(2, 2, None, 7_200), 0).unwrap();
        assert_eq!(started_ids(&s.schedule(0)), vec![a, b]);
        s.submit(req(3, 4, None), 1_000).unwrap();
        s.submit(req(4, 1, None), 2_000).unwrap();
        assert!(s.schedule(2_000).is_empty());
        (s, a)
    }

    /// A trial that found a switch serving nobody is not repeated on every event (it copies
    /// the whole scheduler): its answer stands for a few seconds, the timer comes back then,
    /// and a job that a switch would serve is served at the latest then.
    #[test]
    fn a_fruitless_switch_trial_is_not_repeated_on_every_event() {
        let (mut s, a) = switch_serving_nobody();
        let t = 300_000;
        assert!(s.schedule(t).is_empty());
        assert!(
            s.time_actions(t).is_empty(),
            "the switch would serve nobody"
        );
        assert_eq!(s.next_deadline(t), Some(t + timelimit::SWITCH_RETRIAL_MS));
        // A job the switch would serve arrives: it waits for the next trial, not for ever.
        let v = s.submit(limited(5, 2, None, 600), t + 1_000).unwrap();
        assert!(s.schedule(t + 1_000).is_empty());
        assert!(s.time_actions(t + 1_000).is_empty());
        assert!(s.next_deadline(t + 1_000) <= Some(t + timelimit::SWITCH_RETRIAL_MS));
        let later = t + timelimit::SWITCH_RETRIAL_MS;
        assert_eq!(s.time_actions(later), vec![TimeAction::Requeue { job: a }]);
        s.requeue(a, later);
        assert_eq!(started_ids(&s.schedule(later)), vec![v]);
    }

    /// While nothing but the clock moves, a fruitless trial's answer stands twice as long each
    /// time, up to 10 minutes: a job far past its limit in a quiet queue does not cost a trial
    /// every 5 s for as long as it runs. Once the queue changes, the next trial comes within
    /// 5 s of the last, as before.
    #[test]
    fn a_fruitless_switch_trial_backs_off_while_nothing_changes() {
        let (mut s, a) = switch_serving_nobody();
        // Just past a's limit, which is also its expected end: the reservation's plan (for
        // the 4-GPU job) is re-made once, a change like any other.
        let mut at = 301_000;
        assert!(s.schedule(at).is_empty());
        assert!(s.time_actions(at).is_empty());
        let mut stands = timelimit::SWITCH_RETRIAL_MS;
        for _ in 0..8 {
            assert_eq!(s.next_deadline(at), Some(at + stands));
            at += stands;
            assert!(s.schedule(at).is_empty());
            assert!(s.time_actions(at).is_empty(), "still nobody to serve");
            stands = (stands * 2).min(timelimit::SWITCH_RETRIAL_MAX_MS);
        }
        assert_eq!(stands, timelimit::SWITCH_RETRIAL_MAX_MS);
        assert_eq!(s.next_deadline(at), Some(at + stands));
        // A job the switch would serve arrives: the next trial is 5 s after the last.
        let v = s.submit(limited(5, 2, None, 600), at + 1_000).unwrap();
        assert!(s.schedule(at + 1_000).is_empty());
        assert!(s.time_actions(at + 1_000).is_empty());
        let retry = at + timelimit::SWITCH_RETRIAL_MS;
        assert_eq!(s.next_deadline(at + 1_000), Some(retry));
        assert!(s.schedule(retry).is_empty());
        assert_eq!(s.time_actions(retry), vec![TimeAction::Requeue { job: a }]);
        s.requeue(a, retry);
        assert_eq!(started_ids(&s.schedule(retry)), vec![v]);
    }

    /// Under a backfilling policy a waiting job that fits on the freed GPUs but would delay
    /// the reservation does not start there: no switch for it.
    #[test]
    fn no_switch_for_a_job_the_reservation_holds_back() {
        let mut s = Scheduler::new(
            gpus(&[24_000, 24_000]),
            Config {
                policy: Policy::Backfill,
                ..easy()
            },
            1,
        );
        let a = s.submit(limited(1, 1, None, 10), 0).unwrap();
        s.submit(limited(1, 1, None, 1_000), 0).unwrap();
        s.schedule(0);
        // A 2-GPU job holds the reservation (by b's end); a 1-GPU job without a limit would
        // delay it if it took a's GPU.
        let wide = s.submit(req(2, 2, None), 1_000).unwrap();
        let long = s.submit(req(3, 1, None), 1_000).unwrap();
        assert!(s.schedule(1_000).is_empty());
        assert_eq!(s.reserved_job(), Some(wide));
        assert!(
            s.time_actions(20_000).is_empty(),
            "switching {a} would serve nobody"
        );
        assert_eq!(s.job(long).unwrap().state, JobState::Pending);
    }

    #[test]
    fn a_cancel_overrides_a_switch_in_progress() {
        let mut s = Scheduler::new(gpus(&[24_000]), fifo(), 1);
        let a = s.submit(limited(1, 1, None, 1), 0).unwrap();
        s.schedule(0);
        s.submit(req(2, 1, None), 0).unwrap();
        assert_eq!(s.time_actions(1_000), vec![TimeAction::Requeue { job: a }]);
        assert_eq!(s.cancel(a, ROOT), CancelOutcome::MustStop);
        assert_eq!(s.job(a).unwrap().stopping, Some(Stopping::Cancel));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// A job is switched only past its slice and only when a waiting job could use what it
        /// frees; a switched job goes exactly to the end of the queue; nothing is lost.
        #[test]
        fn switches_are_justified_and_go_to_the_end(
            policy in prop::sample::select(Policy::ALL.to_vec()),
            min_slice_s in prop_oneof![Just(0u64), 1u64..30],
            mems in prop::collection::vec(8_000u64..40_000, 1..4),
            jobs in prop::collection::vec((arb_request(), 0u64..50), 1..30),
            steps in prop::collection::vec((1u64..20, any::<bool>()), 1..60),
        ) {
            let config = Config { policy, min_slice_s, ..easy() };
            let mut s = Scheduler::new(gpus(&mems), config, 1);
            let mut ids = Vec::new();
            for (r, limit) in jobs {
                if let Ok(id) = s.submit(JobRequest { time_limit_s: Some(limit), ..r }, 0) {
                    ids.push(id);
                }
            }
            let mut now = 0;
            let mut ended = HashSet::new();
            s.schedule(now);
            for (dt, finish_one) in steps {
                now += dt * 1000;
                if finish_one {
                    let first = s.jobs_in_order()
                        .find(|j| j.state == JobState::Running && j.stopping.is_none())
                        .map(|j| j.id);
                    if let Some(id) = first {
                        s.finish(id, JobState::Completed);
                        ended.insert(id);
                    }
                }
                s.schedule(now);
                let before = s.clone();
                let waiting_before: HashSet<JobId> = before.jobs_in_order()
                    .filter(|j| j.state == JobState::Pending).map(|j| j.id).collect();
                let mut switched = Vec::new();
                for action in s.time_actions(now) {
                    if let TimeAction::Requeue { job } = action {
                        prop_assert!(before.slice_end(job).unwrap() <= now, "switched before its slice ended");
                        // Rate limit: never before it has run the minimum slice (and never
                        // with a limit of 0, which is none).
                        let started = before.job(job).unwrap().started_at.unwrap();
                        prop_assert!(now - started >= min_slice_s * 1000, "switched before the minimum slice");
                        prop_assert!(before.job(job).unwrap().request.time_limit_s != Some(0), "a 0 limit switched");
                        s.requeue(job, now);
                        switched.push(job);
                        if policy == Policy::Fifo {
                            let order: Vec<JobId> = s.jobs_in_order()
                                .filter(|j| j.state == JobState::Pending).map(|j| j.id).collect();
                            prop_assert_eq!(order.last(), Some(&job), "not at the end of the queue");
                        }
                    }
                }
                if !switched.is_empty() {
                    // Justified, whatever the policy: in the very next pass a job that was
                    // waiting starts on some GPU of each switched job, and none of them
                    // restarts at once.
                    let started = s.schedule(now);
                    for job in &switched {
                        prop_assert!(!started.iter().any(|a| a.job == *job), "{} restarted at once", job);
                        let freed = &before.job(*job).unwrap().gpus;
                        prop_assert!(
                            started.iter().any(|a| waiting_before.contains(&a.job)
                                && a.gpus.iter().any(|g| freed.contains(g))),
                            "switched {} but no waiting job started on its GPUs {:?}: {:?}",
                            job, freed, started
                        );
                    }
                }
                check_invariants(&s);
                for id in &ids {
                    prop_assert!(s.job(*id).is_some() != ended.contains(id));
                }
            }
        }
    }
}

#[test]
fn usage_history_charges_like_live_usage() {
    // One hour on 2 whole GPUs ending now, charged from history, equals the same run charged
    // live.
    let hour = 3_600_000;
    let mut live = Scheduler::new(gpus(&[24_000, 24_000]), easy(), 1);
    live.submit(req(7, 2, None), 0).unwrap();
    let started = live.schedule(0);
    live.finish(started[0].job, JobState::Completed);
    live.schedule(hour);
    let mut hist = Scheduler::new(gpus(&[24_000, 24_000]), easy(), 1);
    hist.charge_history(&req(7, 2, None), &[0, 1], 0, hour, hour);
    let (a, b) = (
        live.user_usage_gpu_s(7, hour),
        hist.user_usage_gpu_s(7, hour),
    );
    assert!(
        a > 7000.0 && (a - b).abs() < 1e-6 * a,
        "live {a} vs history {b}"
    );
    // And it decays the same way afterwards.
    let later = hour * 30;
    let (a, b) = (
        live.user_usage_gpu_s(7, later),
        hist.user_usage_gpu_s(7, later),
    );
    assert!((a - b).abs() < 1e-6 * a.max(1.0), "live {a} vs history {b}");
}

#[test]
fn one_waiting_job_switches_one_overdue_job_and_a_big_one_switches_several() {
    let fifo = Config {
        policy: Policy::Fifo,
        ..easy()
    };
    let limited = |n| JobRequest {
        time_limit_s: Some(1),
        ..req(1, n, None)
    };
    // Four overdue 1-GPU jobs, one waiting 1-GPU job: exactly one switch.
    let mut s = Scheduler::new(gpus(&[1000; 4]), fifo.clone(), 1);
    for _ in 0..4 {
        s.submit(limited(1), 0).unwrap();
    }
    s.schedule(0);
    s.submit(req(2, 1, None), 0).unwrap();
    let switches = s.time_actions(5_000);
    assert_eq!(switches.len(), 1, "{switches:?}");
    // Two overdue 1-GPU jobs, one waiting 2-GPU job: both are switched together.
    let mut s = Scheduler::new(gpus(&[1000; 2]), fifo, 1);
    let a = s.submit(limited(1), 0).unwrap();
    let b = s.submit(limited(1), 0).unwrap();
    s.schedule(0);
    let wide = s.submit(req(2, 2, None), 0).unwrap();
    assert_eq!(
        s.time_actions(5_000),
        vec![
            TimeAction::Requeue { job: a },
            TimeAction::Requeue { job: b }
        ]
    );
    // Their processes go one by one: what a frees waits for b (a does not restart on it, and
    // nothing else takes it), then the wide job gets both.
    s.requeue(a, 5_100);
    assert!(s.schedule(5_100).is_empty());
    s.submit(req(3, 1, None), 5_150).unwrap();
    assert!(s.schedule(5_150).is_empty());
    s.requeue(b, 5_200);
    assert_eq!(started_ids(&s.schedule(5_200)), vec![wide]);
}

/// The issue's case: jobs without limits (estimated at 24 h) keep GPUs from a later 1-GPU job
/// for the reservation of a wide one. srun's message says so, as the queue's REASON does,
/// instead of "needs 1 GPU, 7 free now".
#[test]
fn the_wait_message_states_the_real_cause() {
    let mut s = Scheduler::new(gpus(&[80_000; 8]), easy(), 1);
    let a = s.submit(req(1, 1, None), 0).unwrap();
    s.schedule(0);
    let wide = s.submit(req(2, 8, None), 1_000).unwrap();
    let small = s.submit(req(3, 1, None), 2_000).unwrap();
    assert!(s.schedule(2_000).is_empty());
    assert_eq!(s.pending_reason(wide), Some("Resources"));
    let detail = s.wait_detail(wide).unwrap();
    assert!(
        detail.starts_with("Resources: needs 8 whole GPUs, 7 free now; it holds the reservation, expected to start within 23:59:"),
        "{detail}"
    );
    assert_eq!(s.pending_reason(small), Some("Reservation"));
    let detail = s.wait_detail(small).unwrap();
    assert!(
        detail.starts_with(&format!("Reservation: it fits now, but it would delay job {wide}, which holds the reservation (expected to start within 23:59:"))
            && detail.contains("it may run for 1-00:00:00, the estimate for a job without a time limit"),
        "{detail}"
    );
    // A job that does not fit waits behind the reservation for priority.
    let big = s.submit(req(4, 8, None), 3_000).unwrap();
    s.schedule(3_000);
    let detail = s.wait_detail(big).unwrap();
    assert!(
        detail.starts_with(&format!(
            "Priority: needs 8 whole GPUs, 7 free now; job {wide} of higher priority goes first"
        )),
        "{detail}"
    );
    // Without a reservation (first-fit), it is resources, as the queue says.
    let mut s = Scheduler::new(
        gpus(&[80_000]),
        Config {
            policy: Policy::Fifo,
            ..easy()
        },
        1,
    );
    s.submit(req(1, 1, Some(50_000)), 0).unwrap();
    s.schedule(0);
    let w = s.submit(req(2, 1, Some(40_000)), 0).unwrap();
    s.schedule(0);
    assert_eq!(s.pending_reason(w), Some("Resources"));
    assert_eq!(
        s.wait_detail(w).unwrap(),
        "Resources: needs 1 GPU with 40000 MiB free each, 0 such now"
    );
    let _ = a;
}

/// The default policy reserves only for a starved job: one that waited `reserve_after_s` and
/// `reserve_after_wait_factor` times what jobs wait of late. Until then jobs start first-fit,
/// so GPUs are not held idle for a job that is not starving (the issue's case: a wide job
/// held 7 GPUs idle for a day for a reservation planned from 24 h estimates).
#[test]
fn reservations_wait_until_a_job_is_starved() {
    let hour = 3_600_000;
    let mut s = Scheduler::new(gpus(&[80_000; 8]), Config::default(), 1);
    let a = s.submit(req(1, 1, None), 0).unwrap();
    s.schedule(0);
    let wide = s.submit(req(2, 8, None), 1_000).unwrap();
    let small = s.submit(req(3, 1, None), 2_000).unwrap();
    // No reservation yet: the small job starts on an idle GPU.
    assert_eq!(started_ids(&s.schedule(2_000)), vec![small]);
    assert_eq!(s.reserved_job(), None);
    assert_eq!(s.pending_reason(wide), Some("Resources"));
    // Past reserve_after (2 h; jobs of late waited ~0), the next event plans it, and later
    // jobs without limits no longer pass it.
    let later = s.submit(req(4, 1, None), 2 * hour + 1_000).unwrap();
    assert!(s.schedule(2 * hour + 1_000).is_empty());
    assert_eq!(s.reserved_job(), Some(wide));
    assert_eq!(s.pending_reason(later), Some("Reservation"));
    // When everyone waits long, a job is not starved by waiting long: with jobs of late
    // waiting 10 h, the threshold is 24 x 10 h.
    let mut s = Scheduler::new(gpus(&[80_000; 2]), Config::default(), 1);
    let b = s.submit(req(5, 2, None), 0).unwrap();
    s.schedule(0);
    for k in 0..64 {
        s.submit(req(6, 1, None), 0).unwrap();
        let _ = k;
    }
    s.finish(b, JobState::Completed);
    // Both GPUs go to two of user 6's jobs, after 10 h.
    assert_eq!(s.schedule(10 * hour).len(), 2);
    // (User 6's jobs wait 10 h of late, like everyone's.)
    let wide = s.submit(req(6, 2, None), 10 * hour).unwrap();
    let running: Vec<JobId> = s
        .jobs_in_order()
        .filter(|j| j.state == JobState::Running)
        .map(|j| j.id)
        .collect();
    s.finish(running[0], JobState::Completed);
    s.schedule(13 * hour);
    assert_eq!(
        s.reserved_job(),
        None,
        "3 h is not starving when jobs wait 10 h"
    );
    assert_eq!(s.job(wide).unwrap().state, JobState::Pending);
    let _ = a;
}

#[test]
fn one_users_flood_does_not_keep_a_newcomer_from_being_starved() {
    let hour = 3_600_000;
    // The newcomer rule alone (the flood rule would reserve at once, see
    // `a_flood_does_not_take_each_freed_gpu_from_a_wide_job`).
    let mut config = Config::default();
    config.fair.flood_factor = 0.0;
    let mut s = Scheduler::new(gpus(&[80_000; 2]), config, 1);
    // User 6 floods: 64 jobs of 1 GPU, each running 10 h; its jobs wait long.
    for _ in 0..64 {
        s.submit(timed(6, 1, None, 10 * 3600), 0).unwrap();
    }
    let mut t = 0;
    let mut running = started_ids(&s.schedule(0));
    for _ in 0..3 {
        t += 10 * hour;
        for id in running.drain(..) {
            s.finish(id, JobState::Completed);
        }
        running = started_ids(&s.schedule(t));
    }
    // A user who has started nothing submits a wide job: it is starved once it has waited
    // reserve_after (2 h), not 24 x the flood's waits, and then holds the reservation.
    let wide = s.submit(req(7, 2, None), t).unwrap();
    s.schedule(t + hour);
    assert_eq!(s.reserved_job(), None, "1 h: not yet");
    s.schedule(t + 3 * hour);
    assert_eq!(s.reserved_job(), Some(wide));
    for id in running.drain(..) {
        s.finish(id, JobState::Completed);
    }
    assert_eq!(started_ids(&s.schedule(t + 10 * hour)), vec![wide]);
}

/// Tasks of a job array with a cap of `limit` (ids `first..first + n`).
fn array_tasks(uid: u32, first: JobId, n: u32, limit: u32, mem: Option<u64>) -> Vec<JobRequest> {
    (0..n)
        .map(|task| JobRequest {
            array: Some(ArrayTask {
                job: first,
                task,
                count: n,
                min: 0,
                max: n - 1,
                limit: Some(limit),
            }),
            ..req(uid, 1, mem)
        })
        .collect()
}

fn state_of(s: &Scheduler, id: JobId) -> Option<(JobState, Option<&'static str>)> {
    s.job(id).map(|j| (j.state, s.pending_reason(id)))
}

/// `%N`: at most N tasks of an array wait in the queue or run; the others are held in task
/// order, listed, counted and cancellable, and enter the queue as tasks leave (ending, or
/// cancelled while waiting). Other jobs are not held back by them.
#[test]
fn a_capped_array_holds_its_other_tasks_back() {
    let mut s = Scheduler::new(gpus(&[24_000]), easy(), 1);
    for r in array_tasks(1, 1, 5, 2, Some(1_000)) {
        s.submit(r, 0).unwrap();
    }
    let other = s.submit(req(2, 1, Some(1_000)), 0).unwrap();
    let started: Vec<JobId> = s.schedule(1).iter().map(|a| a.job).collect();
    assert_eq!(started, [1, 2, other]);
    for id in 3..=5 {
        assert_eq!(
            state_of(&s, id),
            Some((JobState::Pending, Some("JobArrayTaskLimit")))
        );
        assert!(s
            .wait_detail(id)
            .unwrap()
            .contains("at most 2 tasks of job array 1"));
    }
    assert_eq!(s.pending_count(), 3);
    assert_eq!(s.pending_count_of(1), 3);
    let order: Vec<JobId> = s.jobs_in_order().map(|j| j.id).collect();
    assert_eq!(order, [1, 2, other, 3, 4, 5]);

    // A task ends: the next in task order enters the queue and starts.
    s.finish(1, JobState::Completed).unwrap();
    assert_eq!(s.schedule(2).iter().map(|a| a.job).collect::<Vec<_>>(), [3]);
    // A held task cancelled goes without letting another in.
    assert!(matches!(s.cancel(5, ROOT), CancelOutcome::Removed(_)));
    assert_eq!(
        state_of(&s, 4),
        Some((JobState::Pending, Some("JobArrayTaskLimit")))
    );
    assert_eq!(s.pending_count(), 1);
    s.finish(2, JobState::Completed).unwrap();
    s.finish(3, JobState::Completed).unwrap();
    assert_eq!(s.schedule(3).iter().map(|a| a.job).collect::<Vec<_>>(), [4]);
    s.finish(4, JobState::Completed).unwrap();
    assert!(
        s.throttles.is_empty(),
        "a finished array leaves nothing behind"
    );
}

/// A waiting (not held) task cancelled lets the next one in; a requeued task keeps its place
/// under the cap; after a restart, running tasks count against the cap again.
#[test]
fn capped_array_cancel_requeue_and_restore() {
    let mut s = Scheduler::new(gpus(&[24_000]), easy(), 1);
    let tasks = array_tasks(1, 1, 4, 2, None);
    for r in tasks.clone() {
        s.submit(r, 0).unwrap();
    }
    assert_eq!(s.schedule(1).iter().map(|a| a.job).collect::<Vec<_>>(), [1]);
    assert_eq!(
        state_of(&s, 2),
        Some((JobState::Pending, Some("Resources")))
    );
    assert!(matches!(s.cancel(2, ROOT), CancelOutcome::Removed(_)));
    assert_eq!(
        state_of(&s, 3),
        Some((JobState::Pending, Some("Resources")))
    );
    assert_eq!(
        state_of(&s, 4),
        Some((JobState::Pending, Some("JobArrayTaskLimit")))
    );
    // A context switch: task 1 goes back to the queue, still one of the two.
    assert_eq!(s.requeue(1, 2), Some(2));
    assert_eq!(
        state_of(&s, 4),
        Some((JobState::Pending, Some("JobArrayTaskLimit")))
    );

    // Restart: task 3 running, 1 and 4 pending (restored in queue order).
    let mut r = Scheduler::new(gpus(&[24_000]), easy(), 1);
    r.restore_running(3, tasks[2].clone(), vec![0], 0, 1, 0)
        .unwrap();
    r.restore_pending(1, tasks[0].clone(), 0, 1).unwrap();
    r.restore_pending(4, tasks[3].clone(), 0, 0).unwrap();
    assert_eq!(
        state_of(&r, 1),
        Some((JobState::Pending, Some("Resources")))
    );
    assert_eq!(
        state_of(&r, 4),
        Some((JobState::Pending, Some("JobArrayTaskLimit")))
    );
    r.finish(3, JobState::Completed).unwrap();
    assert_eq!(r.schedule(5).iter().map(|a| a.job).collect::<Vec<_>>(), [1]);
    assert_eq!(
        state_of(&r, 4),
        Some((JobState::Pending, Some("Resources")))
    );
}

proptest! {
    /// Capped arrays beside other jobs, under every policy, with tasks ending, cancelled
    /// (running, waiting or held) and switched out in random order: no more of an array's tasks
    /// wait or run at once than its cap, and exactly as many while some are held; held tasks
    /// are always the array's last; the incremental pass decides what a full rescan would; no
    /// GPU is over-committed, and every job that is not cancelled runs.
    #[test]
    fn capped_arrays_keep_their_cap_and_all_run(
        policy in arb_policy(),
        arrays in proptest::collection::vec((1u32..4, 1u32..12, 1u32..4, proptest::option::of(1u64..30_000)), 1..4),
        loose in 0usize..6,
        actions in proptest::collection::vec((0u8..8, any::<proptest::sample::Index>()), 300),
    ) {
        let mut s = Scheduler::new(gpus(&[24_000, 24_000, 80_000]), config(policy), 1);
        let mut caps = HashMap::new();
        let mut all = Vec::new();
        for (uid, n, limit, mem) in arrays {
            let first = s.next_job_id();
            for r in array_tasks(uid, first, n, limit, mem) {
                all.push(s.submit(r, 0).unwrap());
            }
            caps.insert(first, limit as usize);
        }
        for i in 0..loose {
            all.push(s.submit(req(9, 1 + (i as u32 % 2), None), 0).unwrap());
        }
        let mut ran = HashSet::new();
        let mut cancelled = HashSet::new();
        let mut actions = actions.into_iter();
        for now in 1.. {
            let mut full = s.clone();
            let started = s.schedule(now);
            prop_assert_eq!(&started, &full.schedule_rescanning_all(now));
            for a in started {
                ran.insert(a.job);
            }
            for g in &s.gpus {
                prop_assert!(g.reserved_mib + g.foreign_mib <= g.spec.total_mib);
            }
            for (array, cap) in &caps {
                let tasks: Vec<&Job> = s.jobs.values()
                    .filter(|j| j.request.array.is_some_and(|a| a.job == *array))
                    .collect();
                let live: Vec<JobId> = tasks.iter().filter(|j| !j.held).map(|j| j.id).collect();
                let held: Vec<JobId> = tasks.iter().filter(|j| j.held).map(|j| j.id).collect();
                prop_assert!(live.len() <= *cap, "array {}: {} live, cap {}", array, live.len(), cap);
                prop_assert!(held.is_empty() || live.len() == *cap, "array {} holds tasks below its cap", array);
                prop_assert!(held.iter().all(|h| live.iter().all(|l| l < h)), "array {}: held {:?} before live {:?}", array, held, live);
            }
            let running: Vec<JobId> = s.jobs.values().filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
            if s.jobs.is_empty() {
                break;
            }
            let Some((what, pick)) = actions.next() else {
                // Out of actions: let everything run to the end.
                if let Some(&id) = running.first() {
                    s.finish(id, JobState::Completed);
                }
                continue;
            };
            match what {
                0 | 1 => {
                    let ids: Vec<JobId> = s.jobs.keys().copied().collect();
                    let id = ids[pick.index(ids.len())];
                    match s.cancel(id, ROOT) {
                        CancelOutcome::Removed(_) => {
                            cancelled.insert(id);
                        }
                        CancelOutcome::MustStop => {
                            s.finish(id, JobState::Cancelled);
                        }
                        _ => {}
                    }
                }
                2 if !running.is_empty() => {
                    s.requeue(running[pick.index(running.len())], now);
                }
                _ if !running.is_empty() => {
                    s.finish(running[pick.index(running.len())], JobState::Completed);
                }
                _ => {}
            }
        }
        prop_assert!(s.throttles.is_empty());
        for id in all {
            prop_assert!(ran.contains(&id) || cancelled.contains(&id), "job {} never ran", id);
        }
    }
}

/// Found by an attack review: 150 `--mem 1` jobs of one user ran at once on one GPU, each
/// with a root supervisor. A GPU takes at most `MAX_JOBS_PER_GPU` jobs; the next waits.
#[test]
fn a_gpu_is_shared_by_a_bounded_number_of_jobs() {
    use crate::placement::MAX_JOBS_PER_GPU;
    let mut s = Scheduler::new(gpus(&[24_000]), config(Policy::Fifo), 1);
    for _ in 0..MAX_JOBS_PER_GPU + 1 {
        s.submit(req(1, 1, Some(1)), 0).unwrap();
    }
    assert_eq!(s.schedule(0).len(), MAX_JOBS_PER_GPU);
    assert_eq!(s.running_len(), MAX_JOBS_PER_GPU);
    let first = s
        .jobs_in_order()
        .find(|j| j.state == JobState::Running)
        .unwrap()
        .id;
    s.finish(first, JobState::Completed);
    assert_eq!(s.schedule(1).len(), 1);
}

/// Found by a review: a newcomer was packed next to a job over its reservation while another
/// GPU was idle, which turned that job's warning (alone on its GPU) into a stop (shared).
/// Such a GPU comes last, and is still used when nothing else fits.
#[test]
fn a_gpu_with_a_job_over_its_reservation_is_shared_last() {
    let mut s = Scheduler::new(gpus(&[24_000, 24_000]), config(Policy::Fifo), 1);
    let a = s.submit(req(1, 1, Some(10_000)), 0).unwrap();
    let placed = s.schedule(0);
    assert_eq!(placed[0].gpus, vec![0]);
    s.set_job_usage(0, &[(a, 12_000)]);
    let b = s.submit(req(2, 1, Some(8_000)), 1).unwrap();
    let placed = s.schedule(1);
    assert_eq!((placed[0].job, placed[0].gpus.clone()), (b, vec![1]));
    // GPU 1 is too full now: GPU 0 is the only place left.
    let c = s.submit(req(2, 1, Some(11_000)), 2).unwrap();
    let d = s.submit(req(2, 1, Some(6_000)), 2).unwrap();
    let placed: Vec<(JobId, Vec<u32>)> =
        s.schedule(2).into_iter().map(|p| (p.job, p.gpus)).collect();
    assert!(placed.contains(&(c, vec![1])), "{placed:?}");
    assert!(placed.contains(&(d, vec![0])), "{placed:?}");
}

/// A memory job measured over its reservation is charged what it uses: a newcomer is not placed
/// on that memory, and is once the job is back inside (or gone).
#[test]
fn a_job_over_its_reservation_is_charged_what_it_uses() {
    let mut s = Scheduler::new(gpus(&[24_000]), config(Policy::Fifo), 1);
    let a = s.submit(req(1, 1, Some(4_000)), 0).unwrap();
    assert_eq!(s.schedule(0).len(), 1);
    // Uses 18 000 of its 4 000: 14 000 over, so 24 000 - 4 000 - 14 000 = 6 000 free.
    s.set_job_usage(0, &[(a, 18_000)]);
    assert_eq!(s.gpus()[0].excess_mib, 14_000);
    assert_eq!(s.gpus()[0].free_mib(), 6_000);
    let b = s.submit(req(2, 1, Some(8_000)), 1).unwrap();
    assert!(
        s.schedule(1).is_empty(),
        "placed on memory job {a} really uses"
    );
    let c = s.submit(req(2, 1, Some(6_000)), 2).unwrap();
    assert_eq!(
        s.schedule(2),
        vec![Assignment {
            job: c,
            gpus: vec![0]
        }]
    );
    // Using less than it reserved frees nothing: the reservation still counts.
    s.set_job_usage(0, &[(a, 1_000), (c, 100)]);
    assert_eq!(s.gpus()[0].excess_mib, 0);
    assert_eq!(s.gpus()[0].free_mib(), 14_000);
    assert_eq!(
        s.schedule(3),
        vec![Assignment {
            job: b,
            gpus: vec![0]
        }]
    );
    // Its end takes its excess with it.
    s.set_job_usage(0, &[(a, 20_000)]);
    assert_eq!(s.gpus()[0].excess_mib, 16_000);
    s.finish(a, JobState::Completed);
    assert_eq!(s.gpus()[0].excess_mib, 0);
    assert!(s.gpus()[0].used_by.is_empty());
    check_invariants(&s);
}

/// Memory a job uses on a GPU it does not hold is all over its (zero) reservation there; an
/// exclusive job's use is its own business; readings of jobs that do not run are ignored.
#[test]
fn use_on_other_gpus_exclusive_jobs_and_unknown_jobs() {
    let mut s = Scheduler::new(gpus(&[24_000, 24_000]), config(Policy::Fifo), 1);
    let x = s.submit(req(1, 1, None), 0).unwrap();
    let m = s.submit(req(1, 1, Some(4_000)), 0).unwrap();
    let started = s.schedule(0);
    assert_eq!(started.len(), 2);
    let (xg, mg) = (s.job(x).unwrap().gpus[0], s.job(m).unwrap().gpus[0]);
    s.set_job_usage(xg, &[(x, 24_000), (99, 5_000)]);
    assert_eq!(s.gpus()[xg as usize].excess_mib, 0);
    assert!(!s.gpus()[xg as usize].used_by.contains_key(&99));
    s.set_job_usage(mg, &[(m, 1_000), (x, 3_000)]);
    assert_eq!(s.gpus()[mg as usize].excess_mib, 3_000);
    // The exclusive job is never to be stopped, even over on a GPU it does not hold.
    assert_eq!(s.memory_actions(0, 0), vec![]);
    check_invariants(&s);
}

/// A memory job over its reservation on a shared GPU is stopped once it has been over for the
/// tolerance; alone, it is only reported, and its clock starts when someone joins it.
#[test]
fn over_reservation_on_a_shared_gpu_is_stopped_after_the_tolerance() {
    let mut s = Scheduler::new(gpus(&[24_000]), config(Policy::Fifo), 1);
    let a = s.submit(req(1, 1, Some(4_000)), 0).unwrap();
    s.schedule(0);
    s.set_job_usage(0, &[(a, 10_000)]);
    let over = Overuse {
        job: a,
        gpu: 0,
        used_mib: 10_000,
        reserved_mib: 4_000,
    };
    assert_eq!(
        s.memory_actions(1_000, 2_000),
        vec![MemoryAction::Alone(over)]
    );
    let b = s.submit(req(2, 1, Some(4_000)), 5_000).unwrap();
    assert_eq!(s.schedule(5_000).len(), 1);
    // Shared from now on: the tolerance counts from the first reading that sees it so.
    assert_eq!(s.memory_actions(5_500, 2_000), vec![]);
    assert_eq!(s.memory_actions(7_000, 2_000), vec![]);
    assert_eq!(
        s.memory_actions(7_500, 2_000),
        vec![MemoryAction::Stop(over)]
    );
    // Back inside its reservation: the clock starts afresh next time.
    s.set_job_usage(0, &[(a, 3_000), (b, 4_000)]);
    assert_eq!(s.memory_actions(8_000, 2_000), vec![]);
    s.set_job_usage(0, &[(a, 10_000), (b, 4_000)]);
    assert_eq!(s.memory_actions(8_500, 2_000), vec![]);
    assert_eq!(
        s.memory_actions(10_500, 2_000),
        vec![MemoryAction::Stop(over)]
    );
    // With no tolerance, at once; the neighbour inside its reservation is never named.
    s.set_job_usage(0, &[(a, 10_000), (b, 4_500)]);
    let actions = s.memory_actions(11_000, 0);
    assert_eq!(actions.len(), 2);
    assert!(actions.contains(&MemoryAction::Stop(over)));
    s.finish(a, JobState::OutOfMemory);
    s.set_job_usage(0, &[(b, 4_000)]);
    assert_eq!(s.memory_actions(12_000, 0), vec![]);
}

#[test]
fn standings_are_what_fair_priority_uses() {
    let mut cfg = easy();
    cfg.policy = Policy::Fair;
    cfg.fair.user_weights.insert(2, 2.0);
    // Without the shortest-first term, a job's priority is its wait plus its user's standing.
    cfg.fair.size_weight_h = 0.0;
    let mut s = Scheduler::new(gpus(&[1000, 1000]), cfg, 1);
    let a = s.submit(req(1, 1, None), 0).unwrap();
    let b = s.submit(req(2, 1, None), 0).unwrap();
    assert_eq!(started_ids(&s.schedule(0)), vec![a, b]);
    let w1 = s.submit(req(1, 1, None), 1_000).unwrap();
    s.submit(req(1, 1, None), 1_000).unwrap();
    s.submit(req(3, 1, None), 1_000).unwrap();
    assert!(s.schedule(3_600_000).is_empty());
    assert_eq!(
        s.pending_by_user().into_iter().collect::<Vec<_>>(),
        vec![(1, 2), (3, 1)]
    );
    let now = 3_600_000;
    let all = s.standings(now);
    assert_eq!(all.iter().map(|u| u.uid).collect::<Vec<_>>(), vec![1, 2, 3]);
    let (u1, u2, u3) = (&all[0], &all[1], &all[2]);
    // Both used one GPU for an hour; user 2's weight halves the charge.
    assert!((u1.usage_gpu_s - u2.usage_gpu_s).abs() < 1e-6);
    assert!((u1.usage_gpu_s - 3600.0).abs() < 60.0, "{}", u1.usage_gpu_s);
    assert!((u2.priority_s - u1.priority_s / 2.0).abs() < 1e-6);
    assert_eq!((u2.weight, u3.usage_gpu_s, u3.priority_s), (2.0, 0.0, 0.0));
    // The standing is the usage term of the job's priority: the rest is its waiting time.
    let p = s.priority(w1).unwrap();
    assert!(
        (p - (u1.priority_s + 3_599.0)).abs() < 1e-3,
        "{p} vs {u1:?}"
    );
}

/// `--begin`: a job waits with REASON BeginTime, counted and listed, until a pass at or after
/// its time; the timer is told when; cancelling it works; capped array tasks deferred together
/// start under their cap once the time comes.
#[test]
fn a_job_waits_for_its_begin_time() {
    let mut s = Scheduler::new(gpus(&[24_000, 24_000]), easy(), 1);
    let later = s.submit(req(1, 1, None), 0).unwrap();
    s.defer_until(later, 10_000);
    let now_job = s.submit(req(1, 1, None), 0).unwrap();
    let started: Vec<JobId> = s.schedule(1).iter().map(|a| a.job).collect();
    assert_eq!(
        started,
        [now_job],
        "the deferred job waits though a GPU is free"
    );
    assert_eq!(
        state_of(&s, later),
        Some((JobState::Pending, Some("BeginTime")))
    );
    assert_eq!(s.est_start(later), Some(10_000));
    assert_eq!(s.queue_position(later), None);
    assert!(s.wait_detail(later).unwrap().starts_with("BeginTime"));
    assert_eq!(
        (
            s.pending_count(),
            s.pending_count_of(1),
            s.pending_count_of(2)
        ),
        (1, 1, 0)
    );
    assert!(s.jobs_in_order().any(|j| j.id == later));
    assert_eq!(s.next_deadline(1), Some(10_000));
    assert!(s.schedule(9_999).is_empty());
    // Past due but not yet released (a pass came late): the timer asks for one at once.
    assert_eq!(s.next_deadline(20_000), Some(20_001));
    let started: Vec<JobId> = s.schedule(10_000).iter().map(|a| a.job).collect();
    assert_eq!(started, [later]);
    assert_eq!(s.next_deadline(10_000), None);

    // Cancelled while waiting for its time.
    let c = s.submit(req(1, 1, None), 10_000).unwrap();
    s.defer_until(c, 50_000);
    assert!(matches!(s.cancel(c, ROOT), CancelOutcome::Removed(_)));
    assert_eq!(s.pending_count(), 0);
    assert_eq!(s.next_deadline(10_001), None);

    // A capped array, all deferred: nothing runs early; then at most 1 at once.
    s.finish(now_job, JobState::Completed).unwrap();
    s.finish(later, JobState::Completed).unwrap();
    let ids: Vec<JobId> = array_tasks(1, s.next_job_id(), 3, 1, None)
        .into_iter()
        .map(|r| s.submit(r, 20_000).unwrap())
        .collect();
    for &id in &ids {
        s.defer_until(id, 30_000);
    }
    assert!(s.schedule(20_001).is_empty());
    assert_eq!(s.pending_count(), 3);
    assert_eq!(
        s.schedule(30_000).iter().map(|a| a.job).collect::<Vec<_>>(),
        [ids[0]]
    );
    assert_eq!(
        state_of(&s, ids[1]),
        Some((JobState::Pending, Some("JobArrayTaskLimit")))
    );
    s.finish(ids[0], JobState::Completed).unwrap();
    assert_eq!(
        s.schedule(30_001).iter().map(|a| a.job).collect::<Vec<_>>(),
        [ids[1]]
    );
}

mod gates {
    //! Holds, dependencies and drains (`gate.rs`).
    use super::*;

    const ALICE: Requester = Requester {
        uid: 1,
        is_admin: false,
    };
    const BOB: Requester = Requester {
        uid: 2,
        is_admin: false,
    };

    fn dep(any: bool, items: &[(DepKind, JobId)]) -> Gate {
        Gate {
            hold: None,
            dependency: Some(Dependency {
                any,
                items: items
                    .iter()
                    .map(|&(kind, job)| DepItem {
                        kind,
                        job,
                        tasks: 0,
                    })
                    .collect(),
                text: String::new(),
            }),
        }
    }

    fn live(_: JobId) -> TargetState {
        TargetState::Live
    }

    fn started(s: &mut Scheduler, now: Millis) -> Vec<JobId> {
        s.schedule(now).into_iter().map(|a| a.job).collect()
    }

    #[test]
    fn parses_slurm_dependencies() {
        let d = parse_dependency("afterok:5:6,afterany:7_2,singleton").unwrap();
        assert!(!d.any);
        assert_eq!(
            d.items,
            vec![
                (DepKind::AfterOk, Some(DepTarget::Job(5))),
                (DepKind::AfterOk, Some(DepTarget::Job(6))),
                (DepKind::AfterAny, Some(DepTarget::Task(7, 2))),
                (DepKind::Singleton, None),
            ]
        );
        assert!(parse_dependency("afterok:5?afternotok:6").unwrap().any);
        for bad in [
            "",
            "afterok",
            "afterok:",
            "afterok:x",
            "afterok:0",
            "singleton:3",
            "later:5",
            "afterok:5,afterany:6?after:7",
            "after:5+10",
            "aftercorr:5",
        ] {
            assert!(parse_dependency(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn afterok_waits_for_success_and_afternotok_never_runs_after_one() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        let a = s.submit(req(1, 1, None), 0).unwrap();
        assert_eq!(started(&mut s, 0), vec![a]);
        s.restore_pending_gated(
            2,
            req(1, 1, None),
            0,
            0,
            dep(false, &[(DepKind::AfterOk, a)]),
            live,
        )
        .unwrap();
        s.restore_pending_gated(
            3,
            req(1, 1, None),
            0,
            0,
            dep(false, &[(DepKind::AfterNotOk, a)]),
            live,
        )
        .unwrap();
        s.restore_pending_gated(
            4,
            req(1, 1, None),
            0,
            0,
            dep(false, &[(DepKind::After, a)]),
            live,
        )
        .unwrap();
        assert_eq!(s.dependency_targets_of(1), 3);
        // A free GPU, but 2 and 3 wait on job 1; 4 only needed it to start.
        assert_eq!(started(&mut s, 1), vec![4]);
        assert_eq!(s.dependency_targets_of(1), 2);
        assert_eq!(s.pending_reason(2), Some("Dependency"));
        assert!(
            s.wait_detail(2).unwrap().contains("afterok:1"),
            "{:?}",
            s.wait_detail(2)
        );
        assert_eq!(s.queue_position(2), None);
        assert_eq!(s.pending_count_of(1), 2);
        s.finish(a, JobState::Completed);
        assert_eq!(started(&mut s, 2), vec![2]);
        assert_eq!(s.pending_reason(3), Some("DependencyNeverSatisfied"));
        // It stays pending (Slurm's default) until cancelled.
        s.finish(4, JobState::Completed);
        assert!(started(&mut s, 3).is_empty());
        assert!(matches!(s.cancel(3, ALICE), CancelOutcome::Removed(_)));
        assert_eq!(s.pending_count(), 0);
        assert_eq!(s.dependency_targets_of(1), 0);
    }

    #[test]
    fn targets_that_ended_before_are_settled_from_the_lookup() {
        let mut s = Scheduler::new(gpus(&[1000]), Config::default(), 10);
        let ended = |id: JobId| match id {
            1 => TargetState::Ended(JobState::Completed),
            2 => TargetState::Ended(JobState::Failed),
            _ => TargetState::Gone,
        };
        s.restore_pending_gated(
            10,
            req(1, 1, None),
            0,
            0,
            dep(false, &[(DepKind::AfterOk, 2)]),
            ended,
        )
        .unwrap();
        s.restore_pending_gated(
            11,
            req(1, 1, None),
            0,
            0,
            dep(true, &[(DepKind::AfterOk, 2), (DepKind::AfterOk, 1)]),
            ended,
        )
        .unwrap();
        assert_eq!(started(&mut s, 0), vec![11]);
        assert_eq!(s.pending_reason(10), Some("DependencyNeverSatisfied"));
    }

    #[test]
    fn a_target_restored_after_its_dependent_is_still_awaited() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        // Recovery restores in queue order: job 5 depends on job 6, restored after it.
        s.restore_pending_gated(
            5,
            req(1, 1, None),
            0,
            0,
            dep(false, &[(DepKind::AfterAny, 6)]),
            live,
        )
        .unwrap();
        s.restore_pending(6, req(1, 1, None), 1, 0).unwrap();
        assert_eq!(started(&mut s, 2), vec![6]);
        s.finish(6, JobState::Failed);
        assert_eq!(started(&mut s, 3), vec![5]);
    }

    #[test]
    fn a_whole_job_array_is_followed_by_counts_not_per_task() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        let task = |t: u32| JobRequest {
            array: Some(ArrayTask {
                job: 1,
                task: t,
                count: 3,
                min: 0,
                max: 2,
                limit: None,
            }),
            ..req(1, 1, Some(100))
        };
        let whole = |kind| Gate {
            hold: None,
            dependency: Some(Dependency {
                any: false,
                items: vec![DepItem {
                    kind,
                    job: 1,
                    tasks: 3,
                }],
                text: String::new(),
            }),
        };
        // Task 0 ended before (the records say so); tasks 1 and 2 are live.
        let lookup = |t: JobId| match t {
            1 => TargetState::Ended(JobState::Completed),
            _ => TargetState::Live,
        };
        s.restore_pending(2, task(1), 0, 0).unwrap();
        s.restore_pending(3, task(2), 0, 0).unwrap();
        s.restore_pending_gated(
            10,
            req(1, 1, Some(100)),
            0,
            0,
            whole(DepKind::AfterOk),
            lookup,
        )
        .unwrap();
        s.restore_pending_gated(
            11,
            req(1, 1, Some(100)),
            0,
            0,
            whole(DepKind::AfterNotOk),
            lookup,
        )
        .unwrap();
        s.restore_pending_gated(
            12,
            req(1, 1, Some(100)),
            0,
            0,
            whole(DepKind::After),
            lookup,
        )
        .unwrap();
        // Task 0 completed, so it ran: `after` holds at once.
        let mut got = started(&mut s, 0);
        got.sort();
        assert_eq!(got, vec![2, 3, 12]);
        assert!(started(&mut s, 1).is_empty());
        s.finish(2, JobState::Completed);
        assert!(started(&mut s, 2).is_empty());
        assert_eq!(s.pending_reason(10), Some("Dependency"));
        assert!(s.wait_detail(10).unwrap().contains("job array"));
        s.finish(3, JobState::Failed);
        assert_eq!(started(&mut s, 3), vec![11]);
        assert_eq!(s.pending_reason(10), Some("DependencyNeverSatisfied"));
        assert_eq!(s.dependency_targets_of(1), 1);
    }

    /// Found by an attack review: each task of a dependent array walked every task of the
    /// target array as it entered (10,000 × 10,000: a 1.8 s stall). The count is now kept
    /// per target array until one of its tasks changes; what each dependent knows is the
    /// same as before: here `after` on the whole array, before and after a task starts.
    #[test]
    fn dependents_entering_together_count_the_target_array_once_and_see_its_changes() {
        let mut s = Scheduler::new(gpus(&[1000]), Config::default(), 1);
        let task = |t: u32| JobRequest {
            array: Some(ArrayTask {
                job: 1,
                task: t,
                count: 2,
                min: 0,
                max: 1,
                limit: None,
            }),
            ..req(1, 1, None)
        };
        let after_all = || Gate {
            hold: None,
            dependency: Some(Dependency {
                any: false,
                items: vec![DepItem {
                    kind: DepKind::After,
                    job: 1,
                    tasks: 2,
                }],
                text: String::new(),
            }),
        };
        // A job holds the GPU: no task starts yet.
        s.restore_pending(9, req(1, 1, None), 0, 0).unwrap();
        assert_eq!(started(&mut s, 0), vec![9]);
        s.restore_pending(1, task(0), 0, 0).unwrap();
        s.restore_pending(2, task(1), 0, 0).unwrap();
        for id in 10..13 {
            s.restore_pending_gated(id, req(2, 1, Some(1)), 1, 0, after_all(), live)
                .unwrap();
        }
        assert!(started(&mut s, 1).is_empty());
        assert_eq!(s.pending_reason(10), Some("Dependency"));
        // A task starts: `after` is met for those waiting, and for one that enters now.
        s.finish(9, JobState::Completed);
        assert_eq!(started(&mut s, 2), vec![1]);
        s.restore_pending_gated(13, req(2, 1, Some(1)), 3, 0, after_all(), live)
            .unwrap();
        // (Its item is met at once, and the count is still kept for the next such job:
        // found by a review, each of them counted the tasks again.)
        assert!(s.array_is_counted(1));
        s.finish(1, JobState::Completed);
        // (Task 2 needs the whole GPU, which the dependents now share.)
        let mut got = started(&mut s, 4);
        got.sort();
        assert_eq!(got, vec![10, 11, 12, 13]);
    }

    #[test]
    fn singleton_runs_one_job_of_a_name_at_a_time() {
        let mut s = Scheduler::new(gpus(&[1000, 1000, 1000]), Config::default(), 1);
        let single = || dep(false, &[(DepKind::Singleton, 0)]);
        let a = s.submit(req(1, 1, None), 0).unwrap();
        s.restore_pending_gated(2, req(1, 1, None), 0, 0, single(), live)
            .unwrap();
        s.restore_pending_gated(3, req(1, 1, None), 0, 0, single(), live)
            .unwrap();
        // Another user's job of the same name does not count.
        s.restore_pending_gated(4, req(2, 1, None), 0, 0, single(), live)
            .unwrap();
        let mut got = started(&mut s, 0);
        got.sort();
        assert_eq!(got, vec![a, 4]);
        assert_eq!(s.pending_reason(2), Some("Dependency"));
        s.finish(a, JobState::Completed);
        assert_eq!(started(&mut s, 1), vec![2]);
        assert!(started(&mut s, 2).is_empty());
        s.finish(2, JobState::Failed);
        assert_eq!(started(&mut s, 3), vec![3]);
        // A later job of the name that runs already holds a singleton back too.
        s.finish(3, JobState::Completed);
        let later = s.submit(req(1, 1, None), 4).unwrap();
        assert_eq!(started(&mut s, 4), vec![later]);
        let next = s.next_job_id();
        s.restore_pending_gated(next, req(1, 1, None), 5, 0, single(), live)
            .unwrap();
        assert!(started(&mut s, 5).is_empty());
        assert_eq!(s.pending_reason(next), Some("Dependency"));
        s.finish(later, JobState::Completed);
        assert_eq!(started(&mut s, 6), vec![next]);
    }

    /// Found by an attack review: each job of a name that left queued the name's singleton
    /// waiter for a check that walked every live job of the name, so cancelling 10,000 held
    /// jobs of a name with 50,000 stalled the server for 17 s. Now the waiter is checked once
    /// per pass, and a running job of the name is counted, not looked for. The answers stay
    /// the same: here the waiter is held back by an earlier running job, then by a later one
    /// that started while it waited, and runs once neither does.
    #[test]
    fn a_singleton_waiter_outlives_thousands_of_its_names_jobs_leaving() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        let first = s.submit(req(1, 1, None), 0).unwrap();
        assert_eq!(started(&mut s, 0), vec![first]);
        let waiter = s.next_job_id();
        let single = dep(false, &[(DepKind::Singleton, 0)]);
        s.restore_pending_gated(waiter, req(1, 1, None), 1, 0, single, live)
            .unwrap();
        // A later job of the name without the dependency starts on the other GPU.
        let later = s.submit(req(1, 1, None), 1).unwrap();
        assert_eq!(started(&mut s, 1), vec![later]);
        let held: Vec<JobId> = (0..5_000)
            .map(|_| {
                let id = s.submit(req(1, 1, None), 2).unwrap();
                s.hold(id, ALICE).unwrap();
                id
            })
            .collect();
        assert!(started(&mut s, 2).is_empty());
        for id in held {
            s.cancel(id, ALICE);
        }
        assert!(started(&mut s, 3).is_empty());
        assert_eq!(s.pending_reason(waiter), Some("Dependency"));
        s.finish(first, JobState::Completed);
        // The later job still runs: one job of a name at a time.
        assert!(started(&mut s, 4).is_empty());
        assert_eq!(s.pending_reason(waiter), Some("Dependency"));
        s.finish(later, JobState::Completed);
        assert_eq!(started(&mut s, 5), vec![waiter]);
        // A running job renamed runs under its new name: it holds back a singleton of that
        // name, and no longer one of its old name.
        let renamed = s
            .submit(
                JobRequest {
                    name: "old".into(),
                    ..req(1, 1, None)
                },
                6,
            )
            .unwrap();
        assert_eq!(started(&mut s, 6), vec![renamed]);
        let update = |name: &str| JobUpdate {
            name: Some(name.into()),
            ..Default::default()
        };
        s.update(renamed, ALICE, update("new")).unwrap();
        let single = || dep(false, &[(DepKind::Singleton, 0)]);
        let of_old = s.next_job_id();
        s.restore_pending_gated(
            of_old,
            JobRequest {
                name: "old".into(),
                ..req(1, 1, Some(1))
            },
            7,
            0,
            single(),
            live,
        )
        .unwrap();
        let of_new = s.next_job_id();
        s.restore_pending_gated(
            of_new,
            JobRequest {
                name: "new".into(),
                ..req(1, 1, Some(1))
            },
            7,
            0,
            single(),
            live,
        )
        .unwrap();
        s.finish(waiter, JobState::Completed);
        assert_eq!(started(&mut s, 8), vec![of_old]);
        assert_eq!(s.pending_reason(of_new), Some("Dependency"));
    }

    #[test]
    fn hold_release_and_admin_holds() {
        let mut s = Scheduler::new(gpus(&[1000]), Config::default(), 1);
        let blocker = s.submit(req(1, 1, None), 0).unwrap();
        assert_eq!(started(&mut s, 0), vec![blocker]);
        let a = s.submit(req(1, 1, None), 1).unwrap();
        let b = s.submit(req(1, 1, None), 2).unwrap();
        assert_eq!(s.hold(a, BOB), Err(ControlError::PermissionDenied));
        assert_eq!(s.hold(blocker, ALICE), Err(ControlError::NotPending));
        assert_eq!(s.hold(a, ALICE), Ok(Hold::User));
        assert_eq!(s.hold(b, ROOT), Ok(Hold::Admin));
        assert_eq!(s.pending_reason(a), Some("JobHeldUser"));
        assert_eq!(s.pending_reason(b), Some("JobHeldAdmin"));
        assert_eq!(s.pending_count(), 2);
        s.finish(blocker, JobState::Completed);
        assert!(started(&mut s, 3).is_empty());
        assert_eq!(s.release(b, ALICE), Err(ControlError::AdminHold));
        assert_eq!(s.release(a, BOB), Err(ControlError::PermissionDenied));
        assert_eq!(s.release(a, ALICE), Ok(()));
        assert_eq!(s.release(a, ALICE), Err(ControlError::NotHeld));
        assert_eq!(started(&mut s, 4), vec![a]);
        assert_eq!(s.release(b, ROOT), Ok(()));
        s.finish(a, JobState::Completed);
        assert_eq!(started(&mut s, 5), vec![b]);
    }

    #[test]
    fn a_held_job_keeps_its_place_in_the_queue() {
        let mut s = Scheduler::new(gpus(&[1000]), Config::default(), 1);
        let blocker = s.submit(req(1, 1, None), 0).unwrap();
        started(&mut s, 0);
        let a = s.submit(req(1, 1, None), 1).unwrap();
        let b = s.submit(req(1, 1, None), 2).unwrap();
        s.hold(a, ALICE).unwrap();
        s.release(a, ALICE).unwrap();
        s.finish(blocker, JobState::Completed);
        assert_eq!(started(&mut s, 3), vec![a]);
        s.finish(a, JobState::Completed);
        assert_eq!(started(&mut s, 4), vec![b]);
    }

    #[test]
    fn update_changes_a_pending_job_and_bounds_a_running_ones_limit() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        let mut r = req(1, 1, None);
        r.time_limit_s = Some(600);
        let run = s.submit(r, 0).unwrap();
        started(&mut s, 0);
        s.hold(s.next_job_id(), ALICE).unwrap_err();
        let p = s.submit(req(1, 1, None), 1).unwrap();
        s.hold(p, ALICE).unwrap();
        let up = |f: fn(&mut JobUpdate)| {
            let mut u = JobUpdate::default();
            f(&mut u);
            u
        };
        s.update(p, ALICE, up(|u| u.gpus = Some(2))).unwrap();
        assert_eq!(s.job(p).unwrap().request.gpus, 2);
        assert!(matches!(
            s.update(p, ALICE, up(|u| u.gpus = Some(3))),
            Err(ControlError::Invalid(_))
        ));
        assert!(s.update(p, ALICE, up(|u| u.nice = Some(-5))).is_err());
        assert_eq!(
            s.update(p, BOB, up(|u| u.name = Some("x".into()))),
            Err(ControlError::PermissionDenied)
        );
        assert!(s.update(run, ALICE, up(|u| u.gpus = Some(2))).is_err());
        assert!(s
            .update(run, ALICE, up(|u| u.time_limit_s = Some(Some(1200))))
            .is_err());
        assert!(s
            .update(run, ALICE, up(|u| u.time_limit_s = Some(None)))
            .is_err());
        s.update(run, ALICE, up(|u| u.time_limit_s = Some(Some(60))))
            .unwrap();
        assert_eq!(s.job(run).unwrap().request.time_limit_s, Some(60));
        s.update(run, ROOT, up(|u| u.time_limit_s = Some(Some(7200))))
            .unwrap();
        assert_eq!(s.job(run).unwrap().request.time_limit_s, Some(7200));
    }

    #[test]
    fn relative_time_limit_changes_apply_to_the_current_limit() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        let change = |secs: i64| JobUpdate {
            time_limit_change_s: Some(secs),
            ..Default::default()
        };
        let mut r = req(1, 1, None);
        r.time_limit_s = Some(600);
        let run = s.submit(r, 0).unwrap();
        started(&mut s, 0);
        // The owner may take from a running job's limit, not add to it; root may add.
        s.update(run, ALICE, change(-120)).unwrap();
        assert_eq!(s.job(run).unwrap().request.time_limit_s, Some(480));
        let err = s.update(run, ALICE, change(60)).unwrap_err();
        assert!(err.to_string().contains("only root may raise"), "{err}");
        s.update(run, ROOT, change(3600)).unwrap();
        assert_eq!(s.job(run).unwrap().request.time_limit_s, Some(4080));
        // Nothing left, or nothing to change: refused, the limit untouched.
        let err = s.update(run, ROOT, change(-4080)).unwrap_err();
        assert!(err.to_string().contains("would leave no time"), "{err}");
        assert_eq!(s.job(run).unwrap().request.time_limit_s, Some(4080));
        let p = s.submit(req(1, 1, None), 1).unwrap();
        let err = s.update(p, ALICE, change(600)).unwrap_err();
        assert!(err.to_string().contains("has no time limit"), "{err}");
        assert_eq!(s.job(p).unwrap().request.time_limit_s, None);
        // A pending job's owner may add.
        s.update(
            p,
            ALICE,
            JobUpdate {
                time_limit_s: Some(Some(60)),
                ..Default::default()
            },
        )
        .unwrap();
        s.update(p, ALICE, change(600)).unwrap();
        assert_eq!(s.job(p).unwrap().request.time_limit_s, Some(660));
    }

    #[test]
    fn drained_gpus_get_no_new_jobs_and_the_server_drain_starts_nothing() {
        let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
        assert!(s.set_gpu_drained(0, true));
        assert!(!s.set_gpu_drained(7, true));
        let a = s.submit(req(1, 1, None), 0).unwrap();
        let two = s.submit(req(1, 2, None), 0).unwrap();
        let got = s.schedule(0);
        assert_eq!(
            got,
            vec![Assignment {
                job: a,
                gpus: vec![1]
            }]
        );
        assert_eq!(s.pending_reason(two), Some("GpuDrained"));
        s.set_server_drained(true);
        s.set_gpu_drained(0, false);
        s.finish(a, JobState::Completed);
        assert!(s.schedule(1).is_empty());
        assert_eq!(s.pending_reason(two), Some("ServerDrained"));
        s.set_server_drained(false);
        assert_eq!(started(&mut s, 2), vec![two]);
    }

    proptest! {
        /// Random chains of dependencies, holds and drains: a job never starts before its
        /// `afterok` target completed (never after it failed), never while held, and never on
        /// a drained GPU.
        #[test]
        fn gates_and_drains_are_never_crossed(
            ops in proptest::collection::vec((0u8..6, 0u64..12, any::<bool>()), 1..80),
        ) {
            let mut s = Scheduler::new(gpus(&[1000, 1000, 1000]), easy(), 1);
            let mut outcome: HashMap<JobId, JobState> = HashMap::new();
            let mut deps: HashMap<JobId, JobId> = HashMap::new();
            let mut drained = [false; 3];
            let mut now = 0;
            for (op, x, flag) in ops {
                now += 1;
                match op {
                    0 | 1 => {
                        let id = s.next_job_id();
                        let target = x % id.max(1);
                        let gate = if target > 0 {
                            deps.insert(id, target);
                            dep(false, &[(DepKind::AfterOk, target)])
                        } else {
                            Gate { hold: flag.then_some(Hold::User), dependency: None }
                        };
                        let lookup = |t: JobId| match outcome.get(&t) {
                            Some(&st) => TargetState::Ended(st),
                            None => TargetState::Gone,
                        };
                        s.restore_pending_gated(id, req(1, 1, Some(100)), now, 0, gate, lookup).unwrap();
                    }
                    2 => {
                        let running: Vec<JobId> = s.jobs_in_order()
                            .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
                        if let Some(&id) = running.get(x as usize % running.len().max(1)) {
                            let st = if flag { JobState::Completed } else { JobState::Failed };
                            s.finish(id, st);
                            outcome.insert(id, st);
                        }
                    }
                    3 => {
                        let g = (x % 3) as usize;
                        drained[g] = flag;
                        s.set_gpu_drained(g as u32, flag);
                    }
                    4 => { let _ = s.release(x, ROOT); }
                    _ => { let _ = s.hold(x, ROOT); }
                }
                for a in s.schedule(now) {
                    if let Some(t) = deps.get(&a.job) {
                        prop_assert_eq!(outcome.get(t), Some(&JobState::Completed),
                            "job {} started before its afterok target {} completed", a.job, t);
                    }
                    for g in &a.gpus {
                        prop_assert!(!drained[*g as usize], "job {} placed on drained GPU {}", a.job, g);
                    }
                }
            }
        }
    }

    proptest! {
        /// Jobs waiting on a whole job array share one count of it, followed by its tasks'
        /// events (a task's event walks the dependents only when it settles some): a
        /// dependent, whenever it entered, starts only once its condition holds on the
        /// tasks' real outcomes, starts once it holds, and leaves the array's watch when it
        /// stops waiting.
        #[test]
        fn whole_array_dependents_see_what_counting_the_tasks_would(
            ops in proptest::collection::vec((0u8..5, 0u64..64, any::<bool>()), 1..60),
        ) {
            const TASKS: u32 = 4;
            let mut s = Scheduler::new(gpus(&[1000, 1000]), Config::default(), 1);
            for t in 0..TASKS {
                let task = JobRequest {
                    array: Some(ArrayTask { job: 1, task: t, count: TASKS, min: 0, max: TASKS - 1, limit: None }),
                    ..req(1, 1, None)
                };
                s.restore_pending(JobId::from(t) + 1, task, 0, 0).unwrap();
            }
            let kinds = [DepKind::After, DepKind::AfterAny, DepKind::AfterOk, DepKind::AfterNotOk];
            // The model: each task's outcome, and whether it ever ran.
            let mut ended: HashMap<JobId, JobState> = HashMap::new();
            let mut ran: HashSet<JobId> = HashSet::new();
            let mut waiting: HashMap<JobId, DepKind> = HashMap::new();
            let holds = |kind: DepKind, ran: &HashSet<JobId>, ended: &HashMap<JobId, JobState>| {
                let done = ended.len() == TASKS as usize;
                let bad = ended.values().any(|&st| st != JobState::Completed);
                match kind {
                    DepKind::After => !ran.is_empty() || done,
                    DepKind::AfterAny => done,
                    DepKind::AfterOk => done && !bad,
                    _ => done && bad,
                }
            };
            let mut now = 0;
            let check_starts = |s: &mut Scheduler, now: Millis, ran: &mut HashSet<JobId>,
                                    ended: &HashMap<JobId, JobState>,
                                    waiting: &mut HashMap<JobId, DepKind>| -> Result<(), TestCaseError> {
                for a in s.schedule(now) {
                    if a.job <= JobId::from(TASKS) {
                        ran.insert(a.job);
                    } else if let Some(kind) = waiting.remove(&a.job) {
                        prop_assert!(holds(kind, ran, ended),
                            "job {} ({:?}) started with tasks ran {:?}, ended {:?}", a.job, kind, ran, ended);
                    }
                }
                Ok(())
            };
            for (op, x, flag) in ops {
                now += 1;
                match op {
                    0 | 1 => {
                        let id = s.next_job_id();
                        let kind = kinds[x as usize % kinds.len()];
                        let gate = Gate {
                            hold: None,
                            dependency: Some(Dependency {
                                any: false,
                                items: vec![DepItem { kind, job: 1, tasks: TASKS }],
                                text: String::new(),
                            }),
                        };
                        let lookup = |t: JobId| match ended.get(&t) {
                            Some(&st) => TargetState::Ended(st),
                            None => TargetState::Live,
                        };
                        s.restore_pending_gated(id, req(2, 1, Some(1)), now, 0, gate, lookup).unwrap();
                        waiting.insert(id, kind);
                    }
                    2 => {
                        // A running task ends, completed or failed.
                        let running: Vec<JobId> = ran.iter().copied()
                            .filter(|t| !ended.contains_key(t)).collect();
                        if let Some(&t) = running.get(x as usize % running.len().max(1)) {
                            let st = if flag { JobState::Completed } else { JobState::Failed };
                            s.finish(t, st);
                            ended.insert(t, st);
                        }
                    }
                    3 => {
                        // A waiting task is cancelled.
                        let t = 1 + x % JobId::from(TASKS);
                        if !ran.contains(&t) && !ended.contains_key(&t)
                            && matches!(s.cancel(t, ROOT), CancelOutcome::Removed(_)) {
                            ended.insert(t, JobState::Cancelled);
                        }
                    }
                    _ => {
                        // A dependent is cancelled.
                        let mut ids: Vec<JobId> = waiting.keys().copied().collect();
                        ids.sort();
                        if let Some(&id) = ids.get(x as usize % ids.len().max(1)) {
                            if matches!(s.cancel(id, ROOT), CancelOutcome::Removed(_)) {
                                waiting.remove(&id);
                            }
                        }
                    }
                }
                check_starts(&mut s, now, &mut ran, &ended, &mut waiting)?;
                // A dependent whose condition holds starts (the next pass at the latest:
                // the GPUs fit every dependent once the tasks hold none).
                if ended.len() == TASKS as usize {
                    check_starts(&mut s, now, &mut ran, &ended, &mut waiting)?;
                    for (id, kind) in &waiting {
                        prop_assert!(!holds(*kind, &ran, &ended), "job {} ({:?}) still waits", id, kind);
                    }
                }
                // The watch keeps exactly the dependents whose condition is still open.
                let done = ended.len() == TASKS as usize;
                let bad = ended.values().any(|&st| st != JobState::Completed);
                let open = waiting.values()
                    .filter(|&&kind| match kind {
                        DepKind::After => ran.is_empty() && !done,
                        DepKind::AfterOk => !done && !bad,
                        _ => !done,
                    })
                    .count();
                prop_assert_eq!(s.array_watch_len(1), open);
            }
        }
    }
}

fn named(uid: u32, name: &str) -> JobRequest {
    JobRequest {
        name: name.into(),
        ..req(uid, 1, None)
    }
}

#[test]
fn jobs_without_limits_are_estimated_from_their_users_finished_runs() {
    let min = 60_000;
    let mut s = Scheduler::new(gpus(&[80_000; 2]), Config::default(), 1);
    let day = 24 * 3600 * 1000;
    assert_eq!(
        s.estimate_ms(&named(1, "train")),
        day,
        "no history: the default"
    );
    // User 1 runs two "train" jobs of 10 and 20 min (learned from finish at the next pass).
    let t1 = s.submit(named(1, "train"), 0).unwrap();
    let t2 = s.submit(named(1, "train"), 0).unwrap();
    s.schedule(0);
    s.finish(t1, JobState::Completed);
    s.schedule(10 * min);
    assert_eq!(
        s.estimate_ms(&named(1, "train")),
        day,
        "one run is not enough"
    );
    s.finish(t2, JobState::Completed);
    s.schedule(20 * min);
    assert_eq!(s.estimate_ms(&named(1, "train")), 15 * min);
    // Two "eval" runs of 2 min: same name first; another user gets the default.
    let e = s.submit(named(1, "eval"), 20 * min).unwrap();
    s.schedule(20 * min);
    s.finish(e, JobState::Completed);
    s.schedule(22 * min);
    s.learn_run(&named(1, "eval"), 2 * min);
    assert_eq!(s.estimate_ms(&named(1, "eval")), 2 * min);
    assert_eq!(s.estimate_ms(&named(2, "train")), day);
    // A new name falls back to the user's runs of any name, but 10, 20, 2, 2 min vary too
    // much to predict anything: the default.
    assert_eq!(s.estimate_ms(&named(1, "other")), day);
    s.learn_run(&named(3, "a"), 60 * min);
    s.learn_run(&named(3, "b"), 50 * min);
    assert_eq!(
        s.estimate_ms(&named(3, "c")),
        55 * min,
        "runs that agree do"
    );
    // A limit wins over history; cancelled and failed runs teach nothing.
    assert_eq!(s.estimate_ms(&timed(1, 1, None, 3600)), 3_600_000);
    let c = s.submit(named(1, "eval"), 22 * min).unwrap();
    let f = s.submit(named(1, "eval"), 22 * min).unwrap();
    s.schedule(22 * min);
    let _ = s.cancel(c, ROOT);
    s.finish(c, JobState::Cancelled);
    s.finish(f, JobState::Failed);
    s.schedule(500 * min);
    assert_eq!(s.estimate_ms(&named(1, "eval")), 2 * min);
    // A pending job keeps the estimate it entered with; new jobs see what was learned since.
    let blocker = s.submit(req(4, 2, None), 500 * min).unwrap();
    s.schedule(500 * min);
    let p = s.submit(named(1, "eval"), 500 * min).unwrap();
    s.learn_run(&named(1, "eval"), 4 * min);
    assert_eq!(s.job(p).unwrap().estimate_ms(), 2 * min);
    assert_eq!(s.estimate_ms(&named(1, "eval")), (2 + 2 + 4) * min / 3);
    let _ = blocker;
    // Off: the flat default.
    let mut off = Scheduler::new(
        gpus(&[80_000]),
        Config {
            learn_estimates: false,
            ..Config::default()
        },
        1,
    );
    off.learn_run(&named(1, "train"), 5 * min);
    off.learn_run(&named(1, "train"), 5 * min);
    assert_eq!(off.estimate_ms(&named(1, "train")), day);
}

#[test]
fn the_estimators_memory_is_bounded() {
    let mut e = estimate::Estimator::default();
    for uid in 0..(estimate::USERS_KEPT as u32 + 10) {
        e.learn(uid, "a", 1, None);
        e.learn(uid, "a", 1, None);
    }
    assert_eq!(e.sizes().0, estimate::USERS_KEPT);
    let (typical_runs, typical_users) = e.typical_sizes();
    assert_eq!(typical_runs, estimate::RUNS_ALL_KEPT);
    assert!(typical_users <= estimate::RUNS_ALL_KEPT, "{typical_users}");
    // The least recently fed user went first.
    assert_eq!(e.estimate(0, "a"), None);
    assert_eq!(e.estimate(estimate::USERS_KEPT as u32 + 9, "a"), Some(1));
    let mut e = estimate::Estimator::default();
    for k in 0..1000u64 {
        e.learn(7, &format!("name{k}"), 1000, None);
        e.learn(7, &format!("name{k}"), 1000 + k, None);
        e.learn(7, "hot", 5, None);
    }
    let (users, names, runs) = e.sizes();
    assert_eq!(users, 1);
    assert_eq!(
        e.typical_sizes(),
        (estimate::RUNS_KEPT, 1),
        "one user's share of the typical"
    );
    assert!(names <= estimate::NAMES_PER_USER, "{names}");
    assert!(runs <= (estimate::NAMES_PER_USER + 1) * estimate::RUNS_KEPT);
    // A name fed recently is kept; its ring holds the last runs only.
    assert_eq!(e.estimate(7, "hot"), Some(5));
    assert_eq!(e.estimate(7, "name999"), Some(1500));
    assert_eq!(
        e.estimate(7, "name0"),
        e.estimate(7, ""),
        "evicted: the user's runs"
    );
    // Long names are cut to a bounded key (at a character boundary).
    e.learn(8, &"é".repeat(1000), 42, None);
    e.learn(8, &"é".repeat(999), 42, None);
    assert_eq!(e.estimate(8, &"é".repeat(500)), Some(42));
}

#[test]
fn a_learned_estimate_lets_a_job_without_a_limit_backfill() {
    let min = 60_000;
    let run = |learn: bool| {
        let mut s = Scheduler::new(
            gpus(&[80_000; 2]),
            Config {
                learn_estimates: learn,
                ..easy()
            },
            1,
        );
        // User 1's "quick" jobs take 5 min.
        s.learn_run(&named(1, "quick"), 5 * min);
        s.learn_run(&named(1, "quick"), 5 * min);
        let long = s.submit(timed(2, 1, None, 3600), 0).unwrap();
        s.schedule(0);
        let wide = s.submit(req(3, 2, None), 1_000).unwrap();
        s.schedule(1_000);
        assert_eq!(s.reserved_job(), Some(wide));
        let quick = s.submit(named(1, "quick"), 2_000).unwrap();
        let started = started_ids(&s.schedule(2_000));
        let _ = long;
        started.contains(&quick)
    };
    assert!(
        run(true),
        "5 min ends before the reservation (1 h): it backfills"
    );
    assert!(!run(false), "24 h would delay the reservation");
}

#[test]
fn shorter_jobs_go_first_but_not_forever() {
    let hour = 3_600_000;
    let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
    let busy = s.submit(timed(9, 1, None, 100 * 3600), 0).unwrap();
    s.schedule(0);
    let long = s.submit(timed(1, 1, None, 10 * 3600), 1_000).unwrap();
    let short = s.submit(timed(1, 1, None, 3600), 2_000).unwrap();
    // A short job submitted long after the long one: the long one has waited more than
    // size_weight_h per doubling of the difference (10 h is log2(601/61) doublings of 1 h,
    // counted from a minute), so it goes first.
    let lead_h = easy().fair.size_weight_h * (601.0f64 / 61.0).log2();
    let late = (lead_h + 1.0).ceil() as u64 * hour;
    let late_short = s.submit(timed(1, 1, None, 3600), late).unwrap();
    s.schedule(late);
    let order = pending_order(&s);
    assert_eq!(order, vec![short, long, late_short]);
    // The estimate orders, but never ends a job: a job without a limit runs past it.
    let _ = busy;
}

/// Run times span minutes to weeks, so the shortest-first term counts doublings: a job of
/// minutes passes one of hours even behind days of backlog, and a week-long job is not held
/// back for months behind jobs of a day (a linear term, 8 s per second, did the opposite of
/// both: the 2 h job went first, the 1-day job submitted 500 h later too).
#[test]
fn run_times_are_compared_in_doublings() {
    let hour = 3_600_000;
    let order = |first: u64, later: u64, later_at: u64| {
        let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
        s.submit(timed(9, 1, None, 10_000 * 3600), 0).unwrap();
        s.schedule(0);
        let a = s.submit(timed(1, 1, None, first), 1_000).unwrap();
        let b = s.submit(timed(1, 1, None, later), later_at).unwrap();
        s.schedule(later_at);
        let pending = pending_order(&s);
        (pending, a, b)
    };
    let (pending, two_hours, five_min) = order(2 * 3600, 300, 100 * hour);
    assert_eq!(pending, vec![five_min, two_hours]);
    let (pending, week, day) = order(168 * 3600, 24 * 3600, 500 * hour);
    assert_eq!(pending, vec![week, day]);
    // A user who wants their long job before their own short ones nices the short ones
    // (60 s per point: 60000 is 1000 h, more than the 607 h between 5 minutes and 2 hours).
    let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
    s.submit(timed(9, 1, None, 10_000 * 3600), 0).unwrap();
    s.schedule(0);
    let long = s.submit(timed(1, 1, None, 2 * 3600), 1_000).unwrap();
    let niced = s
        .submit(
            JobRequest {
                nice: 60_000,
                ..timed(1, 1, None, 300)
            },
            2_000,
        )
        .unwrap();
    s.schedule(2_000);
    let pending = pending_order(&s);
    assert_eq!(pending, vec![long, niced]);
}

/// A job nothing is known of (no limit, no agreeing history) is ordered as the typical recent
/// run, the median of all users' last runs, not as the 24 h default: most such jobs are not
/// long. Reservations still plan with the default (the job may run that long).
#[test]
fn a_job_nothing_is_known_of_is_ordered_as_the_typical_run() {
    let min = 60_000;
    let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
    s.submit(timed(9, 1, None, 10_000 * 3600), 0).unwrap();
    s.schedule(0);
    // Too few runs to say what is typical: the default.
    for uid in 0..15 {
        s.learn_run(&named(100 + uid, "x"), 10 * min);
    }
    let early = s.submit(named(2, "new"), 0).unwrap();
    assert_eq!(s.job(early).unwrap().order_ms, 24 * 60 * min);
    s.learn_run(&named(120, "x"), 10 * min);
    s.learn_run(&named(121, "x"), 500 * 60 * min);
    s.learn_run(&named(122, "x"), 9 * min);
    let hours = s.submit(timed(1, 1, None, 2 * 3600), 1_000).unwrap();
    let unknown = s.submit(named(3, "new"), 2_000).unwrap();
    s.schedule(2_000);
    let job = s.job(unknown).unwrap();
    assert_eq!(job.estimate_source, EstimateSource::Default);
    assert_eq!(
        job.order_ms,
        10 * min,
        "the median, not the mean of a 500 h outlier"
    );
    assert_eq!(
        job.estimate_ms,
        24 * 60 * min,
        "reservations keep the default"
    );
    let pending: Vec<JobId> = s
        .jobs_in_order()
        .filter(|j| j.state == JobState::Pending && j.id != early)
        .map(|j| j.id)
        .collect();
    assert_eq!(pending, vec![unknown, hours]);
}

/// A new server's first jobs without a limit are ordered as the default (24 h) until 16 runs
/// have ended; then they are ordered as the typical run, as those submitted later are, and are
/// not left 7 doublings behind their own user's later jobs.
#[test]
fn the_first_unknown_jobs_are_reordered_once_the_typical_run_is_known() {
    let min = 60_000;
    let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
    s.submit(timed(9, 1, None, 10_000 * 3600), 0).unwrap();
    s.schedule(0);
    let early = s.submit(named(2, "sweep"), 1_000).unwrap();
    s.schedule(1_000);
    assert_eq!(s.job(early).unwrap().order_ms, 24 * 60 * min);
    for uid in 0..16 {
        s.learn_run(&named(100 + uid, "x"), 10 * min);
    }
    let later = s.submit(named(2, "sweep"), 2_000).unwrap();
    s.schedule(2_000);
    assert_eq!(s.job(later).unwrap().order_ms, 10 * min);
    assert_eq!(s.job(early).unwrap().order_ms, 10 * min);
    assert_eq!(
        s.job(early).unwrap().estimate_ms,
        24 * 60 * min,
        "reservations keep the default"
    );
    assert_eq!(pending_order(&s), vec![early, later]);
}

/// The typical run is not a lever: one user's burst of throwaway jobs keeps at most 16 of the
/// 256 runs it is the median of, so it cannot make every other unknown job look short.
#[test]
fn one_users_burst_cannot_push_the_typical_run_down() {
    let min = 60_000;
    let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
    for uid in 0..16 {
        s.learn_run(&named(100 + uid, "x"), 10 * min);
    }
    for _ in 0..200 {
        s.learn_run(&named(7, "true"), 1);
    }
    s.submit(timed(9, 1, None, 10_000 * 3600), 0).unwrap();
    s.schedule(0);
    let newcomer = s.submit(named(3, "new"), 1_000).unwrap();
    s.schedule(1_000);
    let job = s.job(newcomer).unwrap();
    assert_eq!(job.estimate_source, EstimateSource::Default);
    assert_eq!(job.order_ms, 10 * min, "not pushed down by user 7's burst");
}

/// A running job restored after a restart shows what the order counts for it, as before.
#[test]
fn a_restored_running_job_keeps_its_order_estimate() {
    let mut s = Scheduler::new(gpus(&[80_000]), easy(), 1);
    s.restore_running(5, timed(1, 1, None, 3600), vec![0], 0, 0, 0)
        .unwrap();
    assert_eq!(s.job_order_estimate(5), Some(3_600_000));
}

#[test]
fn a_learned_estimate_never_ends_a_job() {
    let min = 60_000;
    let mut s = Scheduler::new(gpus(&[80_000]), Config::default(), 1);
    s.learn_run(&named(1, "quick"), min);
    s.learn_run(&named(1, "quick"), min);
    assert_eq!(s.estimate_ms(&named(1, "quick")), min);
    let j = s.submit(named(1, "quick"), 0).unwrap();
    s.schedule(0);
    let _waiting = s.submit(named(2, "other"), 0).unwrap();
    s.schedule(0);
    assert!(s.time_actions(600 * min).is_empty());
    assert_eq!(s.job(j).unwrap().state, JobState::Running);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// The per-user count of jobs waiting for their `--begin` time (O(1), kept as jobs are
    /// deferred, begin, are cancelled, held, updated or finish) always equals a count of the
    /// deferred jobs themselves; and a deferred job never starts before its time.
    #[test]
    fn deferred_counts_per_user_match_the_deferred_jobs(
        ops in prop::collection::vec((0u8..6, 1u32..4, 0u64..40), 1..120),
    ) {
        let mut s = Scheduler::new(gpus(&[24_000, 24_000]), easy(), 1);
        let mut ids: Vec<JobId> = Vec::new();
        let mut now: Millis = 0;
        let mut begins: std::collections::HashMap<JobId, Millis> = Default::default();
        for (op, uid, x) in ops {
            let pick = |ids: &[JobId]| (!ids.is_empty()).then(|| ids[x as usize % ids.len()]);
            match op {
                0 | 1 => {
                    if let Ok(id) = s.submit(req(uid, 1 + (x % 2) as u32, None), now) {
                        ids.push(id);
                        if op == 0 {
                            s.defer_until(id, now + x * 100);
                            begins.insert(id, now + x * 100);
                        }
                    }
                }
                2 => {
                    if let Some(id) = pick(&ids) {
                        s.cancel(id, ROOT);
                    }
                }
                3 => {
                    if let Some(id) = pick(&ids) {
                        if s.job(id).is_some_and(|j| j.state == JobState::Running) {
                            s.finish(id, JobState::Completed).unwrap();
                        }
                    }
                }
                4 => {
                    if let Some(id) = pick(&ids) {
                        let _ = s.update(id, ROOT, JobUpdate { nice: Some(x as i32), ..Default::default() });
                    }
                }
                _ => {
                    now += x * 50;
                    for a in s.schedule(now) {
                        let at = begins.get(&a.job).copied().unwrap_or(0);
                        prop_assert!(at <= now, "job {} started before its time", a.job);
                    }
                }
            }
            for u in 1..4 {
                let brute = s.deferred_at.keys().filter(|id| s.jobs[*id].request.uid == u).count();
                prop_assert_eq!(s.deferred_count(Some(u)), brute, "user {}", u);
            }
            prop_assert_eq!(s.deferred_count(None), s.deferred_at.len());
            prop_assert_eq!(s.deferred_by_user.values().sum::<usize>(), s.deferred_at.len());
            prop_assert!(s.deferred_by_user.values().all(|&n| n > 0));
        }
    }
}

/// A generous time limit does not push a job back in the shortest-first order: a limit counts
/// as the share of their limits the user's recent jobs used; backfilling keeps the limit.
#[test]
fn generous_limits_are_ordered_by_what_their_users_jobs_use() {
    let h = 3_600_000;
    let mut s = Scheduler::new(gpus(&[80_000]), Config::default(), 1);
    // User 1's limits are five times what the jobs take; user 2's are exact.
    for _ in 0..2 {
        s.learn_run(&timed(1, 1, None, 10 * 3600), 2 * h);
        s.learn_run(&timed(2, 1, None, 3 * 3600), 3 * h);
    }
    let blocker = s.submit(req(3, 1, None), 0).unwrap();
    assert_eq!(started_ids(&s.schedule(0)), vec![blocker]);
    let exact = s.submit(timed(2, 1, None, 3 * 3600), 0).unwrap();
    let generous = s.submit(timed(1, 1, None, 10 * 3600), 0).unwrap();
    assert_eq!(
        s.job(generous).unwrap().estimate_ms(),
        10 * h,
        "backfill: the limit"
    );
    s.finish(blocker, JobState::Completed);
    assert_eq!(
        started_ids(&s.schedule(1000)),
        vec![generous],
        "likely 2 h goes before likely 3 h"
    );
    s.finish(generous, JobState::Completed);
    assert_eq!(started_ids(&s.schedule(2000)), vec![exact]);

    // Without history of their own, a user's limits count as all users' recent ones do; each
    // run weighs its run time.
    let mut e = estimate::Estimator::default();
    assert_eq!(e.limit_use(9), None, "nothing known: the limit as it is");
    e.learn(1, "a", h, Some(4 * h));
    e.learn(2, "b", 3 * h, Some(4 * h));
    assert_eq!(e.limit_use(9), Some(0.625));
    assert_eq!(
        e.limit_use(1),
        Some(0.625),
        "one run of its own is not enough"
    );
    e.learn(1, "a", h, Some(2 * h));
    assert_eq!(e.limit_use(1), Some(0.375));
    // Throwaway runs under huge limits do not buy a user's next jobs a place in front: seconds
    // of run time are not enough to go by (all users' share counts), and weigh next to nothing.
    e.learn(5, "c", 1000, Some(30 * 24 * h));
    e.learn(5, "c", 1000, Some(30 * 24 * h));
    assert_eq!(e.limit_use(5), e.limit_use(9));
    assert!(e.limit_use(9).unwrap() > 0.59, "{:?}", e.limit_use(9));
    // However little of their limits a user's jobs use, a limit counts at least a tenth.
    e.learn(6, "d", h, Some(100 * h));
    e.learn(6, "d", h, Some(100 * h));
    assert_eq!(e.limit_use(6), Some(estimate::MIN_LIMIT_USE));
    // A run past its limit (a grace period) counts as the whole limit.
    e.learn(7, "e", 2 * h, Some(h));
    e.learn(7, "e", 2 * h, Some(4 * h));
    assert_eq!(e.limit_use(7), Some(0.75));
}

/// One user's flood: the other users' blocked jobs get the reservation at once, not after
/// being starved, so a wide job is not left waiting while each freed GPU goes to the flood.
#[test]
fn a_flood_does_not_take_each_freed_gpu_from_a_wide_job() {
    let run = |flood_factor: f64| {
        let mut config = Config::default();
        config.fair.flood_factor = flood_factor;
        let mut s = Scheduler::new(gpus(&[80_000; 2]), config, 1);
        let flood: Vec<JobId> = (0..30)
            .map(|_| s.submit(req(1, 1, None), 0).unwrap())
            .collect();
        assert_eq!(s.schedule(0).len(), 2);
        let wide = s.submit(req(2, 2, None), 1000).unwrap();
        assert!(s.schedule(1000).is_empty());
        s.finish(flood[0], JobState::Completed);
        let first = started_ids(&s.schedule(2000));
        s.finish(flood[1], JobState::Completed);
        (first, started_ids(&s.schedule(3000)), wide)
    };
    let (first, second, wide) = run(Config::default().fair.flood_factor);
    assert!(
        first.is_empty(),
        "the freed GPU is held for the wide job: {first:?}"
    );
    assert_eq!(second, vec![wide]);
    let (first, _, wide) = run(0.0);
    assert_eq!(first.len(), 1, "off: the flood takes the freed GPU");
    assert_ne!(first[0], wide);
}
