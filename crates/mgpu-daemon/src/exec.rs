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
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use mgpu_core::JobId;
use mgpu_proto::Venv;
use serde::{Deserialize, Serialize};

use crate::users::Account;

/// What a job runs, as recorded at submit time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub command: Vec<String>,
    pub cwd: String,
    pub env: Vec<(String, String)>,
    pub venv: Venv,
    /// The submitter's umask, applied to the job.
    #[serde(default)]
    pub umask: Option<u32>,
}

/// Everything needed to fork one run of a job. The daemon resolves it and hands it to the
/// job's supervisor as `launch.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub job: JobId,
    pub name: String,
    /// Whose job it is; the supervisor resolves the account (and groups) just before the fork.
    pub uid: u32,
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
    /// Output kept per run; beyond it output is read and discarded.
    #[serde(default)]
    pub max_log_bytes: Option<u64>,
}

/// A started job: its process (leader of its own session and process group) and the read ends
/// of its stdout and stderr pipes.
pub struct Started {
    pub child: std::process::Child,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
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

/// The argv exec'd unless the child switches to the venv script.
fn argv(launch: &Launch, account: &Account) -> Vec<std::ffi::OsString> {
    match activate_script(launch, account) {
        Some((activate, true)) => venv_argv(&activate, &launch.spec.command),
        _ => launch.spec.command.iter().map(Into::into).collect(),
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
    ];
    env.retain(|(k, _)| !set.iter().any(|(s, _)| s == k));
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".into(),
        ));
    }
    env.extend(set.into_iter().map(|(k, v)| (k.to_string(), v)));
    env
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Writes a fixed message to the child's stderr (async-signal-safe).
fn child_note(msg: &[u8]) {
    // SAFETY: write(2) on fd 2 with a valid buffer; nothing else is touched.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Forks and execs the job as `account`, inside the cgroup whose `cgroup.procs` is given.
pub fn start(
    launch: &Launch,
    account: &Account,
    cgroup_procs: Option<&CString>,
) -> Result<Started, StartError> {
    let cgroup_procs = cgroup_procs.cloned();
    let fail = |message: String, code: i32| StartError { message, code };
    let cwd = CString::new(launch.spec.cwd.as_bytes())
        .map_err(|_| fail("the working directory contains a NUL byte".into(), 1))?;
    let args = argv(launch, account);
    let (out_r, out_w) = pipe().map_err(|e| fail(format!("cannot create pipes: {e}"), 1))?;
    let (err_r, err_w) = pipe().map_err(|e| fail(format!("cannot create pipes: {e}"), 1))?;

    let env = environment(launch, account);
    // `~/venv`: probed by the child, as the user; if readable, it execs this instead.
    let venv_switch = match activate_script(launch, account) {
        Some((activate, false)) => {
            let path = CString::new(activate.as_os_str().as_bytes())
                .map_err(|_| fail("the venv path contains a NUL byte".into(), 1))?;
            let arrays = exec_arrays(&venv_argv(&activate, &launch.spec.command), &env)
                .ok_or_else(|| fail("the command or environment contains a NUL byte".into(), 1))?;
            Some((path, arrays))
        }
        _ => None,
    };
    let umask = launch.spec.umask;
    let mut cmd = std::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    let switch = launch.switch_user;
    let (uid, gid) = (account.uid, account.gid);
    let groups: Vec<libc::gid_t> = account.groups.clone();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls on data prepared above; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
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
            // Into the job's cgroup while still root; everything it starts stays there.
            if let Some(procs) = &cgroup_procs {
                if !crate::cgroup::enter(procs) {
                    child_note(b"mgpu: cannot enter the job's cgroup: ");
                    return Err(io::Error::last_os_error());
                }
            }
            if switch {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0 {
                    child_note(b"mgpu: cannot set the job's supplementary groups: ");
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(gid) != 0 {
                    child_note(b"mgpu: cannot switch to the job's group: ");
                    return Err(io::Error::last_os_error());
                }
                if libc::setuid(uid) != 0 {
                    child_note(b"mgpu: cannot switch to the job's user: ");
                    return Err(io::Error::last_os_error());
                }
                if uid != 0 && libc::setuid(0) == 0 {
                    child_note(b"mgpu: privileges could not be dropped: ");
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            if libc::chdir(cwd.as_ptr()) != 0 {
                child_note(b"mgpu: cannot enter the working directory: ");
                return Err(io::Error::last_os_error());
            }
            // Nothing of ours leaks into the job: every descriptor above stdio closes on exec.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if let Some(mask) = umask {
                libc::umask(mask as libc::mode_t);
            }
            if let Some((activate, arrays)) = &venv_switch {
                if libc::access(activate.as_ptr(), libc::R_OK) == 0 {
                    let bash = arrays.argv[0];
                    libc::execve(bash, arrays.argv.as_ptr(), arrays.envp.as_ptr());
                    child_note(b"mgpu: cannot run /bin/bash to activate ~/venv: ");
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Closes our copies of the pipes' write ends: EOF comes when the job's processes close theirs.
    drop(cmd);
    match spawned {
        Ok(child) => Ok(Started {
            child,
            stdout: out_r,
            stderr: err_r,
        }),
        Err(e) => {
            // The child may have said which step failed before exiting.
            let mut note = String::new();
            let mut f = std::fs::File::from(err_r);
            let _ = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            );
            let _ = f.read_to_string(&mut note);
            drop(out_r);
            let code = match e.kind() {
                io::ErrorKind::NotFound => 127,
                io::ErrorKind::PermissionDenied => 126,
                _ => 1,
            };
            let what = if note.is_empty() {
                format!(
                    "mgpu: cannot execute '{}': ",
                    String::from_utf8_lossy(args[0].as_bytes())
                )
            } else {
                note.trim_start_matches('\n').to_string()
            };
            let code = if note.is_empty() { code } else { 1 };
            Err(fail(format!("{what}{e}"), code))
        }
    }
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
        };
        let launch = Launch {
            job: 7,
            name: "n".into(),
            uid: acct.uid,
            gpus: vec![1, 3],
            restarts: 0,
            started_at: 0,
            spec,
            switch_user: true,
            log_path: "/dev/null".into(),
            max_log_bytes: None,
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
        // ~/venv is decided by the child: the default argv is the command itself.
        assert_eq!(argv(&launch, &acct), vec![std::ffi::OsString::from("x")]);
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
        };
        let launch = Launch {
            job: 1,
            name: "n".into(),
            uid: acct.uid,
            gpus: vec![0],
            restarts: 0,
            started_at: 0,
            spec,
            switch_user: false,
            log_path: "/dev/null".into(),
            max_log_bytes: None,
        };
        let a = argv(&launch, &acct);
        assert_eq!(a[2], std::ffi::OsString::from(VENV_SCRIPT));
        assert_eq!(a[4], std::ffi::OsString::from("/opt/v/bin/activate"));
        assert_eq!(a[6], std::ffi::OsString::from("$(rm -rf /)"));
    }
}
