//! `mgpu_queue`: running then pending jobs, and the GPUs with what is on them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use comfy_table::{presets, Table};
use mgpu_core::timefmt::format_duration;
use mgpu_core::{EstimateSource, JobState, Millis};
use mgpu_proto::{JobInfo, QueueRequest, QueueSnapshot, Request, Response};
use serde_json::{json, Value};

use crate::client::Client;

/// Show the mgpu queue and GPU status. Everyone sees every job.
///
/// Examples:
///   mgpu_queue
///   mgpu_queue --me
///   mgpu_queue -u alice,bob -t PD,R    # squeue-style filters
///   mgpu_queue -j 12,14
///   mgpu_queue -o "%.8i %.10u %.20j %.2t %.10M %.10l %b %R"
///   mgpu_queue -r              # a row for each waiting task of a job array
///   mgpu_queue --json | jq '.jobs[] | select(.state == "PENDING")'
#[derive(Debug, Parser)]
#[command(name = "mgpu_queue", version, verbatim_doc_comment)]
pub struct Args {
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
    /// Only jobs of these users (a comma-separated list of names or user ids)
    #[arg(
        short,
        long,
        value_name = "NAME[,NAME]",
        value_delimiter = ',',
        value_parser = crate::user_name,
        conflicts_with = "me"
    )]
    pub user: Vec<String>,
    /// Only your own jobs
    #[arg(long)]
    pub me: bool,
    /// Only these jobs (a comma-separated list; ID_TASK: one task of a job array); says so
    /// when none of them is pending or running
    #[arg(
        short = 'j',
        long = "job",
        visible_alias = "jobs",
        value_name = "ID[,ID]",
        value_delimiter = ','
    )]
    pub job: Vec<crate::jobref::JobRef>,
    /// Only jobs in these states: PENDING (PD) or RUNNING (R), a comma-separated list
    #[arg(short = 't', long = "states", visible_alias = "state", value_name = "STATE[,STATE]", value_delimiter = ',', value_parser = parse_state)]
    pub states: Vec<JobState>,
    /// One line per job in this squeue-style format instead of tables: %i id, %j name, %u
    /// user, %T state, %t state (short: PD, R), %M time used, %l time limit, %D nodes (1),
    /// %b GPUs (gpu:N), %R reason (pending) or the host (running), %% a %; %Nx pads a field
    /// to N characters (%.Nx on the right); a longer value is cut
    #[arg(
        short = 'o',
        long = "format",
        value_name = "FORMAT",
        conflicts_with = "json"
    )]
    pub format: Option<String>,
    /// With --format: no header line
    #[arg(long)]
    pub noheader: bool,
    /// A row for each waiting task of a job array (by default, waiting tasks that follow each
    /// other share one row, like squeue's)
    #[arg(short = 'r', long)]
    pub array_tasks: bool,
    /// Every detail of each job, one Key=Value line each (like `scontrol show job`)
    #[arg(short = 'l', long)]
    pub long: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// A state `-t` may name: only pending and running jobs are in the queue.
fn parse_state(text: &str) -> Result<JobState, String> {
    match JobState::parse(text) {
        Some(s @ (JobState::Pending | JobState::Running)) => Ok(s),
        Some(s) => Err(format!(
            "{} jobs are not in the queue; see them with mgpu_acct --state {}",
            s.as_str(),
            s.as_str()
        )),
        None => Err(format!(
            "unknown state '{text}': PENDING (PD) or RUNNING (R)"
        )),
    }
}

/// Slurm's short state code.
pub fn short_state(s: JobState) -> &'static str {
    match s {
        JobState::Pending => "PD",
        JobState::Running => "R",
        JobState::Completed => "CD",
        JobState::Failed => "F",
        JobState::Cancelled => "CA",
        JobState::Timeout => "TO",
        JobState::OutOfMemory => "OOM",
    }
}

/// One piece of a `--format`: text, or a field with its width (negative: on the right).
#[derive(Debug, PartialEq)]
enum Piece {
    Text(String),
    Field {
        code: char,
        width: Option<usize>,
        right: bool,
    },
}

/// The fields `--format` knows, and their headers.
const FORMAT_FIELDS: &[(char, &str)] = &[
    ('i', "JOBID"),
    ('j', "NAME"),
    ('u', "USER"),
    ('T', "STATE"),
    ('t', "ST"),
    ('M', "TIME"),
    ('l', "TIME_LIMIT"),
    ('D', "NODES"),
    ('b', "TRES_PER_NODE"),
    ('R', "NODELIST(REASON)"),
];

fn parse_format(fmt: &str) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            text.push(c);
            continue;
        }
        if chars.peek() == Some(&'%') {
            chars.next();
            text.push('%');
            continue;
        }
        // `%.8i` on the right, `%-8i` (or `%8i`) on the left.
        let right = chars.next_if_eq(&'.').is_some();
        if !right {
            chars.next_if_eq(&'-');
        }
        let mut digits = String::new();
        while let Some(d) = chars.next_if(|d| d.is_ascii_digit()) {
            digits.push(d);
        }
        let Some(code) = chars.next() else {
            bail!("invalid --format '{fmt}': it ends in the middle of a field");
        };
        if !FORMAT_FIELDS.iter().any(|(c, _)| *c == code) {
            let known: Vec<String> = FORMAT_FIELDS.iter().map(|(c, _)| format!("%{c}")).collect();
            bail!(
                "--format: unknown field %{code}; mgpu_queue knows {} (and %%)",
                known.join(" ")
            );
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        let width = if digits.is_empty() {
            None
        } else {
            Some(
                digits
                    .parse()
                    .map_err(|_| anyhow::anyhow!("invalid --format width {digits}"))?,
            )
        };
        pieces.push(Piece::Field { code, width, right });
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

fn format_field(code: char, j: &JobInfo, now: Millis, host: &str) -> String {
    match code {
        'i' => j.id.to_string(),
        'j' => crate::display_name(&j.name, j.array),
        'u' => j.user.clone(),
        'T' => j.state.as_str().to_string(),
        't' => short_state(j.state).to_string(),
        'M' => {
            let secs = match (j.state, j.started_at) {
                (JobState::Running, Some(t)) => now.saturating_sub(t) / 1000,
                _ => 0,
            };
            format_duration(secs)
        }
        'l' => j
            .time_limit_s
            .map(format_duration)
            .unwrap_or_else(|| "UNLIMITED".into()),
        'D' => "1".into(),
        'b' => format!("gpu:{}", j.gpus),
        'R' => match j.state {
            JobState::Pending => format!("({})", j.reason.as_deref().unwrap_or("None")),
            _ => host.to_string(),
        },
        _ => String::new(),
    }
}

fn fit(value: String, width: Option<usize>, right: bool) -> String {
    let Some(w) = width else {
        return value;
    };
    let v: String = value.chars().take(w).collect();
    if right {
        format!("{v:>w$}")
    } else {
        format!("{v:<w$}")
    }
}

/// The jobs in `--format`, one line each (a header first unless `noheader`). Waiting tasks
/// of a job array share a line unless `array_tasks`, as in the table (and squeue): `%i` is
/// then `ARRAY_[ranges]`, `%j` `name[ranges]`.
fn render_format(pieces: &[Piece], s: &QueueSnapshot, noheader: bool, array_tasks: bool) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let line = |f: &dyn Fn(char) -> String| -> String {
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field { code, width, right } => out.push_str(&fit(f(*code), *width, *right)),
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = String::new();
    if !noheader {
        out.push_str(&line(&|c| {
            FORMAT_FIELDS
                .iter()
                .find(|(k, _)| *k == c)
                .map(|(_, h)| h.to_string())
                .unwrap_or_default()
        }));
    }
    for group in rows_of(&s.jobs, array_tasks) {
        let j = &group[0];
        if group.len() == 1 {
            out.push_str(&line(&|c| format_field(c, j, s.now, &host)));
            continue;
        }
        let ranges = task_ranges(group);
        let array = j.array.map_or(j.id, |a| a.job);
        out.push_str(&line(&|c| match c {
            'i' => format!("{array}_[{ranges}]"),
            'j' => format!("{}[{ranges}]", j.name),
            _ => format_field(c, j, s.now, &host),
        }));
    }
    out
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    crate::run_main("mgpu_queue", run(args))
}

/// The queue as the server sees it now (`client` names the caller in the hello).
pub async fn fetch(
    socket: Option<&Path>,
    client: &str,
    req: QueueRequest,
) -> Result<QueueSnapshot> {
    let mut client = Client::connect(socket, client).await?;
    let mut snapshot = match client.call(&Request::Queue(req)).await? {
        Response::Queue(s) => s,
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    loop {
        match client.recv_control().await? {
            Response::QueueJobs { jobs } => snapshot.jobs.extend(jobs),
            Response::QueueEnd => return Ok(snapshot),
            other => bail!("unexpected answer from the server: {other:?}"),
        }
    }
}

async fn run(args: Args) -> Result<i32> {
    let pieces = args.format.as_deref().map(parse_format).transpose()?;
    let jobs = crate::jobref::resolve(args.socket.as_deref(), "mgpu_queue", &args.job).await?;
    let mut snapshot = fetch(
        args.socket.as_deref(),
        "mgpu_queue",
        QueueRequest {
            // One user or one job: the server filters; for lists, we do.
            user: (args.user.len() == 1).then(|| args.user[0].clone()),
            me: args.me,
            job: (jobs.len() == 1).then(|| jobs[0]),
        },
    )
    .await?;
    snapshot.jobs.retain(|j| {
        (args.user.len() < 2 || args.user.contains(&j.user))
            && (jobs.len() < 2 || jobs.contains(&j.id))
            && (args.states.is_empty() || args.states.contains(&j.state))
    });
    if !jobs.is_empty() {
        // (Named as written: `34_1` rather than the id it stands for.)
        let missing: Vec<String> = (jobs.iter().zip(&args.job))
            .filter(|(id, _)| !snapshot.jobs.iter().any(|j| j.id == **id))
            .map(|(_, written)| written.to_string())
            .collect();
        if snapshot.jobs.is_empty() && args.states.is_empty() && args.user.is_empty() && !args.me {
            bail!(
                "no such pending or running job: {} (finished jobs: mgpu_acct -j ID)",
                missing.join(",")
            );
        }
    }
    if let Some(pieces) = &pieces {
        crate::print_out(&render_format(
            pieces,
            &snapshot,
            args.noheader,
            args.array_tasks,
        ))?;
        return Ok(0);
    }
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    if args.json {
        // Streamed straight from the snapshot (no intermediate tree): fast for long queues.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            serde_json::to_writer_pretty(&mut out, &JsonQueue(&snapshot))
        } else {
            serde_json::to_writer(&mut out, &JsonQueue(&snapshot))
        }
        .map_err(crate::json_stdout_error)?;
        writeln!(out).map_err(crate::stdout_error)?;
    } else if args.long {
        for j in &snapshot.jobs {
            write!(out, "{}", long_view(j, snapshot.now)).map_err(crate::stdout_error)?;
        }
    } else {
        write!(out, "{}", render(&snapshot, args.array_tasks)).map_err(crate::stdout_error)?;
    }
    out.flush().map_err(crate::stdout_error)?;
    Ok(0)
}

/// RFC 3339 (UTC, millisecond precision) for a time in ms since the epoch (`--json`: a time
/// with its zone, for programs; the tables print local time).
pub fn rfc3339(ms: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The documented `--json` shape, serialized without building a tree.
struct JsonQueue<'a>(&'a QueueSnapshot);

impl serde::Serialize for JsonQueue<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let s = self.0;
        let mut m = ser.serialize_map(Some(2))?;
        // A handful of GPUs: a small tree is fine here.
        let gpus: Vec<Value> = s
            .gpus
            .iter()
            .map(|g| {
                json!({
                    "index": g.index,
                    "name": g.name,
                    "total_mib": g.total_mib,
                    "reserved_mib": g.reserved_mib,
                    "used_mib": g.used_mib,
                    "util_pct": g.util_pct,
                    "jobs": g.jobs,
                    "foreign": g.foreign.iter().map(|p| json!({
                        "pid": p.pid,
                        "user": p.user,
                        "used_mib": p.used_mib,
                    })).collect::<Vec<_>>(),
                    "drained": g.drained,
                })
            })
            .collect();
        m.serialize_entry("gpus", &gpus)?;
        m.serialize_entry("jobs", &JsonJobs(&s.jobs))?;
        m.serialize_entry("server_drained", &s.server_drained)?;
        m.end()
    }
}

struct JsonJobs<'a>(&'a [mgpu_proto::JobInfo]);

impl serde::Serialize for JsonJobs<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let mut seq = ser.serialize_seq(Some(self.0.len()))?;
        struct Job<'a>(&'a mgpu_proto::JobInfo);
        impl serde::Serialize for Job<'_> {
            fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
                let j = self.0;
                let mut m = ser.serialize_map(Some(25))?;
                m.serialize_entry("id", &j.id)?;
                m.serialize_entry("user", &j.user)?;
                m.serialize_entry("name", &j.name)?;
                m.serialize_entry("state", j.state.as_str())?;
                m.serialize_entry("gpus", &j.gpus)?;
                m.serialize_entry("gpu_ids", &j.gpu_ids)?;
                m.serialize_entry("mem_mib", &j.mem_mib)?;
                m.serialize_entry("time_limit_s", &j.time_limit_s)?;
                m.serialize_entry("submitted_at", &rfc3339(j.submitted_at))?;
                m.serialize_entry("started_at", &j.started_at.map(rfc3339))?;
                m.serialize_entry("restarts", &j.restarts)?;
                m.serialize_entry("reason", &j.reason)?;
                m.serialize_entry("command", &j.command)?;
                m.serialize_entry("priority", &j.priority)?;
                m.serialize_entry("est_start", &j.est_start.map(rfc3339))?;
                m.serialize_entry("behind_job", &j.behind)?;
                m.serialize_entry("behind_start", &j.behind_start.map(rfc3339))?;
                m.serialize_entry("array_job", &j.array.map(|a| a.job))?;
                m.serialize_entry("array_task", &j.array.map(|a| a.task))?;
                // Per GPU index (as a string key), where measured.
                m.serialize_entry("used_mib", &j.used_mib)?;
                m.serialize_entry("peak_mib", &j.peak_mib)?;
                // Expected run time and where it comes from: time_limit, learned (from
                // estimate_runs of the user's runs, of the same name or any), default.
                let (source, runs, same_name) = match j.estimate_source {
                    Some(EstimateSource::TimeLimit) => (Some("time_limit"), None, None),
                    Some(EstimateSource::Learned { runs, same_name }) => {
                        (Some("learned"), Some(runs), Some(same_name))
                    }
                    Some(EstimateSource::Default) => (Some("default"), None, None),
                    None => (None, None, None),
                };
                m.serialize_entry("estimate_s", &j.estimate_ms.map(|ms| ms.div_ceil(1000)))?;
                m.serialize_entry("estimate_source", &source)?;
                m.serialize_entry("estimate_runs", &runs)?;
                m.serialize_entry("estimate_same_name", &same_name)?;
                m.end()
            }
        }
        for j in self.0 {
            seq.serialize_element(&Job(j))?;
        }
        seq.end()
    }
}

fn table() -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t
}

/// A time for the table, local: `HH:MM` today, else `MM-DD HH:MM`.
fn short_time(ms: Millis, now: Millis) -> String {
    crate::localtime::short(ms, now)
}

/// One job in every detail, `scontrol show job`-like: `Key=Value` words, a few to a line,
/// times local (as printed by `scontrol`), then a blank line.
pub fn long_view(j: &JobInfo, now: Millis) -> String {
    let time = |t: Option<Millis>| t.map_or("Unknown".into(), crate::localtime::iso);
    let run_s = match (j.state, j.started_at) {
        (JobState::Running, Some(t)) => now.saturating_sub(t) / 1000,
        _ => 0,
    };
    let ids: Vec<String> = j.gpu_ids.iter().map(u32::to_string).collect();
    let mut lines = vec![
        format!("JobId={} JobName={}", j.id, j.name),
        format!(
            "UserId={} Priority={}",
            j.user,
            j.priority.map_or("-".into(), |p| format!("{p:.0}"))
        ),
        format!(
            "JobState={} Reason={} Restarts={}",
            j.state.as_str(),
            j.reason.as_deref().unwrap_or("None"),
            j.restarts
        ),
        format!(
            "RunTime={} TimeLimit={}",
            format_duration(run_s),
            j.time_limit_s
                .map(format_duration)
                .unwrap_or_else(|| "UNLIMITED".into())
        ),
        format!(
            "SubmitTime={} StartTime={}",
            time(Some(j.submitted_at)),
            time(j.started_at.or(j.est_start))
        ),
        format!(
            "NumGPUs={} GPUIds={} GPUMem={}",
            j.gpus,
            if ids.is_empty() {
                "-".into()
            } else {
                ids.join(",")
            },
            j.mem_mib.map_or("exclusive".into(), |m| format!("{m}M"))
        ),
    ];
    if j.used_mib.is_some() || j.peak_mib.is_some() {
        lines.push(format!(
            "GPUMemUsed={} GPUMemPeak={}",
            max_used(j).map_or("-".into(), |u| format!("{u}M")),
            j.peak_mib.map_or("-".into(), |u| format!("{u}M"))
        ));
    }
    if let Some(a) = j.array {
        lines.push(format!("ArrayJobId={} ArrayTaskId={}", a.job, a.task));
    }
    if let (Some(ms), Some(source)) = (j.estimate_ms, j.estimate_source) {
        lines.push(format!(
            "Estimate={} EstimateFrom={}",
            format_duration(ms.div_ceil(1000)),
            source.describe(&j.name)
        ));
    }
    if let Some(b) = j.behind {
        lines.push(format!(
            "BehindJob={b} BehindStart={}",
            time(j.behind_start)
        ));
    }
    lines.push(format!("Command={}", j.command.join(" ")));
    let mut out = String::new();
    for l in lines {
        out.push_str("   ");
        out.push_str(&l);
        out.push('\n');
    }
    out.replace_range(..3, "");
    out.push('\n');
    out
}

/// Waiting tasks of one job array that follow each other in the queue, with ids in a row and
/// the same reason: one row of the table.
fn same_row(a: &JobInfo, b: &JobInfo) -> bool {
    a.state == JobState::Pending
        && b.state == JobState::Pending
        && a.array
            .is_some_and(|x| b.array.is_some_and(|y| x.job == y.job))
        && a.id + 1 == b.id
        && a.reason == b.reason
        && a.est_start.is_none()
        && b.est_start.is_none()
}

/// The jobs in rows: waiting tasks of a job array that follow each other share one, unless
/// `array_tasks` (each job its own).
fn rows_of(jobs: &[JobInfo], array_tasks: bool) -> Vec<&[JobInfo]> {
    let mut rows = Vec::new();
    let mut rest = jobs;
    while !rest.is_empty() {
        let mut n = 1;
        while !array_tasks && n < rest.len() && same_row(&rest[n - 1], &rest[n]) {
            n += 1;
        }
        rows.push(&rest[..n]);
        rest = &rest[n..];
    }
    rows
}

/// The task indices of a row's jobs, as ranges.
fn task_ranges(group: &[JobInfo]) -> String {
    let tasks: Vec<u32> = group
        .iter()
        .filter_map(|t| t.array.map(|a| a.task))
        .collect();
    index_ranges(&tasks)
}

/// Task indices as ranges: `0-4,7,9-12` (cut after a few ranges), or `0-99:3` for a step.
fn index_ranges(tasks: &[u32]) -> String {
    if let [first, second, .., last] = tasks {
        let step = second - first;
        if step > 1 && tasks.windows(2).all(|w| w[1] - w[0] == step) {
            return format!("{first}-{last}:{step}");
        }
    }
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &t in tasks {
        match ranges.last_mut() {
            Some((_, hi)) if *hi + 1 == t => *hi = t,
            _ => ranges.push((t, t)),
        }
    }
    let mut shown: Vec<String> = ranges
        .iter()
        .take(4)
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    if ranges.len() > 4 {
        shown.push("...".into());
    }
    shown.join(",")
}

/// Column names of [`job_rows`].
pub const JOB_COLUMNS: [&str; 10] = [
    "JOBID", "USER", "NAME", "STATE", "GPUS", "MEM", "USED", "TIME", "RESTARTS", "REASON",
];

/// Position of the USED column in [`job_rows`].
pub const USED_COLUMN: usize = 6;

/// The most GPU memory a job's processes use on one GPU now, where measured.
pub fn max_used(j: &JobInfo) -> Option<u64> {
    j.used_mib
        .as_ref()
        .map(|u| u.values().copied().max().unwrap_or(0))
}

/// Is a job using more GPU memory than it reserved on some GPU (on one it does not hold,
/// anything)? Exclusive jobs never are.
pub fn is_over(j: &JobInfo) -> bool {
    let (Some(mem), Some(used)) = (j.mem_mib, &j.used_mib) else {
        return false;
    };
    used.iter()
        .any(|(g, &u)| u > if j.gpu_ids.contains(g) { mem } else { 0 })
}

/// The rows of the jobs table, in the snapshot's order. Waiting tasks of a job array share a
/// row unless `array_tasks`.
pub fn job_rows(s: &QueueSnapshot, array_tasks: bool) -> Vec<[String; 10]> {
    let mut rows = Vec::new();
    for group in rows_of(&s.jobs, array_tasks) {
        let (j, n) = (&group[0], group.len());
        let (id, name) = if n > 1 {
            (
                format!("{}-{}", j.id, group[n - 1].id),
                format!("{}[{}]", j.name, task_ranges(group)),
            )
        } else {
            (j.id.to_string(), crate::display_name(&j.name, j.array))
        };
        let gpus = if j.gpu_ids.is_empty() {
            j.gpus.to_string()
        } else {
            let ids: Vec<String> = j.gpu_ids.iter().map(u32::to_string).collect();
            format!("{} ({})", j.gpus, ids.join(","))
        };
        let mem = j
            .mem_mib
            .map(|m| format!("{m}M"))
            .unwrap_or_else(|| "excl".into());
        let elapsed = match (j.state, j.started_at) {
            (JobState::Running, Some(t)) => s.now.saturating_sub(t) / 1000,
            _ => 0,
        };
        let limit = j
            .time_limit_s
            .map(format_duration)
            .unwrap_or_else(|| "UNLIMITED".into());
        rows.push([
            id,
            j.user.clone(),
            name,
            j.state.as_str().to_string(),
            gpus,
            mem,
            // The most it uses on one of its GPUs (`!`: over its reservation).
            match max_used(j) {
                Some(u) => format!("{u}M{}", if is_over(j) { "!" } else { "" }),
                None => "-".into(),
            },
            format!("{}/{}", format_duration(elapsed), limit),
            j.restarts.to_string(),
            match (&j.reason, j.est_start, j.behind) {
                (Some(r), Some(t), _) => format!("{r} (start by {})", short_time(t, s.now)),
                (Some(r), None, Some(b)) => match j.behind_start {
                    Some(t) => format!("{r} (job {b}, start by {})", short_time(t, s.now)),
                    None => format!("{r} (job {b})"),
                },
                (Some(r), None, None) => r.clone(),
                (None, _, _) => String::new(),
            },
        ]);
    }
    rows
}

/// The two tables: jobs, then GPUs. Waiting tasks of a job array share a row unless
/// `array_tasks`.
pub fn render(s: &QueueSnapshot, array_tasks: bool) -> String {
    let mut jobs = table();
    jobs.set_header(JOB_COLUMNS);
    for row in job_rows(s, array_tasks) {
        jobs.add_row(row);
    }
    let mut gpus = table();
    gpus.set_header(["GPU", "NAME", "RESERVED/USED/TOTAL (MiB)", "UTIL", "JOBS"]);
    for g in &s.gpus {
        let ids: Vec<String> = g.jobs.iter().map(u64::to_string).collect();
        gpus.add_row([
            g.index.to_string(),
            g.name.clone(),
            format!("{}/{}/{}", g.reserved_mib, g.used_mib, g.total_mib),
            g.util_pct.map_or("-".into(), |u| format!("{u}%")),
            if ids.is_empty() {
                "-".into()
            } else {
                ids.join(",")
            },
        ]);
    }
    let mut foreign = String::new();
    for line in drain_lines(s).into_iter().chain(foreign_lines(s)) {
        foreign.push_str(&line);
        foreign.push('\n');
    }
    format!("{jobs}\n\n{gpus}\n{foreign}(policy: {})\n", s.policy)
}

/// One line for a drained server and one per drained GPU (`mgpu_control drain`).
pub fn drain_lines(s: &QueueSnapshot) -> Vec<String> {
    let why = |r: &str| {
        if r.is_empty() {
            String::new()
        } else {
            format!(" ({r})")
        }
    };
    s.server_drained
        .iter()
        .map(|r| {
            format!(
                "SERVER DRAINED{}: nothing new starts until 'mgpu_control resume server'",
                why(r)
            )
        })
        .chain(s.gpus.iter().filter_map(|g| {
            g.drained
                .as_ref()
                .map(|r| format!("GPU {} drained{}: no new jobs go there", g.index, why(r)))
        }))
        .collect()
}

/// One line per process on a GPU that belongs to no mgpu job (someone bypassing the
/// scheduler), for the admin to act on.
pub fn foreign_lines(s: &QueueSnapshot) -> Vec<String> {
    s.gpus
        .iter()
        .flat_map(|g| {
            g.foreign.iter().map(move |p| {
                format!(
                    "not an mgpu job: pid {} ({}) uses {} MiB on GPU {}",
                    p.pid,
                    p.user.as_deref().unwrap_or("user unknown"),
                    p.used_mib,
                    g.index
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mgpu_proto::ArrayTask;

    fn job(id: u64, state: JobState, array: Option<(u64, u32)>) -> JobInfo {
        JobInfo {
            id,
            user: "alice".into(),
            name: "sweep".into(),
            state,
            gpus: 1,
            gpu_ids: if state == JobState::Running {
                vec![0]
            } else {
                vec![]
            },
            mem_mib: None,
            time_limit_s: None,
            submitted_at: 0,
            started_at: (state == JobState::Running).then_some(0),
            restarts: 0,
            reason: (state == JobState::Pending).then(|| "Resources".into()),
            command: vec!["true".into()],
            priority: None,
            est_start: None,
            behind: None,
            behind_start: None,
            array: array.map(|(job, task)| ArrayTask {
                job,
                task,
                count: 7,
                min: 0,
                max: 9,
                limit: None,
            }),
            used_mib: None,
            peak_mib: None,
            estimate_ms: None,
            estimate_source: None,
        }
    }

    /// Waiting tasks of an array that follow each other share a row; `-r` shows each.
    #[test]
    fn waiting_array_tasks_share_a_row() {
        use JobState::{Pending, Running};
        let snapshot = QueueSnapshot {
            server_drained: None,
            now: 0,
            policy: "fair".into(),
            gpus: vec![],
            jobs: vec![
                job(10, Running, Some((10, 0))),
                job(11, Pending, Some((10, 1))),
                job(12, Pending, Some((10, 2))),
                job(13, Pending, Some((10, 3))),
                job(14, Pending, Some((10, 5))),
                job(15, Pending, Some((10, 9))),
                job(16, Pending, None),
                job(17, Pending, Some((17, 0))),
            ],
        };
        let rows = |text: String| -> Vec<String> {
            text.lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .collect()
        };
        assert_eq!(
            rows(render(&snapshot, false)),
            [
                "10 alice sweep[0]",
                "11-15 alice sweep[1-3,5,9]",
                "16 alice sweep",
                "17 alice sweep[0]",
            ]
        );
        assert_eq!(rows(render(&snapshot, true)).len(), 8);
        // `-o` merges them too (found by a review: a 10,000-task array printed 10,000 lines).
        let pieces = parse_format("%i %j %t").unwrap();
        assert_eq!(
            render_format(&pieces, &snapshot, true, false),
            "10 sweep[0] R\n10_[1-3,5,9] sweep[1-3,5,9] PD\n16 sweep PD\n17 sweep[0] PD\n"
        );
        assert_eq!(
            render_format(&pieces, &snapshot, true, true)
                .lines()
                .count(),
            8
        );
        assert_eq!(index_ranges(&[1, 3, 5, 7, 9, 11]), "1-11:2");
        assert_eq!(index_ranges(&[1, 3, 4, 6, 9, 11]), "1,3-4,6,9,...");
    }

    /// USED is the most a running job uses on one GPU, `!` when over its reservation (on a GPU
    /// it does not hold, any use is); processes outside mgpu are listed with their user.
    #[test]
    fn used_memory_and_foreign_processes() {
        let mut inside = job(1, JobState::Running, None);
        inside.mem_mib = Some(4096);
        inside.used_mib = Some([(0, 4096)].into());
        let mut elsewhere = job(2, JobState::Running, None);
        elsewhere.mem_mib = Some(4096);
        elsewhere.used_mib = Some([(0, 10), (1, 1)].into());
        let mut exclusive = job(3, JobState::Running, None);
        exclusive.used_mib = Some([(0, 80_000)].into());
        assert!(!is_over(&inside) && is_over(&elsewhere) && !is_over(&exclusive));
        let snapshot = QueueSnapshot {
            server_drained: None,
            now: 0,
            policy: "fair".into(),
            gpus: vec![mgpu_proto::GpuInfo {
                index: 0,
                name: "g".into(),
                total_mib: 81_920,
                reserved_mib: 0,
                used_mib: 0,
                jobs: vec![],
                util_pct: Some(3),
                foreign: vec![mgpu_proto::ForeignProcess {
                    pid: 7,
                    user: None,
                    used_mib: 5,
                }],
                drained: Some("fan".into()),
            }],
            jobs: vec![
                inside,
                elsewhere,
                exclusive,
                job(4, JobState::Pending, None),
            ],
        };
        let rows = job_rows(&snapshot, false);
        let used: Vec<&str> = rows.iter().map(|r| r[USED_COLUMN].as_str()).collect();
        assert_eq!(used, ["4096M", "10M!", "80000M", "-"]);
        let text = render(&snapshot, false);
        assert!(
            text.contains("not an mgpu job: pid 7 (user unknown) uses 5 MiB on GPU 0"),
            "{text}"
        );
        assert!(text.contains("3%"), "{text}");
        assert!(
            text.contains("GPU 0 drained (fan): no new jobs go there"),
            "{text}"
        );
    }
}
