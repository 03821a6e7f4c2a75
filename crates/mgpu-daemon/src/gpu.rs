//! GPU backends: NVML for real GPUs (the library is loaded at run time), and simulated GPUs for
//! machines without any. Both feed the same scheduler core.

use std::collections::{HashMap, HashSet};

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use mgpu_core::{GpuSpec, JobId};
use nvml_wrapper::error::NvmlError;

/// Memory use of one GPU as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usage {
    pub index: u32,
    /// Total memory in use.
    pub used_mib: u64,
    /// Memory used by processes that are not mgpu jobs.
    pub foreign_mib: u64,
    /// Why the GPU's figures could not be read (lost GPU, NVML error); the rest is then 0.
    pub error: Option<String>,
    /// Percent of the last sample period a kernel ran, where the GPU reports it.
    pub util_pct: Option<u32>,
    /// Memory the jobs' processes use on it, per job (each job once).
    pub jobs: Vec<(JobId, u64)>,
    /// The processes on it that belong to no job.
    pub foreign: Vec<ForeignProcess>,
}

/// A process on a GPU that belongs to no mgpu job (someone bypassing the scheduler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignProcess {
    pub pid: u32,
    /// Its owner's name (or uid), when /proc still shows the process.
    pub user: Option<String>,
    /// Its memory (1 MiB when the driver does not say).
    pub used_mib: u64,
}

/// Foreign processes listed per GPU, at most (a bound on what a reading keeps and shows).
pub const MAX_FOREIGN_SHOWN: usize = 16;

/// A source of GPUs.
pub trait GpuBackend: Send {
    /// What kind of backend this is, for logs.
    fn describe(&self) -> String;
    /// The GPUs, fixed for the life of the daemon.
    fn gpus(&self) -> Vec<GpuSpec>;
    /// Current memory use; `job_of(pid)` tells which mgpu job a process belongs to, if any.
    /// `None` when the backend has nothing to report (simulated GPUs).
    fn usage(&self, job_of: &dyn Fn(u32) -> Option<JobId>) -> Option<Vec<Usage>>;
}

/// A library the server (root) is to load must be as trustworthy as the server itself: owned
/// by root or the server's user, and neither it nor its directory writable by anyone else
/// (a sticky directory such as /tmp protects a file it holds). A bare name is looked up in the
/// system's library path.
fn check_library(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if path.parent().is_none_or(|d| d.as_os_str().is_empty()) {
        return Ok(());
    }
    let path =
        std::fs::canonicalize(path).with_context(|| format!("--nvml-lib {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    let trusted = |m: &std::fs::Metadata, sticky_ok: bool| {
        (m.uid() == 0 || m.uid() == me)
            && (m.mode() & 0o022 == 0 || (sticky_ok && m.mode() & 0o1000 != 0))
    };
    let file = std::fs::metadata(&path)?;
    let dir = std::fs::metadata(path.parent().unwrap_or(Path::new("/")))?;
    if !file.is_file() || !trusted(&file, false) || !trusted(&dir, true) {
        bail!(
            "--nvml-lib {}: the library and its directory must belong to root (or the server's \
             user) and be writable by no one else",
            path.display()
        );
    }
    Ok(())
}

/// The processes of the running jobs, as one reading of GPU memory sees them.
///
/// A job with cgroups (nearly all, on a machine that offers them) owns exactly the processes in
/// them: the kernel keeps every process the job starts there, however deep its process tree
/// or whatever it does to its session, and nothing else gets in. For jobs without cgroups, a
/// process is a job's when the job's main process or its supervisor is among its ancestors, or
/// it is in the job's session (processes that called setsid or double-forked stay below the
/// supervisor, the job's child subreaper); that walk is bounded, and a leader's pid taken by
/// another process after the leader was collected would mislead it, so it is never used for a
/// job that has cgroups, nor for a process that sits in some job's cgroup.
#[derive(Debug, Default)]
pub struct JobProcesses {
    /// Each running job's cgroup directories (all of them: v2, then v1 hierarchies).
    cgroups: HashMap<PathBuf, JobId>,
    /// Leaders of the jobs without cgroups.
    leaders: Vec<(i32, JobId)>,
    /// Job leaders (each the id of its job's session and process group) and their supervisors,
    /// with their jobs, found when first needed (a GPU with no process needs none of it).
    roots: std::sync::OnceLock<HashMap<i32, JobId>>,
}

/// A running job as [`JobProcesses`] needs it.
#[derive(Debug, Clone)]
pub struct RunningJob {
    pub job: JobId,
    /// Its main process (the id of its session and process group; 0 while unknown).
    pub leader: i32,
    /// Its cgroup directories, as its supervisor recorded them; empty where it has none.
    pub cgroups: Vec<PathBuf>,
}

/// Deeper process trees than this are not followed (a bound on /proc reads per process).
const MAX_ANCESTRY: usize = 256;

impl JobProcesses {
    /// From the running jobs' leaders and their jobs (the supervisors are their parents), for
    /// jobs without cgroups.
    pub fn new(leaders: impl IntoIterator<Item = (i32, JobId)>) -> Self {
        Self::of(leaders.into_iter().map(|(leader, job)| RunningJob {
            job,
            leader,
            cgroups: Vec::new(),
        }))
    }

    /// From the running jobs.
    pub fn of(jobs: impl IntoIterator<Item = RunningJob>) -> Self {
        let mut cgroups = HashMap::new();
        let mut leaders = Vec::new();
        for j in jobs {
            if j.cgroups.is_empty() {
                if j.leader > 1 {
                    leaders.push((j.leader, j.job));
                }
            } else {
                cgroups.extend(j.cgroups.into_iter().map(|d| (d, j.job)));
            }
        }
        JobProcesses {
            cgroups,
            leaders,
            roots: Default::default(),
        }
    }

    fn roots(&self) -> &HashMap<i32, JobId> {
        self.roots.get_or_init(|| {
            let mut roots = HashMap::new();
            for &(leader, job) in &self.leaders {
                roots.insert(leader, job);
                let supervisor = crate::supervisor::stat_field(leader, 1);
                if let Some(supervisor) = supervisor.filter(|&p| p > 1) {
                    roots.insert(supervisor, job);
                }
            }
            roots
        })
    }

    /// Is `pid` one of the jobs' processes?
    pub fn contains(&self, pid: u32) -> bool {
        self.job_of(pid).is_some()
    }

    /// The job `pid` belongs to, if any.
    pub fn job_of(&self, pid: u32) -> Option<JobId> {
        if self.cgroups.is_empty() && self.leaders.is_empty() {
            return None;
        }
        let dirs = crate::cgroup::dirs_of(pid);
        // (A job cgroup has no children of ours, but a nested one would still be the job's.)
        let by_cgroup = dirs
            .iter()
            .flat_map(|d| d.ancestors())
            .find_map(|d| self.cgroups.get(d));
        if let Some(&job) = by_cgroup {
            return Some(job);
        }
        // In a job cgroup that is no running job's (a notification's, a job that ended): the
        // kernel says it is not one of these jobs, whatever its ancestry.
        if self.leaders.is_empty() || dirs.iter().any(|d| crate::cgroup::is_under_jobs(d)) {
            return None;
        }
        self.by_ancestry(i32::try_from(pid).ok()?)
    }

    /// The job without cgroups whose leader or supervisor is an ancestor of `pid`, or whose
    /// session it is in (bounded by [`MAX_ANCESTRY`]).
    fn by_ancestry(&self, mut pid: i32) -> Option<JobId> {
        let roots = self.roots();
        for _ in 0..MAX_ANCESTRY {
            if pid <= 1 {
                return None;
            }
            if let Some(&job) = roots.get(&pid) {
                return Some(job);
            }
            let (ppid, session) = parent_and_session(pid)?;
            if let Some(&job) = roots.get(&session) {
                return Some(job);
            }
            pid = ppid;
        }
        None
    }
}

/// A process's parent and session, from /proc (one read).
fn parent_and_session(pid: i32) -> Option<(i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let mut fields = stat[stat.rfind(')')? + 2..].split_whitespace();
    let ppid = fields.nth(1)?.parse().ok()?;
    let session = fields.nth(1)?.parse().ok()?;
    Some((ppid, session))
}

/// A process's owner (its real uid), from /proc.
fn owner_of(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
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
        format!(
            "{} simulated GPU{}",
            self.gpus.len(),
            if self.gpus.len() == 1 { "" } else { "s" }
        )
    }
    fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.clone()
    }
    fn usage(&self, _: &dyn Fn(u32) -> Option<JobId>) -> Option<Vec<Usage>> {
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
    /// Loads NVML (from `lib`, else `libnvidia-ml.so.1`) and lists its GPUs (only `only`,
    /// when given). A GPU that cannot be read is left out with a warning: the others serve.
    pub fn open(only: Option<&HashSet<u32>>, lib: Option<&Path>) -> Result<Self> {
        if let Some(path) = lib {
            check_library(path)?;
        }
        let nvml = match lib {
            Some(path) => nvml_wrapper::Nvml::builder()
                .lib_path(path.as_os_str())
                .init()
                .with_context(|| format!("cannot load NVML from {}", path.display()))?,
            None => nvml_wrapper::Nvml::init().context("cannot load NVML (libnvidia-ml.so)")?,
        };
        let count = nvml.device_count().context("NVML: counting devices")?;
        let mut gpus = Vec::new();
        for index in 0..count {
            if only.is_some_and(|o| !o.contains(&index)) {
                continue;
            }
            let opened = nvml.device_by_index(index).and_then(|dev| {
                let name = dev.name().unwrap_or_else(|_| "NVIDIA GPU".into());
                Ok((name, dev.memory_info()?))
            });
            match opened {
                Ok((name, mem)) => gpus.push(GpuSpec {
                    index,
                    name,
                    total_mib: mem.total / MIB,
                }),
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e, "NVML: cannot read GPU {index}; it is not managed")
                }
            }
        }
        if let Some(missing) =
            only.and_then(|o| o.iter().find(|i| !gpus.iter().any(|g| g.index == **i)))
        {
            bail!("--gpus names GPU {missing}, which NVML cannot use");
        }
        Ok(Nvml { nvml, gpus })
    }

    /// One GPU's figures.
    fn read(&self, index: u32, job_of: &dyn Fn(u32) -> Option<JobId>) -> Result<Usage, NvmlError> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let dev = self.nvml.device_by_index(index)?;
        let used_mib = dev.memory_info()?.used / MIB;
        // Not every GPU reports its utilisation: that is no error.
        let util_pct = dev.utilization_rates().ok().map(|u| u.gpu.min(100));
        let mut foreign = 0;
        let mut jobs: HashMap<JobId, u64> = HashMap::new();
        let mut foreign_procs = Vec::new();
        // A driver that cannot list one kind of process (graphics, on some GPUs) has none.
        let list = |r: Result<Vec<_>, NvmlError>| match r {
            Err(NvmlError::NotSupported) => Ok(Vec::new()),
            other => other,
        };
        let procs = list(dev.running_compute_processes())?
            .into_iter()
            .chain(list(dev.running_graphics_processes())?);
        // A process listed as both compute and graphics is counted once.
        let mut seen = HashSet::new();
        for p in procs {
            if !seen.insert(p.pid) {
                continue;
            }
            let mib = match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => bytes.div_ceil(MIB),
                UsedGpuMemory::Unavailable => 0,
            };
            match job_of(p.pid) {
                Some(job) => *jobs.entry(job).or_default() += mib,
                None => {
                    // Unknown amount: still a foreign process, so the GPU is not free.
                    let mib = mib.max(1);
                    foreign += mib;
                    if foreign_procs.len() < MAX_FOREIGN_SHOWN {
                        foreign_procs.push(ForeignProcess {
                            pid: p.pid,
                            // (Looked up here, off the daemon's lock.)
                            user: owner_of(p.pid).map(crate::users::name_of),
                            used_mib: mib,
                        });
                    }
                }
            }
        }
        let mut jobs: Vec<(JobId, u64)> = jobs.into_iter().collect();
        jobs.sort_unstable();
        Ok(Usage {
            index,
            used_mib,
            foreign_mib: foreign,
            error: None,
            util_pct,
            jobs,
            foreign: foreign_procs,
        })
    }
}

impl GpuBackend for Nvml {
    fn describe(&self) -> String {
        format!(
            "{} NVIDIA GPU{} (NVML)",
            self.gpus.len(),
            if self.gpus.len() == 1 { "" } else { "s" }
        )
    }
    fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.clone()
    }
    fn usage(&self, job_of: &dyn Fn(u32) -> Option<JobId>) -> Option<Vec<Usage>> {
        let read = |g: &GpuSpec| {
            self.read(g.index, job_of).unwrap_or_else(|e| Usage {
                index: g.index,
                error: Some(e.to_string()),
                ..Usage::default()
            })
        };
        Some(self.gpus.iter().map(read).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's processes are found wherever they went: in its session, and below it or its
    /// supervisor after leaving the session (setsid); other processes are foreign.
    #[test]
    fn job_processes_include_those_that_left_the_session() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        // The "job": a session leader (like a job's main process; this test plays its
        // supervisor) with one child in its session and one that left it (setsid).
        let mut leader = std::process::Command::new("sh");
        leader.arg("-c").arg(format!(
            "sleep 30 & echo $! > {p}.child; setsid sleep 30 & echo $! > {p}.escaped; wait",
            p = pids.display()
        ));
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            leader.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let mut leader = leader.spawn().unwrap();
        let read = |ext: &str| -> u32 {
            let path = pids.with_extension(ext);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                {
                    return pid;
                }
                assert!(std::time::Instant::now() < deadline, "no {ext} pid");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        };
        let (child, escaped) = (read("child"), read("escaped"));
        let other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let jobs = JobProcesses::new([(leader.id() as i32, 7)]);
        assert!(jobs.contains(leader.id()));
        assert_eq!(jobs.job_of(child), Some(7));
        assert!(jobs.contains(child));
        assert!(jobs.contains(escaped), "a process that called setsid");
        // This process is the leader's parent (its "supervisor"): its other children count as
        // the job's too, which is right for a real supervisor (it starts nothing else).
        assert!(jobs.contains(other.id()));
        // Processes elsewhere do not.
        assert!(!jobs.contains(1));
        assert!(!jobs.contains(std::os::unix::process::parent_id()));
        assert!(!JobProcesses::new([]).contains(child));
        assert!(!jobs.contains(u32::MAX));
        for pid in [child, escaped, other.id()] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let mut other = other;
        let _ = other.wait();
        let _ = leader.wait();
    }

    /// `--nvml-lib` loads only a library nobody but root (or the server's user) could have
    /// written.
    #[test]
    fn nvml_lib_must_be_trusted() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::write(&lib, "").unwrap();
        mode(&lib, 0o755);
        check_library(&lib).unwrap();
        check_library(Path::new("libnvidia-ml.so.1")).unwrap(); // the system's search path
        mode(&lib, 0o666);
        assert!(check_library(&lib).is_err(), "a world-writable library");
        mode(&lib, 0o755);
        mode(dir.path(), 0o777);
        assert!(
            check_library(&lib).is_err(),
            "in a world-writable directory"
        );
        mode(dir.path(), 0o1777);
        check_library(&lib).unwrap();
        assert!(check_library(dir.path()).is_err(), "not a file");
        assert!(check_library(&dir.path().join("missing.so")).is_err());
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&lib, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(check_library(&lib).is_err(), "another user's library");
        }
    }

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
