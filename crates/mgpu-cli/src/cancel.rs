//! `mgpu_cancel`: cancel jobs by id, a job array's tasks, all of a user's jobs, or all of
//! one's own.
//! Quiet on success, like `scancel`; every refusal is reported and makes the exit code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use mgpu_proto::{CancelRequest, CancelStatus, Request, Response};

use crate::client::Client;

/// Cancel mgpu jobs. Pending jobs leave the queue at once; running jobs get SIGTERM, then
/// SIGKILL after the server's grace period.
///
/// Examples:
///   mgpu_cancel 42 43
///   mgpu_cancel --array 17     # every unfinished task of job array 17
///   mgpu_cancel --all          # all of your jobs (all jobs, for root)
///   mgpu_cancel --user alice   # alice's jobs (alice or root only)
#[derive(Debug, Parser)]
#[command(
    name = "mgpu_cancel",
    version,
    verbatim_doc_comment,
    override_usage = "mgpu_cancel [OPTIONS] <ID>...\n       mgpu_cancel [OPTIONS] --array <ID>\n       mgpu_cancel [OPTIONS] --user <NAME>\n       mgpu_cancel [OPTIONS] --all"
)]
pub struct Args {
    /// Job ids
    #[arg(value_name = "ID", required_unless_present_any = ["user", "all", "array"], conflicts_with_all = ["user", "all", "array"])]
    pub ids: Vec<u64>,
    /// Cancel every pending or running task of this job array (its id: the first task's)
    #[arg(short, long, value_name = "ID", conflicts_with_all = ["user", "all"])]
    pub array: Option<u64>,
    /// Cancel all jobs of this user
    #[arg(short, long, value_name = "NAME", conflicts_with = "all")]
    pub user: Option<String>,
    /// Cancel all of your own jobs (every job, for root)
    #[arg(long)]
    pub all: bool,
    /// Say what happened to each job
    #[arg(short, long)]
    pub verbose: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    crate::run_main("mgpu_cancel", run(args))
}

async fn run(args: Args) -> Result<i32> {
    let request = if args.all {
        CancelRequest::All
    } else if let Some(array) = args.array {
        CancelRequest::Array(array)
    } else if let Some(user) = args.user {
        CancelRequest::User(user)
    } else {
        CancelRequest::Jobs(args.ids)
    };
    let mut client = Client::connect(args.socket.as_deref(), "mgpu_cancel").await?;
    let results = match client.call(&Request::Cancel(request)).await? {
        Response::Cancelled { results } => results,
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    let mut code = 0;
    for r in results {
        let job = r.job;
        match r.outcome {
            CancelStatus::Cancelled if args.verbose => {
                eprintln!("mgpu_cancel: job {job} cancelled")
            }
            CancelStatus::Stopping if args.verbose => {
                eprintln!("mgpu_cancel: job {job} is being stopped")
            }
            CancelStatus::AlreadyStopping if args.verbose => {
                eprintln!("mgpu_cancel: job {job} is already being stopped")
            }
            CancelStatus::Cancelled | CancelStatus::Stopping | CancelStatus::AlreadyStopping => {}
            CancelStatus::NotFound => {
                eprintln!("mgpu_cancel: error: job {job}: no such pending or running job");
                code = 1;
            }
            CancelStatus::PermissionDenied => {
                eprintln!(
                    "mgpu_cancel: error: job {job}: permission denied (it belongs to another user)"
                );
                code = 1;
            }
        }
    }
    Ok(code)
}
