//! Fuzzing of every request handler through a real server: mutated requests of every kind
//! (and garbage), each on its own connection, sent by an unprivileged account (root's requests
//! would run fuzzed commands as root). Whatever arrives, the server answers or hangs up, keeps
//! serving, and never panics.
//!
//! CI runs `MGPU_FUZZ_CASES` cases (default 300). A longer run:
//! `MGPU_FUZZ_CASES=20000 cargo test --release -p mgpu --test fuzz_requests -- --nocapture`.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use mgpu_proto::{read_frame, write_frame, Frame, PROTOCOL_VERSION};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

/// Valid requests of every kind; the fuzzer mutates one value in them.
fn templates(cwd: &str) -> Vec<Value> {
    vec![
        json!({"type": "submit", "name": "fz", "gpus": 1, "mem_mib": 1024, "time_limit_s": 60,
               "command": ["true"], "cwd": cwd, "env": [["PATH", "/usr/bin:/bin"]],
               "venv": "off", "attach": false, "umask": 18, "no_requeue": false,
               "max_restarts": 3, "signal": null, "nice": 0, "array": null, "array_limit": null}),
        json!({"type": "submit", "name": "fz", "gpus": 0, "mem_mib": null, "time_limit_s": null,
               "command": ["true"], "cwd": cwd, "env": [], "venv": "off", "attach": true}),
        json!({"type": "submit", "name": "fz", "gpus": 1, "command": ["true"], "cwd": cwd,
               "env": [], "venv": "auto", "attach": false, "array": [0, 1, 7], "array_limit": 1}),
        json!({"type": "queue", "user": null, "me": false, "job": null}),
        json!({"type": "queue", "user": "root", "me": true, "job": 1}),
        json!({"type": "cancel", "jobs": [1, 2]}),
        json!({"type": "cancel", "array": 1}),
        json!({"type": "cancel", "user": "root"}),
        json!({"type": "cancel", "all": null}),
        json!({"type": "log", "job": 1, "follow": false}),
        json!({"type": "log", "job": 1, "follow": true}),
        json!({"type": "attach", "job": 1, "log_offset": 0}),
        json!({"type": "acct", "user": null, "me": false, "job": null, "since": null, "state": null}),
        json!({"type": "usage", "since": 0, "until": null, "user": "root"}),
        json!({"type": "cancel_attached"}),
        json!({"type": "control", "hold": {"jobs": ["1", "2_3"]}}),
        json!({"type": "control", "release": {"jobs": ["1"]}}),
        json!({"type": "control", "update": {"job": "1", "changes": [["TimeLimit", "5"], ["Gpus", "2"]]}}),
        json!({"type": "control", "show": {"job": "1"}}),
        json!({"type": "control", "drain_gpu": {"index": 0, "reason": "x"}}),
        json!({"type": "control", "resume_gpu": {"index": 0}}),
        json!({"type": "control", "drain_server": {"reason": null}}),
        json!({"type": "control", "resume_server": null}),
        json!({"type": "submit", "name": "fz", "gpus": 1, "command": ["true"], "cwd": cwd,
               "env": [], "venv": "off", "attach": false, "dependency": "afterok:1", "hold": true}),
        json!({"type": "hello", "protocol": PROTOCOL_VERSION, "client": "again"}),
    ]
}

/// Values that tend to find edge cases: limits, wrong types, odd text.
fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(u32::MAX as u64),
            Just(u64::MAX),
            Just(i64::MAX as u64),
            0u64..100
        ]
        .prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(-1)),
        Just(json!(1e300)),
        ".{0,24}".prop_map(Value::String),
        Just(Value::String("\u{202e}evil\u{2066}".into())),
        Just(Value::String("../../../../etc/shadow".into())),
        Just(Value::String("x".repeat(70_000))),
    ];
    leaf.prop_recursive(3, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn mutate(v: &mut Value, path: &[usize], with: Value) {
    let Some((&step, rest)) = path.split_first() else {
        *v = with;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(step % m.len()).cloned().unwrap();
            mutate(m.get_mut(&key).unwrap(), rest, with);
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            mutate(&mut a[step % n], rest, with);
        }
        _ => *v = with,
    }
}

/// One fuzz case: what a connection sends after its hello.
#[derive(Debug, Clone)]
enum Case {
    /// A valid request with one value replaced (or a field removed).
    Mutated {
        template: usize,
        path: Vec<usize>,
        with: Value,
        remove: bool,
    },
    /// Arbitrary bytes as a control frame body.
    Garbage(Vec<u8>),
    /// A frame of another type, or an unknown tag, or a truncated header.
    RawBytes(Vec<u8>),
}

fn arb_case(n_templates: usize) -> impl Strategy<Value = Case> {
    prop_oneof![
        6 => (0..n_templates, proptest::collection::vec(any::<usize>(), 1..4), arb_value(), proptest::bool::weighted(0.15))
            .prop_map(|(template, path, with, remove)| Case::Mutated { template, path, with, remove }),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Case::Garbage),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Case::RawBytes),
    ]
}

fn remove_at(v: &mut Value, path: &[usize]) {
    if let Value::Object(m) = v {
        if m.is_empty() {
            return;
        }
        let key = m.keys().nth(path[0] % m.len()).cloned().unwrap();
        if path.len() > 1 && m[&key].is_object() {
            remove_at(m.get_mut(&key).unwrap(), &path[1..]);
        } else if key != "type" {
            m.remove(&key);
        }
    }
}

/// Sends one case on a fresh connection and reads what comes back, for a bounded time.
fn run_case(socket: &Path, cwd: &str, case: &Case) {
    let mut s = UnixStream::connect(socket).expect("the server stopped accepting connections");
    // (A loaded machine may take a while to welcome us: a bound, not a timing check.)
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let hello = json!({"type": "hello", "protocol": PROTOCOL_VERSION, "client": "fuzz"});
    write_frame(&mut s, &Frame::control(&hello)).unwrap();
    let welcome = read_frame(&mut s)
        .expect("no welcome")
        .expect("closed before welcome");
    assert!(matches!(welcome, Frame::Control(_)));
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = match case {
        Case::Mutated {
            template,
            path,
            with,
            remove,
        } => {
            let mut v = templates(cwd)[*template].clone();
            if *remove {
                remove_at(&mut v, path);
            } else {
                mutate(&mut v, path, with.clone());
                // The request's kind stays a kind the server knows, mostly.
                if v.get("type").is_none() && path.len() > 1 {
                    v = templates(cwd)[*template].clone();
                }
            }
            write_frame(&mut s, &Frame::control(&v))
        }
        Case::Garbage(b) => write_frame(&mut s, &Frame::Control(Bytes::from(b.clone()))),
        Case::RawBytes(b) => s.write_all(b),
    };
    // Read replies until the server hangs up, for at most a second (followers stay).
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        match read_frame(&mut s) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
}

fn cases() -> u32 {
    std::env::var("MGPU_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Runs the fuzz loop in this process (as whoever it runs as); panics on a failure.
fn fuzz(socket: &Path, cwd: &str, cases: u32) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        // Shrinking replays cases against a live server: keep it short.
        max_shrink_iters: 50,
        ..Config::default()
    });
    let n = templates(cwd).len();
    let started = Instant::now();
    runner
        .run(&arb_case(n), |case| {
            run_case(socket, cwd, &case);
            Ok(())
        })
        .unwrap();
    eprintln!(
        "fuzz_requests: {cases} cases in {:.1} s, 0 failures",
        started.elapsed().as_secs_f64()
    );
}

/// The entry point of the child process that fuzzes as an unprivileged account (see
/// [`every_request_handler_survives_fuzzed_requests`]); not a test of its own.
#[test]
#[ignore = "entry point of the fuzzing child process, started by the fuzz test"]
fn fuzz_child_entry() {
    let socket = std::env::var("MGPU_FUZZ_SOCKET").expect("started by the fuzz test");
    let cwd = std::env::var("MGPU_FUZZ_CWD").unwrap();
    fuzz(Path::new(&socket), &cwd, cases());
}

#[test]
fn every_request_handler_survives_fuzzed_requests() {
    let server = Server::start("2x24GiB", &[]);
    let cwd = server.scratch.to_string_lossy().into_owned();
    match test_users() {
        Some((alice, _)) => {
            // This test binary, where the account can run it.
            let exe = server.dir.join("fuzz-child");
            std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
            let out = std::process::Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "fuzz_child_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .uid(alice.uid)
                .gid(alice.gid)
                .env("MGPU_FUZZ_SOCKET", &server.socket)
                .env("MGPU_FUZZ_CWD", &cwd)
                .env("HOME", &alice.home)
                .current_dir(&server.scratch)
                .output()
                .unwrap();
            let stderr = text(&out.stderr);
            eprintln!("{stderr}");
            assert!(
                out.status.success()
                    && text(&out.stdout).contains("1 passed")
                    && stderr.contains(&format!("fuzz_requests: {} cases", cases())),
                "the fuzzing child failed:\n{}\n{stderr}",
                text(&out.stdout)
            );
        }
        None => fuzz(&server.socket, &cwd, cases()),
    }
    // Still serving, and nothing panicked.
    let q = server.queue_json();
    assert!(q.get("gpus").is_some(), "{q}");
    server.ok("mgpu_cancel", &["--all"]);
    let log = server.server_log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.pid()), None).is_ok(),
        "the server died"
    );
}

use std::os::unix::process::CommandExt;

/// Found by an attack review: an attach with a log offset past i64::MAX (a file offset is
/// signed) had its connection closed without a word. It gets an error saying why.
#[test]
fn an_attach_past_any_log_hears_why() {
    let server = Server::start("1x24GiB", &[]);
    let id = server.detached(&["--", "true"]);
    server.wait_gone(id);
    let mut s = UnixStream::connect(&server.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let hello = json!({"type": "hello", "protocol": PROTOCOL_VERSION, "client": "test"});
    write_frame(&mut s, &Frame::control(&hello)).unwrap();
    read_frame(&mut s).unwrap().expect("a welcome");
    let attach = json!({"type": "attach", "job": id, "log_offset": u64::MAX});
    write_frame(&mut s, &Frame::control(&attach)).unwrap();
    let Some(Frame::Control(reply)) = read_frame(&mut s).unwrap() else {
        panic!("no answer to the attach");
    };
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("bad log offset")),
        "{reply}"
    );
}
