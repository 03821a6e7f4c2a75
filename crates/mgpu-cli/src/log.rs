//! `mgpu_log`: print a job's output log; `--follow` streams it until the job ends.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use mgpu_proto::{Frame, LogRequest, Request, Response};
use tokio::io::AsyncWriteExt;

use crate::client::Client;
use crate::jobref::JobRef;

/// How long the server waits for a client to read (its `WRITE_TIMEOUT`).
const WRITE_TIMEOUT_S: u64 = 20;

/// Print a job's output (stdout and stderr as they came). Only the job's owner and root may.
///
/// Examples:
///   mgpu_log 42
///   mgpu_log --follow 42
#[derive(Debug, Parser)]
#[command(name = "mgpu_log", version, verbatim_doc_comment)]
pub struct Args {
    /// Job id (ID_TASK: one task of a job array)
    #[arg(value_name = "ID")]
    pub job: JobRef,
    /// The job's id once `job` is resolved.
    #[arg(skip)]
    pub id: u64,
    /// Keep printing new output until the job ends
    #[arg(short, long)]
    pub follow: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    crate::run_main("mgpu_log", run(args))
}

/// Why the job waits, when it is pending (it has no output yet).
async fn pending_reason(args: &Args) -> Option<String> {
    let req = mgpu_proto::QueueRequest {
        job: Some(args.id),
        ..Default::default()
    };
    let snapshot = crate::queue::fetch(args.socket.as_deref(), "mgpu_log", req)
        .await
        .ok()?;
    let job = snapshot.jobs.into_iter().find(|j| j.id == args.id)?;
    (job.state == mgpu_core::JobState::Pending).then(|| job.reason.unwrap_or_default())
}

async fn run(mut args: Args) -> Result<i32> {
    args.id = crate::jobref::resolve(args.socket.as_deref(), "mgpu_log", &[args.job]).await?[0];
    if args.follow {
        // Like `tail -f` of an output file that is yet to come: say so, and wait for it.
        if let Some(reason) = pending_reason(&args).await {
            eprintln!(
                "mgpu_log: job {} is pending ({reason}); waiting for it to start",
                args.id
            );
        }
    }
    let mut client = Client::connect(args.socket.as_deref(), "mgpu_log").await?;
    let mut printed = 0u64;
    client
        .send(&Request::Log(LogRequest {
            job: args.id,
            follow: args.follow,
        }))
        .await?;
    let mut out = tokio::io::stdout();
    loop {
        match client.recv().await? {
            None => bail!(
                "the server closed the connection before the end of the log (it drops a client that does not read its output for {} s)",
                WRITE_TIMEOUT_S
            ),
            Some(Frame::Stdout(d)) | Some(Frame::Stderr(d)) => {
                printed += d.len() as u64;
                out.write_all(&d).await.map_err(crate::stdout_error)?;
                if args.follow {
                    out.flush().await.map_err(crate::stdout_error)?;
                }
            }
            Some(f) => match f.parse::<Response>()? {
                Response::LogEnd { state, .. } => {
                    out.flush().await.map_err(crate::stdout_error)?;
                    if printed == 0 && state.is_none() && !args.follow {
                        if let Some(reason) = pending_reason(&args).await {
                            eprintln!(
                                "mgpu_log: job {} is pending ({reason}): no output yet (mgpu_log -f {} waits for it)",
                                args.id, args.id
                            );
                        }
                    }
                    return Ok(0);
                }
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected message from the server: {other:?}"),
            },
        }
    }
}
