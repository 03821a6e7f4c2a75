//! `Attach`: an attached `mgpu_srun` whose server went away reconnects here and carries on
//! where it was: the output it missed (from the log), then live events, then the exit status.

use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{AttachRequest, Response};

use crate::handlers::follow::{
    authorize, follow, gpu_memory_hint, recorded_outcome, send_log_range, Follower,
};
use crate::server::{send, send_error, Caller, Conn};
use crate::state::Daemon;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: AttachRequest,
    conn: &mut Conn,
) -> Result<()> {
    let id = req.job;
    // (A file offset is signed: past that, the seek would fail without a word.)
    if i64::try_from(req.log_offset).is_err() {
        return send_error(
            conn,
            format!("bad log offset {}: past any log", req.log_offset),
        )
        .await;
    }
    let events = match authorize(daemon, caller, id, true) {
        Ok(events) => events,
        Err(message) => return send_error(conn, message).await,
    };
    if events.is_some() {
        daemon.lock().reattached.insert(id);
    }
    let sent = send_log_range(daemon, id, req.log_offset, None, conn).await?;
    match events {
        Some(rx) => follow(daemon, id, rx, conn, Follower::Srun { caller }, Some(sent)).await,
        None => {
            if let Some(message) = gpu_memory_hint(daemon, id) {
                send(conn, &Response::Notice { message }).await?;
            }
            send(conn, &Response::Finished(recorded_outcome(daemon, id))).await
        }
    }
}
