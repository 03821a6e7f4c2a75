//! `Log`: a job's output log (stdout and stderr as they came), for its owner or root only;
//! with `follow`, live until the job ends.

use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{LogRequest, Response};

use crate::handlers::follow::{follow, send_log_range, Follower};
use crate::server::{send, send_error, Caller, Conn};
use crate::state::Daemon;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: LogRequest,
    conn: &mut Conn,
) -> Result<()> {
    let id = req.job;
    let by = daemon.requester(caller.uid);
    // Subscribe (under the lock, so no event is missed) before reading the file.
    let (owner, events) = {
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
    let owner = match owner {
        Some(uid) => uid,
        None => match daemon.store.summary(id)? {
            Some(s) => s.uid,
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
    let sent = send_log_range(daemon, id, 0, None, conn).await?;
    match events {
        Some(rx) => follow(daemon, id, rx, conn, Follower::Log, Some(sent)).await,
        None => {
            let state = daemon
                .store
                .summary(id)?
                .map(|s| s.state)
                .filter(|s| s.is_terminal());
            send(conn, &Response::LogEnd { job: id, state }).await
        }
    }
}
