//! Telling a job's owner that it began or ended: `mgpu_srun --notify CMD` runs `sh -c CMD`
//! when the job ends, and `--mail-type`/`--mail-user` send mail through the local `sendmail`.
//!
//! Both run as the job's owner, never as root: the process is forked with the owner's uid,
//! gid and groups, in a session of its own, its working directory entered with the owner's
//! rights (the job's, else their home), a small clean environment, stdin `/dev/null` (or the
//! mail), output discarded, OOM score adjustment 0. The daemon never waits for one with its
//! lock held: a background task keeps a bounded queue per user, serves users round robin,
//! starts at most [`MAX_AT_ONCE`] at a time ([`MAX_PER_USER`] of one user's) and kills each
//! one's cgroup (else process group) after [`TIME_LIMIT`] (or the server's
//! `--notify-time-limit`). What to run is part of the job's durable launch record, so it survives a
//! restart; a notification due while the daemon was down is not sent (best effort, like
//! Slurm's mail).

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mgpu_core::{JobId, JobState};
use mgpu_proto::{JobOutcome, Notify};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::state::Daemon;
use crate::users::Account;

/// How long a notification command or sendmail may run before it is killed, unless the
/// server is told otherwise (`--notify-time-limit`).
pub const TIME_LIMIT: Duration = Duration::from_secs(60);
/// Notifications running at once, in all.
pub const MAX_AT_ONCE: usize = 16;
/// Notifications of one user running at once.
pub const MAX_PER_USER: usize = 2;
/// Notifications of one user waiting to run; beyond it the oldest is dropped (logged).
pub const MAX_QUEUED_PER_USER: usize = 1000;
/// Where sendmail is looked for unless the server is told otherwise.
pub const DEFAULT_SENDMAIL: &str = "/usr/sbin/sendmail";

enum Event {
    Began(JobId),
    Ended(JobOutcome),
}

/// The daemon's handle: events go to a background task (started by [`Notifier::start`]).
#[derive(Default)]
pub struct Notifier {
    tx: Mutex<Option<mpsc::UnboundedSender<Event>>>,
    sendmail: OnceLock<PathBuf>,
    time_limit: OnceLock<Duration>,
}

impl Notifier {
    /// Starts the task that runs notifications; `sendmail` is the mail program's path, and
    /// each notification is killed after `time_limit`.
    pub fn start(&self, daemon: Arc<Daemon>, sendmail: PathBuf, time_limit: Duration) {
        let _ = self.sendmail.set(sendmail);
        let _ = self.time_limit.set(time_limit);
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        tokio::spawn(run(daemon, rx));
    }

    /// The sendmail program, where mail can be sent.
    pub fn sendmail(&self) -> &Path {
        self.sendmail
            .get()
            .map(PathBuf::as_path)
            .unwrap_or(Path::new(DEFAULT_SENDMAIL))
    }

    fn send(&self, e: Event) {
        if let Some(tx) = &*self.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(e);
        }
    }

    /// The job's first run started.
    pub fn began(&self, job: JobId) {
        self.send(Event::Began(job));
    }

    /// The job ended (recorded).
    pub fn ended(&self, outcome: &JobOutcome) {
        self.send(Event::Ended(outcome.clone()));
    }
}

/// Checks a submit's notification request: the job's name filled in, mail refused at once
/// when this machine has no sendmail.
pub fn check(
    daemon: &Daemon,
    notify: Option<Notify>,
    name: &str,
) -> Result<Option<Notify>, String> {
    let Some(mut n) = notify else {
        return Ok(None);
    };
    n.validate()?;
    if n.command.is_none() && n.mail_user.is_none() {
        return Ok(None);
    }
    if n.mail_user.is_some() {
        let sendmail = daemon.notifier.sendmail();
        if !sendmail.is_file() {
            return Err(format!(
                "--mail-type: this machine cannot send mail (no {}); use --notify CMD to run a command of yours when the job ends",
                sendmail.display()
            ));
        }
    }
    n.job_name = name.to_string();
    Ok(Some(n))
}

/// The notifications waiting to run: a bounded queue per user, served round robin, at most
/// [`MAX_PER_USER`] of one user's running at once and [`MAX_AT_ONCE`] in all. One user's
/// thousands of slow notifications never hold another user's back by more than a turn.
#[derive(Default)]
struct Queues {
    waiting: HashMap<u32, VecDeque<(Event, Job)>>,
    /// Users with waiting notifications, in turn order.
    turns: VecDeque<u32>,
    running: HashMap<u32, usize>,
    total: usize,
}

impl Queues {
    fn push(&mut self, uid: u32, item: (Event, Job)) {
        let q = self.waiting.entry(uid).or_default();
        if q.is_empty() {
            self.turns.push_back(uid);
        }
        q.push_back(item);
        if q.len() > MAX_QUEUED_PER_USER {
            let (dropped, _) = q.pop_front().expect("over the bound");
            tracing::warn!(
                uid,
                job = dropped.job(),
                "job notification dropped: its user has {MAX_QUEUED_PER_USER} waiting to run"
            );
        }
    }

    /// The next notification to start, if a slot is free: the first user in turn order below
    /// their own cap, who then goes to the end of the line.
    fn next(&mut self) -> Option<(u32, Event, Job)> {
        if self.total >= MAX_AT_ONCE {
            return None;
        }
        for _ in 0..self.turns.len() {
            let uid = self.turns.pop_front()?;
            let running = self.running.get(&uid).copied().unwrap_or(0);
            if running >= MAX_PER_USER {
                self.turns.push_back(uid);
                continue;
            }
            let q = self.waiting.get_mut(&uid).expect("a user in turn waits");
            let (event, job) = q.pop_front().expect("a user in turn waits");
            if q.is_empty() {
                self.waiting.remove(&uid);
            } else {
                self.turns.push_back(uid);
            }
            *self.running.entry(uid).or_default() += 1;
            self.total += 1;
            return Some((uid, event, job));
        }
        None
    }

    fn done(&mut self, uid: u32) {
        self.total -= 1;
        if let Some(n) = self.running.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&uid);
            }
        }
    }
}

impl Event {
    fn job(&self) -> JobId {
        match self {
            Event::Began(id) => *id,
            Event::Ended(o) => o.job,
        }
    }
}

async fn run(daemon: Arc<Daemon>, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut queues = Queues::default();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u32>();
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { return };
                // What to run and for whom, from the store (off the lock; jobs without a
                // notification end here).
                let d = daemon.clone();
                let id = event.job();
                match tokio::task::spawn_blocking(move || load(&d, id)).await {
                    Ok(Ok(Some(job))) => queues.push(job.account.uid, (event, job)),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::warn!(job = id, error = %e, "job notification failed"),
                    Err(e) => tracing::warn!(job = id, error = %e, "job notification failed"),
                }
            }
            Some(uid) = done_rx.recv() => queues.done(uid),
        }
        while let Some((uid, event, job)) = queues.next() {
            let daemon = daemon.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                if let Err(e) = deliver(&daemon, event, job).await {
                    tracing::warn!(error = %e, "job notification failed");
                }
                let _ = done.send(uid);
            });
        }
    }
}

/// What one notification needs, read from the store off the daemon's lock.
struct Job {
    notify: Notify,
    cwd: String,
    umask: Option<u32>,
    account: Account,
    /// A login's limits (as a job's run gets them), not the daemon's raised ones.
    rlimits: Vec<crate::userlimits::Rlimit>,
}

fn load(daemon: &Daemon, id: JobId) -> anyhow::Result<Option<Job>> {
    let spec = daemon.store.launch_spec(id)?;
    let Some(notify) = spec.notify else {
        return Ok(None);
    };
    let uid = if daemon.settings.multi_user {
        match daemon.store.summary(id)? {
            Some(s) => s.uid,
            None => return Ok(None),
        }
    } else {
        daemon.settings.server_uid
    };
    let account = crate::users::account(uid)?;
    let settings = &daemon.settings;
    let rlimits = crate::userlimits::for_run(
        settings.multi_user,
        &settings.limits_conf_dir,
        Some(&account),
    );
    Ok(Some(Job {
        notify,
        cwd: spec.cwd,
        umask: spec.umask,
        account,
        rlimits,
    }))
}

async fn deliver(daemon: &Arc<Daemon>, event: Event, job: Job) -> anyhow::Result<()> {
    let id = event.job();
    let n = &job.notify;
    let (state, code) = match &event {
        Event::Began(_) => (JobState::Running, None),
        Event::Ended(o) => (o.state, Some(o.shell_code())),
    };
    let mut env = vec![
        ("MGPU_JOB_ID".to_string(), id.to_string()),
        ("MGPU_JOB_STATE".into(), state.as_str().to_string()),
        (
            "MGPU_JOB_EXIT_CODE".into(),
            code.map(|c| c.to_string()).unwrap_or_default(),
        ),
        ("MGPU_JOB_NAME".into(), n.job_name.clone()),
    ];
    if let (Some(command), Event::Ended(_)) = (&n.command, &event) {
        env.push(("MGPU_NOTIFY_EVENT".into(), "END".into()));
        let argv = ["-c".to_string(), command.clone()];
        run_as(daemon, id, &job, Path::new("/bin/sh"), &argv, &env, None).await?;
    }
    if let Some(addr) = &n.mail_user {
        let (kind, wanted) = match &event {
            Event::Began(_) => ("Began", n.mail_types.iter().any(|t| t == "BEGIN")),
            Event::Ended(o) => (
                if o.state == JobState::Completed {
                    "Ended"
                } else {
                    "Failed"
                },
                n.mail_types.iter().any(|t| t == "END")
                    || (o.state != JobState::Completed && n.mail_types.iter().any(|t| t == "FAIL")),
            ),
        };
        if wanted {
            let name: String = n
                .job_name
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let subject = match code {
                Some(c) => format!(
                    "mgpu Job_id={id} Name={name} {kind}, {}, ExitCode {c}",
                    state.as_str()
                ),
                None => format!("mgpu Job_id={id} Name={name} {kind}"),
            };
            let message = format!(
                "To: {addr}\nSubject: {subject}\n\n{subject}\n\nmgpu_acct -j {id} shows the job; mgpu_log {id} its output.\n"
            );
            let argv = ["-oi".to_string(), "--".to_string(), addr.clone()];
            let sendmail = daemon.notifier.sendmail().to_path_buf();
            run_as(daemon, id, &job, &sendmail, &argv, &env, Some(message)).await?;
        }
    }
    Ok(())
}

/// Runs `program argv` as the job's owner (see the module's notes), waits for it at most
/// [`TIME_LIMIT`], then kills it: its cgroup (a job cgroup of its own, where the machine
/// offers one: descendants that left its session go too; anything still there when it ends is
/// killed then), else its process group.
#[allow(clippy::too_many_arguments)]
async fn run_as(
    daemon: &Daemon,
    id: JobId,
    job: &Job,
    program: &Path,
    argv: &[String],
    env: &[(String, String)],
    stdin: Option<String>,
) -> anyhow::Result<()> {
    let a = &job.account;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(argv)
        .env_clear()
        .env("PATH", crate::launcher::SUPERVISOR_PATH)
        .env("HOME", &a.home)
        .env("USER", &a.name)
        .env("LOGNAME", &a.name)
        .env("SHELL", &a.shell)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let switch = daemon.settings.multi_user;
    let (uid, gid) = (a.uid, a.gid);
    let groups: Vec<libc::gid_t> = a.groups.clone();
    let cwd = CString::new(job.cwd.as_bytes()).ok();
    let home = CString::new(a.home.as_os_str().as_bytes()).ok();
    // The submitter's umask, as the job had it.
    let umask = job.umask.unwrap_or(0o022) as libc::mode_t & 0o777;
    let rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)> = (job.rlimits.iter())
        .map(|r| {
            let limit = libc::rlimit {
                rlim_cur: r.soft as libc::rlim_t,
                rlim_max: r.hard as libc::rlim_t,
            };
            (r.resource as libc::__rlimit_resource_t, limit)
        })
        .collect();
    // A cgroup of its own, even while another notification of the same job (its BEGIN mail)
    // still runs, with the jobs' process cap.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tag = format!(
        "{id}n{}",
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    // Below its owner's parent: it counts against the owner's process bound like a job.
    let limits = crate::cgroup::Limits {
        pids_max: daemon.settings.job_limits.pids_max,
        user_pids_max: daemon.settings.job_limits.user_pids_max,
        ..Default::default()
    };
    let cgroup = tokio::task::spawn_blocking(move || {
        crate::cgroup::JobCgroup::create_tagged(&tag, uid, &limits)
    })
    .await
    .ok()
    .and_then(|r| r.ok())
    .flatten()
    .map(Arc::new);
    // Every hierarchy's cgroup, the v1 pids one included: joined before the exec, so that
    // all the command starts is held to the pids bounds (found by an attack review: a
    // notification joined only the v2 cgroup, which has no pids controller on a hybrid
    // machine, and forked 300 processes past --user-pids-max 64). The command itself joins
    // after its fork: one process per notification past the bound, at most MAX_AT_ONCE.
    let joins: Vec<CString> = cgroup.as_ref().map_or_else(Vec::new, |c| {
        c.v2_procs
            .iter()
            .cloned()
            .chain(c.v1_tasks.iter().cloned())
            .collect()
    });
    // SAFETY: only async-signal-safe system calls between fork and exec, on data prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // In its cgroup (as root, before the switch), so that the time limit kills every
            // descendant.
            for p in &joins {
                crate::cgroup::enter(p);
            }
            // The daemon shields itself from the OOM killer; the command must not inherit
            // that (as for jobs, exec.rs).
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            libc::umask(umask);
            // A login's limits (the daemon raised its own open-files limit), set while hard
            // limits may still be raised.
            for (resource, limit) in &rlimits {
                if libc::setrlimit(*resource, limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if switch {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getuid() != uid || libc::geteuid() != uid {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
            }
            // Entered with the owner's rights: the job's directory, else their home, else /.
            let entered = cwd.as_ref().is_some_and(|c| libc::chdir(c.as_ptr()) == 0)
                || home.as_ref().is_some_and(|h| libc::chdir(h.as_ptr()) == 0);
            if !entered {
                libc::chdir(c"/".as_ptr());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = cgroup {
                let _ =
                    tokio::task::spawn_blocking(move || cg.remove_within(Duration::from_secs(1)))
                        .await;
            }
            return Err(e.into());
        }
    };
    let pid = child.id().unwrap_or(0) as i32;
    let work = async {
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        child.wait().await
    };
    let limit = daemon
        .notifier
        .time_limit
        .get()
        .copied()
        .unwrap_or(TIME_LIMIT);
    match tokio::time::timeout(limit, work).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                tracing::info!(program = %program.display(), ?status, "job notification exited with a failure");
            }
        }
        Err(_) => {
            tracing::warn!(program = %program.display(), "job notification ran over its time limit; killed");
            if let Some(cg) = &cgroup {
                cg.kill();
            }
            if pid > 0 {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
        }
    }
    // What it left running goes with its cgroup (a bounded wait, off the runtime's thread).
    if let Some(cg) = cgroup {
        let _ = tokio::task::spawn_blocking(move || cg.remove_within(Duration::from_secs(5))).await;
    }
    Ok(())
}
