//! Cgroups per job: containment (every process the job starts lands in its cgroups and stays
//! there, whatever it does to its session or parents) and limits (`pids.max`, memory, CPU).
//!
//! On cgroup v2 a job gets one cgroup under `mgpu-jobs/user-UID` beside our own (its owner's
//! parent, whose `pids.max` bounds all that user's jobs together), born into it (clone3
//! `CLONE_INTO_CGROUP`), killed at once with `cgroup.kill`, and limited by the controllers the
//! daemon enabled for `mgpu-jobs` at start ([`setup`]). Controllers that are bound to cgroup v1
//! hierarchies instead (hybrid machines) get a job cgroup in each such hierarchy, which the
//! job's process joins before it drops its privileges (below `user-UID` there too); v1 has no
//! `cgroup.kill`, so those are
//! emptied by killing what their `cgroup.procs` lists until nothing is left. Where there is no
//! writable cgroup at all, containment falls back to the job's process group plus the
//! supervisor's subreaper scan of its descendants, and the limits are not enforced (the daemon
//! says so at start).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers job limits use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Pids,
    Memory,
    Cpu,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Pids, Controller::Memory, Controller::Cpu];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Pids => "pids",
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        }
    }
}

/// The limits of one job (`None`: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub pids_max: Option<u64>,
    pub cpus: Option<u32>,
    pub mem_bytes: Option<u64>,
    /// Most processes of all its owner's jobs together (`pids.max` of the owner's parent).
    pub user_pids_max: Option<u64>,
}

/// The server's per-job limits: `pids.max` for every job, and defaults and caps for what jobs
/// ask for.
#[derive(Debug, Clone, Default)]
pub struct LimitSettings {
    pub pids_max: Option<u64>,
    /// Most processes of one user's jobs together.
    pub user_pids_max: Option<u64>,
    pub default_cpus: Option<u32>,
    pub max_cpus: Option<u32>,
    pub default_host_mem_mib: Option<u64>,
    pub max_host_mem_mib: Option<u64>,
}

impl LimitSettings {
    /// Checks the settings themselves (at start).
    pub fn check(&self) -> Result<(), String> {
        if let (Some(u), Some(j)) = (self.user_pids_max, self.pids_max) {
            if u < j {
                return Err(format!(
                    "--user-pids-max {u} is under --job-pids-max {j}: one job could not reach its own cap"
                ));
            }
        }
        if let (Some(d), Some(m)) = (self.default_cpus, self.max_cpus) {
            if d > m {
                return Err(format!("--default-cpus {d} is over --max-cpus {m}"));
            }
        }
        if let (Some(d), Some(m)) = (self.default_host_mem_mib, self.max_host_mem_mib) {
            if d > m {
                return Err(format!(
                    "--default-host-mem {d} MiB is over --max-host-mem {m} MiB"
                ));
            }
        }
        Ok(())
    }

    /// A job's CPUs and host memory (MiB): what it asked for, else the server's default;
    /// refused with a clear message over a cap, or where this machine cannot enforce it.
    pub fn resolve(
        &self,
        cpus: Option<u32>,
        host_mem_mib: Option<u64>,
    ) -> Result<(Option<u32>, Option<u64>), String> {
        if let Some(n) = cpus {
            if n == 0 {
                return Err("--cpus must be at least 1".into());
            }
            if let Some(max) = self.max_cpus.filter(|m| n > *m) {
                return Err(format!(
                    "--cpus {n} is over this server's cap of {max} CPUs per job (--max-cpus)"
                ));
            }
            if !layout().enforces(Controller::Cpu) {
                return Err(
                    "this server cannot enforce --cpus: no cpu cgroup controller is available to it"
                        .into(),
                );
            }
        }
        if let Some(m) = host_mem_mib {
            if m == 0 {
                return Err("--host-mem must be at least 1 MiB".into());
            }
            if let Some(max) = self.max_host_mem_mib.filter(|x| m > *x) {
                return Err(format!(
                    "--host-mem {m} MiB is over this server's cap of {max} MiB per job (--max-host-mem)"
                ));
            }
            if !layout().enforces(Controller::Memory) {
                return Err("this server cannot enforce --host-mem: no memory cgroup controller is available to it".into());
            }
        }
        Ok((
            cpus.or(self.default_cpus),
            host_mem_mib.or(self.default_host_mem_mib),
        ))
    }
}

/// Where job cgroups go, found once per process (the daemon after [`setup`]; the launcher
/// before it forks supervisors, which inherit it).
#[derive(Debug, Default)]
pub struct Layout {
    /// `mgpu-jobs` beside our own cgroup v2, where cgroup v2 is writable here.
    pub v2: Option<PathBuf>,
    /// Controllers enabled for the cgroups in `v2`.
    pub v2_controllers: Vec<Controller>,
    /// `mgpu-jobs` beside our own cgroup in each v1 hierarchy of a controller not on v2.
    pub v1: Vec<(Controller, PathBuf)>,
}

impl Layout {
    /// Whether a limit of this kind can be enforced here.
    pub fn enforces(&self, c: Controller) -> bool {
        self.v2_controllers.contains(&c) || self.v1.iter().any(|(k, _)| *k == c)
    }
}

static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();

/// Name of the leaf our daemon moves into on cgroup v2 when its own cgroup must hand
/// controllers down (a cgroup with processes in it cannot).
const SERVER_LEAF: &str = "mgpu-server";
const JOBS: &str = "mgpu-jobs";
/// Prefix of a user's parent cgroup under [`JOBS`] (`user-UID`).
const USER_PREFIX: &str = "user-";

/// Most processes the default gives one user: recent systemd raises `kernel.pid_max` to
/// 4,194,304, whose quarter would bound nothing in practice.
pub const DEFAULT_USER_PIDS_CAP: u64 = 32_768;

/// The default bound on one user's processes across jobs: a quarter of the machine's
/// (`kernel.pid_max`), at most [`DEFAULT_USER_PIDS_CAP`], so that no user can take the pids
/// everyone needs, and never under one job's own cap (`job_pids_max`).
pub fn default_user_pids_max(job_pids_max: Option<u64>) -> u64 {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(32_768);
    (pid_max / 4)
        .min(DEFAULT_USER_PIDS_CAP)
        .max(job_pids_max.unwrap_or(0))
}

pub fn layout() -> &'static Layout {
    LAYOUT.get_or_init(find_layout)
}

/// The directory that holds job cgroups on cgroup v2 (`mgpu-jobs` beside our own), if any.
pub fn jobs_base() -> Option<&'static Path> {
    layout().v2.as_deref()
}

/// The controllers of ours enabled for the children of `dir`.
fn handed_down(dir: &Path) -> Vec<Controller> {
    let enabled = read_words(&dir.join("cgroup.subtree_control"));
    Controller::ALL
        .into_iter()
        .filter(|c| enabled.iter().any(|w| w == c.name()))
        .collect()
}

fn find_layout() -> Layout {
    let mut layout = Layout::default();
    let v2 = v2_dirs();
    if let Some((mount, own)) = v2.as_ref().filter(|(_, own)| is_writable_dir(own)) {
        let mut base = own.join(JOBS);
        // Where our own cgroup could not hand controllers down (other processes in it), the
        // daemon set up `mgpu-jobs` under the root cgroup instead (see `setup`).
        let root_base = mount.join(JOBS);
        if root_base != base && handed_down(&root_base).len() > handed_down(&base).len() {
            base = root_base;
        }
        layout.v2_controllers = handed_down(&base);
        layout.v2 = Some(base);
    }
    // A controller offered on v2 is not on v1 (a controller lives in one hierarchy only).
    let on_v2 = v2
        .map(|(mount, _)| read_words(&mount.join("cgroup.controllers")))
        .unwrap_or_default();
    for c in Controller::ALL {
        if on_v2.iter().any(|w| w == c.name()) {
            continue;
        }
        if let Some(own) = v1_own_dir(c).filter(|d| is_writable_dir(d)) {
            layout.v1.push((c, own.join(JOBS)));
        }
    }
    layout
}

fn read_words(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Mounts of cgroup filesystems: (mount point, root of the mount, fs type, super options).
fn cgroup_mounts() -> Vec<(PathBuf, String, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            if fstype != "cgroup2" && fstype != "cgroup" {
                return None;
            }
            let opts = r.nth(1).unwrap_or("");
            let mut l = left.split_whitespace();
            let root = l.nth(3)?;
            let mount = l.next()?;
            Some((
                PathBuf::from(mount),
                root.to_string(),
                fstype.to_string(),
                opts.to_string(),
            ))
        })
        .collect()
}

/// Our own cgroup in the hierarchy whose /proc/self/cgroup line `matches`, as a directory
/// under `mount` (whose root is `root`). The daemon's leaf ([`SERVER_LEAF`]) counts as its
/// parent: job cgroups go beside it.
fn own_dir(mount: &Path, root: &str, matches: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        matches(ctrls).then_some(path)
    })?;
    let path = path.strip_prefix(root).unwrap_or(path);
    let path = path.trim_start_matches('/');
    let path = path.strip_suffix(SERVER_LEAF).unwrap_or(path);
    Some(mount.join(path.trim_end_matches('/')))
}

/// Maps a path of /proc/PID/cgroup in the hierarchy mounted at `mount` (whose root is `root`)
/// to its directory, as [`own_dir`] does for our own.
fn dir_in(mount: &Path, root: &str, path: &str) -> PathBuf {
    let path = path.strip_prefix(root).unwrap_or(path);
    mount.join(path.trim_matches('/'))
}

/// The cgroup mounts, read once per process (they are set up at boot).
fn mounts() -> &'static [(PathBuf, String, String, String)] {
    static MOUNTS: std::sync::OnceLock<Vec<(PathBuf, String, String, String)>> =
        std::sync::OnceLock::new();
    MOUNTS.get_or_init(cgroup_mounts)
}

/// The directories of the cgroups process `pid` is in, in the hierarchies job cgroups use
/// (v2 and the v1 ones of our controllers), as absolute paths like [`JobCgroup::dirs`]. Empty
/// when the process is gone. Membership is the kernel's word: a process cannot leave a job's
/// cgroup (only root may write the files that move it), whatever it does to its session or
/// parents.
pub fn dirs_of(pid: u32) -> Vec<PathBuf> {
    let layout = layout();
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mount = if ctrls.is_empty() {
            if layout.v2.is_none() {
                continue;
            }
            mounts().iter().find(|(_, _, t, _)| t == "cgroup2")
        } else {
            let ours = |c: &Controller| ctrls.split(',').any(|w| w == c.name());
            if !layout.v1.iter().any(|(c, _)| ours(c)) {
                continue;
            }
            mounts().iter().find(|(_, _, t, o)| {
                t == "cgroup" && o.split(',').any(|w| ctrls.split(',').any(|c| c == w))
            })
        };
        if let Some((mount, root, _, _)) = mount {
            out.push(dir_in(mount, root, path));
        }
    }
    out
}

/// Whether `dir` is below one of the directories that hold job cgroups (a job's or a
/// notification's, running or not).
pub fn is_under_jobs(dir: &Path) -> bool {
    let layout = layout();
    let bases = layout.v2.iter().chain(layout.v1.iter().map(|(_, b)| b));
    bases
        .into_iter()
        .any(|base| dir.starts_with(base) && dir != base)
}

/// The cgroup v2 mount point and our own cgroup under it.
fn v2_dirs() -> Option<(PathBuf, PathBuf)> {
    let (mount, root, _, _) = cgroup_mounts()
        .into_iter()
        .find(|(_, _, t, _)| t == "cgroup2")?;
    let own = own_dir(&mount, &root, |c| c.is_empty())?;
    Some((mount, own))
}

fn v1_own_dir(c: Controller) -> Option<PathBuf> {
    let (mount, root, _, _) = cgroup_mounts()
        .into_iter()
        .find(|(_, _, t, o)| t == "cgroup" && o.split(',').any(|w| w == c.name()))?;
    own_dir(&mount, &root, |ctrls| {
        ctrls.split(',').any(|w| w == c.name())
    })
}

/// For the daemon, once at start and before it starts its launcher: enables the pids, memory
/// and cpu controllers for job cgroups on cgroup v2 where it can (moving itself into a leaf of
/// its cgroup when that cgroup holds processes), and creates the `mgpu-jobs` directories.
/// Returns the limits that cannot be enforced here, for a warning.
pub fn setup() -> Vec<Controller> {
    if let Some((mount, own)) = v2_dirs().filter(|(_, own)| is_writable_dir(own)) {
        // The controllers on cgroup v2 at all (the root cgroup offers them all).
        let offered = read_words(&mount.join("cgroup.controllers"));
        let wanted: Vec<Controller> = Controller::ALL
            .into_iter()
            .filter(|c| offered.iter().any(|w| w == c.name()))
            .collect();
        let enable = |dir: &Path, c: Controller| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.subtree_control"))
                .and_then(|mut f| f.write_all(format!("+{}", c.name()).as_bytes()))
        };
        let mut moved = false;
        for &c in &wanted {
            match enable(&own, c) {
                // Our cgroup holds processes (ours): move into a leaf of it, then again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && !moved => {
                    moved = true;
                    let leaf = own.join(SERVER_LEAF);
                    let _ = std::fs::create_dir(&leaf);
                    let _ =
                        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string());
                    let _ = enable(&own, c);
                }
                _ => {}
            }
        }
        // Where our cgroup still cannot hand them down (it holds other processes than ours),
        // job cgroups go under the root cgroup, which may hold processes and hand down
        // controllers alike.
        let mut parent = own.clone();
        if own != mount && handed_down(&own).len() < wanted.len() && is_writable_dir(&mount) {
            for &c in &wanted {
                let _ = enable(&mount, c);
            }
            if handed_down(&mount).len() > handed_down(&own).len() {
                parent = mount.clone();
            }
        }
        let base = parent.join(JOBS);
        let _ = create_readable_dir(&base);
        for c in handed_down(&parent) {
            if wanted.contains(&c) {
                let _ = enable(&base, c);
            }
        }
    }
    let layout = layout();
    for (_, base) in &layout.v1 {
        let _ = create_readable_dir(base);
    }
    Controller::ALL
        .into_iter()
        .filter(|c| !layout.enforces(*c))
        .collect()
}

/// One run's cgroups: a v2 one and/or one per v1 hierarchy in use.
#[derive(Debug)]
pub struct JobCgroup {
    /// The v2 cgroup (the job's process is born into it).
    pub v2: Option<PathBuf>,
    /// The v1 cgroups; the first holds every process of the job when there is no v2 one.
    pub v1: Vec<PathBuf>,
    /// `cgroup.procs` of the v2 cgroup, prepared for the forked child (which must not
    /// allocate), for when it is not born in it.
    pub v2_procs: Option<CString>,
    /// `tasks` of each v1 cgroup, which the (single-threaded) child joins itself: moving the
    /// calling thread alone skips the kernel's global threadgroup lock, whose RCU grace period
    /// costs several milliseconds per join through `cgroup.procs`.
    pub v1_tasks: Vec<CString>,
    /// The v1 pids cgroup, if there is one (see [`JobCgroup::fork_from_pids_v1`]).
    v1_pids: Option<PathBuf>,
    /// Where the memory controller is, if the job has a memory limit (v2: true).
    memory: Option<(PathBuf, bool)>,
}

fn file_of(dir: &Path, name: &str) -> Option<CString> {
    CString::new(dir.join(name).as_os_str().as_bytes()).ok()
}

fn write_limit(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| format!("cannot set {file} of the job's cgroup to {value}: {e}"))
}

/// Writes the limits of `c` into `dir` (`v2`: the v2 file names).
fn apply(dir: &Path, c: Controller, limits: &Limits, v2: bool) -> Result<(), String> {
    const PERIOD: u64 = 100_000;
    match c {
        Controller::Pids => {
            if let Some(n) = limits.pids_max {
                write_limit(dir, "pids.max", &n.to_string())?;
            }
        }
        Controller::Memory => {
            if let Some(b) = limits.mem_bytes {
                let b = b.to_string();
                if v2 {
                    write_limit(dir, "memory.max", &b)?;
                    // Over the limit is over it: no swapping the rest out.
                    if dir.join("memory.swap.max").exists() {
                        write_limit(dir, "memory.swap.max", "0")?;
                    }
                } else {
                    write_limit(dir, "memory.limit_in_bytes", &b)?;
                    // Swap accounting may be off: then only RAM is limited.
                    let _ = write_limit(dir, "memory.memsw.limit_in_bytes", &b);
                }
            }
        }
        Controller::Cpu => {
            if let Some(n) = limits.cpus {
                let quota = u64::from(n) * PERIOD;
                if v2 {
                    write_limit(dir, "cpu.max", &format!("{quota} {PERIOD}"))?;
                } else {
                    write_limit(dir, "cpu.cfs_period_us", &PERIOD.to_string())?;
                    write_limit(dir, "cpu.cfs_quota_us", &quota.to_string())?;
                }
            }
        }
    }
    Ok(())
}

/// The parent cgroup of user `uid`'s jobs below `base` (`user-UID`), made if missing: on v2 it
/// hands `hand_down` on to the jobs' cgroups, and where `pids` it carries the user's bound
/// (`max` when there is none, so that a changed setting applies from the next job on). Never
/// removed: a job's cgroup may be being made below it at any time, and one directory per user
/// is cheap.
fn user_parent(
    base: &Path,
    uid: u32,
    hand_down: &[Controller],
    pids: bool,
    limits: &Limits,
) -> Result<PathBuf, String> {
    let dir = base.join(format!("{USER_PREFIX}{uid}"));
    // (Another job of the user may be making it at the same moment: then it is there.)
    let _ = create_readable_dir(&dir);
    for c in hand_down {
        let _ = write_limit(&dir, "cgroup.subtree_control", &format!("+{}", c.name()));
    }
    // (Where it could not be made, neither can the job's: that hierarchy is then not used.)
    if pids && dir.is_dir() {
        let max = limits.user_pids_max.map_or("max".into(), |n| n.to_string());
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("pids.max"))
            .and_then(|mut f| f.write_all(max.as_bytes()))
            .map_err(|e| {
                format!(
                    "cannot set pids.max of {} (all the user's jobs) to {max}: {e}",
                    dir.display()
                )
            })?;
    }
    Ok(dir)
}

impl JobCgroup {
    /// Creates the cgroups of one run of a job (named after it and this supervisor), with its
    /// limits: `Ok(None)` where this machine offers none. An error (a limit that cannot be
    /// set) leaves nothing behind.
    pub fn create(job: u64, uid: u32, limits: &Limits) -> Result<Option<JobCgroup>, String> {
        Self::create_tagged(&job.to_string(), uid, limits)
    }

    /// [`JobCgroup::create`] for `job-TAG-PID`, below the parent of its owner `uid`: a process
    /// that makes several cgroups for one job at once (the daemon's notifications) tags each
    /// apart. (The PID stays last: see [`remove_stale`].)
    pub fn create_tagged(
        tag: &str,
        uid: u32,
        limits: &Limits,
    ) -> Result<Option<JobCgroup>, String> {
        let layout = layout();
        let name = format!("job-{tag}-{}", std::process::id());
        let mut cg = JobCgroup {
            v2: None,
            v1: Vec::new(),
            v2_procs: None,
            v1_tasks: Vec::new(),
            v1_pids: None,
            memory: None,
        };
        if let Some(base) = &layout.v2 {
            let _ = create_readable_dir(base);
            let pids = layout.v2_controllers.contains(&Controller::Pids);
            let parent = user_parent(base, uid, &layout.v2_controllers, pids, limits)?;
            let dir = parent.join(&name);
            if create_readable_dir(&dir).is_ok() {
                if dir.join("cgroup.kill").exists() {
                    cg.v2_procs = file_of(&dir, "cgroup.procs");
                    cg.v2 = Some(dir);
                } else {
                    // Too old a kernel to kill a whole cgroup: use the fallback.
                    let _ = std::fs::remove_dir(&dir);
                }
            }
        }
        if let Some(dir) = cg.v2.clone() {
            for &c in &layout.v2_controllers {
                if let Err(e) = apply(&dir, c, limits, true) {
                    cg.remove();
                    return Err(e);
                }
                if c == Controller::Memory && limits.mem_bytes.is_some() {
                    cg.memory = Some((dir.clone(), true));
                }
            }
        }
        for (c, base) in &layout.v1 {
            let needed = match c {
                // For pids.max (the job's and its owner's), and for containment where there is
                // no v2 cgroup.
                Controller::Pids => {
                    limits.pids_max.is_some() || limits.user_pids_max.is_some() || cg.v2.is_none()
                }
                Controller::Memory => limits.mem_bytes.is_some(),
                Controller::Cpu => limits.cpus.is_some(),
            };
            if !needed {
                continue;
            }
            let _ = create_readable_dir(base);
            let parent = match user_parent(base, uid, &[], *c == Controller::Pids, limits) {
                Ok(parent) => parent,
                Err(e) => {
                    cg.remove();
                    return Err(e);
                }
            };
            let dir = parent.join(&name);
            if create_readable_dir(&dir).is_err() {
                continue;
            }
            cg.v1_tasks.extend(file_of(&dir, "tasks"));
            cg.v1.push(dir.clone());
            if let Err(e) = apply(&dir, *c, limits, false) {
                cg.remove();
                return Err(e);
            }
            match c {
                Controller::Memory => cg.memory = Some((dir, false)),
                Controller::Pids => cg.v1_pids = Some(dir),
                Controller::Cpu => {}
            }
        }
        Ok((cg.v2.is_some() || !cg.v1.is_empty()).then_some(cg))
    }

    /// For a process about to fork a job's first process on cgroup v1: `tasks` of the job's
    /// pids cgroup, to fork from (a fork, unlike a join, is held to `pids.max` there and in
    /// the user's parent), and of our own, to go back to. `None` where pids are not on v1.
    pub fn fork_from_pids_v1(&self) -> Option<(CString, CString)> {
        let job = self.v1_pids.as_ref()?;
        let own = v1_own_dir(Controller::Pids)?;
        Some((file_of(job, "tasks")?, file_of(&own, "tasks")?))
    }

    /// Rebuilds the handle of a run's cgroups from their directories (see [`JobCgroup::dirs`]).
    pub fn from_dirs(dirs: impl IntoIterator<Item = PathBuf>) -> JobCgroup {
        let mut cg = JobCgroup {
            v2: None,
            v1: Vec::new(),
            v2_procs: None,
            v1_tasks: Vec::new(),
            v1_pids: None,
            memory: None,
        };
        for d in dirs {
            if d.join("cgroup.kill").exists() && cg.v2.is_none() {
                cg.v2 = Some(d);
            } else {
                cg.v1.push(d);
            }
        }
        cg
    }

    /// Every directory of it, the v2 one first.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.v2.iter().chain(&self.v1).map(PathBuf::as_path)
    }

    /// The cgroup that holds every process of the job.
    fn members(&self) -> Option<&Path> {
        self.v2.as_deref().or(self.v1.first().map(PathBuf::as_path))
    }

    /// Kills every process in the cgroup (v1: those there now; see [`JobCgroup::remove`]).
    pub fn kill(&self) {
        if let Some(dir) = &self.v2 {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.kill"))
            {
                let _ = f.write_all(b"1");
            }
        } else {
            self.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Signals every process in the cgroup (for SIGTERM and warnings).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = self.members() else {
            return Vec::new();
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Is any process left in it?
    pub fn populated(&self) -> bool {
        match &self.v2 {
            Some(dir) => std::fs::read_to_string(dir.join("cgroup.events"))
                .map(|e| e.lines().any(|l| l == "populated 1"))
                .unwrap_or(false),
            None => self.v1.iter().any(|d| {
                std::fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
            }),
        }
    }

    /// Whether the OOM killer killed a process of the job (read before [`JobCgroup::remove`]).
    pub fn oom_killed(&self) -> bool {
        let count = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match &self.memory {
            Some((dir, true)) => std::fs::read_to_string(dir.join("memory.events"))
                .ok()
                .and_then(|t| count(&t, "oom_kill "))
                .is_some_and(|n| n > 0),
            Some((dir, false)) => {
                match std::fs::read_to_string(dir.join("memory.oom_control"))
                    .ok()
                    .and_then(|t| count(&t, "oom_kill "))
                {
                    Some(n) => n > 0,
                    // Older kernels: the limit was hit (and nothing could be reclaimed).
                    None => std::fs::read_to_string(dir.join("memory.failcnt"))
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0),
                }
            }
            None => false,
        }
    }

    /// Kills what is left and removes the cgroups once empty (a bounded wait).
    pub fn remove(&self) {
        self.remove_within(Duration::from_secs(10));
    }

    pub fn remove_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.populated() && Instant::now() < deadline {
            self.kill();
            std::thread::sleep(Duration::from_millis(5));
        }
        for dir in self.dirs() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` (or, for a single-threaded
/// caller on cgroup v1, `tasks`) is `procs`. For the forked child: only open/write/close.
///
/// # Safety
/// Async-signal-safe; `procs` must be a valid C string.
pub unsafe fn enter(procs: &CString) -> bool {
    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
    libc::close(fd);
    ok
}

/// Removes job cgroups left by supervisors that are gone (empty ones only).
pub fn remove_stale() {
    let layout = layout();
    let bases = layout.v2.iter().chain(layout.v1.iter().map(|(_, b)| b));
    // Job cgroups are below users' parents, and directly under the base for runs of earlier
    // versions. The users' parents stay (see [`user_parent`]).
    let users = bases.clone().flat_map(|base| {
        std::fs::read_dir(base)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(USER_PREFIX))
            })
            .map(|e| e.path())
    });
    let parents: Vec<PathBuf> = bases.cloned().chain(users).collect();
    for parent in &parents {
        let Ok(dir) = std::fs::read_dir(parent) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.starts_with("job-"))
                .and_then(|n| n.rsplit('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// How jobs are contained here (for the start-up log).
pub fn describe() -> String {
    let layout = layout();
    let mut parts = Vec::new();
    if layout.v2.is_some() {
        parts.push("cgroup v2 per job".to_string());
    }
    if !layout.v1.is_empty() {
        let names: Vec<&str> = layout.v1.iter().map(|(c, _)| c.name()).collect();
        parts.push(format!("cgroup v1 ({})", names.join(", ")));
    }
    if parts.is_empty() {
        "process group + subreaper".into()
    } else {
        parts.join(" + ")
    }
}

fn is_writable_dir(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Makes a cgroup directory readable by the job (the daemon's umask is 0077): programs size
/// themselves from their cgroup's limits (cpu.max, memory.max). Only when it is created here.
fn create_readable_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Defaults apply when a job asks for nothing; requests over a cap, zero requests and
    /// defaults over their caps are refused with the flag named.
    #[test]
    fn limit_settings_apply_defaults_and_caps() {
        let settings = LimitSettings {
            pids_max: Some(4096),
            user_pids_max: Some(8192),
            default_cpus: Some(2),
            max_cpus: Some(8),
            default_host_mem_mib: Some(1024),
            max_host_mem_mib: Some(4096),
        };
        assert_eq!(settings.check(), Ok(()));
        assert_eq!(settings.resolve(None, None), Ok((Some(2), Some(1024))));
        let err = |r: Result<_, String>| r.unwrap_err();
        assert!(err(settings.resolve(Some(9), None)).contains("--max-cpus"));
        assert!(err(settings.resolve(None, Some(4097))).contains("--max-host-mem"));
        assert!(err(settings.resolve(Some(0), None)).contains("at least 1"));
        assert!(err(settings.resolve(None, Some(0))).contains("at least 1"));
        let bad = LimitSettings {
            default_cpus: Some(9),
            ..settings.clone()
        };
        assert!(bad.check().unwrap_err().contains("--default-cpus 9"));
        let bad = LimitSettings {
            default_host_mem_mib: Some(5000),
            ..settings
        };
        assert!(bad.check().unwrap_err().contains("--default-host-mem"));
    }

    /// One user's bound is never under one job's: a job alone could not reach its own cap.
    #[test]
    fn a_users_process_bound_is_at_least_a_jobs() {
        let settings = |user, job| LimitSettings {
            pids_max: job,
            user_pids_max: user,
            ..Default::default()
        };
        assert_eq!(settings(Some(4096), Some(4096)).check(), Ok(()));
        assert_eq!(settings(None, Some(4096)).check(), Ok(()));
        assert_eq!(settings(Some(10), None).check(), Ok(()));
        let err = settings(Some(100), Some(4096)).check().unwrap_err();
        assert!(err.contains("--user-pids-max 100"), "{err}");
        let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let quarter = (pid_max / 4).min(DEFAULT_USER_PIDS_CAP);
        assert_eq!(default_user_pids_max(Some(40)), quarter.max(40));
        assert_eq!(default_user_pids_max(None), quarter);
        assert_eq!(default_user_pids_max(Some(u64::MAX)), u64::MAX);
    }

    #[test]
    fn controllers_have_their_kernel_names() {
        let names: Vec<&str> = Controller::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["pids", "memory", "cpu"]);
    }
}
