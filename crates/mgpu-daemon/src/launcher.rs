//! The supervisor launcher: a small single-threaded helper that forks job supervisors.
//!
//! Starting a supervisor by exec'ing this (large) binary costs about 2 ms per job on a typical
//! VM, and forking the multi-threaded daemon itself to run Rust code in the child is unsound.
//! So the daemon starts one helper, `mgpu_scheduler_server --launcher`, at startup: it stays
//! single-threaded and small, and for each run it forks a copy of itself that becomes the
//! run's supervisor (see [`crate::supervisor`]), which costs a fraction of a millisecond.
//!
//! The daemon and the launcher talk over a `SOCK_SEQPACKET` socket pair (the launcher's stdin):
//! a request is the run directory, with the supervisor's end of its link to the daemon attached
//! as `SCM_RIGHTS`; the reply is the supervisor's pid (or `-errno`). Only the daemon holds the
//! other end. The launcher exits when the daemon goes away (end of file); supervisors it forked
//! live on, as they must, and are re-adopted by the next daemon. It ignores `SIGCHLD`, so the
//! kernel reaps supervisors that end; each supervisor restores it before starting its job.
//!
//! When the launcher cannot be used, the daemon restarts it once, and otherwise falls back to
//! exec'ing a supervisor directly (the same supervisor code either way).

use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::supervisor;

/// The flag that turns the server binary into the launcher.
pub const FLAG: &str = "--launcher";
/// Longest run directory path a request may carry.
const MAX_REQUEST: usize = 4096;
/// How long the daemon waits for the launcher's answer before giving up on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment supervisors (and so the launcher) start with.
pub const SUPERVISOR_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// The daemon's handle on its launcher process (started on first use, restarted when it dies).
#[derive(Default)]
pub struct Launcher {
    running: Mutex<Option<Running>>,
}

struct Running {
    /// Our end of the socket pair.
    sock: OwnedFd,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Launcher {
    /// Starts the launcher now (so the first job does not pay for it); a failure is only
    /// logged: the next launch tries again, or falls back.
    pub fn warm_up(&self) {
        let mut running = self.lock();
        if running.is_none() {
            match Running::start() {
                Ok(r) => *running = Some(r),
                Err(e) => tracing::warn!(error = %e, "cannot start the supervisor launcher"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forks a supervisor for `run_dir` with `link` as its stdin; returns its pid. Blocking
    /// (a fraction of a millisecond); requests are served one at a time.
    pub fn spawn_supervisor(
        &self,
        run_dir: &Path,
        launch_id: u64,
        link: BorrowedFd<'_>,
    ) -> io::Result<u32> {
        let mut running = self.lock();
        let mut last_error = None;
        // A launcher that died (or was killed) is replaced once.
        for _ in 0..2 {
            if running.is_none() {
                *running = Some(Running::start()?);
            }
            let r = running.as_mut().expect("just started");
            match r.request(run_dir, launch_id, link) {
                Ok(Ok(pid)) => return Ok(pid),
                // The launcher is fine, the fork failed: no point in retrying.
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "the supervisor launcher failed; restarting it");
                    *running = None;
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("the launcher failed")))
    }
}

impl Running {
    fn start() -> io::Result<Running> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: a valid fd and a properly sized timeval.
        unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let mut cmd = helper_command(theirs);
        cmd.arg(FLAG);
        let child = cmd.spawn()?;
        Ok(Running { sock: ours, child })
    }

    /// One request. The outer error means the launcher itself failed (replace it); the inner
    /// one that it could not fork.
    fn request(
        &mut self,
        run_dir: &Path,
        launch_id: u64,
        link: BorrowedFd<'_>,
    ) -> io::Result<io::Result<u32>> {
        let path = run_dir.as_os_str().as_bytes();
        if path.len() + 8 > MAX_REQUEST {
            return Ok(Err(io::Error::other("run directory path too long")));
        }
        let fds = [link.as_raw_fd()];
        // The request: the launch id (8 bytes, little-endian), then the run directory.
        let id = launch_id.to_le_bytes();
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&id), IoSlice::new(path)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        let mut reply = [0u8; 4];
        let n = loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut reply, MsgFlags::empty()) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other?,
            }
        };
        if n != reply.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the launcher closed its socket",
            ));
        }
        let pid = i32::from_le_bytes(reply);
        Ok(if pid > 0 {
            Ok(pid as u32)
        } else {
            Err(io::Error::from_raw_os_error(-pid))
        })
    }
}

/// This binary as one of the server's helpers (the launcher, or a supervisor started directly):
/// `stdin` as its link to the daemon, stderr the server's, a clean environment, and its own
/// session (a terminal's Ctrl-C aimed at a foreground daemon does not reach it, or its jobs).
/// The caller adds the mode's arguments.
pub fn helper_command(stdin: OwnedFd) -> std::process::Command {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("mgpu_scheduler_server")
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env_clear()
        .env("PATH", SUPERVISOR_PATH);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Entry point of `mgpu_scheduler_server --launcher` (stdin: the daemon's socket).
pub fn main() -> ExitCode {
    let sock: RawFd = 0;
    let is_socket = nix::sys::stat::fstat(sock)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .unwrap_or(false);
    if !is_socket {
        eprintln!("mgpu launcher: internal mode, started by mgpu_scheduler_server only");
        return ExitCode::FAILURE;
    }
    // Nothing the daemon may have inherited (and not marked close-on-exec) reaches supervisors.
    // SAFETY: closes descriptors this process does not use (0-2 are its socket and stdio).
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
    }
    // Supervisors that end are reaped by the kernel.
    // SAFETY: setting a signal disposition in a single-threaded process.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
    }
    // SAFETY: prctl with a valid NUL-terminated name.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"mgpu-launcher".as_ptr(), 0, 0, 0);
    }
    // Read once here rather than in every supervisor.
    let _ = crate::cgroup::jobs_base();
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (len, link) = match receive(sock, &mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => return ExitCode::SUCCESS, // the daemon is gone
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                let _ = writeln!(io::stderr(), "mgpu launcher: {e}");
                return ExitCode::FAILURE;
            }
        };
        if len < 8 {
            let _ = writeln!(io::stderr(), "mgpu launcher: a request without a launch id");
            return ExitCode::FAILURE;
        }
        let launch_id = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let run_dir = PathBuf::from(std::ffi::OsStr::from_bytes(&buf[8..len]));
        let reply = match link {
            // The daemon died after asking: its successor finds the run prepared but never
            // started and queues the job again, so it must not start here as well.
            Some(_) if daemon_gone(sock) => return ExitCode::SUCCESS,
            Some(link) => fork_supervisor(&run_dir, launch_id, link),
            None => -libc::EINVAL,
        };
        if let Err(e) = nix::sys::socket::send(sock, &reply.to_le_bytes(), MsgFlags::MSG_NOSIGNAL) {
            let _ = writeln!(io::stderr(), "mgpu launcher: {e}");
            return ExitCode::FAILURE;
        }
    }
}

/// Whether the daemon has closed its end of our socket.
fn daemon_gone(sock: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: sock,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut p, 1, 0) };
    ready == 1 && p.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
}

/// Receives one request: the run directory's length in `buf`, and the attached link.
fn receive(sock: RawFd, buf: &mut [u8]) -> nix::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut cmsg = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut link = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just gave us these descriptors; we own them.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if link.is_none() {
                    link = Some(owned);
                }
            }
        }
    }
    if msg.bytes == 0 && link.is_none() {
        return Ok(None);
    }
    Ok(Some((msg.bytes, link)))
}

/// Forks the supervisor of `run_dir`; returns its pid, or `-errno`.
fn fork_supervisor(run_dir: &Path, launch_id: u64, link: OwnedFd) -> i32 {
    // SAFETY: this process is single-threaded, so the child may run any code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { child }) => child.as_raw(),
        Ok(nix::unistd::ForkResult::Child) => {
            let code = become_supervisor(run_dir, launch_id, link);
            // _exit: the launcher's exit handlers and stdio buffers are not the child's to run
            // (and skipping them spares a few page faults per job).
            // SAFETY: ends this process; nothing of it is left to clean up.
            unsafe { libc::_exit(code) }
        }
        Err(e) => -(e as i32),
    }
}

/// In the forked child: the environment a supervisor expects (its own session, the link on
/// stdin, default signal handling; stderr stays the server's), then the supervisor.
fn become_supervisor(run_dir: &Path, launch_id: u64, link: OwnedFd) -> i32 {
    // SAFETY: plain syscalls on descriptors we own, in a single-threaded process.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_DFL);
        libc::prctl(libc::PR_SET_NAME, c"mgpu-supervisor".as_ptr(), 0, 0, 0);
        libc::setsid();
        if libc::dup2(link.as_raw_fd(), 0) < 0 {
            return 1;
        }
    }
    drop(link);
    if supervisor::supervise(run_dir, Some(launch_id)) {
        0
    } else {
        1
    }
}
