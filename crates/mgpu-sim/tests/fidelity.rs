//! The simulator applies time limits and context switches as the daemon does, refuses what
//! the daemon refuses, and turns bad input into errors, not panics.

use std::collections::BTreeMap;

use mgpu_core::{Config, JobState, Millis, Policy, Scheduler, TimeAction};
use mgpu_sim::engine::{replay, request_of, End, SimPolicy};
use mgpu_sim::parse_gpus;
use mgpu_sim::workload::{build_workload, flood_workload, parse_trace, SimJob, WorkloadOptions};

fn job(submit_s: u64, run_s: u64, gpus: u32, user: u32, limit_s: Option<u64>) -> SimJob {
    SimJob {
        submit_ms: submit_s * 1000,
        duration_ms: run_s * 1000,
        gpus,
        uid: 1000 + user,
        user: format!("user{user:02}"),
        mem_mib: None,
        time_limit_s: limit_s,
    }
}

fn config(policy: Policy) -> Config {
    Config {
        policy,
        min_slice_s: 60,
        default_max_restarts: Some(2),
        ..Config::default()
    }
}

/// A small trace where limits are shorter than run times, so jobs are switched, restarted and
/// timed out.
fn switching_trace() -> Vec<SimJob> {
    vec![
        job(0, 500, 2, 1, Some(100)),
        job(0, 300, 1, 2, Some(100)),
        job(10, 200, 1, 3, None),
        job(50, 100, 2, 4, Some(150)),
        job(120, 50, 1, 2, Some(60)),
        job(400, 1000, 4, 5, None),
        job(410, 30, 1, 1, Some(30)),
        job(900, 700, 1, 3, Some(200)),
    ]
}

/// The daemon's scheduling calls, event by event, as `Daemon::schedule`, `enforce_time_limits`
/// and `job_exited` make them (one pass per event until nothing starts, then the time-limit
/// decisions; a stopped job's exit is an event of its own, at once here), with one timer at
/// `next_deadline`. Returns each job's last start, restarts and whether it timed out.
fn daemon_replay(jobs: &[SimJob], policy: Policy) -> Vec<(Millis, u32, bool)> {
    let gpus = parse_gpus("4x80GiB").unwrap();
    let mut core = Scheduler::new(gpus, config(policy), 1);
    // Events: (time, kind, job): 0 = a job's processes exit, 1 = a submission.
    let mut events: BTreeMap<(Millis, u8, usize), u32> = BTreeMap::new();
    for (i, j) in jobs.iter().enumerate() {
        events.insert((j.submit_ms, 1, i), 0);
    }
    let mut id_of = vec![0; jobs.len()];
    let mut index_of = BTreeMap::new();
    let mut out = vec![(0, 0, false); jobs.len()];
    let mut run = vec![0u32; jobs.len()];
    let mut timer: Option<Millis> = None;
    loop {
        let next_event = events.keys().next().map(|k| k.0);
        let now = match (next_event, timer) {
            (None, None) => break,
            (e, t) => e.unwrap_or(Millis::MAX).min(t.unwrap_or(Millis::MAX)),
        };
        // A timer that fires runs the passes only (it is re-armed below).
        if timer != Some(now) {
            let ((_, kind, i), r) = events.pop_first().unwrap();
            if kind == 1 {
                let id = core.submit(request_of(&jobs[i]), now).unwrap();
                id_of[i] = id;
                index_of.insert(id, i);
            } else if r == run[i] && core.job(id_of[i]).is_some() {
                core.finish(id_of[i], JobState::Completed);
            }
        }
        // Daemon::schedule: passes until nothing starts, then enforce_time_limits.
        let mut exits = Vec::new();
        loop {
            let starts = core.schedule(now);
            if starts.is_empty() {
                break;
            }
            for a in starts {
                let i = index_of[&a.job];
                out[i].0 = now;
                events.insert((now + jobs[i].duration_ms, 0, i), run[i]);
            }
        }
        for action in core.time_actions(now) {
            match action {
                TimeAction::Requeue { job } => exits.push((job, true)),
                TimeAction::Timeout { job } => exits.push((job, false)),
                TimeAction::Warn { .. } => {}
            }
        }
        // job_exited for each stopped job (its processes gone at once), each followed by
        // Daemon::schedule.
        let mut pending_exits = exits;
        while let Some((id, requeue)) = pending_exits.pop() {
            let i = index_of[&id];
            run[i] += 1;
            if requeue {
                core.requeue(id, now);
                out[i].1 += 1;
            } else {
                core.finish(id, JobState::Timeout);
                out[i].2 = true;
            }
            loop {
                let starts = core.schedule(now);
                if starts.is_empty() {
                    break;
                }
                for a in starts {
                    let j = index_of[&a.job];
                    out[j].0 = now;
                    events.insert((now + jobs[j].duration_ms, 0, j), run[j]);
                }
            }
            for action in core.time_actions(now) {
                match action {
                    TimeAction::Requeue { job } => pending_exits.push((job, true)),
                    TimeAction::Timeout { job } => pending_exits.push((job, false)),
                    TimeAction::Warn { .. } => {}
                }
            }
        }
        timer = core.next_deadline(now);
    }
    out
}

#[test]
fn the_simulator_makes_the_daemons_scheduling_calls() {
    let jobs = switching_trace();
    let gpus = parse_gpus("4x80GiB").unwrap();
    for policy in Policy::ALL {
        let mut sim = SimPolicy::Core(policy).build(&gpus, &config(policy));
        let outcomes = replay(&jobs, &gpus, sim.as_mut()).unwrap();
        let daemon = daemon_replay(&jobs, policy);
        let simulated: Vec<(Millis, u32, bool)> = outcomes
            .iter()
            .map(|o| (o.start_ms, o.restarts, o.end == End::Timeout))
            .collect();
        assert_eq!(simulated, daemon, "{policy}");
        // The trace does exercise switches and timeouts.
        assert!(simulated.iter().any(|o| o.1 > 0), "{policy}: {simulated:?}");
    }
}

#[test]
fn a_switched_job_restarts_from_its_command_and_limits_end_jobs() {
    let gpus = parse_gpus("1x80GiB").unwrap();
    // a: 300 s of work, 100 s slices; b waits for a's GPU. a is switched at 100 s (b starts),
    // runs again from scratch when b ends, and with nobody waiting runs to its end.
    let jobs = vec![job(0, 300, 1, 1, Some(100)), job(10, 50, 1, 2, Some(50))];
    let cfg = Config {
        min_slice_s: 0,
        ..config(Policy::Fifo)
    };
    let mut sim = SimPolicy::Core(Policy::Fifo).build(&gpus, &cfg);
    let o = replay(&jobs, &gpus, sim.as_mut()).unwrap();
    assert_eq!((o[1].start_ms, o[1].end_ms), (100_000, 150_000));
    assert_eq!(
        (o[0].start_ms, o[0].end_ms, o[0].restarts),
        (150_000, 450_000, 1)
    );
    assert_eq!(o[0].lost_share_ms, 100_000.0);
    // Out of restarts (0 allowed): at its limit with someone waiting it times out.
    let cfg = Config {
        default_max_restarts: Some(0),
        ..cfg
    };
    let mut sim = SimPolicy::Core(Policy::Fifo).build(&gpus, &cfg);
    let o = replay(&jobs, &gpus, sim.as_mut()).unwrap();
    assert_eq!((o[0].end_ms, o[0].end), (100_000, End::Timeout));
    assert_eq!(o[1].start_ms, 100_000);
}

#[test]
fn jobs_the_server_refuses_are_refused_and_counted_not_clipped() {
    let rows = parse_trace(
        "submission_time,duration,num_gpu,mem_mib\n0,600,16,\n1,600,1,0\n2,600,1,999999999\n3,600,1,\n4,600,8,\n",
    )
    .unwrap();
    let opts = WorkloadOptions {
        users: 3,
        seed: 1,
        limit_factor: 1.0,
        load: Some(0.9),
        repeat: 1,
        total_gpus: 8,
        min_gpu_mib: 81920,
        mem_fraction: 0.6,
    };
    let jobs = build_workload(&rows, &opts).unwrap();
    assert_eq!(jobs[0].gpus, 16, "never clipped");
    let gpus = parse_gpus("8x80GiB").unwrap();
    for policy in SimPolicy::ALL {
        let mut s = policy.build(&gpus, &Config::default());
        let o = replay(&jobs, &gpus, s.as_mut()).unwrap();
        let ends: Vec<End> = o.iter().map(|o| o.end).collect();
        assert_eq!(
            ends,
            [
                End::Refused,
                End::Refused,
                End::Refused,
                End::Completed,
                End::Completed
            ],
            "{}",
            policy.name()
        );
        let m = mgpu_sim::metrics::measure(policy.name(), &jobs, &o, 8, 0.0);
        assert_eq!((m.jobs, m.refused), (2, 3));
    }
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    assert!(parse_trace("").is_err());
    assert!(parse_trace("a,b\n1,2\n").is_err());
    assert!(parse_trace("submission_time,duration,num_gpu\nx,1,1\n").is_err());
    assert!(parse_trace("submission_time,duration,num_gpu\n1,1,-1\n").is_err());
    assert!(parse_gpus("8x0GiB").is_err());
    assert!(parse_gpus("0x80GiB").is_err());
    assert!(parse_gpus("99999999999999999999x1").is_err());
    assert!(parse_gpus("2x18446744073709551615GiB").is_err());
    let opts = WorkloadOptions {
        users: 3,
        seed: 1,
        limit_factor: 1.0,
        load: Some(0.9),
        repeat: 1,
        total_gpus: 8,
        min_gpu_mib: 81920,
        mem_fraction: 0.6,
    };
    // A flood needs 1-GPU jobs to draw from.
    let wide = parse_trace("submission_time,duration,num_gpu\n0,600,2\n5,600,16\n").unwrap();
    let err = flood_workload(&wide, &opts).unwrap_err().to_string();
    assert!(err.contains("1-GPU"), "{err}");
    // A trace of jobs all wider than the server: all refused, no panic, no division by zero.
    let jobs = build_workload(&wide[1..], &opts).unwrap();
    let gpus = parse_gpus("8x80GiB").unwrap();
    for policy in SimPolicy::ALL {
        let mut s = policy.build(&gpus, &Config::default());
        let o = replay(&jobs, &gpus, s.as_mut()).unwrap();
        let m = mgpu_sim::metrics::measure(policy.name(), &jobs, &o, 8, 0.0);
        assert_eq!((m.jobs, m.refused), (0, 1));
        assert!(m.mean_wait_s.is_finite());
    }
    // Empty workload.
    let mut s = SimPolicy::Core(Policy::Fair).build(&gpus, &Config::default());
    assert!(replay(&[], &gpus, s.as_mut()).unwrap().is_empty());
    // A huge time limit does not overflow the core's clock arithmetic.
    let jobs = vec![
        job(0, 600, 1, 1, Some(u64::MAX)),
        job(1, 60, 1, 2, Some(u64::MAX)),
    ];
    let gpus = parse_gpus("1x80GiB").unwrap();
    let mut s = SimPolicy::Core(Policy::Fair).build(&gpus, &Config::default());
    let o = replay(&jobs, &gpus, s.as_mut()).unwrap();
    assert_eq!(o[1].start_ms, 600_000);
}

/// Service against max-min fair share: two users on one GPU, each with a 100 s job at t=0.
/// The first runs 0-100 s (it got 100 GPU-s of a fair 50), the second 100-200 s (100 of a fair
/// 50 + 100): ratios 2 and 2/3.
#[test]
fn fair_share_ratio_is_received_over_max_min_share_while_present() {
    let jobs = vec![job(0, 100, 1, 1, Some(100)), job(0, 100, 1, 2, Some(100))];
    let gpus = parse_gpus("1x80GiB").unwrap();
    let mut s = SimPolicy::StrictFifo.build(&gpus, &Config::default());
    let o = replay(&jobs, &gpus, s.as_mut()).unwrap();
    let m = mgpu_sim::metrics::measure("strict-fifo", &jobs, &o, 1, 0.0);
    assert!((m.min_fair_share_ratio - 2.0 / 3.0).abs() < 1e-9, "{m:?}");
    let jain = (2.0f64 + 2.0 / 3.0).powi(2) / (2.0 * (4.0 + 4.0 / 9.0));
    assert!((m.fair_share_jain - jain).abs() < 1e-9, "{m:?}");
}
