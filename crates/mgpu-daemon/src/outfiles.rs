//! Writing a job's `-o`/`-e` files without root's rights and without ever making the
//! supervisor's loop wait on them.
//!
//! The job's own process opens the files as its user (see `exec::open_output`) and sends them
//! over a socket. They are received, checked and written only by writer threads of the
//! supervisor that first give up, for themselves alone (credentials are per thread on Linux),
//! every capability and take the user's filesystem identity (fsuid, fsgid, groups): the kernel
//! then treats their writes as the user's (disk quotas, root-reserved blocks, capability
//! checks such as `/proc/PID/oom_score_adj`'s). The supervisor's loop only hands them copies
//! of the output through bounded channels and never waits: when a file does not keep up (a
//! FUSE file whose server does not answer, a terminal nobody reads), what does not fit is
//! dropped with a note in the job's log. The descriptors are closed only by the writer
//! threads, so a close that hangs costs one thread of that supervisor, nothing else.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::users::Account;

/// Chunks of output (each at most the supervisor's read buffer, 64 KiB) waiting for one file:
/// at most 4 MiB per file.
const QUEUE_CHUNKS: usize = 64;

/// The `-o`/`-e` files of a run, as the supervisor's loop sees them: where each stream's
/// output goes (stdout's, stderr's).
pub struct OutputWriters {
    files: Vec<Queue>,
    /// Which of `files` each stream (stdout, stderr) goes to.
    route: [Option<usize>; 2],
    /// Disconnected once every writer thread has ended.
    done: Receiver<()>,
}

struct Queue {
    tx: Option<SyncSender<Vec<u8>>>,
    /// The file's name, for the note.
    name: String,
    /// Why its writer stopped, if it failed (set once, after the failed write).
    error: Failed,
}

type Failed = Arc<Mutex<Option<io::Error>>>;

/// The identity the writer threads take.
#[derive(Clone)]
pub struct Writer {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    /// Take the user's identity (the supervisor runs as root); capabilities are dropped anyway.
    pub switch_user: bool,
    /// The job's soft `RLIMIT_FSIZE` in bytes, when it has its own (a login's): the writer
    /// threads live in the supervisor's process, whose limit the kernel applies, so they apply
    /// the user's themselves (as the kernel would: a write stops at the limit, then `EFBIG`).
    pub fsize: Option<u64>,
}

impl Writer {
    // (`RLIMIT_FSIZE`'s type differs between C libraries.)
    #[allow(clippy::unnecessary_cast)]
    pub fn of(account: &Account, launch: &crate::exec::Launch) -> Self {
        let fsize = (launch.rlimits.iter())
            .find(|r| r.resource == libc::RLIMIT_FSIZE as u32)
            .map(|r| r.soft)
            .filter(|&soft| soft != crate::userlimits::INFINITY);
        Writer {
            uid: account.uid,
            gid: account.gid,
            groups: account.groups.clone(),
            switch_user: launch.switch_user,
            fsize,
        }
    }
}

impl OutputWriters {
    /// Starts the thread that takes the files from `link` (sent there by the job's process:
    /// `out` and `err` say which, an `err` of `None` with an `out` meaning one file for both
    /// streams) and writes them.
    pub fn start(
        link: OwnedFd,
        out: Option<String>,
        err: Option<String>,
        who: Writer,
    ) -> io::Result<Self> {
        let (done_tx, done) = mpsc::channel::<()>();
        let mut files = Vec::new();
        let mut receivers = Vec::new();
        let mut route = [None, None];
        let shared = out.is_some() && err.is_none();
        for (i, name) in [out, err].into_iter().enumerate() {
            if let Some(name) = name {
                let (tx, rx) = mpsc::sync_channel(QUEUE_CHUNKS);
                let error = Failed::default();
                route[i] = Some(files.len());
                receivers.push((rx, error.clone()));
                files.push(Queue {
                    tx: Some(tx),
                    name,
                    error,
                });
            }
        }
        if shared {
            route[1] = Some(0);
        }
        std::thread::Builder::new()
            .name("mgpu-outfiles".into())
            .spawn(move || receive_and_write(link, receivers, who, done_tx))?;
        Ok(OutputWriters { files, route, done })
    }

    /// Queues a copy of `bytes` from stream `tag` (1 stdout, else stderr). Never waits: a file
    /// that does not keep up loses this output. Returns a note for the job's log the first
    /// time a file loses output.
    pub fn write(&mut self, tag: u8, bytes: &[u8]) -> Option<String> {
        let i = self.route[usize::from(tag != 1)]?;
        let q = &mut self.files[i];
        let tx = q.tx.as_ref()?;
        let why = match tx.try_send(bytes.to_vec()) {
            Ok(()) => return None,
            Err(TrySendError::Full(_)) => "does not keep up with the job's output".to_string(),
            Err(TrySendError::Disconnected(_)) => {
                match q.error.lock().ok().and_then(|mut e| e.take()) {
                    Some(e) => format!("could not be written ({e})"),
                    None => "could not be written".to_string(),
                }
            }
        };
        q.tx = None;
        Some(format!(
            "\nmgpu: the output file '{}' {why}; the rest of the output is only in the job's log\n",
            q.name
        ))
    }

    /// No more output: lets the writer threads finish what is queued, waiting for them at most
    /// `limit` (a file whose writes hang only delays the end of its own job, by that much).
    pub fn finish(self, limit: Duration) {
        let OutputWriters { files, done, .. } = self;
        drop(files);
        let _ = done.recv_timeout(limit);
    }
}

/// Gives up, for the calling thread only, the supervisor's rights: the user's filesystem
/// identity, then no capability at all (raw system calls: the C library's wrappers would
/// change every thread of the process).
fn become_user(who: &Writer) -> io::Result<()> {
    // SAFETY: system calls on plain integers and on buffers we own.
    unsafe {
        if who.switch_user {
            if libc::syscall(libc::SYS_setgroups, who.groups.len(), who.groups.as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::syscall(libc::SYS_setfsgid, who.gid);
            libc::syscall(libc::SYS_setfsuid, who.uid);
            // (-1 changes nothing and returns the current value.)
            if libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32 != who.gid
                || libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32 != who.uid
            {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: libc::syscall(libc::SYS_gettid) as i32,
        };
        let none = [Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        if libc::syscall(libc::SYS_capset, &header, none.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The receiving thread: becomes the user, takes the files from the job's process, starts a
/// thread for the second file if there is one and writes the first itself.
fn receive_and_write(
    link: OwnedFd,
    receivers: Vec<(Receiver<Vec<u8>>, Failed)>,
    who: Writer,
    done: mpsc::Sender<()>,
) {
    if let Err(e) = become_user(&who) {
        // (Not eprintln: the server's log may be gone.)
        let _ = writeln!(
            io::stderr(),
            "mgpu supervisor: cannot take the job user's rights to write its output files: {e}"
        );
        return;
    }
    // Blocking: until the job's process sends them or goes away (exec or exit closes its end).
    let files = receive_files(&link, receivers.len());
    drop(link);
    let mut pairs = receivers.into_iter().zip(files);
    let first = pairs.next();
    for ((rx, failed), file) in pairs {
        let done = done.clone();
        let _ = std::thread::Builder::new()
            .name("mgpu-outfile".into())
            .spawn(move || {
                write_all(rx, file, &failed, who.fsize);
                drop(done);
            });
    }
    if let Some(((rx, failed), file)) = first {
        write_all(rx, file, &failed, who.fsize);
    }
    drop(done);
}

/// Writes what arrives on `rx` into `file` until the supervisor has no more, or the file fails.
/// The file is closed here.
fn write_all(
    rx: Receiver<Vec<u8>>,
    file: Option<std::fs::File>,
    failed: &Failed,
    fsize: Option<u64>,
) {
    let Some(mut file) = file else {
        return; // (dropping `rx` tells the supervisor)
    };
    for chunk in rx {
        if let Err(e) = write_limited(&mut file, &chunk, fsize) {
            if let Ok(mut slot) = failed.lock() {
                *slot = Some(e);
            }
            return;
        }
    }
}

/// Writes `chunk`, within the file size limit `fsize` for a regular file.
fn write_limited(file: &mut std::fs::File, chunk: &[u8], fsize: Option<u64>) -> io::Result<()> {
    use std::io::Seek;
    let Some(limit) = fsize else {
        return file.write_all(chunk);
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return file.write_all(chunk);
    }
    // SAFETY: fcntl on a descriptor we own.
    let append = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) } & libc::O_APPEND != 0;
    let at = if append {
        meta.len()
    } else {
        file.stream_position()?
    };
    let n = limit.saturating_sub(at).min(chunk.len() as u64) as usize;
    file.write_all(&chunk[..n])?;
    if n < chunk.len() {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    }
    Ok(())
}

/// Receives `count` files from the job's process (none if it sent none), in the order of the
/// streams, keeping only regular files and character devices (which the job's process checked
/// already). They are made blocking: only this thread waits on them.
fn receive_files(link: &OwnedFd, count: usize) -> Vec<Option<std::fs::File>> {
    let mut mask = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: mask.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for two descriptors.
    let mut cbuf = [0u64; 8];
    // SAFETY: a zeroed msghdr pointing at our buffers, filled in by recvmsg.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: recvmsg on our socket into the buffers above.
        let n = unsafe { libc::recvmsg(link.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    let mut fds = Vec::new();
    if n > 0 {
        // SAFETY: walking the control messages recvmsg wrote, within msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<libc::c_int>();
                    for i in 0..count {
                        fds.push(std::fs::File::from(OwnedFd::from_raw_fd(
                            data.add(i).read_unaligned(),
                        )));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
    }
    let usable = |f: std::fs::File| {
        use std::os::unix::fs::FileTypeExt;
        let kind = f.metadata().ok()?.file_type();
        if !(kind.is_file() || kind.is_char_device()) {
            return None;
        }
        // (Keeping O_APPEND: a later run adds to what the earlier ones wrote.)
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        Some(f)
    };
    // The job's process sends exactly the files it was asked for, or nothing.
    if n <= 0 || fds.len() != count || mask[0] == 0 {
        return (0..count).map(|_| None).collect();
    }
    fds.into_iter().map(usable).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends `files` the way the job's process does: one byte (which streams) with them.
    fn send(link: &OwnedFd, mask: u8, files: &[&std::fs::File]) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [io::IoSlice::new(std::slice::from_ref(&mask))];
        sendmsg::<()>(link.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn me() -> Writer {
        Writer {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            groups: Vec::new(),
            switch_user: false,
            fsize: None,
        }
    }

    /// With only `-o`, both streams go to the one file, in order; what was queued before the
    /// file arrived is written too.
    #[test]
    fn one_file_gets_both_streams_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = std::fs::File::create(&path).unwrap();
        let (ours, theirs) = pair();
        let mut w = OutputWriters::start(ours, Some("out".into()), None, me()).unwrap();
        assert_eq!(w.write(1, b"early "), None);
        send(&theirs, 1, &[&file]);
        drop((theirs, file));
        assert_eq!(w.write(2, b"err "), None);
        assert_eq!(w.write(1, b"out"), None);
        w.finish(Duration::from_secs(60));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "early err out");
    }

    /// The user's file size limit holds for the file, as the kernel would apply it to the
    /// user's own writes: it stops at the limit, and the log's note says why.
    #[test]
    fn the_users_file_size_limit_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = std::fs::File::create(&path).unwrap();
        let (ours, theirs) = pair();
        let who = Writer {
            fsize: Some(10),
            ..me()
        };
        let mut w = OutputWriters::start(ours, Some("out".into()), None, who).unwrap();
        send(&theirs, 1, &[&file]);
        assert_eq!(w.write(1, b"0123456"), None);
        // Whether the writer failed yet or not, this is not written past the limit.
        let _ = w.write(1, b"789abcdef");
        // Once the writer has stopped, the next output gets the note.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let note = loop {
            assert!(std::time::Instant::now() < deadline, "no note");
            if w.files[0].error.lock().unwrap().is_some() {
                if let Some(note) = w.write(1, b"") {
                    break note;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            note.contains("could not be written") && note.contains("File too large"),
            "{note}"
        );
        w.finish(Duration::from_secs(60));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0123456789");
    }

    /// A file that stops taking output (an unread terminal) never makes `write` wait: once
    /// its queue is full the output is dropped, with one note; `finish` waits a bounded time.
    #[test]
    fn a_stalled_file_loses_output_with_one_note_and_never_blocks() {
        let (mut m, mut sl) = (-1, -1);
        // SAFETY: openpty fills two descriptors we then own.
        let (master, slave) = unsafe {
            let rc = libc::openpty(
                &mut m,
                &mut sl,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            );
            assert_eq!(rc, 0);
            (OwnedFd::from_raw_fd(m), std::fs::File::from_raw_fd(sl))
        };
        let (ours, theirs) = pair();
        let mut w = OutputWriters::start(ours, Some("tty".into()), Some("e".into()), me()).unwrap();
        let devnull = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .unwrap();
        send(&theirs, 3, &[&slave, &devnull]);
        let chunk = vec![b'x'; 64 * 1024];
        let notes: Vec<String> = (0..4 * QUEUE_CHUNKS)
            .filter_map(|_| w.write(1, &chunk))
            .collect();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("'tty' does not keep up"), "{}", notes[0]);
        // The other stream's file is not held up by it.
        assert_eq!(w.write(2, b"fine"), None);
        w.finish(Duration::from_millis(100));
        drop(master);
    }
}
