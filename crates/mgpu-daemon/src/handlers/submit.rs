//! `Submit`: validate, queue durably, answer with the id; when attached, stream the job's
//! progress, output and exit status, and cancel it on Ctrl-C or a lost client.

use std::sync::Arc;

use anyhow::Result;
use mgpu_core::{ArrayTask, JobId, JobRequest};
use mgpu_proto::{Response, SubmitRequest, Venv, MAX_ARRAY_INDEX, MAX_ARRAY_TASKS};

use crate::exec::LaunchSpec;
use crate::handlers::cancel::cancel_one;
use crate::handlers::follow::{follow, Follower};
use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon};
use crate::store::NewJob;
use crate::users;

const MAX_NAME: usize = 128;
const MAX_ARGS: usize = 65_536;
/// Bytes of argv, and of environment, one job may carry.
const MAX_ARGV_BYTES: usize = 1 << 20;
const MAX_ENV_BYTES: usize = 1 << 20;
/// Bytes of argv and environment that all tasks of one job array may carry together (each task
/// keeps its own copy in the store).
const MAX_ARRAY_BYTES: usize = 64 << 20;

fn default_name(command: &str) -> String {
    command.rsplit('/').next().unwrap_or(command).to_string()
}

/// Checks what the client sent; returns a clear message for the first problem.
fn validate(req: &SubmitRequest) -> Result<String, String> {
    let Some(program) = req.command.first() else {
        return Err(
            "empty command: give the command after --, e.g. mgpu_srun -- python train.py".into(),
        );
    };
    if program.is_empty() {
        return Err("empty command name".into());
    }
    if req.command.len() > MAX_ARGS {
        return Err(format!("too many arguments (at most {MAX_ARGS})"));
    }
    if req.command.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGV_BYTES {
        return Err(format!(
            "the command line is too long (at most {MAX_ARGV_BYTES} bytes)"
        ));
    }
    if req
        .env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        > MAX_ENV_BYTES
    {
        return Err(format!(
            "the environment is too large (at most {MAX_ENV_BYTES} bytes)"
        ));
    }
    if req.command.iter().any(|a| a.contains('\0')) {
        return Err("the command contains a NUL byte".into());
    }
    if !req.cwd.starts_with('/') {
        return Err(format!(
            "the working directory must be absolute, got '{}'",
            req.cwd
        ));
    }
    if let Venv::Dir(d) = &req.venv {
        if !d.starts_with('/') {
            return Err(format!("--venv must be an absolute path, got '{d}'"));
        }
    }
    let name = req.name.clone().unwrap_or_else(|| default_name(program));
    if name.is_empty() || name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(format!(
            "invalid job name: 1 to {MAX_NAME} characters without control characters"
        ));
    }
    if let Some(indices) = &req.array {
        if req.attach {
            return Err("a job array is submitted detached".into());
        }
        if indices.is_empty() || indices.len() > MAX_ARRAY_TASKS {
            return Err(format!("a job array has 1 to {MAX_ARRAY_TASKS} tasks"));
        }
        if indices.windows(2).any(|w| w[0] >= w[1]) || indices.iter().any(|&i| i > MAX_ARRAY_INDEX)
        {
            return Err(format!(
                "array task indices must increase and be at most {MAX_ARRAY_INDEX}"
            ));
        }
        let per_task = req.command.iter().map(|a| a.len() + 1).sum::<usize>()
            + req
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>();
        if per_task.saturating_mul(indices.len()) > MAX_ARRAY_BYTES {
            return Err(format!(
                "the array's {} tasks would carry {} MiB of command line and environment \
                 (at most {} MiB in all): submit fewer tasks or from a smaller environment",
                indices.len(),
                (per_task * indices.len()) >> 20,
                MAX_ARRAY_BYTES >> 20
            ));
        }
    }
    Ok(name)
}

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    mut req: SubmitRequest,
    conn: &mut Conn,
) -> Result<()> {
    let name = match validate(&req) {
        Ok(n) => n,
        Err(msg) => return send_error(conn, msg).await,
    };
    if req.nice < 0 && !daemon.requester(caller.uid).is_admin {
        return send_error(
            conn,
            "only root may raise a job's priority (negative --nice)",
        )
        .await;
    }
    let run_uid = if daemon.settings.multi_user {
        caller.uid
    } else {
        daemon.settings.server_uid
    };
    let account = match users::account(run_uid) {
        Ok(a) => a,
        Err(e) => return send_error(conn, format!("cannot run jobs for you: {e:#}")).await,
    };
    let request = JobRequest {
        uid: caller.uid,
        user: account.name.clone(),
        name,
        gpus: req.gpus,
        mem_mib: req.mem_mib,
        time_limit_s: req.time_limit_s,
        nice: req.nice,
        no_requeue: req.no_requeue,
        max_restarts: req.max_restarts,
        warn_signal: req.signal,
        array: None,
    };
    let spec = LaunchSpec {
        command: req.command,
        cwd: req.cwd,
        env: req.env,
        venv: req.venv,
        umask: req.umask,
    };
    if let Some(indices) = req.array.take() {
        return submit_array(daemon, caller, request, spec, &indices, conn).await;
    }
    let now = now_ms();
    // Phase 1: refuse what can never run, and take an id.
    let id = {
        let mut inner = daemon.lock();
        if inner.shutting_down {
            Err("the mgpu server is shutting down; try again shortly".to_string())
        } else if let Err(e) = inner.sched.check_feasible(&request) {
            Err(format!("job refused: {e}"))
        } else {
            Ok(inner.take_job_id())
        }
    };
    let id = match id {
        Ok(id) => id,
        Err(msg) => return send_error(conn, msg).await,
    };
    // Phase 2: durable before anything else happens to it (group commit with other submits).
    let committed = daemon
        .store
        .insert(NewJob {
            id,
            request: request.clone(),
            spec: spec.clone(),
            submitted_at: now,
            attached: req.attach,
        })
        .await
        .unwrap_or_else(|_| Err("the store stopped".to_string()));
    if let Err(e) = committed {
        return send_error(conn, format!("could not record the job durably: {e}")).await;
    }
    // Phase 3: into the queue, and start it if it fits.
    let queued = {
        let mut inner = daemon.lock();
        match inner.sched.restore_pending(id, request, now, 0) {
            // Cannot happen (checked above against the same GPUs).
            Err(e) => Err(e),
            Ok(()) => {
                inner
                    .commands
                    .insert(id, crate::handlers::queue::display_command(&spec.command));
                let events = req.attach.then(|| daemon.subscribe(&mut inner, id));
                daemon.schedule(&mut inner);
                Ok(events)
            }
        }
    };
    let events = match queued {
        Ok(events) => events,
        Err(e) => {
            tracing::error!(job = id, error = %e, "accepted job refused by the core");
            daemon.store.ended(
                id,
                crate::store::Ending {
                    state: mgpu_core::JobState::Failed,
                    at: now_ms(),
                    exit_code: None,
                    signal: None,
                    message: Some(format!("mgpu: refused: {e}")),
                },
            );
            return send_error(conn, format!("job refused: {e}")).await;
        }
    };
    tracing::info!(job = id, uid = caller.uid, pid = ?caller.pid, "job submitted");
    let sent = send(conn, &Response::Submitted { job: id }).await;
    let Some(events) = events else {
        return sent;
    };
    if sent.is_err() {
        // The attached client is already gone: its job goes too.
        let mut inner = daemon.lock();
        cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
        return sent;
    }
    let pending = {
        let inner = daemon.lock();
        inner
            .sched
            .queue_position(id)
            .zip(inner.sched.wait_detail(id))
    };
    if let Some((position, reason)) = pending {
        send(
            conn,
            &Response::Pending {
                job: id,
                position,
                reason,
            },
        )
        .await?;
    }
    follow(daemon, id, events, conn, Follower::Srun { caller }, None).await
}

/// A job array: one job per task, with ids that follow each other, all recorded in one
/// transaction before the answer, then queued together.
async fn submit_array(
    daemon: &Arc<Daemon>,
    caller: Caller,
    request: JobRequest,
    spec: LaunchSpec,
    indices: &[u32],
    conn: &mut Conn,
) -> Result<()> {
    let now = now_ms();
    let count = indices.len() as u32;
    let first = {
        let mut inner = daemon.lock();
        if inner.shutting_down {
            Err("the mgpu server is shutting down; try again shortly".to_string())
        } else if let Err(e) = inner.sched.check_feasible(&request) {
            Err(format!("job refused: {e}"))
        } else {
            let first = inner.take_job_id();
            for _ in 1..count {
                inner.take_job_id();
            }
            Ok(first)
        }
    };
    let first = match first {
        Ok(id) => id,
        Err(msg) => return send_error(conn, msg).await,
    };
    let (min, max) = (indices[0], indices[indices.len() - 1]);
    let requests: Vec<(JobId, JobRequest)> = indices
        .iter()
        .zip(first..)
        .map(|(&task, id)| {
            let array = Some(ArrayTask {
                job: first,
                task,
                count,
                min,
                max,
            });
            (
                id,
                JobRequest {
                    array,
                    ..request.clone()
                },
            )
        })
        .collect();
    let tasks = requests
        .iter()
        .map(|(id, request)| NewJob {
            id: *id,
            request: request.clone(),
            spec: spec.clone(),
            submitted_at: now,
            attached: false,
        })
        .collect();
    let committed = daemon
        .store
        .insert_all(tasks)
        .await
        .unwrap_or_else(|_| Err("the store stopped".to_string()));
    if let Err(e) = committed {
        return send_error(conn, format!("could not record the job array durably: {e}")).await;
    }
    {
        let mut inner = daemon.lock();
        let command = crate::handlers::queue::display_command(&spec.command);
        for (id, request) in requests {
            if let Err(e) = inner.sched.restore_pending(id, request, now, 0) {
                // Cannot happen (checked above against the same GPUs).
                tracing::error!(job = id, error = %e, "accepted array task refused by the core");
                daemon.store.ended(
                    id,
                    crate::store::Ending {
                        state: mgpu_core::JobState::Failed,
                        at: now_ms(),
                        exit_code: None,
                        signal: None,
                        message: Some(format!("mgpu: refused: {e}")),
                    },
                );
                continue;
            }
            inner.commands.insert(id, command.clone());
        }
        daemon.schedule(&mut inner);
    }
    tracing::info!(array = first, tasks = count, uid = caller.uid, pid = ?caller.pid, "job array submitted");
    send(
        conn,
        &Response::SubmittedArray {
            first,
            tasks: count,
        },
    )
    .await
}
