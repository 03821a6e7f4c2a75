//! mgpu under test: a private `mgpu_scheduler_server --simulate-gpus 8x80GiB` on a temp socket
//! with temp state and log directories, driven by the release client binaries.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::system::{parallel, System};
use crate::{raw, stats, util};

/// Builds the project's release binaries as they are installed (`scripts/build-release.sh`:
/// static clients, dynamic server) into the repository's own `target/dist`.
pub fn build_release(repo: &Path) -> Result<()> {
    eprintln!(
        "mgpu-bench: scripts/build-release.sh (in {})",
        repo.display()
    );
    let status = Command::new("bash")
        .arg("scripts/build-release.sh")
        .current_dir(repo)
        .env_remove("CARGO_TARGET_DIR")
        .stdout(Stdio::null())
        .status()
        .context("running scripts/build-release.sh")?;
    if !status.success() {
        bail!("scripts/build-release.sh failed ({status})");
    }
    Ok(())
}

pub struct Mgpu {
    bin: PathBuf,
    socket: PathBuf,
    server: Child,
    pid: u32,
    /// The server's `--run-dir`, on a tmpfs (removed at the end).
    _run_dir: Option<tempfile::TempDir>,
}

/// A fresh directory on a tmpfs (`/run` or `/dev/shm`), for the server's run directories as
/// the systemd unit has them (`--run-dir /run/mgpu`); `None` where there is no tmpfs.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    ["/run", "/dev/shm"].into_iter().find_map(|base| {
        let c = std::ffi::CString::new(base).ok()?;
        // SAFETY: a valid path and a zeroed statfs buffer for the kernel to fill.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 || st.f_type as i64 != TMPFS_MAGIC {
            return None;
        }
        tempfile::Builder::new()
            .prefix("mgpu-bench-runs.")
            .tempdir_in(base)
            .ok()
    })
}

impl Mgpu {
    /// Starts the server with its socket, state and logs under `dir`; its run directories on
    /// a tmpfs unless `disk_run_dir`.
    pub fn start(bin: &Path, dir: &Path, disk_run_dir: bool) -> Result<Mgpu> {
        for b in [
            "mgpu_scheduler_server",
            "mgpu_srun",
            "mgpu_queue",
            "mgpu_cancel",
        ] {
            if !bin.join(b).is_file() {
                bail!(
                    "{} not found (build first, or drop --no-build)",
                    bin.join(b).display()
                );
            }
        }
        let socket = dir.join("mgpu.sock");
        let stderr = std::fs::File::create(dir.join("server.log"))?;
        let run_dir = if disk_run_dir { None } else { tmpfs_dir() };
        eprintln!(
            "mgpu-bench: mgpu run directories in {}",
            run_dir
                .as_ref()
                .map_or("the state directory (on disk)".into(), |d| d
                    .path()
                    .display()
                    .to_string())
        );
        let mut server = Command::new(bin.join("mgpu_scheduler_server"));
        if let Some(d) = &run_dir {
            server.arg("--run-dir").arg(d.path());
        }
        let server = server
            .arg("--socket")
            .arg(&socket)
            .args(["--simulate-gpus", "8x80GiB", "--grace-period", "2"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--log-dir")
            .arg(dir.join("logs"))
            .env("MGPU_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting mgpu_scheduler_server")?;
        let pid = server.id();
        let mut me = Mgpu {
            bin: bin.to_path_buf(),
            socket,
            server,
            pid,
            _run_dir: run_dir,
        };
        let log = dir.join("server.log");
        util::poll(
            "the mgpu server to listen",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                if let Some(st) = me.server.try_wait()? {
                    bail!(
                        "mgpu_scheduler_server exited ({st}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default().trim()
                    );
                }
                Ok(raw::connect(&me.socket).ok().map(|_| ()))
            },
        )?;
        me.pid = pid;
        Ok(me)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn cli(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        c.env(mgpu_proto::SOCKET_ENV, &self.socket);
        c
    }

    /// Stops the server (SIGTERM) and waits for it.
    pub fn stop(mut self) -> Result<()> {
        util::kill(self.pid, libc::SIGTERM);
        let t = Instant::now();
        while self.server.try_wait()?.is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                util::kill(self.pid, libc::SIGKILL);
                self.server.wait()?;
                bail!("the mgpu server did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// One detached `mgpu_srun --parsable` call (a job, or a job array with `--array`).
    fn srun_parsable(&self, how: &[String], gpus: u32, argv: &[String]) -> Result<()> {
        let out = util::run_ok(
            self.cli("mgpu_srun")
                .args(how)
                .args(["--parsable", "--gpus", &gpus.to_string(), "--"])
                .args(argv),
        )?;
        let id = String::from_utf8_lossy(&out.stdout);
        if id.trim().parse::<u64>().is_err() {
            bail!("mgpu_srun --parsable printed {id:?} instead of a job id");
        }
        Ok(())
    }
}

/// A bench that stops early (an error, a panic) leaves no server behind.
impl Drop for Mgpu {
    fn drop(&mut self) {
        if let Ok(None) = self.server.try_wait() {
            util::kill(self.pid, libc::SIGKILL);
            let _ = self.server.wait();
        }
    }
}

impl System for Mgpu {
    fn name(&self) -> &'static str {
        "mgpu"
    }

    fn attached_true(&self) -> Result<()> {
        util::run_ok(self.cli("mgpu_srun").args(["--gpus", "1", "--", "true"]))?;
        Ok(())
    }

    fn submit(&self, gpus: u32, argv: &[String]) -> Result<()> {
        self.srun_parsable(&["--detach".into()], gpus, argv)
    }

    fn array_task_var(&self) -> Option<&'static str> {
        Some("MGPU_ARRAY_TASK_ID")
    }

    fn submit_array(&self, n: usize, gpus: u32, argv: &[String]) -> Result<()> {
        self.srun_parsable(&["--array".into(), format!("0-{}", n - 1)], gpus, argv)
    }

    fn active_jobs(&self) -> Result<usize> {
        raw::queue_len(&self.socket)
    }

    fn cancel_all(&self) -> Result<()> {
        util::run_ok(self.cli("mgpu_cancel").arg("--all"))?;
        Ok(())
    }

    fn queue_dump(&self) -> Result<()> {
        util::run_ok(self.cli("mgpu_queue").arg("--json").stdout(Stdio::piped()))?;
        Ok(())
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        util::proc_status_kib(self.pid, "VmHWM")
    }

    fn fill(&self, n: usize, gpus: u32, argv: &[String], clients: usize) -> Result<()> {
        let req = raw::submit_request(gpus, argv)?;
        parallel(n, clients, |_| raw::submit(&self.socket, &req).map(|_| ()))
    }

    fn raw_submit_latency(&self, n: usize, gpus: u32, argv: &[String]) -> Option<Result<Vec<f64>>> {
        Some((|| {
            let req = raw::submit_request(gpus, argv)?;
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    raw::submit(&self.socket, &req)?;
                    Ok(stats::ms(t.elapsed()))
                })
                .collect()
        })())
    }
}
