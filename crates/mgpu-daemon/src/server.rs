//! The UNIX socket: binding it safely, authenticating peers by kernel credentials, and
//! dispatching each connection's request to its handler.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mgpu_proto::{Frame, Request, Response, PROTOCOL_VERSION};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

pub use crate::conn::Conn;
use crate::conn::{Shared, Stage};
use crate::handlers;
use crate::state::Daemon;

/// Concurrent connections served; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Concurrent connections of one non-root user, so nobody can starve the others.
const MAX_CONNECTIONS_PER_USER: usize = 256;
/// How long a client may take to say hello and send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected client, as the kernel identifies it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Binds the socket at `path` with mode 0666. A live server there makes this fail; a stale
/// socket file is replaced; anything that is not a socket is left alone.
pub fn bind(path: &Path) -> Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                bail!(
                    "{} exists and is not a socket; refusing to replace it (use --socket to choose another path)",
                    path.display()
                );
            }
            match probe_listener(path) {
                Ok(()) => bail!(
                    "another server is already listening on {}; stop it first or use --socket",
                    path.display()
                ),
                // A full listen queue: something listens there but does not accept (a hung
                // server). A blocking connect would wait for it for ever.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => bail!(
                    "another server is listening on {} but not accepting connections (hung?); stop it first or use --socket",
                    path.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing stale socket");
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                }
                Err(e) => bail!("cannot check the existing socket {}: {e}", path.display()),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot inspect {}: {e}", path.display()),
    }
    // Everyone may connect (mode 0666): what they may do is decided by their kernel
    // credentials. The mode comes from the umask at bind time, not from a chmod by path
    // afterwards, which a swapped-in symlink could redirect.
    // SAFETY: umask only changes this process's file creation mask.
    // No client's descriptor is ever taken (see `conn::refuse_rights`): set before bind, so
    // that every connection inherits it from its first byte.
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::{AsFd, AsRawFd};
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating the server socket")?;
    match crate::conn::refuse_rights(sock.as_fd()) {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "this kernel cannot refuse descriptors passed to the server's socket (SO_PASSRIGHTS, Linux 6.16+): a local user can make the daemon stall on the close of a descriptor it passes (see docs/security.md)"
        ),
        Err(e) => bail!("cannot set SO_PASSRIGHTS on the server socket: {e}"),
    }
    let addr = UnixAddr::new(path)?;
    let old = unsafe { libc::umask(0o111) };
    let bound = nix::sys::socket::bind(sock.as_raw_fd(), &addr);
    unsafe { libc::umask(old) };
    bound.with_context(|| format!("binding {}", path.display()))?;
    nix::sys::socket::listen(&sock, nix::sys::socket::Backlog::new(1024)?)
        .with_context(|| format!("listening on {}", path.display()))?;
    let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(sock))
        .context("registering the server socket")?;
    let mode = std::fs::symlink_metadata(path)?.permissions().mode() & 0o777;
    if mode != 0o666 {
        bail!("{} got mode {mode:o} instead of 666", path.display());
    }
    Ok(listener)
}

/// Connects to `path` without ever waiting (a UNIX socket connect blocks while the listener's
/// queue is full, and fails with `WouldBlock` here instead).
fn probe_listener(path: &Path) -> std::io::Result<()> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(sock.as_raw_fd(), &addr)?;
    Ok(())
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_user: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let shared: Arc<Shared> = Arc::default();
    let mut refusals = Refusals::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    // Inherited from the listener; set again before anything is read, in case.
                    let _ = crate::conn::refuse_rights(std::os::fd::AsFd::as_fd(&s));
                    s
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let daemon = daemon.clone();
        let shared = shared.clone();
        // The slot is taken here, in the order connections were accepted (in the spawned
        // task, a later connection could take the last slot before an earlier one).
        let slot = UserSlot::take(&per_user, &stream);
        if let Err(uid) = slot {
            refusals.note(uid, Instant::now());
        }
        tokio::spawn(async move {
            let _open = daemon.metrics.connection();
            let _slot = match slot {
                Ok(slot) => slot,
                Err(uid) => {
                    // The reason, not a bare broken pipe (a short frame, sent without waiting
                    // long: the socket's buffer is empty).
                    let mut conn = Conn::new(stream, uid, shared);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        send_error(
                            &mut conn,
                            format!(
                                "refused: you already have {MAX_CONNECTIONS_PER_USER} connections to the mgpu server (its limit per user); close some (e.g. mgpu_log --follow or attached mgpu_srun) and try again"
                            ),
                        ),
                    )
                    .await;
                    return;
                }
            };
            if let Err(e) = handle_connection(&daemon, stream, shared).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// How often, at most, refused connections are logged: a user who opens connections in a
/// loop must not fill the daemon's log (or have journald drop its other messages).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connections refused for a user's limit, logged at most once per [`REFUSAL_LOG_EVERY`] with
/// a count of those not logged since.
#[derive(Default)]
struct Refusals {
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn note(&mut self, uid: u32, now: Instant) {
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_EVERY)
        {
            self.unlogged += 1;
            return;
        }
        tracing::warn!(
            uid,
            refused_since_last_report = self.unlogged,
            "refusing a connection: too many from one user (reported at most every {} s)",
            REFUSAL_LOG_EVERY.as_secs()
        );
        self.last_logged = Some(now);
        self.unlogged = 0;
    }

    /// Refusals not logged yet (for tests).
    #[cfg(test)]
    fn unlogged(&self) -> u64 {
        self.unlogged
    }
}

/// One of a user's connection slots, given back on drop.
struct UserSlot {
    table: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl UserSlot {
    /// A slot for the peer of `stream`, or `Err(uid)` when that user has all theirs (an
    /// unreadable peer counts as uid `u32::MAX`, which has none).
    fn take(table: &Arc<Mutex<HashMap<u32, usize>>>, stream: &UnixStream) -> Result<UserSlot, u32> {
        let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(uid).or_default();
        if uid == u32::MAX || (uid != 0 && *n >= MAX_CONNECTIONS_PER_USER) {
            return Err(uid);
        }
        *n += 1;
        Ok(UserSlot {
            table: table.clone(),
            uid,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.uid);
            }
        }
    }
}

pub async fn send(conn: &mut Conn, msg: &Response) -> Result<()> {
    conn.send_frame(Frame::control(msg)).await
}

pub async fn send_error(conn: &mut Conn, message: impl Into<String>) -> Result<()> {
    send(
        conn,
        &Response::Error {
            message: message.into(),
        },
    )
    .await
}

async fn next_request(conn: &mut Conn) -> Result<Option<Request>> {
    match tokio::time::timeout(REQUEST_TIMEOUT, conn.recv()).await {
        Err(_) => bail!("client sent nothing for {REQUEST_TIMEOUT:?}"),
        Ok(frame) => match frame? {
            None => Ok(None),
            Some(frame) => Ok(Some(frame.parse()?)),
        },
    }
}

async fn handle_connection(
    daemon: &Arc<Daemon>,
    stream: UnixStream,
    shared: Arc<Shared>,
) -> Result<()> {
    let cred = stream.peer_cred().context("reading peer credentials")?;
    let caller = Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let mut conn = Conn::new(stream, caller.uid, shared);
    let hello = match next_request(&mut conn).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = send_error(&mut conn, format!("bad request: {e}")).await;
            return Err(e);
        }
    };
    match hello {
        Request::Hello { protocol, .. } if protocol == PROTOCOL_VERSION => {}
        Request::Hello { protocol, .. } => {
            return send_error(
                &mut conn,
                format!(
                    "protocol version mismatch: the client speaks version {protocol}, this server (mgpu {}) speaks version {PROTOCOL_VERSION}; use clients from the same mgpu release as the server",
                    env!("CARGO_PKG_VERSION")
                ),
            )
            .await;
        }
        _ => {
            return send_error(
                &mut conn,
                "protocol error: the first message must be a hello",
            )
            .await
        }
    }
    let settings = &daemon.settings;
    if !settings.multi_user && caller.uid != settings.server_uid {
        return send_error(
            &mut conn,
            format!(
                "this mgpu server runs in single-user mode for uid {} and does not serve uid {}; ask your administrator to run it as root for multi-user mode",
                settings.server_uid, caller.uid
            ),
        )
        .await;
    }
    conn.set_stage(Stage::Request);
    send(
        &mut conn,
        &Response::Welcome {
            protocol: PROTOCOL_VERSION,
            server_version: env!("CARGO_PKG_VERSION").into(),
            multi_user: settings.multi_user,
        },
    )
    .await?;
    let request = match next_request(&mut conn).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let _ = send_error(&mut conn, format!("bad request: {e}")).await;
            return Err(e);
        }
    };
    conn.set_stage(Stage::After);
    match request {
        Request::Submit(req) => handlers::submit::handle(daemon, caller, req, &mut conn).await,
        Request::Queue(req) => handlers::queue::handle(daemon, caller, req, &mut conn).await,
        Request::Cancel(req) => handlers::cancel::handle(daemon, caller, req, &mut conn).await,
        Request::Log(req) => handlers::log::handle(daemon, caller, req, &mut conn).await,
        Request::Attach(req) => handlers::attach::handle(daemon, caller, req, &mut conn).await,
        Request::Acct(req) => handlers::acct::handle(daemon, caller, req, &mut conn).await,
        Request::Usage(req) => handlers::usage::handle(daemon, caller, req, &mut conn).await,
        Request::Control(req) => handlers::control::handle(daemon, caller, req, &mut conn).await,
        Request::Hello { .. } | Request::CancelAttached => {
            send_error(&mut conn, "protocol error: unexpected message").await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connections_are_logged_at_most_once_per_period_with_a_count() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        r.note(1001, t0);
        assert_eq!(r.unlogged(), 0);
        for i in 1..=1000u64 {
            r.note(1001, t0 + Duration::from_millis(i));
        }
        // A thousand refusals within the period: counted, not logged.
        assert_eq!(r.unlogged(), 1000);
        r.note(1001, t0 + REFUSAL_LOG_EVERY);
        assert_eq!(r.unlogged(), 0);
    }
}
