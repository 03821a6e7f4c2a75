//! Workloads: reading a CSV trace and turning it into jobs to replay.
//!
//! A trace needs the columns `submission_time,duration,num_gpu` (seconds, seconds, count);
//! `user`, `mem_mib` and `time_limit` (seconds) are optional. What a trace lacks is filled in
//! by fixed, seeded rules (so every run with the same seed replays the same jobs):
//! - **users**: drawn Zipf(1) over `--users N` names `user01..userNN` (user k with probability
//!   proportional to 1/k: a few heavy users, many light ones);
//! - **memory**: multi-GPU jobs are exclusive; a 1-GPU job declares memory with probability
//!   `--mem-fraction` (default 0.6), 10, 20 or 40 GiB with equal chances (capped at the
//!   smallest GPU), and is exclusive otherwise;
//! - **time limits**: the duration times `--limit-factor` (1.0: exact limits), rounded up.
//!
//! `--load L` rescales the gaps between submissions so that the offered load, GPU-seconds asked
//! for (memory jobs counted as whole GPUs) over GPU-seconds available between the first and the
//! last submission, is L.

use anyhow::{bail, Context};
use mgpu_core::Millis;

/// One row of a trace, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRow {
    pub submit_ms: Millis,
    pub duration_ms: Millis,
    pub gpus: u32,
    pub user: Option<String>,
    pub mem_mib: Option<u64>,
    pub time_limit_s: Option<u64>,
}

/// A job to replay: everything known, in virtual time.
#[derive(Debug, Clone, PartialEq)]
pub struct SimJob {
    pub submit_ms: Millis,
    /// How long it really runs once started.
    pub duration_ms: Millis,
    pub gpus: u32,
    pub uid: u32,
    pub user: String,
    pub mem_mib: Option<u64>,
    pub time_limit_s: Option<u64>,
}

/// How to fill in and shape a trace.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    pub users: u32,
    pub seed: u64,
    pub limit_factor: f64,
    pub load: Option<f64>,
    /// Copies of the trace played one after the other (for long replays).
    pub repeat: u32,
    pub total_gpus: u32,
    /// Memory of the smallest GPU: declared memory never exceeds it.
    pub min_gpu_mib: u64,
    /// Probability that a 1-GPU job declares memory (and may share a GPU).
    pub mem_fraction: f64,
}

/// SplitMix64: a tiny, well-mixed, seeded PRNG (reproducible across platforms).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }
}

/// Largest time a trace may give (submission, duration or limit), in seconds: about 3,000
/// years, so that virtual times in milliseconds stay far from `u64::MAX` whatever is added.
pub const MAX_TRACE_SECONDS: f64 = 1e11;

/// Most jobs one workload may have (after `--repeat`): bounds memory and replay time.
pub const MAX_JOBS: usize = 20_000_000;

/// Most users `--users` may draw.
pub const MAX_USERS: u32 = 100_000;

/// A trace's time field: a finite number of seconds, 0 or more and at most
/// [`MAX_TRACE_SECONDS`].
fn parse_seconds(text: &str) -> anyhow::Result<f64> {
    let v: f64 = text
        .parse()
        .with_context(|| format!("bad number {text:?}"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("{text:?} is not a number of seconds of 0 or more");
    }
    if v > MAX_TRACE_SECONDS {
        bail!("{text:?} seconds is more than {MAX_TRACE_SECONDS:e}");
    }
    Ok(v)
}

/// Parses a CSV trace (plain comma-separated, header row first).
pub fn parse_trace(text: &str) -> anyhow::Result<Vec<TraceRow>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .context("the trace is empty")?
        .split(',')
        .map(str::trim)
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (Some(submit_col), Some(duration_col), Some(gpus_col)) = (
        column("submission_time"),
        column("duration"),
        column("num_gpu"),
    ) else {
        bail!("the trace needs the columns submission_time,duration,num_gpu");
    };
    let (user_col, mem_col, limit_col) = (column("user"), column("mem_mib"), column("time_limit"));
    let mut rows = Vec::new();
    for (n, line) in lines.enumerate() {
        let row = n + 2;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |col: usize| fields.get(col).copied().unwrap_or("");
        let optional = |col: Option<usize>| col.map(field).filter(|f| !f.is_empty());
        let seconds = |col: usize, name: &str| -> anyhow::Result<f64> {
            parse_seconds(field(col)).with_context(|| format!("row {row}: bad {name}"))
        };
        let gpus: u32 = field(gpus_col)
            .parse()
            .with_context(|| format!("row {row}: bad num_gpu {:?}", field(gpus_col)))?;
        if gpus == 0 {
            continue; // CPU-only jobs do not use the GPU scheduler.
        }
        let submit = seconds(submit_col, "submission_time")?;
        let duration = seconds(duration_col, "duration")?;
        let time_limit_s = optional(limit_col)
            .map(parse_seconds)
            .transpose()
            .with_context(|| format!("row {row}: bad time_limit"))?
            .map(|s| s.ceil() as u64);
        let mem_mib = optional(mem_col)
            .map(|m| {
                m.parse::<u64>()
                    .with_context(|| format!("row {row}: bad mem_mib {m:?}"))
            })
            .transpose()?;
        if rows.len() >= MAX_JOBS {
            bail!("more than {MAX_JOBS} GPU jobs");
        }
        rows.push(TraceRow {
            submit_ms: (submit * 1000.0).round() as Millis,
            duration_ms: ((duration * 1000.0).round() as Millis).max(1),
            gpus,
            user: optional(user_col).map(str::to_string),
            mem_mib,
            time_limit_s,
        });
    }
    rows.sort_by_key(|r| r.submit_ms);
    Ok(rows)
}

/// `--split K`: cuts a trace (sorted by submission) into `k` consecutive segments of equal job
/// count (sizes differ by at most one, the longer ones last), each to be replayed as a trace
/// of its own. Fails if `k` is 0 or larger than the number of jobs.
pub fn split_rows(rows: &[TraceRow], k: usize) -> anyhow::Result<Vec<&[TraceRow]>> {
    if k == 0 {
        bail!("--split must be at least 1");
    }
    if k > rows.len() {
        bail!(
            "cannot split {} jobs into {k} segments (at most one segment per job)",
            rows.len()
        );
    }
    let n = rows.len();
    Ok((0..k).map(|i| &rows[i * n / k..(i + 1) * n / k]).collect())
}

/// Fills in users, memory and limits by the documented rules, repeats and rescales.
///
/// Fails on options out of range (no users or too many, too many jobs after `--repeat`, a load
/// that is not a positive number or would spread the submissions beyond
/// [`MAX_TRACE_SECONDS`]).
pub fn build_workload(rows: &[TraceRow], opts: &WorkloadOptions) -> anyhow::Result<Vec<SimJob>> {
    check_options(opts)?;
    if rows.len().saturating_mul(opts.repeat.max(1) as usize) > MAX_JOBS {
        bail!("more than {MAX_JOBS} jobs to replay (trace x --repeat)");
    }
    let mut rng = Rng::new(opts.seed);
    let zipf = zipf_cdf(opts.users.max(1));
    let mut named_users: Vec<String> = Vec::new();
    let span = match (rows.first(), rows.last()) {
        (Some(a), Some(b)) => b.submit_ms - a.submit_ms,
        _ => 0,
    };
    let gap = span / rows.len().max(1) as u64;
    let mut jobs = Vec::with_capacity(rows.len() * opts.repeat.max(1) as usize);
    for copy in 0..opts.repeat.max(1) as u64 {
        let shift = copy * (span + gap);
        for row in rows {
            let (uid, user) = match &row.user {
                Some(name) => {
                    let k = match named_users.iter().position(|u| u == name) {
                        Some(k) => k,
                        None => {
                            named_users.push(name.clone());
                            named_users.len() - 1
                        }
                    };
                    (1000 + k as u32, name.clone())
                }
                None => {
                    let u = rng.unit();
                    let k = zipf.partition_point(|&c| c < u).min(zipf.len() - 1);
                    (1000 + k as u32, format!("user{:02}", k + 1))
                }
            };
            let mem_mib = if row.mem_mib.is_some() || row.user.is_some() {
                row.mem_mib
            } else {
                assigned_memory(&mut rng, row.gpus, opts)
            };
            let time_limit_s = row.time_limit_s.or_else(|| limit_of(row.duration_ms, opts));
            jobs.push(SimJob {
                submit_ms: row.submit_ms + shift,
                duration_ms: row.duration_ms,
                // Never clipped: a job wider than the server is refused by the replay.
                gpus: row.gpus,
                uid,
                user,
                mem_mib,
                time_limit_s,
            });
        }
    }
    if let Some(load) = opts.load {
        rescale_to_load(&mut jobs, opts.total_gpus, load)?;
    }
    Ok(jobs)
}

/// The options every workload needs in range.
fn check_options(opts: &WorkloadOptions) -> anyhow::Result<()> {
    if opts.users == 0 || opts.users > MAX_USERS {
        bail!("--users must be between 1 and {MAX_USERS}");
    }
    if opts.repeat > MAX_REPEAT {
        bail!("--repeat must be at most {MAX_REPEAT}");
    }
    if opts.total_gpus == 0 {
        bail!("no GPUs to replay on");
    }
    if !(opts.limit_factor == 0.0 || (opts.limit_factor >= 1.0 && opts.limit_factor.is_finite())) {
        bail!("--limit-factor must be 0 (no limits) or at least 1");
    }
    if !(0.0..=1.0).contains(&opts.mem_fraction) {
        bail!("--mem-fraction must be between 0 and 1");
    }
    if let Some(load) = opts.load {
        if !load.is_finite() || load <= 0.0 || load > MAX_LOAD {
            bail!("--load must be a number above 0 and at most {MAX_LOAD}");
        }
    }
    Ok(())
}

/// Most jobs the flood scenario's steady users may submit (expected count).
pub const MAX_STEADY_JOBS: usize = 1_000_000;

/// Most copies `--repeat` may play.
pub const MAX_REPEAT: u32 = 10_000;

/// Highest `--load`: beyond it every submission falls at nearly one instant anyway.
pub const MAX_LOAD: f64 = 100.0;

/// The time limit a job without one gets: its run time times the limit factor; a factor of 0
/// gives no limit (the daemon then estimates it with the default estimate, 24 h).
fn limit_of(duration_ms: Millis, opts: &WorkloadOptions) -> Option<u64> {
    (opts.limit_factor > 0.0)
        .then(|| (duration_ms as f64 / 1000.0 * opts.limit_factor).ceil() as u64)
}

/// Cumulative Zipf(1) probabilities over `n` ranks.
fn zipf_cdf(n: u32) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

/// The memory rule: multi-GPU exclusive; 1-GPU declares 10/20/40 GiB w.p. `mem_fraction`.
fn assigned_memory(rng: &mut Rng, gpus: u32, opts: &WorkloadOptions) -> Option<u64> {
    // Two draws whatever the outcome, so that the users drawn do not depend on the fraction.
    let (declares, size) = (rng.unit(), rng.below(3));
    if gpus > 1 || declares >= opts.mem_fraction {
        return None;
    }
    Some(([10, 20, 40][size] * 1024).min(opts.min_gpu_mib))
}

/// Offered load: GPU-seconds asked for over GPU-seconds between first and last submission.
/// Jobs wider than the server (which it refuses) ask for nothing.
pub fn offered_load(jobs: &[SimJob], total_gpus: u32) -> f64 {
    let first = jobs.iter().map(|j| j.submit_ms).min().unwrap_or(0);
    let last = jobs.iter().map(|j| j.submit_ms).max().unwrap_or(0);
    let work: f64 = jobs
        .iter()
        .filter(|j| j.gpus <= total_gpus)
        .map(|j| j.duration_ms as f64 * j.gpus as f64)
        .sum();
    work / (total_gpus as f64 * (last - first).max(1) as f64)
}

/// Stretches or squeezes the gaps between submissions so that the offered load is `load`.
/// Fails if the submissions would then spread over more than [`MAX_TRACE_SECONDS`].
fn rescale_to_load(jobs: &mut [SimJob], total_gpus: u32, load: f64) -> anyhow::Result<()> {
    let factor = offered_load(jobs, total_gpus) / load;
    if !factor.is_finite() || factor <= 0.0 {
        return Ok(()); // nothing to rescale (no work that fits, or a single instant)
    }
    let first = jobs.iter().map(|j| j.submit_ms).min().unwrap_or(0);
    let last = jobs.iter().map(|j| j.submit_ms).max().unwrap_or(0);
    if (last - first) as f64 * factor > MAX_TRACE_SECONDS * 1000.0 {
        bail!(
            "--load {load} is too low for this trace: its submissions would spread over more \
             than {MAX_TRACE_SECONDS:e} seconds"
        );
    }
    for job in jobs {
        job.submit_ms = first + ((job.submit_ms - first) as f64 * factor).round() as Millis;
    }
    Ok(())
}

/// The flood scenario: user `flood` submits 500 1-GPU jobs at t=0 (durations drawn from the
/// trace's 1-GPU jobs); nine users `steady1..9` submit jobs drawn from the trace (GPU count and
/// duration), Poisson arrivals at an offered load of 0.5 of the machine, for as long as the
/// flood alone would keep the whole machine busy. All jobs are exclusive; limits as usual.
///
/// Fails if the trace has no 1-GPU job to draw the flood from, or no job that fits the server.
/// Fails too if the steady users would submit more than [`MAX_STEADY_JOBS`] jobs (1-GPU jobs
/// far longer than the trace's average).
pub fn flood_workload(rows: &[TraceRow], opts: &WorkloadOptions) -> anyhow::Result<Vec<SimJob>> {
    const FLOOD_JOBS: usize = 500;
    check_options(opts)?;
    const STEADY_USERS: u32 = 9;
    const STEADY_LOAD: f64 = 0.5;
    let mut rng = Rng::new(opts.seed);
    let limit = |d: Millis| limit_of(d, opts);
    let single: Vec<&TraceRow> = rows.iter().filter(|r| r.gpus == 1).collect();
    if single.is_empty() {
        bail!("the flood scenario draws its jobs from the trace's 1-GPU jobs, and it has none");
    }
    let fitting: Vec<&TraceRow> = rows.iter().filter(|r| r.gpus <= opts.total_gpus).collect();
    let mut jobs = Vec::new();
    let mut flood_work_ms = 0u64;
    for _ in 0..FLOOD_JOBS {
        let row = single[rng.below(single.len())];
        flood_work_ms += row.duration_ms;
        jobs.push(SimJob {
            submit_ms: 0,
            duration_ms: row.duration_ms,
            gpus: 1,
            uid: 1000,
            user: "flood".into(),
            mem_mib: None,
            time_limit_s: limit(row.duration_ms),
        });
    }
    let horizon_ms = flood_work_ms as f64 / opts.total_gpus as f64;
    let mean_work_ms = fitting
        .iter()
        .map(|r| r.duration_ms as f64 * r.gpus as f64)
        .sum::<f64>()
        / fitting.len().max(1) as f64;
    // Arrival rate so that the steady users' work is STEADY_LOAD of the machine.
    let mean_gap_ms = mean_work_ms / (STEADY_LOAD * opts.total_gpus as f64);
    if horizon_ms / mean_gap_ms > MAX_STEADY_JOBS as f64 {
        bail!(
            "the flood scenario would have the steady users submit more than {MAX_STEADY_JOBS} \
             jobs (the trace's 1-GPU jobs run far longer than its average job)"
        );
    }
    let mut t = 0.0;
    loop {
        t += -mean_gap_ms * (1.0 - rng.unit()).ln();
        if t >= horizon_ms {
            break;
        }
        let row = fitting[rng.below(fitting.len())];
        let k = 1 + rng.below(STEADY_USERS as usize) as u32;
        jobs.push(SimJob {
            submit_ms: t as Millis,
            duration_ms: row.duration_ms,
            gpus: row.gpus,
            uid: 1000 + k,
            user: format!("steady{k}"),
            mem_mib: None,
            time_limit_s: limit(row.duration_ms),
        });
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u64) -> Vec<TraceRow> {
        (0..n)
            .map(|i| TraceRow {
                submit_ms: i * 1000,
                duration_ms: 1000,
                gpus: 1,
                user: None,
                mem_mib: None,
                time_limit_s: None,
            })
            .collect()
    }

    fn starts(parts: &[&[TraceRow]]) -> Vec<Vec<Millis>> {
        parts
            .iter()
            .map(|p| p.iter().map(|r| r.submit_ms / 1000).collect())
            .collect()
    }

    #[test]
    fn split_cuts_consecutive_segments_of_equal_job_count() {
        let r = rows(10);
        assert_eq!(
            starts(&split_rows(&r, 3).unwrap()),
            [vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8, 9]]
        );
        assert_eq!(
            starts(&split_rows(&r, 2).unwrap()),
            [vec![0, 1, 2, 3, 4], vec![5, 6, 7, 8, 9]]
        );
        assert_eq!(
            starts(&split_rows(&r, 1).unwrap()),
            [(0..10).collect::<Vec<_>>()]
        );
        let each: Vec<Vec<Millis>> = (0..10).map(|i| vec![i]).collect();
        assert_eq!(starts(&split_rows(&r, 10).unwrap()), each);
        assert!(split_rows(&r, 0).is_err());
        assert!(split_rows(&r, 11).is_err());
        assert!(split_rows(&[], 1).is_err());
    }

    #[test]
    fn load_is_rescaled_per_segment() {
        // Two halves: the first packed (a job per second), the second sparse (one per 100 s).
        let mut r = rows(4);
        r[2].submit_ms = 1000 * 1000;
        r[3].submit_ms = 1100 * 1000;
        let opts = WorkloadOptions {
            users: 2,
            seed: 1,
            limit_factor: 1.0,
            load: Some(0.5),
            repeat: 1,
            total_gpus: 1,
            min_gpu_mib: 81920,
            mem_fraction: 0.0,
        };
        for part in split_rows(&r, 2).unwrap() {
            let jobs = build_workload(part, &opts).unwrap();
            // 2 jobs of 1 s on 1 GPU at load 0.5: submissions 4 s apart, from the segment's
            // own first submission.
            assert_eq!(jobs[1].submit_ms - jobs[0].submit_ms, 4000);
            assert_eq!(jobs[0].submit_ms, part[0].submit_ms);
            assert!((offered_load(&jobs, 1) - 0.5).abs() < 1e-9);
        }
    }

    #[test]
    fn out_of_range_times_and_options_are_errors() {
        let head = "submission_time,duration,num_gpu,time_limit\n";
        for bad in [
            "NaN,1,1,",
            "0,inf,1,",
            "0,-1,1,",
            "-5,1,1,",
            "1e300,1,1,",
            "0,1e12,1,",
            "0,1,1,nan",
            "0,1,1,-3",
            "0,1,1.5,",
            "0,1,99999999999,",
        ] {
            assert!(parse_trace(&format!("{head}{bad}\n")).is_err(), "{bad}");
        }
        // CPU-only rows are skipped before their other fields are read.
        assert!(
            parse_trace(&format!("{head}0,,0,\n1,1,1,\n"))
                .unwrap()
                .len()
                == 1
        );
        let r = rows(3);
        let ok = WorkloadOptions {
            users: 2,
            seed: 1,
            limit_factor: 1.0,
            load: None,
            repeat: 1,
            total_gpus: 1,
            min_gpu_mib: 81920,
            mem_fraction: 0.0,
        };
        assert!(build_workload(&r, &ok).is_ok());
        for bad in [
            WorkloadOptions {
                users: 0,
                ..ok.clone()
            },
            WorkloadOptions {
                users: MAX_USERS + 1,
                ..ok.clone()
            },
            WorkloadOptions {
                load: Some(f64::NAN),
                ..ok.clone()
            },
            WorkloadOptions {
                load: Some(0.0),
                ..ok.clone()
            },
            WorkloadOptions {
                load: Some(-1.0),
                ..ok.clone()
            },
            WorkloadOptions {
                load: Some(1e-300),
                ..ok.clone()
            },
            WorkloadOptions {
                load: Some(1e300),
                ..ok.clone()
            },
            WorkloadOptions {
                limit_factor: f64::NAN,
                ..ok.clone()
            },
            WorkloadOptions {
                limit_factor: 0.5,
                ..ok.clone()
            },
            WorkloadOptions {
                mem_fraction: f64::NAN,
                ..ok.clone()
            },
            WorkloadOptions {
                repeat: MAX_REPEAT + 1,
                ..ok.clone()
            },
            WorkloadOptions {
                total_gpus: 0,
                ..ok.clone()
            },
        ] {
            assert!(build_workload(&r, &bad).is_err(), "{bad:?}");
            // The flood ignores --load; a load too low to rescale to is build_workload's error.
            if bad.load != Some(1e-300) {
                assert!(flood_workload(&r, &bad).is_err(), "{bad:?}");
            }
        }
        // A flood whose 1-GPU jobs are far longer than the average would need billions of
        // steady jobs: refused, not attempted.
        let mut r = rows(5000);
        r[0].duration_ms = 1e14 as Millis;
        for row in &mut r[1..] {
            row.gpus = 2;
            row.duration_ms = 1;
        }
        let opts = WorkloadOptions {
            total_gpus: 8,
            ..ok
        };
        let Err(err) = flood_workload(&r, &opts) else {
            panic!("a flood of too many steady jobs was built");
        };
        assert!(err.to_string().contains("steady"), "{err}");
    }
}
