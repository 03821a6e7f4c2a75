//! `Attach`: an attached `mgpu_srun` whose server went away reconnects here and carries on
//! where it was: the output it missed (from the log), then live events, then the exit status.

use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{AttachRequest, Response};

use crate::handlers::follow::{follow, recorded_outcome, send_log_range, Follower};
use crate::server::{send, send_error, Caller, Conn};
use crate::state::Daemon;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: AttachRequest,
    conn: &mut Conn,
) -> Result<()> {
    let id = req.job;
    let by = daemon.requester(caller.uid);
    let (owner, events) = {
        let mut inner = daemon.lock();
        match inner.sched.job(id).map(|j| j.request.uid) {
            Some(uid) if by.may_manage(uid) => {
                inner.reattached.insert(id);
                (Some(uid), Some(daemon.subscribe(&mut inner, id)))
            }
            Some(uid) => (Some(uid), None),
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
    let sent = send_log_range(daemon, id, req.log_offset, None, conn).await?;
    match events {
        Some(rx) => follow(daemon, id, rx, conn, Follower::Srun { caller }, Some(sent)).await,
        None => send(conn, &Response::Finished(recorded_outcome(daemon, id))).await,
    }
}
