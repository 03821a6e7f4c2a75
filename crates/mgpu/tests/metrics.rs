//! The admin's view: the Prometheus endpoint (`--metrics`) scraped over plain TCP, and the
//! per-user usage summary (`mgpu_acct --summary`), as root and as real users.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The address the server says its metrics endpoint is bound to (it was given port 0).
fn metrics_addr(s: &Server) -> SocketAddr {
    let mut addr = None;
    wait_until(Duration::from_secs(30), || {
        let log = s.server_log();
        addr = log
            .lines()
            .find(|l| l.contains("metrics endpoint listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        addr.is_some()
    });
    addr.unwrap()
}

/// Sends `request` and reads the whole answer (the server closes the connection).
fn http(addr: SocketAddr, request: &[u8]) -> std::io::Result<String> {
    let mut c = TcpStream::connect(addr)?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    c.write_all(request)?;
    let mut out = Vec::new();
    c.read_to_end(&mut out)?;
    Ok(text(&out))
}

fn scrape(addr: SocketAddr) -> String {
    let answer = http(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: application/openmetrics-text"));
    let body = answer.split_once("\r\n\r\n").unwrap().1.to_string();
    assert!(body.ends_with("# EOF\n"), "{body}");
    body
}

/// The value of one sample (`name{labels}` exactly as exposed), if present.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

fn value(body: &str, series: &str) -> f64 {
    sample(body, series).unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

#[test]
fn metrics_show_gpus_jobs_by_state_and_the_latency_histograms() {
    let s = Server::start("2x24GiB", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&s);
    assert!(addr.ip().is_loopback());
    let body = scrape(addr);
    assert_eq!(value(&body, "mgpu_up"), 1.0);
    assert_eq!(value(&body, "mgpu_gpus"), 2.0);
    assert_eq!(value(&body, "mgpu_supervisors"), 0.0);
    assert_eq!(value(&body, "mgpu_gpu_reserved{gpu=\"0\"}"), 0.0);
    assert_eq!(
        value(&body, "mgpu_gpu_memory_total_bytes{gpu=\"1\"}"),
        24.0 * 1024.0 * 1024.0 * 1024.0
    );
    assert_eq!(value(&body, "mgpu_queue_wait_seconds_count"), 0.0);

    // One job runs to its end; then one holds 1 GiB of a GPU while a two-GPU job waits.
    s.ok("mgpu_srun", &["--", "true"]);
    let blocker = s.detached(&["--mem", "1G", "--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let big = s.detached(&["--gpus", "2", "--", "true"]);
    assert_eq!(s.job(big).unwrap()["state"], "PENDING");
    let gpu = s.job(blocker).unwrap()["gpu_ids"][0].as_u64().unwrap();
    // A follower holds a connection to the daemon's socket open.
    let mut follower = s
        .cmd("mgpu_log")
        .args(["--follow", &blocker.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The blocker's supervisor is started off the scheduling path: wait for it to count.
    let mut body = String::new();
    wait_until(Duration::from_secs(30), || {
        body = scrape(addr);
        sample(
            &body,
            "mgpu_dispatch_latency_seconds_count{stage=\"launched\"}",
        ) == Some(2.0)
            && sample(&body, "mgpu_connections_open").is_some_and(|n| n >= 1.0)
    });
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(
        value(&body, "mgpu_jobs{user=\"root\",state=\"RUNNING\"}"),
        1.0
    );
    assert_eq!(
        value(&body, "mgpu_jobs{user=\"root\",state=\"PENDING\"}"),
        1.0
    );
    assert_eq!(value(&body, "mgpu_supervisors"), 1.0);
    let other = 1 - gpu;
    assert_eq!(
        value(&body, &format!("mgpu_gpu_reserved{{gpu=\"{gpu}\"}}")),
        1.0
    );
    assert_eq!(
        value(&body, &format!("mgpu_gpu_jobs{{gpu=\"{gpu}\"}}")),
        1.0
    );
    assert_eq!(
        value(&body, &format!("mgpu_gpu_reserved{{gpu=\"{other}\"}}")),
        0.0
    );
    assert_eq!(
        value(
            &body,
            &format!("mgpu_gpu_memory_reserved_bytes{{gpu=\"{gpu}\"}}")
        ),
        1024.0 * 1024.0 * 1024.0
    );
    assert_eq!(value(&body, "mgpu_queue_wait_seconds_count"), 2.0);
    assert_eq!(
        value(
            &body,
            "mgpu_dispatch_latency_seconds_count{stage=\"decided\"}"
        ),
        2.0
    );
    assert_eq!(
        value(&body, "mgpu_jobs_ended_total{state=\"COMPLETED\"}"),
        1.0
    );
    assert!(value(&body, "mgpu_user_gpu_seconds_total{user=\"root\"}") >= 0.0);
    assert!(value(&body, "mgpu_store_commit_seconds_count") > 0.0);
    assert_eq!(value(&body, "mgpu_store_write_errors_total"), 0.0);
    assert!(value(&body, "mgpu_uptime_seconds") >= 0.0);

    // The blocker goes; the big job runs and ends.
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
    s.acct(big);
    wait_until(Duration::from_secs(30), || {
        body = scrape(addr);
        sample(&body, "mgpu_jobs_ended_total{state=\"COMPLETED\"}") == Some(2.0)
    });
    assert_eq!(
        value(&body, "mgpu_jobs_ended_total{state=\"CANCELLED\"}"),
        1.0
    );
    assert_eq!(value(&body, "mgpu_queue_wait_seconds_count"), 3.0);
    assert_eq!(
        sample(&body, "mgpu_jobs{user=\"root\",state=\"PENDING\"}"),
        None
    );
    assert_eq!(value(&body, "mgpu_gpu_reserved{gpu=\"0\"}"), 0.0);
    assert_eq!(value(&body, "mgpu_supervisors"), 0.0);
    // The blocker held one GPU for at least as long as the queue saw it running.
    assert!(value(&body, "mgpu_user_gpu_seconds_total{user=\"root\"}") > 0.0);
}

#[test]
fn metrics_refuse_huge_slow_and_other_requests_without_stalling_the_daemon() {
    // Spelled out: every network. Logged as a warning.
    let s = Server::start("2x24GiB", &["--metrics", "0.0.0.0:0"]);
    let bound = metrics_addr(&s);
    assert!(
        s.server_log().contains("non-loopback"),
        "{}",
        s.server_log()
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", bound.port()).parse().unwrap();

    // Anything but GET /metrics is 404.
    let answer = http(addr, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = http(addr, b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // A request head over the bound is refused (or the connection is cut) at 8 KiB, not read
    // to its end.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Junk: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge.extend_from_slice(b"\r\n\r\n");
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let _ = c.write_all(&huge);
    let mut out = Vec::new();
    // The server answers and closes (or resets) the connection: it does not leave it hanging.
    if let Err(e) = c.read_to_end(&mut out) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server left an over-long request hanging"
        );
    }
    let answer = text(&out);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );

    // Silent clients take every scrape slot (and more wait)...
    let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // ... a scrape, which sends its request at once, takes the slot of the oldest of them
    // (they cannot keep it out by reconnecting)...
    let answer = http(addr, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // ... and the daemon serves its users all the same.
    s.ok("mgpu_srun", &["--", "true"]);
    let id = s.detached(&["--", "true"]);
    s.acct(id);
    let mut body = String::new();
    wait_until(Duration::from_secs(60), || {
        match http(addr, b"GET /metrics HTTP/1.0\r\n\r\n") {
            Ok(a) if a.starts_with("HTTP/1.1 200") => {
                body = a;
                true
            }
            _ => false,
        }
    });
    assert!(
        body.contains("mgpu_jobs_ended_total{state=\"COMPLETED\"} 2"),
        "{body}"
    );
    drop(silent);
}

fn summary_as(s: &Server, user: Option<&TestUser>, args: &[&str]) -> Value {
    let mut c = match user {
        Some(u) => s.cmd_as(u, "mgpu_acct"),
        None => s.cmd("mgpu_acct"),
    };
    let out = c.args(["--summary", "--json"]).args(args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn row<'a>(report: &'a Value, user: &str) -> &'a Value {
    report["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["user"] == user)
        .unwrap_or_else(|| panic!("no row for {user}: {report}"))
}

/// GPU-hours of a user's jobs as `mgpu_acct` lists them.
fn acct_gpu_hours(s: &Server, user: &str) -> (usize, f64) {
    let out = s.ok("mgpu_acct", &["--json", "--user", user]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    (
        jobs.len(),
        jobs.iter().map(|j| j["gpu_hours"].as_f64().unwrap()).sum(),
    )
}

#[test]
fn usage_summary_gives_gpu_hours_and_fair_share_standing_per_user() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&s);
    // a holds both GPUs for 2 s, twice; b one GPU briefly.
    for _ in 0..2 {
        let out = s
            .cmd_as(&a, "mgpu_srun")
            .args(["--gpus", "2", "--", "sleep", "2"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = s
        .cmd_as(&b, "mgpu_srun")
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A job of b's waits behind a blocker of root's.
    let blocker = s.detached(&["--gpus", "2", "--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let waiting = s.detached_as(&b, &["--", "true"]);
    assert_eq!(s.job(waiting).unwrap()["state"], "PENDING");

    // A user sees their own row only.
    let mine = summary_as(&s, Some(&a), &[]);
    assert_eq!(mine["users"].as_array().unwrap().len(), 1, "{mine}");
    let ra = row(&mine, &a.name);
    assert_eq!(ra["jobs"], 2);
    assert_eq!(ra["completed"], 2);
    let (n, hours) = acct_gpu_hours(&s, &a.name);
    assert_eq!(n, 2);
    // The same jobs as mgpu_acct's rows, to the millisecond (rows once dropped fractions
    // of seconds: several percent of short jobs).
    let summed = ra["gpu_hours"].as_f64().unwrap();
    assert!((summed - hours).abs() < 1e-9, "{summed} vs {hours}");
    assert!(summed >= 2.0 * 2.0 * 2.0 / 3600.0, "{summed}");
    assert_eq!(mine["policy"], "fair");
    assert!(ra["fairshare"]["usage_gpu_hours"].as_f64().unwrap() > 0.0);
    assert!(ra["fairshare"]["priority_s"].as_f64().unwrap() < 0.0);
    assert_eq!(ra["fairshare"]["weight"], 1.0);
    // Another user's needs root.
    let out = s
        .cmd_as(&a, "mgpu_acct")
        .args(["--summary", "--user", &b.name])
        .output()
        .unwrap();
    assert_fails_with(&out, "permission denied");

    // Root sees everyone: a used more than b, and stands lower in fair share.
    let all = summary_as(&s, None, &[]);
    let (ra, rb) = (row(&all, &a.name), row(&all, &b.name));
    assert_eq!(rb["jobs"], 1);
    assert_eq!(
        (rb["pending"].as_u64(), rb["running"].as_u64()),
        (Some(1), Some(0))
    );
    assert_eq!(row(&all, "root")["running"], 1);
    assert!(ra["gpu_hours"].as_f64().unwrap() > rb["gpu_hours"].as_f64().unwrap());
    assert!(
        ra["fairshare"]["priority_s"].as_f64().unwrap()
            < rb["fairshare"]["priority_s"].as_f64().unwrap()
    );
    let total = all["total_gpu_hours"].as_f64().unwrap();
    assert!(
        (total - (ra["gpu_hours"].as_f64().unwrap() + rb["gpu_hours"].as_f64().unwrap())).abs()
            < 1e-9
    );

    // A period before any job: no jobs, no GPU-hours; the standing is still now's.
    let old = summary_as(
        &s,
        None,
        &["--since", "2020-01-01", "--until", "2020-02-01"],
    );
    let ra_old = row(&old, &a.name);
    assert_eq!(
        (ra_old["jobs"].as_u64(), ra_old["gpu_hours"].as_f64()),
        (Some(0), Some(0.0))
    );
    assert!(ra_old["fairshare"]["usage_gpu_hours"].as_f64().unwrap() > 0.0);
    let out = s
        .cmd("mgpu_acct")
        .args([
            "--summary",
            "--since",
            "2020-02-01",
            "--until",
            "2020-01-01",
        ])
        .output()
        .unwrap();
    assert_fails_with(&out, "--since must be before --until");

    // The table names every user.
    let table = s.ok("mgpu_acct", &["--summary"]);
    assert!(
        table.contains("GPU-HOURS") && table.contains("FS-PRIORITY"),
        "{table}"
    );
    assert!(
        table.contains(&a.name) && table.contains(&b.name),
        "{table}"
    );

    // The metrics label the same users.
    let body = scrape(addr);
    let a_secs = value(
        &body,
        &format!("mgpu_user_gpu_seconds_total{{user=\"{}\"}}", a.name),
    );
    assert!(a_secs >= 8.0, "{a_secs}");
    assert_eq!(
        value(
            &body,
            &format!("mgpu_jobs{{user=\"{}\",state=\"PENDING\"}}", b.name)
        ),
        1.0
    );
    assert!(
        value(
            &body,
            &format!(
                "mgpu_user_fairshare_priority_seconds{{user=\"{}\"}}",
                a.name
            )
        ) < 0.0
    );
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
}

#[test]
fn metrics_show_what_nvml_measures() {
    // The fake NVML (crates/mgpu-fake-nvml): a process outside every job uses 2 GiB of GPU 0,
    // which is 35% busy.
    let dir = tempfile::Builder::new()
        .prefix("mgpu-fake-nvml-")
        .tempdir()
        .unwrap();
    let state = dir.path().join("state");
    let mut outsider = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .unwrap();
    mgpu_fake_nvml::write_state(
        &state,
        &format!(
            "gpu 0 24GiB util 35 10\ngpu 1 24GiB\npid {} uses 2GiB on GPU 0\n",
            outsider.id()
        ),
    )
    .unwrap();
    let lib = mgpu_fake_nvml::find_library().expect("the fake NVML library is built");
    let s = Server::start_with_env(
        "",
        &[
            "--nvml-lib",
            lib.to_str().unwrap(),
            "--metrics",
            "127.0.0.1:0",
        ],
        &[(mgpu_fake_nvml::STATE_ENV, state.as_os_str())],
    );
    let addr = metrics_addr(&s);
    let gib = 1024.0 * 1024.0 * 1024.0;
    let mut body = String::new();
    wait_until(Duration::from_secs(30), || {
        body = scrape(addr);
        sample(&body, "mgpu_gpu_memory_used_bytes{gpu=\"0\"}") == Some(2.0 * gib)
    });
    assert_eq!(
        value(&body, "mgpu_gpu_utilization_percent{gpu=\"0\"}"),
        35.0
    );
    assert_eq!(value(&body, "mgpu_gpu_foreign_processes{gpu=\"0\"}"), 1.0);
    assert_eq!(value(&body, "mgpu_gpu_foreign_processes{gpu=\"1\"}"), 0.0);
    assert_eq!(value(&body, "mgpu_gpu_memory_used_bytes{gpu=\"1\"}"), 0.0);
    assert_eq!(
        value(&body, "mgpu_gpu_memory_total_bytes{gpu=\"0\"}"),
        24.0 * gib
    );
    let _ = outsider.kill();
    let _ = outsider.wait();
}

#[test]
fn a_context_switch_is_counted_and_its_earlier_run_is_in_the_usage() {
    let s = Server::start("1x24GiB", &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&s);
    // A job that holds its GPU past its 1 s slice on its first run, and ends on its second.
    let switched = s.detached(&[
        "-t",
        "1s",
        "--",
        "bash",
        "-c",
        "[ \"$MGPU_RESTART_COUNT\" = 1 ] && exit 0; sleep 60",
    ]);
    s.wait_state(switched, "RUNNING");
    let waiting = s.detached(&["--", "sleep", "1"]);
    let rec = s.acct(switched);
    s.acct(waiting);
    assert_eq!(rec["restarts"], 1, "{rec}");
    let body = scrape(addr);
    assert_eq!(
        value(&body, "mgpu_context_switches_total{user=\"root\"}"),
        1.0
    );
    // Three runs started: the switched job twice, the waiting one once.
    assert_eq!(value(&body, "mgpu_queue_wait_seconds_count"), 3.0);
    // Its first run (at least its 1 s slice) is in the summary, as in mgpu_acct.
    let report = summary_as(&s, None, &[]);
    let root = row(&report, "root");
    assert_eq!(root["jobs"], 2);
    let (_, acct_hours) = acct_gpu_hours(&s, "root");
    let hours = root["gpu_hours"].as_f64().unwrap();
    // (The same milliseconds summed two ways: equal but for rounding.)
    assert!(
        (hours - acct_hours).abs() <= 1e-9,
        "{hours} vs {acct_hours}"
    );
    assert!(
        hours >= 2.0 / 3600.0,
        "the slice and the waiting job's second: {hours}"
    );
    assert!(value(&body, "mgpu_user_gpu_seconds_total{user=\"root\"}") >= 2.0);
}

#[test]
fn a_metrics_address_that_cannot_be_had_stops_the_server_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let sock = dir.path().join("mgpu.sock");
    let run = |addr: &str| {
        server_cmd(&sock, dir.path().join("state"), dir.path().join("logs"))
            .args(["--simulate-gpus", "1x24GiB", "--metrics", addr])
            .output()
            .unwrap()
    };
    let out = run(&port);
    assert_fails_with(&out, &format!("--metrics: binding 127.0.0.1:{port}"));
    assert!(!sock.exists(), "no socket is left behind");
    assert_fails_with(&run("example.org:80"), "invalid --metrics 'example.org:80'");
    drop(taken);
}
