//! `mgpu_control`: Slurm's `scontrol` for mgpu: hold, release and update waiting jobs, show a
//! job's every field, and (root) drain and resume GPUs or the whole server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use mgpu_proto::{ControlRequest, Request, Response};

use crate::client::Client;

/// Control jobs and the server, like Slurm's scontrol.
///
/// Examples:
///   mgpu_control hold 42 43          # keep pending jobs from starting (REASON JobHeldUser)
///   mgpu_control release 42          # let them run again (root's holds: root only)
///   mgpu_control update 42 TimeLimit=2:00:00 Gpus=2 Mem=20G Name=run2 Nice=10
///   mgpu_control update JobId=42 TimeLimit=30   # scontrol's spelling
///   mgpu_control update 42 TimeLimit=+30        # 30 minutes more than now (-30: less)
///   mgpu_control show job 42         # every field of job 42, one Key=Value per line
///   mgpu_control drain gpu 3 --reason "fan noise"   # root: no new jobs on GPU 3
///   mgpu_control resume gpu 3
///   mgpu_control drain server --reason upgrade      # root: nothing new starts
///   mgpu_control resume server
///
/// A job array's id holds or releases all its waiting tasks; ID_TASK names one task.
#[derive(Debug, Parser)]
#[command(name = "mgpu_control", version, verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Hold pending jobs: they stay pending (REASON JobHeldUser, or JobHeldAdmin when root
    /// holds them) until released; they keep their place in the queue
    Hold {
        #[arg(value_name = "ID", required = true)]
        jobs: Vec<String>,
    },
    /// Release held jobs (a hold by root: root only)
    Release {
        #[arg(value_name = "ID", required = true)]
        jobs: Vec<String>,
    },
    /// Change a job: ID (or JobId=ID) then KEY=VALUE items: TimeLimit (Slurm's time format;
    /// +TIME/-TIME add to or take from its current limit),
    /// Name, Nice, Gpus, Mem (GPU memory per GPU, or 'exclusive'). A pending job takes every
    /// change; a running one only Name and TimeLimit (lower it; root may raise it)
    Update {
        #[arg(value_name = "ID | KEY=VALUE", required = true, num_args = 2..)]
        items: Vec<String>,
    },
    /// Show a job's every field: 'show job ID'
    Show {
        #[arg(value_name = "job ID", required = true, num_args = 1..=2)]
        items: Vec<String>,
    },
    /// Root: take a GPU ('gpu N') or the whole server ('server') out of service; running jobs
    /// finish, nothing new starts there (kept across restarts)
    Drain {
        #[arg(value_name = "gpu N | server", required = true, num_args = 1..=2)]
        what: Vec<String>,
        /// Why (shown in mgpu_queue and mgpu_top)
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Root: put a drained GPU ('gpu N') or the server ('server') back in service
    Resume {
        #[arg(value_name = "gpu N | server", required = true, num_args = 1..=2)]
        what: Vec<String>,
    },
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    crate::run_main("mgpu_control", run(args))
}

/// `gpu N` or `server`: `Some(N)` or `None`.
fn target(what: &[String]) -> Result<Option<u32>> {
    match what {
        [w] if w.eq_ignore_ascii_case("server") => Ok(None),
        [w, n] if w.eq_ignore_ascii_case("gpu") => match n.parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => bail!("'{n}' is not a GPU index (e.g. gpu 3)"),
        },
        _ => bail!("say what: 'gpu N' or 'server'"),
    }
}

/// Job ids as given, also comma-separated as scontrol takes them (`42,43`).
fn split(jobs: Vec<String>) -> Vec<String> {
    jobs.iter()
        .flat_map(|j| j.split(','))
        .filter(|j| !j.is_empty())
        .map(str::to_string)
        .collect()
}

/// The request for `action`.
pub fn request(action: Action) -> Result<ControlRequest> {
    Ok(match action {
        Action::Hold { jobs } => ControlRequest::Hold { jobs: split(jobs) },
        Action::Release { jobs } => ControlRequest::Release { jobs: split(jobs) },
        Action::Update { items } => {
            let mut items = items.into_iter();
            let first = items.next().unwrap_or_default();
            let job = match first.split_once('=') {
                Some((k, v)) if k.eq_ignore_ascii_case("jobid") => v.to_string(),
                Some(_) => bail!("name the job first: update ID KEY=VALUE... (or JobId=ID)"),
                None => first,
            };
            let mut changes = Vec::new();
            for item in items {
                let Some((k, v)) = item.split_once('=') else {
                    bail!("'{item}' is not KEY=VALUE (e.g. TimeLimit=1:00:00)");
                };
                changes.push((k.to_string(), v.to_string()));
            }
            ControlRequest::Update { job, changes }
        }
        Action::Show { items } => {
            let job = match items.as_slice() {
                [w, id] if w.eq_ignore_ascii_case("job") => id.clone(),
                [one] => match one.split_once('=') {
                    Some((k, v))
                        if k.eq_ignore_ascii_case("job") || k.eq_ignore_ascii_case("jobid") =>
                    {
                        v.to_string()
                    }
                    _ if !one.eq_ignore_ascii_case("job") => one.clone(),
                    _ => bail!("show job ID"),
                },
                _ => bail!("show job ID"),
            };
            ControlRequest::Show { job }
        }
        Action::Drain { what, reason } => match target(&what)? {
            Some(index) => ControlRequest::DrainGpu { index, reason },
            None => ControlRequest::DrainServer { reason },
        },
        Action::Resume { what } => match target(&what)? {
            Some(index) => ControlRequest::ResumeGpu { index },
            None => ControlRequest::ResumeServer,
        },
    })
}

async fn run(args: Args) -> Result<i32> {
    let request = request(args.action)?;
    let mut client = Client::connect(args.socket.as_deref(), "mgpu_control").await?;
    match client.call(&Request::Control(request)).await? {
        Response::Control { lines, ok } => {
            let mut out = String::new();
            for line in lines {
                if ok {
                    out.push_str(&line);
                    out.push('\n');
                } else {
                    eprintln!("mgpu_control: error: {line}");
                }
            }
            crate::print_out(&out)?;
            Ok(if ok { 0 } else { 1 })
        }
        Response::JobDetail { fields } => {
            let mut out = String::new();
            for (k, v) in fields {
                let v = match v.parse::<u64>() {
                    // Local time, as scontrol and the queue's tables show it.
                    Ok(ms) if k.ends_with("Time") => crate::localtime::iso(ms),
                    _ => v,
                };
                out.push_str(&format!("{k}={v}\n"));
            }
            crate::print_out(&out)?;
            Ok(0)
        }
        other => bail!("unexpected answer from the server: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ControlRequest> {
        let a = Args::try_parse_from(std::iter::once("mgpu_control").chain(args.iter().copied()))?;
        request(a.action)
    }

    #[test]
    fn scontrol_spellings_are_taken() {
        let upd = |job: &str| ControlRequest::Update {
            job: job.into(),
            changes: vec![("TimeLimit".into(), "30".into())],
        };
        assert_eq!(parse(&["update", "42", "TimeLimit=30"]).unwrap(), upd("42"));
        assert_eq!(
            parse(&["update", "JobId=42", "TimeLimit=30"]).unwrap(),
            upd("42")
        );
        assert!(parse(&["update", "42", "TimeLimit"]).is_err());
        assert!(parse(&["update", "42"]).is_err());
        let show = ControlRequest::Show { job: "7_2".into() };
        assert_eq!(parse(&["show", "job", "7_2"]).unwrap(), show);
        assert_eq!(parse(&["show", "7_2"]).unwrap(), show);
        assert_eq!(parse(&["show", "JobId=7_2"]).unwrap(), show);
        assert_eq!(
            parse(&["drain", "gpu", "3", "--reason", "fan"]).unwrap(),
            ControlRequest::DrainGpu {
                index: 3,
                reason: Some("fan".into())
            }
        );
        assert_eq!(
            parse(&["resume", "server"]).unwrap(),
            ControlRequest::ResumeServer
        );
        assert!(parse(&["drain", "gpu", "x"]).is_err());
        assert!(parse(&["drain", "node"]).is_err());
        assert!(parse(&["hold"]).is_err());
        assert_eq!(
            parse(&["hold", "4,5", "6_1"]).unwrap(),
            ControlRequest::Hold {
                jobs: vec!["4".into(), "5".into(), "6_1".into()]
            }
        );
    }
}
