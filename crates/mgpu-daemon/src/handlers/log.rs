//! `Log`: a job's output log (stdout and stderr as they came), for its owner or root only;
//! with `follow`, live until the job ends.

use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{LogRequest, Response};

use crate::handlers::follow::{authorize, follow, send_log_range, Follower};
use crate::server::{send, send_error, Caller, Conn};
use crate::state::Daemon;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: LogRequest,
    conn: &mut Conn,
) -> Result<()> {
    let id = req.job;
    let events = match authorize(daemon, caller, id, req.follow) {
        Ok(events) => events,
        Err(message) => return send_error(conn, message).await,
    };
    // The log so far is a big listing; following afterwards is not.
    let slot = match conn.listing().await {
        Ok(slot) => slot,
        Err(e) => return send_error(conn, format!("{e:#}")).await,
    };
    let sent = send_log_range(daemon, id, 0, None, conn).await?;
    drop(slot);
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
