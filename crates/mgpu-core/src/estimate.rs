//! Run-time estimates learned from each user's own finished jobs (as Helios' QSSF does).
//!
//! A job without a time limit of its own is estimated from the same user's recent runs: first
//! those of jobs with the same name (the daemon names a job after its command's first word
//! unless told otherwise), then the user's runs of any name; with no history at all it falls
//! back to the server's flat default estimate. The estimate is the mean of the recent runs
//! kept, used only when they agree: at least [`MIN_RUNS`] runs whose standard deviation is at
//! most [`MAX_SPREAD`] times their mean (runs that vary more predict nothing, and a mean of
//! them would only reorder jobs at random and backfill jobs that then delay the reservation).
//!
//! Used for backfilling and for the shortest-first part of the fair order only: it never ends
//! a job (time limits stay what users set).
//!
//! In the shortest-first order (not for backfilling) a job nothing is known of counts as the
//! typical job, the median of all users' recent runs ([`Estimator::typical_run`]), not as the
//! flat default: on the real traces most jobs without a limit or agreeing history are not long,
//! and ordering them all as "24 h" behind every job with a history only reshuffled them.
//!
//! Time limits are estimates too, and users set them generously (often several times what
//! the job takes). For the shortest-first order only, a job's limit is scaled by the share of
//! their limits the same user's recent jobs used ([`Estimator::limit_use`]): two users'
//! jobs are then ordered by how long they will likely run, not by how cautious their owners
//! are. Backfilling keeps the limit itself (a reservation must not be delayed by a job that
//! is still allowed to run).
//!
//! Memory is bounded: per user a ring of [`RUNS_KEPT`] runs overall and one per name, at most
//! [`NAMES_PER_USER`] names (the least recently fed goes first) and at most [`USERS_KEPT`]
//! users (likewise). Everything is deterministic: "recent" is counted in runs fed, not in time.

use std::collections::{HashMap, VecDeque};

use crate::Millis;

/// Runs kept per user and per name of a user.
pub const RUNS_KEPT: usize = 16;
/// Names kept per user.
pub const NAMES_PER_USER: usize = 32;
/// Users kept.
pub const USERS_KEPT: usize = 4096;
/// Runs needed before their mean is used.
pub const MIN_RUNS: usize = 2;
/// Largest spread (standard deviation over mean) of runs whose mean is used: runs that vary
/// more than this predict nothing, and the flat default (or the time limit) is used instead.
pub const MAX_SPREAD: f64 = 0.5;
/// Least share of its limit a job is assumed to use: a limit counts at least a tenth of itself
/// in the order, however little of their limits a user's jobs use (or seem to: throwaway
/// jobs under huge limits must not buy a user's real jobs a place in front).
pub const MIN_LIMIT_USE: f64 = 0.1;
/// Run time (ms) the runs behind a share must add up to: each run weighs its run time, so
/// a few short runs say little.
pub const MIN_LIMIT_USE_RUN_MS: u64 = 3_600_000;
/// Runs of all users needed before their median stands for a job nothing is known of.
pub const MIN_TYPICAL_RUNS: usize = 16;
/// Longest name kept as a key (longer names are cut, at a character boundary).
const NAME_KEY_MAX: usize = 64;

/// The last few run times (ms) of one key.
#[derive(Debug, Clone, Default)]
struct Runs(VecDeque<Millis>);

impl Runs {
    fn push(&mut self, run_ms: Millis) {
        if self.0.len() == RUNS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back(run_ms);
    }

    /// The mean, if the runs agree well enough to predict the next one: at least
    /// [`MIN_RUNS`] of them, with a standard deviation of at most [`MAX_SPREAD`] times the mean.
    fn mean(&self) -> Option<Millis> {
        let n = self.0.len();
        if n < MIN_RUNS {
            return None;
        }
        let mean = self.0.iter().map(|&r| r as f64).sum::<f64>() / n as f64;
        let var = self
            .0
            .iter()
            .map(|&r| (r as f64 - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        if var.sqrt() > MAX_SPREAD * mean {
            return None;
        }
        Some(mean.round() as Millis)
    }
}

#[derive(Debug, Clone, Default)]
struct UserRuns {
    /// Feed count when this user was last fed (LRU among users).
    fed_at: u64,
    all: Runs,
    /// Recent runs with a limit, newest last: (run ms, share of its limit used, 0..=1).
    limit_use: VecDeque<(Millis, f64)>,
    /// Per job name: (feed count when last fed, its runs).
    by_name: HashMap<String, (u64, Runs)>,
}

/// Learned run times, fed with finished runs ([`Estimator::learn`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Estimator {
    users: HashMap<u32, UserRuns>,
    /// Runs fed so far: the logical clock of the LRU evictions.
    fed: u64,
    /// The same for all users (for a user with too few runs of their own).
    limit_use_all: VecDeque<(Millis, f64)>,
    /// All users' recent runs (uid, run ms), newest last, at most [`RUNS_KEPT`] per user.
    runs_all: VecDeque<(u32, Millis)>,
    /// How many of `runs_all` each user has (users with none are not kept).
    in_runs_all: HashMap<u32, usize>,
    /// Their median (see [`Estimator::typical_run`]).
    typical: Option<Millis>,
}

/// Runs of all users kept for [`Estimator::typical_run`].
pub const RUNS_ALL_KEPT: usize = 256;

/// Runs with a limit kept for [`Estimator::limit_use`] across all users.
const LIMIT_USE_ALL_KEPT: usize = 64;

/// The run-weighted mean share of their limits `used` runs used, once there are [`MIN_RUNS`]
/// of them adding up to [`MIN_LIMIT_USE_RUN_MS`] (at least [`MIN_LIMIT_USE`]).
fn mean_use(used: &VecDeque<(Millis, f64)>) -> Option<f64> {
    let weight: f64 = used.iter().map(|&(run, _)| run as f64).sum();
    (used.len() >= MIN_RUNS && weight >= MIN_LIMIT_USE_RUN_MS as f64).then(|| {
        let share = used.iter().map(|&(run, u)| run as f64 * u).sum::<f64>() / weight;
        share.clamp(MIN_LIMIT_USE, 1.0)
    })
}

fn name_key(name: &str) -> &str {
    if name.len() <= NAME_KEY_MAX {
        return name;
    }
    let mut end = NAME_KEY_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl Estimator {
    /// Records one finished run of a job of user `uid` named `name` that ran `run_ms`, under a
    /// time limit of `limit_ms` if it had one.
    pub(crate) fn learn(&mut self, uid: u32, name: &str, run_ms: Millis, limit_ms: Option<Millis>) {
        self.fed += 1;
        let fed = self.fed;
        if !self.users.contains_key(&uid) && self.users.len() >= USERS_KEPT {
            if let Some(oldest) = self
                .users
                .iter()
                .min_by_key(|(_, u)| u.fed_at)
                .map(|e| *e.0)
            {
                self.users.remove(&oldest);
            }
        }
        self.push_typical(uid, run_ms);
        let user = self.users.entry(uid).or_default();
        user.fed_at = fed;
        user.all.push(run_ms);
        if let Some(limit_ms) = limit_ms.filter(|&l| l > 0) {
            let used = (run_ms as f64 / limit_ms as f64).clamp(0.0, 1.0);
            if user.limit_use.len() == RUNS_KEPT {
                user.limit_use.pop_front();
            }
            user.limit_use.push_back((run_ms, used));
            if self.limit_use_all.len() == LIMIT_USE_ALL_KEPT {
                self.limit_use_all.pop_front();
            }
            self.limit_use_all.push_back((run_ms, used));
        }
        let key = name_key(name);
        if key.is_empty() {
            return;
        }
        if !user.by_name.contains_key(key) && user.by_name.len() >= NAMES_PER_USER {
            if let Some(oldest) = user
                .by_name
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
            {
                user.by_name.remove(&oldest);
            }
        }
        let entry = user.by_name.entry(key.to_string()).or_default();
        entry.0 = fed;
        entry.1.push(run_ms);
    }

    /// The learned run time of a job of user `uid` named `name`, if the user has history.
    pub(crate) fn estimate(&self, uid: u32, name: &str) -> Option<Millis> {
        self.learned(uid, name).map(|(ms, _, _)| ms)
    }

    /// [`Estimator::estimate`] with where it comes from: the number of runs its mean is of,
    /// and whether they are runs of jobs of the same name (else of any name).
    pub(crate) fn learned(&self, uid: u32, name: &str) -> Option<(Millis, u32, bool)> {
        let user = self.users.get(&uid)?;
        let key = name_key(name);
        let with_count = |runs: &Runs| runs.mean().map(|ms| (ms, runs.0.len() as u32));
        user.by_name
            .get(key)
            .filter(|_| !key.is_empty())
            .and_then(|(_, runs)| with_count(runs))
            .map(|(ms, n)| (ms, n, true))
            .or_else(|| with_count(&user.all).map(|(ms, n)| (ms, n, false)))
    }

    /// Adds a run to all users' recent runs and recomputes their median. One user keeps at
    /// most [`RUNS_KEPT`] of the [`RUNS_ALL_KEPT`] (their oldest goes first): a burst of one
    /// user's throwaway jobs cannot make every unknown job look short.
    fn push_typical(&mut self, uid: u32, run_ms: Millis) {
        let own = self.in_runs_all.get(&uid).copied().unwrap_or(0);
        let evicted = if own >= RUNS_KEPT {
            self.runs_all
                .iter()
                .position(|&(u, _)| u == uid)
                .and_then(|at| self.runs_all.remove(at))
        } else if self.runs_all.len() >= RUNS_ALL_KEPT {
            self.runs_all.pop_front()
        } else {
            None
        };
        if let Some((gone, _)) = evicted {
            if let Some(n) = self.in_runs_all.get_mut(&gone) {
                *n -= 1;
                if *n == 0 {
                    self.in_runs_all.remove(&gone);
                }
            }
        }
        self.runs_all.push_back((uid, run_ms));
        *self.in_runs_all.entry(uid).or_default() += 1;
        self.typical = (self.runs_all.len() >= MIN_TYPICAL_RUNS).then(|| {
            let mut runs: Vec<Millis> = self.runs_all.iter().map(|&(_, r)| r).collect();
            let mid = runs.len() / 2;
            *runs.select_nth_unstable(mid).1
        });
    }

    /// What a job that nothing is known of (no limit, no agreeing runs) likely takes, for the
    /// order only: the median of all users' last [`RUNS_ALL_KEPT`] runs (at most [`RUNS_KEPT`]
    /// of them one user's), once there are [`MIN_TYPICAL_RUNS`] of them. Kept up to date by
    /// [`Estimator::learn`], so reading it costs nothing.
    pub(crate) fn typical_run(&self) -> Option<Millis> {
        self.typical
    }

    /// The share of their time limits the user's recent runs with a limit used (weighted by
    /// run time; see [`mean_use`]), else that of all users' recent runs.
    pub(crate) fn limit_use(&self, uid: u32) -> Option<f64> {
        self.users
            .get(&uid)
            .and_then(|u| mean_use(&u.limit_use))
            .or_else(|| mean_use(&self.limit_use_all))
    }

    /// (runs, users counted) held for the typical run: for tests of the bounds.
    #[cfg(test)]
    pub(crate) fn typical_sizes(&self) -> (usize, usize) {
        (self.runs_all.len(), self.in_runs_all.len())
    }

    /// (users, names, runs) held: for tests of the bounds.
    #[cfg(test)]
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        let names = self.users.values().map(|u| u.by_name.len()).sum();
        let runs = self
            .users
            .values()
            .map(|u| u.all.0.len() + u.by_name.values().map(|n| n.1 .0.len()).sum::<usize>())
            .sum();
        (self.users.len(), names, runs)
    }
}
