//! What the scenarios need from a system under test (mgpu, task-spooler or Slurm): each call is
//! one user-visible operation done through that system's own command-line tools.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;

use crate::util;

pub trait System: Sync {
    /// Column name in the results ("mgpu", "tsp", "slurm").
    fn name(&self) -> &'static str;
    /// Runs one attached trivial job (`srun true`) and returns once it has exited.
    fn attached_true(&self) -> Result<()>;
    /// Submits one detached job needing `gpus` GPUs (slots) that runs `argv`, with one CLI call.
    fn submit(&self, gpus: u32, argv: &[String]) -> Result<()>;
    /// The environment variable that tells a job array's task its index, where the system has
    /// job arrays.
    fn array_task_var(&self) -> Option<&'static str> {
        None
    }
    /// Submits a job array of `n` tasks (indices 0 to n-1) running `argv`, with one CLI call.
    fn submit_array(&self, _n: usize, _gpus: u32, _argv: &[String]) -> Result<()> {
        anyhow::bail!("{} has no job arrays", self.name())
    }
    /// Jobs pending or running.
    fn active_jobs(&self) -> Result<usize>;
    /// The system's "cancel all my jobs" command (only the command; see [`wait_idle`]).
    fn cancel_all(&self) -> Result<()>;
    /// Runs the system's queue listing (machine-readable where it has one), output drained.
    fn queue_dump(&self) -> Result<()>;
    /// Peak RSS of the scheduler daemon in KiB, when known.
    fn peak_rss_kib(&self) -> Option<u64>;
    /// The most jobs the system can hold queued, when it has a small hard limit.
    fn max_queued(&self) -> Option<usize> {
        None
    }
    /// Brings the system back to an empty queue (cancel everything and wait).
    fn reset(&self) -> Result<()> {
        self.cancel_all()?;
        wait_idle(self, Duration::from_secs(120))
    }
    /// Queues `n` jobs as fast as it can with `clients` parallel submitters. The default spawns
    /// the CLI; mgpu overrides it with its wire protocol.
    fn fill(&self, n: usize, gpus: u32, argv: &[String], clients: usize) -> Result<()> {
        parallel(n, clients, |_| self.submit(gpus, argv))
    }
    /// Latency samples (ms) of `n` sequential submits over the raw protocol, where there is one.
    fn raw_submit_latency(
        &self,
        _n: usize,
        _gpus: u32,
        _argv: &[String],
    ) -> Option<Result<Vec<f64>>> {
        None
    }
}

/// Waits until no job is pending or running.
pub fn wait_idle<S: System + ?Sized>(sys: &S, timeout: Duration) -> Result<()> {
    util::poll(
        &format!("{}'s queue to drain", sys.name()),
        timeout,
        Duration::from_millis(50),
        || Ok((sys.active_jobs()? == 0).then_some(())),
    )
}

/// Runs `f(i)` for `i` in `0..n` on `clients` threads; the first error wins.
pub fn parallel(n: usize, clients: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        if let Err(e) = f(i) {
                            // Stop the others soon.
                            next.store(n, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("submitter thread panicked"))
            .collect::<Result<Vec<()>>>()
            .map(|_| ())
    })
}
