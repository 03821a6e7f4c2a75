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

pub struct Client {
    conn: Framed<UnixStream, FrameCodec>,
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
        let stream = UnixStream::connect(&socket).await.map_err(|e| {
            use std::io::ErrorKind::*;
            match e.kind() {
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
            conn: Framed::new(stream, FrameCodec::default()),
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

    /// Passes descriptor `fd` to the server (when it asked for it): one byte carrying it.
    pub async fn send_fd(&mut self, fd: std::os::fd::RawFd) -> Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        SinkExt::<Frame>::flush(&mut self.conn).await?;
        let stream = self.conn.get_ref();
        let sock = stream.as_raw_fd();
        loop {
            stream.writable().await?;
            let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let fds = [fd];
                let cmsg = [ControlMessage::ScmRights(&fds)];
                let iov = [std::io::IoSlice::new(b"i")];
                sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None)
                    .map_err(std::io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => {
                    r.context("passing stdin to the server")?;
                    return Ok(());
                }
            }
        }
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
