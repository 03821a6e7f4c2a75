//! `Usage`: GPU-hours per user over a period (from the store, like `sreport`), with each
//! user's fair-share standing now (from the scheduler core: the very figures the fair policy
//! orders jobs by). Owners see their own row; root sees every user's.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use mgpu_proto::{Response, UsageReport, UsageRequest, UserUsageRow};

use crate::server::{send, send_error, Caller, Conn};
use crate::state::{now_ms, Daemon};
use crate::users;

pub async fn handle(
    daemon: &Arc<Daemon>,
    caller: Caller,
    req: UsageRequest,
    conn: &mut Conn,
) -> Result<()> {
    let by = daemon.requester(caller.uid);
    let only = match &req.user {
        Some(name) => match users::uid_of(name) {
            Some(uid) if by.may_manage(uid) => Some(uid),
            Some(_) => {
                return send_error(
                    conn,
                    format!("permission denied: only {name} or root may see {name}'s usage"),
                )
                .await
            }
            None => return send_error(conn, format!("no such user: {name}")).await,
        },
        None if by.is_admin => None,
        None => Some(caller.uid),
    };
    if let (Some(s), Some(u)) = (req.since, req.until) {
        if s >= u {
            return send_error(conn, "--since must be before --until").await;
        }
    }
    // It reads every record of the period: one of the caller's listing slots, as a listing.
    let _slot = match conn.listing().await {
        Ok(slot) => slot,
        Err(e) => return send_error(conn, format!("{e:#}")).await,
    };
    // The store's part off the lock (one row per user).
    let d = daemon.clone();
    let (since, until) = (req.since, req.until);
    let totals = tokio::task::spawn_blocking(move || d.store.usage(since, until, only)).await??;
    // The scheduler's part: O(users) under the lock.
    let now = now_ms();
    let (standings, queued, policy, half_life_s, gpus) = {
        let inner = daemon.lock();
        let sched = &inner.sched;
        let mut queued: BTreeMap<u32, (u64, u64)> = sched
            .pending_by_user()
            .into_iter()
            .map(|(uid, n)| (uid, (n as u64, 0)))
            .collect();
        for id in inner.running_jobs() {
            if let Some(job) = sched.job(id) {
                queued.entry(job.request.uid).or_default().1 += 1;
            }
        }
        (
            sched.standings(now),
            queued,
            sched.config().policy.as_str().to_string(),
            sched.config().fair.half_life_s,
            sched.gpus().len() as u32,
        )
    };
    let mut rows: BTreeMap<u32, UserUsageRow> = BTreeMap::new();
    let blank = |uid: u32, user: String| UserUsageRow {
        user,
        uid,
        jobs: 0,
        completed: 0,
        gpu_hours: 0.0,
        pending: 0,
        running: 0,
        fairshare_gpu_hours: 0.0,
        weight: 1.0,
        fairshare_priority_s: 0.0,
    };
    for t in totals {
        let row = rows.entry(t.uid).or_insert_with(|| blank(t.uid, t.user));
        row.jobs = t.jobs;
        row.completed = t.completed;
        row.gpu_hours = t.gpu_ms as f64 / 3_600_000.0;
    }
    let wanted = |uid: u32| only.is_none_or(|o| o == uid);
    for s in standings.into_iter().filter(|s| wanted(s.uid)) {
        let row = rows
            .entry(s.uid)
            .or_insert_with(|| blank(s.uid, users::name_of(s.uid)));
        row.fairshare_gpu_hours = s.usage_gpu_s / 3600.0;
        row.weight = s.weight;
        row.fairshare_priority_s = s.priority_s;
    }
    for (uid, (pending, running)) in queued.into_iter().filter(|(u, _)| wanted(*u)) {
        let row = rows
            .entry(uid)
            .or_insert_with(|| blank(uid, users::name_of(uid)));
        row.pending = pending;
        row.running = running;
    }
    // The one asked about, even without any usage.
    if let Some(uid) = only {
        rows.entry(uid)
            .or_insert_with(|| blank(uid, users::name_of(uid)));
    }
    let report = UsageReport {
        now,
        since,
        until,
        policy,
        half_life_s,
        gpus,
        users: rows.into_values().collect(),
    };
    send(conn, &Response::Usage(report)).await
}
