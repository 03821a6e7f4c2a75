//! Dependencies and holds of new jobs (`--dependency`, `--hold`), shared by `Submit`: the
//! targets the user named are checked and resolved (a job, a whole job array by its id, or one
//! task by `ID_TASK`), and the job enters the core with what the records say of targets that
//! already ended. Each lookup is by id (a job array's tasks in one indexed query): the cost is
//! O(targets), whatever the number of finished jobs.

use std::collections::{HashMap, HashSet};

use mgpu_core::{
    parse_dependency, DepItem, DepKind, DepTarget, Dependency, Gate, Hold, JobId, TargetState,
};

use crate::state::{Daemon, Inner};

/// Most dependency items (a whole job array counts once) one user's waiting jobs may have in
/// all: each costs the daemon a few bytes until its job starts.
pub const MAX_DEP_TARGETS_PER_USER: usize = 200_000;

/// The gate of a new job: its hold and its dependencies, targets checked and resolved.
/// Refuses (with a clear message) dependencies on jobs that never existed.
pub fn gate_of(daemon: &Daemon, dependency: Option<&str>, hold: bool) -> Result<Gate, String> {
    let dependency = match dependency {
        None => None,
        Some(text) => Some(resolve(daemon, text)?),
    };
    Ok(Gate {
        hold: hold.then_some(Hold::User),
        dependency,
    })
}

fn resolve(daemon: &Daemon, text: &str) -> Result<Dependency, String> {
    let spec = parse_dependency(text)?;
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    for (kind, target) in spec.items {
        let (job, tasks) = match target {
            None => (0, 0),
            Some(DepTarget::Job(id)) => job_target(daemon, id)?,
            Some(DepTarget::Task(array, task)) => (task_target(daemon, array, task)?, 0),
        };
        if seen.insert((kind, job, tasks)) {
            items.push(DepItem { kind, job, tasks });
        }
    }
    Ok(Dependency {
        any: spec.any,
        items,
        text: text.trim().to_string(),
    })
}

/// A job, or (`tasks` > 0) every task of the job array with that id.
fn job_target(daemon: &Daemon, id: JobId) -> Result<(JobId, u32), String> {
    let live = daemon.lock().sched.job(id).map(|j| j.request.array);
    let array = match live {
        Some(a) => a,
        None => {
            let known = daemon
                .store
                .target_state(id)
                .map_err(|e| format!("cannot check job {id}: {e:#}"))?;
            if known == TargetState::Gone {
                return Err(no_such(id));
            }
            daemon
                .store
                .array_task(id)
                .map_err(|e| format!("cannot check job {id}: {e:#}"))?
        }
    };
    Ok(match array {
        // A job array's tasks have ids that follow each other from the array's.
        Some(a) if a.job == id => (id, a.count),
        _ => (id, 0),
    })
}

fn task_target(daemon: &Daemon, array: JobId, task: u32) -> Result<JobId, String> {
    daemon
        .store
        .array_task_job(array, task)
        .map_err(|e| format!("cannot check job {array}_{task}: {e:#}"))?
        .ok_or_else(|| format!("invalid --dependency: job array {array} has no task {task} (no such job {array}_{task})"))
}

fn no_such(id: JobId) -> String {
    format!("invalid --dependency: no such job {id}")
}

/// Targets of `gate` the core does not hold and whose records were not read yet: jobs, and
/// job arrays with such a task (read whole, in one query).
fn missing(
    inner: &Inner,
    gate: &Gate,
    known: &HashMap<JobId, TargetState>,
) -> (Vec<JobId>, Vec<(JobId, u32)>) {
    let (mut jobs, mut arrays) = (Vec::new(), Vec::new());
    let Some(dep) = &gate.dependency else {
        return (jobs, arrays);
    };
    let unknown = |j: &JobId| inner.sched.job(*j).is_none() && !known.contains_key(j);
    for i in dep.items.iter().filter(|i| i.kind != DepKind::Singleton) {
        if i.tasks == 0 {
            if unknown(&i.job) {
                jobs.push(i.job);
            }
        } else if (i.job..i.job + JobId::from(i.tasks)).any(|t| unknown(&t)) {
            arrays.push((i.job, i.tasks));
        }
    }
    (jobs, arrays)
}

/// Runs `enter` under the lock once every target the core does not hold has been read from
/// the records, with a lookup of them. A target that left the core meanwhile is read after a
/// flush of the store (its end was sent to the store before it left: the record has it).
pub async fn enter_gated<R>(
    daemon: &Daemon,
    gate: &Gate,
    mut enter: impl FnMut(&mut Inner, &dyn Fn(JobId) -> TargetState) -> R,
) -> R {
    let mut known: HashMap<JobId, TargetState> = HashMap::new();
    loop {
        let (jobs, arrays) = {
            let mut inner = daemon.lock();
            let (jobs, arrays) = missing(&inner, gate, &known);
            if jobs.is_empty() && arrays.is_empty() {
                let lookup = |t: JobId| known.get(&t).copied().unwrap_or(TargetState::Live);
                return enter(&mut inner, &lookup);
            }
            (jobs, arrays)
        };
        daemon.store.flush().await;
        for t in jobs {
            let state = daemon.store.target_state(t).unwrap_or(TargetState::Gone);
            known.insert(t, state);
        }
        for (array, tasks) in arrays {
            // Tasks without a record (purged) are gone.
            for t in array..array + JobId::from(tasks) {
                known.insert(t, TargetState::Gone);
            }
            for (t, state) in daemon.store.array_states(array).unwrap_or_default() {
                known.insert(t, state);
            }
        }
    }
}
