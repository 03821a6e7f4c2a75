//! `mgpu_queue`: running then pending jobs, and the GPUs with what is on them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Parser;
use comfy_table::{presets, Table};
use mgpu_core::timefmt::format_duration;
use mgpu_core::{JobState, Millis};
use mgpu_proto::{QueueRequest, QueueSnapshot, Request, Response};
use serde_json::{json, Value};

use crate::client::Client;

/// Show the mgpu queue and GPU status. Everyone sees every job.
///
/// Examples:
///   mgpu_queue
///   mgpu_queue --me
///   mgpu_queue --json | jq '.jobs[] | select(.state == "PENDING")'
#[derive(Debug, Parser)]
#[command(name = "mgpu_queue", version, verbatim_doc_comment)]
pub struct Args {
    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
    /// Only jobs of this user
    #[arg(short, long, value_name = "NAME", conflicts_with = "me")]
    pub user: Option<String>,
    /// Only your own jobs
    #[arg(long)]
    pub me: bool,
    /// Only this job
    #[arg(short = 'j', long = "job", value_name = "ID")]
    pub job: Option<u64>,
    /// Server socket [default: $MGPU_SOCKET, else /tmp/mgpu_scheduler.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let args = Args::parse();
    crate::run_main("mgpu_queue", run(args))
}

async fn run(args: Args) -> Result<i32> {
    let mut client = Client::connect(args.socket.as_deref(), "mgpu_queue").await?;
    let mut snapshot = match client
        .call(&Request::Queue(QueueRequest {
            user: args.user,
            me: args.me,
            job: args.job,
        }))
        .await?
    {
        Response::Queue(s) => s,
        other => bail!("unexpected answer from the server: {other:?}"),
    };
    loop {
        match client.recv_control().await? {
            Response::QueueJobs { jobs } => snapshot.jobs.extend(jobs),
            Response::QueueEnd => break,
            other => bail!("unexpected answer from the server: {other:?}"),
        }
    }
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    if args.json {
        // Streamed straight from the snapshot (no intermediate tree): fast for long queues.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            serde_json::to_writer_pretty(&mut out, &JsonQueue(&snapshot))?;
        } else {
            serde_json::to_writer(&mut out, &JsonQueue(&snapshot))?;
        }
        writeln!(out)?;
    } else {
        write!(out, "{}", render(&snapshot))?;
    }
    out.flush()?;
    Ok(0)
}

/// RFC 3339 (UTC, millisecond precision) for a time in ms since the epoch.
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
                    "jobs": g.jobs,
                })
            })
            .collect();
        m.serialize_entry("gpus", &gpus)?;
        m.serialize_entry("jobs", &JsonJobs(&s.jobs))?;
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
                let mut m = ser.serialize_map(Some(17))?;
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
                m.serialize_entry("array_job", &j.array.map(|a| a.job))?;
                m.serialize_entry("array_task", &j.array.map(|a| a.task))?;
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

/// A time for the table: `HH:MM` today, else `MM-DD HH:MM` (UTC).
fn short_time(ms: Millis, now: Millis) -> String {
    let t = rfc3339(ms);
    if t.get(..10) == rfc3339(now).get(..10) {
        t.get(11..16).unwrap_or("").to_string()
    } else {
        format!(
            "{} {}",
            t.get(5..10).unwrap_or(""),
            t.get(11..16).unwrap_or("")
        )
    }
}

/// The two tables: jobs, then GPUs.
pub fn render(s: &QueueSnapshot) -> String {
    let mut jobs = table();
    jobs.set_header([
        "JOBID", "USER", "NAME", "STATE", "GPUS", "MEM", "TIME", "REASON",
    ]);
    for j in &s.jobs {
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
        jobs.add_row([
            j.id.to_string(),
            j.user.clone(),
            crate::display_name(&j.name, j.array),
            j.state.as_str().to_string(),
            gpus,
            mem,
            format!("{}/{}", format_duration(elapsed), limit),
            match (&j.reason, j.est_start) {
                (Some(r), Some(t)) => format!("{r} (start by {})", short_time(t, s.now)),
                (Some(r), None) => r.clone(),
                (None, _) => String::new(),
            },
        ]);
    }
    let mut gpus = table();
    gpus.set_header(["GPU", "NAME", "RESERVED/USED/TOTAL (MiB)", "JOBS"]);
    for g in &s.gpus {
        let ids: Vec<String> = g.jobs.iter().map(u64::to_string).collect();
        gpus.add_row([
            g.index.to_string(),
            g.name.clone(),
            format!("{}/{}/{}", g.reserved_mib, g.used_mib, g.total_mib),
            if ids.is_empty() {
                "-".into()
            } else {
                ids.join(",")
            },
        ]);
    }
    format!("{jobs}\n\n{gpus}\n(policy: {})\n", s.policy)
}
