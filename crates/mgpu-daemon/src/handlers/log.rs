//! `Log`: a job's output log (stdout and stderr as they came), for its owner or root only;
//! with `follow`, live until the job ends.
//!
//! Following is exact: the handler subscribes before reading the file, then skips the part of
//! each live chunk (they carry their file offset) that the file already gave.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use futures::SinkExt;
use mgpu_proto::{Frame, LogRequest, Response};
use tokio::sync::broadcast::error::RecvError;

use crate::server::{send, send_error, Caller, Conn};
use crate::state::{Daemon, JobEvent};

const CHUNK: usize = 64 * 1024;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: LogRequest,
    conn: &mut Conn,
) -> Result<()> {
    let id = req.job;
    let by = daemon.requester(caller.uid);
    // Owner of a live job, or of a recorded one.
    let (owner, mut events) = {
        let mut inner = daemon.lock();
        match inner.sched.job(id).map(|j| j.request.uid) {
            Some(uid) => {
                let events =
                    (req.follow && by.may_manage(uid)).then(|| daemon.subscribe(&mut inner, id));
                (Some(uid), events)
            }
            None => (None, None),
        }
    };
    let (owner, final_state) = match owner {
        Some(uid) => (uid, None),
        None => match daemon.store.summary(id)? {
            Some(s) => (s.uid, Some(s.state)),
            None => return send_error(conn, format!("no such job: {id}")).await,
        },
    };
    if !by.may_manage(owner) {
        return send_error(
            conn,
            format!("permission denied: job {id} belongs to another user"),
        )
        .await;
    }
    // The file so far.
    let mut sent: u64 = 0;
    if let Ok(mut file) = std::fs::File::open(daemon.log_path(id)) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            conn.send(Frame::Stdout(Bytes::copy_from_slice(&buf[..n])))
                .await?;
            sent += n as u64;
        }
    }
    let Some(rx) = events.as_mut() else {
        return send(
            conn,
            &Response::LogEnd {
                job: id,
                state: final_state,
            },
        )
        .await;
    };
    loop {
        match rx.recv().await {
            Ok(JobEvent::Output { offset, data, .. }) => {
                let end = offset + data.len() as u64;
                if end <= sent {
                    continue;
                }
                let skip = sent.saturating_sub(offset) as usize;
                conn.send(Frame::Stdout(data.slice(skip..))).await?;
                sent = end;
            }
            Ok(JobEvent::Started { .. }) => {}
            Ok(JobEvent::Finished(o)) => {
                return send(
                    conn,
                    &Response::LogEnd {
                        job: id,
                        state: Some(o.state),
                    },
                )
                .await;
            }
            Ok(JobEvent::Requeued { .. }) | Err(RecvError::Closed) => {
                return send(
                    conn,
                    &Response::LogEnd {
                        job: id,
                        state: None,
                    },
                )
                .await;
            }
            Err(RecvError::Lagged(_)) => {
                // Catch up from the file, which has everything.
                let mut file = std::fs::File::open(daemon.log_path(id))?;
                file.seek(SeekFrom::Start(sent))?;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    conn.send(Frame::Stdout(Bytes::copy_from_slice(&buf[..n])))
                        .await?;
                    sent += n as u64;
                }
            }
        }
    }
}
