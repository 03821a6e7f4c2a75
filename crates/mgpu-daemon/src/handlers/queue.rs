//! `Queue`: a snapshot of running and pending jobs and of the GPUs. Everyone may see it.

use std::sync::Arc;

use anyhow::Result;
use mgpu_core::Stopping;
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
    let mut snapshot = {
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
                reason: match j.stopping {
                    Some(Stopping::Cancel) => Some("Cancelling".into()),
                    Some(Stopping::Requeue) => Some("Preempting".into()),
                    Some(Stopping::Timeout) => Some("TimeLimit".into()),
                    None => sched.pending_reason(j.id).map(str::to_string),
                },
                command: inner.commands.get(&j.id).cloned().unwrap_or_default(),
                priority: sched.priority(j.id),
                est_start: sched.est_start(j.id),
                array: j.request.array,
            })
            .collect();
        QueueSnapshot {
            now: now_ms(),
            policy: sched.config().policy.to_string(),
            gpus,
            jobs,
        }
    };
    // Sent in chunks: a queue of any length fits under the frame limit.
    let mut rest = snapshot.jobs.split_off(snapshot.jobs.len().min(CHUNK));
    send(conn, &Response::Queue(snapshot)).await?;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(CHUNK));
        send(conn, &Response::QueueJobs { jobs: rest }).await?;
        rest = tail;
    }
    send(conn, &Response::QueueEnd).await
}

/// Jobs per frame.
const CHUNK: usize = 5000;
/// Command text shown per job; longer ones are cut (the full argv stays with the job).
const MAX_SHOWN_COMMAND: usize = 1024;

pub fn display_command(argv: &[String]) -> Vec<String> {
    let mut budget = MAX_SHOWN_COMMAND;
    let mut out = Vec::new();
    for a in argv {
        if a.len() <= budget {
            budget -= a.len();
            out.push(a.clone());
        } else {
            let mut cut = budget;
            while !a.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push(format!("{}...", &a[..cut]));
            break;
        }
    }
    out
}
