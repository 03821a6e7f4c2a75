//! The daemon's NVML code path, run without a GPU: each test's server loads the fake NVML
//! (crates/mgpu-fake-nvml) with `--nvml-lib` and the test drives it through a state file
//! ("pid 4242 uses 30GiB on GPU 0"), changed live. Also the frameworks' memory environment.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// The fake GPUs of one test: its state file, in a directory of its own.
struct FakeGpus {
    _dir: tempfile::TempDir,
    state: PathBuf,
}

impl FakeGpus {
    fn new(state: &str) -> FakeGpus {
        let dir = tempfile::Builder::new()
            .prefix("mgpu-fake-nvml-")
            .tempdir()
            .unwrap();
        let fake = FakeGpus {
            state: dir.path().join("state"),
            _dir: dir,
        };
        fake.set(state);
        fake
    }

    /// Replaces the state (the daemon's next reading sees it).
    fn set(&self, state: &str) {
        mgpu_fake_nvml::write_state(&self.state, state).unwrap();
    }

    /// A server on these GPUs.
    fn server(&self, extra: &[&str]) -> Server {
        let lib = mgpu_fake_nvml::find_library()
            .expect("the fake NVML library is built with the tests (a dev-dependency)");
        let mut args = vec!["--nvml-lib", lib.to_str().unwrap()];
        args.extend_from_slice(extra);
        Server::start_with_env(
            "",
            &args,
            &[(mgpu_fake_nvml::STATE_ENV, self.state.as_os_str())],
        )
    }
}

fn gpus(s: &Server) -> Vec<Value> {
    s.queue_json()["gpus"].as_array().unwrap().clone()
}

/// Waits until the daemon has read GPU `index`'s memory in use as `used_mib` (a reading
/// happened after the state was written).
fn wait_used(s: &Server, index: u64, used_mib: u64) {
    wait_until(Duration::from_secs(30), || {
        gpus(s)
            .iter()
            .any(|g| g["index"] == index && g["used_mib"] == used_mib)
    });
}

/// A process outside every job (killed when dropped).
struct Outsider(Child);

impl Outsider {
    fn start() -> Outsider {
        Outsider(Command::new("sleep").arg("300").spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pid a job wrote to `path`, once it is there.
fn read_pid(path: &Path) -> u32 {
    let mut pid = 0;
    wait_until(Duration::from_secs(30), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    pid
}

/// A process's parent and session.
fn parent_and_session(pid: u32) -> (u32, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    (f[1].parse().unwrap(), f[3].parse().unwrap())
}

#[test]
fn the_daemon_reports_the_gpus_nvml_reports() {
    let fake = FakeGpus::new(
        "gpu 0 80GiB name NVIDIA H100 80GB HBM3\n\
         gpu 1 24GiB lost\n\
         gpu 2 24GiB name NVIDIA GeForce RTX 4090\n",
    );
    let s = fake.server(&[]);
    let g = gpus(&s);
    // A GPU that cannot be read at start is left out (and said so); the others serve.
    let seen: Vec<(u64, &str, u64)> = g
        .iter()
        .map(|g| {
            (
                g["index"].as_u64().unwrap(),
                g["name"].as_str().unwrap(),
                g["total_mib"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (0, "NVIDIA H100 80GB HBM3", 81_920),
            (2, "NVIDIA GeForce RTX 4090", 24_576)
        ]
    );
    let log = s.server_log();
    assert!(log.contains("2 NVIDIA GPUs (NVML)"), "{log}");
    assert!(log.contains("cannot read GPU 1"), "{log}");
    // Jobs get the GPUs NVML reported.
    let id = s.detached(&["--gpus", "2", "--", "sleep", "300"]);
    s.wait_state(id, "RUNNING");
    assert_eq!(s.job(id).unwrap()["gpu_ids"], serde_json::json!([0, 2]));
}

#[test]
fn memory_used_outside_mgpu_holds_an_exclusive_job_until_it_is_freed() {
    let outsider = Outsider::start();
    // (Many GPUs cannot list graphics processes: that is no error.)
    let gpu = "gpu 0 24GiB\nfail nvmlDeviceGetGraphicsRunningProcesses_v3 not_supported\n";
    let fake = FakeGpus::new(&format!("{gpu}pid {} uses 2GiB on GPU 0\n", outsider.pid()));
    let s = fake.server(&[]);
    wait_used(&s, 0, 2048);
    let id = s.detached(&["--", "sleep", "300"]);
    let job = s.job(id).unwrap();
    assert_eq!(job["state"], "PENDING", "{job}");
    assert!(
        job["reason"] == "Resources" || job["reason"] == "Priority",
        "{job}"
    );
    // The outsider lets go: the job starts.
    fake.set(gpu);
    s.wait_state(id, "RUNNING");
}

/// A job's processes are its own, also one that left the job's session (setsid) and its
/// process tree below the job's main process: their memory is the job's, not foreign, and does
/// not keep others off the GPU.
#[test]
fn a_jobs_own_processes_are_not_foreign_even_after_setsid() {
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    let s = fake.server(&[]);
    let dir = s.scratch.display().to_string();
    let first = s.detached(&[
        "--mem",
        "4G",
        "--",
        "sh",
        "-c",
        // Its main process, and one that left its session and was orphaned (double fork).
        &format!(
            "echo $$ > {dir}/main; setsid sh -c 'sleep 300 & echo $! > {dir}/escaped'; \
             exec sleep 300"
        ),
    ]);
    s.wait_state(first, "RUNNING");
    let main = read_pid(&s.scratch.join("main"));
    let escaped = read_pid(&s.scratch.join("escaped"));
    let (ppid, session) = parent_and_session(escaped);
    assert!(
        ppid != main && session != main,
        "not escaped: {ppid} {session}"
    );
    // What the job uses beyond its reservation is not enforced here; what matters is that none
    // of it is taken for memory used outside mgpu (that would leave 24 - 4 - 18 < 4 GiB).
    fake.set(&format!(
        "gpu 0 24GiB\npid {main} uses 1GiB on GPU 0\npid {escaped} uses 17GiB on GPU 0\n"
    ));
    wait_used(&s, 0, 18 * 1024);
    let second = s.detached(&["--mem", "4G", "--", "sleep", "300"]);
    s.wait_state(second, "RUNNING");
}

#[test]
fn a_lost_gpu_or_an_nvml_error_is_reported_and_the_daemon_serves_on() {
    let healthy = "gpu 0 24GiB\ngpu 1 24GiB\n";
    let fake = FakeGpus::new(healthy);
    let s = fake.server(&[]);
    // GPU 1 falls off the bus: said in the log, and no new job goes there.
    fake.set("gpu 0 24GiB\ngpu 1 24GiB lost\n");
    wait_until(Duration::from_secs(30), || {
        s.server_log().contains("cannot read GPU 1")
    });
    let a = s.detached(&["--", "sleep", "300"]);
    s.wait_state(a, "RUNNING");
    assert_eq!(s.job(a).unwrap()["gpu_ids"], serde_json::json!([0]));
    let b = s.detached(&["--", "sleep", "300"]);
    assert_eq!(s.job(b).unwrap()["state"], "PENDING");
    // Every NVML call fails: said, and the daemon keeps serving.
    fake.set(&format!("{healthy}fail * unknown\n"));
    wait_until(Duration::from_secs(30), || {
        s.server_log().contains("cannot read GPU 0")
    });
    assert_eq!(gpus(&s).len(), 2);
    assert_eq!(s.job(b).unwrap()["state"], "PENDING");
    // Back: said too, and the waiting job gets GPU 1.
    fake.set(healthy);
    s.wait_state(b, "RUNNING");
    assert_eq!(s.job(b).unwrap()["gpu_ids"], serde_json::json!([1]));
    let log = s.server_log();
    assert!(log.contains("NVML reads GPU 1 again"), "{log}");
    // One reading of both GPUs, as the daemon timed it (debug log).
    if let Some(line) = log.lines().rev().find(|l| l.contains("NVML usage read in")) {
        eprintln!("{line}");
    }
}

/// Jobs with `--mem` are told their reservation in the frameworks' terms (simulated GPUs do
/// the same as NVML's).
#[test]
fn memory_jobs_get_the_frameworks_environment() {
    let s = Server::start("1x24GiB", &[]);
    let show = "echo $MGPU_GPU_MEM_MIB/$XLA_PYTHON_CLIENT_MEM_FRACTION/$TF_FORCE_GPU_ALLOW_GROWTH";
    let run = |args: &[&str]| {
        let out = s
            .cmd("mgpu_srun")
            .args(args)
            .args(["--", "sh", "-c", show])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&["--mem", "6G"]), "6144/0.25/true");
    assert_eq!(run(&[]), "//");
}
