//! `Acct`: finished jobs from the store (like `sacct`). Owners see their own; root sees all.
//! Records are sent in chunks, so any number fits under the frame limit.

use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{AcctRequest, Response};

use crate::server::{send, send_error, Caller, Conn};
use crate::state::Daemon;
use crate::store::AcctFilter;
use crate::users;

/// Records per frame (and per read from the store), each sent under the write deadline.
const CHUNK: usize = 500;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: AcctRequest,
    conn: &mut Conn,
) -> Result<()> {
    let by = daemon.requester(caller.uid);
    let uid = match (&req.user, req.me) {
        (_, true) => Some(caller.uid),
        (Some(name), false) => match users::uid_of(name) {
            Some(uid) if by.may_manage(uid) => Some(uid),
            Some(_) => {
                return send_error(
                    conn,
                    format!("permission denied: only {name} or root may see {name}'s jobs"),
                )
                .await
            }
            None => return send_error(conn, format!("no such user: {name}")).await,
        },
        (None, false) if by.is_admin => None,
        (None, false) => Some(caller.uid),
    };
    let filter = AcctFilter {
        uid,
        job: req.job,
        since: req.since,
        state: req.state,
    };
    let _slot = match req.job {
        Some(_) => None,
        None => match conn.listing().await {
            Ok(slot) => Some(slot),
            Err(e) => return send_error(conn, format!("{e:#}")).await,
        },
    };
    // Every end recorded before this request (a job that has left the queue) is committed
    // first: a job is never missing from both the queue and the accounting.
    daemon.store.flush().await;
    let mut after = 0;
    loop {
        let d = daemon.clone();
        let f = filter.clone();
        let records =
            tokio::task::spawn_blocking(move || d.store.finished_jobs(&f, after, CHUNK)).await??;
        let Some(last) = records.last() else { break };
        after = last.id;
        let full = records.len() == CHUNK;
        send(conn, &Response::AcctRecords { records }).await?;
        if !full {
            break;
        }
    }
    send(conn, &Response::AcctEnd).await
}
