//! Following a job's output live, exactly: every chunk's event carries its place in the job's
//! log (never the bytes themselves, so a follower that does not read holds no output in the
//! server's memory), and the follower reads it from the log file at its own pace: a client is
//! sent each byte once, in order. Chunks it missed (it subscribed late, fell behind the bounded
//! event channel, the supervisor's link was down, or the output came while the server was down)
//! are read back from the log file too, which has everything.
//!
//! Used by attached `mgpu_srun` (separate stdout/stderr, progress messages, the exit status) and
//! by `mgpu_log --follow` (the log as it came, then the end).

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use mgpu_core::{JobId, JobState};
use mgpu_proto::{Frame, JobOutcome, Request, Response};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::handlers::cancel::cancel_one;
use crate::server::{send, Caller, Conn};
use crate::state::{Daemon, JobEvent, Stream};

const CHUNK: usize = 64 * 1024;

/// Who is following.
#[derive(Debug, Clone, Copy)]
pub enum Follower {
    /// An attached `mgpu_srun`: Ctrl-C on it (or its loss) cancels the job.
    Srun { caller: Caller },
    /// `mgpu_log --follow`.
    Log,
}

/// Sends log bytes `[from, to)` (to the end when `to` is `None`) as stdout frames; returns the
/// offset reached.
pub async fn send_log_range(
    daemon: &Daemon,
    id: JobId,
    from: u64,
    to: Option<u64>,
    conn: &mut Conn,
) -> Result<u64> {
    send_log_as(daemon, id, from, to, conn, Stream::Stdout).await
}

/// [`send_log_range`] as frames of `stream`.
async fn send_log_as(
    daemon: &Daemon,
    id: JobId,
    from: u64,
    to: Option<u64>,
    conn: &mut Conn,
    stream: Stream,
) -> Result<u64> {
    let Ok(mut file) = std::fs::File::open(daemon.log_path(id)) else {
        return Ok(from);
    };
    file.seek(SeekFrom::Start(from))?;
    let mut pos = from;
    // No bigger than the range (an output event is often a line).
    let size = to.map_or(CHUNK, |t| (t.saturating_sub(from) as usize).min(CHUNK));
    let mut buf = vec![0u8; size];
    loop {
        let want = match to {
            Some(t) if t <= pos => break,
            Some(t) => ((t - pos) as usize).min(CHUNK),
            None => CHUNK,
        };
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        let data = Bytes::copy_from_slice(&buf[..n]);
        let frame = match stream {
            Stream::Stdout => Frame::Stdout(data),
            Stream::Stderr => Frame::Stderr(data),
        };
        conn.send_frame(frame).await?;
        pos += n as u64;
    }
    Ok(pos)
}

/// Checks that `caller` may see job `id`'s output (its owner or root) and, when `subscribe`
/// and the job is live, subscribes to its events first (under the lock, so none is missed
/// between reading the log and following it). `Err` carries the message for the client.
pub fn authorize(
    daemon: &Daemon,
    caller: Caller,
    id: JobId,
    subscribe: bool,
) -> Result<Option<broadcast::Receiver<JobEvent>>, String> {
    let by = daemon.requester(caller.uid);
    let (owner, events) = {
        let mut inner = daemon.lock();
        match inner.sched.job(id).map(|j| j.request.uid) {
            Some(uid) => {
                let events =
                    (subscribe && by.may_manage(uid)).then(|| daemon.subscribe(&mut inner, id));
                (Some(uid), events)
            }
            None => (None, None),
        }
    };
    let owner = match owner {
        Some(uid) => uid,
        None => match daemon.store.summary(id) {
            Ok(Some(s)) => s.uid,
            Ok(None) => return Err(format!("no such job: {id}")),
            Err(e) => return Err(format!("cannot read the job records: {e:#}")),
        },
    };
    if !by.may_manage(owner) {
        return Err(format!(
            "permission denied: job {id} belongs to another user"
        ));
    }
    Ok(events)
}

/// The recorded outcome of a job that is no longer live.
/// A one-line hint for a finished job whose GPU memory peak was far from its `--mem`: under
/// half of it (a smaller `--mem` lets it start sooner and others share), or over it.
pub fn gpu_memory_hint(daemon: &Daemon, id: JobId) -> Option<String> {
    let s = daemon.store.summary(id).ok()??;
    let (mem, peak) = (s.mem_mib?, s.peak_gpu_mem_mib?);
    if peak > mem {
        Some(format!(
            "job {id} used up to {peak} MiB of GPU memory on one GPU, more than its --mem of \
             {mem} MiB: ask for at least --mem {}M",
            peak.div_ceil(256) * 256
        ))
    } else if peak * 2 < mem {
        Some(format!(
            "job {id} used at most {peak} MiB of GPU memory on one GPU, under half its --mem of \
             {mem} MiB: a smaller --mem (e.g. {}M) lets it start sooner and others share",
            (peak + peak / 4).max(1).div_ceil(256) * 256
        ))
    } else {
        None
    }
}

pub fn recorded_outcome(daemon: &Daemon, id: JobId) -> JobOutcome {
    match daemon.store.summary(id) {
        Ok(Some(s)) if s.state.is_terminal() => JobOutcome {
            job: id,
            state: s.state,
            exit_code: s.exit_code,
            signal: s.signal,
            message: s.message,
        },
        _ => JobOutcome {
            job: id,
            state: JobState::Failed,
            exit_code: None,
            signal: None,
            message: Some("mgpu: lost track of the job's end".into()),
        },
    }
}

/// Streams `id`'s events until it ends. `sent`: how far into the log the client already has
/// the output (`None`: nothing of the coming run yet). An attached srun that cannot be reached
/// any more (it died) has its job cancelled, as with Slurm; one that stopped reading for
/// [`crate::conn::WRITE_TIMEOUT`] (or whose user's budget is spent) is dropped, and its job goes
/// on (`mgpu_srun` re-attaches once it reads again, from where it was).
pub async fn follow(
    daemon: &Arc<Daemon>,
    id: JobId,
    events: broadcast::Receiver<JobEvent>,
    conn: &mut Conn,
    who: Follower,
    sent: Option<u64>,
) -> Result<()> {
    let result = follow_until_end(daemon, id, events, conn, who, sent).await;
    if let (Err(e), Follower::Srun { caller }) = (&result, who) {
        if conn.given_up() {
            tracing::info!(job = id, error = %e, "dropped an attached client that does not read");
            return result;
        }
        tracing::info!(job = id, "lost the attached client; cancelling its job");
        let mut inner = daemon.lock();
        cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
    }
    result
}

async fn follow_until_end(
    daemon: &Arc<Daemon>,
    id: JobId,
    mut events: broadcast::Receiver<JobEvent>,
    conn: &mut Conn,
    who: Follower,
    mut sent: Option<u64>,
) -> Result<()> {
    let mut cancel_sent = false;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(JobEvent::Started { gpus, log_offset }) => {
                    if let Follower::Srun { .. } = who {
                        send(conn, &Response::Started { job: id, gpus, log_offset }).await?;
                        sent = Some(sent.map_or(log_offset, |s| s.max(log_offset)));
                    }
                }
                Ok(JobEvent::Output { stream, offset, len }) => {
                    let mut pos = sent.unwrap_or(offset);
                    if offset > pos {
                        pos = send_log_range(daemon, id, pos, Some(offset), conn).await?;
                    }
                    let end = offset + len;
                    if end > pos {
                        let stream = match who {
                            Follower::Srun { .. } => stream,
                            Follower::Log => Stream::Stdout,
                        };
                        pos = send_log_as(daemon, id, pos, Some(end), conn, stream).await?;
                    }
                    sent = Some(pos);
                }
                Ok(JobEvent::Requeued { message } | JobEvent::Notice { message }) => {
                    if let Follower::Srun { .. } = who {
                        send(conn, &Response::Notice { message }).await?;
                    }
                }
                Ok(JobEvent::Finished(outcome)) => {
                    // Whatever the channel dropped at the end is in the file.
                    if let Some(pos) = sent {
                        send_log_range(daemon, id, pos, None, conn).await?;
                    }
                    // The end is on record before the client hears it (mgpu_acct agrees).
                    daemon.store.flush().await;
                    return match who {
                        Follower::Srun { .. } => {
                            if let Some(message) = gpu_memory_hint(daemon, id) {
                                send(conn, &Response::Notice { message }).await?;
                            }
                            send(conn, &Response::Finished(outcome)).await
                        }
                        Follower::Log => send(conn, &Response::LogEnd { job: id, state: Some(outcome.state) }).await,
                    };
                }
                // Fell behind: what it missed is in the file.
                Err(RecvError::Lagged(_)) => {
                    if let Some(pos) = sent {
                        sent = Some(send_log_range(daemon, id, pos, None, conn).await?);
                    }
                }
                // The server is shutting down: closing makes srun reconnect to the next one.
                Err(RecvError::Closed) => return Ok(()),
            },
            frame = conn.recv() => match (frame, who) {
                (Ok(Some(f)), Follower::Srun { caller }) => {
                    if let Ok(Request::CancelAttached) = f.parse::<Request>() {
                        if !cancel_sent {
                            cancel_sent = true;
                            let mut inner = daemon.lock();
                            cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
                        }
                    }
                }
                (Ok(Some(_)), Follower::Log) => {}
                // The client is gone. For srun (killed, or its terminal closed) the job goes too,
                // as with Slurm.
                (_, Follower::Srun { caller }) => {
                    tracing::info!(job = id, "attached client disconnected; cancelling its job");
                    let mut inner = daemon.lock();
                    cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
                    return Ok(());
                }
                (_, Follower::Log) => return Ok(()),
            }
        }
    }
}
