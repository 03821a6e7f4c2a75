//! Golden test: a 10-job trace on 4 GPUs whose schedules were worked out by hand, for strict
//! FIFO, FIFO first-fit and EASY backfilling (exact time limits, all jobs exclusive).
//!
//! | job | submit | run | GPUs |      job | submit | run | GPUs |
//! |-----|--------|-----|------|      ----|--------|-----|------|
//! | 0   | 0      | 100 | 2    |      5   | 30     | 10  | 2    |
//! | 1   | 0      | 50  | 1    |      6   | 40     | 60  | 1    |
//! | 2   | 10     | 100 | 4    |      7   | 200    | 50  | 2    |
//! | 3   | 20     | 30  | 1    |      8   | 200    | 50  | 2    |
//! | 4   | 20     | 200 | 1    |      9   | 210    | 20  | 1    |
//!
//! Backfill: job 2 is reserved at t=100 (when job 0 ends); job 3 backfills at t=20 (ends at 50)
//! and job 5 at t=50 (ends at 60); jobs 4 and 6 would run past t=100 and wait. At t=100 job 2
//! starts and job 4 is reserved at t=200; at t=200 jobs 4, 6, 7 start and job 8 is reserved at
//! t=250 (job 7's end); job 9 (t=210) gets the GPU job 6 frees at t=260.
//! Strict FIFO: nothing passes job 2 before t=100; the queue then drains in order.
//! First-fit: small jobs keep passing job 2 (jobs 4 and 6 at t=50, job 5 at t=100, job 7 at
//! t=200, job 9 at t=210 on the GPU left free), which starts only at t=250.

use mgpu_core::Policy;
use mgpu_sim::engine::{replay, SimPolicy};
use mgpu_sim::parse_gpus;
use mgpu_sim::workload::SimJob;

fn jobs() -> Vec<SimJob> {
    let rows = [
        (0, 100, 2),
        (0, 50, 1),
        (10, 100, 4),
        (20, 30, 1),
        (20, 200, 1),
        (30, 10, 2),
        (40, 60, 1),
        (200, 50, 2),
        (200, 50, 2),
        (210, 20, 1),
    ];
    rows.iter()
        .map(|&(submit, run, gpus)| SimJob {
            submit_ms: submit * 1000,
            duration_ms: run * 1000,
            gpus,
            uid: 1000,
            user: "user01".into(),
            mem_mib: None,
            time_limit_s: Some(run),
        })
        .collect()
}

fn starts(policy: SimPolicy) -> Vec<u64> {
    let gpus = parse_gpus("4x80GiB").unwrap();
    let jobs = jobs();
    // Plain EASY backfilling (a blocked job is reserved for at once), as worked out by hand.
    let easy = mgpu_core::Config {
        reserve_after_s: 0,
        reserve_after_wait_factor: 0.0,
        ..mgpu_core::Config::default()
    };
    let mut scheduler = policy.build(&gpus, &easy);
    replay(&jobs, &gpus, scheduler.as_mut())
        .unwrap()
        .iter()
        .map(|o| o.start_ms / 1000)
        .collect()
}

#[test]
fn backfill_schedule_is_exactly_the_hand_worked_one() {
    assert_eq!(
        starts(SimPolicy::Core(Policy::Backfill)),
        vec![0, 0, 100, 20, 200, 50, 200, 200, 250, 260]
    );
}

#[test]
fn fair_with_one_user_is_backfill() {
    assert_eq!(
        starts(SimPolicy::Core(Policy::Fair)),
        starts(SimPolicy::Core(Policy::Backfill))
    );
}

#[test]
fn strict_fifo_schedule_is_exactly_the_hand_worked_one() {
    assert_eq!(
        starts(SimPolicy::StrictFifo),
        vec![0, 0, 100, 200, 200, 200, 210, 230, 280, 280]
    );
}

#[test]
fn first_fit_schedule_is_exactly_the_hand_worked_one() {
    assert_eq!(
        starts(SimPolicy::Core(Policy::Fifo)),
        vec![0, 0, 250, 20, 50, 100, 50, 200, 350, 210]
    );
}

#[test]
fn trace_parsing_and_fill_in_rules_are_deterministic() {
    use mgpu_sim::workload::{build_workload, parse_trace, WorkloadOptions};
    let rows =
        parse_trace("job_id,submission_time,duration,num_gpu\na,0,600,1\nb,5,700,8\nc,9,600,0\n")
            .unwrap();
    assert_eq!(rows.len(), 2, "CPU-only rows are skipped");
    let opts = WorkloadOptions {
        users: 20,
        seed: 7,
        limit_factor: 1.5,
        load: None,
        repeat: 2,
        total_gpus: 8,
        min_gpu_mib: 81920,
        mem_fraction: 0.6,
    };
    let a = build_workload(&rows, &opts).unwrap();
    assert_eq!(a, build_workload(&rows, &opts).unwrap());
    assert_eq!(a.len(), 4);
    assert_eq!(a[1].time_limit_s, Some(1050));
    assert_eq!(a[1].mem_mib, None, "multi-GPU jobs are exclusive");
    assert!(
        a[2].submit_ms > a[1].submit_ms,
        "the copy comes after the original"
    );
}
