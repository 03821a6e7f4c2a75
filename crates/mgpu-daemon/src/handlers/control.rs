//! `Control` (`mgpu_control`): hold, release and update waiting jobs, show a job, drain and
//! resume GPUs or the whole server. Who asks comes from the kernel (`SO_PEERCRED`): owners and
//! root act on jobs, root alone drains. Every change is durable before the answer.

use std::sync::Arc;

use anyhow::Result;
use mgpu_core::{ControlError, JobId, JobUpdate, Requester};
use mgpu_proto::{ControlRequest, Response};

use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon, Inner};

/// Most job ids one hold or release may name (a job array counts all its tasks).
const MAX_IDS: usize = 10_000;
/// Longest drain reason kept.
const MAX_REASON: usize = 256;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: ControlRequest,
    conn: &mut Conn,
) -> Result<()> {
    let by = daemon.requester(caller.uid);
    let reads_only = matches!(
        req,
        ControlRequest::Show { .. } | ControlRequest::Resolve { .. }
    );
    // Off the event loop: a request may name up to MAX_IDS jobs, each `ID_TASK` a store
    // lookup (found by an attack review: requests of 9,300 names from 16 threads made other
    // users' mgpu_queue take 1.1 s).
    let d = daemon.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let daemon = &d;
        match req {
            ControlRequest::Hold { jobs } => hold_or_release(daemon, by, &jobs, true),
            ControlRequest::Release { jobs } => hold_or_release(daemon, by, &jobs, false),
            ControlRequest::Update { job, changes } => update(daemon, by, &job, &changes),
            ControlRequest::Show { job } => show(daemon, by, &job),
            ControlRequest::DrainGpu { index, reason } => {
                drain(daemon, by, Some(index), Some(reason))
            }
            ControlRequest::ResumeGpu { index } => drain(daemon, by, Some(index), None),
            ControlRequest::DrainServer { reason } => drain(daemon, by, None, Some(reason)),
            ControlRequest::ResumeServer => drain(daemon, by, None, None),
            ControlRequest::Resolve { jobs } => resolve(daemon, &jobs),
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("internal error: {e}")));
    match answer {
        Ok(response) => {
            // Changes are durable before the client hears of them.
            if !reads_only {
                daemon.store.flush().await;
            }
            send(conn, &response).await
        }
        Err(msg) => send_error(conn, msg).await,
    }
}

/// A job as the user wrote it: `12`, or `12_3` (task 3 of job array 12).
fn job_id(daemon: &Daemon, text: &str) -> Result<JobId, String> {
    let t = text.trim();
    let bad = || format!("invalid job id '{t}' (e.g. 12, or 12_3 for task 3 of job array 12)");
    match t.split_once('_') {
        None => t.parse().map_err(|_| bad()),
        Some((a, task)) => {
            let array: JobId = a.parse().map_err(|_| bad())?;
            let task: u32 = task.parse().map_err(|_| bad())?;
            daemon
                .store
                .array_task_job(array, task)
                .map_err(|e| format!("{e:#}"))?
                .ok_or_else(|| format!("job {t}: no such job array task"))
        }
    }
}

/// The ids `jobs` stand for, in order (anyone may ask: ids are no secret, the jobs are
/// checked by whatever request comes next).
fn resolve(daemon: &Daemon, jobs: &[String]) -> Result<Response, String> {
    if jobs.len() > MAX_IDS {
        return Err(too_many(jobs.len()));
    }
    // Each name looked up once, however often it is repeated.
    let mut known: std::collections::HashMap<&str, JobId> = std::collections::HashMap::new();
    let mut lines = Vec::with_capacity(jobs.len());
    for j in jobs {
        let id = match known.get(j.as_str()) {
            Some(&id) => id,
            None => {
                let id = job_id(daemon, j)?;
                known.insert(j, id);
                id
            }
        };
        lines.push(id.to_string());
    }
    Ok(Response::Control { lines, ok: true })
}

/// A job a hold or release names, resolved before the daemon's lock is taken: its id, as
/// written, and the job array it stands for when it is an array's id (the store's record; the
/// live job's, read under the lock, wins).
struct Named {
    id: JobId,
    text: String,
    bare: bool,
    recorded_array: Option<mgpu_core::ArrayTask>,
}

/// Parses and dedupes the ids of a hold or release and does their store lookups, all outside
/// the daemon's lock; more than [`MAX_IDS`] distinct ids are refused before any lookup.
fn resolve_named(daemon: &Daemon, jobs: &[String]) -> Result<Vec<Named>, String> {
    let mut seen = std::collections::HashSet::new();
    let texts: Vec<&str> = jobs
        .iter()
        .map(|t| t.trim())
        .filter(|t| seen.insert(*t))
        .collect();
    if texts.len() > MAX_IDS {
        return Err(too_many(texts.len()));
    }
    let mut ids = std::collections::HashSet::new();
    let mut out = Vec::new();
    for text in texts {
        let id = job_id(daemon, text)?;
        let bare = !text.contains('_');
        // (`12` and `12_0` may name the same job: the first one written is kept.)
        if !ids.insert((id, bare)) {
            continue;
        }
        // (A finished first task still names its array: from the records.)
        let recorded_array = if bare {
            daemon.store.array_task(id).ok().flatten()
        } else {
            None
        };
        out.push(Named {
            id,
            text: text.to_string(),
            bare,
            recorded_array,
        });
    }
    Ok(out)
}

fn too_many(n: usize) -> String {
    format!(
        "too many jobs in one request: it names {n} (a job array's id counts all its tasks), \
         at most {MAX_IDS}; nothing was changed"
    )
}

/// The jobs a hold or release names, under the lock: a job array's id stands for its
/// unfinished tasks. `(id, as written, part of a whole array)`, each id once. The whole
/// request is refused when it comes to more than [`MAX_IDS`] jobs, counted (arrays by their
/// task count) before any is visited.
fn targets(inner: &Inner, named: &[Named]) -> Result<Vec<(JobId, String, bool)>, String> {
    let array_of = |n: &Named| {
        let array = match inner.sched.job(n.id) {
            Some(j) => j.request.array,
            None => n.recorded_array,
        };
        array.filter(|a| a.job == n.id && n.bare)
    };
    let total: usize = named
        .iter()
        .map(|n| array_of(n).map_or(1, |a| a.count as usize))
        .sum();
    if total > MAX_IDS {
        return Err(too_many(total));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for n in named {
        match array_of(n) {
            Some(a) => {
                for task in n.id..n.id + JobId::from(a.count) {
                    if inner.sched.job(task).is_some() && seen.insert(task) {
                        out.push((task, n.text.clone(), true));
                    }
                }
            }
            None => {
                if seen.insert(n.id) {
                    out.push((n.id, n.text.clone(), false));
                }
            }
        }
    }
    Ok(out)
}

fn hold_or_release(
    daemon: &Arc<Daemon>,
    by: Requester,
    jobs: &[String],
    hold: bool,
) -> Result<Response, String> {
    if jobs.is_empty() {
        return Err("name at least one job id".into());
    }
    let named = resolve_named(daemon, jobs)?;
    let mut inner = daemon.lock();
    let targets = targets(&inner, &named)?;
    let mut lines = Vec::new();
    let mut ok = true;
    // Arrays already answered "permission denied" (once, not once per task).
    let mut denied = std::collections::HashSet::new();
    for (id, text, in_array) in targets {
        if in_array && denied.contains(&text) {
            continue;
        }
        let done = if hold {
            inner.sched.hold(id, by).map(Some)
        } else {
            inner.sched.release(id, by).map(|()| None)
        };
        match done {
            Ok(h) => {
                tracing::info!(job = id, by = by.uid, hold, "job hold changed");
                daemon.store.set_hold(id, h);
            }
            // The running (or never held) tasks of an array are left as they are.
            Err(ControlError::NotPending | ControlError::NotHeld) if in_array => {}
            Err(e) => {
                ok = false;
                lines.push(format!("job {text}: {e}"));
                if in_array && matches!(e, ControlError::PermissionDenied) {
                    denied.insert(text);
                }
            }
        }
    }
    daemon.schedule(&mut inner);
    Ok(Response::Control { lines, ok })
}

fn update(
    daemon: &Arc<Daemon>,
    by: Requester,
    job: &str,
    changes: &[(String, String)],
) -> Result<Response, String> {
    let id = job_id(daemon, job)?;
    if changes.is_empty() {
        return Err(
            "nothing to change: give Key=Value items (TimeLimit, Name, Nice, Gpus, Mem)".into(),
        );
    }
    let mut u = JobUpdate::default();
    for (key, value) in changes {
        let v = value.trim();
        match key.to_ascii_lowercase().as_str() {
            "timelimit" | "time" => {
                // The last TimeLimit item wins, relative (Slurm's `+N`/`-N`) or not.
                u.time_limit_change_s = mgpu_core::timefmt::parse_time_limit_change(v)?;
                u.time_limit_s = match u.time_limit_change_s {
                    Some(_) => None,
                    None => Some(mgpu_core::timefmt::parse_time_limit(v)?),
                };
            }
            "name" | "jobname" => {
                if let Some(c) = v
                    .chars()
                    .find(|&c| c.is_control() || crate::handlers::submit::is_invisible(c))
                {
                    return Err(format!(
                        "invalid job name: it contains U+{:04X}, a control or invisible formatting character",
                        c as u32
                    ));
                }
                let max = crate::handlers::submit::MAX_NAME;
                if v.is_empty() || v.chars().count() > max {
                    return Err(format!("invalid job name: 1 to {max} characters"));
                }
                u.name = Some(v.to_string());
            }
            "nice" => {
                u.nice = Some(
                    v.parse()
                        .ok()
                        .filter(|n: &i32| n.abs() <= 1_000_000)
                        .ok_or_else(|| format!("invalid Nice '{v}': a whole number"))?,
                );
            }
            "gpus" | "numgpus" => {
                u.gpus = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &u32| n > 0)
                        .ok_or_else(|| format!("invalid Gpus '{v}': 1 or more"))?,
                );
            }
            "mem" => {
                u.mem_mib = Some(
                    if v.eq_ignore_ascii_case("exclusive") || v.eq_ignore_ascii_case("none") {
                        None
                    } else {
                        Some(mgpu_proto::parse_mem_mib(v)?).filter(|&m| m > 0)
                    },
                );
            }
            other => {
                return Err(format!(
                    "cannot change '{other}': the keys are TimeLimit, Name, Nice, Gpus and Mem (GPU memory per GPU, or 'exclusive')"
                ))
            }
        }
    }
    // The limit a relative change starts from, read here and checked again under the lock
    // that applies it: a change made meanwhile must not be built upon unchecked.
    let changes_limit = u.time_limit_s.is_some() || u.time_limit_change_s.is_some();
    let (job_limit, owner, rules) = {
        let inner = daemon.lock();
        let job = inner.sched.job(id);
        let owner = job.map(|j| j.request.uid).filter(|&o| by.may_manage(o));
        (
            job.map(|j| j.request.time_limit_s),
            owner,
            inner.limits.clone(),
        )
    };
    if let (true, Some(current), Some(owner)) = (changes_limit, job_limit, owner) {
        let t = u
            .time_limit_for(current)
            .map_err(|e| format!("job {job}: {e}"))?
            .flatten();
        if t.is_some_and(|t| t > crate::handlers::submit::MAX_TIME_LIMIT_S) {
            return Err("time limit too long: at most 366 days; 0 means no limit".into());
        }
        if !by.is_admin {
            // The owner's per-user maximum applies as at submit (root is exempt). The
            // account lookup may be slow: outside the lock.
            let limits = rules.resolve_uid(owner);
            crate::handlers::submit::check_time_limit_change(t, &limits)?;
        }
    }
    let mut inner = daemon.lock();
    let now_limit = inner.sched.job(id).map(|j| j.request.time_limit_s);
    if u.time_limit_change_s.is_some() && now_limit.is_some() && now_limit != job_limit {
        return Err(format!(
            "job {job}: its time limit changed meanwhile; try again"
        ));
    }
    inner
        .sched
        .update(id, by, u)
        .map_err(|e| format!("job {job}: {e}"))?;
    let request = inner.sched.job(id).expect("just updated").request.clone();
    tracing::info!(job = id, by = by.uid, "job updated");
    daemon.store.updated(id, request);
    daemon.schedule(&mut inner);
    Ok(Response::Control {
        lines: Vec::new(),
        ok: true,
    })
}

fn show(daemon: &Arc<Daemon>, by: Requester, job: &str) -> Result<Response, String> {
    let id = job_id(daemon, job)?;
    let mut f: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| f.push((k.to_string(), v));
    let opt = |v: Option<String>| v.unwrap_or_else(|| "(null)".into());
    let inner = daemon.lock();
    let sched = &inner.sched;
    if let Some(j) = sched.job(id) {
        let r = &j.request;
        put("JobId", id.to_string());
        if let Some(a) = r.array {
            put("ArrayJobId", a.job.to_string());
            put("ArrayTaskId", a.task.to_string());
        }
        put("JobName", r.name.clone());
        put("UserId", format!("{}({})", r.user, r.uid));
        put("JobState", j.state.as_str().into());
        let reason = match j.stopping {
            Some(s) => Some(format!("{s:?}")),
            None => sched.pending_reason(id).map(str::to_string),
        };
        put("Reason", opt(reason));
        put("WaitDetail", opt(sched.wait_detail(id)));
        put(
            "Dependency",
            opt(sched.dependency_of(id).map(|d| d.text.clone())),
        );
        put(
            "Hold",
            match sched.hold_of(id) {
                Some(mgpu_core::Hold::User) => "user".into(),
                Some(mgpu_core::Hold::Admin) => "admin".into(),
                None => "no".into(),
            },
        );
        put(
            "Priority",
            opt(sched.priority(id).map(|p| format!("{p:.0}"))),
        );
        put(
            "Position",
            opt(sched.queue_position(id).map(|p| p.to_string())),
        );
        put("Nice", r.nice.to_string());
        put("Gpus", r.gpus.to_string());
        put(
            "GpuIds",
            if j.gpus.is_empty() {
                "(null)".into()
            } else {
                j.gpus
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
        put(
            "Mem",
            r.mem_mib
                .map_or("exclusive".into(), |m| format!("{m}M per GPU")),
        );
        put(
            "TimeLimit",
            sched
                .effective_limit_s(r)
                .map_or("UNLIMITED".into(), mgpu_core::timefmt::format_duration),
        );
        if let Some((ms, source)) = sched.job_estimate(id) {
            put(
                "Estimate",
                mgpu_core::timefmt::format_duration(ms.div_ceil(1000)),
            );
            put("EstimateFrom", source.describe(&r.name));
        }
        // What the shortest-first order counts (a limit scaled by its user's use of limits,
        // the typical recent run for a job nothing is known of): differs from Estimate.
        if let Some(ms) = sched.job_order_estimate(id) {
            put(
                "OrderedAs",
                mgpu_core::timefmt::format_duration(ms.div_ceil(1000)),
            );
        }
        put("SubmitTime", j.submitted_at.to_string());
        put("BeginTime", opt(sched.begin_at(id).map(|t| t.to_string())));
        put("StartTime", opt(j.started_at.map(|t| t.to_string())));
        put("Restarts", j.restarts.to_string());
        put("NoRequeue", r.no_requeue.to_string());
        if by.may_manage(r.uid) {
            put(
                "Command",
                opt(inner.commands.get(&id).map(|c| shell_words(c))),
            );
            drop(inner);
            if let Ok(spec) = daemon.store.launch_spec(id) {
                // A directory name may hold terminal escapes too: shown escaped, as commands.
                let cwd = crate::handlers::queue::shown_arg(&spec.cwd).into_owned();
                f.push(("WorkDir".into(), cwd));
            }
        }
        return Ok(Response::JobDetail { fields: f });
    }
    drop(inner);
    // Finished jobs are accounting records: others' are shown to root only (as mgpu_acct).
    let filter = crate::store::AcctFilter {
        job: Some(id),
        uid: (!by.is_admin).then_some(by.uid),
        ..Default::default()
    };
    // (One record by its key: on the event loop, never a scan.)
    let rec = daemon
        .store
        .finished_job(&filter)
        .map_err(|e| format!("{e:#}"))?
        .ok_or_else(|| {
            format!("job {job}: no such job (finished jobs of other users are shown to root only)")
        })?;
    put("JobId", id.to_string());
    if let Some(a) = rec.array {
        put("ArrayJobId", a.job.to_string());
        put("ArrayTaskId", a.task.to_string());
    }
    put("JobName", rec.name.clone());
    put("UserId", rec.user.clone());
    put("JobState", rec.state.as_str().into());
    put(
        "ExitCode",
        format!("{}:{}", rec.exit_code.unwrap_or(0), rec.signal.unwrap_or(0)),
    );
    put("Gpus", rec.gpus.to_string());
    put(
        "GpuIds",
        rec.gpu_ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    put(
        "Mem",
        rec.mem_mib
            .map_or("exclusive".into(), |m| format!("{m}M per GPU")),
    );
    put("SubmitTime", rec.submitted_at.to_string());
    put("StartTime", opt(rec.started_at.map(|t| t.to_string())));
    put("EndTime", opt(rec.ended_at.map(|t| t.to_string())));
    put("Restarts", rec.restarts.to_string());
    // (A message may quote a path the user named.)
    put(
        "Message",
        opt(rec
            .message
            .as_deref()
            .map(|m| crate::handlers::queue::shown_arg(m).into_owned())),
    );
    Ok(Response::JobDetail { fields: f })
}

/// argv as one line, words with spaces or quotes quoted.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Drains (`reason: Some`) or resumes a GPU (`index: Some`) or the whole server: root only.
fn drain(
    daemon: &Arc<Daemon>,
    by: Requester,
    index: Option<u32>,
    reason: Option<Option<String>>,
) -> Result<Response, String> {
    if !by.is_admin {
        return Err("only root may drain or resume GPUs or the server".into());
    }
    let reason = match reason {
        None => None,
        Some(r) => {
            let r = r.unwrap_or_default();
            if r.chars().any(|c| c.is_control()) || r.len() > MAX_REASON {
                return Err(format!(
                    "invalid --reason: one line of at most {MAX_REASON} bytes"
                ));
            }
            Some(r)
        }
    };
    let mut inner = daemon.lock();
    let drained = reason.is_some();
    let (target, line) = match index {
        Some(i) => {
            if !inner.sched.set_gpu_drained(i, drained) {
                let have: Vec<String> = inner
                    .sched
                    .gpus()
                    .iter()
                    .map(|g| g.spec.index.to_string())
                    .collect();
                return Err(format!(
                    "no GPU {i} here (this server manages GPUs {})",
                    have.join(", ")
                ));
            }
            match &reason {
                Some(r) => {
                    inner.drains.gpus.insert(i, r.clone());
                }
                None => {
                    inner.drains.gpus.remove(&i);
                }
            }
            let running = inner
                .sched
                .gpus()
                .iter()
                .find(|g| g.spec.index == i)
                .map_or(0, |g| g.jobs().len());
            let line = if drained {
                format!("GPU {i} drained: no new jobs go there; {running} running job(s) on it finish normally")
            } else {
                format!("GPU {i} resumed: it takes jobs again")
            };
            (format!("gpu:{i}"), line)
        }
        None => {
            inner.sched.set_server_drained(drained);
            inner.drains.server = reason.clone();
            let line = if drained {
                format!(
                    "server drained: nothing new starts; {} running job(s) finish normally, pending jobs wait",
                    inner.sched.running_len()
                )
            } else {
                "server resumed: pending jobs start again".to_string()
            };
            ("server".to_string(), line)
        }
    };
    tracing::info!(target = %target, drained, reason = ?reason, by = by.uid, "drain changed");
    daemon
        .store
        .set_drain(target, reason.map(|r| (r, now_ms())));
    daemon.schedule(&mut inner);
    Ok(Response::Control {
        lines: vec![line],
        ok: true,
    })
}
