//! Time limits and context switching.
//!
//! A running job's *slice* is its own `--time-limit` capped by the server's `--max-job-time`.
//! Past its slice a job is context-switched (stopped, then put back at the end of the queue with
//! `restarts + 1`) — but only when a waiting job starts on what it frees in the very next pass;
//! otherwise it keeps running, and is switched as soon as a switch serves someone. Jobs that opted out of requeueing
//! (`--no-requeue`) or used up `--max-restarts` (their own, else the server's) end as TIMEOUT
//! instead. A `--signal SIG@SECS`
//! warning is due SECS before the slice ends. A limit of 0 is no limit, and no job is switched
//! before it has run [`crate::Config::min_slice_s`], so switches are rate-limited whatever the
//! limits.
//!
//! The core only decides ([`Scheduler::time_actions`]) and says when to look again
//! ([`Scheduler::next_deadline`]); the shell stops processes and arms one timer.

use serde::{Deserialize, Serialize};

use crate::placement;
use crate::{Job, JobId, JobState, Millis, Scheduler};

/// A signal sent ahead of a job's time limit (Slurm's `--signal SIG@SECS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarnSignal {
    pub signal: i32,
    pub secs_before: u64,
}

/// What time-limit enforcement asks of the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeAction {
    /// Deliver the job's warning signal.
    Warn { job: JobId, signal: i32 },
    /// Stop the job; once its processes are gone call [`Scheduler::requeue`].
    Requeue { job: JobId },
    /// Stop the job; once its processes are gone it ends as TIMEOUT ([`Scheduler::finish`]).
    Timeout { job: JobId },
}

/// How a running job is being stopped, if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    Cancel,
    Requeue,
    Timeout,
}

/// How long a trial's answer that switching the overdue jobs would serve nobody stands before
/// it is tried again after the queue changed (unless which jobs are overdue changes).
pub(crate) const SWITCH_RETRIAL_MS: Millis = 5_000;

/// The longest a fruitless trial's answer stands while nothing changes but the clock.
pub(crate) const SWITCH_RETRIAL_MAX_MS: Millis = 10 * 60_000;

/// A trial that found switching the overdue jobs served nobody ([`Scheduler::time_actions`]).
///
/// While nothing changes but the clock, each trial that finds the same answer lets it stand
/// twice as long as the last, from [`SWITCH_RETRIAL_MS`] up to [`SWITCH_RETRIAL_MAX_MS`]; after
/// a change (a job submitted, ended or requeued, a reservation re-planned as a running job
/// passes its expected end) the next trial is due within [`SWITCH_RETRIAL_MS`] of the last.
/// The clock alone moves the answer only slowly (a waiting job's age, users' usage, a job
/// coming to seek the reservation: hours), so a switch it brings about comes at most 10
/// minutes late; and a job past its limit in a quiet queue does not cost a trial every 5 s
/// for as long as it runs (a replay of a 30-year job past a 1-second limit took 2·10^8
/// trials, 25 minutes; now about 2·10^6, 24 s for the five policies).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NoSwitch {
    /// The overdue jobs tried (oldest slice end first).
    overdue: Vec<JobId>,
    tried_at: Millis,
    /// How long the answer stands while the queue does not change.
    stands_ms: Millis,
    /// [`Scheduler::queue_changes`] at the trial.
    changes: u64,
}

impl NoSwitch {
    /// When the answer is to be tried again, given the queue changes so far.
    fn retry_at(&self, changes: u64) -> Millis {
        let stands = if changes == self.changes {
            self.stands_ms
        } else {
            self.stands_ms.min(SWITCH_RETRIAL_MS)
        };
        self.tried_at.saturating_add(stands)
    }
}

impl Scheduler {
    /// Running jobs, by id, from the GPU books: costs what runs, not what waits.
    fn running_ids(&self) -> Vec<JobId> {
        let mut ids: Vec<JobId> = self.gpus.iter().flat_map(|g| g.jobs()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Is a job being stopped for a context switch (its processes not gone yet)?
    pub(crate) fn switch_in_progress(&self) -> bool {
        self.gpus
            .iter()
            .flat_map(|g| g.jobs())
            .any(|id| self.jobs.get(&id).and_then(|j| j.stopping) == Some(Stopping::Requeue))
    }

    /// When the running job's slice ends, if it has a limit.
    pub fn slice_end(&self, id: JobId) -> Option<Millis> {
        let job = self.jobs.get(&id)?;
        let start = job.started_at?;
        Some(start.saturating_add(self.effective_limit_s(&job.request)?.saturating_mul(1000)))
    }

    /// The earliest moment the running job may be context-switched: its slice end, but never
    /// before it has run the minimum slice.
    pub fn switch_at(&self, id: JobId) -> Option<Millis> {
        let end = self.slice_end(id)?;
        let start = self.jobs.get(&id)?.started_at?;
        Some(end.max(start.saturating_add(self.config.min_slice_s.saturating_mul(1000))))
    }

    /// Decides what must happen now. Each action is returned once: the job is marked.
    ///
    /// A switch must serve someone: overdue jobs are taken oldest slice end first, and a group
    /// of them is switched only if, requeued now, the very next pass (the same
    /// [`Scheduler::schedule`] the shell runs once their processes are gone) starts a job that
    /// was waiting on the GPUs of *each* of them, and restarts none of them. That pass is run
    /// on a copy of the scheduler, so priorities, fair share and the reservation decide exactly
    /// as they will: a waiting job that fits on the freed GPUs but would not be chosen (lower
    /// priority than the switched job, or held back for the reservation) switches nothing. One
    /// waiting job does not cause several switches, and a waiting multi-GPU job can be served
    /// by switching several overdue jobs together.
    pub fn time_actions(&mut self, now: Millis) -> Vec<TimeAction> {
        let mut actions = Vec::new();
        let mut overdue = Vec::new();
        let running: Vec<JobId> = self
            .running_ids()
            .into_iter()
            .filter(|id| {
                let j = &self.jobs[id];
                j.stopping.is_none()
                    && j.started_at.is_some()
                    && self.effective_limit_s(&j.request).is_some()
            })
            .collect();
        for id in running {
            let end = self.slice_end(id).expect("filtered on a limit");
            let job = &self.jobs[&id];
            if let Some(w) = job.request.warn_signal {
                if !job.warned && now.saturating_add(w.secs_before.saturating_mul(1000)) >= end {
                    actions.push(TimeAction::Warn {
                        job: id,
                        signal: w.signal,
                    });
                    self.jobs.get_mut(&id).expect("job exists").warned = true;
                }
            }
            if now < end {
                continue;
            }
            let job = &self.jobs[&id];
            let out_of_restarts = job
                .request
                .max_restarts
                .or(self.config.default_max_restarts)
                .is_some_and(|max| job.restarts >= max);
            if job.request.no_requeue || out_of_restarts {
                actions.push(TimeAction::Timeout { job: id });
                self.jobs.get_mut(&id).expect("job exists").stopping = Some(Stopping::Timeout);
            } else if now >= self.switch_at(id).expect("running with a limit") {
                overdue.push((end, id));
            }
        }
        if overdue.is_empty() || self.pending.is_empty() {
            return actions; // nobody waits: overdue jobs keep running
        }
        overdue.sort_unstable();
        // A trial found that switching these served nobody a moment ago: the answer stands for
        // a while (the timer comes back then), so a long queue does not cost a copy of the
        // scheduler on every event while, say, a light user's overdue job outranks a heavy
        // user's waiting ones.
        let overdue_ids: Vec<JobId> = overdue.iter().map(|(_, id)| *id).collect();
        let standing = self.no_switch.take().filter(|n| n.overdue == overdue_ids);
        if let Some(n) = standing.as_ref() {
            if now < n.retry_at(self.queue_changes) {
                self.no_switch = standing;
                return actions;
            }
        }
        // Cheap necessary condition first (no copy of the scheduler): some waiting shape fits
        // on what all the overdue jobs together would free.
        let mut books = self.gpus.clone();
        for (_, id) in &overdue {
            placement::release(&mut books, *id, &self.jobs[id].request);
        }
        let anyone_fits = self.shapes.values().any(|jobs| {
            jobs.first()
                .is_some_and(|(_, id)| placement::choose(&books, &self.jobs[id].request).is_some())
        });
        if !anyone_fits {
            self.no_switch = standing;
            return actions;
        }
        let mut switched: Vec<JobId> = Vec::new();
        let mut tentative: Vec<JobId> = Vec::new();
        for (_, id) in overdue {
            tentative.push(id);
            let group: Vec<JobId> = switched.iter().chain(&tentative).copied().collect();
            if self.switch_serves(&group, now) {
                switched = group;
                tentative.clear();
            } else if tentative.len() > 1 {
                // What was held back for a wider job may not be needed for this one.
                let alone: Vec<JobId> = switched.iter().copied().chain([id]).collect();
                if self.switch_serves(&alone, now) {
                    switched = alone;
                    tentative.pop();
                }
            }
        }
        // The same answer with nothing changed but the clock: it stands twice as long.
        let stands_ms = match standing {
            Some(n) if n.changes == self.queue_changes => {
                n.stands_ms.saturating_mul(2).min(SWITCH_RETRIAL_MAX_MS)
            }
            _ => SWITCH_RETRIAL_MS,
        };
        self.no_switch = switched.is_empty().then_some(NoSwitch {
            overdue: overdue_ids,
            tried_at: now,
            stands_ms,
            changes: self.queue_changes,
        });
        for id in switched {
            actions.push(TimeAction::Requeue { job: id });
            self.jobs.get_mut(&id).expect("job exists").stopping = Some(Stopping::Requeue);
        }
        actions
    }

    /// Would switching `group` now serve someone? On a copy: requeue them all at `now`, run the
    /// pass the shell runs next, and check that it restarts none of them and starts, on some
    /// GPU of each of them, a job that was waiting.
    fn switch_serves(&self, group: &[JobId], now: Millis) -> bool {
        let mut trial = self.clone();
        for &id in group {
            trial.requeue(id, now);
        }
        let started = trial.schedule(now);
        if started.iter().any(|a| group.contains(&a.job)) {
            return false;
        }
        group.iter().all(|id| {
            let freed = &self.jobs[id].gpus;
            started
                .iter()
                .any(|a| a.gpus.iter().any(|g| freed.contains(g)))
        })
    }

    /// The next moment [`Scheduler::time_actions`] may have something new to do (a warning, a
    /// slice end or the end of a minimum slice after `now`). Jobs already past both are looked
    /// at again on every event, so they need no timer.
    pub fn next_deadline(&self, now: Millis) -> Option<Millis> {
        self.running_ids()
            .into_iter()
            .map(|id| &self.jobs[&id])
            .filter(|j| j.stopping.is_none())
            .filter_map(|j| {
                let end = self.slice_end(j.id)?;
                let warn = j
                    .request
                    .warn_signal
                    .filter(|_| !j.warned)
                    .map(|w| end.saturating_sub(w.secs_before.saturating_mul(1000)));
                [warn, Some(end), self.switch_at(j.id)]
                    .into_iter()
                    .flatten()
                    .filter(|t| *t > now)
                    .min()
            })
            .chain(
                self.no_switch
                    .as_ref()
                    .map(|n| n.retry_at(self.queue_changes)),
            )
            .filter(|t| *t > now)
            // A job whose begin time came waits for the next pass: soon, never lost.
            .chain(self.next_begin().map(|at| at.max(now + 1)))
            .min()
    }

    /// The key floor ([`crate::Job::min_key`]) a job requeued now gets: behind every job
    /// waiting in the queue. The shell uses it for a job switched while it was down, restored
    /// after the queue as it was.
    pub fn requeue_floor(&self) -> i64 {
        self.user_queues
            .values()
            .filter_map(|q| q.last_key_value())
            .map(|(k, _)| k.0.saturating_add(1))
            .max()
            .unwrap_or(i64::MIN)
    }

    /// A switched job's processes are gone: it frees its GPUs and goes back to the end of the
    /// queue with one more restart. Returns its new queue position (1-based).
    pub fn requeue(&mut self, id: JobId, now: Millis) -> Option<usize> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Running {
            return None;
        }
        let job = self.jobs.remove(&id).expect("job exists");
        // Its usage stops accruing, as when a job finishes.
        let share = placement::usage_share(&self.gpus, &job.gpus, &job.request);
        self.rate_changes.push((job.request.uid, -share));
        placement::release(&mut self.gpus, id, &job.request);
        self.uncount_running(&job);
        self.full_pass_needed = true;
        // Enqueued anew now, behind everything already waiting (its queue time and wait-based
        // priority restart from now), even jobs its shorter estimate would pass.
        let behind = self.requeue_floor();
        let key = self.next_queue_key;
        self.next_queue_key += 1;
        self.index_pending(Job {
            queue_key: key,
            min_key: behind,
            ..Job::new(id, job.request, JobState::Pending, now, job.restarts + 1)
        });
        Some(self.pending.len())
    }
}
