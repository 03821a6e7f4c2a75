//! `mgpu_cancel`: cancel jobs by id, a job array's tasks, all of a user's jobs, or all of
//! one's own.
//! Quiet on success, like `scancel`; every refusal is reported and makes the exit code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use mgpu_core::JobState;
use mgpu_proto::{CancelRequest, CancelStatus, QueueRequest, Request, Response};

use crate::client::Client;
use crate::jobref::JobRef;

/// Cancel mgpu jobs. Pending jobs leave the queue at once; running jobs get SIGTERM, then
/// SIGKILL after the server's grace period.
///
/// Examples:
///   mgpu_cancel 42 43
///   mgpu_cancel --array 17     # every unfinished task of job array 17
///   mgpu_cancel --all          # all of your jobs (all jobs, for root)
///   mgpu_cancel --user alice   # alice's jobs (alice or root only)
///   mgpu_cancel -t PENDING     # your pending jobs (scancel-style filters:
///   mgpu_cancel -n sweep -t R  #   -u USER, -t STATE, -n NAME, combinable,
///   mgpu_cancel -t PD 42 43    #   also with ids: those of them that match)
#[derive(Debug, Parser)]
#[command(
    name = "mgpu_cancel",
    version,
    verbatim_doc_comment,
    override_usage = "mgpu_cancel [OPTIONS] <ID>...\n       mgpu_cancel [OPTIONS] --array <ID>\n       mgpu_cancel [OPTIONS] --user <NAME>\n       mgpu_cancel [OPTIONS] --all"
)]
pub struct Args {
    /// Job ids (ID_TASK: one task of a job array)
    #[arg(value_name = "ID", conflicts_with_all = ["all", "array"])]
    pub ids: Vec<JobRef>,
    /// Cancel every pending or running task of this job array (its id: the first task's)
    #[arg(short, long, value_name = "ID", conflicts_with_all = ["user", "all", "states", "name"])]
    pub array: Option<u64>,
    /// Cancel jobs of this user (alice or root only); with -t/-n, those of them that match
    #[arg(short, long, value_name = "NAME", value_parser = crate::user_name, conflicts_with = "all")]
    pub user: Option<String>,
    /// Only jobs in this state: PENDING (PD) or RUNNING (R); without ids or -u: your own jobs
    /// (everyone's, for root)
    #[arg(short = 't', long = "state", value_name = "STATE", value_parser = parse_state)]
    pub states: Option<JobState>,
    /// Only jobs with this name; without ids or -u: your own jobs (everyone's, for root)
    #[arg(
        short = 'n',
        long = "name",
        visible_alias = "jobname",
        value_name = "NAME"
    )]
    pub name: Option<String>,
    /// Cancel all of your own jobs (every job, for root)
    #[arg(long, conflicts_with_all = ["states", "name"])]
    pub all: bool,
    /// Say what happened to each job
    #[arg(short, long)]
    pub verbose: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

fn parse_state(text: &str) -> Result<JobState, String> {
    match JobState::parse(text) {
        Some(s @ (JobState::Pending | JobState::Running)) => Ok(s),
        _ => Err(format!(
            "unknown state '{text}': only PENDING (PD) or RUNNING (R) jobs can be cancelled"
        )),
    }
}

/// Every form, for a call that names no job.
const USAGE: &str = "which jobs? give ids or a filter:
  mgpu_cancel ID [ID...]       those jobs
  mgpu_cancel --array ID       every unfinished task of job array ID
  mgpu_cancel --all            all of your jobs (every job, for root)
  mgpu_cancel -u USER          all of USER's jobs (USER or root only)
  mgpu_cancel -t STATE         your jobs in STATE: PENDING (PD) or RUNNING (R)
  mgpu_cancel -n NAME          your jobs named NAME
  (-u, -t and -n combine, and with ids: mgpu_cancel -u alice -t PD -n sweep)";

pub fn main() -> ExitCode {
    let args = Args::parse();
    if args.ids.is_empty()
        && !args.all
        && args.array.is_none()
        && args.user.is_none()
        && args.states.is_none()
        && args.name.is_none()
    {
        eprintln!("mgpu_cancel: {USAGE}");
        return ExitCode::from(2);
    }
    crate::run_main("mgpu_cancel", run(args))
}

async fn run(args: Args) -> Result<i32> {
    let ids = crate::jobref::resolve(args.socket.as_deref(), "mgpu_cancel", &args.ids).await?;
    let filtered = args.states.is_some() || args.name.is_some();
    let request = if args.all {
        CancelRequest::All
    } else if let Some(array) = args.array {
        CancelRequest::Array(array)
    } else if filtered || (args.user.is_some() && !ids.is_empty()) {
        // scancel-style filters: the matching jobs, picked from the queue; the server still
        // decides, job by job, whether we may cancel each.
        let snapshot = crate::queue::fetch(
            args.socket.as_deref(),
            "mgpu_cancel",
            QueueRequest {
                user: args.user.clone(),
                me: args.user.is_none() && ids.is_empty() && !nix::unistd::getuid().is_root(),
                job: None,
            },
        )
        .await?;
        let picked: Vec<u64> = snapshot
            .jobs
            .iter()
            .filter(|j| {
                (ids.is_empty() || ids.contains(&j.id))
                    && args.states.is_none_or(|s| s == j.state)
                    && args.name.as_ref().is_none_or(|n| *n == j.name)
            })
            .map(|j| j.id)
            .collect();
        if picked.is_empty() {
            if args.verbose {
                eprintln!("mgpu_cancel: no job matches");
            }
            return Ok(0);
        }
        CancelRequest::Jobs(picked)
    } else if let Some(user) = args.user {
        CancelRequest::User(user)
    } else {
        CancelRequest::Jobs(ids)
    };
    // A filter may pick more jobs than one request may name: they go in several.
    let requests = match request {
        CancelRequest::Jobs(ids) if ids.len() > mgpu_proto::MAX_CANCEL_IDS => ids
            .chunks(mgpu_proto::MAX_CANCEL_IDS)
            .map(|c| CancelRequest::Jobs(c.to_vec()))
            .collect(),
        request => vec![request],
    };
    // A job picked by a filter that ended meanwhile is what was asked for: nothing to say.
    let quiet_not_found = filtered;
    let mut results = Vec::new();
    for request in requests {
        // (One request per connection.)
        let mut client = Client::connect(args.socket.as_deref(), "mgpu_cancel").await?;
        match client.call(&Request::Cancel(request)).await? {
            Response::Cancelled { results: r } => results.extend(r),
            other => bail!("unexpected answer from the server: {other:?}"),
        }
    }
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
            CancelStatus::NotFound if quiet_not_found => {}
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
