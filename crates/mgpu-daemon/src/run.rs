//! Command line, startup (directories, store recovery, GPUs, socket) and shutdown.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mgpu_core::{Config, Scheduler};
use nix::fcntl::{Flock, FlockArg};

use crate::gpu::{self, GpuBackend};
use crate::state::{now_ms, Daemon, Settings};
use crate::store::{Ending, Store};
use crate::{server, users};

/// The mgpu GPU job scheduler daemon.
///
/// As root it serves every user of the machine and runs each job as its submitter; as an
/// ordinary user it serves only that user.
#[derive(Debug, Parser)]
#[command(name = "mgpu_scheduler_server", version)]
pub struct Args {
    /// UNIX socket to listen on [default: $MGPU_SOCKET, else /tmp/mgpu_scheduler.sock]
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Global cap on every job's time slice, in seconds
    #[arg(long, value_name = "SECS")]
    pub max_job_time: Option<u64>,
    /// Where the job database lives [default: /var/lib/mgpu as root, else ~/.local/state/mgpu]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where job logs are kept [default: ~/.mgpu/logs of the server's user]
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Use simulated GPUs instead of NVML, e.g. 4x24GiB or 2x80GiB,2x24GiB
    #[arg(long, value_name = "SPEC")]
    pub simulate_gpus: Option<String>,
    /// Manage only these GPU indices, e.g. 0,2
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub gpus: Option<Vec<u32>>,
    /// Seconds between SIGTERM and SIGKILL when a running job is stopped
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub grace_period: u64,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MGPU_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
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
    match runtime.block_on(run(args)) {
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
        return Ok("/var/lib/mgpu".into());
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("mgpu"));
    }
    Ok(home_of_self()?.join(".local/state/mgpu"))
}

/// Creates `dir` (mode 0700) if needed and checks that it is ours and private.
fn private_dir(dir: &Path, what: &str) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the {what} {}", dir.display()))?;
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot read the {what} {}", dir.display()))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        bail!("the {what} {} is owned by another user", dir.display());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making the {what} {} private", dir.display()))?;
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
    match gpu::Nvml::open(only.as_ref()) {
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

async fn run(args: Args) -> Result<()> {
    let euid = nix::unistd::geteuid().as_raw();
    let multi_user = euid == 0;
    let socket = mgpu_proto::socket_path(args.socket.as_deref());
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir(multi_user)?,
    };
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => home_of_self()?.join(".mgpu/logs"),
    };
    private_dir(&state_dir, "state directory")?;
    private_dir(&log_dir, "log directory")?;
    // One server per state directory.
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join("lock"))
        .with_context(|| format!("cannot open {}/lock", state_dir.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        anyhow::anyhow!(
            "another mgpu server is using the state directory {}",
            state_dir.display()
        )
    })?;

    let backend = gpu_backend(&args)?;
    let gpus = backend.gpus();
    let (store, recovered) = Store::open(&state_dir)?;
    let config = Config {
        max_job_time_s: args.max_job_time,
        ..Config::default()
    };
    let mut sched = Scheduler::new(gpus, config, recovered.next_job_id);
    let mut specs = HashMap::new();
    for id in &recovered.interrupted {
        // Without a supervisor to re-adopt it, a job that was running when the previous server
        // died has an unknown outcome; it is not run again (it may have had side effects).
        tracing::warn!(
            job = id,
            "job was running when the previous server stopped; marking it FAILED"
        );
        store.ended(
            *id,
            Ending {
                state: mgpu_core::JobState::Failed,
                at: now_ms(),
                exit_code: None,
                signal: None,
                message: Some("mgpu: the server stopped unexpectedly while the job ran".into()),
            },
        );
    }
    for (id, request, spec, submitted_at, restarts) in recovered.pending {
        match sched.restore_pending(id, request, submitted_at, restarts) {
            Ok(()) => {
                specs.insert(id, spec);
            }
            Err(e) => {
                tracing::warn!(job = id, error = %e, "queued job no longer fits this machine");
                store.ended(
                    id,
                    Ending {
                        state: mgpu_core::JobState::Failed,
                        at: now_ms(),
                        exit_code: None,
                        signal: None,
                        message: Some(format!("mgpu: refused after a restart: {e}")),
                    },
                );
            }
        }
    }
    let restored = specs.len();
    let listener = server::bind(&socket)?;
    let daemon = Daemon::new(
        sched,
        specs,
        store,
        Settings {
            log_dir: log_dir.clone(),
            grace: Duration::from_secs(args.grace_period),
            multi_user,
            server_uid: euid,
        },
    );
    tracing::info!(
        socket = %socket.display(),
        gpus = %backend.describe(),
        state_dir = %state_dir.display(),
        log_dir = %log_dir.display(),
        mode = if multi_user { "multi-user" } else { "single-user" },
        restored,
        "mgpu scheduler ready"
    );
    {
        let mut inner = daemon.lock();
        daemon.schedule(&mut inner);
    }
    tokio::spawn(watch_gpus(daemon.clone(), backend));

    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    server::serve(daemon.clone(), listener, shutdown).await;
    let _ = std::fs::remove_file(&socket);
    daemon.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// Follows GPU memory use (NVML): memory used by processes that are not mgpu jobs is kept out
/// of the scheduler's reach. A timer here is about the hardware, not scheduling: the scheduler
/// reacts to what changes.
async fn watch_gpus(daemon: Arc<Daemon>, backend: Box<dyn GpuBackend>) {
    let backend = Arc::new(std::sync::Mutex::new(backend));
    loop {
        let d = daemon.clone();
        let b = backend.clone();
        let usage = tokio::task::spawn_blocking(move || {
            b.lock().unwrap().usage(&|pid| d.is_job_process(pid))
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
                inner.gpu_used.insert(u.index, u.used_mib);
                inner.sched.set_foreign_usage(u.index, u.foreign_mib);
            }
            daemon.schedule(&mut inner);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
