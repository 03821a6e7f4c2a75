//! The five measurements of issue 6, written once against [`System`] so that mgpu, tsp and
//! Slurm are measured the same way. Each adds its figures to a [`Metrics`] map (keys are the
//! ones described in `results::METRICS`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::stats::{median, ms, percentile};
use crate::system::{parallel, wait_idle, System};
use crate::util;

/// Metric key → value for one system.
pub type Metrics = BTreeMap<String, f64>;

/// How many of everything.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Counts {
    pub latency_runs: usize,
    pub submit_jobs: usize,
    pub clients: usize,
    pub throughput_jobs: usize,
    pub dispatch_pairs: usize,
    pub scale_jobs: usize,
    pub scale_jobs_others: usize,
    pub scale_probes: usize,
}

/// What the scenarios share: our own binary (jobs call its `stamp` subcommand) and a scratch
/// directory for the files jobs write.
pub struct Ctx {
    pub exe: PathBuf,
    pub work: PathBuf,
}

/// A job that holds its slots for long: what the submit and scale scenarios queue.
fn hold() -> Vec<String> {
    vec!["sleep".into(), "1000".into()]
}

/// Scenario 1: Attached `srun true`: median and p99 of `n` (after 3 unmeasured warm-up runs).
pub fn latency(sys: &dyn System, n: usize, m: &mut Metrics) -> Result<()> {
    for _ in 0..3 {
        sys.attached_true()?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        sys.attached_true()?;
        samples.push(ms(t.elapsed()));
    }
    m.insert(
        "srun_median_ms".into(),
        median(&samples).unwrap_or(f64::NAN),
    );
    m.insert(
        "srun_p99_ms".into(),
        percentile(&samples, 99.0).unwrap_or(f64::NAN),
    );
    Ok(())
}

/// The harness's own floor: sequential spawns of `/bin/true` per second (what one CLI call per
/// job can at best reach on this machine, before the command does any work).
pub fn spawn_floor(n: usize, m: &mut Metrics) -> Result<()> {
    let t = Instant::now();
    for _ in 0..n {
        util::run_ok(&mut std::process::Command::new("/bin/true"))?;
    }
    m.insert(
        "spawn_floor_per_s".into(),
        n as f64 / t.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// Checks that exactly `want` jobs are queued (every accepted submission is there).
fn expect_queued(sys: &dyn System, want: usize) -> Result<()> {
    let have = sys.active_jobs()?;
    if have != want {
        bail!(
            "{} holds {have} jobs, expected {want}: accepted submissions were lost",
            sys.name()
        );
    }
    Ok(())
}

/// Scenario 2: Detached submissions per second, one CLI call per job, behind a job holding all 8 GPUs
/// so that nothing runs: `n` from one client, then `n` from `clients` concurrent clients.
pub fn submit(
    sys: &dyn System,
    n: usize,
    clients: usize,
    m: &mut Metrics,
    notes: &mut Vec<String>,
) -> Result<()> {
    let n = match sys.max_queued() {
        Some(max) if n + 1 > max => {
            notes.push(format!(
                "{}: submit scenario capped at {} jobs (its queue holds at most {max})",
                sys.name(),
                max - 1
            ));
            max - 1
        }
        _ => n,
    };
    let hold = hold();
    sys.submit(8, &hold)?;
    let t = Instant::now();
    for _ in 0..n {
        sys.submit(8, &hold)?;
    }
    m.insert(
        "submit_seq_per_s".into(),
        n as f64 / t.elapsed().as_secs_f64(),
    );
    expect_queued(sys, n + 1)?;
    sys.reset()?;

    sys.submit(8, &hold)?;
    let t = Instant::now();
    parallel(n, clients, |_| sys.submit(8, &hold))?;
    m.insert(
        "submit_par_per_s".into(),
        n as f64 / t.elapsed().as_secs_f64(),
    );
    expect_queued(sys, n + 1)?;
    sys.reset()
}

fn count_files(dir: &Path) -> Result<usize> {
    Ok(std::fs::read_dir(dir)?.count())
}

/// Scenario 3: End-to-end throughput: `n` trivial 1-GPU jobs (`touch MARKER`) submitted detached one
/// CLI call at a time; jobs/s from just before the first submit to the last marker's mtime.
pub fn throughput(sys: &dyn System, ctx: &Ctx, n: usize, m: &mut Metrics) -> Result<()> {
    let dir = ctx.work.join(format!("marks-{}", sys.name()));
    std::fs::create_dir_all(&dir)?;
    run_markers(sys, &dir, n, "", m, || {
        for i in 0..n {
            let marker = dir.join(i.to_string());
            sys.submit(1, &["touch".into(), marker.to_string_lossy().into_owned()])?;
        }
        Ok(())
    })
}

/// Scenario 3 as one job array, where the system has arrays (`mgpu_srun --array`, `sbatch
/// --array`): the same `n` trivial 1-GPU jobs submitted with one CLI call; each task creates
/// its marker, named by its index, with a hidden `mgpu-bench touch-task` subcommand.
pub fn throughput_array(sys: &dyn System, ctx: &Ctx, n: usize, m: &mut Metrics) -> Result<()> {
    let Some(var) = sys.array_task_var() else {
        return Ok(());
    };
    let dir = ctx.work.join(format!("array-marks-{}", sys.name()));
    std::fs::create_dir_all(&dir)?;
    let job = [
        ctx.exe.to_string_lossy().into_owned(),
        "touch-task".into(),
        dir.to_string_lossy().into_owned(),
        var.into(),
    ];
    run_markers(sys, &dir, n, "array_", m, || sys.submit_array(n, 1, &job))
}

/// Submits `n` jobs that each leave a marker in `dir`, waits for all markers, and records
/// `{prefix}throughput_per_s` (from just before the first submit to the newest marker) and
/// `{prefix}throughput_cpu_ms_per_job`.
fn run_markers(
    sys: &dyn System,
    dir: &Path,
    n: usize,
    prefix: &str,
    m: &mut Metrics,
    submit: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let cpu_before = util::cpu_times();
    let start = SystemTime::now();
    submit()?;
    let secs = wait_for_markers(sys, dir, n, start)?;
    m.insert(format!("{prefix}throughput_per_s"), n as f64 / secs);
    // What a job costs the machine: every process's CPU time (client, server, supervisor, job,
    // and this harness's polling) over the run, per job.
    if let (Some(before), Some(after)) = (cpu_before, util::cpu_times()) {
        m.insert(
            format!("{prefix}throughput_cpu_ms_per_job"),
            after.busy_ms_since(&before) / n as f64,
        );
    }
    wait_idle(sys, Duration::from_secs(60))
}

/// Waits until `n` markers are in `dir`; returns the seconds from `start` to the newest one.
fn wait_for_markers(sys: &dyn System, dir: &Path, n: usize, start: SystemTime) -> Result<f64> {
    let timeout = Duration::from_secs(120 + n as u64);
    let deadline = Instant::now() + timeout;
    let mut last_check = Instant::now();
    while count_files(dir)? < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} jobs ran within {timeout:?}",
                count_files(dir)?
            );
        }
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            if sys.active_jobs()? == 0 && count_files(dir)? < n {
                bail!(
                    "{}'s queue is empty but only {} of {n} jobs ran",
                    sys.name(),
                    count_files(dir)?
                );
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut end = start;
    for e in std::fs::read_dir(dir)? {
        end = end.max(e?.metadata()?.modified()?);
    }
    Ok(end.duration_since(start)?.as_secs_f64())
}

/// Scenario 4: Dispatch latency, `pairs` times: job A holds all 8 GPUs, sleeps 150 ms and stamps the
/// time just before it exits; job B, queued behind it for the same GPUs, stamps the time as
/// soon as it starts. Both stamps are taken by the jobs (our `stamp` subcommand).
pub fn dispatch(sys: &dyn System, ctx: &Ctx, pairs: usize, m: &mut Metrics) -> Result<()> {
    let dir = ctx.work.join(format!("dispatch-{}", sys.name()));
    std::fs::create_dir_all(&dir)?;
    let exe = ctx.exe.to_string_lossy().into_owned();
    let mut samples = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (a, b) = (dir.join(format!("a{i}")), dir.join(format!("b{i}")));
        let stamp = |file: &Path, sleep: &str| {
            vec![
                exe.clone(),
                "stamp".into(),
                "--sleep-ms".into(),
                sleep.into(),
                file.to_string_lossy().into_owned(),
            ]
        };
        sys.submit(8, &stamp(&a, "150"))?;
        sys.submit(8, &stamp(&b, "0"))?;
        let tb = util::poll(
            "job B's timestamp",
            Duration::from_secs(120),
            Duration::from_millis(1),
            || util::read_stamp(&b),
        )?;
        let ta = util::read_stamp(&a)?.context("job B ran but job A left no timestamp")?;
        if tb < ta {
            bail!("job B started before job A ended (pair {i}): they shared GPUs");
        }
        samples.push((tb - ta) as f64 / 1e6);
    }
    m.insert(
        "dispatch_median_ms".into(),
        median(&samples).unwrap_or(f64::NAN),
    );
    m.insert(
        "dispatch_p99_ms".into(),
        percentile(&samples, 99.0).unwrap_or(f64::NAN),
    );
    wait_idle(sys, Duration::from_secs(60))
}

/// Scenario 5: Scale: `n` pending jobs (behind a job holding all GPUs), queued with `clients` parallel
/// submitters; then `probes` sequential CLI submits (p99), the same over the raw protocol
/// where there is one, the queue listing (median of 3), cancel-all, and the daemon's peak RSS.
pub fn scale(
    sys: &dyn System,
    n: usize,
    probes: usize,
    clients: usize,
    m: &mut Metrics,
) -> Result<()> {
    let hold = hold();
    sys.submit(8, &hold)?;
    let t = Instant::now();
    sys.fill(n, 8, &hold, clients)?;
    m.insert("scale_jobs".into(), n as f64);
    m.insert(
        "scale_fill_per_s".into(),
        n as f64 / t.elapsed().as_secs_f64(),
    );
    expect_queued(sys, n + 1)?;

    let mut cli = Vec::with_capacity(probes);
    for _ in 0..probes {
        let t = Instant::now();
        sys.submit(8, &hold)?;
        cli.push(ms(t.elapsed()));
    }
    m.insert(
        "scale_submit_p99_ms".into(),
        percentile(&cli, 99.0).unwrap_or(f64::NAN),
    );
    let mut queued = n + 1 + probes;
    if let Some(raw) = sys.raw_submit_latency(probes, 8, &hold) {
        let raw = raw?;
        queued += probes;
        m.insert(
            "scale_submit_raw_p99_ms".into(),
            percentile(&raw, 99.0).unwrap_or(f64::NAN),
        );
    }

    let mut listing = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        sys.queue_dump()?;
        listing.push(ms(t.elapsed()));
    }
    m.insert(
        "scale_queue_ms".into(),
        median(&listing).unwrap_or(f64::NAN),
    );
    expect_queued(sys, queued)?;

    let t = Instant::now();
    sys.cancel_all()?;
    m.insert("scale_cancel_all_ms".into(), ms(t.elapsed()));
    wait_idle(sys, Duration::from_secs(600))?;
    if let Some(kib) = sys.peak_rss_kib() {
        m.insert("scale_peak_rss_mib".into(), kib as f64 / 1024.0);
    }
    Ok(())
}
