//! A client connection: the one place that reads and writes a client's socket.
//!
//! Everything a connection holds in memory is bounded and charged to its user:
//! - a frame being received is refused once its header says it is over the bound of its kind
//!   (the hello, each request type, the frames that follow a request), and must arrive whole
//!   within [`FRAME_READ_TIMEOUT`] of its first byte;
//! - output waits in memory one frame at a time, and each frame must be written within
//!   [`WRITE_TIMEOUT`]: a client that does not read is dropped, not served from memory;
//! - the bytes of unfinished frames and unsent replies count against a budget per user
//!   ([`USER_BUDGET`]) and one for all ([`TOTAL_BUDGET`]); a connection over it is refused with
//!   a clear error;
//! - big listings (`queue`, `acct`, a whole log) take a [`Listings`] slot: a few per user and a
//!   few in all run at once, each sending page by page.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use bytes::{Buf, BytesMut};
use mgpu_proto::{write_frame, Frame, MAX_CANCEL_FRAME, MAX_SMALL_FRAME, MAX_SUBMIT_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a client may take to read one frame we send it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a frame may take to arrive once its first byte is in.
pub const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of unfinished frames and unsent replies one user's connections may hold.
pub const USER_BUDGET: usize = 32 << 20;
/// ... and all connections together.
pub const TOTAL_BUDGET: usize = 256 << 20;
/// Big listings of one user at once, and of everyone.
pub const LISTINGS_PER_USER: usize = 2;
pub const LISTINGS_TOTAL: usize = 16;
/// How long a listing waits for a slot.
const LISTING_WAIT: Duration = Duration::from_secs(60);
/// Most bytes read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;
/// The read buffer until a frame needs more.
const INITIAL_BUFFER: usize = 8192;

/// What the connection expects next, and so how big a frame may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The hello.
    Hello,
    /// The one request: its bound depends on its type.
    Request,
    /// Anything after the request (`cancel_attached`).
    After,
}

/// Bytes held by connections, per user and in all.
#[derive(Debug, Default)]
pub struct Budget {
    inner: Mutex<(HashMap<u32, usize>, usize)>,
}

impl Budget {
    /// Changes `uid`'s charge from `old` to `new` bytes; an increase over a limit is refused
    /// (and nothing changes).
    fn adjust(&self, uid: u32, old: usize, new: usize) -> Result<(), String> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (users, total) = &mut *g;
        let mine = users.get(&uid).copied().unwrap_or(0);
        let (mine2, total2) = (mine - old + new, *total - old + new);
        if new > old {
            if uid != 0 && mine2 > USER_BUDGET {
                return Err(format!(
                    "refused: your connections to the mgpu server would hold more than {} MiB of unfinished requests and unread replies (its limit per user); finish or close some connections",
                    USER_BUDGET >> 20
                ));
            }
            if total2 > TOTAL_BUDGET {
                return Err(format!(
                    "refused: the server's connections hold {} MiB of unfinished requests and unread replies (at most {}); try again shortly",
                    *total >> 20,
                    TOTAL_BUDGET >> 20
                ));
            }
        }
        *total = total2;
        if mine2 == 0 {
            users.remove(&uid);
        } else {
            users.insert(uid, mine2);
        }
        Ok(())
    }

    /// Bytes charged in all (for tests and logs).
    pub fn total(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// Slots for big listings: [`LISTINGS_PER_USER`] per user, [`LISTINGS_TOTAL`] in all.
#[derive(Debug)]
pub struct Listings {
    per_user: Mutex<HashMap<u32, Arc<Semaphore>>>,
    total: Arc<Semaphore>,
}

impl Default for Listings {
    fn default() -> Self {
        Listings {
            per_user: Mutex::default(),
            total: Arc::new(Semaphore::new(LISTINGS_TOTAL)),
        }
    }
}

/// A listing slot, given back on drop.
pub struct ListingSlot {
    _user: Option<OwnedSemaphorePermit>,
    _total: OwnedSemaphorePermit,
}

/// `SO_PASSRIGHTS` (Linux 6.16+, `asm-generic/socket.h`), not in every libc yet.
const SO_PASSRIGHTS: libc::c_int = 83;

/// Makes the kernel refuse descriptors sent to socket `sock` (`SO_PASSRIGHTS` = 0): a
/// client's `sendmsg` with `SCM_RIGHTS` fails with `EPERM` on its side, so the daemon never
/// holds (and never closes, which can block: a lingering TCP socket, a FUSE file) a
/// descriptor a user chose. Set on the listening socket, accepted ones inherit it. `Ok(false)`
/// on kernels without it (before 6.16): then a passed descriptor is discarded by the kernel
/// inside our read, and its last close runs there.
pub fn refuse_rights(sock: std::os::fd::BorrowedFd<'_>) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads the int we own.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

/// The limits all connections share.
#[derive(Debug, Default)]
pub struct Shared {
    pub budget: Budget,
    pub listings: Listings,
}

/// One client connection.
pub struct Conn {
    stream: UnixStream,
    uid: u32,
    shared: Arc<Shared>,
    stage: Stage,
    /// Received bytes not yet returned as frames.
    rbuf: BytesMut,
    /// Bytes of `rbuf`'s allocation charged to the budget.
    charged: usize,
    /// When the first byte of the frame being received came.
    frame_started: Option<Instant>,
    /// A write timed out or failed: the stream may hold half a frame, nothing more goes out.
    broken: bool,
    /// ... because the client did not read in time, or its user's budget was spent: the
    /// client may still be there.
    given_up: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, uid: u32, shared: Arc<Shared>) -> Conn {
        Conn {
            stream,
            uid,
            shared,
            stage: Stage::Hello,
            rbuf: BytesMut::new(),
            charged: 0,
            frame_started: None,
            broken: false,
            given_up: false,
        }
    }

    /// Whether the server gave the connection up (the client did not read in time, or its
    /// user's budget was spent) rather than the client going away.
    pub fn given_up(&self) -> bool {
        self.given_up
    }

    pub fn set_stage(&mut self, stage: Stage) {
        self.stage = stage;
    }

    /// Sends one frame within [`WRITE_TIMEOUT`]; a client that does not take it in time is
    /// given up (the error says so).
    pub async fn send_frame(&mut self, frame: Frame) -> Result<()> {
        if self.broken {
            bail!("the connection was given up");
        }
        let mut wire = Vec::new();
        write_frame(&mut wire, &frame)?;
        drop(frame);
        let n = wire.len();
        if let Err(e) = self.shared.budget.adjust(self.uid, 0, n) {
            self.broken = true;
            self.given_up = true;
            bail!("{e}");
        }
        let written = tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&wire)).await;
        let _ = self.shared.budget.adjust(self.uid, n, 0);
        self.write_outcome(written)
    }

    /// The next frame, `None` at a clean end. Cancel-safe (nothing is lost when the future is
    /// dropped). Errors: a frame over its bound, one that does not arrive in time, a budget
    /// refusal, a garbled frame.
    pub async fn recv(&mut self) -> Result<Option<Frame>> {
        loop {
            if self.rbuf.is_empty() {
                self.frame_started = None;
                // Nothing pending: the memory of a big frame goes back (a small buffer stays,
                // for the next one).
                if self.charged > INITIAL_BUFFER {
                    self.rbuf = BytesMut::new();
                    self.set_charge(0).expect("a decrease is never refused");
                }
            }
            if let Some(frame) = self.decode()? {
                return Ok(Some(frame));
            }
            self.grow()?;
            let read = self.stream.read_buf(&mut self.rbuf);
            let n = match self.frame_started {
                None => read.await?,
                Some(at) => match tokio::time::timeout_at((at + FRAME_READ_TIMEOUT).into(), read)
                    .await
                {
                    Ok(r) => r?,
                    Err(_) => bail!(
                        "a message took longer than {FRAME_READ_TIMEOUT:?} to arrive: connection dropped"
                    ),
                },
            };
            if n == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                bail!("the connection closed in the middle of a message");
            }
            self.frame_started.get_or_insert_with(Instant::now);
        }
    }

    /// Sends one control frame with descriptor `fd` attached (`SCM_RIGHTS` on the frame's
    /// first bytes), within [`WRITE_TIMEOUT`]. Only root's own descriptors go this way (the
    /// write end of a pipe the daemon made): passing one to a user is safe, the reverse never
    /// happens (see [`refuse_rights`]). Our copy is the caller's to close.
    pub async fn send_with_fd(
        &mut self,
        response: &mgpu_proto::Response,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        if self.broken {
            bail!("the connection was given up");
        }
        let mut wire = Vec::new();
        write_frame(&mut wire, &Frame::control(response))?;
        let sock = self.stream.as_raw_fd();
        let stream = &mut self.stream;
        let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
            let first = loop {
                stream.writable().await?;
                let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
                    let fds = [fd.as_raw_fd()];
                    let cmsg = [ControlMessage::ScmRights(&fds)];
                    let iov = [std::io::IoSlice::new(&wire)];
                    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                        .map_err(std::io::Error::from)
                });
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => break r?,
                }
            };
            stream.write_all(&wire[first..]).await
        })
        .await;
        self.write_outcome(sent)
    }

    /// What a deadline-bound write came to: a failed or overdue write breaks the connection.
    fn write_outcome(
        &mut self,
        written: Result<std::io::Result<()>, tokio::time::error::Elapsed>,
    ) -> Result<()> {
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(anyhow!("writing to the client: {e}"))
            }
            Err(_) => {
                self.broken = true;
                self.given_up = true;
                Err(anyhow!(
                    "the client did not read its answer for {WRITE_TIMEOUT:?}: connection dropped"
                ))
            }
        }
    }

    fn set_charge(&mut self, bytes: usize) -> Result<(), String> {
        self.shared.budget.adjust(self.uid, self.charged, bytes)?;
        self.charged = bytes;
        Ok(())
    }

    /// Makes room for the next read: a small buffer until a frame's header is in, then
    /// doubling up to the frame's size (never its whole size at once on the word of a header).
    /// The allocation is charged to the budget first.
    fn grow(&mut self) -> Result<()> {
        let len = self.rbuf.len();
        let (need, goal) = match self.header() {
            Some(frame) => {
                let need = len + (4 + frame).saturating_sub(len).clamp(1, READ_CHUNK);
                (need, (4 + frame).min(need.max(2 * self.rbuf.capacity())))
            }
            None => (len + 4, INITIAL_BUFFER),
        };
        if self.rbuf.capacity() >= need {
            return Ok(());
        }
        let cap = goal.max(need);
        self.set_charge(self.charged.max(cap))
            .map_err(|e| anyhow!("{e}"))?;
        let mut bigger = BytesMut::with_capacity(cap);
        bigger.extend_from_slice(&self.rbuf);
        self.rbuf = bigger;
        self.set_charge(self.rbuf.capacity())
            .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    fn header(&self) -> Option<usize> {
        (self.rbuf.len() >= 4).then(|| {
            u32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]) as usize
        })
    }

    /// A whole frame from `rbuf`, once there; checks the frame's bound as soon as its header
    /// (and, for a request, its type) is in.
    fn decode(&mut self) -> Result<Option<Frame>> {
        let Some(len) = self.header() else {
            return Ok(None);
        };
        if len == 0 {
            bail!("empty frame");
        }
        let body = &self.rbuf[4..];
        let (max, what) = match self.stage {
            Stage::Hello => (MAX_SMALL_FRAME, "the hello".to_string()),
            Stage::After => (MAX_SMALL_FRAME, "a message".to_string()),
            Stage::Request if len <= MAX_SMALL_FRAME => (MAX_SMALL_FRAME, String::new()),
            Stage::Request => {
                // The request's type comes first in its JSON: enough of it to know the bound.
                let prefix = b"\0{\"type\":\"";
                let need = (prefix.len() + 16).min(len);
                if body.len() < need {
                    if len > MAX_SUBMIT_FRAME {
                        bail!(
                            "a request of {len} bytes is too large (at most {} MiB)",
                            MAX_SUBMIT_FRAME >> 20
                        );
                    }
                    return Ok(None);
                }
                let kind = body
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.split(|&b| b == b'"').next())
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                match kind.as_str() {
                    "submit" => (MAX_SUBMIT_FRAME, "a submit request".into()),
                    "cancel" => (MAX_CANCEL_FRAME, "a cancel request".into()),
                    // Echoed only when it is a plain name.
                    k if !k.is_empty()
                        && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') =>
                    {
                        (MAX_SMALL_FRAME, format!("a {k} request"))
                    }
                    _ => (MAX_SMALL_FRAME, "a request".into()),
                }
            }
        };
        if len > max {
            bail!(
                "{what} of {len} bytes is too large (at most {} KiB)",
                max >> 10
            );
        }
        if self.rbuf.len() < 4 + len {
            return Ok(None);
        }
        self.rbuf.advance(4);
        let mut frame = self.rbuf.split_to(len);
        self.frame_started = (!self.rbuf.is_empty()).then(Instant::now);
        let tag = frame[0];
        let body = frame.split_off(1).freeze();
        Ok(Some(match tag {
            0 => Frame::Control(body),
            1 => Frame::Stdout(body),
            2 => Frame::Stderr(body),
            t => bail!("unknown frame type {t}"),
        }))
    }

    /// A slot for a big listing: waits for one of the caller's own (and one of all); an
    /// error after [`LISTING_WAIT`].
    pub async fn listing(&self) -> Result<ListingSlot> {
        let l = &self.shared.listings;
        let acquire = async {
            let user = if self.uid == 0 {
                None
            } else {
                let sem = l
                    .per_user
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(self.uid)
                    .or_insert_with(|| Arc::new(Semaphore::new(LISTINGS_PER_USER)))
                    .clone();
                Some(sem.acquire_owned().await.expect("never closed"))
            };
            let total = l.total.clone().acquire_owned().await.expect("never closed");
            ListingSlot {
                _user: user,
                _total: total,
            }
        };
        tokio::time::timeout(LISTING_WAIT, acquire).await.map_err(|_| {
            anyhow!(
                "the server is busy with other listings (at most {LISTINGS_PER_USER} of yours and {LISTINGS_TOTAL} in all at once); try again"
            )
        })
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.shared.budget.adjust(self.uid, self.charged, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_refuse_increases_past_the_limits() {
        let b = Budget::default();
        b.adjust(1000, 0, USER_BUDGET).unwrap();
        assert!(b.adjust(1000, 0, 1).is_err());
        // Root has no per-user limit, but the total holds.
        b.adjust(0, 0, TOTAL_BUDGET - USER_BUDGET).unwrap();
        assert!(b.adjust(1001, 0, 1).unwrap_err().contains("server's"));
        b.adjust(1000, USER_BUDGET, 0).unwrap();
        b.adjust(1001, 0, 1).unwrap();
        b.adjust(1001, 1, 0).unwrap();
        b.adjust(0, TOTAL_BUDGET - USER_BUDGET, 0).unwrap();
        assert_eq!(b.total(), 0);
    }

    async fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::new(a, 1000, Arc::default()), b)
    }

    /// A descriptor sent with a frame arrives with that frame's bytes; a client's descriptor
    /// is refused by the kernel where it can refuse it.
    #[tokio::test]
    async fn descriptors_go_out_with_their_frame_and_never_come_in() {
        use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsFd, AsRawFd};
        let (mut conn, peer) = pair().await;
        let file = std::fs::File::open("/dev/null").unwrap();
        conn.send_with_fd(&mgpu_proto::Response::StdinPipe, file.as_fd())
            .await
            .unwrap();
        let peer = peer.into_std().unwrap();
        peer.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        let msg = recvmsg::<()>(
            peer.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let n = msg.bytes;
        let fds: Vec<_> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                ControlMessageOwned::ScmRights(l) => Some(l),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(fds.len(), 1);
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(n, 4 + len, "the whole frame, nothing more");
        // The other way: refused where the kernel can (SO_PASSRIGHTS, Linux 6.16+).
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        if refuse_rights(a.as_fd()).unwrap() {
            let fds = [file.as_raw_fd()];
            let iov = [std::io::IoSlice::new(b"ii")];
            let e = sendmsg::<()>(
                b.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .unwrap_err();
            assert_eq!(e, nix::errno::Errno::EPERM);
        }
    }

    #[tokio::test]
    async fn requests_are_bounded_by_type_from_their_header() {
        let (mut conn, mut peer) = pair().await;
        conn.set_stage(Stage::Request);
        let len = (MAX_SMALL_FRAME + 1) as u32;
        peer.write_all(&len.to_be_bytes()).await.unwrap();
        peer.write_all(b"\0{\"type\":\"queue\",\"me\":false")
            .await
            .unwrap();
        let e = conn.recv().await.unwrap_err().to_string();
        assert!(
            e.contains("a queue request") && e.contains("too large"),
            "{e}"
        );

        let (mut conn, mut peer) = pair().await;
        conn.set_stage(Stage::Request);
        let len = (MAX_SUBMIT_FRAME + 1) as u32;
        peer.write_all(&len.to_be_bytes()).await.unwrap();
        let e = conn.recv().await.unwrap_err().to_string();
        assert!(e.contains("too large"), "{e}");
        assert!(conn.shared.budget.total() <= 8192);
        // Nothing stays charged.
        let shared = conn.shared.clone();
        drop(conn);
        assert_eq!(shared.budget.total(), 0);
    }

    #[tokio::test]
    async fn partial_frames_count_against_the_budget() {
        let shared: Arc<Shared> = Arc::default();
        let mut held = Vec::new();
        let mut refused = None;
        for _ in 0..(USER_BUDGET / MAX_SUBMIT_FRAME + 2) {
            let (a, mut b) = UnixStream::pair().unwrap();
            let mut conn = Conn::new(a, 1000, shared.clone());
            conn.set_stage(Stage::Request);
            let len = MAX_SUBMIT_FRAME as u32;
            b.write_all(&len.to_be_bytes()).await.unwrap();
            b.write_all(b"\0{\"type\":\"submit\",\"x\":\"")
                .await
                .unwrap();
            let filler = vec![b'x'; MAX_SUBMIT_FRAME - 64];
            let sent = 4 + b"\0{\"type\":\"submit\",\"x\":\"".len() + filler.len();
            let writer = tokio::spawn(async move {
                let _ = b.write_all(&filler).await;
                b
            });
            // Until the connection holds all that was sent (however slow the machine) or is
            // refused; then it waits for the rest, which never comes.
            let r = loop {
                let r = tokio::time::timeout(Duration::from_millis(50), conn.recv()).await;
                if r.is_ok() || conn.rbuf.len() >= sent {
                    break r;
                }
            };
            match r {
                Ok(Err(e)) => {
                    refused = Some(e.to_string());
                    break;
                }
                Ok(Ok(_)) => panic!("an unfinished frame was returned"),
                Err(_) => {}
            }
            held.push((conn, writer));
        }
        let e = refused.expect("the budget never refused");
        assert!(e.contains("per user"), "{e}");
        assert!(shared.budget.total() <= USER_BUDGET);
        drop(held);
        assert_eq!(shared.budget.total(), 0);
    }

    #[tokio::test]
    async fn frames_come_whole_and_in_order() {
        let (mut conn, mut peer) = pair().await;
        let frames = [
            Frame::control(&mgpu_proto::Request::CancelAttached),
            Frame::Stdout(bytes::Bytes::from_static(b"out")),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).unwrap();
        }
        for b in wire {
            peer.write_all(&[b]).await.unwrap();
        }
        drop(peer);
        for f in &frames {
            assert_eq!(&conn.recv().await.unwrap().unwrap(), f);
        }
        assert!(conn.recv().await.unwrap().is_none());
    }
}
