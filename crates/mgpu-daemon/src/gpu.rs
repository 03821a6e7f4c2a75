//! GPU backends: NVML for real GPUs (the library is loaded at run time), and simulated GPUs for
//! machines without any. Both feed the same scheduler core.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use mgpu_core::GpuSpec;

/// Memory use of one GPU as the driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub index: u32,
    /// Total memory in use.
    pub used_mib: u64,
    /// Memory used by processes that are not mgpu jobs.
    pub foreign_mib: u64,
}

/// A source of GPUs.
pub trait GpuBackend: Send {
    /// What kind of backend this is, for logs.
    fn describe(&self) -> String;
    /// The GPUs, fixed for the life of the daemon.
    fn gpus(&self) -> Vec<GpuSpec>;
    /// Current memory use; `is_ours(pid)` tells whether a process belongs to an mgpu job.
    /// `None` when the backend has nothing to report (simulated GPUs).
    fn usage(&self, is_ours: &dyn Fn(u32) -> bool) -> Option<Vec<Usage>>;
}

/// Parses `4x24GiB` or `2x80GiB,2x24GiB` (units GiB/G/GB, MiB/M/MB; count optional).
pub fn parse_sim_spec(spec: &str) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (count, size) = match part.split_once(['x', 'X']) {
            Some((c, s)) => (
                c.trim()
                    .parse::<u32>()
                    .with_context(|| format!("bad GPU count in '{part}'"))?,
                s.trim(),
            ),
            None => (1, part),
        };
        let lower = size.to_ascii_lowercase();
        let (num, factor) = if let Some(n) = lower
            .strip_suffix("gib")
            .or(lower.strip_suffix("gb"))
            .or(lower.strip_suffix('g'))
        {
            (n, 1024)
        } else if let Some(n) = lower
            .strip_suffix("mib")
            .or(lower.strip_suffix("mb"))
            .or(lower.strip_suffix('m'))
        {
            (n, 1)
        } else {
            bail!("GPU size '{size}' needs a unit: e.g. 24GiB or 24576MiB");
        };
        let n: u64 = num
            .trim()
            .parse()
            .with_context(|| format!("bad GPU size in '{part}'"))?;
        if n == 0 || count == 0 {
            bail!("GPU count and size must be positive in '{part}'");
        }
        out.extend(std::iter::repeat_n(n * factor, count as usize));
    }
    if out.is_empty() {
        bail!("empty GPU spec: use e.g. --simulate-gpus 4x24GiB");
    }
    if out.len() > 64 {
        bail!("at most 64 GPUs are supported");
    }
    Ok(out)
}

/// Simulated GPUs: fixed memory, no foreign processes.
pub struct Simulated {
    gpus: Vec<GpuSpec>,
}

impl Simulated {
    pub fn new(mems_mib: &[u64]) -> Self {
        Self::with_indices(
            mems_mib
                .iter()
                .enumerate()
                .map(|(i, &m)| (i as u32, m))
                .collect(),
        )
    }

    /// Simulated GPUs with explicit indices (what `--gpus` kept).
    pub fn with_indices(gpus: Vec<(u32, u64)>) -> Self {
        Simulated {
            gpus: gpus
                .into_iter()
                .map(|(index, m)| GpuSpec {
                    index,
                    name: format!("Simulated GPU ({} GiB)", m / 1024),
                    total_mib: m,
                })
                .collect(),
        }
    }
}

impl GpuBackend for Simulated {
    fn describe(&self) -> String {
        format!("{} simulated GPUs", self.gpus.len())
    }
    fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.clone()
    }
    fn usage(&self, _: &dyn Fn(u32) -> bool) -> Option<Vec<Usage>> {
        None
    }
}

/// Real GPUs through NVML.
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
    gpus: Vec<GpuSpec>,
}

const MIB: u64 = 1024 * 1024;

impl Nvml {
    /// Loads NVML and lists its GPUs (only `only`, when given).
    pub fn open(only: Option<&HashSet<u32>>) -> Result<Self> {
        let nvml = nvml_wrapper::Nvml::init().context("cannot load NVML (libnvidia-ml.so)")?;
        let count = nvml.device_count().context("NVML: counting devices")?;
        let mut gpus = Vec::new();
        for index in 0..count {
            if only.is_some_and(|o| !o.contains(&index)) {
                continue;
            }
            let dev = nvml
                .device_by_index(index)
                .with_context(|| format!("NVML: opening GPU {index}"))?;
            let name = dev.name().unwrap_or_else(|_| "NVIDIA GPU".into());
            let mem = dev
                .memory_info()
                .with_context(|| format!("NVML: memory of GPU {index}"))?;
            gpus.push(GpuSpec {
                index,
                name,
                total_mib: mem.total / MIB,
            });
        }
        Ok(Nvml { nvml, gpus })
    }
}

impl GpuBackend for Nvml {
    fn describe(&self) -> String {
        format!("{} NVIDIA GPUs (NVML)", self.gpus.len())
    }
    fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.clone()
    }
    fn usage(&self, is_ours: &dyn Fn(u32) -> bool) -> Option<Vec<Usage>> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let mut out = Vec::new();
        for g in &self.gpus {
            let Ok(dev) = self.nvml.device_by_index(g.index) else {
                continue;
            };
            let used_mib = dev.memory_info().map(|m| m.used / MIB).unwrap_or(0);
            let mut foreign = 0;
            let procs = dev
                .running_compute_processes()
                .unwrap_or_default()
                .into_iter()
                .chain(dev.running_graphics_processes().unwrap_or_default());
            for p in procs {
                if !is_ours(p.pid) {
                    foreign += match p.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes.div_ceil(MIB).max(1),
                        // Unknown amount: still a foreign process, so the GPU is not free.
                        UsedGpuMemory::Unavailable => 1,
                    };
                }
            }
            out.push(Usage {
                index: g.index,
                used_mib,
                foreign_mib: foreign,
            });
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_specs() {
        assert_eq!(parse_sim_spec("4x24GiB").unwrap(), vec![24576; 4]);
        assert_eq!(
            parse_sim_spec("2x80GiB,1x24GiB").unwrap(),
            vec![81920, 81920, 24576]
        );
        assert_eq!(parse_sim_spec("512MiB").unwrap(), vec![512]);
        assert!(parse_sim_spec("4x24").is_err());
        assert!(parse_sim_spec("0x24GiB").is_err());
        assert!(parse_sim_spec("").is_err());
    }
}
