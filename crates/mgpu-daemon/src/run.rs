//! Command line, startup (directories, store recovery, GPUs, socket) and shutdown.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mgpu_core::{Config, FairKnob, FairShareConfig, JobId, MemoryAction, Policy};
use nix::fcntl::{Flock, FlockArg};

use crate::gpu::{self, GpuBackend};
use crate::recovery::{self, RunProbe};
use crate::state::{now_ms, Daemon, Settings};
use crate::store::Store;
use crate::supervisor::StopReason;
use crate::{server, supervisor, users};

/// The mgpu GPU job scheduler daemon.
///
/// As root it serves every user of the machine and runs each job as its submitter; as an
/// ordinary user it serves only that user.
#[derive(Debug, Parser)]
#[command(name = "mgpu_scheduler_server", version)]
pub struct Args {
    /// UNIX socket to listen on [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock as root
    /// (/run/mgpu is created 0755 if missing, and refused if it is a link or someone else's),
    /// $XDG_RUNTIME_DIR/mgpu/mgpu.sock otherwise]. Its directory must belong to root or the
    /// server's user, and be sticky if others may write to it.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Global cap on every job's time slice, in seconds (0: no cap)
    #[arg(long, value_name = "SECS")]
    pub max_job_time: Option<u64>,
    /// No job is context-switched before it has run this long, whatever its time limit: a
    /// switch stops a job and restarts it later, so this bounds how often that can happen
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub min_slice: u64,
    /// A blocked job gets the reservation (GPUs held for it, others start only if they do
    /// not delay it) only once it has waited this long, in seconds; until then jobs start
    /// first-fit (0: at once, plain EASY backfilling)
    #[arg(long, value_name = "SECS", default_value_t = 7200)]
    pub reserve_after: u64,
    /// ... and only once it has waited this many times longer than jobs wait of late (all
    /// users', or its own user's, whichever is less): starving, not merely waiting in a busy
    /// queue (0: no such condition)
    #[arg(long, value_name = "F", default_value_t = Config::default().reserve_after_wait_factor)]
    pub reserve_after_wait_factor: f64,
    /// Context switches allowed to a job that sets no --max-restarts of its own: past them it
    /// ends as TIMEOUT at its time limit instead of restarting from its command once more
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub max_restarts: u32,
    /// Where the job database lives [default: /var/lib/mgpu as root, else
    /// $XDG_STATE_HOME/mgpu, i.e. ~/.local/state/mgpu]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where running jobs keep their run directories (supervisor sockets, launch and exit
    /// records). They must outlive server restarts but not reboots, so a tmpfs is best and
    /// cheapest. Keep it the same across restarts [default: /run/mgpu/runs as root with state
    /// in /var/lib/mgpu, else STATE_DIR/runs]
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Where job logs are kept [default: /var/log/mgpu as root with state in /var/lib/mgpu,
    /// else STATE_DIR/logs; ~/.mgpu/logs of the server's user where an earlier release left
    /// them]
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Use simulated GPUs instead of NVML, e.g. 4x24GiB or 2x80GiB,2x24GiB
    #[arg(long, value_name = "SPEC")]
    pub simulate_gpus: Option<String>,
    /// Load NVML from this library instead of libnvidia-ml.so.1 (e.g. a driver installed
    /// elsewhere, or the test suite's fake NVML)
    #[arg(long, value_name = "PATH", conflicts_with = "simulate_gpus")]
    pub nvml_lib: Option<PathBuf>,
    /// Manage only these GPU indices, e.g. 0,2
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub gpus: Option<Vec<u32>>,
    /// Seconds between SIGTERM and SIGKILL when a running job is stopped
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub grace_period: u64,
    /// What happens to a job (with --mem) that uses more GPU memory than it reserved, on a GPU
    /// it shares with other jobs: kill (stopped as OUT_OF_MEMORY before it can crash its
    /// neighbours with out-of-memory), warn (logged and told its mgpu_srun), off. Whatever the
    /// policy, placement charges such a job what it really uses (NVML)
    #[arg(long, value_name = "POLICY", default_value = "kill", value_parser = parse_enforce)]
    pub gpu_mem_enforce: GpuMemEnforce,
    /// How long a job may stay over its GPU memory reservation on a shared GPU before it is
    /// stopped (seconds; memory is re-read every 0.5 s): rides out a short spike
    #[arg(long, value_name = "SECS", default_value_t = 2.0, value_parser = parse_tolerance)]
    pub gpu_mem_tolerance: f64,
    /// Output kept per job (all its runs together), in MiB (more is discarded, with a note in
    /// the log); 0: no limit
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub max_log_size: u64,
    /// Job logs kept per user: past it, that user's oldest logs of finished jobs are removed
    /// (their records stay), and a running job's further output is discarded. Bytes with an
    /// optional K, M, G or T suffix, or a percentage of the log directory's file system; 0: no
    /// limit
    #[arg(long, value_name = "SIZE", default_value = "5%")]
    pub log_quota_per_user: String,
    /// Job logs kept in all (as --log-quota-per-user, over everyone's logs)
    #[arg(long, value_name = "SIZE", default_value = "25%")]
    pub log_quota: String,
    /// Most bytes of launch records (command, environment) one user's waiting and running jobs
    /// may take in the job database (a job array counts once); 0: no limit
    #[arg(long, value_name = "SIZE", default_value = "2G")]
    pub max_launch_data_per_user: String,
    /// Most bytes of launch records all users' waiting and running jobs may take together
    /// (a size, or a percentage of the state directory's file system); 0: no limit
    #[arg(long, value_name = "SIZE", default_value = "25%")]
    pub max_launch_data: String,
    /// Scheduling policy: fair (fair-share priority + backfill), backfill (FIFO priority +
    /// backfill) or fifo (first-come first-served among jobs that fit)
    #[arg(long, value_name = "POLICY", default_value = "fair", value_parser = parse_policy)]
    pub policy: Policy,
    /// Fair share: recent GPU usage counts half after this many hours
    #[arg(long, value_name = "HOURS", default_value_t = 24.0)]
    pub fair_half_life: f64,
    /// Fair share: weight of a user (repeatable), e.g. alice=2 (charged half as much)
    #[arg(long = "user-weight", value_name = "NAME=W", value_parser = parse_weight)]
    pub user_weights: Vec<(String, f64)>,
    /// Assumed run time of jobs without a time limit, for reservations (seconds)
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub default_estimate: u64,
    /// Shortest first: hours of priority a job loses per doubling of its expected run time
    /// (its time limit scaled by how much of their limits its user's jobs use, else its learned
    /// estimate, else the typical recent run), counted from a minute; 0: first come, first
    /// served within a user (fair policy)
    #[arg(long, value_name = "HOURS", default_value_t = FairShareConfig::default().size_weight_h)]
    pub size_weight: f64,
    /// Replaced by --size-weight (a linear factor): ignored with a warning saying so
    #[arg(long, value_name = "F", hide = true)]
    pub size_factor: Option<f64>,
    /// Estimate a job without a time limit at --default-estimate, not from its user's recent
    /// finished runs
    #[arg(long)]
    pub no_learned_estimates: bool,
    /// Fair share: seconds of priority a user's job loses per second of (decayed) use of the
    /// whole machine
    #[arg(long, value_name = "F", default_value_t = FairShareConfig::default().usage_factor)]
    pub fair_usage_factor: f64,
    /// Fair share: seconds of priority a job gains per second it waits (more than 0: waiting
    /// is what keeps a job from starving)
    #[arg(long, value_name = "F", default_value_t = FairShareConfig::default().age_factor)]
    pub fair_age_factor: f64,
    /// Fair share: a blocked job of a user whose usage is below this fraction of the mean of
    /// the users waiting or running gets the reservation at once, without waiting to be
    /// starved (0: off)
    #[arg(long, value_name = "F", default_value_t = FairShareConfig::default().reserve_below_share)]
    pub reserve_below_share: f64,
    /// Fair share: a user whose waiting jobs outnumber all other users' waiting jobs together
    /// this many times floods the queue, and the other users' blocked jobs get the reservation
    /// at once (0: off; else at least 1)
    #[arg(long, value_name = "F", default_value_t = FairShareConfig::default().flood_factor)]
    pub flood_factor: f64,
    /// Seconds an attached mgpu_srun has to reconnect after a server restart before its job
    /// is cancelled (as if it had died)
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub reattach_window: u64,
    /// Days to keep records (and logs) of finished jobs
    #[arg(long, value_name = "DAYS", default_value_t = 90)]
    pub retention_days: u64,
    /// Finished jobs' records (and logs) kept per user at most, the oldest going first, checked
    /// every 10 minutes: however many jobs a user submits and cancels, the database stays
    /// bounded (0: no bound but --retention-days)
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub max_finished_per_user: u64,
    /// Most jobs one user may have waiting (a job array counts each task)
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub max_pending_per_user: usize,
    /// Most jobs waiting in all
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub max_pending: usize,
    /// Most processes (and threads) one job may have at once (its cgroup's pids.max): bounds a
    /// fork bomb; 0: no limit
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub job_pids_max: u64,
    /// Most processes (and threads) of one user's jobs together (pids.max of the user's parent
    /// cgroup): one user cannot take the machine's pids from everyone [default: a quarter of
    /// kernel.pid_max, at least --job-pids-max]; 0: no limit
    #[arg(long, value_name = "N")]
    pub user_pids_max: Option<u64>,
    /// CPUs a job gets when it does not ask (mgpu_srun --cpus) [default: no limit]
    #[arg(long, value_name = "N")]
    pub default_cpus: Option<u32>,
    /// Most CPUs a job may ask for; more is refused at submit
    #[arg(long, value_name = "N")]
    pub max_cpus: Option<u32>,
    /// Host memory a job gets when it does not ask (mgpu_srun --host-mem), MiB or with a unit
    /// (16G); a job over it is killed and ends as OUT_OF_MEMORY [default: no limit]
    #[arg(long, value_name = "SIZE", value_parser = mgpu_proto::parse_mem_mib)]
    pub default_host_mem: Option<u64>,
    /// Most host memory a job may ask for; more is refused at submit
    #[arg(long, value_name = "SIZE", value_parser = mgpu_proto::parse_mem_mib)]
    pub max_host_mem: Option<u64>,
    /// Where pam_limits' configuration is (limits.conf and limits.d/*.conf): jobs get the
    /// resource limits a login of their user gets
    #[arg(long, value_name = "DIR", default_value = "/etc/security")]
    pub limits_conf_dir: PathBuf,
    /// Serve Prometheus metrics on GET /metrics at this address: a port (9464: on 127.0.0.1)
    /// or an address and port (127.0.0.1:9464, [::1]:9464; a non-loopback address shows user
    /// names and job counts to whoever can reach it, and is logged as a warning). Names in
    /// docs/metrics.md [default: not served]
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Configuration file: any option above can be set there (its name with _ for -, e.g.
    /// max_restarts = 10), and per-user and per-group limits ([limits]); options given on the
    /// command line beat it. Missing is fine for the default, an error for a file named here.
    /// As root, refused if it is a link, not root's or writable by others. SIGHUP re-reads it
    /// [default: /etc/mgpu/mgpu.toml]
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file and command line), print it as it would be in effect, and
    /// exit: 0 when valid, 1 (with the reason) when not. Starts nothing
    #[arg(long)]
    pub check_config: bool,
    /// The mail program for mgpu_srun --mail-type (run as the job's owner, with the address
    /// as its argument and the message on stdin); when it does not exist, mail is refused at
    /// submit
    #[arg(long, value_name = "PATH", default_value = crate::notify::DEFAULT_SENDMAIL)]
    pub sendmail: PathBuf,
    /// Seconds a job's --notify command (or its mail's sendmail) may run before it is killed
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub notify_time_limit: u64,
    /// Internal: run as the supervisor of one job (started by the server itself)
    #[arg(long, value_name = "RUN_DIR", hide = true)]
    pub supervise: Option<PathBuf>,
    /// Internal: with --supervise, the attempt the supervisor is started for
    #[arg(long, value_name = "ID", hide = true, requires = "supervise")]
    pub launch_id: Option<u64>,
    /// Internal: run as the supervisor launcher (started by the server itself)
    #[arg(long, hide = true)]
    pub launcher: bool,
}

pub fn main() -> ExitCode {
    // Before anything raises a limit: jobs start from the limits the daemon was given.
    crate::userlimits::record_inherited();
    // Whatever the daemon, its launcher and supervisors create is private unless made
    // otherwise on purpose (the database and launch records hold users' environments).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = Args::parse();
    if let Some(run_dir) = &args.supervise {
        return supervisor::main(run_dir, args.launch_id);
    }
    if args.launcher {
        // Before anything starts a thread: the launcher forks and must be single-threaded.
        return crate::launcher::main();
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MGPU_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    if args.check_config {
        return match crate::config::load(&argv).and_then(|l| check_options(&l.args).map(|_| l)) {
            Ok(loaded) => {
                for w in &loaded.warnings {
                    eprintln!("mgpu_scheduler_server: warning: {w}");
                }
                print!("{}", loaded.render());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mgpu_scheduler_server: invalid configuration: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let loaded = match crate::config::load(&argv) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("mgpu_scheduler_server: invalid configuration: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("configuration: {w}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mgpu_scheduler_server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(loaded, argv)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("mgpu_scheduler_server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn home_of_self() -> Result<PathBuf> {
    let uid = nix::unistd::geteuid().as_raw();
    Ok(users::account(uid)?.home)
}

fn default_state_dir(root: bool) -> Result<PathBuf> {
    if root {
        return Ok(crate::layout::ROOT_STATE_DIR.into());
    }
    Ok(crate::layout::default_state_dir(root, &home_of_self()?))
}

/// A directory chosen by [`crate::layout`], its note (an earlier release's location still in
/// use) logged.
fn chosen_dir(c: crate::layout::Chosen) -> PathBuf {
    if let Some(note) = &c.note {
        tracing::warn!("{note}");
    }
    c.dir
}

/// Takes the exclusive lock of `dir` (its file `name`) for as long as the result lives.
fn lock_dir(dir: &Path, name: &str, what: &str) -> Result<Flock<std::fs::File>> {
    let dir_fd = crate::safe_fs::checked_dir(dir, crate::safe_fs::Want::Private, what)?;
    let lock_file = crate::safe_fs::open_private_file(&dir_fd, name, true)
        .with_context(|| format!("cannot open {}/{name}", dir.display()))?
        .expect("created");
    Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|_| anyhow::anyhow!("another mgpu server is using the {what} {}", dir.display()))
}

/// Creates `dir` (mode 0700) if needed and checks that it, and every directory on its way, is
/// safe from planted links and other users (see [`crate::safe_fs`]); makes it private.
fn private_dir(dir: &Path, what: &str) -> Result<()> {
    crate::safe_fs::checked_dir(dir, crate::safe_fs::Want::Private, what)?;
    Ok(())
}

/// The socket's directory: the default one is created (0755 for a root server, so that every
/// user can reach it; 0700 for a single-user server) and must be ours; a directory named with
/// `--socket` must belong to root or us and be sticky if others may write to it (then anyone
/// could take the path while no server runs: said in the log).
fn check_socket_dir(socket: &Path, default: bool) -> Result<()> {
    use crate::safe_fs::{checked_dir, Want};
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let want = match (default, nix::unistd::geteuid().is_root()) {
        (true, true) => Want::Shared,
        (true, false) => Want::Private,
        (false, _) => Want::Existing,
    };
    let fd = checked_dir(dir, want, "socket directory")?;
    let st = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
    if st.st_mode & 0o002 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            "the socket's directory is writable by everyone: anyone can take the path while no server runs (the default, /run/mgpu, is safe)"
        );
    }
    Ok(())
}

fn gpu_backend(args: &Args) -> Result<Box<dyn GpuBackend>> {
    let only: Option<HashSet<u32>> = args.gpus.as_ref().map(|g| g.iter().copied().collect());
    if let Some(spec) = &args.simulate_gpus {
        let mems = gpu::parse_sim_spec(spec)?;
        let sim = gpu::Simulated::new(&mems);
        if let Some(only) = &only {
            let all: Vec<u64> = mems
                .iter()
                .enumerate()
                .filter(|(i, _)| only.contains(&(*i as u32)))
                .map(|(_, m)| *m)
                .collect();
            if all.len() != only.len() {
                bail!("--gpus names GPUs that --simulate-gpus does not have");
            }
            // Keep the original indices.
            return Ok(Box::new(gpu::Simulated::with_indices(
                mems.iter()
                    .enumerate()
                    .filter(|(i, _)| only.contains(&(*i as u32)))
                    .map(|(i, m)| (i as u32, *m))
                    .collect(),
            )));
        }
        return Ok(Box::new(sim));
    }
    match gpu::Nvml::open(only.as_ref(), args.nvml_lib.as_deref()) {
        Ok(n) => {
            if n.gpus().is_empty() {
                bail!("NVML found no GPUs to manage; use --simulate-gpus 4x24GiB to run on simulated GPUs");
            }
            Ok(Box::new(n))
        }
        Err(e) => bail!(
            "{e:#}. No NVIDIA GPUs are usable here; to run on simulated GPUs pass e.g. --simulate-gpus 4x24GiB"
        ),
    }
}

/// What to do about a job over its GPU memory reservation on a shared GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuMemEnforce {
    Kill,
    Warn,
    Off,
}

fn parse_enforce(s: &str) -> Result<GpuMemEnforce, String> {
    match s {
        "kill" => Ok(GpuMemEnforce::Kill),
        "warn" => Ok(GpuMemEnforce::Warn),
        "off" => Ok(GpuMemEnforce::Off),
        _ => Err(format!("unknown policy '{s}': use kill, warn or off")),
    }
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if (0.0..=86_400.0).contains(&t) => Ok(t),
        _ => Err(format!("invalid tolerance '{s}': seconds from 0 to 86400")),
    }
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    Policy::parse(s).ok_or_else(|| format!("unknown policy '{s}': use fair, backfill or fifo"))
}

fn parse_weight(s: &str) -> Result<(String, f64), String> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid weight '{s}': use NAME=WEIGHT, e.g. alice=2"))?;
    let w: f64 = w
        .parse()
        .map_err(|_| format!("invalid weight '{s}': WEIGHT must be a number"))?;
    if w.is_nan() || w <= 0.0 || w.is_infinite() {
        return Err(format!("invalid weight '{s}': WEIGHT must be positive"));
    }
    Ok((name.to_string(), w))
}

/// Raises the open-files limit to the hard limit: every connection and job link is a descriptor.
/// (Jobs and notifications do not inherit it: they get a login's limits, from those recorded
/// before this, see `userlimits`.) Says so when even the hard limit is low.
fn raise_fd_limit() {
    /// Below this the daemon may run out of descriptors on a busy server.
    const LOW: u64 = 16_384;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            }
        }
    }
    #[allow(clippy::unnecessary_cast)]
    let soft = lim.rlim_cur as u64;
    if soft < LOW {
        tracing::warn!(
            limit = soft,
            "the open-files limit is low for a busy server (each connection and running job \
             takes descriptors); raise its hard limit (systemd: LimitNOFILE)"
        );
    }
}

/// The scheduler core's configuration from the options: what a reload may change.
pub(crate) fn core_config(args: &Args) -> Result<Config> {
    let mut config = Config {
        max_job_time_s: args.max_job_time,
        min_slice_s: args.min_slice,
        default_max_restarts: Some(args.max_restarts),
        reserve_after_s: args.reserve_after,
        reserve_after_wait_factor: args.reserve_after_wait_factor,
        policy: args.policy,
        default_estimate_s: args.default_estimate,
        ..Config::default()
    };
    if !args.reserve_after_wait_factor.is_finite() || args.reserve_after_wait_factor < 0.0 {
        bail!("--reserve-after-wait-factor must be a number of 0 or more");
    }
    if args.fair_half_life.is_nan() || args.fair_half_life <= 0.0 {
        bail!("--fair-half-life must be positive");
    }
    config.fair.half_life_s = (args.fair_half_life * 3600.0).round().max(1.0) as u64;
    for (flag, knob, value) in [
        ("--size-weight", FairKnob::SizeWeight, args.size_weight),
        (
            "--fair-usage-factor",
            FairKnob::UsageFactor,
            args.fair_usage_factor,
        ),
        (
            "--fair-age-factor",
            FairKnob::AgeFactor,
            args.fair_age_factor,
        ),
        (
            "--reserve-below-share",
            FairKnob::ReserveBelowShare,
            args.reserve_below_share,
        ),
        ("--flood-factor", FairKnob::FloodFactor, args.flood_factor),
    ] {
        if let Err(allowed) = knob.check(value) {
            bail!("{flag} must be {allowed}, not {value}");
        }
    }
    config.fair.size_weight_h = args.size_weight;
    config.fair.usage_factor = args.fair_usage_factor;
    config.fair.age_factor = args.fair_age_factor;
    config.fair.reserve_below_share = args.reserve_below_share;
    config.fair.flood_factor = args.flood_factor;
    config.learn_estimates = !args.no_learned_estimates;
    for (name, weight) in &args.user_weights {
        let uid = users::uid_of(name)
            .ok_or_else(|| anyhow::anyhow!("--user-weight: no such user: {name}"))?;
        config.fair.user_weights.insert(uid, *weight);
    }
    Ok(config)
}

/// What `--check-config` checks beyond the parser, without starting anything: what the
/// server checks of its options before it touches GPUs or directories.
fn check_options(args: &Args) -> Result<()> {
    core_config(args)?;
    job_limit_settings(args)
        .check()
        .map_err(anyhow::Error::msg)?;
    for (flag, value) in [
        ("--log-quota-per-user", &args.log_quota_per_user),
        ("--log-quota", &args.log_quota),
        ("--max-launch-data-per-user", &args.max_launch_data_per_user),
        ("--max-launch-data", &args.max_launch_data),
    ] {
        crate::logquota::parse_size(value, 1 << 40).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
    }
    Ok(())
}

fn job_limit_settings(args: &Args) -> crate::cgroup::LimitSettings {
    let pids_max = (args.job_pids_max > 0).then_some(args.job_pids_max);
    crate::cgroup::LimitSettings {
        pids_max,
        user_pids_max: match args.user_pids_max {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some(crate::cgroup::default_user_pids_max(pids_max)),
        },
        default_cpus: args.default_cpus,
        max_cpus: args.max_cpus,
        default_host_mem_mib: args.default_host_mem,
        max_host_mem_mib: args.max_host_mem,
    }
}

/// Re-reads the configuration on every SIGHUP and applies what can change live (see
/// [`crate::config`]); an invalid one changes nothing.
async fn reload_on_sighup(
    daemon: Arc<Daemon>,
    argv: Vec<std::ffi::OsString>,
    mut current: crate::config::Loaded,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        let read = crate::config::load(&argv).and_then(|l| core_config(&l.args).map(|c| (l, c)));
        let (mut new, mut config) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(
                    "SIGHUP: the configuration is invalid, keeping the one in effect: {e:#}"
                );
                continue;
            }
        };
        for w in &new.warnings {
            tracing::warn!("configuration: {w}");
        }
        let changes = current.changes(&new);
        if changes.iter().any(|c| c.3) {
            // Accounts are looked up off the lock; users new since are looked up under it.
            let uids = daemon.lock().sched.uids();
            let resolved: HashMap<u32, mgpu_core::UserLimits> = uids
                .into_iter()
                .map(|uid| (uid, new.limits.resolve_uid(uid).running))
                .collect();
            let mut inner = daemon.lock();
            for uid in inner.sched.uids() {
                let limits = match resolved.get(&uid) {
                    Some(l) => *l,
                    None => new.limits.resolve_uid(uid).running,
                };
                if !limits.is_unlimited() {
                    config.user_limits.insert(uid, limits);
                }
            }
            inner.sched.reconfigure(config);
            inner.limits = Arc::new(new.limits.clone());
            daemon.schedule(&mut inner);
        }
        for (key, old, now, live) in &changes {
            if *live {
                tracing::info!("config reloaded: {key} {old} -> {now}");
            } else {
                tracing::warn!(
                    "config reloaded: {key} {old} -> {now} needs a restart; {old} stays in effect until then"
                );
            }
        }
        if changes.is_empty() {
            tracing::info!("config reloaded: no changes");
        }
        current.keep_restart_only(&mut new);
        current = new;
    }
}

async fn run(loaded: crate::config::Loaded, argv: Vec<std::ffi::OsString>) -> Result<()> {
    let args = &loaded.args;
    raise_fd_limit();
    let euid = nix::unistd::geteuid().as_raw();
    let multi_user = euid == 0;
    let socket = mgpu_proto::server_socket(args.socket.as_deref(), euid);
    check_socket_dir(
        &socket,
        mgpu_proto::explicit_socket(args.socket.as_deref()).is_none(),
    )?;
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir(multi_user)?,
    };
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => chosen_dir(crate::layout::default_log_dir(
            multi_user,
            &state_dir,
            &home_of_self()?,
        )),
    };
    private_dir(&state_dir, "state directory")?;
    private_dir(&log_dir, "log directory")?;
    // One server per state directory.
    let _lock = lock_dir(&state_dir, "lock", "state directory")?;

    let job_limits = job_limit_settings(args);
    job_limits.check().map_err(anyhow::Error::msg)?;
    // Before the launcher starts: it (and every supervisor) finds job cgroups as set up here.
    let unenforced = crate::cgroup::setup();
    if !unenforced.is_empty() {
        let names: Vec<&str> = unenforced.iter().map(|c| c.name()).collect();
        tracing::warn!(
            "job limits not enforced on this machine (no usable cgroup controller): {} (pids: \
             --job-pids-max; memory: --host-mem; cpu: --cpus)",
            names.join(", ")
        );
    }

    let fs_bytes = nix::sys::statvfs::statvfs(&log_dir)
        .map(|v| v.blocks().saturating_mul(v.fragment_size()))
        .with_context(|| format!("reading the size of {}", log_dir.display()))?;
    let quota = |flag: &str, value: &str| {
        crate::logquota::parse_size(value, fs_bytes).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let log_quota_per_user = quota("--log-quota-per-user", &args.log_quota_per_user)?;
    let log_quota = quota("--log-quota", &args.log_quota)?;
    let max_launch_data_per_user =
        quota("--max-launch-data-per-user", &args.max_launch_data_per_user)?;
    let state_fs_bytes = nix::sys::statvfs::statvfs(&state_dir)
        .map(|v| v.blocks().saturating_mul(v.fragment_size()))
        .with_context(|| format!("reading the size of {}", state_dir.display()))?;
    let max_launch_data = crate::logquota::parse_size(&args.max_launch_data, state_fs_bytes)
        .map_err(|e| anyhow::anyhow!("--max-launch-data: {e}"))?;
    let backend = gpu_backend(args)?;
    let gpus = backend.gpus();
    let (store, mut recovered) = Store::open(&state_dir)?;
    let config = core_config(args)?;
    let runs_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => chosen_dir(crate::layout::default_run_dir(multi_user, &state_dir)),
    };
    private_dir(&runs_dir, "run directory")?;
    // One server per run directory too (its own lock file: it may be the state directory).
    let _runs_lock = lock_dir(&runs_dir, "runs.lock", "run directory")?;
    let live: HashSet<JobId> = recovered
        .running
        .iter()
        .chain(&recovered.pending)
        .map(|j| j.id)
        .collect();
    let held_runs = sweep_ended_runs(&runs_dir, &live);
    let probe = |id: JobId| probe_runs(&runs_dir.join(id.to_string()));
    let half_life_ms = config.fair.half_life_s * 1000;
    let drains = std::mem::take(&mut recovered.drains);
    let mut plan = recovery::recover(gpus, config, recovered, now_ms(), probe, |id| {
        store
            .target_state(id)
            .unwrap_or(mgpu_core::TargetState::Gone)
    });
    // Drains survive restarts (an administrator drains before an upgrade).
    let mut drained = crate::state::Drains::default();
    for (target, reason) in drains {
        if target == "server" {
            plan.sched.set_server_drained(true);
            drained.server = Some(reason);
        } else if let Some(i) = target.strip_prefix("gpu:").and_then(|i| i.parse().ok()) {
            if plan.sched.set_gpu_drained(i, true) {
                drained.gpus.insert(i, reason);
            } else {
                tracing::warn!(
                    gpu = i,
                    "a drained GPU is no longer managed; its drain is kept"
                );
            }
        }
    }
    // Fair share remembers recent usage across restarts: it is rebuilt from the records.
    let now = now_ms();
    let history = store.recent_runs(now.saturating_sub(10 * half_life_ms))?;
    for (uid, n, mem_mib, gpu_ids, started_at, ended_at) in &history {
        let request = mgpu_core::JobRequest {
            uid: *uid,
            gpus: *n,
            mem_mib: *mem_mib,
            ..Default::default()
        };
        plan.sched
            .charge_history(&request, gpu_ids, *started_at, *ended_at, now);
    }
    for (id, at, restarts, min_key) in &plan.requeued {
        tracing::info!(
            job = id,
            "job was context-switched while the server was down; requeued"
        );
        store.requeued(*id, *at, *restarts, *min_key);
    }
    for (id, run) in &plan.lost_runs {
        // Whatever a vanished supervisor left behind dies before its GPUs are reused.
        supervisor::kill_run_cgroup(&runs_dir.join(id.to_string()).join(format!("r{run}")));
    }
    crate::cgroup::remove_stale();
    for (id, ending) in &plan.ended {
        tracing::warn!(job = id, state = ending.state.as_str(), message = ?ending.message, "recorded the end of a job from before the restart");
        store.ended(*id, ending.clone());
    }
    let restored = plan.commands.len() - plan.adopt.len();
    // Handlers first: once the socket exists, SIGTERM or SIGINT is a clean shutdown.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let daemon = Daemon::new(
        plan.sched,
        plan.commands,
        store,
        Settings {
            log_dir: log_dir.clone(),
            runs_dir: runs_dir.clone(),
            max_log_bytes: (args.max_log_size > 0).then_some(args.max_log_size << 20),
            max_pending_per_user: args.max_pending_per_user,
            max_pending: args.max_pending,
            job_limits,
            grace: Duration::from_secs(args.grace_period),
            multi_user,
            server_uid: euid,
            limits_conf_dir: args.limits_conf_dir.clone(),
            log_quota_per_user,
            log_quota,
            max_launch_data_per_user,
            max_launch_data,
        },
    );
    {
        // Limits of the users with jobs (from the next pass on: jobs running keep running).
        let mut inner = daemon.lock();
        inner.limits = Arc::new(loaded.limits.clone());
        for uid in inner.sched.uids() {
            let limits = inner.limits.resolve_uid(uid);
            inner.sched.set_user_limits(uid, limits.running);
        }
    }
    {
        let mut launches = daemon.launches.lock().unwrap();
        for (id, uid, key, bytes) in daemon.store.launch_charges()? {
            launches.restore(uid, bytes, key, &[id]);
        }
        for (id, _) in &plan.ended {
            launches.release(*id);
        }
    }
    {
        let mut logs = daemon.logs.lock().unwrap();
        crate::logquota::restore(&mut logs, &daemon.store.log_owners()?, &|id| {
            daemon.log_path(id)
        });
        // Ends recorded just above may not be committed yet.
        for (id, ending) in &plan.ended {
            logs.finished(*id, ending.at);
        }
    }
    daemon.notifier.start(
        daemon.clone(),
        args.sendmail.clone(),
        Duration::from_secs(args.notify_time_limit.max(1)),
    );
    // Jobs that ended while no server ran are told of as any end is (`--notify`, END mail).
    for (id, ending) in &plan.ended {
        daemon.notifier.ended(&mgpu_proto::JobOutcome {
            job: *id,
            state: ending.state,
            exit_code: ending.exit_code,
            signal: ending.signal,
            message: ending.message.clone(),
        });
    }
    // Ready before the first client can connect.
    daemon.launcher.warm_up();
    // Before the socket: a port that cannot be had leaves no socket file behind.
    crate::metrics::start(&daemon, args.metrics).await?;
    let listener = server::bind(&socket)?;
    tracing::info!(
        socket = %socket.display(),
        gpus = %backend.describe(),
        state_dir = %state_dir.display(),
        run_dir = %runs_dir.display(),
        log_dir = %log_dir.display(),
        mode = if multi_user { "multi-user" } else { "single-user" },
        policy = %args.policy,
        containment = %crate::cgroup::describe(),
        restored,
        adopted = plan.adopt.len(),
        "mgpu scheduler ready"
    );
    {
        let mut inner = daemon.lock();
        inner.drains = drained;
        if inner.drains.server.is_some() || !inner.drains.gpus.is_empty() {
            tracing::warn!(server = inner.drains.server.is_some(), gpus = ?inner.drains.gpus.keys().collect::<Vec<_>>(), "drains restored: drained GPUs (or the server) start nothing new until 'mgpu_control resume'");
        }
        for (id, run) in &plan.adopt {
            tracing::info!(job = id, run, "re-adopting running job");
            daemon.adopt(&mut inner, *id, *run);
        }
        for (id, run) in &plan.finished_runs {
            daemon.forget_run_dir(*id, *run);
        }
        for (id, run) in &plan.abandoned_runs {
            let trash = daemon.job_dir(*id).join(format!("{ABANDONED_PREFIX}{run}"));
            daemon.store.after_commit(move || {
                let _ = std::fs::remove_dir_all(trash);
            });
        }
        daemon.schedule(&mut inner);
    }
    if !plan.attached.is_empty() {
        tokio::spawn(cancel_abandoned(
            daemon.clone(),
            plan.attached.clone(),
            Duration::from_secs(args.reattach_window),
        ));
    }
    for (id, run) in plan.orphaned {
        tokio::spawn(stop_orphan(daemon.run_dir(id, run), args.grace_period));
    }
    for dir in held_runs {
        tracing::warn!(dir = %dir.display(), "a supervisor still holds the run of a job recorded as ended; stopping it");
        tokio::spawn(stop_orphan(dir, args.grace_period));
    }
    let mem_policy = MemPolicy {
        enforce: args.gpu_mem_enforce,
        tolerance_ms: (args.gpu_mem_tolerance * 1000.0) as u64,
    };
    tokio::spawn(watch_gpus(daemon.clone(), backend, mem_policy));
    tokio::spawn(purge_old_records(
        daemon.clone(),
        args.retention_days,
        (args.max_finished_per_user > 0).then_some(args.max_finished_per_user),
    ));
    tokio::spawn(daemon.clone().run_timer());
    tokio::spawn(reload_on_sighup(daemon.clone(), argv, loaded, hup));

    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    server::serve(daemon.clone(), listener, shutdown).await;
    // Only our socket: never a file someone put there meanwhile.
    if std::fs::symlink_metadata(&socket).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(&socket);
    }
    daemon.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Deletes records and logs of jobs that ended more than `days` ago, and of each user's
/// finished jobs past the newest `keep_per_user`, at startup and every 10 minutes.
async fn purge_old_records(daemon: Arc<Daemon>, days: u64, keep_per_user: Option<u64>) {
    loop {
        let before = now_ms().saturating_sub(days * 86_400_000);
        match daemon.store.purge(before, keep_per_user).await {
            Ok(ids) => {
                for id in &ids {
                    let _ = std::fs::remove_file(daemon.log_path(*id));
                    daemon.logs.lock().unwrap().forget(*id);
                }
                if !ids.is_empty() {
                    tracing::info!(jobs = ids.len(), days, "purged old job records and logs");
                }
            }
            Err(e) => tracing::warn!(error = %e, "purging old job records failed"),
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

/// What a run directory abandoned at startup is renamed to (`abandoned-r{run}`): out of the
/// way of the job's next run, which uses the same name, until the requeue is committed.
pub const ABANDONED_PREFIX: &str = "abandoned-r";

/// Removes the run directories of jobs the store no longer has as pending or running (their
/// end was committed, but the server stopped before it removed them). A run a supervisor still
/// holds is left, and returned: it is told to stop.
fn sweep_ended_runs(runs_dir: &Path, live: &HashSet<JobId>) -> Vec<PathBuf> {
    let mut held = Vec::new();
    for entry in std::fs::read_dir(runs_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.parse::<JobId>().ok()) else {
            continue;
        };
        if live.contains(&id) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let job_dir = entry.path();
        let mut busy = false;
        for run in std::fs::read_dir(&job_dir).into_iter().flatten().flatten() {
            let dir = run.path();
            if supervisor::is_supervised(&dir) {
                busy = true;
                held.push(dir);
            } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the run directory of an ended job");
            }
        }
        if !busy {
            let _ = std::fs::remove_dir(&job_dir);
            tracing::debug!(job = id, "removed the run directory of an ended job");
        }
    }
    held
}

/// What a job's newest run directory says (older runs are over: they are removed).
fn probe_runs(job_dir: &Path) -> RunProbe {
    let (mut runs, mut abandoned) = (Vec::<u32>::new(), Vec::<u32>::new());
    for entry in std::fs::read_dir(job_dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix(ABANDONED_PREFIX)
            .and_then(|n| n.parse().ok())
        {
            abandoned.push(n);
        } else if let Some(n) = name.strip_prefix('r').and_then(|n| n.parse().ok()) {
            runs.push(n);
        }
    }
    runs.sort_unstable();
    let Some(&run) = runs.last() else {
        // A previous start-up abandoned the run but stopped before the requeue was committed.
        return match abandoned.iter().max() {
            Some(&run) => RunProbe::NotForked { run },
            None => RunProbe::NoRun,
        };
    };
    for old in &runs[..runs.len() - 1] {
        let _ = std::fs::remove_dir_all(job_dir.join(format!("r{old}")));
    }
    for old in &abandoned {
        let _ = std::fs::remove_dir_all(job_dir.join(format!("{ABANDONED_PREFIX}{old}")));
    }
    let dir = job_dir.join(format!("r{run}"));
    let answers =
        || std::os::unix::net::UnixStream::connect(dir.join(supervisor::SOCKET_FILE)).is_ok();
    // A supervisor still setting up (the previous server died just after starting it) holds
    // its run directory before it listens: wait for it rather than take its run for never
    // started, or for lost.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let alive = loop {
        if let Some(rec) = supervisor::read_exit(&dir) {
            return RunProbe::Exited { run, rec };
        }
        if answers() {
            break true;
        }
        if !supervisor::is_supervised(&dir) || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let launch = supervisor::read_launch(&dir);
    let alive_with = |launch: crate::exec::Launch| RunProbe::Alive {
        run,
        gpus: launch.gpus,
        started_at: launch.started_at,
    };
    if let (Some(launch), true) = (&launch, alive) {
        return alive_with(launch.clone());
    }
    if let Some(rec) = supervisor::read_exit(&dir) {
        // It finished between our looks.
        return RunProbe::Exited { run, rec };
    }
    // Never started (no `forked` mark): then it never will be, as a supervisor forked by the
    // previous server's launcher at its last moment finds our mark and stands down.
    let never_started = if dir.join(supervisor::FORKED_FILE).exists() {
        Ok(false)
    } else {
        supervisor::abandon(&dir)
    };
    match never_started {
        Ok(true) => {
            let trash = job_dir.join(format!("{ABANDONED_PREFIX}{run}"));
            if let Err(e) = std::fs::rename(&dir, &trash) {
                // Left in place: the job's next run clears it before it starts.
                tracing::warn!(dir = %dir.display(), error = %e, "cannot move an abandoned run directory aside");
            }
            RunProbe::NotForked { run }
        }
        // Started: by a supervisor that may have come up since we looked.
        Ok(false) => match (launch, answers()) {
            (Some(launch), true) => alive_with(launch),
            _ => match supervisor::read_exit(&dir) {
                Some(rec) => RunProbe::Exited { run, rec },
                None => RunProbe::Gone { run },
            },
        },
        Err(e) => {
            // Whether it started cannot be settled: it is not run again (that could run it
            // twice); it is recorded as failed, and whatever is left of it killed.
            tracing::error!(dir = %dir.display(), error = %e, "cannot mark a run that never started as abandoned");
            RunProbe::Gone { run }
        }
    }
}

/// Jobs whose attached `mgpu_srun` did not come back after a restart are cancelled, as they
/// would have been had the server seen the client die.
async fn cancel_abandoned(daemon: Arc<Daemon>, jobs: Vec<JobId>, window: Duration) {
    tokio::time::sleep(window).await;
    let mut inner = daemon.lock();
    for id in jobs {
        if inner.sched.job(id).is_some() && !inner.reattached.contains(&id) {
            tracing::info!(
                job = id,
                "its attached client did not come back; cancelling"
            );
            crate::handlers::cancel::cancel_one(&daemon, &mut inner, id, daemon.requester(0));
        }
    }
    daemon.schedule(&mut inner);
}

/// Tells the supervisor of a job that could not be re-adopted to stop it.
async fn stop_orphan(run_dir: PathBuf, grace_s: u64) {
    use futures::{SinkExt, StreamExt};
    let Ok(stream) = tokio::net::UnixStream::connect(run_dir.join(supervisor::SOCKET_FILE)).await
    else {
        return;
    };
    let mut conn = tokio_util::codec::Framed::new(stream, mgpu_proto::FrameCodec::default());
    let cmd = supervisor::SupervisorCmd::Stop {
        grace_ms: grace_s * 1000,
        reason: supervisor::StopReason::Cancel,
    };
    if conn.send(mgpu_proto::Frame::control(&cmd)).await.is_err() {
        return;
    }
    // Stay until the supervisor has read it (its hello comes after it registered us), bounded.
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.next()).await;
}

/// How often GPU memory use is re-read. One read of an H200 took 0.1–0.3 ms (measured with
/// `scripts/gpu-check.sh`), so reading often is cheap, and it bounds how long a job waits after
/// memory used outside mgpu is freed, and how long mgpu may overlook memory newly taken.
const NVML_POLL: Duration = Duration::from_millis(500);

/// How jobs over their GPU memory reservations are dealt with.
#[derive(Debug, Clone, Copy)]
struct MemPolicy {
    enforce: GpuMemEnforce,
    tolerance_ms: u64,
}

/// A job's peak is written to the store again when it grew by more than this fraction since it
/// was last written (and when the job ends): few writes, and little lost to a crash.
const PEAK_REWRITE: f64 = 0.1;

/// Follows GPU memory use (NVML): memory used by processes that are not mgpu jobs is kept out
/// of the scheduler's reach, the jobs' own use is charged where it passes their reservations,
/// and jobs over their reservations on shared GPUs are stopped (see [`MemPolicy`]). A timer
/// here is about the hardware, not scheduling: the scheduler reacts to what changes.
async fn watch_gpus(daemon: Arc<Daemon>, backend: Box<dyn GpuBackend>, policy: MemPolicy) {
    let totals: HashMap<u32, u64> = backend
        .gpus()
        .iter()
        .map(|g| (g.index, g.total_mib))
        .collect();
    let backend = Arc::new(std::sync::Mutex::new(backend));
    // GPUs whose figures cannot be read now, with the error (logged when it starts and ends).
    let mut failing: HashMap<u32, String> = HashMap::new();
    // Jobs told they are over their reservation (and whether on a shared GPU), so that each
    // is told once per change.
    let mut warned: HashMap<JobId, bool> = HashMap::new();
    loop {
        let d = daemon.clone();
        let b = backend.clone();
        let usage = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let jobs = d.job_processes();
            let usage = b
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .usage(&|pid| jobs.job_of(pid));
            if usage.is_some() {
                tracing::debug!("NVML usage read in {} µs", started.elapsed().as_micros());
            }
            usage
        })
        .await
        .ok()
        .flatten();
        let Some(usage) = usage else {
            return; // simulated GPUs: nothing to watch
        };
        {
            let mut inner = daemon.lock();
            for u in usage {
                let total = totals.get(&u.index).copied().unwrap_or(0);
                match &u.error {
                    Some(e) => {
                        if failing.get(&u.index) != Some(e) {
                            tracing::error!(
                                gpu = u.index,
                                error = %e,
                                "NVML cannot read GPU {}; no new jobs go to it until it can",
                                u.index
                            );
                            failing.insert(u.index, e.clone());
                        }
                        // Its memory is unknown: none of it counts as free. (The jobs' last
                        // measured use stays charged.)
                        inner.sched.set_foreign_usage(u.index, total);
                    }
                    None => {
                        if failing.remove(&u.index).is_some() {
                            tracing::info!(gpu = u.index, "NVML reads GPU {} again", u.index);
                        }
                        inner.gpu_used.insert(u.index, u.used_mib);
                        inner.sched.set_foreign_usage(u.index, u.foreign_mib);
                        inner.sched.set_job_usage(u.index, &u.jobs);
                        for &(job, mib) in &u.jobs {
                            let peak = inner.gpu_peaks.entry(job).or_default();
                            peak.0 = peak.0.max(mib);
                        }
                    }
                }
                inner.gpu_readings.insert(u.index, u);
            }
            let inner = &mut *inner;
            for (&job, peak) in inner.gpu_peaks.iter_mut() {
                if peak.0 as f64 > peak.1 as f64 * (1.0 + PEAK_REWRITE) {
                    daemon.store.gpu_peak(job, peak.0);
                    peak.1 = peak.0;
                }
            }
            // Peaks of jobs that are gone (requeued ones keep theirs: one figure per job).
            inner
                .gpu_peaks
                .retain(|id, _| inner.sched.job(*id).is_some());
            enforce_gpu_memory(&daemon, inner, policy, &mut warned);
            daemon.schedule(inner);
        }
        tokio::time::sleep(NVML_POLL).await;
    }
}

/// Carries out the core's decisions on jobs over their GPU memory reservations.
fn enforce_gpu_memory(
    daemon: &Arc<Daemon>,
    inner: &mut crate::state::Inner,
    policy: MemPolicy,
    warned: &mut HashMap<JobId, bool>,
) {
    let actions = inner.sched.memory_actions(now_ms(), policy.tolerance_ms);
    let mut over: HashMap<JobId, bool> = HashMap::new();
    for action in actions {
        let (o, shared) = match action {
            MemoryAction::Stop(o) => (o, true),
            MemoryAction::Alone(o) => (o, false),
        };
        over.insert(o.job, shared);
        if policy.enforce == GpuMemEnforce::Off {
            continue;
        }
        if shared && policy.enforce == GpuMemEnforce::Kill {
            if inner.stop_reason(o.job).is_some() {
                continue; // being stopped already
            }
            tracing::warn!(
                job = o.job,
                gpu = o.gpu,
                used_mib = o.used_mib,
                reserved_mib = o.reserved_mib,
                "job over its GPU memory reservation on a shared GPU: stopping it"
            );
            daemon.stop(
                inner,
                o.job,
                StopReason::GpuMemory {
                    gpu: o.gpu,
                    used_mib: o.used_mib,
                    reserved_mib: o.reserved_mib,
                },
            );
            continue;
        }
        if warned.get(&o.job) == Some(&shared) {
            continue;
        }
        warned.insert(o.job, shared);
        let message = format!(
            "job {} uses {} MiB of GPU memory on GPU {}, over its reservation of {} MiB{}",
            o.job,
            o.used_mib,
            o.gpu,
            o.reserved_mib,
            match (shared, policy.enforce) {
                (true, _) =>
                    " on a GPU it shares with other jobs: it may make them run out of memory",
                (false, GpuMemEnforce::Kill) => {
                    " (alone on that GPU for now; it is stopped if it is still over once another \
                     job shares the GPU)"
                }
                (false, _) => " (alone on that GPU for now)",
            }
        );
        tracing::warn!(job = o.job, gpu = o.gpu, "{message}");
        daemon.notify(inner, o.job, message);
    }
    // A job back inside its reservation may be told again next time.
    warned.retain(|id, _| over.contains_key(id));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run prepared but never started is abandoned (marked, so that a late supervisor stands
    /// down) and moved aside, so that the job's next run, under the same name, is never
    /// touched by its clean-up; a start-up that stops before the requeue is committed finds it
    /// again. A started run whose supervisor is gone is lost, not abandoned.
    #[test]
    fn runs_that_never_started_are_abandoned_and_moved_aside() {
        let job = tempfile::tempdir().unwrap();
        let r0 = job.path().join("r0");
        std::fs::create_dir(&r0).unwrap();
        std::fs::write(r0.join(supervisor::LAUNCH_FILE), "{}").unwrap();
        assert_eq!(probe_runs(job.path()), RunProbe::NotForked { run: 0 });
        let trash = job.path().join(format!("{ABANDONED_PREFIX}0"));
        assert!(!r0.exists());
        assert!(trash.join(supervisor::ABANDONED_FILE).exists());
        assert_eq!(probe_runs(job.path()), RunProbe::NotForked { run: 0 });
        // The next run of the job, started and then lost: the trash goes, the run is Gone.
        std::fs::create_dir(&r0).unwrap();
        std::fs::write(r0.join(supervisor::FORKED_FILE), "").unwrap();
        assert_eq!(probe_runs(job.path()), RunProbe::Gone { run: 0 });
        assert!(!trash.exists());
        assert!(!r0.join(supervisor::ABANDONED_FILE).exists());
    }

    /// The server's arguments from `argv` (after the program name) and a configuration file
    /// with `text` (root's, 0600, like /etc/mgpu/mgpu.toml).
    fn loaded(text: &str, argv: &[&str]) -> Result<crate::config::Loaded> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mgpu.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut full: Vec<std::ffi::OsString> = vec![
            "mgpu_scheduler_server".into(),
            "--config".into(),
            path.into(),
        ];
        full.extend(argv.iter().map(Into::into));
        crate::config::load(&full)
    }

    /// The scheduling knobs of the core's `Config` (size weight, learned estimates, the fair
    /// share's usage and age factors, reserving below a share) are server options and file
    /// keys: unset, the core's defaults; set, in the core's configuration; the command line
    /// beats the file; and a reload applies them.
    #[test]
    fn scheduling_knobs_reach_the_core_config() {
        let defaults = core_config(&loaded("", &[]).unwrap().args).unwrap();
        let core = Config::default();
        assert_eq!(defaults.fair.size_weight_h, core.fair.size_weight_h);
        assert_eq!(defaults.fair.usage_factor, core.fair.usage_factor);
        assert_eq!(defaults.fair.age_factor, core.fair.age_factor);
        assert_eq!(
            defaults.fair.reserve_below_share,
            core.fair.reserve_below_share
        );
        assert!(defaults.learn_estimates);

        let file = "size_weight = 0\nno_learned_estimates = true\nfair_usage_factor = 10.5\n\
                    fair_age_factor = 0.5\nreserve_below_share = 0.2\n";
        let l = loaded(file, &[]).unwrap();
        let c = core_config(&l.args).unwrap();
        assert_eq!(c.fair.size_weight_h, 0.0);
        assert!(!c.learn_estimates);
        assert_eq!(c.fair.usage_factor, 10.5);
        assert_eq!(c.fair.age_factor, 0.5);
        assert_eq!(c.fair.reserve_below_share, 0.2);
        assert_eq!(l.effective["no_learned_estimates"], "true");
        assert_eq!(l.effective["size_weight"], "0");

        let cli = loaded(file, &["--size-weight", "3"]).unwrap();
        assert_eq!(core_config(&cli.args).unwrap().fair.size_weight_h, 3.0);

        for key in [
            "size_weight",
            "no_learned_estimates",
            "fair_usage_factor",
            "fair_age_factor",
            "reserve_below_share",
        ] {
            assert!(crate::config::is_live(key), "{key}");
        }
    }

    /// NaN, negative and absurd values are refused with an error naming the option, from the
    /// command line and from the file alike (`--check-config` runs the same check).
    #[test]
    fn bad_scheduling_knobs_are_refused_by_name() {
        for (flag, value) in [
            ("--size-weight", "nan"),
            ("--size-weight", "-1"),
            ("--size-weight", "inf"),
            ("--size-weight", "1e9"),
            ("--fair-usage-factor", "-0.5"),
            ("--fair-usage-factor", "1e12"),
            ("--fair-age-factor", "0"),
            ("--fair-age-factor", "NaN"),
            ("--reserve-below-share", "2"),
            ("--reserve-below-share", "-0.1"),
            ("--flood-factor", "0.5"),
            ("--flood-factor", "nan"),
        ] {
            let cli = format!("{flag}={value}");
            let e = loaded("", &[&cli])
                .and_then(|l| core_config(&l.args))
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag), "{cli}: {e}");
            let key = flag.trim_start_matches("--").replace('-', "_");
            let toml_value = match value {
                "nan" | "NaN" => "nan".to_string(),
                "inf" => "inf".to_string(),
                v if v.contains('e') || v.contains('.') => v.to_string(),
                v => format!("{v}.0"),
            };
            let file = format!("{key} = {toml_value}\n");
            let e = loaded(&file, &[])
                .and_then(|l| core_config(&l.args))
                .unwrap_err()
                .to_string();
            assert!(e.contains(flag), "{file}: {e}");
        }
        // The linear size factor of earlier releases does not carry over: ignored with a
        // warning saying what replaced it, from the file and the command line, so an upgraded
        // server still starts (with the default weight, or size_weight when set).
        for (file, cli) in [("size_factor = 0.0\n", None), ("", Some("--size-factor=0"))] {
            let l = loaded(file, cli.as_slice()).unwrap();
            assert!(
                l.warnings
                    .iter()
                    .any(|w| w.contains("size_factor") && w.contains("size_weight")),
                "{:?}",
                l.warnings
            );
            let c = core_config(&l.args).unwrap();
            assert_eq!(c.fair.size_weight_h, Config::default().fair.size_weight_h);
            assert!(!l.effective.contains_key("size_factor"));
        }
        let e = loaded("no_learned_estimates = 1\n", &[])
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("no_learned_estimates") && e.contains("true or false"),
            "{e}"
        );
    }
}
