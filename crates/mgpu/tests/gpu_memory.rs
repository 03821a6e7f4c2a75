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
    wait_until(Duration::from_secs(120), || {
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
    wait_until(Duration::from_secs(120), || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        pid != 0
    });
    pid
}

/// One screen of `mgpu_top`, as text.
fn top(s: &Server) -> String {
    s.ok("mgpu_top", &["--once", "160x30"])
}

/// A job command that writes its main process's pid to `SCRATCH/name`, then waits until
/// `SCRATCH/name.go` exists (or 300 s pass).
fn pid_job(s: &Server, name: &str) -> String {
    let p = s.scratch.join(name).display().to_string();
    format!("echo $$ > {p}; i=0; while [ ! -e {p}.go ] && [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done")
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
    // The process is reported with its user, for the admin to act on.
    let g = &gpus(&s)[0];
    assert_eq!(
        g["foreign"],
        serde_json::json!([{"pid": outsider.pid(), "user": "root", "used_mib": 2048}]),
        "{g}"
    );
    let line = format!(
        "not an mgpu job: pid {} (root) uses 2048 MiB on GPU 0",
        outsider.pid()
    );
    assert!(s.ok("mgpu_queue", &[]).contains(&line));
    assert!(top(&s).contains(&line), "{}", top(&s));
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
    // What matters here is that none of what the job uses is taken for memory used outside
    // mgpu (that would leave 24 - 4 - 18 < 4 GiB); its 14 GiB beyond its reservation are
    // charged to it, which leaves 24 - 4 - 14 = 6.
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
    wait_until(Duration::from_secs(120), || {
        s.server_log().contains("cannot read GPU 1")
    });
    let a = s.detached(&["--", "sleep", "300"]);
    s.wait_state(a, "RUNNING");
    assert_eq!(s.job(a).unwrap()["gpu_ids"], serde_json::json!([0]));
    let b = s.detached(&["--", "sleep", "300"]);
    assert_eq!(s.job(b).unwrap()["state"], "PENDING");
    // Every NVML call fails: said, and the daemon keeps serving.
    fake.set(&format!("{healthy}fail * unknown\n"));
    wait_until(Duration::from_secs(120), || {
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

/// Whether job cgroups are made here (root, a writable hierarchy); says so when not.
fn job_cgroups_here() -> bool {
    let layout = mgpu_daemon::cgroup::layout();
    let here = layout.v2.is_some() || !layout.v1.is_empty();
    if !here {
        eprintln!("skipping: no writable cgroup hierarchy here");
    }
    here
}

/// A job that hides its GPU process deeper than any bounded walk of its process tree could
/// follow (300 processes, each in a session of its own) is still charged for it, and stopped
/// when it is over its reservation on a shared GPU: its cgroup says whose it is.
#[test]
fn a_gpu_process_deep_in_new_sessions_is_still_its_jobs_and_stopped() {
    if !job_cgroups_here() {
        return;
    }
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    let s = fake.server(&["--gpu-mem-tolerance", "0.5"]);
    let neighbour = s.detached(&["--mem", "4G", "--", "sh", "-c", &pid_job(&s, "nb")]);
    s.wait_state(neighbour, "RUNNING");
    // chain DEPTH OUT: DEPTH processes, each the child of the last and in a session of its
    // own (not a group leader, so setsid(1) does not fork); the deepest writes its pid.
    let chain = s.scratch.join("chain");
    write_file(
        &chain,
        "#!/bin/sh\nif [ \"$1\" -gt 0 ]; then setsid sh \"$0\" $(($1 - 1)) \"$2\" & wait; \
         else echo $$ > \"$2\"; exec sleep 300; fi\n",
        0o755,
    );
    let deep_file = s.scratch.join("deep");
    let hider = s.detached(&[
        "--mem",
        "1000M",
        "--",
        "sh",
        chain.to_str().unwrap(),
        "300",
        deep_file.to_str().unwrap(),
    ]);
    s.wait_state(hider, "RUNNING");
    let (deep, nb) = (read_pid(&deep_file), read_pid(&s.scratch.join("nb")));
    let (_, session) = parent_and_session(deep);
    assert_eq!(session, deep, "in a session of its own");
    assert_eq!(
        s.job(hider).unwrap()["gpu_ids"],
        serde_json::json!([0]),
        "they share GPU 0"
    );
    fake.set(&format!(
        "gpu 0 24GiB\npid {deep} uses 20GiB on GPU 0\npid {nb} uses 3GiB on GPU 0\n"
    ));
    wait_used(&s, 0, 23 * 1024);
    // Not someone else's memory: the job's (unless it was stopped already).
    let g = &gpus(&s)[0];
    assert_eq!(g["foreign"], serde_json::json!([]), "{g}");
    wait_until(Duration::from_secs(120), || s.job(hider).is_none());
    let rec = s.acct(hider);
    assert_eq!(rec["state"], "OUT_OF_MEMORY", "{rec}");
    assert_eq!(rec["peak_gpu_mem_mib"], 20 * 1024, "{rec}");
    let said = "used 20480 MiB of GPU memory on GPU 0, over its reservation of 1000 MiB";
    assert!(rec["message"].as_str().unwrap().contains(said), "{rec}");
    assert_eq!(s.job(neighbour).unwrap()["state"], "RUNNING");
}

/// A process in a job's session and below its main process, but not in its cgroup (root moved
/// it out here; a pid reused after the job's leader was collected looks the same), is not
/// charged to the job: it is someone's memory outside mgpu.
#[test]
fn a_process_outside_its_jobs_cgroup_is_not_charged_to_the_job() {
    if !job_cgroups_here() {
        return;
    }
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    let s = fake.server(&[]);
    let dir = s.scratch.display().to_string();
    let id = s.detached(&[
        "--mem",
        "4G",
        "--",
        "sh",
        "-c",
        &format!("sleep 300 & echo $! > {dir}/child; echo $$ > {dir}/main; wait"),
    ]);
    s.wait_state(id, "RUNNING");
    let (main, child) = (
        read_pid(&s.scratch.join("main")),
        read_pid(&s.scratch.join("child")),
    );
    assert_eq!(parent_and_session(child), (main, main));
    if !move_out_of_job_cgroups(child) {
        eprintln!("skipping: cannot move a process between cgroups here");
        return;
    }
    fake.set(&format!(
        "gpu 0 24GiB\npid {main} uses 1GiB on GPU 0\npid {child} uses 2GiB on GPU 0\n"
    ));
    wait_used(&s, 0, 3 * 1024);
    let job = s.job(id).unwrap();
    assert_eq!(job["used_mib"], serde_json::json!({"0": 1024}), "{job}");
    let g = &gpus(&s)[0];
    assert_eq!(
        g["foreign"],
        serde_json::json!([{"pid": child, "user": "root", "used_mib": 2048}]),
        "{g}"
    );
}

/// Moves `pid` into the root cgroup of every hierarchy where it is in a job cgroup (as root).
fn move_out_of_job_cgroups(pid: u32) -> bool {
    let mut moved = false;
    for dir in mgpu_daemon::cgroup::dirs_of(pid) {
        if !mgpu_daemon::cgroup::is_under_jobs(&dir) {
            continue;
        }
        // The hierarchy's root: the last directory up with a cgroup.procs.
        let Some(root) = dir
            .ancestors()
            .take_while(|d| d.join("cgroup.procs").exists())
            .last()
        else {
            return false;
        };
        if std::fs::write(root.join("cgroup.procs"), pid.to_string()).is_err() {
            return false;
        }
        moved = true;
    }
    moved
}

/// A job over its reservation on a GPU it shares is stopped (after the tolerance) and ends
/// OUT_OF_MEMORY, said in its log, on its attached srun and in the accounting (with its peak);
/// its neighbour, inside its own reservation, runs on and completes.
#[test]
fn a_job_over_its_reservation_on_a_shared_gpu_ends_out_of_memory_and_its_neighbour_completes() {
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    // (A grace period long enough to see the stop on a loaded machine.)
    let s = fake.server(&["--gpu-mem-tolerance", "0.5", "--grace-period", "10"]);
    let neighbour = s.detached(&["--mem", "4G", "--", "sh", "-c", &pid_job(&s, "nb")]);
    s.wait_state(neighbour, "RUNNING");
    let hog = s
        .cmd("mgpu_srun")
        // It ignores SIGTERM: it is seen being stopped for the grace period, then killed.
        .args([
            "--mem",
            "4G",
            "--",
            "sh",
            "-c",
            &format!("trap '' TERM; {}", pid_job(&s, "hog")),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (hog_pid, nb_pid) = (
        read_pid(&s.scratch.join("hog")),
        read_pid(&s.scratch.join("nb")),
    );
    let hog_id = s.queue_json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] != neighbour)
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        s.job(hog_id).unwrap()["gpu_ids"],
        serde_json::json!([0]),
        "they share GPU 0"
    );
    // The hog grows to 10 GiB of its 4; the neighbour stays inside its 4.
    fake.set(&format!(
        "gpu 0 24GiB\npid {hog_pid} uses 10GiB on GPU 0\npid {nb_pid} uses 3GiB on GPU 0\n"
    ));
    let mut seen = None;
    wait_until(Duration::from_secs(120), || {
        seen = s.job(hog_id);
        seen.as_ref().is_none_or(|j| j["reason"] == "GpuMemory")
    });
    // Seen stopping during the grace period (a loaded machine may look only after it: its
    // record below has the figures too).
    if let Some(job) = seen {
        assert_eq!(job["used_mib"], serde_json::json!({"0": 10240}), "{job}");
    }
    let out = hog.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let said = "used 10240 MiB of GPU memory on GPU 0, over its reservation of 4096 MiB";
    assert!(stderr.contains(said), "{stderr}");
    assert!(stderr.contains("OUT_OF_MEMORY"), "{stderr}");
    assert!(s.log(hog_id).contains(said), "{}", s.log(hog_id));
    let rec = s.acct(hog_id);
    assert_eq!(rec["state"], "OUT_OF_MEMORY", "{rec}");
    assert!(rec["message"].as_str().unwrap().contains(said), "{rec}");
    assert_eq!(rec["peak_gpu_mem_mib"], 10240, "{rec}");
    assert!(s.job(hog_id).is_none(), "gone from the queue");
    let table = s.ok("mgpu_acct", &["-j", &hog_id.to_string()]);
    assert!(
        table.contains("OUT_OF_MEMORY") && table.contains("10240M"),
        "{table}"
    );
    // The neighbour runs on, and completes.
    assert_eq!(s.job(neighbour).unwrap()["state"], "RUNNING");
    std::fs::write(s.scratch.join("nb.go"), "").unwrap();
    s.wait_gone(neighbour);
    let rec = s.acct(neighbour);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    assert_eq!(rec["peak_gpu_mem_mib"], 3072, "{rec}");
}

/// An exclusive job (no --mem) owns its GPU: using all of it is never a reason to stop it, nor
/// is memory it uses on a GPU it does not hold next to a memory job (that use is charged to it:
/// it shows, and keeps newcomers off that memory).
#[test]
fn an_exclusive_job_using_the_whole_gpu_is_never_stopped() {
    let fake = FakeGpus::new(
        "gpu 0 24GiB
gpu 1 24GiB
",
    );
    let s = fake.server(&["--gpu-mem-tolerance", "0"]);
    let id = s.detached(&["--", "sh", "-c", &pid_job(&s, "x")]);
    s.wait_state(id, "RUNNING");
    let held = s.job(id).unwrap()["gpu_ids"][0].as_u64().unwrap();
    let other = 1 - held;
    let m = s.detached(&["--mem", "4G", "--", "sh", "-c", &pid_job(&s, "m")]);
    s.wait_state(m, "RUNNING");
    assert_eq!(s.job(m).unwrap()["gpu_ids"][0], other);
    let pid = read_pid(&s.scratch.join("x"));
    let state = |held_gib: u64| {
        format!(
            "gpu 0 24GiB\ngpu 1 24GiB\npid {pid} uses {held_gib}GiB on GPU {held}\n\
             pid {pid} uses 5GiB on GPU {other}\n"
        )
    };
    fake.set(&state(24));
    wait_used(&s, held, 24 * 1024);
    // Readings after it went "over" (a later state is seen, so earlier ones were too).
    fake.set(&state(23));
    wait_used(&s, held, 23 * 1024);
    let job = s.job(id).unwrap();
    assert_eq!(job["state"], "RUNNING", "{job}");
    assert_eq!(job["reason"], Value::Null, "not being stopped: {job}");
    let mut used = serde_json::Map::new();
    used.insert(held.to_string(), (23 * 1024).into());
    used.insert(other.to_string(), 5120.into());
    assert_eq!(job["used_mib"], Value::Object(used), "{job}");
    assert_eq!(job["peak_mib"], 24 * 1024, "{job}");
    // 24 - 4 reserved - 5 used there by the exclusive job: 15 GiB, not 16.
    let n = s.detached(&["--mem", "16G", "--", "true"]);
    assert_eq!(s.job(n).unwrap()["state"], "PENDING");
    std::fs::write(s.scratch.join("x.go"), "").unwrap();
    s.wait_gone(id);
    assert_eq!(s.acct(id)["state"], "COMPLETED");
}

/// What jobs use reaches `mgpu_queue` (USED, --json used_mib and peak_mib), `mgpu_top` and
/// `mgpu_acct`; a job over its reservation alone on its GPU is only warned; a newcomer is not
/// placed on the memory it really uses, and is once that memory is free again.
#[test]
fn used_and_peak_figures_are_shown_and_a_newcomer_is_not_placed_on_used_memory() {
    let fake = FakeGpus::new("gpu 0 24GiB util 40 5\n");
    let s = fake.server(&["--gpu-mem-tolerance", "0"]);
    let a = s.detached(&["--mem", "4G", "--", "sh", "-c", &pid_job(&s, "a")]);
    s.wait_state(a, "RUNNING");
    let pid = read_pid(&s.scratch.join("a"));
    fake.set(&format!(
        "gpu 0 24GiB util 40 5\npid {pid} uses 18GiB on GPU 0\n"
    ));
    wait_until(Duration::from_secs(120), || {
        s.job(a).is_some_and(|j| j["used_mib"]["0"] == 18 * 1024)
    });
    let job = s.job(a).unwrap();
    assert_eq!(job["peak_mib"], 18 * 1024, "{job}");
    assert_eq!(gpus(&s)[0]["util_pct"], 40);
    let queue = s.ok("mgpu_queue", &[]);
    assert!(
        queue.contains("USED") && queue.contains("18432M!"),
        "{queue}"
    );
    assert!(queue.contains("40%"), "{queue}");
    let screen = top(&s);
    assert!(
        screen.contains("18432M!") && screen.contains("40%"),
        "{screen}"
    );
    // 24 - 4 reserved - 14 used beyond: 6 GiB left, not 8.
    let b = s.detached(&["--mem", "8G", "--", "sh", "-c", &pid_job(&s, "b")]);
    let job_b = s.job(b).unwrap();
    assert_eq!(job_b["state"], "PENDING", "{job_b}");
    // Alone on its GPU, A is over but not stopped (nobody to protect): it is warned.
    wait_until(Duration::from_secs(120), || {
        s.server_log()
            .contains("over its reservation of 4096 MiB (alone on that GPU")
    });
    assert_eq!(s.job(a).unwrap()["state"], "RUNNING");
    // A lets go: B starts next to it.
    fake.set(&format!("gpu 0 24GiB\npid {pid} uses 2GiB on GPU 0\n"));
    s.wait_state(b, "RUNNING");
    let job = s.job(a).unwrap();
    assert_eq!(job["used_mib"], serde_json::json!({"0": 2048}), "{job}");
    assert_eq!(job["peak_mib"], 18 * 1024, "the peak stays");
    std::fs::write(s.scratch.join("a.go"), "").unwrap();
    s.wait_gone(a);
    let rec = s.acct(a);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    assert_eq!(rec["peak_gpu_mem_mib"], 18 * 1024, "{rec}");
    let table = s.ok("mgpu_acct", &["-j", &a.to_string()]);
    assert!(
        table.contains("MAXGPUMEM") && table.contains("18432M"),
        "{table}"
    );
    // B never used the GPU: no peak on record.
    std::fs::write(s.scratch.join("b.go"), "").unwrap();
    s.wait_gone(b);
    assert_eq!(s.acct(b)["peak_gpu_mem_mib"], Value::Null);
}

/// An attached srun of a job whose peak was far below its --mem says so in one line.
#[test]
fn srun_hints_when_the_peak_was_far_below_the_request() {
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    let s = fake.server(&[]);
    let p = s.scratch.join("h").display().to_string();
    let srun = s
        .cmd("mgpu_srun")
        .args(["--mem", "16G", "--", "sh", "-c", &pid_job(&s, "h")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = read_pid(Path::new(&p));
    fake.set(&format!("gpu 0 24GiB\npid {pid} uses 1GiB on GPU 0\n"));
    wait_until(Duration::from_secs(120), || {
        s.queue_json()["jobs"][0]["peak_mib"] == 1024
    });
    std::fs::write(format!("{p}.go"), "").unwrap();
    let out = srun.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "used at most 1024 MiB of GPU memory on one GPU, under half its --mem of 16384 MiB"
        ),
        "{stderr}"
    );
}

/// Not a check, a measurement (run with `--ignored --nocapture`): the time from a job crossing
/// its reservation (the fake NVML's state written) to its SIGTERM and to OUT_OF_MEMORY on
/// record, with no tolerance; and what one NVML reading costs the daemon, with 16 jobs
/// running on 4 GPUs.
#[test]
#[ignore]
fn measure_gpu_memory_stop_latency_and_nvml_poll_cost() {
    use std::time::{Instant, SystemTime, UNIX_EPOCH};
    let ns = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    let s = fake.server(&["--gpu-mem-tolerance", "0"]);
    let nb = s.detached(&["--mem", "4G", "--", "sleep", "300"]);
    s.wait_state(nb, "RUNNING");
    let (mut to_term, mut to_oom) = (Vec::new(), Vec::new());
    for run in 0..9u64 {
        let p = s.scratch.join(format!("m{run}")).display().to_string();
        let id = s.detached(&[
            "--mem",
            "4G",
            "--",
            "sh",
            "-c",
            &format!(
                "trap 'date +%s%N > {p}.term; exit 143' TERM; echo $$ > {p}; sleep 300 & wait"
            ),
        ]);
        s.wait_state(id, "RUNNING");
        let pid = read_pid(Path::new(&p));
        // Not in step with the daemon's readings (each run starts right after one).
        std::thread::sleep(Duration::from_millis(run * 71 % 500));
        let t0 = ns();
        fake.set(&format!("gpu 0 24GiB\npid {pid} uses 10GiB on GPU 0\n"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = s
                .cmd("mgpu_acct")
                .args(["--json", "-j", &id.to_string()])
                .output()
                .unwrap();
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["jobs"][0]["state"] == "OUT_OF_MEMORY" {
                break;
            }
            assert!(Instant::now() < deadline, "job {id} not stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t_oom = ns();
        let t_term: u64 = std::fs::read_to_string(format!("{p}.term"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        to_term.push((t_term - t0) as f64 / 1e6);
        to_oom.push((t_oom - t0) as f64 / 1e6);
        fake.set("gpu 0 24GiB\n");
    }
    eprintln!(
        "crossing -> SIGTERM: median {:.0} ms {to_term:.0?}",
        median(&mut to_term)
    );
    eprintln!(
        "crossing -> OUT_OF_MEMORY on record: median {:.0} ms {to_oom:.0?}",
        median(&mut to_oom)
    );
    drop(s);

    // The poll's cost: 16 jobs (each a process on a GPU) on 4 GPUs, one reading every 0.5 s.
    let gpus4 = "gpu 0 80GiB\ngpu 1 80GiB\ngpu 2 80GiB\ngpu 3 80GiB\n";
    let fake = FakeGpus::new(gpus4);
    let lib = mgpu_fake_nvml::find_library().unwrap();
    let s = Server::start_with_env(
        "",
        &["--nvml-lib", lib.to_str().unwrap()],
        &[
            (mgpu_fake_nvml::STATE_ENV, fake.state.as_os_str()),
            ("MGPU_LOG", std::ffi::OsStr::new("debug")),
        ],
    );
    let mut state = gpus4.to_string();
    for k in 0..16 {
        let p = s.scratch.join(format!("p{k}")).display().to_string();
        let id = s.detached(&[
            "--mem",
            "4G",
            "--",
            "sh",
            "-c",
            &format!("echo $$ > {p}; exec sleep 300"),
        ]);
        s.wait_state(id, "RUNNING");
        let gpu = s.job(id).unwrap()["gpu_ids"][0].as_u64().unwrap();
        state += &format!("pid {} uses 3GiB on GPU {gpu}\n", read_pid(Path::new(&p)));
    }
    fake.set(&state);
    wait_until(Duration::from_secs(120), || {
        gpus(&s)
            .iter()
            .map(|g| g["used_mib"].as_u64().unwrap())
            .sum::<u64>()
            == 16 * 3072
    });
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid())).unwrap();
        let f: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        (f[0] + f[1]) as f64 / 100.0 // clock ticks (USER_HZ = 100) to seconds
    };
    let (c0, t0) = (cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(20));
    let (c1, t1) = (cpu(), Instant::now());
    let mut reads: Vec<f64> = s
        .server_log()
        .lines()
        .filter_map(|l| l.split("NVML usage read in ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    let n = reads.len();
    eprintln!(
        "NVML reading (4 GPUs, 16 jobs): median {:.0} µs over {n} readings; daemon CPU {:.2} % \
         ({:.3} s in {:.1} s)",
        median(&mut reads),
        (c1 - c0) / (t1 - t0).as_secs_f64() * 100.0,
        c1 - c0,
        (t1 - t0).as_secs_f64()
    );
}

/// With `--gpu-mem-enforce warn` a job over its reservation on a shared GPU is not stopped: the
/// server logs it and its attached srun is told, once.
#[test]
fn warn_policy_tells_and_does_not_stop() {
    let fake = FakeGpus::new("gpu 0 24GiB\n");
    let s = fake.server(&["--gpu-mem-enforce", "warn", "--gpu-mem-tolerance", "0"]);
    let neighbour = s.detached(&["--mem", "4G", "--", "sleep", "300"]);
    s.wait_state(neighbour, "RUNNING");
    let srun = s
        .cmd("mgpu_srun")
        .args(["--mem", "4G", "--", "sh", "-c", &pid_job(&s, "w")])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = read_pid(&s.scratch.join("w"));
    fake.set(&format!("gpu 0 24GiB\npid {pid} uses 10GiB on GPU 0\n"));
    let said =
        "uses 10240 MiB of GPU memory on GPU 0, over its reservation of 4096 MiB on a GPU it \
                shares with other jobs";
    wait_until(Duration::from_secs(120), || s.server_log().contains(said));
    std::fs::write(s.scratch.join("w.go"), "").unwrap();
    let out = srun.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "not stopped: {stderr}");
    assert_eq!(stderr.matches(said).count(), 1, "{stderr}");
    assert!(
        stderr.contains("more than its --mem of 4096 MiB: ask for at least --mem 10240M"),
        "{stderr}"
    );
}
