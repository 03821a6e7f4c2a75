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

use std::collections::BTreeMap;

use crate::{GpuSpec, JobId, JobRequest};

/// Most jobs that share one GPU. Each running job costs a root supervisor (a few MiB) and
/// each of its processes a CUDA context on the GPU (hundreds of MiB), so more than this many
/// is a flood of tiny reservations (`--mem 1`), not a workload: without a bound, one user's
/// jobs could each start a supervisor by the thousand on one GPU.
pub const MAX_JOBS_PER_GPU: usize = 32;

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
    /// GPU memory each running job's processes use on it, as last measured (NVML).
    pub used_by: BTreeMap<JobId, u64>,
    /// What jobs use on it beyond their reservations there (0 on a GPU a job does not hold):
    /// charged like reservations, so nobody is placed on memory that is really taken.
    pub excess_mib: u64,
    /// Out of service (drained by an administrator): no new job is placed on it.
    pub drained: bool,
}

impl GpuState {
    pub fn new(spec: GpuSpec) -> Self {
        GpuState {
            spec,
            reserved_mib: 0,
            foreign_mib: 0,
            exclusive: None,
            sharers: Vec::new(),
            used_by: BTreeMap::new(),
            excess_mib: 0,
            drained: false,
        }
    }

    /// What job `id` has reserved here: its `--mem` when it shares the GPU, all of it when it
    /// holds the GPU exclusively, nothing when it does not hold the GPU.
    pub fn reservation_of(&self, id: JobId, request: &JobRequest) -> u64 {
        if self.exclusive == Some(id) {
            self.spec.total_mib
        } else if self.sharers.contains(&id) {
            request.mem_mib.unwrap_or(0)
        } else {
            0
        }
    }

    /// No mgpu job on it.
    pub fn is_idle(&self) -> bool {
        self.exclusive.is_none() && self.sharers.is_empty()
    }

    /// Memory a new memory job could still reserve on it (none once [`MAX_JOBS_PER_GPU`]
    /// share it).
    pub fn free_mib(&self) -> u64 {
        if self.exclusive.is_some() || self.sharers.len() >= MAX_JOBS_PER_GPU {
            return 0;
        }
        self.spec
            .total_mib
            .saturating_sub(self.reserved_mib)
            .saturating_sub(self.excess_mib)
            .saturating_sub(self.foreign_mib)
    }

    /// Can an exclusive job take it?
    pub fn takes_exclusive(&self) -> bool {
        self.is_idle() && self.foreign_mib == 0 && self.excess_mib == 0
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
    gpus.iter()
        .any(|g| !g.drained && (g.takes_exclusive() || g.free_mib() > 0))
}

/// Picks GPUs for `request`, or `None` if it does not fit now. Deterministic.
pub fn choose(gpus: &[GpuState], request: &JobRequest) -> Option<Vec<u32>> {
    choose_where(gpus, request, |_| true)
}

/// Would `request` fit now somewhere (same answer as `choose(..).is_some()`, cheaper)?
pub fn any_fit(gpus: &[GpuState], request: &JobRequest) -> bool {
    gpus.iter().filter(|g| fits_on(g, request)).count() >= request.gpus as usize
}

/// Can `request` take this GPU (exclusively, or its memory next to others')?
pub fn fits_on(gpu: &GpuState, request: &JobRequest) -> bool {
    if gpu.drained {
        return false;
    }
    match request.mem_mib {
        None => gpu.takes_exclusive(),
        Some(mem) => gpu.free_mib() >= mem,
    }
}

/// Like [`choose`], among the GPUs at the positions `allowed` accepts only.
pub fn choose_where(
    gpus: &[GpuState],
    request: &JobRequest,
    allowed: impl Fn(usize) -> bool,
) -> Option<Vec<u32>> {
    let want = request.gpus as usize;
    let mut fitting: Vec<&GpuState> = gpus
        .iter()
        .enumerate()
        .filter(|(i, g)| fits_on(g, request) && allowed(*i))
        .map(|(_, g)| g)
        .collect();
    if fitting.len() < want {
        return None;
    }
    match request.mem_mib {
        // Smallest GPUs first: big ones stay free for jobs that need their memory.
        None => fitting.sort_by_key(|g| (g.spec.total_mib, g.spec.index)),
        // Already-shared GPUs first, then the tightest fit: keeps whole GPUs whole. GPUs where
        // a job uses more than it reserved come last: sharing one is what gets that job
        // stopped for its memory (enforcement applies to shared GPUs), so it is done only
        // when nothing else fits.
        Some(mem) => fitting.sort_by_key(|g| {
            (
                g.excess_mib > 0,
                g.is_idle(),
                g.free_mib() - mem,
                g.spec.index,
            )
        }),
    }
    fitting.truncate(want);
    fitting.sort_by_key(|g| g.spec.index);
    Some(fitting.iter().map(|g| g.spec.index).collect())
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

/// Frees everything job `id` holds, and the memory it was measured to use beyond that.
pub fn release(gpus: &mut [GpuState], id: JobId, request: &JobRequest) {
    for gpu in gpus.iter_mut() {
        if let Some(used) = gpu.used_by.get(&id).copied() {
            let excess = used.saturating_sub(gpu.reservation_of(id, request));
            gpu.excess_mib = gpu.excess_mib.saturating_sub(excess);
            gpu.used_by.remove(&id);
        }
        if gpu.exclusive == Some(id) {
            gpu.exclusive = None;
        }
        if let Some(pos) = gpu.sharers.iter().position(|&j| j == id) {
            gpu.sharers.remove(pos);
            gpu.reserved_mib -= request.mem_mib.unwrap_or(0);
        }
    }
}

/// How much of the machine a job uses on `held` GPUs, in GPU-equivalents: 1 per exclusive GPU,
/// mem/total for each GPU a memory job shares. This is what fair-share charges per second.
pub fn usage_share(gpus: &[GpuState], held: &[u32], request: &JobRequest) -> f64 {
    match request.mem_mib {
        None => held.len() as f64,
        Some(mem) => held
            .iter()
            .filter_map(|idx| gpus.iter().find(|g| g.spec.index == *idx))
            .map(|g| (mem as f64 / g.spec.total_mib.max(1) as f64).min(1.0))
            .sum(),
    }
}
