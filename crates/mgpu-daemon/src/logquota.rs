//! What each user makes the daemon keep on disk: the books of job logs (who uses how much, and
//! what goes when a quota is passed) and of launch records ([`LaunchBook`]).
//!
//! Pure accounting (no file is touched here); the daemon carries out what it returns. Three
//! bounds: output kept per job (across all its runs: a requeued run continues its job's
//! budget), per user, and in all. A job's log counts for its owner from its first run until its
//! record is purged. When a new run starts or a log grows past a user's (or the total) quota,
//! the oldest logs of finished jobs (of that user; for the total, of anyone) are removed first;
//! their records stay. When unfinished logs alone pass a quota, the job whose log grew is
//! truncated: it keeps running, its further output is discarded, and its log says so.
//!
//! Each run is also given a budget up front (what its log may still grow by under all three
//! bounds, counting what finished logs could free), which its supervisor enforces by itself:
//! so a log stays bounded even while no daemon hears its output.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use mgpu_core::{JobId, Millis};

use crate::exec::Launch;
use crate::state::Daemon;

/// The bounds; `None` is no bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Output kept per job, all runs together.
    pub per_job: Option<u64>,
    pub per_user: Option<u64>,
    pub total: Option<u64>,
}

/// What the daemon must do after a change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Logs of finished jobs to remove (their records stay).
    pub remove: Vec<JobId>,
    /// Running jobs whose further output must be discarded, with the note for their log.
    pub truncate: Vec<(JobId, String)>,
}

/// A run's budget: what its log may still grow by, and the note for when it is used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub note: String,
}

#[derive(Debug, Clone, Copy)]
struct Active {
    uid: u32,
    size: u64,
    truncated: bool,
}

/// The books (see the module's documentation).
#[derive(Debug, Default)]
pub struct LogBook {
    quotas: Quotas,
    /// Logs of jobs not finished yet (running, or queued again after a run).
    active: HashMap<JobId, Active>,
    /// Logs of finished jobs: owner, size, and when the job ended.
    finished: HashMap<JobId, (u32, u64, Millis)>,
    /// Finished logs, oldest first: in all, and per user.
    oldest: BTreeSet<(Millis, JobId)>,
    oldest_of: HashMap<u32, BTreeSet<(Millis, JobId)>>,
    /// Bytes per user, and in all (finished and unfinished logs).
    used: HashMap<u32, u64>,
    total: u64,
    /// Bytes of unfinished logs per user, and in all.
    active_used: HashMap<u32, u64>,
    active_total: u64,
}

fn note(what: &str) -> String {
    format!("\nmgpu: this job's log reached {what}; further output is discarded (the job keeps running)\n")
}

impl LogBook {
    pub fn new(quotas: Quotas) -> Self {
        LogBook {
            quotas,
            ..Default::default()
        }
    }

    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Bytes of logs `uid` has, and in all.
    pub fn used(&self, uid: u32) -> (u64, u64) {
        (self.used.get(&uid).copied().unwrap_or(0), self.total)
    }

    fn add(&mut self, uid: u32, bytes: u64, active: bool) {
        *self.used.entry(uid).or_default() += bytes;
        self.total += bytes;
        if active {
            *self.active_used.entry(uid).or_default() += bytes;
            self.active_total += bytes;
        }
    }

    fn sub(&mut self, uid: u32, bytes: u64, active: bool) {
        let dec = |m: &mut HashMap<u32, u64>| {
            if let Some(v) = m.get_mut(&uid) {
                *v = v.saturating_sub(bytes);
                if *v == 0 {
                    m.remove(&uid);
                }
            }
        };
        dec(&mut self.used);
        self.total = self.total.saturating_sub(bytes);
        if active {
            dec(&mut self.active_used);
            self.active_total = self.active_total.saturating_sub(bytes);
        }
    }

    /// A log of a finished job found at start-up (or one that just ended).
    pub fn restore_finished(&mut self, id: JobId, uid: u32, size: u64, ended_at: Millis) {
        self.forget(id);
        self.finished.insert(id, (uid, size, ended_at));
        self.oldest.insert((ended_at, id));
        self.oldest_of
            .entry(uid)
            .or_default()
            .insert((ended_at, id));
        self.add(uid, size, false);
    }

    /// A log of an unfinished job found at start-up.
    pub fn restore_active(&mut self, id: JobId, uid: u32, size: u64) {
        self.forget(id);
        self.active.insert(
            id,
            Active {
                uid,
                size,
                truncated: false,
            },
        );
        self.add(uid, size, true);
    }

    /// A run of `id` starts with its log `log_len` bytes long (earlier runs' output and the
    /// run's mark). Returns the run's budget, and what must go to make room.
    pub fn run_starts(&mut self, id: JobId, uid: u32, log_len: u64) -> (Budget, Effects) {
        match self.active.get(&id) {
            Some(a) if a.uid == uid => {}
            _ => self.restore_active(id, uid, 0),
        }
        let a = self.active.get_mut(&id).expect("just added");
        a.truncated = false;
        // The log as it is now (a first run starts it afresh).
        if a.size > log_len {
            let less = a.size - log_len;
            a.size = log_len;
            self.sub(uid, less, true);
        }
        let effects = self.grew(id, log_len);
        let mut budget = Budget {
            bytes: u64::MAX,
            note: String::new(),
        };
        let mut bound = |limit: Option<u64>, used: u64, what: &str| {
            if let Some(limit) = limit {
                let left = limit.saturating_sub(used);
                if left < budget.bytes {
                    budget = Budget {
                        bytes: left,
                        note: note(what),
                    };
                }
            }
        };
        let size = self.active.get(&id).map_or(0, |a| a.size);
        bound(
            self.quotas.per_job,
            size,
            "the server's log size limit per job",
        );
        let mine = self.active_used.get(&uid).copied().unwrap_or(0);
        bound(self.quotas.per_user, mine, "its owner's log quota");
        bound(
            self.quotas.total,
            self.active_total,
            "the server's total log quota",
        );
        (budget, effects)
    }

    /// The log of unfinished job `id` is now `size` bytes long.
    pub fn grew(&mut self, id: JobId, size: u64) -> Effects {
        let mut effects = Effects::default();
        let Some(a) = self.active.get_mut(&id) else {
            return effects;
        };
        if size <= a.size {
            return effects;
        }
        let (uid, more) = (a.uid, size - a.size);
        a.size = size;
        self.add(uid, more, true);
        if let Some(quota) = self.quotas.per_user {
            while self.used.get(&uid).copied().unwrap_or(0) > quota {
                let Some(&(_, old)) = self.oldest_of.get(&uid).and_then(|s| s.first()) else {
                    break;
                };
                self.forget(old);
                effects.remove.push(old);
            }
            if self.used.get(&uid).copied().unwrap_or(0) > quota {
                self.truncate(id, note("its owner's log quota"), &mut effects);
            }
        }
        if let Some(quota) = self.quotas.total {
            while self.total > quota {
                let Some(&(_, old)) = self.oldest.first() else {
                    break;
                };
                self.forget(old);
                effects.remove.push(old);
            }
            if self.total > quota {
                self.truncate(id, note("the server's total log quota"), &mut effects);
            }
        }
        effects
    }

    fn truncate(&mut self, id: JobId, note: String, effects: &mut Effects) {
        if let Some(a) = self.active.get_mut(&id) {
            if !a.truncated {
                a.truncated = true;
                effects.truncate.push((id, note));
            }
        }
    }

    /// Job `id` ended at `at`: its log becomes removable (oldest first).
    pub fn finished(&mut self, id: JobId, at: Millis) {
        if let Some(a) = self.active.get(&id).copied() {
            self.restore_finished(id, a.uid, a.size, at);
        }
    }

    /// The log of `id` is gone (its record was purged, or it was removed): out of the books.
    pub fn forget(&mut self, id: JobId) {
        if let Some(a) = self.active.remove(&id) {
            self.sub(a.uid, a.size, true);
        }
        if let Some((uid, size, at)) = self.finished.remove(&id) {
            self.oldest.remove(&(at, id));
            if let Some(s) = self.oldest_of.get_mut(&uid) {
                s.remove(&(at, id));
                if s.is_empty() {
                    self.oldest_of.remove(&uid);
                }
            }
            self.sub(uid, size, false);
        }
    }

    /// Jobs with logs in the books (for tests and start-up checks).
    pub fn known(&self) -> HashSet<JobId> {
        self.active
            .keys()
            .chain(self.finished.keys())
            .copied()
            .collect()
    }
}

/// Parses a size: bytes, with an optional K, M, G or T suffix (powers of 1024, an optional
/// `iB`/`B`), or a percentage of `fs_bytes` (the log directory's file system). `0` is no limit.
pub fn parse_size(s: &str, fs_bytes: u64) -> Result<Option<u64>, String> {
    let t = s.trim();
    let bad = || {
        format!("invalid size '{s}': use bytes with an optional K, M, G or T suffix, or a percentage like 10%")
    };
    let bytes = if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&p) {
            return Err(bad());
        }
        (fs_bytes as f64 * p / 100.0) as u64
    } else {
        let upper = t.to_ascii_uppercase();
        let u = upper
            .strip_suffix("IB")
            .or_else(|| upper.strip_suffix('B'))
            .unwrap_or(&upper);
        let (num, mult) = match u.chars().last() {
            Some('K') => (&u[..u.len() - 1], 1u64 << 10),
            Some('M') => (&u[..u.len() - 1], 1 << 20),
            Some('G') => (&u[..u.len() - 1], 1 << 30),
            Some('T') => (&u[..u.len() - 1], 1 << 40),
            _ => (u, 1),
        };
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        n.checked_mul(mult).ok_or_else(bad)?
    };
    Ok((bytes > 0).then_some(bytes))
}

/// Launch records (argv, working directory, environment) of one user's unfinished jobs, as a
/// bound on what one user can make the daemon store: each submission is charged its size
/// (environment included, even where the store keeps one copy for many jobs: an upper bound)
/// before it is recorded, and the charge is released when the job ends (the store then keeps
/// only the job's record and a short command). A job array is charged once, until its last
/// task ends.
/// The same bound holds over all users' records together (`total_limit`), so that many
/// users at their own bounds cannot fill the state file system either.
#[derive(Debug, Default)]
pub struct LaunchBook {
    limit: Option<u64>,
    total_limit: Option<u64>,
    total: u64,
    /// Charges: by job id, or by the array's id for job arrays: (owner, bytes, jobs holding it).
    charges: HashMap<JobId, (u32, u64, u32)>,
    /// Array tasks: the charge they hold.
    task_charge: HashMap<JobId, JobId>,
    used: HashMap<u32, u64>,
}

impl LaunchBook {
    pub fn new(limit: Option<u64>, total_limit: Option<u64>) -> Self {
        LaunchBook {
            limit,
            total_limit,
            ..Default::default()
        }
    }

    /// Charges `uid` `bytes` for jobs `first..first + n` (one launch record; `array`: a job
    /// array's tasks), unless that passes the bound.
    pub fn charge(
        &mut self,
        uid: u32,
        bytes: u64,
        first: JobId,
        n: u32,
        array: bool,
    ) -> Result<(), String> {
        let used = self.used.get(&uid).copied().unwrap_or(0);
        if let Some(limit) = self.limit {
            if used.saturating_add(bytes) > limit {
                return Err(format!(
                    "your waiting jobs' commands and environments take {} MiB; at most {} MiB \
                     may wait per user (the server's --max-launch-data-per-user)",
                    used >> 20,
                    limit >> 20
                ));
            }
        }
        if let Some(limit) = self.total_limit {
            if self.total.saturating_add(bytes) > limit {
                return Err(format!(
                    "the server's waiting jobs' commands and environments take {} MiB in all, \
                     at most {} MiB (the server's --max-launch-data); try again once jobs have \
                     ended, or ask your administrator",
                    self.total >> 20,
                    limit >> 20
                ));
            }
        }
        self.add(uid, bytes, first, n, array);
        Ok(())
    }

    /// A charge found at start-up (never refused).
    pub fn restore(&mut self, uid: u32, bytes: u64, key: JobId, tasks: &[JobId]) {
        match self.charges.get_mut(&key) {
            Some(c) => c.2 += tasks.len() as u32,
            None => {
                self.charges.insert(key, (uid, bytes, tasks.len() as u32));
                *self.used.entry(uid).or_default() += bytes;
                self.total = self.total.saturating_add(bytes);
            }
        }
        for &t in tasks {
            if t != key || tasks.len() > 1 {
                self.task_charge.insert(t, key);
            }
        }
    }

    fn add(&mut self, uid: u32, bytes: u64, first: JobId, n: u32, array: bool) {
        let tasks: Vec<JobId> = (first..first + JobId::from(n)).collect();
        if array {
            self.charges.insert(first, (uid, bytes, n));
            *self.used.entry(uid).or_default() += bytes;
            self.total = self.total.saturating_add(bytes);
            for t in tasks {
                self.task_charge.insert(t, first);
            }
        } else {
            self.restore(uid, bytes, first, &tasks);
        }
    }

    /// Job `id` ended (or was never recorded): its share of its charge is released.
    pub fn release(&mut self, id: JobId) {
        let key = self.task_charge.remove(&id).unwrap_or(id);
        let Some(c) = self.charges.get_mut(&key) else {
            return;
        };
        c.2 = c.2.saturating_sub(1);
        if c.2 == 0 {
            let (uid, bytes, _) = self.charges.remove(&key).expect("present");
            self.total = self.total.saturating_sub(bytes);
            if let Some(u) = self.used.get_mut(&uid) {
                *u = u.saturating_sub(bytes);
                if *u == 0 {
                    self.used.remove(&uid);
                }
            }
        }
    }

    /// Bytes charged to `uid`.
    pub fn used(&self, uid: u32) -> u64 {
        self.used.get(&uid).copied().unwrap_or(0)
    }
}

/// What a launch record is charged: about its size as stored.
pub fn launch_bytes(spec: &crate::exec::LaunchSpec) -> u64 {
    // Its size as JSON, as the store keeps it: every field counts (the --notify command and
    // mail types too), and so does escaping (a control character takes six bytes there).
    // Found by an attack review: the notification was not counted at all, and a submission
    // of many mail types or escaped paths stored far more than it was charged.
    let json = serde_json::to_vec(spec).map_or(0, |v| v.len());
    (json + 64) as u64
}

// The daemon's side: carrying out the books' decisions on the log files.

/// What a log removed for a quota says instead (what `mgpu_log` shows).
fn removed_note(id: JobId) -> String {
    format!(
        "mgpu: the log of job {id} was removed to keep its owner within the server's log quotas \
         (oldest logs of finished jobs go first); its record stays (mgpu_acct -j {id})\n"
    )
}

/// Replaces the logs of `ids` by a note that says they were removed: written aside, then
/// renamed over the log (a reader never sees it empty). Blocking.
pub fn remove_logs(log_path: &dyn Fn(JobId) -> PathBuf, ids: &[JobId]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    for &id in ids {
        let path = log_path(id);
        let aside = path.with_extension("removed");
        let _ = std::fs::remove_file(&aside);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&aside)
            .and_then(|mut f| f.write_all(removed_note(id).as_bytes()))
            .and_then(|()| std::fs::rename(&aside, &path));
        if let Err(e) = written {
            tracing::warn!(job = id, error = %e, "cannot remove a log for the log quota");
            let _ = std::fs::remove_file(&path);
        }
    }
    if !ids.is_empty() {
        tracing::info!(jobs = ?ids, "removed logs of finished jobs for the log quotas");
    }
}

/// Fills the books at start-up: every recorded job (owner, end if finished) whose log exists.
pub fn restore(
    book: &mut LogBook,
    jobs: &[(JobId, u32, Option<Millis>)],
    log_path: &dyn Fn(JobId) -> PathBuf,
) {
    for &(id, uid, ended) in jobs {
        let Ok(meta) = std::fs::symlink_metadata(log_path(id)) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        match ended {
            Some(at) => book.restore_finished(id, uid, meta.len(), at),
            None => book.restore_active(id, uid, meta.len()),
        }
    }
}

impl Daemon {
    /// A run of `launch.job` starts with its log `log_len` bytes long: gives it its budget (in
    /// the launch record, for its supervisor) and makes room. Blocking.
    pub fn log_run_starts(&self, launch: &mut Launch, log_len: u64) {
        let (budget, effects) = self
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .run_starts(launch.job, launch.uid, log_len);
        launch.max_log_bytes = (budget.bytes != u64::MAX).then_some(budget.bytes);
        launch.log_note = budget.note;
        remove_logs(&|id| self.log_path(id), &effects.remove);
    }

    /// The log of running job `id` is `size` bytes long now; returns the jobs whose output
    /// must be discarded from now on (with their notes). Logs to remove go on a blocking thread.
    pub fn log_grew(self: &std::sync::Arc<Self>, id: JobId, size: u64) -> Vec<(JobId, String)> {
        let effects = self
            .logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .grew(id, size);
        if !effects.remove.is_empty() {
            let daemon = self.clone();
            tokio::task::spawn_blocking(move || {
                remove_logs(&|id| daemon.log_path(id), &effects.remove)
            });
        }
        effects.truncate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(per_job: u64, per_user: u64, total: u64) -> LogBook {
        LogBook::new(Quotas {
            per_job: Some(per_job),
            per_user: Some(per_user),
            total: Some(total),
        })
    }

    /// A batch script's copy counts against its owner's bound on stored launch records.
    #[test]
    fn a_script_counts_in_the_launch_bytes() {
        let plain = crate::exec::LaunchSpec {
            command: vec!["job.sh".into()],
            ..Default::default()
        };
        let with_script = crate::exec::LaunchSpec {
            script: Some("x".repeat(100_000)),
            output: Some("out-%j".into()),
            ..plain.clone()
        };
        assert!(super::launch_bytes(&with_script) >= super::launch_bytes(&plain) + 100_006);
        // What the store keeps counts, escaped as it is kept, the notification too.
        let escaped = crate::exec::LaunchSpec {
            cwd: "\u{1}".repeat(1000),
            notify: Some(mgpu_proto::Notify {
                command: Some("x".repeat(4000)),
                ..Default::default()
            }),
            ..plain.clone()
        };
        assert!(super::launch_bytes(&escaped) >= super::launch_bytes(&plain) + 6000 + 4000);
    }

    #[test]
    fn oldest_finished_logs_of_the_user_go_first() {
        let mut b = book(1000, 100, 10_000);
        b.restore_finished(1, 7, 30, 10);
        b.restore_finished(2, 7, 30, 5); // ended earlier
        b.restore_finished(3, 7, 30, 20);
        b.restore_finished(4, 8, 90, 1); // another user's: never touched by 7's quota
        let (budget, fx) = b.run_starts(5, 7, 0);
        assert_eq!(fx, Effects::default());
        assert_eq!(budget.bytes, 100, "finished logs can make room");
        assert!(budget.note.contains("owner's log quota"));
        assert_eq!(b.grew(5, 5), Effects::default());
        assert_eq!(b.used(7), (95, 185));
        assert_eq!(b.grew(5, 20).remove, [2]);
        assert_eq!(b.grew(5, 21).remove, Vec::<JobId>::new());
        assert_eq!(b.grew(5, 50).remove, [1]);
        assert_eq!(b.grew(5, 75).remove, [3]);
        assert_eq!(b.used(7).0, 75);
        // Only the running log is left: over the quota it is truncated, once.
        let fx = b.grew(5, 101);
        assert_eq!(fx.remove, Vec::<JobId>::new());
        assert_eq!(fx.truncate.len(), 1);
        assert_eq!(fx.truncate[0].0, 5);
        assert!(fx.truncate[0].1.contains("keeps running"));
        assert_eq!(b.grew(5, 150), Effects::default());
        assert_eq!(b.known(), HashSet::from([4, 5]));
        assert_eq!(b.used(8).0, 90);
    }

    #[test]
    fn the_total_quota_takes_the_oldest_of_anyone() {
        let mut b = book(1000, 1000, 100);
        b.restore_finished(1, 8, 40, 1);
        b.restore_finished(2, 7, 40, 2);
        let (budget, _) = b.run_starts(3, 7, 0);
        assert_eq!(budget.bytes, 100);
        assert!(budget.note.contains("total log quota"));
        assert_eq!(b.grew(3, 30).remove, [1]);
        assert_eq!(b.grew(3, 70).remove, [2]);
        let fx = b.grew(3, 101);
        assert!(fx.truncate[0].1.contains("total"));
    }

    #[test]
    fn a_requeued_run_continues_its_jobs_budget() {
        let mut b = book(100, 1000, 10_000);
        let (budget, _) = b.run_starts(1, 7, 0);
        assert_eq!(budget.bytes, 100);
        assert!(budget.note.contains("per job"));
        b.grew(1, 60);
        // Requeued: the log keeps its 60 bytes (and the next run's mark).
        let (budget, _) = b.run_starts(1, 7, 70);
        assert_eq!(budget.bytes, 30);
        let (budget, _) = b.run_starts(1, 7, 120);
        assert_eq!(budget.bytes, 0);
        // A log found longer than it is now (a first run starts it afresh) counts as it is.
        let (budget, _) = b.run_starts(1, 7, 10);
        assert_eq!(budget.bytes, 90);
        assert_eq!(b.used(7).0, 10);
    }

    #[test]
    fn running_logs_of_a_user_share_the_quota() {
        let mut b = book(1000, 100, 10_000);
        b.run_starts(1, 7, 0);
        b.grew(1, 60);
        let (budget, _) = b.run_starts(2, 7, 0);
        assert_eq!(budget.bytes, 40);
        // Job 1 keeps growing; job 2 pushes the user over: job 2 is the one truncated.
        b.grew(1, 90);
        let fx = b.grew(2, 20);
        assert_eq!(fx.truncate.iter().map(|t| t.0).collect::<Vec<_>>(), [2]);
        // Finishing and purging take logs out of the books.
        b.finished(1, 50);
        assert_eq!(b.used(7).0, 110);
        b.forget(1);
        b.forget(2);
        assert_eq!(b.used(7), (0, 0));
        assert!(b.known().is_empty());
    }

    #[test]
    fn no_quotas_no_effects() {
        let mut b = LogBook::new(Quotas::default());
        b.restore_finished(1, 7, u64::MAX / 4, 1);
        let (budget, fx) = b.run_starts(2, 7, 0);
        assert_eq!(budget.bytes, u64::MAX);
        assert_eq!(b.grew(2, u64::MAX / 4), fx);
    }

    #[test]
    fn launch_records_are_bounded_in_all_too() {
        let mut b = LaunchBook::new(Some(1000), Some(1500));
        b.charge(7, 900, 1, 1, false).unwrap();
        b.charge(8, 500, 2, 1, false).unwrap();
        let err = b.charge(9, 200, 3, 1, false).unwrap_err();
        assert!(err.contains("--max-launch-data)"), "{err}");
        b.charge(9, 100, 3, 1, false).unwrap();
        // What ends frees room for everyone.
        b.release(1);
        b.charge(9, 900, 4, 1, false).unwrap();
        let mut r = LaunchBook::new(None, Some(100));
        r.restore(7, 300, 10, &[11]);
        assert!(r.charge(8, 1, 20, 1, false).is_err());
        r.release(11);
        r.charge(8, 100, 20, 1, false).unwrap();
    }

    #[test]
    fn launch_records_are_bounded_per_user_until_their_jobs_end() {
        let mut b = LaunchBook::new(Some(1000), None);
        b.charge(7, 600, 1, 1, false).unwrap();
        assert!(b
            .charge(7, 500, 2, 1, false)
            .unwrap_err()
            .contains("--max-launch-data-per-user"));
        b.charge(8, 900, 3, 1, false).unwrap(); // another user's bound is her own
                                                // A job array is charged once for all its tasks, until the last one ends.
        b.charge(7, 300, 10, 3, true).unwrap();
        assert_eq!(b.used(7), 900);
        b.release(10);
        b.release(12);
        assert_eq!(b.used(7), 900);
        b.release(11);
        assert_eq!(b.used(7), 600);
        b.release(1);
        b.release(1); // twice: nothing more
        assert_eq!(b.used(7), 0);
        b.charge(7, 1000, 20, 1, false).unwrap();
        // Restored at start-up: an array's tasks share its charge.
        let mut r = LaunchBook::new(Some(10), None);
        r.restore(7, 300, 10, &[11]);
        r.restore(7, 300, 10, &[12]);
        r.restore(7, 50, 13, &[13]);
        assert_eq!(r.used(7), 350);
        r.release(11);
        r.release(13);
        assert_eq!(r.used(7), 300);
        r.release(12);
        assert_eq!(r.used(7), 0);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("0", 0), Ok(None));
        assert_eq!(parse_size("1234", 0), Ok(Some(1234)));
        assert_eq!(parse_size("64K", 0), Ok(Some(64 << 10)));
        assert_eq!(parse_size("2GiB", 0), Ok(Some(2 << 30)));
        assert_eq!(parse_size("3 m", 0), Ok(Some(3 << 20)));
        assert_eq!(parse_size("1T", 0), Ok(Some(1 << 40)));
        assert_eq!(parse_size("10%", 1000), Ok(Some(100)));
        assert!(parse_size("-1", 0).is_err());
        assert!(parse_size("150%", 10).is_err());
        assert!(parse_size("lots", 0).is_err());
        assert!(parse_size("99999999999T", 0).is_err());
    }
}
