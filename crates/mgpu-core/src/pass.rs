//! One scheduling pass: which pending jobs start now, and which job holds the reservation.
//!
//! Pending jobs are considered in priority order (queue order for the FIFO policies, a k-way
//! merge of the users' queues for fair share). A job that fits starts, except under a
//! backfilling policy once a reservation exists (EASY backfilling):
//! - the highest-priority job that cannot start and is starving (it has waited
//!   [`crate::Config::reserve_after_s`] and [`crate::Config::reserve_after_wait_factor`] times
//!   the recent waits, see `waited_enough`) gets a reservation at the earliest time enough
//!   resources free up, from the running jobs' expected ends (start + time limit, or the
//!   default estimate). The reservation is kept until that job starts, so a later job of
//!   higher priority cannot push it back either (no starvation);
//! - any other job may start now only if it fits and does not delay the reservation: it is
//!   expected to end by then, or the reserved job still fits at that time with it running.
//!
//! Cost: a shape (GPU count, memory) that was turned down is not tried again in the same pass
//! (the GPUs only fill up during a pass), and a pass stops once every shape still pending is
//! turned down or no capacity is left, so a long queue of blocked jobs is not walked.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::ops::Bound::{Excluded, Unbounded};

use crate::placement::{self, GpuState};
use crate::{Assignment, Job, JobId, JobRequest, JobState, Millis, Policy, Scheduler, Shape};

/// A user's next job in the fair-share merge.
struct FairHead {
    priority: f64,
    uid: u32,
    user_key: (i64, u64),
    id: JobId,
}

impl Ord for FairHead {
    fn cmp(&self, other: &Self) -> Ordering {
        // Higher priority first; ties go to the earlier submission (smaller queue key).
        self.priority
            .total_cmp(&other.priority)
            .then_with(|| other.user_key.1.cmp(&self.user_key.1))
    }
}

impl PartialOrd for FairHead {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for FairHead {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for FairHead {}

/// Pending jobs in the order a pass considers them.
enum Candidates {
    /// Queue order (FIFO policies), after the last key handed out.
    Queue(Option<u64>),
    /// Fair-share order: each user's best job in a max-heap; user terms are fixed for the pass.
    Fair {
        heap: BinaryHeap<FairHead>,
        user_terms: HashMap<u32, f64>,
        now: Millis,
    },
    /// A given list (the fresh jobs), already in priority order.
    List(std::vec::IntoIter<JobId>),
}

/// Why a shape was turned down in this pass; later jobs of that shape are skipped unseen.
#[derive(Clone, Copy)]
enum Block {
    /// It does not fit on the GPUs now.
    NoFit,
    /// It fits, but a job expected to run this long (ms) or longer delays the reservation.
    RunsAtLeast(u64),
}

/// The reservation of the highest-priority blocked job: when it starts at the latest, and
/// what the GPUs will hold then. Kept until that job starts (a later job of higher priority
/// cannot push it back either), planned afresh whenever resources were freed.
#[derive(Debug, Clone)]
pub(crate) struct Reservation {
    pub(crate) job: JobId,
    /// `None`: unknown (foreign processes hold memory it needs even on an idle machine).
    pub(crate) start_at: Option<Millis>,
    /// The GPUs at `start_at`: running jobs expected to end by then released, the reserved job
    /// booked, and backfilled jobs that run past `start_at` added.
    at_start: Vec<GpuState>,
}

impl Reservation {
    /// Would [`Reservation::admit`] place such a job (without booking it)?
    fn would_admit(&self, gpus: &[GpuState], request: &JobRequest, end: Millis) -> bool {
        match self.start_at {
            None => true,
            Some(start_at) if end <= start_at => true,
            Some(_) => placement::choose_where(gpus, request, |i| {
                placement::fits_on(&self.at_start[i], request)
            })
            .is_some(),
        }
    }

    /// Where a job that fits now on `chosen` (best fit) and is expected to end at `end` may
    /// start without delaying the reservation, if anywhere; a job running past the reserved
    /// start is booked into the plan.
    ///
    /// A job ending after the reserved start must fit, on the same GPUs, both now and next to
    /// the reserved job then. Both only get harder as GPUs fill up, so a job turned down stays
    /// turned down until resources are freed (what makes the incremental pass exact).
    fn admit(
        &mut self,
        gpus: &[GpuState],
        id: JobId,
        request: &JobRequest,
        chosen: Vec<u32>,
        end: Millis,
    ) -> Option<Vec<u32>> {
        match self.start_at {
            // Nothing mgpu starts can delay a job that foreign processes block.
            None => Some(chosen),
            Some(start_at) if end <= start_at => Some(chosen),
            Some(_) => {
                let at_start = &self.at_start;
                let chosen = placement::choose_where(gpus, request, |i| {
                    placement::fits_on(&at_start[i], request)
                })?;
                placement::reserve(&mut self.at_start, &chosen, id, request);
                Some(chosen)
            }
        }
    }
}

impl Scheduler {
    /// Applies the running-share changes recorded by `finish`/`restore_running` at `now`.
    pub(crate) fn charge_rate_changes(&mut self, now: Millis) {
        let tau = self.config.fair.tau_s();
        for (uid, delta) in self.rate_changes.drain(..) {
            self.usage
                .entry(uid)
                .or_default()
                .change_rate(now, tau, delta);
        }
    }

    /// Every pending job is a candidate; `replan`: resources were freed, so the reservation is
    /// planned afresh.
    pub(crate) fn full_pass(&mut self, now: Millis, replan: bool) -> Vec<Assignment> {
        let candidates = match self.config.policy {
            Policy::Fair => self.fair_candidates(now),
            Policy::Fifo | Policy::Backfill => Candidates::Queue(None),
        };
        self.run_pass(candidates, now, replan)
    }

    /// Nothing was freed since the last pass: every older pending job is still turned down
    /// (it still does not fit, or still cannot start without delaying the unchanged
    /// reservation), so only the jobs submitted since can start. Decides exactly what a
    /// rescan of every pending job would.
    pub(crate) fn fresh_pass(&mut self, mut fresh: Vec<JobId>, now: Millis) -> Vec<Assignment> {
        fresh.retain(|id| {
            self.jobs
                .get(id)
                .is_some_and(|j| j.state == JobState::Pending)
        });
        if self.config.policy == Policy::Fair {
            let mut keyed: Vec<FairHead> = fresh
                .iter()
                .map(|id| {
                    let job = &self.jobs[id];
                    let term = self.user_priority_term(job.request.uid, now);
                    self.fair_head(job.request.uid, self.user_key(job), *id, term, now)
                })
                .collect();
            keyed.sort_by(|a, b| b.cmp(a));
            fresh = keyed.into_iter().map(|h| h.id).collect();
        }
        // FIFO policies: `fresh` is in submission order, which is queue order.
        self.run_pass(Candidates::List(fresh.into_iter()), now, false)
    }

    fn run_pass(
        &mut self,
        mut candidates: Candidates,
        now: Millis,
        replan: bool,
    ) -> Vec<Assignment> {
        let reserves = self.config.policy.reserves();
        let mut started = Vec::new();
        let mut blocks: HashMap<Shape, Block> = HashMap::new();
        if let Some(held) = self.reservation.take().filter(|_| reserves) {
            // The reserved job goes first: it starts as soon as it fits.
            if let Some(job) = self
                .jobs
                .get(&held.job)
                .filter(|j| j.state == JobState::Pending)
            {
                match placement::choose(&self.gpus, &job.request) {
                    // Its user's limit holds it now (their other job started meanwhile): the
                    // reservation goes to whoever needs it next, not idle GPUs held for it.
                    _ if self.limit_hit(job, None).is_some() => {}
                    Some(chosen) if self.limit_hit(job, Some(&chosen)).is_some() => {}
                    Some(chosen) => self.start_job(held.job, chosen, now, &mut started),
                    None => {
                        blocks.insert(shape_of(&job.request), Block::NoFit);
                        self.reservation = Some(if replan {
                            self.plan_reservation(held.job, now)
                        } else {
                            held
                        });
                    }
                }
            }
        }
        let full = !matches!(candidates, Candidates::List(_));
        if full && self.refresh_blocks(&mut blocks, now) {
            return started;
        }
        // Users whose running jobs are at one of their limits: none of their jobs can start in
        // this pass (it only starts jobs), so their queues are passed over unseen.
        let mut saturated: HashSet<u32> = HashSet::new();
        while let Some(id) = self.next_candidate(&mut candidates, &saturated) {
            if self.reservation.as_ref().is_some_and(|r| r.job == id) {
                continue;
            }
            // Out of capacity: stop, once the top blocked job holds the reservation.
            if !placement::any_capacity(&self.gpus) && !self.seeks_reservation(now) {
                break;
            }
            let Some(job) = self.jobs.get(&id).filter(|j| j.state == JobState::Pending) else {
                continue;
            };
            // Its user may not run more now: skipped, not a block (others may pass it).
            if self.limit_hit(job, None).is_some() {
                if self.user_saturated(job.request.uid) {
                    saturated.insert(job.request.uid);
                    if saturated.len() == self.user_queues.len() {
                        break;
                    }
                }
                continue;
            }
            let shape = shape_of(&job.request);
            let estimate = job.estimate_ms;
            match blocks.get(&shape) {
                // (The first job that does not fit must still be seen, to get the reservation.)
                Some(Block::NoFit) if !self.seeks_reservation(now) => continue,
                Some(Block::RunsAtLeast(d)) if estimate >= *d => continue,
                _ => {}
            }
            let turned_down = match placement::choose(&self.gpus, &job.request) {
                None => {
                    // A job that only drained GPUs could hold would hold the reservation
                    // for nothing: it cannot start before an administrator resumes them.
                    if reserves
                        && self.reservation.is_none()
                        && self.waited_enough(job, now)
                        && !self.blocked_by_drain(&job.request)
                    {
                        self.reservation = Some(self.plan_reservation(id, now));
                    }
                    blocks.insert(shape, Block::NoFit);
                    true
                }
                // Where it would go, it would reserve more GPU memory than its user may.
                Some(chosen) if self.limit_hit(job, Some(&chosen)).is_some() => continue,
                Some(chosen) => {
                    let placed = match self.reservation.as_mut() {
                        None => Some(chosen),
                        Some(r) => r.admit(&self.gpus, id, &job.request, chosen, now + estimate),
                    };
                    match placed {
                        Some(chosen) => {
                            self.start_job(id, chosen, now, &mut started);
                            // The GPUs filled up: stop once no shape left can start.
                            if full && self.refresh_blocks(&mut blocks, now) {
                                break;
                            }
                            false
                        }
                        None => {
                            blocks.insert(shape, Block::RunsAtLeast(estimate));
                            true
                        }
                    }
                }
            };
            if turned_down && !self.seeks_reservation(now) && self.every_shape_blocked(&blocks) {
                break;
            }
        }
        started
    }

    /// Turns down, without walking the queue, every pending shape that cannot start now: it
    /// does not fit, or even its shortest job would delay the reservation. Returns whether
    /// every shape is turned down (the pass can stop).
    fn refresh_blocks(&self, blocks: &mut HashMap<Shape, Block>, now: Millis) -> bool {
        let reserves = self.config.policy.reserves();
        for (shape, jobs) in &self.shapes {
            let Some(&(shortest, id)) = jobs.first() else {
                continue;
            };
            if matches!(blocks.get(shape), Some(Block::NoFit)) {
                continue;
            }
            let request = &self.jobs[&id].request;
            if !placement::any_fit(&self.gpus, request) {
                blocks.insert(*shape, Block::NoFit);
            } else if let Some(r) = self.reservation.as_ref().filter(|_| reserves) {
                if !r.would_admit(&self.gpus, request, now + shortest) {
                    blocks.insert(*shape, Block::RunsAtLeast(shortest));
                }
            }
        }
        // Before the reservation is set, the first blocked job must still be found to get it.
        !self.seeks_reservation(now) && self.every_shape_blocked(blocks)
    }

    /// Has this pending job waited long enough to hold the reservation?
    fn waited_enough(&self, job: &Job, now: Millis) -> bool {
        let waited = now.saturating_sub(job.submitted_at);
        let recent = self
            .recent_wait_by_user
            .get(&job.request.uid)
            // A user who has started nothing of late is judged by the threshold alone: the
            // waits of the others (perhaps one user's flood) say nothing of how long theirs are.
            .map_or(0.0, |w| w.min(self.recent_wait_ms));
        (waited >= self.config.reserve_after_s.saturating_mul(1000)
            && waited as f64 >= self.config.reserve_after_wait_factor * recent)
            || self.below_share(job.request.uid)
            || self.flooded_by_other(job.request.uid)
    }

    /// Is another user flooding the queue, with far more jobs waiting than this one?
    fn flooded_by_other(&self, uid: u32) -> bool {
        self.flooder.is_some_and(|(flooder, waiting)| {
            let mine = self.user_queues.get(&uid).map_or(0, |q| q.len());
            flooder != uid && waiting > crate::policy::FLOOD_OVER_OWN * mine.max(1)
        })
    }

    /// The user whose waiting jobs outnumber all others' together `flood_factor` times, if
    /// any, with that number. O(users).
    pub(crate) fn compute_flooder(&self) -> Option<(u32, usize)> {
        let factor = self.config.fair.flood_factor;
        if self.config.policy != Policy::Fair || factor.is_nan() || factor <= 0.0 {
            return None;
        }
        let total: usize = self.user_queues.values().map(|q| q.len()).sum();
        let (&uid, queue) = self.user_queues.iter().max_by_key(|(_, q)| q.len())?;
        let waiting = queue.len();
        (waiting as f64 > factor * (total - waiting) as f64).then_some((uid, waiting))
    }

    /// Is this user's weighted usage far below that of the users contending now?
    fn below_share(&self, uid: u32) -> bool {
        self.share_bar >= 0.0
            && self.user_usage_gpu_s(uid, self.last_now) / self.config.fair.weight(uid)
                < self.share_bar
    }

    /// The usage bar of [`Scheduler::below_share`] at `now`: a fraction of the mean weighted
    /// usage of the users with jobs waiting or running (negative: off). O(users).
    pub(crate) fn compute_share_bar(&self, now: Millis) -> f64 {
        let fraction = self.config.fair.reserve_below_share;
        if self.config.policy != Policy::Fair || fraction <= 0.0 || self.user_queues.is_empty() {
            return -1.0;
        }
        let mut active: Vec<u32> = self.user_queues.keys().copied().collect();
        active.extend(
            self.gpus
                .iter()
                .flat_map(|g| g.jobs())
                .filter_map(|id| self.jobs.get(&id).map(|j| j.request.uid)),
        );
        active.sort_unstable();
        active.dedup();
        let total: f64 = active
            .iter()
            .map(|&u| self.user_usage_gpu_s(u, now) / self.config.fair.weight(u))
            .sum();
        fraction * total / active.len() as f64
    }

    /// Is a reservation due but not held: some user's longest-waiting job has waited long
    /// enough (and, since nothing freed was left unused, it is blocked)? O(users).
    pub(crate) fn seeks_reservation(&self, now: Millis) -> bool {
        self.config.policy.reserves()
            && self.reservation.is_none()
            && self.user_queues.values().any(|q| {
                q.values().next().is_some_and(|id| {
                    let job = &self.jobs[id];
                    self.waited_enough(job, now) && self.limit_hit(job, None).is_none()
                })
            })
    }

    /// Is every shape of job still pending turned down in this pass?
    fn every_shape_blocked(&self, blocks: &HashMap<Shape, Block>) -> bool {
        self.shapes
            .iter()
            .all(|(shape, jobs)| match blocks.get(shape) {
                Some(Block::NoFit) => true,
                Some(Block::RunsAtLeast(d)) => jobs.first().is_none_or(|(est, _)| est >= d),
                None => jobs.is_empty(),
            })
    }

    /// When the reserved job can start at the latest, from the running jobs' expected ends.
    fn plan_reservation(&mut self, id: JobId, now: Millis) -> Reservation {
        let request = &self.jobs[&id].request;
        let mut running: Vec<JobId> = self.gpus.iter().flat_map(|g| g.jobs()).collect();
        running.sort_unstable();
        running.dedup();
        let mut ends: Vec<(Millis, JobId)> = running
            .iter()
            .map(|rid| (self.expected_end(&self.jobs[rid]), *rid))
            .collect();
        let recheck_at = ends.iter().map(|e| e.0).filter(|&t| t > now).min();
        // A job past its expected end may end any moment.
        for e in &mut ends {
            e.0 = e.0.max(now);
        }
        ends.sort_unstable();
        let mut at_start = self.gpus.clone();
        let mut start_at = None;
        let mut i = 0;
        while i < ends.len() {
            let t = ends[i].0;
            while i < ends.len() && ends[i].0 == t {
                let ending = &self.jobs[&ends[i].1];
                placement::release(&mut at_start, ending.id, &ending.request);
                i += 1;
            }
            if let Some(gpus) = placement::choose(&at_start, request) {
                placement::reserve(&mut at_start, &gpus, id, request);
                start_at = Some(t);
                break;
            }
        }
        self.recheck_at = recheck_at;
        Reservation {
            job: id,
            start_at,
            at_start,
        }
    }

    /// A running job's expected end: start plus its limit (or the default estimate).
    fn expected_end(&self, job: &Job) -> Millis {
        job.started_at
            .unwrap_or(self.last_now)
            .saturating_add(job.estimate_ms)
    }

    /// Moves a pending job to running on `chosen` and starts charging its user.
    fn start_job(
        &mut self,
        id: JobId,
        chosen: Vec<u32>,
        now: Millis,
        started: &mut Vec<Assignment>,
    ) {
        let mut job = self.jobs.remove(&id).expect("a pending job");
        self.unindex_pending(&job);
        placement::reserve(&mut self.gpus, &chosen, id, &job.request);
        self.name_started(&job.request);
        self.running_totals.add(
            job.request.uid,
            job.request.gpus,
            crate::limits::mem_charge(&self.gpus, &chosen, &job.request),
        );
        let share = placement::usage_share(&self.gpus, &chosen, &job.request);
        let tau = self.config.fair.tau_s();
        self.usage
            .entry(job.request.uid)
            .or_default()
            .change_rate(now, tau, share);
        // Estimates of this job may go stale too.
        let expected_end = now.saturating_add(job.estimate_ms);
        self.recheck_at = Some(
            self.recheck_at
                .map_or(expected_end, |t| t.min(expected_end)),
        );
        // Of late: about the last 64 starts weigh.
        let waited = now.saturating_sub(job.submitted_at) as f64;
        self.recent_starts = (self.recent_starts + 1).min(64);
        self.recent_wait_ms += (waited - self.recent_wait_ms) / f64::from(self.recent_starts);
        let mine = self
            .recent_wait_by_user
            .entry(job.request.uid)
            .or_insert(waited);
        *mine += (waited - *mine) / 16.0;
        job.state = JobState::Running;
        job.started_at = Some(now);
        job.gpus = chosen.clone();
        self.jobs.insert(id, job);
        started.push(Assignment {
            job: id,
            gpus: chosen,
        });
        // Jobs waiting for it to start (`after`) get a look at the next pass.
        let array = self.jobs[&id].request.array.map(|a| a.job);
        self.target_event(id, array, None);
    }

    /// Takes a job that leaves the pending state out of the queue indexes.
    pub(crate) fn unindex_pending(&mut self, job: &Job) {
        self.pending.remove(&job.queue_key);
        let user_key = self.user_key(job);
        if let Some(queue) = self.user_queues.get_mut(&job.request.uid) {
            queue.remove(&user_key);
            if queue.is_empty() {
                self.user_queues.remove(&job.request.uid);
            }
        }
        let shape = shape_of(&job.request);
        if let Some(jobs) = self.shapes.get_mut(&shape) {
            jobs.remove(&(job.estimate_ms, job.id));
            if jobs.is_empty() {
                self.shapes.remove(&shape);
            }
        }
    }

    /// A job's key in its user's queue.
    pub(crate) fn user_key(&self, job: &Job) -> (i64, u64) {
        (
            self.config
                .fair
                .job_key_ms(job.submitted_at, job.request.nice, job.order_ms)
                .max(job.min_key),
            job.queue_key,
        )
    }

    /// The user's share of a fair priority: minus the usage penalty, in seconds.
    pub(crate) fn user_priority_term(&self, uid: u32, now: Millis) -> f64 {
        let fair = &self.config.fair;
        let machine_s = self.user_usage_gpu_s(uid, now) / self.gpus.len().max(1) as f64;
        -fair.usage_factor * machine_s / fair.weight(uid)
    }

    /// A pending job's fair priority: user term + age_factor·wait − nice penalty, in seconds.
    pub(crate) fn fair_priority(&self, job: &Job, user_term: f64, now: Millis) -> f64 {
        fair_priority_of(
            self.user_key(job).0,
            user_term,
            self.config.fair.age_factor,
            now,
        )
    }

    fn fair_head(
        &self,
        uid: u32,
        user_key: (i64, u64),
        id: JobId,
        user_term: f64,
        now: Millis,
    ) -> FairHead {
        FairHead {
            priority: fair_priority_of(user_key.0, user_term, self.config.fair.age_factor, now),
            uid,
            user_key,
            id,
        }
    }

    fn fair_candidates(&self, now: Millis) -> Candidates {
        let mut user_terms = HashMap::with_capacity(self.user_queues.len());
        let mut heap = BinaryHeap::with_capacity(self.user_queues.len());
        for (&uid, queue) in &self.user_queues {
            let term = self.user_priority_term(uid, now);
            user_terms.insert(uid, term);
            if let Some((&key, &id)) = queue.first_key_value() {
                heap.push(self.fair_head(uid, key, id, term, now));
            }
        }
        Candidates::Fair {
            heap,
            user_terms,
            now,
        }
    }

    /// The next candidate, passing over the jobs of the users in `skip` (in fair-share order
    /// without looking at the rest of their queues).
    fn next_candidate(&self, candidates: &mut Candidates, skip: &HashSet<u32>) -> Option<JobId> {
        let skipped = |id: &JobId| {
            !skip.is_empty()
                && self
                    .jobs
                    .get(id)
                    .is_some_and(|j| skip.contains(&j.request.uid))
        };
        match candidates {
            Candidates::Queue(last) => loop {
                let next = match *last {
                    None => self.pending.iter().next(),
                    Some(k) => self.pending.range((Excluded(k), Unbounded)).next(),
                };
                let (&key, &id) = next?;
                *last = Some(key);
                if !skipped(&id) {
                    return Some(id);
                }
            },
            Candidates::Fair {
                heap,
                user_terms,
                now,
            } => loop {
                let head = heap.pop()?;
                if skip.contains(&head.uid) {
                    continue;
                }
                let following = self
                    .user_queues
                    .get(&head.uid)
                    .and_then(|q| q.range((Excluded(head.user_key), Unbounded)).next());
                if let Some((&key, &id)) = following {
                    heap.push(self.fair_head(head.uid, key, id, user_terms[&head.uid], *now));
                }
                return Some(head.id);
            },
            Candidates::List(list) => list.find(|id| !skipped(id)),
        }
    }

    /// Pending jobs in the order the next pass would consider them (for display).
    pub(crate) fn pending_in_priority_order(&self) -> impl Iterator<Item = JobId> {
        let ids: Vec<JobId> = match self.config.policy {
            Policy::Fair => {
                let mut candidates = self.fair_candidates(self.last_now);
                let none = HashSet::new();
                std::iter::from_fn(|| self.next_candidate(&mut candidates, &none)).collect()
            }
            Policy::Fifo | Policy::Backfill => self.pending.values().copied().collect(),
        };
        ids.into_iter()
    }
}

fn shape_of(request: &JobRequest) -> Shape {
    (request.gpus, request.mem_mib)
}

fn fair_priority_of(job_key_ms: i64, user_term: f64, age_factor: f64, now: Millis) -> f64 {
    user_term + (age_factor * now as f64 - job_key_ms as f64) / 1000.0
}
