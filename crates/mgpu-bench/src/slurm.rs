//! A real Slurm under test, started with the shared `start.sh` (slurmctld + slurmd on loopback,
//! 8 fake GPUs as gres `gpu`) and stopped with `stop.sh`. Jobs go in with `sbatch --gres=gpu:N
//! --wrap`, the attached case is `srun --gres=gpu:1 true`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::system::System;
use crate::util;

pub struct Slurm {
    scripts: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
    outdir: PathBuf,
    user: String,
    /// `squeue --json` works (Slurm built with its JSON data parser).
    json: bool,
}

impl Slurm {
    /// Runs `scripts/start.sh DIR 8`; `out` receives the jobs' output files.
    pub fn start(scripts: &Path, dir: &Path, out: &Path) -> Result<Slurm> {
        eprintln!(
            "mgpu-bench: starting Slurm ({}/start.sh {})",
            scripts.display(),
            dir.display()
        );
        util::run_ok(Command::new(scripts.join("start.sh")).arg(dir).arg("8"))
            .context("starting Slurm")?;
        std::fs::create_dir_all(out)?;
        let user = String::from_utf8_lossy(&util::run_ok(Command::new("id").arg("-un"))?.stdout)
            .trim()
            .to_string();
        let mut me = Slurm {
            scripts: scripts.to_path_buf(),
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
            outdir: out.to_path_buf(),
            user,
            json: false,
        };
        me.json = me
            .cmd("squeue")
            .arg("--json")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        Ok(me)
    }

    /// Whether the queue listing is `squeue --json` (else plain `squeue`).
    pub fn has_json(&self) -> bool {
        self.json
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    pub fn stop(&self) -> Result<()> {
        eprintln!("mgpu-bench: stopping Slurm");
        util::run_ok(Command::new(self.scripts.join("stop.sh")).arg(&self.dir))?;
        Ok(())
    }

    fn ctld_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("slurmctld.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// One `sbatch --parsable --wrap` call, its output in `out` (a pattern) under the bench's
    /// output directory.
    fn sbatch(&self, how: &[String], out: &str, gpus: u32, argv: &[String]) -> Result<()> {
        let wrap: Vec<String> = argv.iter().map(|a| util::shell_quote(a)).collect();
        util::run_ok(
            self.cmd("sbatch")
                .args(how)
                .args(["--parsable", &format!("--gres=gpu:{gpus}"), "-o"])
                .arg(self.outdir.join(out))
                .arg("-D")
                .arg(&self.outdir)
                .arg("--wrap")
                .arg(wrap.join(" ")),
        )?;
        Ok(())
    }
}

impl System for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn attached_true(&self) -> Result<()> {
        util::run_ok(self.cmd("srun").args(["--gres=gpu:1", "true"]))?;
        Ok(())
    }

    fn submit(&self, gpus: u32, argv: &[String]) -> Result<()> {
        self.sbatch(&[], "%j.out", gpus, argv)
    }

    fn array_task_var(&self) -> Option<&'static str> {
        Some("SLURM_ARRAY_TASK_ID")
    }

    fn submit_array(&self, n: usize, gpus: u32, argv: &[String]) -> Result<()> {
        self.sbatch(&[format!("--array=0-{}", n - 1)], "%A_%a.out", gpus, argv)
    }

    fn active_jobs(&self) -> Result<usize> {
        let out = util::run_ok(self.cmd("squeue").args(["-h", "-o", "%i"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    fn cancel_all(&self) -> Result<()> {
        util::run_ok(self.cmd("scancel").args(["-u", &self.user]))?;
        Ok(())
    }

    fn queue_dump(&self) -> Result<()> {
        let mut c = self.cmd("squeue");
        if self.json {
            c.arg("--json");
        }
        util::run_ok(&mut c)?;
        Ok(())
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        util::proc_status_kib(self.ctld_pid()?, "VmHWM")
    }
}
