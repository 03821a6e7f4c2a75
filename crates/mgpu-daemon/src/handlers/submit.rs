//! `Submit`: validate, queue durably, answer with the id; when attached, stream the job's
//! progress, output and exit status, and cancel it on Ctrl-C or a lost client.

use std::sync::Arc;

use anyhow::Result;
use futures::{SinkExt, StreamExt};
use mgpu_core::{JobRequest, JobState};
use mgpu_proto::{Frame, JobOutcome, Request, Response, SubmitRequest, Venv};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::exec::LaunchSpec;
use crate::handlers::cancel::cancel_one;
use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon, JobEvent, Stream};
use crate::store::NewJob;
use crate::users;

const MAX_NAME: usize = 128;
const MAX_ARGS: usize = 65_536;

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
    Ok(name)
}

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: SubmitRequest,
    conn: &mut Conn,
) -> Result<()> {
    let name = match validate(&req) {
        Ok(n) => n,
        Err(msg) => return send_error(conn, msg).await,
    };
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
        nice: 0,
    };
    let spec = LaunchSpec {
        command: req.command,
        cwd: req.cwd,
        env: req.env,
        venv: req.venv,
    };
    let now = now_ms();
    let queued = {
        let mut inner = daemon.lock();
        if inner.shutting_down {
            Err("the mgpu server is shutting down; try again shortly".to_string())
        } else {
            match inner.sched.submit(request.clone(), now) {
                Err(e) => Err(format!("job refused: {e}")),
                Ok(id) => {
                    let durable = daemon.store.insert(NewJob {
                        id,
                        request,
                        spec: spec.clone(),
                        submitted_at: now,
                    });
                    inner.specs.insert(id, spec);
                    let events = req.attach.then(|| daemon.subscribe(&mut inner, id));
                    daemon.schedule(&mut inner);
                    Ok((id, durable, events))
                }
            }
        }
    };
    let (id, durable, events) = match queued {
        Ok(q) => q,
        Err(msg) => return send_error(conn, msg).await,
    };
    let committed = match durable.await {
        Ok(r) => r,
        Err(_) => Err("the store stopped".to_string()),
    };
    if let Err(e) = committed {
        // Not durable: the submission does not count.
        {
            let mut inner = daemon.lock();
            cancel_one(daemon, &mut inner, id, daemon.requester(0));
        }
        return send_error(conn, format!("could not record the job durably: {e}")).await;
    }
    tracing::info!(job = id, uid = caller.uid, pid = ?caller.pid, "job submitted");
    send(conn, &Response::Submitted { job: id }).await?;
    let Some(events) = events else {
        return Ok(());
    };
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
    attach(daemon, caller, id, events, conn).await
}

/// Streams a job's events to an attached client until it ends.
async fn attach(
    daemon: &Arc<Daemon>,
    caller: Caller,
    id: u64,
    mut events: broadcast::Receiver<JobEvent>,
    conn: &mut Conn,
) -> Result<()> {
    let mut cancel_sent = false;
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(JobEvent::Started { gpus }) => send(conn, &Response::Started { job: id, gpus }).await?,
                Ok(JobEvent::Output { stream, data, .. }) => {
                    let frame = match stream {
                        Stream::Stdout => Frame::Stdout(data),
                        Stream::Stderr => Frame::Stderr(data),
                    };
                    conn.send(frame).await?;
                }
                Ok(JobEvent::Requeued { message }) => {
                    return send_error(conn, message).await;
                }
                Ok(JobEvent::Finished(outcome)) => {
                    return send(conn, &Response::Finished(outcome)).await;
                }
                Err(RecvError::Lagged(n)) => {
                    send(conn, &Response::Notice {
                        message: format!("output too fast for this terminal: {n} chunks skipped here (the full output is in mgpu_log {id})"),
                    }).await?;
                }
                Err(RecvError::Closed) => {
                    // The job ended before we could hear it (or the server is going away).
                    let outcome = match daemon.store.summary(id) {
                        Ok(Some(s)) if s.state.is_terminal() => JobOutcome {
                            job: id, state: s.state, exit_code: s.exit_code, signal: s.signal, message: s.message,
                        },
                        _ => JobOutcome { job: id, state: JobState::Failed, exit_code: None, signal: None,
                            message: Some("mgpu: lost track of the job's end".into()) },
                    };
                    return send(conn, &Response::Finished(outcome)).await;
                }
            },
            frame = conn.next() => match frame {
                Some(Ok(f)) => {
                    if let Ok(Request::CancelAttached) = f.parse::<Request>() {
                        if !cancel_sent {
                            cancel_sent = true;
                            let mut inner = daemon.lock();
                            cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
                        }
                    }
                }
                // The client is gone (killed, or its terminal closed): like Slurm, its job goes too.
                _ => {
                    tracing::info!(job = id, "attached client disconnected; cancelling its job");
                    let mut inner = daemon.lock();
                    cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
                    return Ok(());
                }
            }
        }
    }
}
