//! Starting a job's processes as its owner, and collecting their output.
//!
//! The parent resolves everything (account, groups, argv, environment) first; the forked child
//! then only makes async-signal-safe calls, in this order: `setsid` (the job gets its own
//! session and process group, so it can be signalled as a whole), `setgroups`, `setgid`,
//! `setuid`, a check that `setuid(0)` now fails, and finally `chdir` into the working directory,
//! so the directory is entered with the user's own privileges.
//!
//! The command is passed as argv. Venv activation goes through a fixed bash script that gets
//! the activate path and the command as positional arguments; no user text becomes shell code.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use mgpu_core::JobId;
use mgpu_proto::Venv;
use serde::{Deserialize, Serialize};

use crate::users::Account;

/// What a job runs, as recorded at submit time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub command: Vec<String>,
    pub cwd: String,
    /// Where the job was submitted from, where that is not `cwd` (`SLURM_SUBMIT_DIR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_dir: Option<String>,
    pub env: Vec<(String, String)>,
    pub venv: Venv,
    /// The submitter's umask, applied to the job.
    #[serde(default)]
    pub umask: Option<u32>,
    /// CPUs the job may use (cgroup cpu quota), resolved at submit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Host memory the job may use, in MiB (cgroup memory limit), resolved at submit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_mem_mib: Option<u64>,
    /// A batch script's content: the job runs a copy of it (see [`SCRIPT_WRAPPER`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Files (patterns) that also get the job's stdout / stderr, opened by the job's own
    /// process after it dropped privileges (Slurm's `--output` / `--error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Not before this time (`--begin`); kept in the job's own `begin_at` column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub begin_at: Option<mgpu_core::Millis>,
    /// Who is told when the job begins or ends, and how (see [`crate::notify`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<mgpu_proto::Notify>,
}

/// Everything needed to fork one run of a job. The daemon resolves it and hands it to the
/// job's supervisor as `launch.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub job: JobId,
    pub name: String,
    /// Whose job it is.
    pub uid: u32,
    /// Its account and groups, resolved by the daemon just before the run (the supervisor
    /// resolves them itself when absent).
    #[serde(default)]
    pub account: Option<Account>,
    pub gpus: Vec<u32>,
    /// Which run this is: the job's restart count.
    pub restarts: u32,
    /// When the scheduler started this run (its time slice counts from here).
    #[serde(default)]
    pub started_at: mgpu_core::Millis,
    pub spec: LaunchSpec,
    /// Drop privileges to the account (the server runs as root).
    pub switch_user: bool,
    /// The job's output log (appended to).
    pub log_path: PathBuf,
    /// What this run may add to the log (its job's log budget); beyond it output is read and
    /// discarded, after `log_note`.
    #[serde(default)]
    pub max_log_bytes: Option<u64>,
    #[serde(default)]
    pub log_note: String,
    /// This attempt at starting the run (unique, never 0): a supervisor started for another
    /// attempt (by a server that died meanwhile) finds a different one here and stands down.
    #[serde(default)]
    pub launch_id: u64,
    /// The job array task it is, if any (`MGPU_ARRAY_*` variables).
    #[serde(default)]
    pub array: Option<mgpu_core::ArrayTask>,
    /// Most processes the job may have (cgroup `pids.max`), from the server's settings.
    #[serde(default)]
    pub pids_max: Option<u64>,
    /// Most processes all its owner's jobs may have together (`pids.max` of the owner's parent
    /// cgroup), from the server's settings.
    #[serde(default)]
    pub user_pids_max: Option<u64>,
    /// The resource limits the job gets (a login's: see [`crate::userlimits`]), applied before
    /// privileges are dropped; empty: the supervisor's own.
    #[serde(default)]
    pub rlimits: Vec<crate::userlimits::Rlimit>,
    /// Its GPU memory reservation on each GPU in MiB (`None`: exclusive GPUs), and the largest
    /// total memory among its GPUs: the frameworks' memory settings are derived from them.
    #[serde(default)]
    pub mem_mib: Option<u64>,
    #[serde(default)]
    pub gpu_total_mib: Option<u64>,
    /// The daemon passes the job's stdin (its `mgpu_srun`'s) over the link before anything
    /// else; without it the job's stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// `--pty`: the job runs on a new terminal of this size (rows, columns), its controlling
    /// terminal; what the daemon passes as stdin then carries keystrokes and window sizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<[u16; 2]>,
}

/// A started job: its process (leader of its own session and process group) and the read ends
/// of its stdout and stderr pipes.
pub struct Started {
    pub pid: libc::pid_t,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Whether the process exec'd the command is not known yet (it was forked and, as its
    /// user, may be stopped before its exec for as long as that user likes): read its report
    /// with [`StartReport::read`] once it has exited.
    pub report: Option<StartReport>,
    /// With `-o`/`-e`: the threads that take the files the job's process opened (as its user)
    /// and write its output into them with the user's rights; see [`crate::outfiles`].
    pub outputs: Option<crate::outfiles::OutputWriters>,
}

/// Most digits a `%Nj`-style padding gives: sbatch(1) caps it at 10 too.
const MAX_PATTERN_PAD: usize = 10;

/// Expands Slurm's filename patterns: `%j` job id, `%A` array id (the job's own id outside an
/// array), `%a` task index (4294967294 outside an array, as Slurm), `%x` job name, `%u` user,
/// `%%` a `%`. A number between `%` and the letter zero-pads a number to that many digits
/// (`%3a`: `007`; at most 10, as sbatch), and is ignored for a name. Other `%` sequences stay
/// as they are.
pub fn expand_output_pattern(pattern: &str, launch: &Launch, user: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.next_if(char::is_ascii_digit) {
            digits.push(d);
        }
        // (Digits past the cap only make the number larger: the cap is what counts.)
        let width = digits.parse::<usize>().map_or(
            if digits.is_empty() {
                0
            } else {
                MAX_PATTERN_PAD
            },
            |w| w.min(MAX_PATTERN_PAD),
        );
        let number = |n: u64| format!("{n:0width$}");
        match chars.peek().copied() {
            Some('j') => out.push_str(&number(launch.job)),
            Some('A') => out.push_str(&number(launch.array.map_or(launch.job, |a| a.job))),
            Some('a') => out.push_str(&number(launch.array.map_or(4294967294, |a| a.task.into()))),
            Some('x') => out.push_str(&launch.name.replace('/', "_")),
            Some('u') => out.push_str(user),
            Some('%') if digits.is_empty() => out.push('%'),
            // Not a code: kept as written, the next character read on its own.
            _ => {
                out.push('%');
                out.push_str(&digits);
                continue;
            }
        }
        chars.next();
    }
    out
}

/// The report pipe of a forked job process: a failure before exec writes (step, errno) on it;
/// an exec closes it empty.
pub struct StartReport {
    pipe: OwnedFd,
    program: String,
    /// The `-o`/`-e` files, for a failure to open them.
    outputs: String,
}

impl StartReport {
    /// Why the job's process failed to start, if it did. Never blocks: for a process that has
    /// exited (its end of the pipe is closed, the report in it if any).
    pub fn read(self) -> Option<StartError> {
        let mut report = [0u8; 4];
        // Non-blocking (set on our end only): whatever happens, no wait on the job.
        let _ = nix::fcntl::fcntl(
            self.pipe.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        let mut f = std::fs::File::from(self.pipe);
        let n = loop {
            match f.read(&mut report) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.unwrap_or(0),
            }
        };
        start_error(&report[..n], &self.program, &self.outputs)
    }
}

/// Starting failed; `message` says why, for the log and the user.
#[derive(Debug)]
pub struct StartError {
    pub message: String,
    /// The exit code a shell would give (127 not found, 126 not executable, else 1).
    pub code: i32,
}

/// Runs `activate` then `exec`s the command; all user text arrives as positional parameters.
const VENV_SCRIPT: &str = r#"act="$1"; shift
. "$act" || { echo "mgpu: could not activate the venv ($act)" >&2; exit 1; }
exec "$@""#;

const BASH: &str = "/bin/bash";

/// The venv to activate: `(activate script, always)`. With `always` false (`~/venv`), the
/// script is used only if the user can read it, which the child checks after dropping
/// privileges (root's view of a user's home does not count, e.g. on root-squashed NFS).
fn activate_script(launch: &Launch, account: &Account) -> Option<(PathBuf, bool)> {
    match &launch.spec.venv {
        Venv::Off => None,
        Venv::Dir(dir) => Some((Path::new(dir).join("bin/activate"), true)),
        Venv::Auto => Some((account.home.join("venv/bin/activate"), false)),
    }
}

/// argv running the command through the fixed venv script.
fn venv_argv(activate: &Path, command: &[String]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        BASH.into(),
        "-c".into(),
        VENV_SCRIPT.into(),
        "mgpu-venv".into(),
    ];
    args.push(activate.as_os_str().to_owned());
    args.extend(command.iter().map(Into::into));
    args
}

/// Runs a batch script's copy, like sbatch's spool copy: writes it (its pieces, from the
/// environment variables `MGPU_SCRIPT_0`.. — private to the user, unlike argv, which anyone may
/// read in /proc — then unset) into a fresh private directory under `$TMPDIR` (else /tmp), as
/// the user, runs it there with its arguments (its `#!` line chooses the interpreter), and
/// removes the directory when it ends. No user text becomes shell code (`eval` only builds a
/// variable's name from a counter). The shell stays the job's first process: it passes on the
/// script's exit status, and survives the `--signal` warnings (USR1/USR2) meant for the script.
pub const SCRIPT_WRAPPER: &str = r#"name=$1; n=$2; shift 2
d=$(mktemp -d "${TMPDIR:-/tmp}/mgpu-job.XXXXXX") || { echo "mgpu: cannot create a directory for the job's script copy" >&2; exit 1; }
trap 'rm -rf "$d"' EXIT
trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; trap : USR1 USR2
f="$d/$name"
i=0; while [ "$i" -lt "$n" ]; do eval "printf '%s' \"\$MGPU_SCRIPT_$i\""; i=$((i + 1)); done > "$f" && chmod 700 "$f" || { echo "mgpu: cannot write the job's script copy in $d" >&2; exit 1; }
i=0; while [ "$i" -lt "$n" ]; do unset "MGPU_SCRIPT_$i"; i=$((i + 1)); done
"$f" "$@""#;

/// Pieces a script is cut into for its environment (the kernel takes at most 128 KiB per
/// string).
const SCRIPT_PIECE: usize = 96 << 10;

/// A batch script in pieces, for [`SCRIPT_WRAPPER`].
fn script_pieces(script: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest = script;
    while !rest.is_empty() {
        let mut cut = rest.len().min(SCRIPT_PIECE);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        pieces.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    pieces
}

/// The command as exec'd: a batch script runs through [`SCRIPT_WRAPPER`].
fn job_command(spec: &LaunchSpec) -> Vec<String> {
    let Some(script) = &spec.script else {
        return spec.command.clone();
    };
    let name = spec
        .command
        .first()
        .and_then(|c| Path::new(c).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| "script".into());
    let mut argv = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        SCRIPT_WRAPPER.into(),
        "mgpu-script".into(),
        name,
        script_pieces(script).len().to_string(),
    ];
    argv.extend(spec.command.iter().skip(1).cloned());
    argv
}

/// The argv exec'd unless the child switches to the venv script.
fn argv(launch: &Launch, account: &Account) -> Vec<std::ffi::OsString> {
    let command = job_command(&launch.spec);
    match activate_script(launch, account) {
        Some((activate, true)) => venv_argv(&activate, &command),
        _ => command.iter().map(Into::into).collect(),
    }
}

/// NUL-terminated pointer arrays for execve, built before fork (the child must not allocate).
struct ExecArrays {
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned by the same struct and never mutated.
unsafe impl Send for ExecArrays {}
unsafe impl Sync for ExecArrays {}

fn exec_arrays(args: &[std::ffi::OsString], env: &[(String, String)]) -> Option<ExecArrays> {
    let mut strings = Vec::new();
    for a in args {
        strings.push(CString::new(a.as_bytes()).ok()?);
    }
    for (k, v) in env {
        strings.push(CString::new(format!("{k}={v}")).ok()?);
    }
    let ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    let (a, e) = ptrs.split_at(args.len());
    let mut argv = a.to_vec();
    argv.push(std::ptr::null());
    let mut envp = e.to_vec();
    envp.push(std::ptr::null());
    Some(ExecArrays {
        _strings: strings,
        argv,
        envp,
    })
}

fn environment(launch: &Launch, account: &Account) -> Vec<(String, String)> {
    let a = account;
    let mut env: Vec<(String, String)> = launch
        .spec
        .env
        .iter()
        .filter(|(k, _)| !k.is_empty() && !k.contains('=') && !k.contains('\0'))
        .cloned()
        .collect();
    let gpus: Vec<String> = launch.gpus.iter().map(u32::to_string).collect();
    let set = [
        ("USER", a.name.clone()),
        ("LOGNAME", a.name.clone()),
        ("HOME", a.home.to_string_lossy().into_owned()),
        ("SHELL", a.shell.to_string_lossy().into_owned()),
        ("CUDA_VISIBLE_DEVICES", gpus.join(",")),
        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string()),
        ("MGPU_JOB_ID", launch.job.to_string()),
        ("MGPU_JOB_NAME", launch.name.clone()),
        ("MGPU_RESTART_COUNT", launch.restarts.to_string()),
        // What Slurm scripts read, so that they run unchanged.
        ("SLURM_JOB_ID", launch.job.to_string()),
        ("SLURM_JOBID", launch.job.to_string()),
        ("SLURM_JOB_NAME", launch.name.clone()),
        (
            "SLURM_SUBMIT_DIR",
            (launch.spec.submit_dir.clone()).unwrap_or_else(|| launch.spec.cwd.clone()),
        ),
    ];
    // A job submitted from inside an array task is not a task of that array.
    env.retain(|(k, _)| {
        !set.iter().any(|(s, _)| s == k)
            && !k.starts_with("MGPU_ARRAY_")
            && !k.starts_with("SLURM_ARRAY_")
    });
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".into(),
        ));
    }
    env.extend(set.into_iter().map(|(k, v)| (k.to_string(), v)));
    // Slurm's, for a job with a CPU quota (`-c N`, or the server's default); one inherited
    // from the submitter's environment would claim a quota this job does not have.
    env.retain(|(k, _)| k != "SLURM_CPUS_PER_TASK");
    if let Some(n) = launch.spec.cpus {
        env.push(("SLURM_CPUS_PER_TASK".into(), n.to_string()));
    }
    // A batch script's content, for the wrapper (which unsets it before running the script).
    env.retain(|(k, _)| !k.starts_with("MGPU_SCRIPT_"));
    if let Some(script) = &launch.spec.script {
        env.extend(
            (script_pieces(script).into_iter().enumerate())
                .map(|(i, p)| (format!("MGPU_SCRIPT_{i}"), p)),
        );
    }
    env.retain(|(k, _)| k != "MGPU_GPU_MEM_MIB");
    env.extend(framework_memory(launch.mem_mib, launch.gpu_total_mib, &env));
    if let Some(t) = launch.array {
        env.extend(
            [
                ("MGPU_ARRAY_JOB_ID", t.job.to_string()),
                ("MGPU_ARRAY_TASK_ID", t.task.to_string()),
                ("MGPU_ARRAY_TASK_COUNT", t.count.to_string()),
                ("MGPU_ARRAY_TASK_MIN", t.min.to_string()),
                ("MGPU_ARRAY_TASK_MAX", t.max.to_string()),
                ("SLURM_ARRAY_JOB_ID", t.job.to_string()),
                ("SLURM_ARRAY_TASK_ID", t.task.to_string()),
                ("SLURM_ARRAY_TASK_COUNT", t.count.to_string()),
                ("SLURM_ARRAY_TASK_MIN", t.min.to_string()),
                ("SLURM_ARRAY_TASK_MAX", t.max.to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
    }
    env
}

/// What keeps common frameworks inside a job's GPU memory reservation (`mem_mib` on each GPU,
/// the largest of which has `total_mib`): the reservation itself for code that caps itself
/// (PyTorch's `set_per_process_memory_fraction`), JAX's memory fraction (its default
/// preallocates 75 % of the GPU), TensorFlow's on-demand growth (its default takes almost all).
/// Variables the user's environment (`env`) sets are left as they are; exclusive jobs get none.
fn framework_memory(
    mem_mib: Option<u64>,
    total_mib: Option<u64>,
    env: &[(String, String)],
) -> Vec<(String, String)> {
    let Some(mem) = mem_mib else {
        return Vec::new();
    };
    let mut out = vec![("MGPU_GPU_MEM_MIB", mem.to_string())];
    // The fraction of the largest GPU, rounded down: on a smaller GPU it is even less.
    let per_10k = total_mib
        .filter(|&t| t > 0)
        .map(|t| (u128::from(mem) * 10_000 / u128::from(t)).min(10_000) as u64);
    match per_10k {
        Some(f) if f > 0 => out.push((
            "XLA_PYTHON_CLIENT_MEM_FRACTION",
            format!("{}.{:04}", f / 10_000, f % 10_000)
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string(),
        )),
        // Too small a share to express: no preallocation at all.
        _ => out.push(("XLA_PYTHON_CLIENT_PREALLOCATE", "false".into())),
    }
    out.push(("TF_FORCE_GPU_ALLOW_GROWTH", "true".into()));
    out.into_iter()
        .filter(|(k, _)| !env.iter().any(|(e, _)| e == k))
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Steps of the child between fork and exec; a failure is reported as (step, errno).
#[derive(Clone, Copy)]
#[repr(u8)]
enum Step {
    Stdio = 1,
    Session,
    Cgroup,
    Groups,
    Gid,
    Uid,
    PrivilegesKept,
    Chdir,
    Venv,
    Exec,
    Limits,
    Output,
}

impl Step {
    fn describe(code: u8) -> &'static str {
        match code {
            1 => "cannot set up the job's output",
            2 => "cannot start the job's session",
            3 => "cannot enter the job's cgroup",
            4 => "cannot set the job's supplementary groups",
            5 => "cannot switch to the job's group",
            6 => "cannot switch to the job's user",
            7 => "privileges could not be dropped",
            8 => "cannot enter the working directory",
            9 => "cannot run /bin/bash to activate ~/venv",
            11 => "cannot apply the user's resource limits (limits.conf)",
            _ => "cannot execute the command",
        }
    }
}

/// `struct clone_args` of clone3(2) (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The child's stack when it shares our memory (see [`spawn_shared`]): it only runs [`child`],
/// which calls no deeper than a few libc wrappers.
const CHILD_STACK: usize = 256 * 1024;

/// Where [`child`] finds its inputs when it runs on its own stack.
struct ChildArgs<'a> {
    plan: &'a ChildPlan,
    stdio: [libc::c_int; 3],
    report: libc::c_int,
    joined: bool,
}

extern "C" fn child_entry(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the `ChildArgs` of `spawn_shared`, whose caller is suspended (vfork) and
    // keeps it alive until we exec or exit.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        child(a.plan, a.stdio, a.report, a.joined)
    }
}

/// clone3(2) with the child running `entry(arg)` on the stack that `args` names; returns the
/// child's pid, or `-errno`.
///
/// # Safety
/// `args` must name a valid, 16-byte aligned stack, and `entry` must never return.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_on_stack(
    args: &mut CloneArgs,
    entry: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // The child starts on its new (empty) stack with the parent's registers, so it finds
    // `entry` and `arg` in callee-saved registers, as glibc's own clone trampoline does.
    std::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        "xor ebp, ebp",
        "mov rdi, r12",
        "call r13",
        "ud2",
        "2:",
        inlateout("rax") libc::SYS_clone3 => ret,
        in("rdi") args as *mut CloneArgs,
        in("rsi") std::mem::size_of::<CloneArgs>(),
        in("r12") arg,
        in("r13") entry,
        lateout("rcx") _,
        lateout("r11") _,
    );
    ret
}

/// Starts the child the way `posix_spawn` does: sharing our memory (`CLONE_VM | CLONE_VFORK`),
/// on a stack of its own, while we wait for it to exec or exit. Nothing is copied and nothing
/// faults in copy-on-write; that is about a third of a trivial job's start-up on a VM. With a
/// cgroup directory the child is born in it. Returns `None` where this kernel or architecture
/// cannot do it (the caller forks instead), else the child's pid.
///
/// # Safety
/// `args.plan` must hold everything [`child`] needs (it must not allocate).
unsafe fn spawn_shared(
    cgroup_dir: Option<&OwnedFd>,
    args: &ChildArgs,
) -> Option<io::Result<libc::pid_t>> {
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (
            cgroup_dir,
            args,
            child_entry as extern "C" fn(*mut libc::c_void) -> !,
        );
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let page = 4096;
        let stack = libc::mmap(
            std::ptr::null_mut(),
            CHILD_STACK + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        );
        if stack == libc::MAP_FAILED {
            return Some(Err(io::Error::last_os_error()));
        }
        // A guard page below it: an overflow faults instead of writing into our memory.
        libc::mprotect(stack, page, libc::PROT_NONE);
        let mut clone_args = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64,
            exit_signal: libc::SIGCHLD as u64,
            stack: stack as u64 + page as u64,
            stack_size: CHILD_STACK as u64,
            ..CloneArgs::default()
        };
        if let Some(dir) = cgroup_dir {
            clone_args.flags |= CLONE_INTO_CGROUP;
            clone_args.cgroup = dir.as_raw_fd() as u64;
        }
        // No signal handler of ours may run on the child's side before it has reset them all.
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let ret = clone3_on_stack(
            &mut clone_args,
            child_entry,
            args as *const ChildArgs as *mut libc::c_void,
        );
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        // The child has exec'd or exited: its stack is ours again.
        libc::munmap(stack, CHILD_STACK + page);
        match ret {
            pid if pid > 0 => Some(Ok(pid as libc::pid_t)),
            // Kernels before 5.3 (no clone3) or 5.7 (no CLONE_INTO_CGROUP), or a seccomp
            // policy that refuses clone3: fork instead.
            e if e == -(libc::ENOSYS as libc::c_long)
                || e == -(libc::E2BIG as libc::c_long)
                || e == -(libc::EINVAL as libc::c_long)
                || e == -(libc::EPERM as libc::c_long) =>
            {
                None
            }
            e => Some(Err(io::Error::from_raw_os_error(-e as i32))),
        }
    }
}

/// Forks. With a cgroup directory, the child is born in it (clone3 `CLONE_INTO_CGROUP`): moving
/// a process into a cgroup afterwards takes a machine-wide lock that costs milliseconds.
/// Returns the child's pid (0 in the child) and whether it already is in the cgroup.
///
/// # Safety
/// As fork(2): the child may only make async-signal-safe calls.
unsafe fn fork_into(cgroup_dir: Option<&OwnedFd>) -> io::Result<(libc::pid_t, bool)> {
    if let Some(dir) = cgroup_dir {
        let mut args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        let pid = libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        );
        if pid >= 0 {
            return Ok((pid as libc::pid_t, true));
        }
        // At the cgroup's pids.max (the job's or its user's): joining it after a fork would
        // not be held to it.
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EAGAIN) {
            return Err(error);
        }
        // Older kernels: fork, then join the cgroup the slow way.
    }
    match libc::fork() {
        -1 => Err(io::Error::last_os_error()),
        pid => Ok((pid, false)),
    }
}

/// What the child needs, prepared before the fork (it must not allocate).
struct ChildPlan {
    /// Candidate paths of the program (PATH search done by trying them in order).
    candidates: Vec<CString>,
    arrays: ExecArrays,
    venv_switch: Option<(CString, ExecArrays)>,
    cgroup_procs: Option<CString>,
    v1_tasks: Vec<CString>,
    switch_user: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    cwd: CString,
    umask: Option<u32>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    /// Make stdin (a terminal) the controlling terminal of the job's new session.
    ctty: bool,
    /// `-o` / `-e` paths (as given, relative to `cwd`), opened as the user and sent on `link`.
    outputs: Option<OutputPlan>,
}

struct OutputPlan {
    out: Option<CString>,
    err: Option<CString>,
    link: libc::c_int,
    /// A later run of the job (after a context switch) adds to what the earlier ones wrote.
    append: bool,
}

/// Opens one output file as the (already switched) user: never following into something that
/// could block; truncated at the job's first run like Slurm's default `--open-mode=truncate`,
/// appended to by its later runs (after context switches).
///
/// # Safety
/// Async-signal-safe; for the child between fork and exec.
unsafe fn open_output(path: &CString, append: bool) -> Option<libc::c_int> {
    let mode = if append {
        libc::O_APPEND
    } else {
        libc::O_TRUNC
    };
    let fd = libc::open(
        path.as_ptr(),
        libc::O_WRONLY | libc::O_CREAT | mode | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        0o666,
    );
    if fd < 0 {
        return None;
    }
    let mut st: libc::stat = std::mem::zeroed();
    let kind = if libc::fstat(fd, &mut st) == 0 {
        st.st_mode & libc::S_IFMT
    } else {
        0
    };
    if kind != libc::S_IFREG && kind != libc::S_IFCHR {
        libc::close(fd);
        *libc::__errno_location() = libc::EINVAL;
        return None;
    }
    Some(fd)
}

/// The job's side of the fork. Never returns: execs, or reports (step, errno) on `report` and
/// exits 127.
///
/// # Safety
/// Runs in a freshly forked child: async-signal-safe calls only, on data prepared earlier.
unsafe fn child(plan: &ChildPlan, stdio: [libc::c_int; 3], report: libc::c_int, joined: bool) -> ! {
    let fail = |step: Step| -> ! {
        let errno = *libc::__errno_location();
        let msg = [step as u8, errno as u8, (errno >> 8) as u8, 0];
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127);
    };
    for (target, fd) in stdio.iter().enumerate() {
        if libc::dup2(*fd, target as libc::c_int) < 0 {
            fail(Step::Stdio);
        }
    }
    // The supervisor blocks SIGCHLD (it reads it from a signalfd) and, like any Rust program,
    // ignores SIGPIPE; a server started under nohup ignores SIGHUP. The job starts clean:
    // nothing blocked, every signal at its default.
    // Dispositions first: a child that shares our memory starts with every signal blocked.
    // (32 and 33 belong to the C library, which refuses to touch them.)
    for sig in (1..32).chain(libc::SIGRTMIN()..=libc::SIGRTMAX()) {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    if libc::setsid() < 0 {
        fail(Step::Session);
    }
    if plan.ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
        fail(Step::Session);
    }
    // The supervisor shields itself from the OOM killer; the job must not inherit that.
    let fd = libc::open(
        c"/proc/self/oom_score_adj".as_ptr(),
        libc::O_WRONLY | libc::O_CLOEXEC,
    );
    if fd >= 0 {
        libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
    }
    if let (Some(procs), false) = (&plan.cgroup_procs, joined) {
        if !crate::cgroup::enter(procs) {
            fail(Step::Cgroup);
        }
    }
    // Cgroup v1 hierarchies (limits on hybrid machines): joined while still privileged.
    for tasks in &plan.v1_tasks {
        if !crate::cgroup::enter(tasks) {
            fail(Step::Cgroup);
        }
    }
    // A login's limits, set while we may still raise hard limits.
    for (resource, limit) in &plan.rlimits {
        if libc::setrlimit(*resource, limit) != 0 {
            fail(Step::Limits);
        }
    }
    if plan.switch_user {
        // Raw system calls: glibc's wrappers would try to change every thread the parent had
        // (and wait for them forever after a raw clone3); this child has exactly one.
        if libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()) != 0 {
            fail(Step::Groups);
        }
        if libc::syscall(libc::SYS_setgid, plan.gid) != 0 {
            fail(Step::Gid);
        }
        if libc::syscall(libc::SYS_setuid, plan.uid) != 0 {
            fail(Step::Uid);
        }
        if plan.uid != 0 && libc::syscall(libc::SYS_setuid, 0) == 0 {
            *libc::__errno_location() = libc::EPERM;
            fail(Step::PrivilegesKept);
        }
    }
    if libc::chdir(plan.cwd.as_ptr()) != 0 {
        fail(Step::Chdir);
    }
    // Nothing of ours leaks into the job: every descriptor above stdio closes on exec (the
    // report pipe too, which tells the parent that exec happened).
    libc::syscall(
        libc::SYS_close_range,
        3u32,
        u32::MAX,
        libc::CLOSE_RANGE_CLOEXEC,
    );
    // Never the daemon's own umask (0077): the submitter's, else the usual 0022.
    libc::umask(plan.umask.unwrap_or(0o022) as libc::mode_t);
    if let Some(o) = &plan.outputs {
        // Opened as the user, from the working directory, and handed to the supervisor.
        let mut fds = [-1 as libc::c_int; 2];
        let mut count = 0;
        let mut mask = 0u8;
        for (i, path) in [&o.out, &o.err].into_iter().enumerate() {
            if let Some(path) = path {
                match open_output(path, o.append) {
                    Some(fd) => {
                        fds[count] = fd;
                        count += 1;
                        mask |= 1 << i;
                    }
                    None => fail(Step::Output),
                }
            }
        }
        let mut iov = libc::iovec {
            iov_base: (&mut mask as *mut u8).cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        let space = libc::CMSG_SPACE((count * std::mem::size_of::<libc::c_int>()) as u32);
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN((count * std::mem::size_of::<libc::c_int>()) as u32) as _;
        let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
        for (i, fd) in fds.iter().take(count).enumerate() {
            data.add(i).write_unaligned(*fd);
        }
        if libc::sendmsg(o.link, &msg, libc::MSG_NOSIGNAL) < 0 {
            fail(Step::Output);
        }
    }
    if let Some((activate, arrays)) = &plan.venv_switch {
        if libc::access(activate.as_ptr(), libc::R_OK) == 0 {
            libc::execve(arrays.argv[0], arrays.argv.as_ptr(), arrays.envp.as_ptr());
            fail(Step::Venv);
        }
    }
    // PATH search: the first candidate that exists and may be executed.
    let mut first_error = 0;
    for path in &plan.candidates {
        libc::execve(
            path.as_ptr(),
            plan.arrays.argv.as_ptr(),
            plan.arrays.envp.as_ptr(),
        );
        let e = *libc::__errno_location();
        if first_error == 0 || (first_error == libc::ENOENT && e != libc::ENOENT) {
            first_error = e;
        }
    }
    *libc::__errno_location() = if first_error == 0 {
        libc::ENOENT
    } else {
        first_error
    };
    fail(Step::Exec);
}

/// Where to look for `program`: itself when it has a slash, else each PATH entry.
fn candidates(program: &str, path: &str) -> Vec<CString> {
    if program.contains('/') {
        return CString::new(program).into_iter().collect();
    }
    path.split(':')
        .map(|dir| if dir.is_empty() { "." } else { dir })
        .filter_map(|dir| CString::new(format!("{dir}/{program}")).ok())
        .collect()
}

/// Forks and execs the job as `account`, born into `cgroup` when given.
pub fn start(
    launch: &Launch,
    account: &Account,
    cgroup: Option<&crate::cgroup::JobCgroup>,
) -> Result<Started, StartError> {
    start_with(launch, account, cgroup, true, None)
}

/// [`start`], with `stdin` as the job's stdin instead of `/dev/null`.
pub fn start_with_stdin(
    launch: &Launch,
    account: &Account,
    cgroup: Option<&crate::cgroup::JobCgroup>,
    stdin: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Started, StartError> {
    start_with(launch, account, cgroup, true, stdin)
}

/// [`start`], with the shared-memory start (`shared`) or the fork it falls back to.
fn start_with(
    launch: &Launch,
    account: &Account,
    cgroup: Option<&crate::cgroup::JobCgroup>,
    shared: bool,
    stdin: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Started, StartError> {
    let fail = |message: String, code: i32| StartError { message, code };
    let cwd = CString::new(launch.spec.cwd.as_bytes())
        .map_err(|_| fail("the working directory contains a NUL byte".into(), 1))?;
    let args = argv(launch, account);
    let env = environment(launch, account);
    let nul = || fail("the command or environment contains a NUL byte".into(), 1);
    let arrays = exec_arrays(&args, &env).ok_or_else(nul)?;
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/bin:/bin");
    let program = args[0].to_string_lossy().into_owned();
    // `~/venv`: probed by the child, as the user; if readable, it execs this instead.
    let venv_switch = match activate_script(launch, account) {
        Some((activate, false)) => {
            let path = CString::new(activate.as_os_str().as_bytes())
                .map_err(|_| fail("the venv path contains a NUL byte".into(), 1))?;
            let arrays = exec_arrays(&venv_argv(&activate, &job_command(&launch.spec)), &env)
                .ok_or_else(nul)?;
            Some((path, arrays))
        }
        _ => None,
    };
    // -o / -e: expanded here, opened by the child as the user, sent back on a socket.
    let expand = |p: &Option<String>| {
        p.as_ref()
            .map(|p| expand_output_pattern(p, launch, &account.name))
    };
    let (out_path, mut err_path) = (expand(&launch.spec.output), expand(&launch.spec.error));
    if err_path.is_some() && err_path == out_path {
        err_path = None; // one file for both streams
    }
    let outputs_text = [&out_path, &err_path]
        .into_iter()
        .flatten()
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(" and ");
    let output_link = if out_path.is_some() || err_path.is_some() {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| fail(format!("mgpu: cannot create a socket: {e}"), 1))?;
        Some((ours, theirs))
    } else {
        None
    };
    let cpath = |p: Option<String>| -> Result<Option<CString>, StartError> {
        p.map(|p| {
            CString::new(p).map_err(|_| fail("the output path contains a NUL byte".into(), 1))
        })
        .transpose()
    };
    let names = (out_path.clone(), err_path.clone());
    let outputs = match &output_link {
        Some((_, theirs)) => Some(OutputPlan {
            out: cpath(out_path)?,
            err: cpath(err_path)?,
            link: theirs.as_raw_fd(),
            append: launch.restarts > 0,
        }),
        None => None,
    };
    let plan = ChildPlan {
        outputs,
        candidates: candidates(&program, path),
        arrays,
        venv_switch,
        cgroup_procs: cgroup.and_then(|c| c.v2_procs.clone()),
        v1_tasks: cgroup.map(|c| c.v1_tasks.clone()).unwrap_or_default(),
        switch_user: launch.switch_user,
        uid: account.uid,
        gid: account.gid,
        groups: account.groups.clone(),
        cwd,
        umask: launch.spec.umask,
        ctty: launch.pty.is_some(),
        rlimits: (launch.rlimits.iter())
            .map(|r| {
                let limit = libc::rlimit {
                    rlim_cur: r.soft as libc::rlim_t,
                    rlim_max: r.hard as libc::rlim_t,
                };
                (r.resource as libc::__rlimit_resource_t, limit)
            })
            .collect(),
    };
    let io_err = |what: &str, e: io::Error| fail(format!("mgpu: {what}: {e}"), 1);
    let (out_r, out_w) = pipe().map_err(|e| io_err("cannot create pipes", e))?;
    let (err_r, err_w) = pipe().map_err(|e| io_err("cannot create pipes", e))?;
    let (report_r, report_w) = pipe().map_err(|e| io_err("cannot create pipes", e))?;
    let devnull =
        std::fs::File::open("/dev/null").map_err(|e| io_err("cannot open /dev/null", e))?;
    let cgroup_dir = match cgroup.and_then(|c| c.v2.as_ref()) {
        Some(dir) => Some(
            std::fs::File::open(dir)
                .map(OwnedFd::from)
                .map_err(|e| io_err("cannot open the job's cgroup", e))?,
        ),
        None => None,
    };
    let stdin = stdin.map_or(devnull.as_raw_fd(), |fd| fd.as_raw_fd());
    let mut stdio = [stdin, out_w.as_raw_fd(), err_w.as_raw_fd()];
    // --pty: the terminal's slave side is all three, the master is read as its stdout.
    let (out_r, _slave) = match launch.pty {
        None => (out_r, None),
        Some(size) => {
            let (master, slave) =
                open_pty(size, account).map_err(|e| io_err("cannot open a terminal", e))?;
            stdio = [slave.as_raw_fd(); 3];
            (master, Some(slave))
        }
    };
    let args = ChildArgs {
        plan: &plan,
        stdio,
        report: report_w.as_raw_fd(),
        // Born in the cgroup, if there is one.
        joined: true,
    };
    // The shared-memory start keeps us waiting until the child's exec, so it is only for a
    // child that stays ours: one that switches to the job's user could be stopped by that
    // user before its exec, and us with it.
    let shared = shared && (!launch.switch_user || account.uid == nix::unistd::geteuid().as_raw());
    // On cgroup v1 the job's first process joins its pids cgroup after the fork, and joining
    // is not held to pids.max (forking is): we fork from inside it, so that a user at their
    // bound (or a job at its own) cannot add a process by starting one more job.
    let fork_from = cgroup.and_then(crate::cgroup::JobCgroup::fork_from_pids_v1);
    if let Some((job, _)) = &fork_from {
        // SAFETY: a valid C string.
        if !unsafe { crate::cgroup::enter(job) } {
            return Err(fail("mgpu: cannot enter the job's cgroup".into(), 1));
        }
    }
    // Back where it was: a supervisor left in the job's pids cgroup would count against the
    // job's bounds, and be among the processes a stop of the job signals.
    let back = |fork_from: &Option<(CString, CString)>| -> bool {
        match fork_from {
            // SAFETY: a valid C string.
            Some((_, own)) => (0..3).any(|_| unsafe { crate::cgroup::enter(own) }),
            None => true,
        }
    };
    // SAFETY: the child only makes async-signal-safe calls on `plan`, prepared above.
    let (pid, shared_start) = unsafe {
        let spawned = if shared {
            spawn_shared(cgroup_dir.as_ref(), &args)
        } else {
            None
        };
        let forked = match spawned {
            Some(Ok(pid)) => Ok((pid, true)),
            Some(Err(e)) => Err(io_err("cannot start the job's process", e)),
            None => match fork_into(cgroup_dir.as_ref()) {
                Err(e) => Err(io_err("cannot fork", e)),
                Ok((0, joined)) => child(&plan, stdio, report_w.as_raw_fd(), joined),
                Ok((pid, _)) => Ok((pid, false)),
            },
        };
        if !back(&fork_from) {
            // The job must not start with its supervisor among its processes: its child is
            // killed, and this supervisor ends with the start's failure (leaving the cgroup).
            if let Ok((pid, _)) = forked {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(fail(
                "mgpu: cannot leave the job's cgroup after starting it".into(),
                1,
            ));
        }
        forked?
    };
    // Our copies of the child's ends: EOF on the pipes comes when the job's processes close
    // theirs, and on the report pipe when exec succeeded.
    drop((out_w, err_w, report_w, devnull, cgroup_dir));
    let (outputs, theirs) = match output_link {
        Some((ours, theirs)) => (Some(ours), Some(theirs)),
        None => (None, None),
    };
    drop(theirs);
    // Without its writer the job's process cannot hand its files over, and fails.
    let writer = crate::outfiles::Writer::of(account, launch);
    let outputs = outputs.and_then(|link| {
        crate::outfiles::OutputWriters::start(link, names.0, names.1, writer).ok()
    });
    let report = StartReport {
        pipe: report_r,
        program,
        outputs: outputs_text,
    };
    if !shared_start {
        // A forked child may be stopped by its user before its exec, for ever: its report is
        // read once it has exited, never waited for.
        return Ok(Started {
            pid,
            stdout: out_r,
            stderr: err_r,
            report: Some(report),
            outputs,
        });
    }
    // A child that shared our memory has exec'd or exited by now.
    match report.read() {
        None => Ok(Started {
            pid,
            stdout: out_r,
            stderr: err_r,
            report: None,
            outputs,
        }),
        Some(e) => {
            // The child failed before exec; it exits 127. Reap it here.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            Err(e)
        }
    }
}

/// A new terminal (master, slave) of `size` (rows, columns), its slave side the account's.
fn open_pty(size: [u16; 2], account: &Account) -> io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let ws = libc::winsize {
        ws_row: size[0],
        ws_col: size[1],
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty fills two descriptors we then own.
    let (master, slave) = unsafe {
        if libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) != 0 {
            return Err(io::Error::last_os_error());
        }
        (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s))
    };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on descriptors we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // The user's alone (0600, mode first, then owner): group write access, as login
    // terminals give it to the `tty` group for write(1), would let everyone of a shared primary
    // group type into the job's terminal.
    nix::sys::stat::fchmod(
        slave.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )?;
    nix::unistd::fchown(
        slave.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(account.uid)),
        Some(nix::unistd::Gid::from_raw(account.gid)),
    )?;
    Ok((master, slave))
}

/// The start error a child's report (`step, errno`; empty after an exec) says.
fn start_error(report: &[u8], program: &str, outputs: &str) -> Option<StartError> {
    let &[step, lo, hi, ..] = report else {
        return None;
    };
    let errno = i32::from(lo) | (i32::from(hi) << 8);
    let err = io::Error::from_raw_os_error(errno);
    let code = match (step, err.kind()) {
        (10, io::ErrorKind::NotFound) => 127,
        (10, io::ErrorKind::PermissionDenied) => 126,
        _ => 1,
    };
    let what = if step == Step::Exec as u8 {
        format!("mgpu: cannot execute '{program}'")
    } else if step == Step::Output as u8 {
        format!("mgpu: cannot open the job's output file {outputs} as its user (relative to its working directory; a regular file or /dev/null)")
    } else {
        format!("mgpu: {}", Step::describe(step))
    };
    Some(StartError {
        message: format!("{what}: {err}"),
        code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Account {
        Account {
            uid: 1234,
            gid: 1234,
            name: "alice".into(),
            home: "/nonexistent/alice".into(),
            shell: "/bin/bash".into(),
            groups: vec![1234],
        }
    }

    /// Job 1's first run on GPU 0 as `uid`, running `spec`, without a user switch.
    fn launch_for(uid: u32, spec: LaunchSpec) -> Launch {
        Launch {
            job: 1,
            name: "n".into(),
            uid,
            account: None,
            gpus: vec![0],
            restarts: 0,
            started_at: 0,
            spec,
            switch_user: false,
            log_path: "/dev/null".into(),
            max_log_bytes: None,
            log_note: String::new(),
            launch_id: 1,
            array: None,
            pids_max: None,
            user_pids_max: None,
            rlimits: Vec::new(),
            mem_mib: None,
            gpu_total_mib: None,
            stdin: false,
            pty: None,
        }
    }

    #[test]
    fn output_patterns_expand_and_zero_pad_like_sbatch() {
        let mut launch = launch_for(1234, LaunchSpec::default());
        launch.job = 42;
        launch.name = "a/b".into();
        let expand = |p: &str, l: &Launch| expand_output_pattern(p, l, "alice");
        assert_eq!(
            expand("%j-%A_%a-%x-%u-100%%", &launch),
            "42-42_4294967294-a_b-alice-100%"
        );
        launch.array = Some(mgpu_core::ArrayTask {
            job: 40,
            task: 7,
            count: 8,
            min: 0,
            max: 7,
            limit: None,
        });
        assert_eq!(expand("%A_%a.out", &launch), "40_7.out");
        assert_eq!(expand("%3a-%5j-%2A", &launch), "007-00042-40");
        // Padding never cuts a longer number, is capped at 10, and is ignored for names.
        assert_eq!(expand("%1j", &launch), "42");
        assert_eq!(expand("%15a", &launch), "0000000007");
        assert_eq!(expand("%99999999999999999999a", &launch), "0000000007");
        assert_eq!(expand("%4x-%3u", &launch), "a_b-alice");
        // What is not a code stays as written.
        assert_eq!(expand("%3z %3%j %q 5%", &launch), "%3z %342 %q 5%");
    }

    /// Both ways of starting the job's process (the shared-memory start and the fork it falls
    /// back to) run the command with its output on the pipes, in its own session, and report
    /// a command that cannot be executed.
    #[test]
    fn both_ways_of_starting_a_job_work() {
        let me = crate::users::account(nix::unistd::getuid().as_raw()).unwrap();
        for shared in [true, false] {
            let launch = |command: &[&str]| {
                launch_for(
                    me.uid,
                    LaunchSpec {
                        command: command.iter().map(|s| s.to_string()).collect(),
                        cwd: "/".into(),
                        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                        venv: Venv::Off,
                        umask: None,
                        ..Default::default()
                    },
                )
            };
            let started = start_with(
                &launch(&["sh", "-c", "echo out $MGPU_JOB_ID; echo err >&2; exit 3"]),
                &me,
                None,
                shared,
                None,
            )
            .unwrap_or_else(|e| panic!("shared={shared}: {}", e.message));
            let mut out = String::new();
            std::fs::File::from(started.stdout)
                .read_to_string(&mut out)
                .unwrap();
            let mut err = String::new();
            std::fs::File::from(started.stderr)
                .read_to_string(&mut err)
                .unwrap();
            assert_eq!(
                (out.as_str(), err.as_str()),
                ("out 1\n", "err\n"),
                "shared={shared}"
            );
            let pid = nix::unistd::Pid::from_raw(started.pid);
            assert_eq!(nix::unistd::getsid(Some(pid)), Ok(pid), "shared={shared}");
            assert_eq!(
                nix::sys::wait::waitpid(pid, None).unwrap(),
                nix::sys::wait::WaitStatus::Exited(pid, 3),
                "shared={shared}"
            );
            // The fork's report is read once the child has exited.
            let missing =
                match start_with(&launch(&["no-such-command-here"]), &me, None, shared, None) {
                    Err(e) => e,
                    Ok(started) => {
                        assert!(!shared, "the shared start reports before it returns");
                        let pid = nix::unistd::Pid::from_raw(started.pid);
                        assert_eq!(
                            nix::sys::wait::waitpid(pid, None).unwrap(),
                            nix::sys::wait::WaitStatus::Exited(pid, 127)
                        );
                        started
                            .report
                            .and_then(StartReport::read)
                            .unwrap_or_else(|| panic!("shared={shared}: a missing command started"))
                    }
                };
            assert_eq!(missing.code, 127, "shared={shared}: {}", missing.message);
            assert!(
                missing.message.contains("cannot execute"),
                "{}",
                missing.message
            );
        }
    }

    #[test]
    fn environment_overrides_identity_and_sets_gpus() {
        let acct = account();
        let spec = LaunchSpec {
            command: vec!["x".into()],
            cwd: "/".into(),
            env: vec![
                ("USER".into(), "root".into()),
                ("FOO".into(), "bar".into()),
                ("CUDA_VISIBLE_DEVICES".into(), "0,1,2,3".into()),
            ],
            venv: Venv::Auto,
            umask: None,
            ..Default::default()
        };
        let launch = Launch {
            job: 7,
            gpus: vec![1, 3],
            switch_user: true,
            ..launch_for(acct.uid, spec)
        };
        let env = environment(&launch, &acct);
        let get = |k: &str| {
            let v: Vec<&String> = env.iter().filter(|(a, _)| a == k).map(|(_, v)| v).collect();
            assert_eq!(v.len(), 1, "{k} set {} times", v.len());
            v[0].clone()
        };
        assert_eq!(get("USER"), "alice");
        assert_eq!(get("FOO"), "bar");
        assert_eq!(get("CUDA_VISIBLE_DEVICES"), "1,3");
        assert_eq!(get("MGPU_JOB_ID"), "7");
        assert_eq!(get("HOME"), "/nonexistent/alice");
        assert_eq!(get("SLURM_SUBMIT_DIR"), "/");
        assert!(!env.iter().any(|(k, _)| k == "SLURM_CPUS_PER_TASK"));
        // -c 4 and --chdir elsewhere: Slurm's variables say so, whatever was inherited.
        let mut with = launch.clone();
        with.spec.cpus = Some(4);
        with.spec.submit_dir = Some("/home/alice/exp".into());
        with.spec
            .env
            .push(("SLURM_CPUS_PER_TASK".into(), "64".into()));
        let env = environment(&with, &acct);
        let cpus: Vec<&String> = (env.iter())
            .filter(|(k, _)| k == "SLURM_CPUS_PER_TASK")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(cpus, vec!["4"]);
        assert!(env.contains(&("SLURM_SUBMIT_DIR".into(), "/home/alice/exp".into())));
        // ~/venv is decided by the child: the default argv is the command itself.
        assert_eq!(argv(&launch, &acct), vec![std::ffi::OsString::from("x")]);
    }

    /// Jobs with `--mem` are told their reservation in the frameworks' own terms; what the
    /// user set stays; exclusive jobs get none of it (not even an inherited MGPU_GPU_MEM_MIB).
    #[test]
    fn environment_keeps_frameworks_inside_the_reservation() {
        let acct = account();
        let env_of = |mem_mib, total, user_env: &[(&str, &str)]| {
            let spec = LaunchSpec {
                command: vec!["x".into()],
                cwd: "/".into(),
                env: user_env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                venv: Venv::Off,
                umask: None,
                ..Default::default()
            };
            let launch = Launch {
                job: 7,
                mem_mib,
                gpu_total_mib: total,
                stdin: false,
                pty: None,
                ..launch_for(acct.uid, spec)
            };
            let env = environment(&launch, &acct);
            move |k: &str| {
                let v: Vec<&String> = env.iter().filter(|(a, _)| a == k).map(|(_, v)| v).collect();
                assert!(v.len() <= 1, "{k} set {} times", v.len());
                v.first().map(|s| s.to_string())
            }
        };
        let get = env_of(Some(10_240), Some(81_920), &[]);
        assert_eq!(get("MGPU_GPU_MEM_MIB").as_deref(), Some("10240"));
        assert_eq!(
            get("XLA_PYTHON_CLIENT_MEM_FRACTION").as_deref(),
            Some("0.125")
        );
        assert_eq!(get("XLA_PYTHON_CLIENT_PREALLOCATE"), None);
        assert_eq!(get("TF_FORCE_GPU_ALLOW_GROWTH").as_deref(), Some("true"));
        // Rounded down, never above the reservation; a whole GPU is 1.
        let get = env_of(Some(20_000), Some(24_576), &[]);
        assert_eq!(
            get("XLA_PYTHON_CLIENT_MEM_FRACTION").as_deref(),
            Some("0.8138")
        );
        let get = env_of(Some(24_576), Some(24_576), &[]);
        assert_eq!(get("XLA_PYTHON_CLIENT_MEM_FRACTION").as_deref(), Some("1"));
        // Too small a share for four decimals, or no total known: no preallocation.
        for total in [Some(1 << 30), None] {
            let get = env_of(Some(1), total, &[]);
            assert_eq!(get("XLA_PYTHON_CLIENT_MEM_FRACTION"), None);
            assert_eq!(
                get("XLA_PYTHON_CLIENT_PREALLOCATE").as_deref(),
                Some("false")
            );
        }
        // The user's own settings win, except the reservation, which is mgpu's to say.
        let get = env_of(
            Some(10_240),
            Some(81_920),
            &[
                ("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5"),
                ("TF_FORCE_GPU_ALLOW_GROWTH", "false"),
                ("MGPU_GPU_MEM_MIB", "99"),
            ],
        );
        assert_eq!(
            get("XLA_PYTHON_CLIENT_MEM_FRACTION").as_deref(),
            Some("0.5")
        );
        assert_eq!(get("TF_FORCE_GPU_ALLOW_GROWTH").as_deref(), Some("false"));
        assert_eq!(get("MGPU_GPU_MEM_MIB").as_deref(), Some("10240"));
        // Exclusive: nothing, and an inherited reservation is dropped.
        let get = env_of(None, Some(81_920), &[("MGPU_GPU_MEM_MIB", "99")]);
        for k in [
            "MGPU_GPU_MEM_MIB",
            "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "XLA_PYTHON_CLIENT_PREALLOCATE",
            "TF_FORCE_GPU_ALLOW_GROWTH",
        ] {
            assert_eq!(get(k), None, "{k}");
        }
    }

    #[test]
    fn venv_dir_goes_through_fixed_script() {
        let acct = account();
        let spec = LaunchSpec {
            command: vec!["python".into(), "$(rm -rf /)".into()],
            cwd: "/".into(),
            env: vec![],
            venv: Venv::Dir("/opt/v".into()),
            umask: None,
            ..Default::default()
        };
        let launch = launch_for(acct.uid, spec);
        let a = argv(&launch, &acct);
        assert_eq!(a[2], std::ffi::OsString::from(VENV_SCRIPT));
        assert_eq!(a[4], std::ffi::OsString::from("/opt/v/bin/activate"));
        assert_eq!(a[6], std::ffi::OsString::from("$(rm -rf /)"));
    }
}
