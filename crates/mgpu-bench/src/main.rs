//! # mgpu-bench
//!
//! The benchmark suite of issue 6: builds the project's binaries in release, starts a private
//! `mgpu_scheduler_server --simulate-gpus 8x80GiB` and measures, through the real client
//! binaries, (1) attached `mgpu_srun true` latency, (2) detached submissions per second,
//! (3) end-to-end throughput of trivial jobs, (4) dispatch latency and (5) behaviour with a
//! very long queue; optionally the same against task-spooler (`--vs-tsp`) and a real Slurm
//! (`--vs-slurm`). Prints a table (or `--json`). See this crate's README for what each number
//! means. Benchmarks are not tests: nothing here asserts a time.

mod mgpu;
mod raw;
mod results;
mod scenarios;
mod slurm;
mod stats;
mod system;
mod tsp;
mod util;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::results::SystemResult;
use crate::scenarios::{Counts, Ctx, Metrics};
use crate::system::System;

/// Benchmark mgpu (and optionally task-spooler and Slurm side by side) on this machine.
///
/// Examples:
///   cargo run --release -p mgpu-bench                       # mgpu alone, full counts
///   cargo run --release -p mgpu-bench -- --quick            # CI smoke run (< 60 s)
///   cargo run --release -p mgpu-bench -- --vs-tsp --vs-slurm --json > bench.json
#[derive(Debug, Parser)]
#[command(name = "mgpu-bench", verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Internal (run as a job): sleep, then write the time (ns since the epoch) to FILE.
    #[command(hide = true)]
    Stamp {
        #[arg(long, default_value_t = 0)]
        sleep_ms: u64,
        file: PathBuf,
    },
    /// Internal (run as a job array's task): create DIR/<the value of VAR>, its index.
    #[command(hide = true)]
    TouchTask { dir: PathBuf, var: String },
}

#[derive(Debug, Args)]
struct Opts {
    /// Print one JSON object instead of the tables
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to FILE (the tables still go to stdout)
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Small counts: a smoke run (CI) that takes well under a minute for mgpu alone
    #[arg(long)]
    quick: bool,
    /// Do not build the release binaries (`scripts/build-release.sh`) first
    #[arg(long)]
    no_build: bool,
    /// Exit with an error when a scenario failed (a lost job, a job that never ran...): for
    /// CI's smoke run. Times are never judged
    #[arg(long)]
    strict: bool,
    /// Also measure task-spooler (`tsp`; installed with apt-get when missing, as root)
    #[arg(long)]
    vs_tsp: bool,
    /// Also measure a real Slurm started with the shared start.sh (needs root)
    #[arg(long)]
    vs_slurm: bool,
    /// Do not measure mgpu itself (only the --vs-* systems)
    #[arg(long)]
    skip_mgpu: bool,
    /// Scenarios to run, of: latency, submit, throughput, dispatch, scale [default: all]
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    only: Option<Vec<Scenario>>,
    /// Repository root [default: the one this binary was built from]
    #[arg(long, value_name = "DIR")]
    repo: Option<PathBuf>,
    /// Where the mgpu binaries are [default: REPO/target/dist, as scripts/build-release.sh
    /// leaves them]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Directory with Slurm's start.sh/stop.sh [default: REPO/../shared/slurm]
    #[arg(long, value_name = "DIR")]
    slurm_scripts: Option<PathBuf>,
    /// Record each mgpu scenario system-wide with `perf record -a -g` into DIR/SCENARIO.data
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Keep mgpu's run directories in its state directory on disk (the server's default)
    /// instead of on a tmpfs (as the systemd unit has them)
    #[arg(long)]
    disk_run_dir: bool,
    /// Keep the scratch directory (server log, state, job files) and print where it is
    #[arg(long)]
    keep_tmp: bool,
    /// Runs of srun true [default: 50; quick: 10]
    #[arg(long, value_name = "N")]
    latency_runs: Option<usize>,
    /// Jobs per submit measurement [default: 1000; quick: 100]
    #[arg(long, value_name = "N")]
    submit_jobs: Option<usize>,
    /// Concurrent clients for the parallel submit and fill measurements
    #[arg(long, value_name = "N", default_value_t = 16)]
    clients: usize,
    /// Trivial jobs for the throughput measurement [default: 1000; quick: 100]
    #[arg(long, value_name = "N")]
    throughput_jobs: Option<usize>,
    /// Job pairs for the dispatch latency [default: 50; quick: 5]
    #[arg(long, value_name = "N")]
    dispatch_pairs: Option<usize>,
    /// Pending jobs for the scale measurement of mgpu [default: 100000; quick: 2000]
    #[arg(long, value_name = "N")]
    scale_jobs: Option<usize>,
    /// Pending jobs for the scale measurement of Slurm [default: 10000; quick: 200]
    #[arg(long, value_name = "N")]
    scale_jobs_others: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Latency,
    Submit,
    Throughput,
    Dispatch,
    Scale,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Stamp { sleep_ms, file }) => stamp(sleep_ms, &file),
        Some(Cmd::TouchTask { dir, var }) => touch_task(&dir, &var),
        None => bench(cli.opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mgpu-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The job side of the array throughput measurement.
fn touch_task(dir: &Path, var: &str) -> Result<()> {
    let index = std::env::var(var).with_context(|| format!("{var} is not set"))?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        anyhow::bail!("{var}={index:?} is not an index");
    }
    std::fs::File::create(dir.join(index))?;
    Ok(())
}

/// The job side of the dispatch measurement: the time is written atomically (tmp + rename).
fn stamp(sleep_ms: u64, file: &Path) -> Result<()> {
    std::thread::sleep(Duration::from_millis(sleep_ms));
    let ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, ns.to_string())?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

impl Opts {
    fn counts(&self) -> Counts {
        let q = self.quick;
        let pick =
            |o: Option<usize>, full: usize, quick: usize| o.unwrap_or(if q { quick } else { full });
        Counts {
            latency_runs: pick(self.latency_runs, 50, 10),
            submit_jobs: pick(self.submit_jobs, 1000, 100),
            clients: self.clients,
            throughput_jobs: pick(self.throughput_jobs, 1000, 100),
            dispatch_pairs: pick(self.dispatch_pairs, 50, 5),
            scale_jobs: pick(self.scale_jobs, 100_000, 2000),
            scale_jobs_others: pick(self.scale_jobs_others, 10_000, 200),
            scale_probes: if q { 20 } else { 200 },
        }
    }

    fn wants(&self, s: Scenario) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&s))
    }
}

/// `perf record -a -g` running while a scenario runs; stopped with SIGINT on drop.
struct Perf(Option<Child>);

impl Perf {
    fn start(dir: Option<&Path>, name: &str) -> Result<Perf> {
        let Some(dir) = dir else {
            return Ok(Perf(None));
        };
        std::fs::create_dir_all(dir)?;
        let child = Command::new("perf")
            .args(["record", "-a", "-g", "-o"])
            .arg(dir.join(format!("{name}.data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(Perf(Some(child)))
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            util::kill(c.id(), libc::SIGINT);
            let _ = c.wait();
        }
    }
}

/// Runs the chosen scenarios on one system; a failed scenario is noted and the rest go on.
fn run_all(
    sys: &dyn System,
    opts: &Opts,
    counts: &Counts,
    ctx: &Ctx,
    scale_jobs: Option<usize>,
    notes: &mut Vec<String>,
) -> Metrics {
    let mut m = Metrics::new();
    let perf_dir = if sys.name() == "mgpu" {
        opts.perf.as_deref()
    } else {
        None
    };
    let step = |s: Scenario, notes: &mut Vec<String>, m: &mut Metrics| {
        if !opts.wants(s) {
            return;
        }
        let name = format!("{s:?}").to_lowercase();
        eprintln!("mgpu-bench: {}: {name}", sys.name());
        let _perf = match Perf::start(perf_dir, &name) {
            Ok(p) => p,
            Err(e) => {
                notes.push(format!("perf: {e:#}"));
                Perf(None)
            }
        };
        let cpu_before = util::cpu_times();
        let r = match s {
            Scenario::Latency => scenarios::latency(sys, counts.latency_runs, m),
            Scenario::Submit => scenarios::spawn_floor(counts.submit_jobs, m)
                .and_then(|_| scenarios::submit(sys, counts.submit_jobs, counts.clients, m, notes)),
            Scenario::Throughput => scenarios::throughput(sys, ctx, counts.throughput_jobs, m)
                .and_then(|_| scenarios::throughput_array(sys, ctx, counts.throughput_jobs, m)),
            Scenario::Dispatch => scenarios::dispatch(sys, ctx, counts.dispatch_pairs, m),
            Scenario::Scale => match scale_jobs {
                Some(n) => scenarios::scale(sys, n, counts.scale_probes, counts.clients, m),
                None => {
                    notes.push(format!(
                        "{}: scale not run (every queued job is a waiting client process; the queue is capped near 1,000)",
                        sys.name()
                    ));
                    Ok(())
                }
            },
        };
        // Hypervisor steal: on a shared VM, the tail latencies move with it.
        if let (
            Some(before),
            Some(after),
            Scenario::Latency | Scenario::Throughput | Scenario::Dispatch,
        ) = (cpu_before, util::cpu_times(), s)
        {
            m.insert(format!("{name}_steal_pct"), after.steal_pct_since(&before));
        }
        if let Err(e) = r {
            eprintln!("mgpu-bench: {}: {name} failed: {e:#}", sys.name());
            notes.push(format!("{}: {name} failed: {e:#}", sys.name()));
            if let Err(e) = sys.reset() {
                notes.push(format!(
                    "{}: could not empty the queue afterwards: {e:#}",
                    sys.name()
                ));
            }
        }
    };
    for s in [
        Scenario::Latency,
        Scenario::Submit,
        Scenario::Throughput,
        Scenario::Dispatch,
        Scenario::Scale,
    ] {
        step(s, notes, &mut m);
    }
    m
}

fn ensure_tsp() -> Result<()> {
    if Command::new("tsp").arg("-V").output().is_ok() {
        return Ok(());
    }
    eprintln!("mgpu-bench: installing task-spooler with apt-get");
    util::run_ok(Command::new("apt-get").args(["update", "-qq"]))?;
    util::run_ok(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "task-spooler",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

fn bench(opts: Opts) -> Result<()> {
    let repo = match &opts.repo {
        Some(r) => r.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    };
    let repo = repo
        .canonicalize()
        .with_context(|| format!("repository {}", repo.display()))?;
    let bin_dir = opts
        .bin_dir
        .clone()
        .unwrap_or_else(|| repo.join("target/dist"));
    let counts = opts.counts();
    let tmp = tempfile::Builder::new().prefix("mgpu-bench.").tempdir()?;
    let ctx = Ctx {
        exe: std::env::current_exe()?,
        work: tmp.path().to_path_buf(),
    };
    let mut notes = Vec::new();
    let mut results = Vec::new();

    if !opts.skip_mgpu {
        if !opts.no_build {
            mgpu::build_release(&repo)?;
        }
        let dir = tmp.path().join("mgpu");
        std::fs::create_dir_all(&dir)?;
        eprintln!("mgpu-bench: starting mgpu_scheduler_server --simulate-gpus 8x80GiB");
        let sys = mgpu::Mgpu::start(&bin_dir, &dir, opts.disk_run_dir)?;
        let m = run_all(
            &sys,
            &opts,
            &counts,
            &ctx,
            Some(counts.scale_jobs),
            &mut notes,
        );
        eprintln!("mgpu-bench: mgpu daemon pid {} stopping", sys.pid());
        if let Err(e) = sys.stop() {
            notes.push(format!("mgpu: {e:#}"));
        }
        results.push(SystemResult {
            name: "mgpu".into(),
            metrics: m,
        });
    }

    if opts.vs_tsp {
        match ensure_tsp().and_then(|_| tsp::Tsp::start(tmp.path())) {
            Ok(sys) => {
                let m = run_all(&sys, &opts, &counts, &ctx, None, &mut notes);
                sys.stop();
                results.push(SystemResult {
                    name: "tsp".into(),
                    metrics: m,
                });
            }
            Err(e) => notes.push(format!("tsp: not measured: {e:#}")),
        }
    }

    if opts.vs_slurm {
        let scripts = opts
            .slurm_scripts
            .clone()
            .unwrap_or_else(|| repo.join("../shared/slurm"));
        let dir = tmp.path().join("slurm");
        match slurm::Slurm::start(&scripts, &dir, &tmp.path().join("slurm-out")) {
            Ok(sys) => {
                if !sys.has_json() {
                    notes.push(
                        "slurm: squeue --json is not available; plain squeue was timed".into(),
                    );
                }
                let m = run_all(
                    &sys,
                    &opts,
                    &counts,
                    &ctx,
                    Some(counts.scale_jobs_others),
                    &mut notes,
                );
                let _ = sys.reset();
                if let Err(e) = sys.stop() {
                    notes.push(format!("slurm: stopping: {e:#}"));
                }
                results.push(SystemResult {
                    name: "slurm".into(),
                    metrics: m,
                });
            }
            Err(e) => {
                let _ = Command::new(scripts.join("stop.sh")).arg(&dir).output();
                notes.push(format!("slurm: not measured: {e:#}"));
            }
        }
    }

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let config = json!({
        "counts": counts,
        "quick": opts.quick,
        "cpus": cpus,
        "gpus": "8x80GiB (simulated for mgpu; fake gres for Slurm; 8 slots for tsp)",
    });
    let doc = serde_json::to_string_pretty(&results::to_json(&results, config, &notes))?;
    if let Some(f) = &opts.json_out {
        std::fs::write(f, format!("{doc}\n"))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    if opts.json {
        println!("{doc}");
    } else {
        let header = format!(
            "mgpu-bench on {cpus} CPUs; counts: {}",
            serde_json::to_string(&counts)?
        );
        print!("{}", results::render(&results, &header));
        for n in &notes {
            println!("note: {n}");
        }
    }
    if opts.keep_tmp {
        let kept = tmp.keep();
        eprintln!("mgpu-bench: scratch kept in {}", kept.display());
    }
    // Failed scenarios are the notes that say so (see `run_all`).
    let failed = notes.iter().filter(|n| n.contains(" failed: ")).count();
    if opts.strict && failed > 0 {
        anyhow::bail!("{failed} scenario(s) failed (see the notes above)");
    }
    Ok(())
}
