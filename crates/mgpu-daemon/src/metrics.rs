//! Prometheus metrics, served on an opt-in plain-HTTP endpoint (`--metrics ADDR`).
//!
//! Two kinds of figures (every name is listed in docs/metrics.md):
//! - event figures (histograms and counters), updated where the event happens with a few
//!   atomic operations: queue wait, dispatch latency, GPU-seconds per user, context switches,
//!   jobs ended, store commits, connections;
//! - state figures (gauges), read from the daemon at scrape time: per GPU, jobs per user and
//!   state, fair-share standing, supervisors. The snapshot under the daemon's lock is O(GPUs +
//!   users + running jobs), never O(queued jobs); user names are resolved and the text encoded
//!   off the lock.
//!
//! The endpoint is a deliberately tiny HTTP/1.x server: one `GET /metrics` per connection
//! (anything else is 404), a request head of at most [`MAX_REQUEST`] bytes read within
//! [`READ_DEADLINE`], the answer written within [`WRITE_DEADLINE`], and at most
//! [`MAX_SCRAPERS`] connections at once. When all are taken, a new connection takes the slot
//! of the one that has waited longest without sending its request (closed at once if every
//! one has sent it): a local user reconnecting in a loop cannot keep a real scraper out, since
//! a scraper sends its request as soon as it connects. It runs on the daemon's runtime but
//! never waits on a scraper: a slow or hostile client costs a connection slot, never the
//! scheduler.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mgpu_core::{JobId, JobState, Millis};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::state::{now_ms, Daemon, Inner};

/// Largest request head accepted (request line and headers).
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a scraper may take to send its request.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// How long a scraper may take to read the answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Scrape connections served at once (see the module's notes for a ninth).
pub const MAX_SCRAPERS: usize = 8;

/// The connections still waiting for their request head, oldest first: each one's id and
/// what cuts it off to make room for a newer one.
type Reading = Arc<Mutex<std::collections::VecDeque<(u64, tokio::sync::oneshot::Sender<()>)>>>;

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserLabel {
    user: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UserStateLabel {
    user: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~105 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

/// The store writer's figures (it updates them itself, on its thread).
#[derive(Debug)]
pub struct StoreStats {
    commit_seconds: Histogram,
    errors: Counter,
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            commit_seconds: latency_histogram(),
            errors: Counter::default(),
        }
    }
}

impl StoreStats {
    /// One transaction of the writer took `took`; `ok`: it committed.
    pub fn commit(&self, took: Duration, ok: bool) {
        if ok {
            self.commit_seconds.observe(took.as_secs_f64());
        } else {
            self.errors.inc();
        }
    }
}

/// The gauges set from a snapshot at each scrape.
struct StateGauges {
    up: Gauge,
    uptime: FloatGauge,
    start_time: FloatGauge,
    gpus: Gauge,
    gpu_reserved: Family<GpuLabel, Gauge>,
    gpu_jobs: Family<GpuLabel, Gauge>,
    gpu_total_bytes: Family<GpuLabel, Gauge>,
    gpu_reserved_bytes: Family<GpuLabel, Gauge>,
    gpu_used_bytes: Family<GpuLabel, Gauge>,
    gpu_util: Family<GpuLabel, Gauge>,
    gpu_foreign: Family<GpuLabel, Gauge>,
    jobs: Family<UserStateLabel, Gauge>,
    fair_usage: Family<UserLabel, FloatGauge>,
    fair_priority: Family<UserLabel, FloatGauge>,
    supervisors: Gauge,
}

/// The daemon's metrics: always kept (a few atomic operations per event), served only with
/// `--metrics`.
pub struct Metrics {
    started: Instant,
    started_unix: f64,
    queue_wait: Histogram,
    dispatch: Family<StageLabel, Histogram, fn() -> Histogram>,
    gpu_seconds: Family<UserLabel, FloatCounter>,
    switches: Family<UserLabel, Counter>,
    ended: Family<StateLabel, Counter>,
    connections: Gauge,
    /// The registry and the gauges it shows, one scrape at a time.
    scrape: Mutex<(Registry, StateGauges)>,
    /// User names by uid, for labels (resolved off the daemon's lock).
    names: Mutex<HashMap<u32, String>>,
}

impl Metrics {
    pub fn new(store: &StoreStats) -> Metrics {
        let mut r = Registry::with_prefix("mgpu");
        let m = Metrics {
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            queue_wait: Histogram::new(exponential_buckets(0.1, 4.0, 10)),
            dispatch: Family::new_with_constructor(latency_histogram),
            gpu_seconds: Family::default(),
            switches: Family::default(),
            ended: Family::default(),
            connections: Gauge::default(),
            scrape: Mutex::new((Registry::default(), empty_gauges())),
            names: Mutex::default(),
        };
        let g = empty_gauges();
        r.register("up", "1 while the daemon serves", g.up.clone());
        r.register(
            "uptime_seconds",
            "Seconds since the daemon started",
            g.uptime.clone(),
        );
        r.register(
            "start_time_seconds",
            "When the daemon started, in seconds since the epoch",
            g.start_time.clone(),
        );
        r.register("gpus", "GPUs the daemon schedules", g.gpus.clone());
        r.register(
            "gpu_reserved",
            "1 when a job holds the GPU (exclusively or a share of its memory)",
            g.gpu_reserved.clone(),
        );
        r.register("gpu_jobs", "Jobs running on the GPU", g.gpu_jobs.clone());
        r.register(
            "gpu_memory_total_bytes",
            "The GPU's memory",
            g.gpu_total_bytes.clone(),
        );
        r.register(
            "gpu_memory_reserved_bytes",
            "GPU memory reserved by jobs (all of it for an exclusive job)",
            g.gpu_reserved_bytes.clone(),
        );
        r.register(
            "gpu_memory_used_bytes",
            "GPU memory in use as the backend last measured it (NVML; simulated GPUs report the reservations)",
            g.gpu_used_bytes.clone(),
        );
        r.register(
            "gpu_utilization_percent",
            "Percent of time a kernel ran, where NVML reports it",
            g.gpu_util.clone(),
        );
        r.register(
            "gpu_foreign_processes",
            "Processes on the GPU that belong to no mgpu job, where NVML reports them",
            g.gpu_foreign.clone(),
        );
        r.register(
            "jobs",
            "Jobs waiting or running, per user and state (PENDING, RUNNING)",
            g.jobs.clone(),
        );
        r.register(
            "user_fairshare_usage_gpu_seconds",
            "A user's recent GPU usage as fair share counts it (decayed with the half-life)",
            g.fair_usage.clone(),
        );
        r.register(
            "user_fairshare_priority_seconds",
            "What that usage costs the user's jobs in priority (0 or less, in seconds of waiting)",
            g.fair_priority.clone(),
        );
        r.register(
            "supervisors",
            "Job supervisors the daemon follows (running jobs' runs)",
            g.supervisors.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time a job waited in the queue before a run started (since its submission or its requeue)",
            m.queue_wait.clone(),
        );
        r.register(
            "dispatch_latency_seconds",
            "From the scheduling event (submit, exit, timer) to the start decided (stage=decided) and its supervisor started (stage=launched)",
            m.dispatch.clone(),
        );
        r.register(
            "user_gpu_seconds",
            "GPUs held times seconds run, per user, counted as runs end (every run, context switches too)",
            m.gpu_seconds.clone(),
        );
        r.register(
            "context_switches",
            "Runs stopped at their time slice and requeued, per user",
            m.switches.clone(),
        );
        r.register(
            "jobs_ended",
            "Jobs that ended, per final state",
            m.ended.clone(),
        );
        r.register(
            "connections_open",
            "Client connections open on the daemon's socket",
            m.connections.clone(),
        );
        r.register(
            "store_commit_seconds",
            "Time the job database took to commit one batch of writes (fsync included)",
            store.commit_seconds.clone(),
        );
        r.register(
            "store_write_errors",
            "Failed writes of the job database (each retried until it sticks)",
            store.errors.clone(),
        );
        *m.scrape.lock().unwrap() = (r, g);
        m
    }

    /// A run is starting: it waited since `queued_at`; its start was decided in a pass that
    /// began at `event`.
    pub fn run_decided(&self, queued_at: Millis, event: Instant) {
        let waited = now_ms().saturating_sub(queued_at) as f64 / 1000.0;
        self.queue_wait.observe(waited);
        self.dispatch
            .get_or_create(&StageLabel { stage: "decided" })
            .observe(event.elapsed().as_secs_f64());
    }

    /// The run's supervisor is started.
    pub fn run_launched(&self, event: Instant) {
        self.dispatch
            .get_or_create(&StageLabel { stage: "launched" })
            .observe(event.elapsed().as_secs_f64());
    }

    /// A run of `user`'s ended after holding `gpus` GPUs for `ms`; `switched`: by a context
    /// switch (the job goes back to the queue).
    pub fn run_ended(&self, user: &str, gpus: usize, ms: Millis, switched: bool) {
        let label = UserLabel { user: user.into() };
        self.gpu_seconds
            .get_or_create(&label)
            .inc_by(gpus as f64 * ms as f64 / 1000.0);
        if switched {
            self.switches.get_or_create(&label).inc();
        }
    }

    pub fn job_ended(&self, state: JobState) {
        self.ended
            .get_or_create(&StateLabel {
                state: state.as_str().into(),
            })
            .inc();
    }

    /// Counts an open client connection until the guard is dropped.
    pub fn connection(&self) -> ConnectionGuard {
        self.connections.inc();
        ConnectionGuard(self.connections.clone())
    }

    fn name_of(&self, uid: u32) -> String {
        if let Some(n) = self.names.lock().unwrap().get(&uid) {
            return n.clone();
        }
        let name = crate::users::name_of(uid);
        self.names.lock().unwrap().insert(uid, name.clone());
        name
    }
}

pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn empty_gauges() -> StateGauges {
    StateGauges {
        up: Gauge::default(),
        uptime: FloatGauge::default(),
        start_time: FloatGauge::default(),
        gpus: Gauge::default(),
        gpu_reserved: Family::default(),
        gpu_jobs: Family::default(),
        gpu_total_bytes: Family::default(),
        gpu_reserved_bytes: Family::default(),
        gpu_used_bytes: Family::default(),
        gpu_util: Family::default(),
        gpu_foreign: Family::default(),
        jobs: Family::default(),
        fair_usage: Family::default(),
        fair_priority: Family::default(),
        supervisors: Gauge::default(),
    }
}

/// What a scrape reads from the daemon under its lock.
struct Snapshot {
    gpus: Vec<GpuRow>,
    /// (uid, pending, running)
    users: HashMap<u32, (usize, usize)>,
    /// Running jobs' user names by uid (known without a lookup).
    names: HashMap<u32, String>,
    standings: Vec<mgpu_core::UserStanding>,
    supervisors: usize,
}

struct GpuRow {
    index: u32,
    jobs: usize,
    total_mib: u64,
    reserved_mib: u64,
    used_mib: Option<u64>,
    util_pct: Option<u32>,
    foreign: Option<usize>,
}

fn snapshot(inner: &Inner) -> Snapshot {
    let sched = &inner.sched;
    let gpus = sched
        .gpus()
        .iter()
        .map(|g| {
            let reading = inner.gpu_readings.get(&g.spec.index);
            GpuRow {
                index: g.spec.index,
                jobs: g.jobs().len(),
                total_mib: g.spec.total_mib,
                reserved_mib: if g.exclusive.is_some() {
                    g.spec.total_mib
                } else {
                    g.reserved_mib
                },
                used_mib: inner.gpu_used.get(&g.spec.index).copied(),
                util_pct: reading.and_then(|r| r.util_pct),
                foreign: reading.map(|r| r.foreign.len()),
            }
        })
        .collect();
    let mut users: HashMap<u32, (usize, usize)> = HashMap::new();
    for (uid, n) in sched.pending_by_user() {
        users.entry(uid).or_default().0 = n;
    }
    let mut names = HashMap::new();
    let running: Vec<JobId> = inner.running_jobs().collect();
    for id in &running {
        if let Some(job) = sched.job(*id) {
            users.entry(job.request.uid).or_default().1 += 1;
            names
                .entry(job.request.uid)
                .or_insert_with(|| job.request.user.clone());
        }
    }
    Snapshot {
        gpus,
        users,
        names,
        standings: sched.standings(now_ms()),
        supervisors: running.len(),
    }
}

/// The metrics in the OpenMetrics text format.
pub fn render(daemon: &Daemon) -> String {
    let snap = snapshot(&daemon.lock());
    let m = &daemon.metrics;
    {
        let mut names = m.names.lock().unwrap();
        for (uid, name) in &snap.names {
            names.entry(*uid).or_insert_with(|| name.clone());
        }
    }
    let scrape = m.scrape.lock().unwrap_or_else(|p| p.into_inner());
    let (registry, g) = &*scrape;
    g.up.set(1);
    g.uptime.set(m.started.elapsed().as_secs_f64());
    g.start_time.set(m.started_unix);
    g.gpus.set(snap.gpus.len() as i64);
    for fam in [
        &g.gpu_reserved,
        &g.gpu_jobs,
        &g.gpu_total_bytes,
        &g.gpu_reserved_bytes,
        &g.gpu_used_bytes,
        &g.gpu_util,
        &g.gpu_foreign,
    ] {
        fam.clear();
    }
    g.jobs.clear();
    g.fair_usage.clear();
    g.fair_priority.clear();
    const MIB: i64 = 1 << 20;
    for row in &snap.gpus {
        let l = GpuLabel {
            gpu: row.index.to_string(),
        };
        g.gpu_reserved
            .get_or_create(&l)
            .set(i64::from(row.jobs > 0));
        g.gpu_jobs.get_or_create(&l).set(row.jobs as i64);
        g.gpu_total_bytes
            .get_or_create(&l)
            .set(row.total_mib as i64 * MIB);
        g.gpu_reserved_bytes
            .get_or_create(&l)
            .set(row.reserved_mib as i64 * MIB);
        if let Some(used) = row.used_mib {
            g.gpu_used_bytes.get_or_create(&l).set(used as i64 * MIB);
        }
        if let Some(u) = row.util_pct {
            g.gpu_util.get_or_create(&l).set(i64::from(u));
        }
        if let Some(f) = row.foreign {
            g.gpu_foreign.get_or_create(&l).set(f as i64);
        }
    }
    for (uid, (pending, running)) in &snap.users {
        let user = m.name_of(*uid);
        for (state, n) in [("PENDING", pending), ("RUNNING", running)] {
            g.jobs
                .get_or_create(&UserStateLabel {
                    user: user.clone(),
                    state: state.into(),
                })
                .set(*n as i64);
        }
    }
    for s in &snap.standings {
        let l = UserLabel {
            user: m.name_of(s.uid),
        };
        g.fair_usage.get_or_create(&l).set(s.usage_gpu_s);
        g.fair_priority.get_or_create(&l).set(s.priority_s);
    }
    g.supervisors.set(snap.supervisors as i64);
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    out
}

/// Parses `--metrics`: `PORT` (on the loopback address), or `HOST:PORT` / `[V6]:PORT`.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = t.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        }
    }
    Err(format!(
        "invalid --metrics '{text}': give a port (9464, on 127.0.0.1) or an address and port \
         (127.0.0.1:9464, [::1]:9464; 0.0.0.0:9464 serves every network)"
    ))
}

/// Starts the metrics endpoint, if asked for (`--metrics`): binds now (a bad address stops
/// the daemon from starting), then serves in the background.
pub async fn start(daemon: &Arc<Daemon>, addr: Option<SocketAddr>) -> Result<()> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics: binding {addr}"))?;
    let bound = listener.local_addr().unwrap_or(addr);
    if addr.ip().is_loopback() {
        tracing::info!(addr = %bound, "metrics endpoint listening (GET /metrics)");
    } else {
        tracing::warn!(
            addr = %bound,
            "metrics endpoint listening on a non-loopback address: anyone who can reach it \
             sees user names and job counts (GET /metrics)"
        );
    }
    tokio::spawn(serve(daemon.clone(), listener));
    Ok(())
}

async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
    let reading: Reading = Arc::default();
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // All slots taken: the oldest connection still without a request gives its
                // slot up (it ends at once); none: this one is closed at once (a scraper
                // retries at its next interval).
                let oldest = reading
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                let Some((_, cut)) = oldest else {
                    tracing::debug!("metrics: too many scrape connections; closing one");
                    continue;
                };
                let _ = cut.send(());
                match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(slot)) => slot,
                    _ => continue,
                }
            }
        };
        next_id += 1;
        let id = next_id;
        let (cut, cut_off) = tokio::sync::oneshot::channel();
        (reading.lock().unwrap_or_else(|p| p.into_inner())).push_back((id, cut));
        let daemon = daemon.clone();
        let reading = reading.clone();
        tokio::spawn(async move {
            let done_reading = || {
                (reading.lock().unwrap_or_else(|p| p.into_inner())).retain(|(i, _)| *i != id);
            };
            if let Err(e) = answer(&daemon, stream, cut_off, &done_reading).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
            done_reading();
            drop(slot);
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    /// Not HTTP, or over [`MAX_REQUEST`].
    Bad,
}

fn parse_request(head: &[u8]) -> Asked {
    let Ok(text) = std::str::from_utf8(head) else {
        return Asked::Bad;
    };
    let mut parts = text.lines().next().unwrap_or("").split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Asked::Bad;
    }
    let path = target.unwrap_or("").split('?').next().unwrap_or("");
    if method == Some("GET") && path == "/metrics" {
        Asked::Metrics
    } else {
        Asked::NotFound
    }
}

/// Reads one request head (bounded in size and time) and answers it.
/// `cut_off` fires (or is dropped) when a newer connection takes its slot before its request
/// came; `done_reading` is called once it has.
async fn answer(
    daemon: &Arc<Daemon>,
    mut stream: TcpStream,
    cut_off: tokio::sync::oneshot::Receiver<()>,
    done_reading: &(dyn Fn() + Sync),
) -> Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let room = (MAX_REQUEST - head.len()).min(buf.len());
            let n = stream.read(&mut buf[..room]).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
    };
    let complete = tokio::select! {
        r = tokio::time::timeout(READ_DEADLINE, read) => match r {
            Ok(r) => r?,
            Err(_) => anyhow::bail!("no complete request within {READ_DEADLINE:?}"),
        },
        _ = cut_off => anyhow::bail!("no request yet; its slot went to a newer connection"),
    };
    done_reading();
    let asked = if complete {
        parse_request(&head)
    } else {
        Asked::Bad
    };
    let (status, body, kind) = match asked {
        Asked::Metrics => {
            let d = daemon.clone();
            let body = tokio::task::spawn_blocking(move || render(&d)).await?;
            (
                "200 OK",
                body,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        Asked::NotFound => (
            "404 Not Found",
            "not found: try GET /metrics\n".to_string(),
            "text/plain; charset=utf-8",
        ),
        Asked::Bad => (
            "400 Bad Request",
            format!("bad request (at most {MAX_REQUEST} bytes of request head)\n"),
            "text/plain; charset=utf-8",
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::time::timeout(WRITE_DEADLINE, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await
    .context("the scraper did not read the answer in time")??;
    Ok(())
}

/// Milliseconds between two times, for GPU-time accounting.
pub fn run_ms(started_at: Option<Millis>, now: Millis) -> Millis {
    started_at.map_or(0, |s| now.saturating_sub(s))
}

/// Total of a user's counter (tests).
#[cfg(test)]
fn gpu_seconds_of(m: &Metrics, user: &str) -> f64 {
    m.gpu_seconds
        .get_or_create(&UserLabel { user: user.into() })
        .get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_default_to_loopback() {
        assert_eq!(parse_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(
            parse_addr("localhost:9464").unwrap().to_string(),
            "127.0.0.1:9464"
        );
        assert_eq!(parse_addr("[::1]:1").unwrap().to_string(), "[::1]:1");
        assert_eq!(parse_addr("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert!(parse_addr("example.org:80").is_err());
        assert!(parse_addr("70000").is_err());
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Asked::NotFound
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), Asked::NotFound);
        assert_eq!(parse_request(b"hello\r\n\r\n"), Asked::Bad);
        assert_eq!(parse_request(&[0xff, 0xfe, b'\n', b'\n']), Asked::Bad);
    }

    #[test]
    fn gpu_seconds_add_up_per_user() {
        let m = Metrics::new(&StoreStats::default());
        m.run_ended("alice", 2, 1500, false);
        m.run_ended("alice", 1, 1000, true);
        m.run_ended("bob", 1, 500, false);
        assert!((gpu_seconds_of(&m, "alice") - 4.0).abs() < 1e-9);
        assert!((gpu_seconds_of(&m, "bob") - 0.5).abs() < 1e-9);
        let text = {
            let s = m.scrape.lock().unwrap();
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &s.0).unwrap();
            out
        };
        assert!(
            text.contains("mgpu_context_switches_total{user=\"alice\"} 1"),
            "{text}"
        );
        assert!(text.contains("mgpu_user_gpu_seconds_total{user=\"bob\"} 0.5"));
    }
}
