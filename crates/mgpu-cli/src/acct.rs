//! `mgpu_acct`: accounting of finished jobs (like `sacct`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use comfy_table::{presets, Table};
use mgpu_core::timefmt::format_duration;
use mgpu_core::{JobState, Millis};
use mgpu_proto::{AcctRecord, AcctRequest, Request, Response, UsageReport, UsageRequest};
use serde_json::json;

use crate::client::Client;
use crate::fit::Col;
use crate::jobref::JobRef;
use crate::queue::rfc3339;

/// Show finished jobs: state, exit code, times, GPUs and GPU-hours. You see your own jobs;
/// root sees everyone's.
///
/// Examples:
///   mgpu_acct                      # your finished jobs
///   mgpu_acct --since 1d --state FAILED
///   mgpu_acct -j 42 --json
///   mgpu_acct -j 42,43_1 -s F,TO   # comma lists; ID_TASK: one task of a job array
///   mgpu_acct --user alice         # root only (or alice)
///   mgpu_acct --summary --since 7d # GPU-hours per user and fair-share standing
#[derive(Debug, Parser)]
#[command(name = "mgpu_acct", version, verbatim_doc_comment)]
pub struct Args {
    /// Print JSON (one object with a "jobs" array)
    #[arg(long)]
    pub json: bool,
    /// Only jobs of this user
    #[arg(short, long, value_name = "NAME", value_parser = crate::user_name, conflicts_with = "me")]
    pub user: Option<String>,
    /// Only your own jobs (the default unless you are root)
    #[arg(long)]
    pub me: bool,
    /// Only these jobs (a comma list; ID_TASK: one task of a job array)
    #[arg(
        short = 'j',
        long = "job",
        visible_alias = "jobs",
        value_name = "ID",
        value_delimiter = ','
    )]
    pub job: Vec<JobRef>,
    /// Only jobs that ended since TIME (local time, as printed: 2026-11-25T08:00:00; or RFC 3339
    /// with a zone, YYYY-MM-DD, HH:MM, MM/DD, today, yesterday, now-2hours, or a duration ago:
    /// 90m, 2h, 7d)
    #[arg(short = 'S', long, visible_alias = "starttime", value_name = "TIME", value_parser = parse_since)]
    pub since: Option<Millis>,
    /// Only jobs that ended before TIME (the same forms as --since)
    #[arg(short = 'E', long, visible_alias = "endtime", value_name = "TIME", value_parser = parse_since)]
    pub until: Option<Millis>,
    /// Only jobs in these states (a comma list): COMPLETED (CD), FAILED (F), CANCELLED (CA),
    /// TIMEOUT (TO), OUT_OF_MEMORY (OOM)
    #[arg(short = 's', long, value_name = "STATE", value_parser = parse_state, value_delimiter = ',')]
    pub state: Vec<JobState>,
    /// A usage summary per user instead of jobs (like sreport): jobs that ended in the period
    /// and their GPU-hours (every run counted), jobs waiting and running now, and each user's
    /// fair-share standing (decayed usage, weight, and the priority it costs). You see your
    /// own row; root sees every user's
    #[arg(long, conflicts_with_all = ["job", "state", "me"])]
    pub summary: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    crate::run_main("mgpu_acct", run(args))
}

fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

fn parse_since(text: &str) -> Result<Millis, String> {
    crate::localtime::parse_when(text, now_ms())
}

fn parse_state(text: &str) -> Result<JobState, String> {
    match JobState::parse(text) {
        Some(s) if s.is_terminal() => Ok(s),
        _ => Err(format!(
            "invalid state '{text}': use COMPLETED, FAILED, CANCELLED, TIMEOUT or OUT_OF_MEMORY"
        )),
    }
}

async fn run(args: Args) -> Result<i32> {
    if args.summary {
        let mut client = Client::connect(args.socket.as_deref(), "mgpu_acct").await?;
        return summary(&mut client, args).await;
    }
    let jobs = crate::jobref::resolve(args.socket.as_deref(), "mgpu_acct", &args.job).await?;
    // A request takes one job and one state: lists are asked job by job (each a lookup by
    // id), else state by state, and merged here.
    let one_state = (args.state.len() == 1).then(|| args.state[0]);
    let queries: Vec<(Option<u64>, Option<JobState>)> = if !jobs.is_empty() {
        jobs.iter().map(|&j| (Some(j), one_state)).collect()
    } else if args.state.len() > 1 {
        args.state.iter().map(|&s| (None, Some(s))).collect()
    } else {
        vec![(None, one_state)]
    };
    let mut records = Vec::new();
    for (job, state) in queries {
        records.extend(fetch(&args, job, state).await?);
    }
    if queries_merged(&jobs, &args.state) {
        records.sort_by_key(|r| r.id);
        records.dedup_by_key(|r| r.id);
    }
    records.retain(|r| {
        let before = match (args.until, r.ended_at) {
            (Some(until), Some(end)) => end < until,
            _ => true,
        };
        before && (args.state.is_empty() || args.state.contains(&r.state))
    });
    if args.json {
        let jobs: Vec<_> = records.iter().map(to_json).collect();
        let mut text = serde_json::to_string_pretty(&json!({ "jobs": jobs }))?;
        text.push('\n');
        crate::print_out(&text)?;
    } else {
        crate::print_out(&render(&records, crate::fit::terminal_width()))?;
    }
    Ok(0)
}

/// Whether the records came from several requests (to put in id order, once each).
fn queries_merged(jobs: &[u64], states: &[JobState]) -> bool {
    jobs.len() > 1 || (jobs.is_empty() && states.len() > 1)
}

/// The finished jobs one request finds (one request per connection).
async fn fetch(args: &Args, job: Option<u64>, state: Option<JobState>) -> Result<Vec<AcctRecord>> {
    let mut client = Client::connect(args.socket.as_deref(), "mgpu_acct").await?;
    client
        .send(&Request::Acct(AcctRequest {
            user: args.user.clone(),
            me: args.me,
            job,
            since: args.since,
            state,
        }))
        .await?;
    let mut records = Vec::new();
    loop {
        match client.recv_control().await? {
            Response::AcctRecords { records: r } => records.extend(r),
            Response::AcctEnd => return Ok(records),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer from the server: {other:?}"),
        }
    }
}

fn exit_text(r: &AcctRecord) -> String {
    match (r.exit_code, r.signal) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("sig{s}"),
        _ => "-".into(),
    }
}

pub fn to_json(r: &AcctRecord) -> serde_json::Value {
    json!({
        "id": r.id,
        "user": r.user,
        "name": r.name,
        "state": r.state.as_str(),
        "exit_code": r.exit_code,
        "signal": r.signal,
        "submitted_at": rfc3339(r.submitted_at),
        "started_at": r.started_at.map(rfc3339),
        "ended_at": r.ended_at.map(rfc3339),
        "elapsed_s": r.elapsed_s(),
        "gpus": r.gpus,
        "gpu_ids": r.gpu_ids,
        "mem_mib": r.mem_mib,
        "peak_gpu_mem_mib": r.peak_gpu_mem_mib,
        "restarts": r.restarts,
        "total_elapsed_s": r.total_elapsed_s(),
        "gpu_hours": r.gpu_hours(),
        "message": r.message,
        "array_job": r.array.map(|a| a.job),
        "array_task": r.array.map(|a| a.task),
    })
}

fn short_time(ms: Option<Millis>) -> String {
    ms.map(crate::localtime::iso).unwrap_or_else(|| "-".into())
}

/// The table's columns: text is cut to fit the terminal, numbers never; on a narrow one the
/// least useful columns are left out (SUBMITTED first).
const COLUMNS: [Col; 14] = [
    Col::keep("JOBID"),
    Col::text("USER", 6).optional(3),
    Col::text("NAME", 8),
    Col::keep("STATE"),
    Col::keep("EXIT"),
    Col::keep("SUBMITTED").optional(9),
    Col::keep("STARTED").optional(6),
    Col::keep("ENDED"),
    Col::keep("ELAPSED"),
    Col::keep("GPUS").optional(2),
    Col::keep("MEM").optional(4),
    Col::keep("MAXGPUMEM").optional(7),
    Col::keep("RESTARTS").optional(8),
    Col::keep("GPU-HOURS"),
];

/// The table, fit to `width` columns (`None`: no limit).
pub fn render(records: &[AcctRecord], width: Option<usize>) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.user.clone(),
                crate::display_name(&r.name, r.array),
                r.state.as_str().to_string(),
                exit_text(r),
                short_time(Some(r.submitted_at)),
                short_time(r.started_at),
                short_time(r.ended_at),
                format_duration(r.total_elapsed_s()),
                r.gpus.to_string(),
                r.mem_mib
                    .map(|m| format!("{m}M"))
                    .unwrap_or_else(|| "excl".into()),
                r.peak_gpu_mem_mib
                    .map(|m| format!("{m}M"))
                    .unwrap_or_else(|| "-".into()),
                r.restarts.to_string(),
                format!("{:.3}", r.gpu_hours()),
            ]
        })
        .collect();
    crate::fit::render(&COLUMNS, &rows, width)
}

/// `--summary`: the usage report.
async fn summary(client: &mut Client, args: Args) -> Result<i32> {
    client
        .send(&Request::Usage(UsageRequest {
            since: args.since,
            until: args.until,
            user: args.user,
        }))
        .await?;
    let report = match client.recv_control().await? {
        Response::Usage(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    if args.json {
        let mut text = serde_json::to_string_pretty(&summary_json(&report))?;
        text.push('\n');
        crate::print_out(&text)?;
    } else {
        crate::print_out(&render_summary(&report))?;
    }
    Ok(0)
}

pub fn summary_json(r: &UsageReport) -> serde_json::Value {
    let users: Vec<_> = r
        .users
        .iter()
        .map(|u| {
            json!({
                "user": u.user,
                "uid": u.uid,
                "jobs": u.jobs,
                "completed": u.completed,
                "gpu_hours": u.gpu_hours,
                "pending": u.pending,
                "running": u.running,
                "fairshare": {
                    "usage_gpu_hours": u.fairshare_gpu_hours,
                    "weight": u.weight,
                    "priority_s": u.fairshare_priority_s,
                },
            })
        })
        .collect();
    json!({
        "since": r.since.map(rfc3339),
        "until": r.until.map(rfc3339),
        "now": rfc3339(r.now),
        "policy": r.policy,
        "fairshare_half_life_s": r.half_life_s,
        "gpus": r.gpus,
        "total_gpu_hours": r.users.iter().map(|u| u.gpu_hours).sum::<f64>(),
        "users": users,
    })
}

pub fn render_summary(r: &UsageReport) -> String {
    let total: f64 = r.users.iter().map(|u| u.gpu_hours).sum();
    let mut out = format!(
        "GPU usage of jobs that ended {} - {}; fair share ({} policy, half-life {}) as of now\n",
        r.since
            .map(|t| short_time(Some(t)))
            .unwrap_or_else(|| "(oldest record)".into()),
        short_time(Some(r.until.unwrap_or(r.now))),
        r.policy,
        format_duration(r.half_life_s),
    );
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header([
        "USER",
        "JOBS",
        "COMPLETED",
        "GPU-HOURS",
        "SHARE",
        "PENDING",
        "RUNNING",
        "FS-GPU-HOURS",
        "WEIGHT",
        "FS-PRIORITY",
    ]);
    for u in &r.users {
        let share = if total > 0.0 {
            format!("{:.1}%", 100.0 * u.gpu_hours / total)
        } else {
            "-".into()
        };
        t.add_row([
            u.user.clone(),
            u.jobs.to_string(),
            u.completed.to_string(),
            format!("{:.3}", u.gpu_hours),
            share,
            u.pending.to_string(),
            u.running.to_string(),
            format!("{:.3}", u.fairshare_gpu_hours),
            format!("{}", u.weight),
            format!("{:.0}s", u.fairshare_priority_s),
        ]);
    }
    out.push_str(&format!("{t}\n"));
    out
}
