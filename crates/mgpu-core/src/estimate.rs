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
    /// Per job name: (feed count when last fed, its runs).
    by_name: HashMap<String, (u64, Runs)>,
}

/// Learned run times, fed with finished runs ([`Estimator::learn`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Estimator {
    users: HashMap<u32, UserRuns>,
    /// Runs fed so far: the logical clock of the LRU evictions.
    fed: u64,
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
    /// Records one finished run of a job of user `uid` named `name` that ran `run_ms`.
    pub(crate) fn learn(&mut self, uid: u32, name: &str, run_ms: Millis) {
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
        let user = self.users.entry(uid).or_default();
        user.fed_at = fed;
        user.all.push(run_ms);
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
