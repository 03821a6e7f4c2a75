//! GPU bookkeeping and the choice of GPUs for a job.
//!
//! Two kinds of jobs share the GPUs:
//! - *exclusive* jobs (no `--mem`) take whole GPUs: nobody else is placed on them, and only GPUs
//!   with no other job and no foreign process qualify;
//! - *memory* jobs (`--mem M`) reserve M MiB on each of their GPUs and may share a GPU while the
//!   reservations (plus memory foreign processes use) fit in its total.
//!
//! Placement packs memory jobs tightly (best fit, onto GPUs already shared first) so that whole
//! GPUs stay free for exclusive and multi-GPU jobs.

use crate::{GpuSpec, JobId, JobRequest};

/// The scheduler's view of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuState {
    pub spec: GpuSpec,
    /// Sum of the memory reservations of the memory jobs on it.
    pub reserved_mib: u64,
    /// Memory used by processes mgpu did not start.
    pub foreign_mib: u64,
    /// The exclusive job holding it, if any.
    pub exclusive: Option<JobId>,
    /// Memory jobs on it, in placement order.
    pub sharers: Vec<JobId>,
}

impl GpuState {
    pub fn new(spec: GpuSpec) -> Self {
        GpuState {
            spec,
            reserved_mib: 0,
            foreign_mib: 0,
            exclusive: None,
            sharers: Vec::new(),
        }
    }

    /// No mgpu job on it.
    pub fn is_idle(&self) -> bool {
        self.exclusive.is_none() && self.sharers.is_empty()
    }

    /// Memory a new memory job could still reserve on it.
    pub fn free_mib(&self) -> u64 {
        if self.exclusive.is_some() {
            return 0;
        }
        self.spec
            .total_mib
            .saturating_sub(self.reserved_mib)
            .saturating_sub(self.foreign_mib)
    }

    /// Can an exclusive job take it?
    pub fn takes_exclusive(&self) -> bool {
        self.is_idle() && self.foreign_mib == 0
    }

    /// The jobs on it.
    pub fn jobs(&self) -> Vec<JobId> {
        self.exclusive
            .iter()
            .copied()
            .chain(self.sharers.iter().copied())
            .collect()
    }
}

/// Could any job at all start on these GPUs now?
pub fn any_capacity(gpus: &[GpuState]) -> bool {
    gpus.iter().any(|g| g.takes_exclusive() || g.free_mib() > 0)
}

/// Picks GPUs for `request`, or `None` if it does not fit now. Deterministic.
pub fn choose(gpus: &[GpuState], request: &JobRequest) -> Option<Vec<u32>> {
    let want = request.gpus as usize;
    let mut picked: Vec<&GpuState> = match request.mem_mib {
        None => {
            let mut idle: Vec<&GpuState> = gpus.iter().filter(|g| g.takes_exclusive()).collect();
            if idle.len() < want {
                return None;
            }
            // Smallest GPUs first: big ones stay free for jobs that need their memory.
            idle.sort_by_key(|g| (g.spec.total_mib, g.spec.index));
            idle.truncate(want);
            idle
        }
        Some(mem) => {
            let mut fitting: Vec<&GpuState> = gpus.iter().filter(|g| g.free_mib() >= mem).collect();
            if fitting.len() < want {
                return None;
            }
            // Already-shared GPUs first, then the tightest fit: keeps whole GPUs whole.
            fitting.sort_by_key(|g| (g.is_idle(), g.free_mib() - mem, g.spec.index));
            fitting.truncate(want);
            fitting
        }
    };
    picked.sort_by_key(|g| g.spec.index);
    Some(picked.iter().map(|g| g.spec.index).collect())
}

/// Books `chosen` GPUs for job `id`.
pub fn reserve(gpus: &mut [GpuState], chosen: &[u32], id: JobId, request: &JobRequest) {
    for gpu in gpus.iter_mut().filter(|g| chosen.contains(&g.spec.index)) {
        match request.mem_mib {
            None => {
                debug_assert!(gpu.is_idle());
                gpu.exclusive = Some(id);
            }
            Some(mem) => {
                debug_assert!(gpu.free_mib() >= mem);
                gpu.reserved_mib += mem;
                gpu.sharers.push(id);
            }
        }
    }
}

/// Frees everything job `id` holds.
pub fn release(gpus: &mut [GpuState], id: JobId, request: &JobRequest) {
    for gpu in gpus.iter_mut() {
        if gpu.exclusive == Some(id) {
            gpu.exclusive = None;
        }
        if let Some(pos) = gpu.sharers.iter().position(|&j| j == id) {
            gpu.sharers.remove(pos);
            gpu.reserved_mib -= request.mem_mib.unwrap_or(0);
        }
    }
}
