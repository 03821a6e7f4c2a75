//! Attacks on the server's socket, run as a real unprivileged account: the test binary runs
//! itself again (its ignored `attack_helper` test) under `setpriv`, with `MGPU_ATTACK` saying
//! what to do. The attacker prints `READY ...` once its connections are in place and holds them
//! until its stdin closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use mgpu_proto::{write_frame, Frame, LogRequest, QueueRequest, Request, PROTOCOL_VERSION};

use super::{Server, TestUser};

/// A running attacker; its connections close when it is dropped.
pub struct Attacker {
    child: Child,
    out: BufReader<ChildStdout>,
    /// What it said when ready.
    pub report: String,
}

impl Attacker {
    /// Starts `mode` (see [`attack_helper_main`]) as `user` and waits until it is ready.
    pub fn start(s: &Server, user: &TestUser, mode: &str) -> Attacker {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .arg("--init-groups")
            .arg("--")
            .arg(exe)
            .args(["attack_helper", "--exact", "--ignored", "--nocapture", "-q"])
            .env("MGPU_ATTACK", mode)
            .env("MGPU_SOCKET", &s.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let report = loop {
            let mut line = String::new();
            if out.read_line(&mut line).unwrap() == 0 {
                panic!("the attacker ({mode}) ended before it was ready");
            }
            if let Some(r) = line.strip_prefix("READY") {
                break r.trim().to_string();
            }
        };
        Attacker { child, out, report }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.out;
    }
}

fn connect() -> UnixStream {
    let path = std::env::var("MGPU_SOCKET").unwrap();
    UnixStream::connect(path).unwrap()
}

fn hello(c: &mut UnixStream) -> std::io::Result<()> {
    let hello = Request::Hello {
        protocol: PROTOCOL_VERSION,
        client: "attacker".into(),
    };
    write_frame(c, &Frame::control(&hello))
}

/// What the server said on `c` by `deadline`: the error it sent, `held` when it still waits
/// for more of what we sent, or how the connection ended.
fn answer(c: &mut UnixStream, deadline: std::time::Instant) -> String {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    c.set_read_timeout(Some(left.max(Duration::from_millis(10))))
        .unwrap();
    loop {
        match mgpu_proto::read_frame(c) {
            Ok(Some(f)) => match f.parse::<mgpu_proto::Response>() {
                Ok(mgpu_proto::Response::Error { message }) => return message,
                Ok(_) => {}
                Err(e) => return format!("garbled: {e}"),
            },
            Ok(None) => return "closed".into(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return "held".into(),
            Err(e) => return format!("error: {e}"),
        }
    }
}

/// The attacker's side (in the re-run test binary). Modes:
/// - `queue-noread N`: N connections each asking for the whole queue, never reading;
/// - `follow-noread JOB N`: N `mgpu_log --follow JOB` connections, never reading;
/// - `partial N SIZE`: N connections each sending all but the last bytes of a SIZE-byte submit
///   frame; reports how many the server refused and every reason it gave;
/// - `hold N`: N connections that said hello and nothing else;
/// - `pass-lingering`: one connection that says hello, then sends 2 bytes carrying (as
///   `SCM_RIGHTS`) a TCP socket whose close lingers 600 s; reports `sendmsg=` what came of it.
pub fn attack_helper_main() {
    let Ok(mode) = std::env::var("MGPU_ATTACK") else {
        return;
    };
    let words: Vec<&str> = mode.split_whitespace().collect();
    let num = |i: usize| words[i].parse::<u64>().unwrap();
    let mut held = Vec::new();
    let mut report = String::new();
    match words[0] {
        "queue-noread" | "follow-noread" => {
            let (n, req) = if words[0] == "queue-noread" {
                (num(1), Request::Queue(QueueRequest::default()))
            } else {
                (
                    num(2),
                    Request::Log(LogRequest {
                        job: num(1),
                        follow: true,
                    }),
                )
            };
            for _ in 0..n {
                let mut c = connect();
                hello(&mut c).unwrap();
                write_frame(&mut c, &Frame::control(&req)).unwrap();
                // The smallest receive buffer: the server's output piles up on its side.
                let _ = nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::RcvBuf, &4096);
                held.push(c);
            }
        }
        "partial" => {
            let (n, size) = (num(1), num(2) as usize);
            let mut frame = Vec::with_capacity(size);
            frame.extend_from_slice(&(size as u32).to_be_bytes());
            frame.extend_from_slice(b"\0{\"type\":\"submit\",\"name\":\"");
            frame.resize(size + 4 - 16, b'x');
            for _ in 0..n {
                let mut c = connect();
                hello(&mut c).unwrap();
                c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = c.write_all(&frame);
                held.push(c);
            }
            // The server has had all we sent; its refusals come at once, unless the machine
            // is loaded: it gets a few seconds in all (a bound: a connection it holds answers
            // nothing).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut refused = 0;
            let mut reasons: Vec<String> = Vec::new();
            for c in &mut held {
                let said = answer(c, deadline);
                if said != "held" {
                    refused += 1;
                    if !reasons.contains(&said) {
                        reasons.push(said);
                    }
                }
            }
            report = format!("refused={refused} reasons={}", reasons.join(" | "));
        }
        "hold" => {
            for _ in 0..num(1) {
                let mut c = connect();
                hello(&mut c).unwrap();
                held.push(c);
            }
        }
        "pass-lingering" => {
            // A TCP connection to a listener that never accepts nor reads, its send buffer
            // full, lingering 600 s on close: whoever closes its last copy waits that long.
            use std::os::fd::AsRawFd;
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            use nix::sys::socket::{setsockopt, sockopt};
            setsockopt(&tcp, sockopt::SndBuf, &4096).unwrap();
            setsockopt(
                &tcp,
                sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 600,
                },
            )
            .unwrap();
            tcp.set_nonblocking(true).unwrap();
            let chunk = vec![b'x'; 65536];
            let mut tcp_w = &tcp;
            let mut full = 0;
            // Until the peer's window and our buffer are full (a few tries: the window
            // closes in steps).
            while full < 20 {
                match tcp_w.write(&chunk) {
                    Ok(_) => full = 0,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        full += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("filling the TCP socket: {e}"),
                }
            }
            let mut c = connect();
            hello(&mut c).unwrap();
            let fds = [tcp.as_raw_fd()];
            let iov = [std::io::IoSlice::new(b"\0\0")];
            let sent = nix::sys::socket::sendmsg::<()>(
                c.as_raw_fd(),
                &iov,
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                nix::sys::socket::MsgFlags::empty(),
                None,
            );
            report = match sent {
                Ok(_) => {
                    // Our copy goes at once: the passed one, unless the server read it first,
                    // is then the last. (In a thread: when the server was quicker, this close
                    // lingers here.)
                    std::thread::spawn(move || drop(tcp));
                    "sendmsg=ok".into()
                }
                Err(e) => {
                    // Kept: closed without lingering as we exit.
                    std::mem::forget(tcp);
                    format!("sendmsg={e:?}")
                }
            };
            held.push(c);
            // The listener stays (its queued connection must not be reset).
            std::mem::forget(listener);
        }
        other => panic!("unknown attack {other}"),
    }
    println!("READY {report}");
    std::io::stdout().flush().unwrap();
    // Held until the test closes our stdin.
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(held);
}

/// The server's peak resident memory in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}
