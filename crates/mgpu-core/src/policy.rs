//! Scheduling policies and the fair-share arithmetic.
//!
//! Three policies, chosen per server ([`crate::Config::policy`]):
//! - [`Policy::Fifo`]: first come, first served among the jobs that fit (first-fit). Simple, but
//!   a job that needs many GPUs can starve behind a stream of small ones.
//! - [`Policy::Backfill`]: FIFO priority with EASY backfilling: the first job that cannot start
//!   gets a reservation once it is starving (see [`crate::Config::reserve_after_s`]), later
//!   jobs start only if they do not delay it; until then jobs start first-fit.
//! - [`Policy::Fair`] (default): the same backfilling, but jobs are ordered by a fair-share
//!   priority: it falls with the user's recent (decayed) GPU usage and rises with waiting time;
//!   FIFO within one user.
//!
//! Priorities are in *seconds*: one unit of priority is worth one second of waiting (with the
//! default `age_factor` of 1). A user who recently used the whole machine for an hour loses
//! `usage_factor` hours of priority; the penalty halves every `half_life_s` when they run
//! nothing. Usage is integrated exactly between events (no clock reads, no ticks).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::Millis;

/// Which order pending jobs are considered in, and whether backfilling protects a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// First-come first-served among the jobs that fit now (first-fit, no reservation).
    Fifo,
    /// FIFO priority plus EASY backfilling around a reservation for the first blocked job.
    Backfill,
    /// Fair-share priority plus EASY backfilling.
    #[default]
    Fair,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::Fifo, Policy::Backfill, Policy::Fair];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Backfill => "backfill",
            Policy::Fair => "fair",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
    }

    /// Does the policy hold a reservation for the highest-priority blocked job?
    pub fn reserves(self) -> bool {
        self != Policy::Fifo
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Settings of the fair-share priority (used by [`Policy::Fair`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FairShareConfig {
    /// Recent usage halves every this many seconds (default 24 h).
    pub half_life_s: u64,
    /// Admin-set weight per uid (default 1.0): a user with weight 2 is charged half as much.
    pub user_weights: HashMap<u32, f64>,
    /// Seconds of priority lost per second of (decayed) whole-machine usage.
    pub usage_factor: f64,
    /// Seconds of priority gained per second of waiting.
    pub age_factor: f64,
    /// Seconds of priority lost per point of `nice` (a negative nice, root's to give, gains).
    pub nice_unit_s: f64,
    /// Hours of priority lost per doubling of the job's expected run time (its limit scaled by
    /// how much of their limits its user's jobs use, else its learned estimate, else the
    /// typical recent run: see [`crate::Scheduler::order_estimate_ms`]), counted from
    /// [`SIZE_UNIT_MS`]: shorter jobs go first, and a job goes first anyway once it has waited
    /// this many hours longer per doubling of its lead (no starvation). Logarithmic, because
    /// run times span minutes to weeks: a linear term either leaves jobs of minutes and hours
    /// in FIFO order behind a long backlog or pushes week-long jobs back for months.
    /// 0: plain FIFO within a user.
    pub size_weight_h: f64,
    /// A blocked job of a user whose (weighted, decayed) usage is below this fraction of the
    /// mean of the users with jobs waiting or running gets the reservation at once, without
    /// waiting to be starved: users far below their share are not made to wait behind the
    /// backlog of users far above it (a flood). 0: off.
    pub reserve_below_share: f64,
    /// A user whose waiting jobs outnumber all other users' waiting jobs together this many
    /// times (and the blocked job's user's own more than [`FLOOD_OVER_OWN`] times) floods the
    /// queue: the other users' blocked jobs get the reservation at once, without waiting to be
    /// starved, so a wide job is not left to wait while each GPU that frees goes to the flood.
    /// 0: off.
    pub flood_factor: f64,
}

/// Run time from which [`FairShareConfig::size_weight_h`] counts doublings: a job of a
/// minute loses one doubling's worth, one of 0 s none.
pub const SIZE_UNIT_MS: f64 = 60_000.0;

/// See [`FairShareConfig::flood_factor`].
pub const FLOOD_OVER_OWN: usize = 10;

/// The fair-share settings an admin (or the simulator) may set, with the values they may take:
/// one table for the daemon and the simulator, so a replay runs only what a server would.
/// The bounds are far beyond any sensible setting: a priority key stays well inside i64 (ms
/// since the epoch times the age factor, plus the size and usage terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FairKnob {
    SizeWeight,
    UsageFactor,
    AgeFactor,
    ReserveBelowShare,
    FloodFactor,
}

impl FairKnob {
    /// `Err(what is allowed)` when `value` is not, e.g. "a number of 0 or more and at most
    /// 1000"; the caller names the setting.
    pub fn check(self, value: f64) -> Result<(), String> {
        let (min_exclusive, max) = match self {
            FairKnob::SizeWeight => (false, 10_000.0),
            FairKnob::UsageFactor => (false, 1e6),
            // 0 would let a job starve.
            FairKnob::AgeFactor => (true, 1000.0),
            FairKnob::ReserveBelowShare => (false, 1.0),
            // Below 1 two users could flood at once.
            FairKnob::FloodFactor => {
                return if value == 0.0 || (1.0..=1e6).contains(&value) {
                    Ok(())
                } else {
                    Err("0 (off) or a number from 1 to 1000000".into())
                };
            }
        };
        let low_ok = if min_exclusive {
            value > 0.0
        } else {
            value >= 0.0
        };
        if value.is_finite() && low_ok && value <= max {
            return Ok(());
        }
        let low = if min_exclusive {
            "more than 0"
        } else {
            "0 or more"
        };
        Err(format!("a number of {low} and at most {max}"))
    }
}

impl Default for FairShareConfig {
    fn default() -> Self {
        FairShareConfig {
            half_life_s: 24 * 3600,
            user_weights: HashMap::new(),
            usage_factor: 30.0,
            age_factor: 1.0,
            nice_unit_s: 60.0,
            size_weight_h: 140.0,
            reserve_below_share: 0.0,
            flood_factor: 8.0,
        }
    }
}

impl FairShareConfig {
    pub fn weight(&self, uid: u32) -> f64 {
        match self.user_weights.get(&uid) {
            Some(w) if *w > 0.0 => *w,
            _ => 1.0,
        }
    }

    /// Usage's time constant in seconds (half-life / ln 2).
    pub(crate) fn tau_s(&self) -> f64 {
        self.half_life_s.max(1) as f64 / std::f64::consts::LN_2
    }

    /// The part of a job's priority fixed at submission (larger means later in its user's
    /// queue). Rounded to milliseconds so that it can key an ordered map.
    pub(crate) fn job_key_ms(&self, submitted_at: Millis, nice: i32, estimate_ms: u64) -> i64 {
        let nice_ms = self.nice_unit_s * 1000.0 * f64::from(nice);
        let size_ms =
            self.size_weight_h * 3_600_000.0 * (1.0 + estimate_ms as f64 / SIZE_UNIT_MS).log2();
        (self.age_factor * submitted_at as f64 + nice_ms + size_ms).round() as i64
    }
}

/// A user's fair-share standing (see [`crate::Scheduler::standing`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserStanding {
    pub uid: u32,
    /// Recent GPU usage in GPU-seconds, decayed with the half-life (running jobs included).
    pub usage_gpu_s: f64,
    /// The user's weight (share): usage counts divided by it.
    pub weight: f64,
    /// The usage's part of the user's jobs' priority, in seconds (0 or less): minus
    /// `usage_factor` times the decayed usage in whole-machine seconds, over the weight.
    pub priority_s: f64,
}

/// One user's GPU usage: decayed GPU-seconds as of `as_of`, plus what is running now.
///
/// Between two events the running share is constant, so the decayed integral has a closed
/// form: `u(t) = u0·e^(-dt/τ) + rate·τ·(1 - e^(-dt/τ))`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct UserUsage {
    gpu_s: f64,
    as_of: Millis,
    /// GPU-equivalents running now (a memory job counts mem/total of each of its GPUs).
    rate: f64,
}

impl UserUsage {
    pub(crate) fn at(&self, now: Millis, tau_s: f64) -> f64 {
        let dt_s = now.saturating_sub(self.as_of) as f64 / 1000.0;
        let decay = (-dt_s / tau_s).exp();
        self.gpu_s * decay + self.rate * tau_s * (1.0 - decay)
    }

    /// Adds a past run (share `rate` from `start` to `end`, both at most `now`), decayed to `now`.
    pub(crate) fn add_past(
        &mut self,
        now: Millis,
        tau_s: f64,
        rate: f64,
        start: Millis,
        end: Millis,
    ) {
        if now > self.as_of {
            self.gpu_s = self.at(now, tau_s);
            self.as_of = now;
        }
        let ago = |t: Millis| self.as_of.saturating_sub(t) as f64 / 1000.0;
        let (start, end) = (start.min(end), end);
        self.gpu_s += rate * tau_s * ((-ago(end) / tau_s).exp() - (-ago(start) / tau_s).exp());
    }

    /// Brings the integral up to `now`, then changes the running share by `delta`.
    pub(crate) fn change_rate(&mut self, now: Millis, tau_s: f64, delta: f64) {
        if now > self.as_of {
            self.gpu_s = self.at(now, tau_s);
            self.as_of = now;
        }
        self.rate += delta;
        // Float sums of +x and -x may leave dust; nothing running means exactly zero.
        if self.rate < 1e-9 {
            self.rate = 0.0;
        }
    }
}
