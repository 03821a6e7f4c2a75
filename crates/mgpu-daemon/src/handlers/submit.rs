//! `Submit`: validate, queue durably, answer with the id; when attached, stream the job's
//! progress, output and exit status, and cancel it on Ctrl-C or a lost client.

use std::sync::Arc;

use anyhow::Result;
use mgpu_core::{ArrayTask, JobId, JobRequest};
use mgpu_proto::{Response, SubmitRequest, Venv, MAX_ARRAY_INDEX, MAX_ARRAY_TASKS};

use crate::config::{LimitRules, Limits};
use crate::exec::LaunchSpec;
use crate::handlers::cancel::cancel_one;
use crate::handlers::follow::{follow, Follower};
use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon, Inner};
use crate::store::{NewArray, NewJob};
use crate::users;

pub(crate) const MAX_NAME: usize = 128;
const MAX_ARGS: usize = 65_536;
/// Bytes of argv, and of environment, one job may carry.
const MAX_ARGV_BYTES: usize = 1 << 20;
const MAX_ENV_BYTES: usize = 1 << 20;
/// Longest working directory or venv path (the kernel's PATH_MAX).
const MAX_PATH: usize = 4096;
/// Longest time limit a job may ask for (and warning lead time): a year. Longer is a typo, and
/// times far beyond it would overflow the scheduler's clock arithmetic.
pub(crate) const MAX_TIME_LIMIT_S: u64 = 366 * 24 * 3600;

fn default_name(command: &str) -> String {
    command.rsplit('/').next().unwrap_or(command).to_string()
}

/// Invisible characters that change how text around them is shown: Unicode's format
/// characters (category Cf: bidi overrides and isolates, zero-width characters, the BOM, ...)
/// and the line and paragraph separators. A job name with one could pose as another user's job
/// in a listing.
pub(crate) fn is_invisible(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x0890..=0x0891 | 0x08E2
        | 0x180E | 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F
        | 0xFEFF | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F
        | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F)
}

/// The latest `--begin` (ms since the epoch): 9999-12-31 23:59:59.999 UTC, the last time a
/// listing can show, far from any overflow of the core's clock arithmetic.
const MAX_BEGIN_AT_MS: u64 = 253_402_300_799_999;

/// Checks what the client sent; returns a clear message for the first problem.
fn validate(req: &SubmitRequest) -> Result<String, String> {
    let Some(program) = req.command.first() else {
        return Err(
            "empty command: give the command after --, e.g. mgpu_srun -- python train.py".into(),
        );
    };
    if program.is_empty() {
        return Err("empty command name".into());
    }
    if req.command.len() > MAX_ARGS {
        return Err(format!("too many arguments (at most {MAX_ARGS})"));
    }
    if req.command.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGV_BYTES {
        return Err(format!(
            "the command line is too long (at most {MAX_ARGV_BYTES} bytes)"
        ));
    }
    if req
        .env
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        > MAX_ENV_BYTES
    {
        return Err(format!(
            "the environment is too large (at most {MAX_ENV_BYTES} bytes)"
        ));
    }
    if req.command.iter().any(|a| a.contains('\0')) {
        return Err("the command contains a NUL byte".into());
    }
    // What execve could not pass on is refused now, not at launch as a failed job.
    if let Some((k, _)) = req
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
    {
        return Err(format!(
            "invalid environment variable {k:?}: a name must be non-empty and without '=' or NUL, a value without NUL"
        ));
    }
    if req.cwd.contains('\0') || matches!(&req.venv, Venv::Dir(d) if d.contains('\0')) {
        return Err("the working directory and the venv path may not contain a NUL byte".into());
    }
    if req.cwd.len() >= MAX_PATH || matches!(&req.venv, Venv::Dir(d) if d.len() >= MAX_PATH) {
        return Err(format!(
            "the working directory and the venv path must be shorter than {MAX_PATH} bytes"
        ));
    }
    if let Some(d) = &req.submit_dir {
        if d.contains('\0') || d.len() >= MAX_PATH || !d.starts_with('/') {
            return Err(format!(
                "the submit directory must be an absolute path shorter than {MAX_PATH} bytes, without NUL"
            ));
        }
    }
    if !req.cwd.starts_with('/') {
        return Err(format!(
            "the working directory must be absolute, got '{}'",
            req.cwd
        ));
    }
    if let Venv::Dir(d) = &req.venv {
        if !d.starts_with('/') {
            return Err(format!("--venv must be an absolute path, got '{d}'"));
        }
    }
    let name = req.name.clone().unwrap_or_else(|| default_name(program));
    if let Some(c) = name.chars().find(|&c| c.is_control() || is_invisible(c)) {
        return Err(format!(
            "invalid job name: it contains U+{:04X}, a control or invisible formatting character (e.g. a bidi override), which would make listings lie",
            c as u32
        ));
    }
    if name.is_empty() || name.chars().count() > MAX_NAME {
        return Err(format!("invalid job name: 1 to {MAX_NAME} characters"));
    }
    if req.begin_at.is_some_and(|t| t > MAX_BEGIN_AT_MS) {
        return Err("--begin: at most the end of the year 9999".into());
    }
    if req.time_limit_s.is_some_and(|t| t > MAX_TIME_LIMIT_S) {
        return Err(format!(
            "time limit too long: at most 366 days ({MAX_TIME_LIMIT_S} s); 0 means no limit"
        ));
    }
    if req.signal.is_some_and(|w| w.secs_before > MAX_TIME_LIMIT_S) {
        return Err("--signal: the warning may come at most 366 days before the limit".into());
    }
    if req
        .script
        .as_ref()
        .is_some_and(|s| s.len() > mgpu_proto::MAX_SCRIPT_BYTES)
    {
        return Err(format!(
            "the batch script is too large: at most {} KiB",
            mgpu_proto::MAX_SCRIPT_BYTES >> 10
        ));
    }
    // (mgpu_sbatch refuses these first; a client that does not would run a broken script.)
    if req.script.as_ref().is_some_and(|s| s.contains("\r\n")) {
        return Err(
            "the batch script contains DOS line breaks (\\r\\n) instead of the expected UNIX line breaks (\\n); convert it first (dos2unix)".into(),
        );
    }
    if req.script.is_some() && req.command.is_empty() {
        return Err("a batch script needs its name as the command".into());
    }
    for (flag, path) in [("--output", &req.output), ("--error", &req.error)] {
        if let Some(p) = path {
            if p.is_empty() || p.len() > 4096 || p.contains('\0') {
                return Err(format!("invalid {flag}: 1 to 4096 bytes, no NUL"));
            }
        }
    }
    if let Some(indices) = &req.array {
        if req.attach {
            return Err("a job array is submitted detached".into());
        }
        if indices.is_empty() || indices.len() > MAX_ARRAY_TASKS {
            return Err(format!("a job array has 1 to {MAX_ARRAY_TASKS} tasks"));
        }
        if req.array_limit == Some(0) {
            return Err("a job array's %N must be at least 1".into());
        }
        if indices.windows(2).any(|w| w[0] >= w[1]) || indices.iter().any(|&i| i > MAX_ARRAY_INDEX)
        {
            return Err(format!(
                "array task indices must increase and be at most {MAX_ARRAY_INDEX}"
            ));
        }
    }
    Ok(name)
}

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    mut req: SubmitRequest,
    conn: &mut Conn,
) -> Result<()> {
    let name = match validate(&req) {
        Ok(n) => n,
        Err(msg) => return send_error(conn, msg).await,
    };
    if req.nice < 0 && !daemon.requester(caller.uid).is_admin {
        return send_error(
            conn,
            "only root may raise a job's priority (negative --nice)",
        )
        .await;
    }
    let run_uid = if daemon.settings.multi_user {
        caller.uid
    } else {
        daemon.settings.server_uid
    };
    let account = match users::account(run_uid) {
        Ok(a) => a,
        Err(e) => return send_error(conn, format!("cannot run jobs for you: {e:#}")).await,
    };
    // The user's limits (root has none): the time limit is checked and defaulted here, the
    // waiting jobs at admission, the running ones by the scheduler.
    let rules = daemon.lock().limits.clone();
    let limits = rules.resolve(caller.uid, &account.name, &account.groups);
    let time_limit_s = match apply_time_limits(req.time_limit_s, &limits) {
        Ok(t) => t,
        Err(msg) => return send_error(conn, msg).await,
    };
    let request = JobRequest {
        uid: caller.uid,
        user: account.name.clone(),
        name,
        gpus: req.gpus,
        mem_mib: req.mem_mib,
        time_limit_s,
        nice: req.nice,
        no_requeue: req.no_requeue,
        max_restarts: req.max_restarts,
        warn_signal: req.signal,
        array: None,
    };
    let (cpus, host_mem_mib) = match daemon
        .settings
        .job_limits
        .resolve(req.cpus, req.host_mem_mib)
    {
        Ok(l) => l,
        Err(msg) => return send_error(conn, msg).await,
    };
    if req.begin_at.is_some() && (req.hold || req.dependency.is_some()) {
        return send_error(
            conn,
            "--begin cannot be combined with --hold or --dependency yet: submit it held and release it when its time comes, or use the dependency alone".to_string(),
        )
        .await;
    }
    // Dependencies name existing jobs (checked before anything is recorded).
    let gate = match crate::handlers::depend::gate_of(daemon, req.dependency.as_deref(), req.hold) {
        Ok(g) => g,
        Err(msg) => return send_error(conn, msg).await,
    };
    if let Some(d) = &gate.dependency {
        // Every waiting job's dependency items cost the daemon memory: bounded per user.
        let jobs = req.array.as_ref().map_or(1, Vec::len);
        let have = daemon.lock().sched.dependency_targets_of(caller.uid);
        let max = crate::handlers::depend::MAX_DEP_TARGETS_PER_USER;
        if have + d.items.len() * jobs > max {
            return send_error(
                conn,
                format!(
                    "your waiting jobs already have {have} dependencies; at most {max} may wait per user (a whole job array counts once)"
                ),
            )
            .await;
        }
    }
    let notify = match crate::notify::check(daemon, req.notify.take().map(|n| *n), &request.name) {
        Ok(n) => n,
        Err(msg) => return send_error(conn, msg).await,
    };
    // The client's stdin, for an attached job: a pipe made here, whose write end goes to the
    // client (it copies its stdin in) and whose read end becomes the job's stdin when it
    // starts. The daemon never reads or writes it, and never takes a descriptor from a user.
    let mut stdin = if req.stdin && req.attach && req.array.is_none() {
        let (read, write) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                return send_error(conn, format!("could not make a pipe for your stdin: {e}")).await
            }
        };
        conn.send_with_fd(
            &mgpu_proto::Response::StdinPipe,
            std::os::fd::AsFd::as_fd(&write),
        )
        .await?;
        // Ours closes now: the job sees the end of its input when the client's copy closes.
        drop(write);
        Some(read)
    } else {
        None
    };
    let spec = LaunchSpec {
        command: req.command,
        cwd: req.cwd,
        submit_dir: req.submit_dir.take(),
        env: req.env,
        venv: req.venv,
        umask: req.umask,
        cpus,
        host_mem_mib,
        script: req.script.take(),
        output: req.output.take(),
        error: req.error.take(),
        begin_at: req.begin_at,
        notify,
    };
    if let Some(indices) = req.array.take() {
        return submit_array(
            daemon,
            caller,
            (request, gate),
            spec,
            &indices,
            req.array_limit,
            (&rules, &limits),
            conn,
        )
        .await;
    }
    let now = now_ms();
    // Phase 1: refuse what can never run or would overfill the queue, and take an id.
    let bytes = crate::logquota::launch_bytes(&spec);
    let admission = match admit(daemon, &request, 1, bytes, false, (&rules, &limits)) {
        Ok(a) => a,
        Err(msg) => return send_error(conn, msg).await,
    };
    let id = admission.first;
    let shown = crate::handlers::queue::display_command(&spec.command);
    // Phase 2: durable before anything else happens to it (group commit with other submits).
    let committed = daemon
        .store
        .insert(NewJob {
            id,
            request: request.clone(),
            spec,
            submitted_at: now,
            attached: req.attach,
            gate: gate.clone(),
        })
        .await
        .unwrap_or_else(|_| Err("the store stopped".to_string()));
    if let Err(e) = committed {
        return send_error(conn, format!("could not record the job durably: {e}")).await;
    }
    // Phase 3: into the queue (or parked by its gate), and start it if it fits.
    let mut admission = Some(admission);
    let queued = crate::handlers::depend::enter_gated(daemon, &gate, |inner, lookup| {
        if let Some(a) = admission.take() {
            a.settle(inner);
        }
        match inner
            .sched
            .restore_pending_gated(id, request.clone(), now, 0, gate.clone(), lookup)
        {
            // Cannot happen (checked above against the same GPUs).
            Err(e) => Err(e),
            Ok(()) => {
                if let Some(at) = req.begin_at {
                    inner.sched.defer_until(id, at);
                }
                inner.commands.insert(id, shown.clone());
                if let Some(fd) = stdin.take() {
                    inner.stdin.insert(id, (fd, req.pty));
                }
                let events = req.attach.then(|| daemon.subscribe(inner, id));
                daemon.schedule(inner);
                Ok(events)
            }
        }
    })
    .await;
    let events = match queued {
        Ok(events) => events,
        Err(e) => {
            record_refused(daemon, id, &e);
            return send_error(conn, format!("job refused: {e}")).await;
        }
    };
    tracing::info!(job = id, uid = caller.uid, pid = ?caller.pid, "job submitted");
    let sent = send(conn, &Response::Submitted { job: id }).await;
    let Some(events) = events else {
        return sent;
    };
    if sent.is_err() {
        // The attached client is already gone: its job goes too.
        let mut inner = daemon.lock();
        cancel_one(daemon, &mut inner, id, daemon.requester(caller.uid));
        return sent;
    }
    let pending = {
        let inner = daemon.lock();
        // A held job, or one waiting on dependencies, has no place in the queue yet (0).
        inner
            .sched
            .wait_detail(id)
            .map(|r| (inner.sched.queue_position(id).unwrap_or(0), r))
    };
    if let Some((position, reason)) = pending {
        send(
            conn,
            &Response::Pending {
                job: id,
                position,
                reason,
            },
        )
        .await?;
    }
    follow(daemon, id, events, conn, Follower::Srun { caller }, None).await
}

/// Phase 1 of a submit: refuses what can never run or would overfill the queue (or the user's
/// bound on stored launch records, charged `bytes`), and takes `n` consecutive ids.
fn admit(
    daemon: &Arc<Daemon>,
    request: &JobRequest,
    n: usize,
    bytes: u64,
    array: bool,
    (rules, limits): (&Arc<LimitRules>, &Limits),
) -> Result<Admission, String> {
    let mut inner = daemon.lock();
    if inner.shutting_down {
        return Err("the mgpu server is shutting down; try again shortly".to_string());
    }
    if let Err(e) = inner.sched.check_feasible(request) {
        return Err(format!("job refused: {e}"));
    }
    // Resolved again if the configuration was reloaded meanwhile.
    let limits = if Arc::ptr_eq(rules, &inner.limits) {
        *limits
    } else {
        inner.limits.resolve_uid(request.uid)
    };
    if let Some(max) = limits.max_pending_jobs {
        let mine = inner.waiting_of(request.uid);
        if (mine + n) as u64 > max {
            return Err(format!(
                "refused: you have {mine} job{} waiting and at most {max} may wait per user \
                 (the administrator's limit max_pending_jobs_per_user); wait for some to start \
                 or cancel some",
                if mine == 1 { "" } else { "s" }
            ));
        }
    }
    inner.sched.set_user_limits(request.uid, limits.running);
    let first = inner.admit(&daemon.settings, request.uid, n)?;
    let charged = (daemon.launches.lock().unwrap_or_else(|p| p.into_inner())).charge(
        request.uid,
        bytes,
        first,
        n as u32,
        array,
    );
    if let Err(e) = charged {
        inner.admitted(request.uid, n);
        return Err(e);
    }
    Ok(Admission {
        daemon: daemon.clone(),
        uid: request.uid,
        n,
        first,
        open: true,
    })
}

/// New jobs with ids that count as waiting until they are queued ([`Admission::settle`]) or
/// given up (dropped).
struct Admission {
    daemon: Arc<Daemon>,
    uid: u32,
    n: usize,
    first: JobId,
    open: bool,
}

impl Admission {
    /// The jobs are queued now (under the same lock): they count as pending from here on.
    fn settle(mut self, inner: &mut Inner) {
        inner.admitted(self.uid, self.n);
        self.open = false;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.open {
            self.daemon.lock().admitted(self.uid, self.n);
            let mut launches = self
                .daemon
                .launches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for id in self.first..self.first + self.n as JobId {
                launches.release(id);
            }
        }
    }
}

/// A job array: one job per task, with ids that follow each other, all recorded in one
/// transaction before the answer, then queued together.
#[allow(clippy::too_many_arguments)]
async fn submit_array(
    daemon: &Arc<Daemon>,
    caller: Caller,
    (request, gate): (JobRequest, mgpu_core::Gate),
    spec: LaunchSpec,
    indices: &[u32],
    limit: Option<u32>,
    limits: (&Arc<LimitRules>, &Limits),
    conn: &mut Conn,
) -> Result<()> {
    let now = now_ms();
    let count = indices.len() as u32;
    let bytes = crate::logquota::launch_bytes(&spec);
    let admission = match admit(daemon, &request, indices.len(), bytes, true, limits) {
        Ok(a) => a,
        Err(msg) => return send_error(conn, msg).await,
    };
    let first = admission.first;
    let (min, max) = (indices[0], indices[indices.len() - 1]);
    let requests: Vec<(JobId, JobRequest)> = indices
        .iter()
        .zip(first..)
        .map(|(&task, id)| {
            let array = Some(ArrayTask {
                job: first,
                task,
                count,
                min,
                max,
                limit,
            });
            (
                id,
                JobRequest {
                    array,
                    ..request.clone()
                },
            )
        })
        .collect();
    let shown = crate::handlers::queue::display_command(&spec.command);
    let spec_begin_at = spec.begin_at;
    let committed = daemon
        .store
        .insert_array(NewArray {
            spec,
            submitted_at: now,
            tasks: requests.clone(),
            gate: gate.clone(),
        })
        .await
        .unwrap_or_else(|_| Err("the store stopped".to_string()));
    if let Err(e) = committed {
        return send_error(conn, format!("could not record the job array durably: {e}")).await;
    }
    let begin_at = spec_begin_at;
    let mut admission = Some(admission);
    let refused = crate::handlers::depend::enter_gated(daemon, &gate, |inner, lookup| {
        if let Some(a) = admission.take() {
            a.settle(inner);
        }
        let mut refused = None;
        for (id, request) in &requests {
            if let Err(e) = inner.sched.restore_pending_gated(
                *id,
                request.clone(),
                now,
                0,
                gate.clone(),
                lookup,
            ) {
                // Cannot happen (checked above against the same GPUs).
                record_refused(daemon, *id, &e);
                refused.get_or_insert(e.to_string());
                continue;
            }
            if let Some(at) = begin_at {
                inner.sched.defer_until(*id, at);
            }
            inner.commands.insert(*id, shown.clone());
        }
        daemon.schedule(inner);
        refused
    })
    .await;
    if let Some(e) = refused {
        return send_error(conn, format!("job array {first}: tasks refused: {e}")).await;
    }
    tracing::info!(array = first, tasks = count, uid = caller.uid, pid = ?caller.pid, "job array submitted");
    send(
        conn,
        &Response::SubmittedArray {
            first,
            tasks: count,
        },
    )
    .await
}

/// A job's time limit under its user's limits: the default when it asks for none (else the
/// maximum, as Slurm gives a job without a limit the partition's MaxTime); refused, as in
/// Slurm, when it asks for more than the maximum.
fn apply_time_limits(asked: Option<u64>, limits: &Limits) -> Result<Option<u64>, String> {
    match (asked, limits.max_time_s) {
        // None: no `-t` at all; Some(0): `-t 0`/`UNLIMITED`, which gets no default and,
        // under a maximum, is refused as any longer limit is (as `mgpu_control update` does).
        (None, max) => Ok(limits.default_time_s.or(max)),
        (Some(0), Some(max)) => Err(too_long(None, max)),
        (Some(0), None) => Ok(None),
        (Some(t), Some(max)) if t > max => Err(too_long(Some(t), max)),
        (t, _) => Ok(t),
    }
}

/// A changed time limit (`None`: no limit) under the owner's limits: refused, with the
/// message a submit gets, when it is over the maximum or unlimited while a maximum is set
/// (`mgpu_control update` by a non-root user).
pub fn check_time_limit_change(asked: Option<u64>, limits: &Limits) -> Result<(), String> {
    match (asked, limits.max_time_s) {
        (t, Some(max)) if t.is_none_or(|t| t > max) => Err(too_long(t, max)),
        _ => Ok(()),
    }
}

fn too_long(asked: Option<u64>, max: u64) -> String {
    use mgpu_core::timefmt::format_duration;
    format!(
        "job refused: its time limit {} is longer than the longest allowed per job, {} \
         (QOSMaxWallDurationPerJobLimit: the administrator's max_time); ask for {} or less",
        asked.map_or("UNLIMITED".into(), format_duration),
        format_duration(max),
        format_duration(max)
    )
}

/// A recorded job that the core refused after all (it cannot happen: the same GPUs were
/// checked before it was recorded) ends as FAILED, so that it is not restored at the next start.
fn record_refused(daemon: &Daemon, id: JobId, e: &impl std::fmt::Display) {
    tracing::error!(job = id, error = %e, "accepted job refused by the core");
    (daemon.launches.lock().unwrap_or_else(|p| p.into_inner())).release(id);
    daemon.store.ended(
        id,
        crate::store::Ending {
            state: mgpu_core::JobState::Failed,
            at: now_ms(),
            exit_code: None,
            signal: None,
            message: Some(format!("mgpu: refused: {e}")),
        },
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn invisible_characters_are_recognised() {
        for c in [
            '\u{202E}',
            '\u{202A}',
            '\u{2066}',
            '\u{2069}',
            '\u{200B}',
            '\u{200F}',
            '\u{FEFF}',
            '\u{2028}',
            '\u{E0041}',
            '\u{00AD}',
        ] {
            assert!(super::is_invisible(c), "U+{:04X}", c as u32);
        }
        for c in ['a', 'é', '中', '-', ' ', '\u{2010}', '\u{2070}', '😀'] {
            assert!(!super::is_invisible(c), "U+{:04X}", c as u32);
        }
    }

    /// A valid request to vary.
    fn request() -> mgpu_proto::SubmitRequest {
        mgpu_proto::SubmitRequest {
            name: None,
            gpus: 1,
            mem_mib: None,
            time_limit_s: None,
            command: vec!["true".into()],
            cwd: "/".into(),
            submit_dir: None,
            env: vec![],
            venv: mgpu_proto::Venv::Off,
            attach: false,
            umask: None,
            no_requeue: false,
            max_restarts: None,
            signal: None,
            nice: 0,
            array: None,
            array_limit: None,
            cpus: None,
            notify: None,
            stdin: false,
            pty: None,
            host_mem_mib: None,
            script: None,
            output: None,
            error: None,
            begin_at: None,
            dependency: None,
            hold: false,
        }
    }

    /// No `-t` gets the default (or the maximum); an explicit "no limit" (0) gets no default,
    /// and under a maximum is refused; a limit over the maximum is refused.
    #[test]
    fn time_limits_against_the_users_limits() {
        use super::{apply_time_limits, Limits};
        let limits = |default: Option<u64>, max: Option<u64>| Limits {
            default_time_s: default,
            max_time_s: max,
            ..Limits::default()
        };
        assert_eq!(
            apply_time_limits(None, &limits(Some(60), None)),
            Ok(Some(60))
        );
        assert_eq!(
            apply_time_limits(None, &limits(None, Some(90))),
            Ok(Some(90))
        );
        assert_eq!(
            apply_time_limits(Some(0), &limits(Some(60), None)),
            Ok(None)
        );
        assert!(apply_time_limits(Some(0), &limits(Some(60), Some(90)))
            .unwrap_err()
            .contains("UNLIMITED"));
        assert!(apply_time_limits(Some(91), &limits(None, Some(90))).is_err());
        assert_eq!(
            apply_time_limits(Some(90), &limits(None, Some(90))),
            Ok(Some(90))
        );
    }

    /// Found by fuzzing: a time limit near u64::MAX overflowed the core's deadline arithmetic
    /// (a panic in debug builds, a deadline in the past in release ones). It is refused.
    #[test]
    fn absurd_time_limits_are_refused() {
        let req = |t: Option<u64>, warn: Option<u64>| mgpu_proto::SubmitRequest {
            time_limit_s: t,
            signal: warn.map(|secs_before| mgpu_proto::WarnSignal {
                signal: 10,
                secs_before,
            }),
            ..request()
        };
        assert!(super::validate(&req(Some(3600), Some(60))).is_ok());
        assert!(super::validate(&req(Some(0), None)).is_ok());
        for (t, w) in [
            (Some(u64::MAX), None),
            (Some(u64::MAX / 1000), None),
            (None, Some(u64::MAX)),
        ] {
            let err = super::validate(&req(t, w)).unwrap_err();
            assert!(err.contains("366 days"), "{err}");
        }
    }

    /// Found by an attack review: what execve cannot pass on (a NUL, a name with '=') was
    /// accepted and failed the job at launch; a --begin near u64::MAX was kept and shown as a
    /// nonsense date. Each is refused at submit with the reason.
    #[test]
    fn what_could_never_launch_is_refused_at_submit() {
        let env = |k: &str, v: &str| mgpu_proto::SubmitRequest {
            env: vec![(k.into(), v.into())],
            ..request()
        };
        assert!(super::validate(&env("FOO", "a b=c")).is_ok());
        for bad in [
            env("FOO", "a\0b"),
            env("X=Y", "z"),
            env("", "z"),
            env("A\0", "z"),
        ] {
            let err = super::validate(&bad).unwrap_err();
            assert!(err.contains("invalid environment variable"), "{err}");
        }
        let cwd = mgpu_proto::SubmitRequest {
            cwd: "/tmp\0x".into(),
            ..request()
        };
        assert!(super::validate(&cwd).unwrap_err().contains("NUL"));
        let venv = mgpu_proto::SubmitRequest {
            venv: mgpu_proto::Venv::Dir("/v\0".into()),
            ..request()
        };
        assert!(super::validate(&venv).unwrap_err().contains("NUL"));
        let begin = |at: u64| mgpu_proto::SubmitRequest {
            begin_at: Some(at),
            ..request()
        };
        let script = |text: &str| mgpu_proto::SubmitRequest {
            script: Some(text.into()),
            ..request()
        };
        assert!(super::validate(&script("#!/bin/sh\necho a\rb\n")).is_ok());
        let err = super::validate(&script("#!/bin/sh\r\necho hi\r\n")).unwrap_err();
        assert!(
            err.contains("DOS line breaks") && err.contains("dos2unix"),
            "{err}"
        );
        assert!(super::validate(&begin(super::MAX_BEGIN_AT_MS)).is_ok());
        for at in [super::MAX_BEGIN_AT_MS + 1, u64::MAX] {
            let err = super::validate(&begin(at)).unwrap_err();
            assert!(err.contains("9999"), "{err}");
        }
    }
}
