//! Process helpers shared by the systems under test: running a command and checking it,
//! finding and killing processes we started, reading a process's peak RSS.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Runs `cmd` with stdout/stderr captured; fails with its stderr when it exits non-zero.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<&OsStr>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Calls `f` every `every` until it returns `Some`, or fails after `timeout`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// The machine's CPU time counters from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq: work done by anyone on this machine.
    pub busy: u64,
    /// Time the hypervisor ran something else while we wanted the CPU.
    pub steal: u64,
    pub total: u64,
}

/// Reads the machine's CPU time counters.
pub fn cpu_times() -> Option<CpuTimes> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: get(0) + get(1) + get(2) + get(5) + get(6),
        steal: get(7),
        total: (0..8).map(get).sum(),
    })
}

impl CpuTimes {
    /// Busy CPU milliseconds (all processes) since `before`.
    pub fn busy_ms_since(&self, before: &CpuTimes) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        self.busy.saturating_sub(before.busy) as f64 * 1000.0 / hz
    }

    /// The share of CPU time stolen by the hypervisor since `before`, in percent.
    pub fn steal_pct_since(&self, before: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        self.steal.saturating_sub(before.steal) as f64 * 100.0 / total
    }
}

/// A field of `/proc/PID/status` in KiB (e.g. `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of processes (other than us) whose environment contains exactly `entry` ("K=V").
/// Used to find everything a task-spooler instance of ours started.
pub fn pids_with_env(entry: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()))
                .unwrap_or(false)
        })
        .collect()
}

/// Sends `sig` to `pid` (errors ignored: the process may be gone already).
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we started (directly or through the system under test).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+%@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Reads a job's timestamp file (nanoseconds since the epoch) once it exists.
pub fn read_stamp(path: &Path) -> Result<Option<u128>> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            Ok(Some(s.trim().parse().with_context(|| {
                format!("bad timestamp in {}", path.display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoting() {
        assert_eq!(super::shell_quote("/a/b-1"), "/a/b-1");
        assert_eq!(super::shell_quote("it's"), r"'it'\''s'");
        assert_eq!(super::shell_quote(""), "''");
    }
}
