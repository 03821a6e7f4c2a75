//! # mgpu-sim
//!
//! Replays a job trace through mgpu's scheduler core in virtual time, on simulated GPUs, and
//! measures each policy: the server's own (`fifo` first-fit, `backfill`, `fair`, driven through
//! [`mgpu_core::Scheduler`] exactly as the daemon drives it) and baselines that are not server
//! policies (strict FIFO with head-of-line blocking, oracle shortest-job-first).
//!
//! Modules: [`workload`] reads the trace and fills in what it lacks by seeded rules,
//! [`engine`] runs the event loop, [`metrics`] summarises the outcome.

pub mod engine;
pub mod metrics;
pub mod workload;

use anyhow::{bail, Context};
use mgpu_core::GpuSpec;

/// Parses `8x80GiB` or `2x80GiB,2x24GiB` (units GiB/G/GB or MiB/M/MB; default MiB).
pub fn parse_gpus(spec: &str) -> anyhow::Result<Vec<GpuSpec>> {
    let mut gpus = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let (count, size) = part
            .split_once(['x', 'X'])
            .with_context(|| format!("bad GPU spec {part:?}: expected COUNTxSIZE, e.g. 8x80GiB"))?;
        let count: u32 = count
            .parse()
            .with_context(|| format!("bad GPU count in {part:?}"))?;
        let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let unit = &size[digits.len()..];
        let value: u64 = digits
            .parse()
            .with_context(|| format!("bad GPU size in {part:?}"))?;
        let mib = match unit.to_ascii_lowercase().as_str() {
            "gib" | "g" | "gb" => value.checked_mul(1024),
            "mib" | "m" | "mb" | "" => Some(value),
            other => bail!("unknown unit {other:?} in {part:?}"),
        };
        let Some(mib) = mib.filter(|&m| m > 0) else {
            bail!("bad GPU size in {part:?}: more than 0, and at most 2^64 MiB");
        };
        if count > 1024 || gpus.len() + count as usize > 1024 {
            bail!("too many GPUs in {spec:?} (at most 1024)");
        }
        for _ in 0..count {
            let index = gpus.len() as u32;
            gpus.push(GpuSpec {
                index,
                name: format!("sim{index}"),
                total_mib: mib,
            });
        }
    }
    if gpus.is_empty() {
        bail!("no GPUs in {spec:?}");
    }
    Ok(gpus)
}
