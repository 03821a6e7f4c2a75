//! What a replay measured: waits, completion times, slowdowns, utilisation and fairness.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{End, Outcome};
use crate::workload::SimJob;

/// Below this run time a job's slowdown is computed as if it ran this long (bounded slowdown).
pub const SLOWDOWN_BOUND_S: f64 = 10.0;

/// One policy's results on one workload. Times in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub policy: String,
    /// Jobs measured: every job the server accepted (refused ones are only counted).
    pub jobs: usize,
    /// Jobs the server would refuse (wider than it, more memory than its GPUs have).
    pub refused: usize,
    /// Jobs stopped for good at their time limit (out of restarts, or `--no-requeue`).
    pub timed_out: usize,
    /// Context switches, in all (each restarts a job from its command).
    pub restarts: u64,
    /// GPU-hours of runs lost to context switches.
    pub lost_gpu_h: f64,
    pub p50_wait_s: f64,
    pub p99_wait_s: f64,
    pub mean_jct_s: f64,
    pub p50_jct_s: f64,
    pub p95_jct_s: f64,
    pub p99_jct_s: f64,
    pub mean_wait_s: f64,
    pub max_wait_s: f64,
    /// Mean of max(1, (wait + run) / max(run, 10 s)).
    pub mean_bounded_slowdown: f64,
    pub makespan_s: f64,
    /// GPU-seconds used (memory jobs: their share of each GPU) over GPU-seconds of the makespan.
    pub gpu_utilisation: f64,
    /// Jain's index of the users' mean bounded slowdowns (1: all users equally slowed).
    pub jain_fairness: f64,
    /// Service against fair share (`minFS`): per user, the GPU-time received over the GPU-time
    /// its max-min fair share would have given it while it contended (had jobs pending or
    /// running); the lowest user's ratio (1: nobody got less than their fair share; 1e9 when
    /// no user contended)...
    pub min_fair_share_ratio: f64,
    /// ... Jain's index of these ratios...
    pub fair_share_jain: f64,
    /// ... and each user's ratio.
    pub fair_share_by_user: BTreeMap<String, f64>,
    /// Longest wait of a job asking for more than one GPU.
    pub max_multi_gpu_wait_s: f64,
    /// Flood scenario: mean wait of the users other than `flood`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub others_mean_wait_s: Option<f64>,
    /// Wall-clock seconds the replay took.
    pub replay_wall_s: f64,
}

pub fn measure(
    policy: &str,
    jobs: &[SimJob],
    outcomes: &[Outcome],
    total_gpus: u32,
    replay_wall_s: f64,
) -> Metrics {
    let measured: Vec<(&SimJob, &Outcome)> = jobs
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| o.end != End::Refused)
        .collect();
    let n = measured.len().max(1) as f64;
    let secs = |ms: u64| ms as f64 / 1000.0;
    let mut jct: Vec<f64> = Vec::with_capacity(jobs.len());
    let mut waits = Vec::with_capacity(jobs.len());
    let mut slowdown_by_user: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    let mut used_gpu_s = 0.0;
    let mut max_multi_gpu_wait_s: f64 = 0.0;
    let mut others = (0.0, 0usize);
    let mut total_slowdown = 0.0;
    let (mut timed_out, mut restarts, mut lost_ms) = (0, 0u64, 0.0);
    for &(job, o) in &measured {
        // The wait is until its last run started: runs lost to switches count as waiting.
        let wait = secs(o.start_ms - job.submit_ms);
        let run = secs(o.end_ms - o.start_ms);
        let slowdown = ((wait + run) / run.max(SLOWDOWN_BOUND_S)).max(1.0);
        jct.push(wait + run);
        waits.push(wait);
        total_slowdown += slowdown;
        let per_user = slowdown_by_user.entry(&job.user).or_default();
        per_user.0 += slowdown;
        per_user.1 += 1;
        used_gpu_s += o.share * run + o.lost_share_ms / 1000.0;
        if job.gpus > 1 {
            max_multi_gpu_wait_s = max_multi_gpu_wait_s.max(wait);
        }
        if job.user != "flood" {
            others.0 += wait;
            others.1 += 1;
        }
        timed_out += usize::from(o.end == End::Timeout);
        restarts += u64::from(o.restarts);
        lost_ms += o.lost_share_ms;
    }
    let mut sorted_waits = waits.clone();
    sorted_waits.sort_by(f64::total_cmp);
    jct.sort_by(f64::total_cmp);
    let first_submit = measured.iter().map(|(j, _)| j.submit_ms).min().unwrap_or(0);
    let last_end = measured.iter().map(|(_, o)| o.end_ms).max().unwrap_or(0);
    let makespan_s = secs(last_end.saturating_sub(first_submit));
    let user_means: Vec<f64> = slowdown_by_user
        .values()
        .map(|(sum, count)| sum / *count as f64)
        .collect();
    let flood = jobs.iter().any(|j| j.user == "flood");
    let by_user = fair_share_ratios(&measured, total_gpus);
    let shares: Vec<f64> = by_user.values().copied().collect();
    Metrics {
        policy: policy.to_string(),
        jobs: measured.len(),
        refused: jobs.len() - measured.len(),
        timed_out,
        restarts,
        lost_gpu_h: lost_ms / 3_600_000.0,
        p50_wait_s: percentile(&sorted_waits, 0.50),
        p99_wait_s: percentile(&sorted_waits, 0.99),
        mean_jct_s: jct.iter().sum::<f64>() / n,
        p50_jct_s: percentile(&jct, 0.50),
        p95_jct_s: percentile(&jct, 0.95),
        p99_jct_s: percentile(&jct, 0.99),
        mean_wait_s: waits.iter().sum::<f64>() / n,
        max_wait_s: waits.iter().copied().fold(0.0, f64::max),
        mean_bounded_slowdown: total_slowdown / n,
        makespan_s,
        gpu_utilisation: used_gpu_s / (total_gpus as f64 * makespan_s.max(1e-9)),
        jain_fairness: jain(&user_means),
        min_fair_share_ratio: shares
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .min(1e9),
        fair_share_jain: jain(&shares),
        fair_share_by_user: by_user
            .into_iter()
            .map(|(u, r)| (u.to_string(), r))
            .collect(),
        max_multi_gpu_wait_s,
        others_mean_wait_s: flood.then(|| others.0 / others.1.max(1) as f64),
        replay_wall_s,
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Jain's fairness index: (Σx)² / (n·Σx²).
fn jain(values: &[f64]) -> f64 {
    let sum: f64 = values.iter().sum();
    let squares: f64 = values.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        1.0
    } else {
        sum * sum / (values.len() as f64 * squares)
    }
}

/// Per user: GPU-time received over max-min fair-share GPU-time while the user contended.
///
/// A user contends while it has jobs in the system (pending or running). Its demand is then
/// the GPU-equivalents its jobs take when they run (a whole GPU per GPU for exclusive jobs,
/// memory over the GPU's memory for a memory job on a shared GPU), counted from submission
/// to end, pending or not. Between two events the demands are constant, and the machine's
/// GPUs are shared among the contending users by max-min fairness (water-filling: the users
/// asking least get all they ask, the rest split what is left equally). Received is the
/// GPU-equivalents its running jobs held, runs later lost to a context switch included (the
/// GPUs were the user's; what the switch cost is reported as lost GPU-hours). Users whose
/// fair share is zero (nothing measured) are left out.
fn fair_share_ratios<'a>(
    measured: &[(&'a SimJob, &Outcome)],
    total_gpus: u32,
) -> BTreeMap<&'a str, f64> {
    let mut users: BTreeMap<&str, usize> = BTreeMap::new();
    for (job, _) in measured {
        let n = users.len();
        users.entry(&job.user).or_insert(n);
    }
    // (time, user, demand change, running change)
    let mut events: Vec<(u64, usize, f64, f64)> = Vec::with_capacity(measured.len() * 4);
    for (job, o) in measured {
        let u = users[job.user.as_str()];
        events.push((job.submit_ms, u, o.share, 0.0));
        events.push((o.end_ms, u, -o.share, 0.0));
        for &(start, stop, share) in o
            .earlier_runs
            .iter()
            .chain([(o.start_ms, o.end_ms, o.share)].iter())
        {
            events.push((start, u, 0.0, share));
            events.push((stop, u, 0.0, -share));
        }
    }
    events.sort_by_key(|e| e.0);
    let n = users.len();
    let (mut demand, mut running) = (vec![0.0f64; n], vec![0.0f64; n]);
    let (mut got, mut fair) = (vec![0.0f64; n], vec![0.0f64; n]);
    let mut order: Vec<usize> = Vec::with_capacity(n);
    let mut i = 0;
    while i < events.len() {
        let t = events[i].0;
        while i < events.len() && events[i].0 == t {
            let (_, u, d, r) = events[i];
            demand[u] += d;
            running[u] += r;
            i += 1;
        }
        let Some(&(next, ..)) = events.get(i) else {
            break;
        };
        let dt = (next - t) as f64;
        order.clear();
        order.extend((0..n).filter(|&u| demand[u] > 1e-9));
        order.sort_by(|&a, &b| demand[a].total_cmp(&demand[b]));
        let mut left = f64::from(total_gpus);
        for (k, &u) in order.iter().enumerate() {
            let share = demand[u].min(left / (order.len() - k) as f64);
            left -= share;
            fair[u] += share * dt;
            got[u] += running[u].max(0.0) * dt;
        }
    }
    users
        .into_iter()
        .filter(|&(_, u)| fair[u] > 0.0)
        .map(|(name, u)| (name, got[u] / fair[u]))
        .collect()
}

/// The goals 1-3 for one policy in one cell, against the same cell's strict FIFO and
/// first-fit FIFO.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GoalCheck {
    /// Mean wait over first-fit's (goal 1: at most 1).
    pub vs_first_fit: f64,
    /// Mean wait over strict FIFO's (goal 2, with limits: at most 0.6).
    pub vs_strict: f64,
    /// Worst multi-GPU wait over strict FIFO's (goal 3: at most 2; NaN: no multi-GPU job
    /// waited under strict FIFO, nothing to starve).
    pub multi_gpu_vs_strict: f64,
    /// Goals 1-3 all met.
    pub ok: bool,
}

/// Goals 1-3 for `m`: mean wait at most first-fit's; with limits (`with_limits`), at most 0.6
/// of strict FIFO's; worst multi-GPU wait at most 2 x strict FIFO's. A ratio whose yardstick
/// is 0 is NaN, which fails goals 1 and 2 and passes goal 3.
pub fn goals_1_to_3(
    m: &Metrics,
    strict: &Metrics,
    first_fit: &Metrics,
    with_limits: bool,
) -> GoalCheck {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let vs_first_fit = ratio(m.mean_wait_s, first_fit.mean_wait_s);
    let vs_strict = ratio(m.mean_wait_s, strict.mean_wait_s);
    let multi_gpu_vs_strict = ratio(m.max_multi_gpu_wait_s, strict.max_multi_gpu_wait_s);
    let ok = vs_first_fit <= 1.0 + 1e-9
        && (!with_limits || vs_strict <= 0.6 + 1e-9)
        && (multi_gpu_vs_strict.is_nan() || multi_gpu_vs_strict <= 2.0);
    GoalCheck {
        vs_first_fit,
        vs_strict,
        multi_gpu_vs_strict,
        ok,
    }
}

/// A policy's standing for goal 5.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contender {
    pub policy: String,
    pub meets_goals_1_to_3: bool,
    /// Its lowest user's service against fair share ([`Metrics::min_fair_share_ratio`]).
    pub min_fair_share: f64,
    /// Jain's index of its users' ratios ([`Metrics::fair_share_jain`]).
    pub fair_share_jain: f64,
}

/// Is `a` fairer than `b`? Higher lowest-user ratio first; equal (within 1e-9) ratios are
/// decided by the higher Jain index of the ratios; NaN counts as least fair.
pub fn fairer(a: &Contender, b: &Contender) -> bool {
    const EPS: f64 = 1e-9;
    let key = |x: f64| if x.is_nan() { f64::NEG_INFINITY } else { x };
    let (am, bm) = (key(a.min_fair_share), key(b.min_fair_share));
    if am > bm + EPS {
        return true;
    }
    if bm > am + EPS {
        return false;
    }
    key(a.fair_share_jain) > key(b.fair_share_jain) + EPS
}

/// Goal 5 for `policy`: `None` if it does not meet goals 1-3 itself (or is not among the
/// contenders); else whether it is the fairest of the contenders that meet goals 1-3, i.e.
/// none of them is [`fairer`] (a tie goes to `policy`).
pub fn is_fairest_meeting_goals(policy: &str, contenders: &[Contender]) -> Option<bool> {
    let me = contenders
        .iter()
        .find(|c| c.policy == policy && c.meets_goals_1_to_3)?;
    Some(
        !contenders
            .iter()
            .any(|c| c.policy != policy && c.meets_goals_1_to_3 && fairer(c, me)),
    )
}

/// The fairest of the contenders that meet goals 1-3 (the first listed among equals), if any.
pub fn fairest_meeting_goals(contenders: &[Contender]) -> Option<&Contender> {
    contenders
        .iter()
        .filter(|c| c.meets_goals_1_to_3)
        .fold(None, |best: Option<&Contender>, c| match best {
            Some(b) if !fairer(c, b) => Some(b),
            _ => Some(c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics of a policy with the given mean wait and worst multi-GPU wait (seconds).
    fn waits(policy: &str, mean_wait_s: f64, max_multi_gpu_wait_s: f64) -> Metrics {
        Metrics {
            mean_wait_s,
            max_multi_gpu_wait_s,
            ..measure(policy, &[], &[], 1, 0.0)
        }
    }

    #[test]
    fn goals_1_to_3_use_the_cells_yardsticks_for_every_policy() {
        let strict = waits("strict-fifo", 100.0, 50.0);
        let first_fit = waits("fifo-firstfit", 40.0, 120.0);
        let check = |m: &Metrics, limits| goals_1_to_3(m, &strict, &first_fit, limits);
        // First-fit: goal 1 trivially, goal 2 (0.4), but its multi-GPU wait is 2.4x strict's.
        let g = check(&first_fit, true);
        assert_eq!((g.vs_first_fit, g.vs_strict, g.ok), (1.0, 0.4, false));
        assert!((g.multi_gpu_vs_strict - 2.4).abs() < 1e-12);
        // Waits more than first-fit: goal 1 fails.
        assert!(!check(&waits("backfill", 50.0, 60.0), true).ok);
        // All three met.
        assert!(check(&waits("fair", 30.0, 100.0), true).ok);
        // 0.7 x strict: goal 2 fails with limits, and does not apply without.
        let slow = waits("fair", 40.0, 100.0);
        let strict = waits("strict-fifo", 57.0, 50.0);
        assert!(!goals_1_to_3(&slow, &strict, &first_fit, true).ok);
        assert!(goals_1_to_3(&slow, &strict, &first_fit, false).ok);
        // No multi-GPU job waited under strict FIFO: goal 3 has nothing to judge (NaN passes).
        let strict = waits("strict-fifo", 100.0, 0.0);
        let g = goals_1_to_3(&waits("fair", 30.0, 10.0), &strict, &first_fit, true);
        assert!(g.multi_gpu_vs_strict.is_nan() && g.ok);
        // First-fit waited nothing: the ratio is NaN and goal 1 fails.
        let idle = waits("fifo-firstfit", 0.0, 0.0);
        assert!(!goals_1_to_3(&waits("fair", 0.0, 0.0), &strict, &idle, true).ok);
    }

    fn c(policy: &str, meets: bool, min_fs: f64, jain: f64) -> Contender {
        Contender {
            policy: policy.into(),
            meets_goals_1_to_3: meets,
            min_fair_share: min_fs,
            fair_share_jain: jain,
        }
    }

    #[test]
    fn goal_5_picks_the_fairest_among_the_policies_meeting_goals_1_to_3() {
        // Strict FIFO is fairer but fails goals 1-3: it does not count.
        let cell = [
            c("strict-fifo", false, 0.9, 0.9),
            c("fifo-firstfit", true, 0.3, 0.5),
            c("backfill", true, 0.4, 0.5),
            c("fair", true, 0.45, 0.4),
        ];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(true));
        assert_eq!(fairest_meeting_goals(&cell).unwrap().policy, "fair");
        assert_eq!(is_fairest_meeting_goals("backfill", &cell), Some(false));
        // Backfill's lowest user fares better: fair is not the fairest.
        let cell = [
            c("fifo-firstfit", true, 0.3, 0.5),
            c("backfill", true, 0.5, 0.5),
            c("fair", true, 0.45, 0.9),
        ];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(false));
        assert_eq!(fairest_meeting_goals(&cell).unwrap().policy, "backfill");
        // Equal lowest ratios: Jain's index of the ratios decides.
        let cell = [c("backfill", true, 0.5, 0.6), c("fair", true, 0.5, 0.7)];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(true));
        let cell = [c("backfill", true, 0.5, 0.8), c("fair", true, 0.5, 0.7)];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(false));
        // Equal on both: the tie goes to fair; the list's first is named fairest.
        let cell = [c("backfill", true, 0.5, 0.7), c("fair", true, 0.5, 0.7)];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(true));
        assert_eq!(fairest_meeting_goals(&cell).unwrap().policy, "backfill");
        // Fair fails goals 1-3: no verdict; the fairest is among the others.
        let cell = [
            c("fifo-firstfit", true, 0.3, 0.5),
            c("fair", false, 0.9, 0.9),
        ];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), None);
        assert_eq!(
            fairest_meeting_goals(&cell).unwrap().policy,
            "fifo-firstfit"
        );
        // Only fair meets them: it is the fairest. Nobody does: none.
        let cell = [
            c("fifo-firstfit", false, 0.9, 0.9),
            c("fair", true, 0.1, 0.1),
        ];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(true));
        let cell = [
            c("fifo-firstfit", false, 0.9, 0.9),
            c("fair", false, 0.1, 0.1),
        ];
        assert!(fairest_meeting_goals(&cell).is_none());
        // NaN is least fair.
        let cell = [
            c("backfill", true, f64::NAN, 1.0),
            c("fair", true, 0.01, 0.1),
        ];
        assert_eq!(is_fairest_meeting_goals("fair", &cell), Some(true));
    }

    fn job(user: &str, submit_s: u64, run_s: u64, mem_mib: Option<u64>) -> SimJob {
        SimJob {
            submit_ms: submit_s * 1000,
            duration_ms: run_s * 1000,
            gpus: 1,
            uid: 1000,
            user: user.into(),
            mem_mib,
            time_limit_s: None,
        }
    }

    fn ran(start_s: u64, end_s: u64, share: f64, earlier: &[(u64, u64)]) -> Outcome {
        Outcome {
            start_ms: start_s * 1000,
            end_ms: end_s * 1000,
            share,
            restarts: earlier.len() as u32,
            lost_share_ms: 0.0,
            earlier_runs: earlier
                .iter()
                .map(|&(a, b)| (a * 1000, b * 1000, share))
                .collect(),
            end: End::Completed,
        }
    }

    /// One GPU. B's exclusive job runs 0-100 s; A's memory job (a quarter of the GPU) waits
    /// from 0 and runs 100-200 s. A pending memory job asks for a quarter of a GPU, not a
    /// whole one: while both contend, max-min gives A 0.25 and B 0.75. A: 25 GPU-s received
    /// of a fair 25 + 25 = 0.5; B: 100 of 75.
    #[test]
    fn a_memory_job_contends_for_its_share_of_a_gpu() {
        let jobs = [job("a", 0, 100, Some(20 * 1024)), job("b", 0, 100, None)];
        let outcomes = [ran(100, 200, 0.25, &[]), ran(0, 100, 1.0, &[])];
        let m = measure("x", &jobs, &outcomes, 1, 0.0);
        assert!((m.fair_share_by_user["a"] - 0.5).abs() < 1e-9, "{m:?}");
        assert!(
            (m.fair_share_by_user["b"] - 4.0 / 3.0).abs() < 1e-9,
            "{m:?}"
        );
        assert!((m.min_fair_share_ratio - 0.5).abs() < 1e-9);
    }

    /// One GPU. A's job runs 0-50 s, is switched for B's (50-150 s), and runs again 150-250 s.
    /// A received 50 + 100 GPU-s of a fair 25 + 50 + 100 (6/7); B 100 of 75 (4/3).
    #[test]
    fn a_run_lost_to_a_switch_was_received() {
        let jobs = [job("a", 0, 100, None), job("b", 0, 100, None)];
        let outcomes = [ran(150, 250, 1.0, &[(0, 50)]), ran(50, 150, 1.0, &[])];
        let m = measure("x", &jobs, &outcomes, 1, 0.0);
        assert!(
            (m.fair_share_by_user["a"] - 6.0 / 7.0).abs() < 1e-9,
            "{m:?}"
        );
        assert!(
            (m.fair_share_by_user["b"] - 4.0 / 3.0).abs() < 1e-9,
            "{m:?}"
        );
    }

    /// Max-min over three users on 4 GPUs, each job 1 GPU for 100 s, all submitted at 0: a
    /// has 1 job, b 2, c 4. From 0 to 100 s the demands 1, 2, 4 get 1, 1.5, 1.5 (a's is met,
    /// b and c split the rest); a, b and c run 1, 1 and 2 jobs. From 100 to 200 s the demands
    /// b 1, c 2 are met and run. a: 100 of 100 = 1; b: 200 of 150 + 100 = 0.8; c: 400 of
    /// 150 + 200 = 8/7.
    #[test]
    fn fair_share_is_water_filled_over_the_users_demands() {
        let mut jobs = vec![job("a", 0, 100, None)];
        jobs.extend((0..2).map(|_| job("b", 0, 100, None)));
        jobs.extend((0..4).map(|_| job("c", 0, 100, None)));
        let outcomes: Vec<Outcome> = [0, 0, 100, 0, 0, 100, 100]
            .iter()
            .map(|&start| ran(start, start + 100, 1.0, &[]))
            .collect();
        let m = measure("x", &jobs, &outcomes, 4, 0.0);
        let by_user = &m.fair_share_by_user;
        assert!((by_user["a"] - 1.0).abs() < 1e-9, "{m:?}");
        assert!((by_user["b"] - 0.8).abs() < 1e-9, "{m:?}");
        assert!((by_user["c"] - 8.0 / 7.0).abs() < 1e-9, "{m:?}");
        assert!((m.min_fair_share_ratio - 0.8).abs() < 1e-9);
    }
}
