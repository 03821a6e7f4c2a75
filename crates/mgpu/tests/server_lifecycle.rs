//! The server process itself: socket handling, GPU selection, protocol checks, shutdown.

mod common;

use common::*;
use futures::{SinkExt, StreamExt};
use mgpu_proto::{Frame, FrameCodec, Request, Response};

/// A hung server (listening, never accepting, its queue full) is reported, not waited for.
#[test]
fn a_hung_listener_on_the_socket_is_refused_without_waiting() {
    use nix::sys::socket::{bind, connect, listen, socket, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hung.sock");
    let addr = UnixAddr::new(&path).unwrap();
    let unix = || {
        socket(
            nix::sys::socket::AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap()
    };
    let hung = unix();
    bind(hung.as_raw_fd(), &addr).unwrap();
    // Backlog 0: one pending connection fills the queue.
    listen(&hung, Backlog::new(0).unwrap()).unwrap();
    let mut pending = Vec::new();
    while pending.len() < 8 {
        let c = unix();
        if connect(c.as_raw_fd(), &addr).is_err() {
            break;
        }
        pending.push(c);
    }
    let mut child = server_cmd(&path, dir.path().join("state"), dir.path().join("logs"))
        .args(["--simulate-gpus", "1x24GiB"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server hung on a listener that does not accept");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_fails_with(&out, "not accepting connections");
}

#[test]
fn a_live_server_is_not_replaced_but_a_stale_socket_is() {
    let mut s = Server::start("1x24GiB", &[]);
    let second = server_cmd(&s.socket, s.dir.join("state2"), s.dir.join("logs2"))
        .args(["--simulate-gpus", "1x24GiB"])
        .output()
        .unwrap();
    assert_fails_with(&second, "already listening");
    // A second server on the same state directory is refused too.
    let third = server_cmd(s.dir.join("other.sock"), &s.state_dir, &s.log_dir)
        .args(["--simulate-gpus", "1x24GiB"])
        .output()
        .unwrap();
    assert_fails_with(&third, "state directory");
    // Kill -9 leaves a stale socket file behind; a new server replaces it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(s.socket.exists());
    s.restart();
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "echo", "ok"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "ok\n");
}

#[test]
fn a_non_socket_path_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, "precious").unwrap();
    let out = server_cmd(&path, dir.path().join("state"), dir.path().join("logs"))
        .args(["--simulate-gpus", "1x24GiB"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn without_gpus_the_server_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = server_cmd(
        dir.path().join("s.sock"),
        dir.path().join("state"),
        dir.path().join("logs"),
    )
    .output()
    .unwrap();
    // On a machine with NVIDIA GPUs the server would start; this test is for GPU-less ones.
    if out.status.success() {
        return;
    }
    assert!(
        text(&out.stderr).contains("--simulate-gpus"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn gpus_flag_restricts_managed_gpus() {
    let s = Server::start("4x24GiB", &["--gpus", "1,3"]);
    let q = s.queue_json();
    let idx: Vec<u64> = q["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![1, 3]);
    let out = s
        .cmd("mgpu_srun")
        .args([
            "--gpus",
            "2",
            "--",
            "bash",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES",
        ])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "1,3\n");
    let out = s
        .cmd("mgpu_srun")
        .args(["--gpus", "3", "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn corrupt_state_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("mgpu.db"), vec![0x5au8; 16384]).unwrap();
    let out = server_cmd(dir.path().join("s.sock"), &state, dir.path().join("logs"))
        .args(["--simulate-gpus", "1x24GiB"])
        .output()
        .unwrap();
    assert_fails_with(&out, "mgpu.db");
}

async fn raw_hello(socket: &std::path::Path, protocol: u32) -> Response {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut conn = tokio_util::codec::Framed::new(stream, FrameCodec::default());
    conn.send(Frame::control(&Request::Hello {
        protocol,
        client: "test".into(),
    }))
    .await
    .unwrap();
    conn.next().await.unwrap().unwrap().parse().unwrap()
}

#[test]
fn protocol_mismatch_gets_a_clear_error() {
    let s = Server::start("1x24GiB", &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match rt.block_on(raw_hello(&s.socket, 999)) {
        Response::Error { message } => {
            assert!(message.contains("protocol version mismatch"), "{message}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(matches!(
        rt.block_on(raw_hello(&s.socket, mgpu_proto::PROTOCOL_VERSION)),
        Response::Welcome { .. }
    ));
    // Garbage instead of a frame does not hurt the server.
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::UnixStream::connect(&s.socket).await.unwrap();
        raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
            .await
            .unwrap();
    });
    let out = s
        .cmd("mgpu_srun")
        .args(["--", "echo", "alive"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "alive\n");
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_the_socket() {
    let mut s = Server::start("1x24GiB", &[]);
    let socket = s.socket.clone();
    s.stop();
    assert!(!socket.exists(), "socket removed on clean shutdown");
    assert!(s.server_log().contains("stopped"));
}

/// Pids of the processes named `comm` whose parent is `parent` (from /proc).
fn children_named(parent: i32, comm: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 2..].split_whitespace().nth(1);
        if &stat[open + 1..close] == comm && ppid == Some(&parent.to_string()) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn supervisors_are_forked_by_the_launcher_which_is_replaced_when_killed() {
    let s = Server::start("1x24GiB", &[]);
    // (Its name is set by the launcher itself, once it runs.)
    wait_until(std::time::Duration::from_secs(60), || {
        children_named(s.pid(), "mgpu-launcher").len() == 1
    });
    let launchers = children_named(s.pid(), "mgpu-launcher");
    let running = s.detached(&["--mem", "1G", "--", "sleep", "300"]);
    s.wait_state(running, "RUNNING");
    wait_until(std::time::Duration::from_secs(60), || {
        children_named(launchers[0], "mgpu-supervisor").len() == 1
    });

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launchers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The next job still starts (through a new launcher) and runs to its end...
    let out = s
        .cmd("mgpu_srun")
        .args(["--mem", "1G", "--", "echo", "after"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "after\n");
    let mut replaced = Vec::new();
    wait_until(std::time::Duration::from_secs(60), || {
        replaced = children_named(s.pid(), "mgpu-launcher");
        replaced.len() == 1
    });
    assert_ne!(replaced, launchers);
    // ...and the job whose supervisor came from the killed launcher is unaffected.
    assert_eq!(s.job(running).unwrap()["state"], "RUNNING");
    let out = s
        .cmd("mgpu_cancel")
        .arg(running.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    s.wait_gone(running);
    assert!(
        !s.server_log().contains("starting one directly"),
        "the fallback was not needed: {}",
        s.server_log()
    );
}
