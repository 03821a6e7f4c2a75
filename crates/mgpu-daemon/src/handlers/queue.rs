//! `Queue`: a snapshot of running and pending jobs and of the GPUs. Everyone may see it.

use std::sync::Arc;

use anyhow::Result;
use mgpu_core::{JobId, Stopping};
use mgpu_proto::{GpuInfo, JobInfo, QueueRequest, QueueSnapshot, Response};

use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon, Inner};
use crate::supervisor::StopReason;
use crate::users;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: QueueRequest,
    conn: &mut Conn,
) -> Result<()> {
    let only_uid = if req.me {
        Some(caller.uid)
    } else if let Some(name) = &req.user {
        match users::uid_of(name) {
            Some(uid) => Some(uid),
            None => return send_error(conn, format!("no such user: {name}")).await,
        }
    } else {
        None
    };
    // A slot first: the listing's memory (its job ids) exists only while it has one. (One
    // job's row needs none.)
    let _slot = match req.job {
        Some(_) => None,
        None => match conn.listing().await {
            Ok(slot) => Some(slot),
            Err(e) => return send_error(conn, format!("{e:#}")).await,
        },
    };
    // A bounded snapshot: the GPUs, the first page, and the ids of the jobs to list, in order
    // (8 bytes each). Each further page is built under the lock when it is to be sent, and
    // sent under the connection's write deadline: no reply is ever built whole.
    let (snapshot, ids) = {
        let inner = daemon.lock();
        let sched = &inner.sched;
        let gpus = sched
            .gpus()
            .iter()
            .map(|g| GpuInfo {
                index: g.spec.index,
                name: g.spec.name.clone(),
                total_mib: g.spec.total_mib,
                reserved_mib: if g.exclusive.is_some() {
                    g.spec.total_mib
                } else {
                    g.reserved_mib
                },
                used_mib: inner.gpu_used.get(&g.spec.index).copied().unwrap_or(0),
                jobs: g.jobs(),
                util_pct: inner
                    .gpu_readings
                    .get(&g.spec.index)
                    .and_then(|r| r.util_pct),
                foreign: inner
                    .gpu_readings
                    .get(&g.spec.index)
                    .map(|r| {
                        r.foreign
                            .iter()
                            .map(|p| mgpu_proto::ForeignProcess {
                                pid: p.pid,
                                user: p.user.clone(),
                                used_mib: p.used_mib,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                drained: inner.drains.gpus.get(&g.spec.index).cloned(),
            })
            .collect();
        let ids: Vec<JobId> = match req.job {
            Some(id) => sched
                .job(id)
                .filter(|j| only_uid.is_none_or(|u| u == j.request.uid))
                .map(|j| j.id)
                .into_iter()
                .collect(),
            None => sched
                .jobs_in_order()
                .filter(|j| only_uid.is_none_or(|u| u == j.request.uid))
                .map(|j| j.id)
                .collect(),
        };
        let first = &ids[..ids.len().min(CHUNK)];
        let snapshot = QueueSnapshot {
            now: now_ms(),
            policy: sched.config().policy.to_string(),
            gpus,
            jobs: job_infos(&inner, first),
            server_drained: inner.drains.server.clone(),
        };
        (snapshot, ids)
    };
    send(conn, &Response::Queue(snapshot)).await?;
    for page in ids.chunks(CHUNK).skip(1) {
        let jobs = job_infos(&daemon.lock(), page);
        if !jobs.is_empty() {
            send(conn, &Response::QueueJobs { jobs }).await?;
        }
    }
    send(conn, &Response::QueueEnd).await
}

/// The queue rows of the jobs `ids` that are still pending or running.
fn job_infos(inner: &Inner, ids: &[JobId]) -> Vec<JobInfo> {
    let sched = &inner.sched;
    ids.iter()
        .filter_map(|&id| sched.job(id))
        .map(|j| JobInfo {
            id: j.id,
            user: j.request.user.clone(),
            name: j.request.name.clone(),
            state: j.state,
            gpus: j.request.gpus,
            gpu_ids: j.gpus.clone(),
            mem_mib: j.request.mem_mib,
            time_limit_s: sched.effective_limit_s(&j.request),
            submitted_at: j.submitted_at,
            started_at: j.started_at,
            restarts: j.restarts,
            reason: match j.stopping {
                Some(Stopping::Cancel) => Some("Cancelling".into()),
                Some(Stopping::Requeue) => Some("Preempting".into()),
                Some(Stopping::Timeout) => Some("TimeLimit".into()),
                None => match inner.stop_reason(j.id) {
                    Some(StopReason::GpuMemory { .. }) => Some("GpuMemory".into()),
                    _ => sched.pending_reason(j.id).map(str::to_string),
                },
            },
            command: inner
                .commands
                .get(&j.id)
                .map(|c| c.to_vec())
                .unwrap_or_default(),
            priority: sched.priority(j.id),
            est_start: sched.est_start(j.id),
            behind: behind(sched, j.id),
            behind_start: behind(sched, j.id).and_then(|r| sched.est_start(r)),
            array: j.request.array,
            used_mib: used_mib(inner, j),
            peak_mib: inner.gpu_peaks.get(&j.id).map(|p| p.0),
            estimate_ms: sched.job_estimate(j.id).map(|e| e.0),
            estimate_source: sched.job_estimate(j.id).map(|e| e.1),
        })
        .collect()
}

/// GPU memory a running job's processes use, per GPU: on each GPU it holds (0 where none of
/// its processes is), and on any other where one is. `None` where nothing is measured
/// (simulated GPUs, a pending job).
fn used_mib(inner: &Inner, j: &mgpu_core::Job) -> Option<std::collections::BTreeMap<u32, u64>> {
    if inner.gpu_readings.is_empty() || j.state != mgpu_core::JobState::Running {
        return None;
    }
    let mut used: std::collections::BTreeMap<u32, u64> = j.gpus.iter().map(|&g| (g, 0)).collect();
    for g in inner.sched.gpus() {
        if let Some(&mib) = g.used_by.get(&j.id) {
            used.insert(g.spec.index, mib);
        }
    }
    Some(used)
}

/// The job holding the reservation that a pending job waits behind, if it does.
fn behind(sched: &mgpu_core::Scheduler, id: JobId) -> Option<JobId> {
    match sched.pending_reason(id)? {
        "Reservation" | "Priority" => sched.reserved_job().filter(|r| *r != id),
        _ => None,
    }
}

/// Jobs per frame: with at most [`MAX_SHOWN_COMMAND`] bytes of command and a name of at most
/// 128 characters, a job takes under 3 KiB of JSON, so a frame stays under 1 MiB (and a
/// typical one, about 300 bytes a job, under 100 KiB).
const CHUNK: usize = 256;
/// Command shown per job, in bytes of JSON; longer ones are cut (the full argv stays with the
/// job).
const MAX_SHOWN_COMMAND: usize = 1024;

/// A command as the queue shows it; a job array's tasks share one.
pub type ShownCommand = Arc<[String]>;

/// An argument as others may see it: control and invisible characters (terminal escapes, a
/// newline that forges a line of the listing, a right-to-left override) written out as
/// escapes (`\n`, `\u{1b}`), so a command cannot rewrite another user's terminal or pass for
/// someone else's job. A backslash is doubled only when the argument has such a character.
pub(crate) fn shown_arg(a: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| c.is_control() || crate::handlers::submit::is_invisible(c);
    if !a.chars().any(hidden) {
        return a.into();
    }
    let mut out = String::with_capacity(a.len() + 8);
    for c in a.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if hidden(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.into()
}

/// The command as the queue shows it: control and invisible characters escaped
/// ([`shown_arg`]), cut once its JSON (quotes, commas and escapes counted) would pass
/// [`MAX_SHOWN_COMMAND`] bytes.
pub fn display_command(argv: &[String]) -> ShownCommand {
    let json_len = |c: char| match c {
        '"' | '\\' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    };
    let mut budget = MAX_SHOWN_COMMAND;
    let mut out = Vec::new();
    for a in argv {
        let a = shown_arg(a);
        // Quotes and a comma.
        budget = budget.saturating_sub(3);
        let mut cut = None;
        for (i, c) in a.char_indices() {
            match budget.checked_sub(json_len(c)) {
                Some(left) => budget = left,
                None => {
                    cut = Some(i);
                    break;
                }
            }
        }
        match cut {
            None if budget > 0 => out.push(a.into_owned()),
            None => {
                out.push(a.into_owned());
                break;
            }
            Some(i) => {
                out.push(format!("{}...", &a[..i]));
                break;
            }
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_commands_stay_small_as_json() {
        let argv = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let short = argv(&["python", "train.py", "--lr", "3e-4"]);
        assert_eq!(&display_command(&short)[..], short);
        let json_len = |c: &[String]| serde_json::to_string(c).unwrap().len();
        for nasty in [
            vec![String::new(); 100_000],
            vec!["\u{1}".repeat(10_000)],
            vec!["\"\\".repeat(5_000), "x".into()],
            vec!["é".repeat(3_000)],
        ] {
            let shown = display_command(&nasty);
            assert!(
                json_len(&shown) <= MAX_SHOWN_COMMAND + 8,
                "{}",
                json_len(&shown)
            );
        }
        let long = vec!["a".repeat(2_000)];
        assert!(display_command(&long)[0].ends_with("..."));
    }

    #[test]
    fn shown_commands_cannot_rewrite_a_terminal_or_forge_a_line() {
        let argv = vec![
            "sleep".to_string(),
            "1\u{1b}[2J\u{1b}[31mFAKE\n 999  mgpu-test-b  x\r\u{202e}".to_string(),
            "a\\b".to_string(),
        ];
        let shown = display_command(&argv);
        assert_eq!(
            &shown[..],
            [
                "sleep",
                "1\\u{1b}[2J\\u{1b}[31mFAKE\\n 999  mgpu-test-b  x\\r\\u{202e}",
                // No such character: shown as it is.
                "a\\b",
            ]
        );
        for a in shown.iter() {
            assert!(!a
                .chars()
                .any(|c| c.is_control() || crate::handlers::submit::is_invisible(c)));
        }
    }
}
