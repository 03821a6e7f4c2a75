//! task-spooler under test: `tsp` with a private `TS_SOCKET` and `TMPDIR` (its output files),
//! 8 slots (`TS_SLOTS=8`, `tsp -S 8`); a job's "GPUs" are its slots (`tsp -N`).
//!
//! In tsp every queued job is a client process waiting on the server's socket, so the queue
//! is bounded by the server's connection limit (`TS_MAXCONN`; its `select()` caps it near
//! 1,000): the scale scenario is not run against it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::system::System;
use crate::util;

/// Connections the tsp server accepts: one per queued job, plus a few for commands.
const MAX_CONN: usize = 1010;

pub struct Tsp {
    socket: PathBuf,
    outdir: PathBuf,
}

impl Tsp {
    pub fn start(dir: &Path) -> Result<Tsp> {
        let outdir = dir.join("tsp-out");
        std::fs::create_dir_all(&outdir)?;
        let me = Tsp {
            socket: dir.join("tsp.sock"),
            outdir,
        };
        util::run_ok(me.cmd().arg("-V")).context("task-spooler (tsp) is not usable")?;
        util::run_ok(me.cmd().args(["-S", "8"]))?;
        Ok(me)
    }

    fn env_entry(&self) -> String {
        format!("TS_SOCKET={}", self.socket.display())
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tsp");
        c.env("TS_SOCKET", &self.socket)
            .env("TMPDIR", &self.outdir)
            .env("TS_SLOTS", "8")
            .env("TS_MAXCONN", MAX_CONN.to_string());
        c
    }

    /// Kills the server and every process of this tsp instance (waiting clients, jobs).
    pub fn stop(&self) {
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            for pid in util::pids_with_env(&self.env_entry()) {
                util::kill(pid, sig);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl System for Tsp {
    fn name(&self) -> &'static str {
        "tsp"
    }

    fn attached_true(&self) -> Result<()> {
        util::run_ok(self.cmd().args(["-f", "true"]))?;
        Ok(())
    }

    fn submit(&self, gpus: u32, argv: &[String]) -> Result<()> {
        // tsp forks a client into the background that waits for its turn and holds our
        // stdout; it must not be a pipe we wait on.
        let status = self
            .cmd()
            // -B: fail rather than wait when the server's queue is full.
            .args(["-B", "-N", &gpus.to_string()])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("tsp refused a job ({status})");
        }
        Ok(())
    }

    fn active_jobs(&self) -> Result<usize> {
        let out = util::run_ok(self.cmd().arg("-l"))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter(|l| {
                let state = l.split_whitespace().nth(1).unwrap_or("");
                state != "finished" && state != "skipped"
            })
            .count())
    }

    /// tsp has no "cancel all": the server is killed with its waiting clients and jobs.
    fn cancel_all(&self) -> Result<()> {
        self.stop();
        util::run_ok(self.cmd().args(["-S", "8"]))?;
        Ok(())
    }

    fn queue_dump(&self) -> Result<()> {
        util::run_ok(self.cmd().arg("-l"))?;
        Ok(())
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        None
    }

    /// Measured here: the server stops accepting near 995 waiting clients.
    fn max_queued(&self) -> Option<usize> {
        Some(900)
    }
}
