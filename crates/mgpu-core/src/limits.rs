//! Per-user limits on running jobs (Slurm's QOS `MaxTRESPerUser`, `MaxJobsPerUser`).
//!
//! The shell resolves each user's limits (from the config file's defaults, group and user
//! entries) and hands them to the core per uid ([`crate::Scheduler::set_user_limits`]); the
//! core keeps what each user runs and never starts a job that would take its user past a
//! limit. Such a job is skipped, not a block: jobs of other users (and smaller jobs of the
//! same user) may pass it. Its REASON names the limit.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::placement::GpuState;
use crate::JobRequest;

/// Limits on what one user runs at once (`None`: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimits {
    /// GPUs held by the user's running jobs.
    pub max_gpus: Option<u32>,
    /// GPU memory reserved by the user's running jobs, in MiB (a job with `--mem` reserves it
    /// on each of its GPUs; a job without takes whole GPUs: their whole memory).
    pub max_gpu_mem_mib: Option<u64>,
    /// Running jobs.
    pub max_jobs: Option<u32>,
}

impl UserLimits {
    pub fn is_unlimited(&self) -> bool {
        *self == UserLimits::default()
    }
}

/// What one user's running jobs hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserRunning {
    pub jobs: u32,
    pub gpus: u32,
    pub gpu_mem_mib: u64,
}

/// The limit that holds a job back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Jobs,
    Gpus,
    GpuMem,
}

impl LimitHit {
    /// The REASON shown for a job it holds (Slurm's names, with GPU for TRES).
    pub fn reason(self) -> &'static str {
        match self {
            LimitHit::Jobs => "QOSMaxJobsPerUser",
            LimitHit::Gpus => "QOSMaxGpuPerUser",
            LimitHit::GpuMem => "QOSMaxGpuMemPerUser",
        }
    }
}

/// GPU memory a job reserves on `held` GPUs: `--mem` on each, or the whole of each GPU.
pub fn mem_charge(gpus: &[GpuState], held: &[u32], request: &JobRequest) -> u64 {
    match request.mem_mib {
        Some(mem) => mem * held.len() as u64,
        None => held
            .iter()
            .filter_map(|idx| gpus.iter().find(|g| g.spec.index == *idx))
            .map(|g| g.spec.total_mib)
            .sum(),
    }
}

/// The least GPU memory a job can reserve wherever it is placed (before it is placed).
pub fn min_mem_charge(gpus: &[GpuState], request: &JobRequest) -> u64 {
    match request.mem_mib {
        Some(mem) => mem * u64::from(request.gpus),
        None => {
            let mut totals: Vec<u64> = gpus.iter().map(|g| g.spec.total_mib).collect();
            totals.sort_unstable();
            totals.iter().take(request.gpus as usize).sum()
        }
    }
}

/// Would starting a job with `request`, reserving `mem_mib`, take a user holding `running`
/// past `limits`? Which limit, if so (jobs, then GPUs, then memory).
pub fn check(
    limits: &UserLimits,
    running: &UserRunning,
    request: &JobRequest,
    mem_mib: u64,
) -> Option<LimitHit> {
    if limits.max_jobs.is_some_and(|m| running.jobs + 1 > m) {
        return Some(LimitHit::Jobs);
    }
    if limits
        .max_gpus
        .is_some_and(|m| running.gpus.saturating_add(request.gpus) > m)
    {
        return Some(LimitHit::Gpus);
    }
    if limits
        .max_gpu_mem_mib
        .is_some_and(|m| running.gpu_mem_mib.saturating_add(mem_mib) > m)
    {
        return Some(LimitHit::GpuMem);
    }
    None
}

/// The per-user running totals, kept as jobs start and stop.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunningTotals(HashMap<u32, UserRunning>);

impl RunningTotals {
    pub(crate) fn of(&self, uid: u32) -> UserRunning {
        self.0.get(&uid).copied().unwrap_or_default()
    }

    pub(crate) fn add(&mut self, uid: u32, gpus: u32, mem_mib: u64) {
        let r = self.0.entry(uid).or_default();
        r.jobs += 1;
        r.gpus += gpus;
        r.gpu_mem_mib += mem_mib;
    }

    pub(crate) fn remove(&mut self, uid: u32, gpus: u32, mem_mib: u64) {
        if let Some(r) = self.0.get_mut(&uid) {
            r.jobs = r.jobs.saturating_sub(1);
            r.gpus = r.gpus.saturating_sub(gpus);
            r.gpu_mem_mib = r.gpu_mem_mib.saturating_sub(mem_mib);
            if r.jobs == 0 {
                self.0.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, GpuSpec, JobId, JobState, Millis, Policy, Scheduler};
    use proptest::prelude::*;

    fn machine(mems: &[u64], policy: Policy) -> Scheduler {
        let gpus = mems
            .iter()
            .enumerate()
            .map(|(i, &m)| GpuSpec {
                index: i as u32,
                name: format!("sim{i}"),
                total_mib: m,
            })
            .collect();
        let config = Config {
            policy,
            reserve_after_s: 0,
            reserve_after_wait_factor: 0.0,
            ..Config::default()
        };
        Scheduler::new(gpus, config, 1)
    }

    fn req(uid: u32, gpus: u32, mem_mib: Option<u64>) -> JobRequest {
        JobRequest {
            uid,
            user: format!("u{uid}"),
            name: "job".into(),
            gpus,
            mem_mib,
            ..JobRequest::default()
        }
    }

    fn started(s: &mut Scheduler, now: Millis) -> Vec<JobId> {
        s.schedule(now).into_iter().map(|a| a.job).collect()
    }

    /// A job over its user's GPU limit is skipped with the limit as its REASON; another
    /// user's job behind it starts; a looser limit lets it start at the next pass.
    #[test]
    fn a_job_over_its_users_gpu_limit_waits_and_others_pass_it() {
        for policy in [Policy::Fifo, Policy::Backfill, Policy::Fair] {
            let mut s = machine(&[24_000; 4], policy);
            let limits = UserLimits {
                max_gpus: Some(2),
                ..UserLimits::default()
            };
            s.set_user_limits(1, limits);
            let a = s.submit(req(1, 2, None), 0).unwrap();
            let b = s.submit(req(1, 1, None), 0).unwrap();
            let c = s.submit(req(2, 1, None), 0).unwrap();
            assert_eq!(started(&mut s, 0), vec![a, c], "{policy}");
            assert_eq!(s.pending_reason(b), Some("QOSMaxGpuPerUser"));
            let detail = s.wait_detail(b).unwrap();
            assert!(detail.starts_with("QOSMaxGpuPerUser: "), "{detail}");
            assert!(detail.contains("hold 2 of the 2"), "{detail}");
            // Nothing changes by itself.
            assert!(started(&mut s, 10).is_empty());
            s.set_user_limits(
                1,
                UserLimits {
                    max_gpus: Some(3),
                    ..limits
                },
            );
            assert_eq!(started(&mut s, 20), vec![b]);
            assert_eq!(s.user_running(1).gpus, 3);
        }
    }

    /// The jobs limit and the memory limit (a whole GPU counts its whole memory) name their
    /// own reasons; a job ending frees its user's room.
    #[test]
    fn jobs_and_memory_limits_name_their_reasons() {
        let mut s = machine(&[24_000; 4], Policy::Backfill);
        s.set_user_limits(
            1,
            UserLimits {
                max_jobs: Some(1),
                ..UserLimits::default()
            },
        );
        s.set_user_limits(
            2,
            UserLimits {
                max_gpu_mem_mib: Some(30_000),
                ..UserLimits::default()
            },
        );
        let a = s.submit(req(1, 1, Some(1_000)), 0).unwrap();
        let b = s.submit(req(1, 1, Some(1_000)), 0).unwrap();
        let c = s.submit(req(2, 1, Some(20_000)), 0).unwrap();
        let d = s.submit(req(2, 1, None), 0).unwrap();
        let e = s.submit(req(2, 1, Some(10_000)), 0).unwrap();
        assert_eq!(started(&mut s, 0), vec![a, c, e]);
        assert_eq!(s.pending_reason(b), Some("QOSMaxJobsPerUser"));
        assert_eq!(s.pending_reason(d), Some("QOSMaxGpuMemPerUser"));
        assert_eq!(s.user_running(2).gpu_mem_mib, 30_000);
        s.finish(a, JobState::Completed);
        assert_eq!(started(&mut s, 1), vec![b]);
        s.finish(c, JobState::Completed);
        s.finish(e, JobState::Completed);
        // 24 000 MiB of a whole GPU fits in 30 000.
        assert_eq!(started(&mut s, 2), vec![d]);
        assert_eq!(s.user_running(2).gpu_mem_mib, 24_000);
    }

    /// A limited user's job never holds the reservation: GPUs are not kept idle for a job
    /// that may not start anyway.
    #[test]
    fn a_limited_job_holds_no_reservation() {
        let mut s = machine(&[24_000; 2], Policy::Backfill);
        s.set_user_limits(
            1,
            UserLimits {
                max_gpus: Some(1),
                ..UserLimits::default()
            },
        );
        let a = s.submit(req(1, 1, None), 0).unwrap();
        let b = s.submit(req(1, 2, None), 0).unwrap();
        let c = s.submit(req(2, 1, None), 1).unwrap();
        assert_eq!(started(&mut s, 5), vec![a, c]);
        assert_ne!(s.reserved_job(), Some(b));
        assert_eq!(s.pending_reason(b), Some("QOSMaxGpuPerUser"));
    }

    /// A reload (new config) keeps running jobs and re-indexes the waiting ones: a limit
    /// carried in it applies at the next pass.
    #[test]
    fn reconfigure_applies_at_the_next_pass() {
        let mut s = machine(&[24_000; 2], Policy::Fair);
        let a = s.submit(req(1, 1, None), 0).unwrap();
        let b = s.submit(req(1, 1, None), 0).unwrap();
        let mut config = s.config().clone();
        config.user_limits.insert(
            1,
            UserLimits {
                max_jobs: Some(1),
                ..UserLimits::default()
            },
        );
        config.default_estimate_s = 60;
        s.reconfigure(config);
        assert_eq!(started(&mut s, 0), vec![a]);
        assert_eq!(s.pending_reason(b), Some("QOSMaxJobsPerUser"));
        let mut config = s.config().clone();
        config.user_limits.clear();
        s.reconfigure(config);
        assert_eq!(started(&mut s, 1), vec![b]);
        assert!(
            s.cancel(
                b,
                crate::Requester {
                    uid: 0,
                    is_admin: true
                }
            ) != crate::CancelOutcome::NotFound
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u32, u32, Option<u64>),
        Finish(usize),
        Requeue(usize),
        Limit(u32, UserLimits),
    }

    fn arb_limits() -> impl Strategy<Value = UserLimits> {
        (
            prop::option::of(0u32..5),
            prop::option::of(0u64..60_000),
            prop::option::of(0u32..4),
        )
            .prop_map(|(max_gpus, max_gpu_mem_mib, max_jobs)| UserLimits {
                max_gpus,
                max_gpu_mem_mib,
                max_jobs,
            })
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (1u32..4, 1u32..3, prop_oneof![Just(None), (1u64..20_000).prop_map(Some)])
                .prop_map(|(u, n, m)| Op::Submit(u, n, m)),
            3 => any::<usize>().prop_map(Op::Finish),
            1 => any::<usize>().prop_map(Op::Requeue),
            1 => (1u32..4, arb_limits()).prop_map(|(u, l)| Op::Limit(u, l)),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        prop_oneof![
            Just(Policy::Fifo),
            Just(Policy::Backfill),
            Just(Policy::Fair)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever happens, a job only starts if its user stays within their limits (as they
        /// are when it starts: a lowered limit does not stop running jobs), the running totals
        /// are what the running jobs hold, and a job whose user has room and that fits is
        /// never passed over by the first-fit policy.
        #[test]
        fn no_user_ever_exceeds_their_running_limits(
            policy in policy(),
            mems in prop::collection::vec(8_000u64..30_000, 1..5),
            initial in prop::collection::vec(arb_limits(), 3),
            ops in prop::collection::vec(arb_op(), 1..100),
        ) {
            let mut s = machine(&mems, policy);
            for (i, l) in initial.iter().enumerate() {
                s.set_user_limits(i as u32 + 1, *l);
            }
            for (t, op) in ops.into_iter().enumerate() {
                let now = t as Millis * 1000;
                let running: Vec<JobId> = s.jobs_in_order()
                    .filter(|j| j.state == JobState::Running).map(|j| j.id).collect();
                match op {
                    Op::Submit(u, n, m) => { let _ = s.submit(req(u, n, m), now); }
                    Op::Finish(k) if !running.is_empty() => {
                        s.finish(running[k % running.len()], JobState::Completed);
                    }
                    Op::Requeue(k) if !running.is_empty() => {
                        s.requeue(running[k % running.len()], now);
                    }
                    Op::Limit(u, l) => s.set_user_limits(u, l),
                    _ => {}
                }
                let starts = s.schedule(now);
                let mut totals: HashMap<u32, UserRunning> = HashMap::new();
                for j in s.jobs_in_order().filter(|j| j.state == JobState::Running) {
                    let t = totals.entry(j.request.uid).or_default();
                    t.jobs += 1;
                    t.gpus += j.request.gpus;
                    t.gpu_mem_mib += mem_charge(s.gpus(), &j.gpus, &j.request);
                }
                for uid in 1..4 {
                    let t = totals.get(&uid).copied().unwrap_or_default();
                    prop_assert_eq!(s.user_running(uid), t);
                    let user_started = starts.iter()
                        .any(|a| s.job(a.job).unwrap().request.uid == uid);
                    if user_started {
                        let l = s.user_limits_of(uid);
                        prop_assert!(l.max_jobs.is_none_or(|m| t.jobs <= m), "{:?} {:?}", t, l);
                        prop_assert!(l.max_gpus.is_none_or(|m| t.gpus <= m), "{:?} {:?}", t, l);
                        prop_assert!(l.max_gpu_mem_mib.is_none_or(|m| t.gpu_mem_mib <= m), "{:?} {:?}", t, l);
                    }
                }
                if policy == Policy::Fifo {
                    // Nothing left waiting both fits now and has room under its user's limits.
                    let waiting: Vec<JobId> = s.jobs_in_order()
                        .filter(|j| j.state == JobState::Pending).map(|j| j.id).collect();
                    for id in waiting {
                        let job = s.job(id).unwrap();
                        if let Some(chosen) = crate::placement::choose(s.gpus(), &job.request) {
                            prop_assert!(s.limit_hit(job, Some(&chosen)).is_some(),
                                "job {} fits and has room but waits", id);
                        }
                    }
                }
            }
        }
    }
}
