//! A minimal blocking client of the mgpu wire protocol (built on `mgpu-proto`), for what the
//! suite must do faster than by spawning a CLI per call: filling the queue with 100,000 jobs,
//! measuring the protocol's own submit latency, and polling the queue size.

use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use mgpu_proto::{
    read_frame, write_frame, Frame, QueueRequest, Request, Response, SubmitRequest, Venv,
    PROTOCOL_VERSION,
};

/// Connects and exchanges hellos; the connection then carries one request.
pub fn connect(socket: &Path) -> Result<UnixStream> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    write_frame(
        &mut s,
        &Frame::control(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: "mgpu-bench".into(),
        }),
    )?;
    match recv(&mut s)? {
        Response::Welcome { .. } => Ok(s),
        other => bail!("unexpected answer to hello: {other:?}"),
    }
}

fn recv(s: &mut UnixStream) -> Result<Response> {
    let frame = read_frame(s)?.ok_or_else(|| anyhow!("the server closed the connection"))?;
    let resp: Response = frame.parse()?;
    if let Response::Error { message } = resp {
        bail!("server error: {message}");
    }
    Ok(resp)
}

/// A detached submit request as `mgpu_srun --detach` builds it: our cwd and environment.
/// Built through serde so that fields the protocol gains later (all `#[serde(default)]`)
/// take their defaults.
pub fn submit_request(gpus: u32, argv: &[String]) -> Result<SubmitRequest> {
    let cwd = std::env::current_dir()?
        .into_os_string()
        .into_string()
        .map_err(|_| anyhow!("the current directory is not UTF-8"))?;
    let env: Vec<(String, String)> = std::env::vars().collect();
    let req = serde_json::json!({
        "name": null,
        "gpus": gpus,
        "mem_mib": null,
        "time_limit_s": null,
        "command": argv,
        "cwd": cwd,
        "env": env,
        "venv": Venv::Auto,
        "attach": false,
        "umask": 0o022,
    });
    serde_json::from_value(req).context("building a submit request")
}

/// Submits one detached job on a new connection; returns its id.
pub fn submit(socket: &Path, req: &SubmitRequest) -> Result<u64> {
    let mut s = connect(socket)?;
    write_frame(&mut s, &Frame::control(&Request::Submit(req.clone())))?;
    match recv(&mut s)? {
        Response::Submitted { job } => Ok(job),
        other => bail!("unexpected answer to submit: {other:?}"),
    }
}

/// Number of jobs in the queue (pending and running).
pub fn queue_len(socket: &Path) -> Result<usize> {
    let mut s = connect(socket)?;
    write_frame(
        &mut s,
        &Frame::control(&Request::Queue(QueueRequest::default())),
    )?;
    let mut n = match recv(&mut s)? {
        Response::Queue(snap) => snap.jobs.len(),
        other => bail!("unexpected answer to queue: {other:?}"),
    };
    loop {
        match recv(&mut s)? {
            Response::QueueJobs { jobs } => n += jobs.len(),
            Response::QueueEnd => return Ok(n),
            other => bail!("unexpected answer to queue: {other:?}"),
        }
    }
}
