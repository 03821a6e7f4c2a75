//! Job ids as Slurm users write them on the command line: `17`, or `17_3` for task 3 of job
//! array 17 (squeue's and sacct's `ID_TASK`). The server looks the tasks up (as for
//! `mgpu_control`), finished or not; plain ids need no lookup.

use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Result};
use mgpu_core::JobId;
use mgpu_proto::{ControlRequest, Request, Response};

use crate::client::Client;

/// A job named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRef {
    Id(JobId),
    /// Task `task` of the job array whose id is `array`.
    Task {
        array: JobId,
        task: u32,
    },
}

impl FromStr for JobRef {
    type Err = String;

    fn from_str(text: &str) -> Result<JobRef, String> {
        let t = text.trim();
        let bad = || format!("invalid job id '{t}' (e.g. 12, or 12_3 for task 3 of job array 12)");
        // Digits only: `parse` would take a sign.
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match t.split_once('_') {
            None if digits(t) => t.parse().map(JobRef::Id).map_err(|_| bad()),
            Some((a, k)) if digits(a) && digits(k) => Ok(JobRef::Task {
                array: a.parse().map_err(|_| bad())?,
                task: k.parse().map_err(|_| bad())?,
            }),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for JobRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobRef::Id(id) => write!(f, "{id}"),
            JobRef::Task { array, task } => write!(f, "{array}_{task}"),
        }
    }
}

/// The job ids `refs` stand for, in order; array tasks are asked of the server in one
/// request (an error names a task that does not exist).
pub async fn resolve(socket: Option<&Path>, prog: &str, refs: &[JobRef]) -> Result<Vec<JobId>> {
    let tasks: Vec<String> = refs
        .iter()
        .filter(|r| matches!(r, JobRef::Task { .. }))
        .map(JobRef::to_string)
        .collect();
    let mut found = Vec::new();
    if !tasks.is_empty() {
        let mut client = Client::connect(socket, prog).await?;
        let request = Request::Control(ControlRequest::Resolve { jobs: tasks });
        match client.call(&request).await? {
            Response::Control { lines, ok: true } => {
                for line in lines {
                    match line.parse::<JobId>() {
                        Ok(id) => found.push(id),
                        Err(_) => bail!("unexpected answer from the server: {line}"),
                    }
                }
            }
            other => bail!("unexpected answer from the server: {other:?}"),
        }
    }
    let mut found = found.into_iter();
    let mut ids = Vec::with_capacity(refs.len());
    for r in refs {
        ids.push(match r {
            JobRef::Id(id) => *id,
            JobRef::Task { .. } => match found.next() {
                Some(id) => id,
                None => bail!("the server did not resolve {r}"),
            },
        });
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::JobRef;

    #[test]
    fn ids_and_array_tasks_parse() {
        assert_eq!("17".parse(), Ok(JobRef::Id(17)));
        assert_eq!(" 17_3".parse(), Ok(JobRef::Task { array: 17, task: 3 }));
        for bad in [
            "", "x", "+17", "17_", "_3", "17_3_1", "17_-1", "17_+1", "1 7",
        ] {
            let err = bad.parse::<JobRef>().unwrap_err();
            assert!(err.contains("invalid job id"), "{bad}: {err}");
        }
        assert_eq!(JobRef::Task { array: 4, task: 0 }.to_string(), "4_0");
    }
}
