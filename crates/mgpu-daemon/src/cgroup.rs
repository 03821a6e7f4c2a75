//! A cgroup v2 per job, where the machine offers a writable cgroup v2 tree: every process the
//! job starts lands in it and stays there, and `cgroup.kill` ends them all at once, whatever
//! they did to their sessions or parents. Where there is none, containment falls back to the
//! job's process group plus the supervisor's subreaper scan of its descendants.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The job's cgroup directory.
#[derive(Debug)]
pub struct JobCgroup {
    pub dir: PathBuf,
    /// `cgroup.procs`, prepared for the forked child (which must not allocate).
    pub procs: CString,
}

/// Where job cgroups go: beside our own cgroup v2 (mount point and our path in it), read once
/// per process. The launcher reads it before it forks, so supervisors inherit it.
static JOBS_BASE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// The directory that holds job cgroups (`mgpu-jobs` beside our own cgroup), if any.
pub fn jobs_base() -> Option<&'static Path> {
    JOBS_BASE
        .get_or_init(|| Some(cgroup2_mount()?.join(own_cgroup()?).join("mgpu-jobs")))
        .as_deref()
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

/// Our own cgroup v2 path (relative to the mount), from /proc/self/cgroup.
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string())
}

impl JobCgroup {
    /// Creates a cgroup for one run of a job beside ours, or `None` where cgroup v2 is not
    /// writable here.
    pub fn create(job: u64) -> Option<JobCgroup> {
        let base = jobs_base()?;
        // Readable by the job (the daemon's umask is 0077): programs size themselves from
        // their cgroup's limits (cpu.max, memory.max).
        use std::os::unix::fs::PermissionsExt;
        let readable = |d: &Path| {
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        };
        match std::fs::create_dir(base) {
            Ok(()) => readable(base),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        let dir = base.join(format!("job-{job}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        readable(&dir);
        if !dir.join("cgroup.kill").exists() {
            // Too old a kernel to kill a whole cgroup: use the fallback.
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok()?;
        Some(JobCgroup { dir, procs })
    }

    /// Kills every process in the cgroup.
    pub fn kill(&self) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.kill"))
        {
            let _ = f.write_all(b"1");
        }
    }

    /// Signals every process in the cgroup (for SIGTERM and warnings).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Is any process left in it?
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .map(|e| e.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills what is left and removes the cgroup once empty (bounded wait).
    pub fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.populated() && Instant::now() < deadline {
            self.kill();
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. For the forked
/// child: only open/write/close.
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
    let Some(base) = jobs_base() else {
        return;
    };
    let Ok(dir) = std::fs::read_dir(base) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
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

/// Whether this machine gives jobs their own cgroup (for logs).
pub fn available() -> bool {
    cgroup2_mount()
        .zip(own_cgroup())
        .is_some_and(|(m, own)| is_writable_dir(&m.join(own)))
}

fn is_writable_dir(p: &Path) -> bool {
    nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}
