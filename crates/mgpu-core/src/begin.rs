//! Jobs that may not start before a given time (Slurm's `--begin`): pending with REASON
//! `BeginTime`, in none of the queue's indexes until [`Scheduler::schedule`] is called at or
//! after that time (the caller's timer: [`Scheduler::next_deadline`] includes it). Pure: the
//! time is always the caller's `now`.

use crate::{JobId, JobState, Millis, Scheduler};

impl Scheduler {
    /// Keeps the pending job `id` out of the queue until `at` (its `--begin`). Call it right
    /// after [`Scheduler::submit`] or [`Scheduler::restore_pending`], before the next pass.
    /// A job array's task gives back its place under the array's cap meanwhile.
    pub fn defer_until(&mut self, id: JobId, at: Millis) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.state != JobState::Pending || self.deferred_at.contains_key(&id) {
            return;
        }
        if job.held {
            if let Some(t) = job
                .request
                .array
                .and_then(|a| self.throttles.get_mut(&a.job))
            {
                t.held.remove(&id);
            }
        } else {
            let job = self.jobs.get(&id).expect("job exists").clone();
            self.unindex_pending(&job);
            // Just entered: the last of the fresh jobs (O(1) per job, also when a restart
            // restores many deferred ones).
            if self.fresh.last() == Some(&id) {
                self.fresh.pop();
            } else {
                self.fresh.retain(|f| *f != id);
            }
            self.task_left(&job.request);
        }
        if let Some(a) = self.jobs[&id].request.array.map(|a| a.job) {
            self.forget_throttle_if_done(a);
        }
        if self.reservation.as_ref().is_some_and(|r| r.job == id) {
            self.reservation = None;
            self.full_pass_needed = true;
        }
        self.deferred_at.insert(id, at);
        self.deferred.insert((at, id));
        *(self.deferred_by_user)
            .entry(self.jobs[&id].request.uid)
            .or_default() += 1;
    }

    /// One deferred job of `uid` fewer.
    fn deferred_left(&mut self, uid: u32) {
        if let Some(n) = self.deferred_by_user.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.deferred_by_user.remove(&uid);
            }
        }
    }

    /// The jobs whose begin time came: into the queue (array tasks under their cap).
    pub(crate) fn release_begun(&mut self, now: Millis) {
        while let Some(&(at, id)) = self.deferred.first() {
            if at > now {
                break;
            }
            self.deferred.pop_first();
            self.deferred_at.remove(&id);
            let job = self.jobs.remove(&id).expect("a deferred job is a job");
            self.deferred_left(job.request.uid);
            // A requeued job keeps its place behind the jobs waiting when it was switched.
            self.enter_behind(id, job.request, job.submitted_at, job.restarts, job.min_key);
        }
    }

    /// When the next deferred job may start, if any.
    pub(crate) fn next_begin(&self) -> Option<Millis> {
        self.deferred.first().map(|(at, _)| *at)
    }

    /// The job's `--begin` time while it waits for it.
    pub fn begin_at(&self, id: JobId) -> Option<Millis> {
        self.deferred_at.get(&id).copied()
    }

    /// A deferred job cancelled: it leaves without ever having entered the queue.
    pub(crate) fn forget_deferred(&mut self, id: JobId) -> bool {
        match self.deferred_at.remove(&id) {
            Some(at) => {
                self.deferred.remove(&(at, id));
                if let Some(uid) = self.jobs.get(&id).map(|j| j.request.uid) {
                    self.deferred_left(uid);
                }
                true
            }
            None => false,
        }
    }

    /// Deferred jobs of one user (`None`: of everyone). O(1).
    pub(crate) fn deferred_count(&self, uid: Option<u32>) -> usize {
        match uid {
            None => self.deferred.len(),
            Some(uid) => self.deferred_by_user.get(&uid).copied().unwrap_or(0),
        }
    }
}
