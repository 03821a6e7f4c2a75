//! `Cancel`: pending jobs leave the queue at once; running jobs are stopped (SIGTERM, SIGKILL
//! after the grace period) and keep their GPUs until their processes are gone. Only owners and
//! root may cancel.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;
use mgpu_core::{CancelOutcome, JobId, JobState, Requester};
use mgpu_proto::{CancelRequest, CancelResult, CancelStatus, JobOutcome, Response};

use crate::server::{send, send_error, Caller, Conn};
use crate::state::{Daemon, Inner};
use crate::supervisor::StopReason;
use crate::users;

/// Most job ids one request may name.
const MAX_IDS: usize = mgpu_proto::MAX_CANCEL_IDS;

/// Cancels one job on behalf of `by`.
pub fn cancel_one(
    daemon: &Arc<Daemon>,
    inner: &mut Inner,
    id: JobId,
    by: Requester,
) -> CancelStatus {
    match inner.sched.cancel(id, by) {
        CancelOutcome::Removed(job) => {
            // Only the owner or an admin may cancel: no user database lookup needed here.
            let by_name = if by.uid == job.request.uid {
                job.request.user.clone()
            } else if by.uid == 0 {
                "root".to_string()
            } else {
                format!("uid {}", by.uid)
            };
            tracing::info!(job = id, by = by.uid, "pending job cancelled");
            daemon.record_end(
                inner,
                JobOutcome {
                    job: id,
                    state: JobState::Cancelled,
                    exit_code: None,
                    signal: None,
                    message: Some(if job.restarts == 0 {
                        format!("cancelled by {by_name} before it started")
                    } else {
                        // It ran, was switched out, and waited to run again.
                        let runs = job.restarts;
                        let s = if runs == 1 { "" } else { "s" };
                        format!(
                            "cancelled by {by_name} while waiting to run again \
                             (context-switched {runs} time{s})"
                        )
                    }),
                },
            );
            CancelStatus::Cancelled
        }
        CancelOutcome::MustStop => {
            daemon.stop(inner, id, StopReason::Cancel);
            CancelStatus::Stopping
        }
        CancelOutcome::AlreadyStopping => CancelStatus::AlreadyStopping,
        CancelOutcome::NotFound => CancelStatus::NotFound,
        CancelOutcome::PermissionDenied => CancelStatus::PermissionDenied,
    }
}

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: CancelRequest,
    conn: &mut Conn,
) -> Result<()> {
    let by = daemon.requester(caller.uid);
    if let CancelRequest::Jobs(ids) = &req {
        if ids.len() > MAX_IDS {
            return send_error(
                conn,
                format!("too many job ids in one request (at most {MAX_IDS}); use --user or --all"),
            )
            .await;
        }
    }
    let mut user_uid = None;
    if let CancelRequest::User(name) = &req {
        let Some(uid) = users::uid_of(name) else {
            return send_error(conn, format!("no such user: {name}")).await;
        };
        if !by.may_manage(uid) {
            return send_error(
                conn,
                format!("permission denied: only {name} or root may cancel {name}'s jobs"),
            )
            .await;
        }
        user_uid = Some(uid);
    }
    // Any task's id names its array (a finished one's, from the store); the tasks' ids follow
    // each other from the array's.
    let mut array = None;
    if let CancelRequest::Array(id) = &req {
        let live = daemon.lock().sched.job(*id).map(|j| j.request.array);
        let task = match live {
            Some(task) => task,
            None => daemon.store.array_task(*id).unwrap_or(None),
        };
        array = Some(task.map_or((*id, 1), |a| (a.job, u64::from(a.count))));
    }
    let results = {
        let mut inner = daemon.lock();
        let ids: Vec<JobId> = match &req {
            CancelRequest::Jobs(ids) => {
                let mut seen = HashSet::new();
                ids.iter().copied().filter(|id| seen.insert(*id)).collect()
            }
            CancelRequest::User(_) => {
                let uid = user_uid.expect("resolved above");
                inner
                    .sched
                    .jobs_in_order()
                    .filter(|j| j.request.uid == uid)
                    .map(|j| j.id)
                    .collect()
            }
            CancelRequest::Array(_) => {
                let (first, count) = array.expect("resolved above");
                (first..first.saturating_add(count))
                    .filter(|id| {
                        inner
                            .sched
                            .job(*id)
                            .is_some_and(|j| j.request.array.is_some_and(|a| a.job == first))
                    })
                    .collect()
            }
            CancelRequest::All => inner
                .sched
                .jobs_in_order()
                .filter(|j| by.may_manage(j.request.uid))
                .map(|j| j.id)
                .collect(),
        };
        if let (Some((array, _)), true) = (array, ids.is_empty()) {
            Err(format!(
                "job array {array} has no pending or running tasks (all finished, or no such array)"
            ))
        } else {
            // Pending ones first, so cancelling running ones does not start doomed pending ones.
            let (pending, running): (Vec<JobId>, Vec<JobId>) = ids.iter().partition(|id| {
                inner
                    .sched
                    .job(**id)
                    .is_some_and(|j| j.state == JobState::Pending)
            });
            let outcomes: HashMap<JobId, CancelStatus> = pending
                .into_iter()
                .chain(running)
                .map(|id| (id, cancel_one(daemon, &mut inner, id, by)))
                .collect();
            daemon.schedule(&mut inner);
            Ok(ids
                .iter()
                .map(|id| CancelResult {
                    job: *id,
                    outcome: outcomes[id],
                })
                .collect::<Vec<_>>())
        }
    };
    let results = match results {
        Ok(r) => r,
        Err(msg) => return send_error(conn, msg).await,
    };
    // Durable before the answer: a cancelled pending job must not come back after a crash.
    daemon.store.flush().await;
    send(conn, &Response::Cancelled { results }).await
}
