//! `Queue`: a snapshot of running and pending jobs and of the GPUs. Everyone may see it.

use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{GpuInfo, JobInfo, QueueRequest, QueueSnapshot, Response};

use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon};
use crate::users;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: QueueRequest,
    conn: &mut Conn,
) -> Result<()> {
    let only_uid = if req.me {
        Some(caller.uid)
    } else if let Some(name) = &req.user {
        match users::uid_of(name) {
            Some(uid) => Some(uid),
            None => return send_error(conn, format!("no such user: {name}")).await,
        }
    } else {
        None
    };
    let snapshot = {
        let inner = daemon.lock();
        let sched = &inner.sched;
        let gpus = sched
            .gpus()
            .iter()
            .map(|g| GpuInfo {
                index: g.spec.index,
                name: g.spec.name.clone(),
                total_mib: g.spec.total_mib,
                reserved_mib: if g.exclusive.is_some() {
                    g.spec.total_mib
                } else {
                    g.reserved_mib
                },
                used_mib: inner.gpu_used.get(&g.spec.index).copied().unwrap_or(0),
                jobs: g.jobs(),
            })
            .collect();
        let jobs = sched
            .jobs_in_order()
            .filter(|j| only_uid.is_none_or(|u| u == j.request.uid))
            .filter(|j| req.job.is_none_or(|id| id == j.id))
            .map(|j| JobInfo {
                id: j.id,
                user: j.request.user.clone(),
                name: j.request.name.clone(),
                state: j.state,
                gpus: j.request.gpus,
                gpu_ids: j.gpus.clone(),
                mem_mib: j.request.mem_mib,
                time_limit_s: sched.effective_limit_s(&j.request),
                submitted_at: j.submitted_at,
                started_at: j.started_at,
                restarts: j.restarts,
                reason: if j.cancel_requested {
                    Some("Cancelling".into())
                } else {
                    sched.pending_reason(j.id).map(str::to_string)
                },
                command: inner
                    .specs
                    .get(&j.id)
                    .map(|s| s.command.clone())
                    .unwrap_or_default(),
            })
            .collect();
        QueueSnapshot {
            now: now_ms(),
            gpus,
            jobs,
        }
    };
    send(conn, &Response::Queue(snapshot)).await
}
