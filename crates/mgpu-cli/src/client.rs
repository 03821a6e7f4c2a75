//! Connecting to the server.
//!
//! The default socket is in a root-owned directory (`/run/mgpu`), but one named with
//! `--socket` or `MGPU_SOCKET` may be anywhere, and anyone could bind a fake server there.
//! Before sending anything the client asks the kernel who owns the other end and refuses a
//! server that runs neither as root nor as the calling user.
//!
//! The hello is not waited for: the first request follows it at once (one round trip saved on
//! every command), and the server's welcome, or its refusal, is read before the first answer.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use mgpu_proto::{Frame, FrameCodec, Request, Response, PROTOCOL_VERSION};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

/// How long a client waits for room in the server's queue of connections not yet accepted.
pub const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Connects to `path`, waiting up to [`CONNECT_WAIT`] while the server's queue of connections
/// not yet accepted is full. A non-blocking connect (tokio's) fails at once then, so anyone
/// who keeps that queue full with connections of their own would make every other user's
/// command fail; a blocking one waits its turn in the kernel like theirs.
async fn connect_waiting(path: &Path) -> std::io::Result<UnixStream> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;
    let path = path.to_path_buf();
    let std_stream = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let sock = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // A blocking connect to a full queue waits at most the send timeout (then EAGAIN).
        let wait = nix::sys::time::TimeVal::new(CONNECT_WAIT.as_secs() as i64, 0);
        setsockopt(&sock, sockopt::SendTimeout, &wait)?;
        connect(sock.as_raw_fd(), &UnixAddr::new(&path)?)?;
        let stream = std::os::unix::net::UnixStream::from(sock);
        // Writes from here on go through tokio: never blocking, each with its own deadline.
        stream.set_nonblocking(true)?;
        Ok(stream)
    })
    .await
    .map_err(std::io::Error::other)??;
    UnixStream::from_std(std_stream)
}

pub struct Client {
    conn: Framed<FdStream, FrameCodec>,
    pub socket: PathBuf,
    /// The server's welcome is still to be read.
    welcome_pending: bool,
}

impl Client {
    /// Connects, verifies the server's identity and exchanges hellos.
    pub async fn connect(socket: Option<&Path>, client: &str) -> Result<Client> {
        let me = nix::unistd::getuid().as_raw();
        let named = socket;
        let socket = mgpu_proto::client_socket(named, me);
        let stream = connect_waiting(&socket).await.map_err(|e| {
            use std::io::ErrorKind::*;
            match e.kind() {
                WouldBlock => anyhow!(
                    "the mgpu server at {} had no room for a new connection for {} s (its queue of \
                     connections waiting to be accepted stayed full: it is overloaded, or someone \
                     is flooding it); try again",
                    socket.display(),
                    CONNECT_WAIT.as_secs()
                ),
                NotFound | ConnectionRefused => {
                    let hint = mgpu_proto::moved_socket_hint(named)
                        .map(|h| format!("\n{h}"))
                        .unwrap_or_default();
                    anyhow!(
                        "cannot reach the mgpu server at {} ({e}); is mgpu_scheduler_server running? (set MGPU_SOCKET or --socket for another path){hint}",
                        socket.display()
                    )
                }
                _ => anyhow!("cannot connect to {}: {e}", socket.display()),
            }
        })?;
        let server_uid = stream
            .peer_cred()
            .context("reading the server's credentials")?
            .uid();
        if server_uid != 0 && server_uid != me {
            bail!(
                "refusing to use {}: the process behind it runs as uid {server_uid}, neither root nor you; it is not a trustworthy mgpu server",
                socket.display()
            );
        }
        let mut conn = Client {
            conn: Framed::new(
                FdStream {
                    inner: stream,
                    fds: Vec::new(),
                },
                FrameCodec::default(),
            ),
            socket,
            welcome_pending: false,
        };
        conn.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: client_name(client),
        })
        .await?;
        conn.welcome_pending = true;
        Ok(conn)
    }

    /// Waits for the server's answer to our hello (when not read yet): a welcome, or why it
    /// refuses us.
    pub async fn welcome(&mut self) -> Result<()> {
        if self.welcome_pending {
            self.read_welcome().await?;
        }
        Ok(())
    }

    /// Reads the server's answer to our hello: a welcome, or why it refuses us.
    async fn read_welcome(&mut self) -> Result<()> {
        // Cancel-safe: the flag drops only once the frame is in (a dropped read leaves the
        // welcome to be read next time).
        let frame = match self.conn.next().await {
            None => bail!("the server closed the connection"),
            Some(f) => f.context("reading from the server")?,
        };
        self.welcome_pending = false;
        match frame.parse()? {
            Response::Welcome { .. } => Ok(()),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the server: {other:?}"),
        }
    }

    pub async fn send(&mut self, req: &Request) -> Result<()> {
        if let Err(e) = self.conn.send(Frame::control(req)).await {
            // A server that refused our hello may already have closed: its reason is better
            // than a broken pipe.
            if self.welcome_pending {
                self.read_welcome().await?;
            }
            // A server that stopped reading us (a request over its bounds) says why.
            let said = tokio::time::timeout(std::time::Duration::from_secs(1), self.conn.next());
            if let Ok(Some(Ok(frame))) = said.await {
                if let Ok(Response::Error { message }) = frame.parse() {
                    bail!("{message}");
                }
            }
            return Err(e).context("sending to the server");
        }
        Ok(())
    }

    /// The descriptor that came with the last [`Response::StdinPipe`] (the write end of the
    /// job's stdin pipe), if any.
    pub fn take_fd(&mut self) -> Option<std::os::fd::OwnedFd> {
        let fds = &mut self.conn.get_mut().fds;
        (!fds.is_empty()).then(|| fds.remove(0))
    }

    /// The next frame, or `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Frame>> {
        if self.welcome_pending {
            self.read_welcome().await?;
        }
        match self.conn.next().await {
            None => Ok(None),
            Some(f) => Ok(Some(f.context("reading from the server")?)),
        }
    }

    /// The next frame, which must be a control message.
    pub async fn recv_control(&mut self) -> Result<Response> {
        match self.recv().await? {
            None => bail!("the server closed the connection"),
            Some(f) => Ok(f.parse()?),
        }
    }

    /// Sends one request and returns the single answer; a server error becomes an `Err`.
    pub async fn call(&mut self, req: &Request) -> Result<Response> {
        self.send(req).await?;
        match self.recv_control().await? {
            Response::Error { message } => Err(anyhow!("{message}")),
            r => Ok(r),
        }
    }
}

/// The connection to the server, read with `recvmsg`: a descriptor the server sends with a
/// frame ([`Response::StdinPipe`]) is kept (a plain read would make the kernel discard it).
/// At most a few are kept; more are closed.
struct FdStream {
    inner: UnixStream,
    fds: Vec<std::os::fd::OwnedFd>,
}

const MAX_KEPT_FDS: usize = 2;

impl tokio::io::AsyncRead for FdStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::task::Poll;
        let this = self.get_mut();
        let sock = this.inner.as_raw_fd();
        loop {
            std::task::ready!(this.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let got = this.inner.try_io(tokio::io::Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(unfilled)];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                let msg =
                    recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                        .map_err(std::io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        // SAFETY: the kernel just gave us these descriptors.
                        fds.extend(list.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
                Ok((msg.bytes, fds))
            });
            match got {
                Ok((n, fds)) => {
                    for fd in fds {
                        if this.fds.len() < MAX_KEPT_FDS {
                            this.fds.push(fd);
                        }
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for FdStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn client_name(name: &str) -> String {
    format!("{name} {}", env!("CARGO_PKG_VERSION"))
}

pub use mgpu_proto::parse_mem_mib;

#[cfg(test)]
mod tests {
    #[test]
    fn mem_units() {
        assert_eq!(super::parse_mem_mib("10240"), Ok(10240));
        assert_eq!(super::parse_mem_mib("10G"), Ok(10240));
        assert_eq!(super::parse_mem_mib("512MiB"), Ok(512));
        assert!(super::parse_mem_mib("ten").is_err());
    }
}
