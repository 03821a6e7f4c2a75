//! Dependencies (`mgpu_srun -d`), holds and updates (`mgpu_control`), and drains, end to end
//! through the real binaries, as root and as real users.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// A job that runs until `gate` exists (then appends `tag` to `order`, if given).
fn waiting(gate: &Path, order: Option<(&Path, &str)>) -> String {
    let mut script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    if let Some((file, tag)) = order {
        script.push_str(&format!("; echo {tag} >> {}", file.display()));
    }
    script
}

fn reason(s: &Server, id: u64) -> String {
    s.job(id)
        .map(|j| j["reason"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn wait_reason(s: &Server, id: u64, want: &str) {
    wait_until(Duration::from_secs(30), || reason(s, id) == want);
}

fn state_of(s: &Server, id: u64) -> String {
    s.acct(id)["state"].as_str().unwrap().to_string()
}

#[test]
fn an_afterok_chain_runs_in_order_and_srun_says_what_it_waits_for() {
    let s = Server::start("2x24GiB", &[]);
    let go = s.scratch.join("go");
    let order = s.scratch.join("order");
    let a = s.detached(&["--", "sh", "-c", &waiting(&go, Some((&order, "a")))]);
    let b = s.detached(&[
        "-d",
        &format!("afterok:{a}"),
        "--",
        "sh",
        "-c",
        &format!("echo b >> {}", order.display()),
    ]);
    let c = s.detached(&[
        &format!("--dependency=afterok:{b}"),
        "--",
        "sh",
        "-c",
        &format!("echo c >> {}", order.display()),
    ]);
    // A GPU is free, but b waits for a and c for b.
    assert_eq!(reason(&s, b), "Dependency");
    assert_eq!(reason(&s, c), "Dependency");
    // An attached srun says what its job waits for (read before a may end).
    let mut srun = s
        .cmd("mgpu_srun")
        .args(["-d", &format!("afterany:{a}"), "--", "true"])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(srun.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert!(
        first.contains(&format!("Dependency: waits for afterany:{a}")),
        "{first}"
    );
    let table = s.ok("mgpu_queue", &[]);
    assert!(table.contains("Dependency"), "{table}");
    std::fs::write(&go, "").unwrap();
    s.wait_gone(c);
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let out = srun.wait_with_output().unwrap();
    assert!(out.status.success(), "{first}{rest}");
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "a\nb\nc\n");
    for id in [a, b, c] {
        assert_eq!(state_of(&s, id), "COMPLETED");
    }
}

#[test]
fn afternotok_after_a_success_is_never_satisfied_and_unknown_jobs_are_refused() {
    let s = Server::start("2x24GiB", &[]);
    let a = s.detached(&["--", "true"]);
    assert_eq!(state_of(&s, a), "COMPLETED");
    let never = s.detached(&["-d", &format!("afternotok:{a}"), "--", "true"]);
    // Slurm's default: it stays pending, with the reason, until cancelled.
    wait_reason(&s, never, "DependencyNeverSatisfied");
    let ok = s.detached(&["-d", &format!("afterok:{a}"), "--", "true"]);
    assert_eq!(state_of(&s, ok), "COMPLETED");
    let failed = s.detached(&["--", "false"]);
    let after_fail = s.detached(&["-d", &format!("afternotok:{failed}"), "--", "true"]);
    assert_eq!(state_of(&s, after_fail), "COMPLETED");
    assert_eq!(reason(&s, never), "DependencyNeverSatisfied");
    let shown = s.ok("mgpu_control", &["show", "job", &never.to_string()]);
    assert!(shown.contains("Reason=DependencyNeverSatisfied"), "{shown}");
    assert!(
        shown.contains(&format!("Dependency=afternotok:{a}")),
        "{shown}"
    );
    s.ok("mgpu_cancel", &[&never.to_string()]);
    assert_eq!(state_of(&s, never), "CANCELLED");
    let out = s
        .cmd("mgpu_srun")
        .args(["--detach", "-d", "afterok:999999", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "no such job 999999");
    let out = s
        .cmd("mgpu_srun")
        .args(["--detach", "-d", &format!("afterok:{a}_3"), "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "no task 3");
    assert!(s.queue_json()["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn singleton_runs_one_job_of_a_name_at_a_time() {
    let s = Server::start("2x24GiB", &[]);
    let go = s.scratch.join("go");
    let order = s.scratch.join("order");
    let first = s.detached(&[
        "-J",
        "solo",
        "--",
        "sh",
        "-c",
        &waiting(&go, Some((&order, "1"))),
    ]);
    let second = s.detached(&[
        "-J",
        "solo",
        "-d",
        "singleton",
        "--",
        "sh",
        "-c",
        &format!("echo 2 >> {}", order.display()),
    ]);
    // Another name is not held back.
    let other = s.detached(&["-J", "other", "-d", "singleton", "--", "true"]);
    assert_eq!(state_of(&s, other), "COMPLETED");
    assert_eq!(reason(&s, second), "Dependency");
    std::fs::write(&go, "").unwrap();
    assert_eq!(state_of(&s, second), "COMPLETED");
    assert_eq!(state_of(&s, first), "COMPLETED");
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "1\n2\n");
}

#[test]
fn a_dependency_on_a_job_array_waits_for_all_its_tasks_or_one() {
    let mut s = Server::start("2x24GiB", &[]);
    let go = s.scratch.join("go");
    let gate1 = s.scratch.join("go1");
    // GPU memory jobs: all of them fit at once, whatever waits.
    let array = s.detached(&[
        "--array",
        "0-2",
        "--mem",
        "1G",
        "--",
        "sh",
        "-c",
        &format!(
            "if [ $MGPU_ARRAY_TASK_ID = 1 ]; then {}; else {}; fi",
            waiting(&gate1, None),
            waiting(&go, None)
        ),
    ]);
    let all = s.detached(&[
        "--mem",
        "1G",
        "-d",
        &format!("afterok:{array}"),
        "--",
        "true",
    ]);
    let one = s.detached(&[
        "--mem",
        "1G",
        "-d",
        &format!("afterany:{array}_1"),
        "--",
        "true",
    ]);
    assert_eq!(reason(&s, all), "Dependency");
    assert_eq!(reason(&s, one), "Dependency");
    std::fs::write(&gate1, "").unwrap();
    assert_eq!(state_of(&s, one), "COMPLETED");
    assert_eq!(reason(&s, all), "Dependency");
    // After a restart the array's ended task is read from the records, the others followed.
    s.restart();
    assert_eq!(reason(&s, all), "Dependency");
    std::fs::write(&go, "").unwrap();
    assert_eq!(state_of(&s, all), "COMPLETED");
}

#[test]
fn dependencies_holds_and_drains_survive_a_restart() {
    let mut s = Server::start("2x24GiB", &[]);
    let go = s.scratch.join("go");
    let a = s.detached(&["--", "sh", "-c", &waiting(&go, None)]);
    s.wait_state(a, "RUNNING");
    let b = s.detached(&["-d", &format!("afterok:{a}"), "--", "true"]);
    let held = s.detached(&["--hold", "--", "true"]);
    assert_eq!(reason(&s, held), "JobHeldUser");
    s.ok(
        "mgpu_control",
        &["drain", "gpu", "1", "--reason", "upgrade"],
    );
    s.restart();
    assert_eq!(reason(&s, b), "Dependency");
    assert_eq!(reason(&s, held), "JobHeldUser");
    let q = s.queue_json();
    assert_eq!(q["gpus"][1]["drained"], "upgrade", "{q}");
    assert!(q["gpus"][0]["drained"].is_null(), "{q}");
    std::fs::write(&go, "").unwrap();
    assert_eq!(state_of(&s, a), "COMPLETED");
    assert_eq!(state_of(&s, b), "COMPLETED");
    assert_eq!(reason(&s, held), "JobHeldUser");
    s.ok("mgpu_control", &["release", &held.to_string()]);
    assert_eq!(state_of(&s, held), "COMPLETED");
    // Nothing started on the drained GPU.
    for id in [b, held] {
        assert_ne!(s.acct(id)["gpu_ids"], serde_json::json!([1]), "job {id}");
    }
}

#[test]
fn owners_hold_release_and_update_their_jobs_and_others_cannot() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("2x24GiB", &[]);
    let id = s.detached_as(&a, &["--hold", "-J", "mine", "--", "true"]);
    let sid = id.to_string();
    assert_eq!(reason(&s, id), "JobHeldUser");
    for action in ["release", "hold"] {
        let out = s
            .cmd_as(&b, "mgpu_control")
            .args([action, &sid])
            .output()
            .unwrap();
        assert_fails_with(&out, "permission denied");
    }
    let out = s
        .cmd_as(&b, "mgpu_control")
        .args(["update", &sid, "Name=stolen"])
        .output()
        .unwrap();
    assert_fails_with(&out, "permission denied");
    let out = s
        .cmd_as(&a, "mgpu_control")
        .args([
            "update",
            &format!("JobId={id}"),
            "TimeLimit=5",
            "Gpus=2",
            "Name=renamed",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j = s.job(id).unwrap();
    assert_eq!(j["name"], "renamed");
    assert_eq!(j["gpus"], 2);
    assert_eq!(j["time_limit_s"], 300);
    let out = s
        .cmd_as(&a, "mgpu_control")
        .args(["update", &sid, "Gpus=3"])
        .output()
        .unwrap();
    assert_fails_with(&out, "3 GPUs");
    let out = s
        .cmd_as(&a, "mgpu_control")
        .args(["update", &sid, "Nice=-5"])
        .output()
        .unwrap();
    assert_fails_with(&out, "only root");
    let shown = text(
        &s.cmd_as(&a, "mgpu_control")
            .args(["show", "job", &sid])
            .output()
            .unwrap()
            .stdout,
    );
    for want in [
        "JobName=renamed",
        "Hold=user",
        "Reason=JobHeldUser",
        "Gpus=2",
        "UserId=mgpu-test-a",
    ] {
        assert!(shown.contains(want), "{want} missing: {shown}");
    }
    // Others see the job as the queue shows it, not its command or directory.
    let theirs = text(
        &s.cmd_as(&b, "mgpu_control")
            .args(["show", "job", &sid])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(
        theirs.contains("JobName=renamed") && !theirs.contains("WorkDir="),
        "{theirs}"
    );
    assert!(
        shown.contains("WorkDir=") && shown.contains("Command=true"),
        "{shown}"
    );
    // Root's hold is an admin hold: the owner cannot release it.
    s.ok("mgpu_control", &["hold", &sid]);
    assert_eq!(reason(&s, id), "JobHeldAdmin");
    let out = s
        .cmd_as(&a, "mgpu_control")
        .args(["release", &sid])
        .output()
        .unwrap();
    assert_fails_with(&out, "held by root");
    s.ok("mgpu_control", &["release", &sid]);
    assert_eq!(state_of(&s, id), "COMPLETED");
    let out = s
        .cmd_as(&b, "mgpu_control")
        .args(["show", "job", &sid])
        .output()
        .unwrap();
    assert_fails_with(&out, "shown to root only");
    assert!(s
        .ok("mgpu_control", &["show", "job", &sid])
        .contains("JobState=COMPLETED"));
    // A running job: its owner may lower its time limit, only root may raise it.
    let run = s.detached_as(&a, &["-t", "10", "--", "sleep", "120"]);
    s.wait_state(run, "RUNNING");
    let srun = run.to_string();
    let upd = |who: Option<&TestUser>, t: &str| {
        let mut c = match who {
            Some(u) => s.cmd_as(u, "mgpu_control"),
            None => s.cmd("mgpu_control"),
        };
        c.args(["update", &srun, &format!("TimeLimit={t}")])
            .output()
            .unwrap()
    };
    assert!(upd(Some(&a), "5").status.success());
    assert_eq!(s.job(run).unwrap()["time_limit_s"], 300);
    assert_fails_with(&upd(Some(&a), "20"), "only root may raise");
    assert!(upd(None, "20").status.success());
    assert_eq!(s.job(run).unwrap()["time_limit_s"], 1200);
    let out = s
        .cmd_as(&a, "mgpu_control")
        .args(["hold", &srun])
        .output()
        .unwrap();
    assert_fails_with(&out, "no longer pending");
    s.ok("mgpu_cancel", &[&srun]);
}

#[test]
fn time_limit_plus_and_minus_change_the_current_limit_and_srun_refuses_a_sign() {
    let s = Server::start("2x24GiB", &[]);
    let run = s.detached(&["-t", "10", "--", "sleep", "120"]);
    s.wait_state(run, "RUNNING");
    let update = |id: u64, t: &str| {
        s.cmd("mgpu_control")
            .args(["update", &id.to_string(), &format!("TimeLimit={t}")])
            .output()
            .unwrap()
    };
    // Slurm's scontrol: +N adds N minutes to the current limit, -N takes them off.
    let out = update(run, "+5");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(s.job(run).unwrap()["time_limit_s"], 900);
    assert!(update(run, "-0:10:00").status.success());
    assert_eq!(s.job(run).unwrap()["time_limit_s"], 300);
    assert_fails_with(&update(run, "-5"), "would leave no time");
    assert_eq!(s.job(run).unwrap()["time_limit_s"], 300);
    // A job without a limit has nothing to change.
    let held = s.detached(&["--hold", "--", "true"]);
    assert_fails_with(&update(held, "+5"), "has no time limit");
    assert!(s.job(held).unwrap()["time_limit_s"].is_null());
    // Elsewhere a time takes no sign: `-t +10` is not 10 minutes.
    let out = s
        .cmd("mgpu_srun")
        .args(["--detach", "-t", "+10", "--", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "takes no sign");
    s.ok("mgpu_cancel", &[&run.to_string(), &held.to_string()]);
}

#[test]
fn a_drained_gpu_gets_no_new_jobs_and_a_drained_server_starts_nothing() {
    let s = Server::start("2x24GiB", &[]);
    let running = s.detached(&["--", "sleep", "120"]);
    s.wait_state(running, "RUNNING");
    let on = s.job(running).unwrap()["gpu_ids"][0].as_u64().unwrap();
    // Drain the GPU it runs on: it runs on; new jobs go to the other one.
    s.ok(
        "mgpu_control",
        &["drain", "gpu", &on.to_string(), "--reason", "maintenance"],
    );
    let next = s.detached(&["--", "sleep", "120"]);
    s.wait_state(next, "RUNNING");
    assert_eq!(s.job(next).unwrap()["gpu_ids"], serde_json::json!([1 - on]));
    assert_eq!(s.job(running).unwrap()["state"], "RUNNING");
    let wide = s.detached(&["--gpus", "2", "--", "true"]);
    assert_eq!(reason(&s, wide), "GpuDrained");
    let table = s.ok("mgpu_queue", &[]);
    assert!(
        table.contains(&format!("GPU {on} drained (maintenance)")),
        "{table}"
    );
    let out = s
        .cmd("mgpu_control")
        .args(["drain", "gpu", "7"])
        .output()
        .unwrap();
    assert_fails_with(&out, "no GPU 7");
    if let Some((a, _)) = test_users() {
        let out = s
            .cmd_as(&a, "mgpu_control")
            .args(["resume", "gpu", &on.to_string()])
            .output()
            .unwrap();
        assert_fails_with(&out, "only root");
    }
    // The whole server: nothing new starts until it is resumed.
    s.ok("mgpu_control", &["drain", "server", "--reason", "upgrade"]);
    s.ok("mgpu_cancel", &[&running.to_string(), &next.to_string()]);
    s.ok("mgpu_control", &["resume", "gpu", &on.to_string()]);
    s.wait_gone(running);
    s.wait_gone(next);
    assert_eq!(reason(&s, wide), "ServerDrained");
    let one = s.detached(&["--", "true"]);
    assert_eq!(reason(&s, one), "ServerDrained");
    assert!(s.ok("mgpu_queue", &[]).contains("SERVER DRAINED (upgrade)"));
    s.ok("mgpu_control", &["resume", "server"]);
    assert_eq!(state_of(&s, one), "COMPLETED");
    assert_eq!(state_of(&s, wide), "COMPLETED");
}

#[test]
fn a_held_job_array_is_released_task_by_task_or_whole() {
    let s = Server::start("2x24GiB", &[]);
    let array = s.detached(&["--hold", "--array", "0-2", "--mem", "1G", "--", "true"]);
    let tasks = [array, array + 1, array + 2];
    for id in tasks {
        assert_eq!(reason(&s, id), "JobHeldUser");
    }
    s.ok("mgpu_control", &["release", &format!("{array}_0")]);
    assert_eq!(state_of(&s, array), "COMPLETED");
    assert_eq!(reason(&s, array + 1), "JobHeldUser");
    // The whole array by its id: its finished task is left alone.
    s.ok("mgpu_control", &["hold", &array.to_string()]);
    assert_eq!(reason(&s, array + 2), "JobHeldUser");
    // (Its first task, whose id is the array's, is over: the id still names the array.)
    s.ok("mgpu_control", &["release", &array.to_string()]);
    assert_eq!(state_of(&s, array + 1), "COMPLETED");
    assert_eq!(state_of(&s, array + 2), "COMPLETED");
}

/// Slurm's `ID_TASK` works in every client that takes a job id, not only mgpu_control.
#[test]
fn id_task_names_an_array_task_in_cancel_log_queue_and_acct() {
    let s = Server::start("2x24GiB", &[]);
    let go = s.scratch.join("go");
    let job = format!("echo task=$MGPU_ARRAY_TASK_ID; {}", waiting(&go, None));
    let array = s.detached(&["--array", "1-2", "--mem", "1G", "--", "sh", "-c", &job]);
    let (t1, t2) = (format!("{array}_1"), format!("{array}_2"));
    s.wait_state(array, "RUNNING");
    s.wait_state(array + 1, "RUNNING");
    let listed = s.ok("mgpu_queue", &["-j", &t2, "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<u64> = (listed["jobs"].as_array().unwrap().iter())
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![array + 1]);
    wait_until(Duration::from_secs(60), || s.log(array).contains("task=1"));
    assert!(s.ok("mgpu_log", &[&t1]).contains("task=1"));
    s.ok("mgpu_cancel", &[&t2]);
    assert_eq!(state_of(&s, array + 1), "CANCELLED");
    std::fs::write(&go, "").unwrap();
    assert_eq!(state_of(&s, array), "COMPLETED");
    // Comma lists of ids and of states, as sacct takes them.
    let acct = |args: &[&str]| {
        let mut all = vec!["--json"];
        all.extend(args);
        let v: serde_json::Value = serde_json::from_str(&s.ok("mgpu_acct", &all)).unwrap();
        (v["jobs"].as_array().unwrap().iter())
            .map(|j| j["id"].as_u64().unwrap())
            .collect::<Vec<u64>>()
    };
    assert_eq!(acct(&["-j", &format!("{t2},{t1}")]), vec![array, array + 1]);
    assert_eq!(
        acct(&["-j", &format!("{t1},{t2}"), "-s", "CA"]),
        vec![array + 1]
    );
    assert_eq!(acct(&["-s", "CD,CA"]), vec![array, array + 1]);
    assert_eq!(acct(&["--state", "F,TO"]), Vec::<u64>::new());
    // A task that does not exist, or a malformed id: a clear error everywhere.
    let t9 = format!("{array}_9");
    for (program, args) in [
        ("mgpu_cancel", vec![t9.as_str()]),
        ("mgpu_log", vec![t9.as_str()]),
        ("mgpu_queue", vec!["-j", t9.as_str()]),
        ("mgpu_acct", vec!["-j", t9.as_str()]),
    ] {
        let out = s.cmd(program).args(&args).output().unwrap();
        assert_fails_with(&out, &format!("job {t9}: no such job array task"));
        let out = s
            .cmd(program)
            .args(&args[..args.len() - 1])
            .arg("4_x")
            .output()
            .unwrap();
        assert_fails_with(&out, "invalid job id '4_x'");
    }
}

/// A hold names each job once however often it is written, and a job array's id counts all
/// its tasks against the 10,000-job limit before anything changes: a request over it is
/// refused whole. Another user's array gets one refusal line, not one per task.
#[test]
fn hold_dedupes_ids_and_refuses_a_request_over_the_limit_whole() {
    let s = Server::start("1x24GiB", &[]);
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let a = s.detached(&["--array", "0-5999", "--", "true"]);
    let b = s.detached(&["--array", "0-4999", "--", "true"]);
    let (sa, sb) = (a.to_string(), b.to_string());
    // 12,000 names of the same array (and its first task written out) are one array.
    let mut many: Vec<String> = vec![sa.clone(); 12_000];
    many.push(format!("{a}_0"));
    let mut args = vec!["hold".to_string()];
    args.extend(many);
    let out = s.cmd("mgpu_control").args(&args).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(reason(&s, a + 5999), "JobHeldUser");
    // 6,000 + 5,000 tasks: refused, nothing held.
    let out = s
        .cmd("mgpu_control")
        .args(["hold", &sb, &sa])
        .output()
        .unwrap();
    assert_fails_with(&out, "too many jobs in one request: it names 11000");
    assert_fails_with(&out, "nothing was changed");
    assert_ne!(reason(&s, b), "JobHeldUser");
    assert_ne!(reason(&s, b + 4999), "JobHeldUser");
    if let Some((u, _)) = test_users() {
        let out = s
            .cmd_as(&u, "mgpu_control")
            .args(["release", &sa])
            .output()
            .unwrap();
        assert_fails_with(&out, "permission denied");
        assert_eq!(
            text(&out.stderr).matches("permission denied").count(),
            1,
            "{}",
            text(&out.stderr)
        );
    }
    s.ok("mgpu_cancel", &[&sa, &sb, &blocker.to_string()]);
}

/// `show job` of a finished job reads its accounting record (by its id, never a scan): its
/// owner and root see it, another user does not.
#[test]
fn show_job_of_a_finished_job_is_its_record_for_its_owner() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let id = s.detached_as(&a, &["--", "sh", "-c", "exit 3"]);
    // (Its record is written just after it leaves the queue.)
    s.acct(id);
    let out = s
        .cmd_as(&a, "mgpu_control")
        .args(["show", "job", &id.to_string()])
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("JobState=FAILED"), "{shown}");
    assert!(shown.contains("ExitCode=3:0"), "{shown}");
    assert!(shown.contains("EndTime=2"), "{shown}");
    assert!(s
        .ok("mgpu_control", &["show", "job", &id.to_string()])
        .contains("ExitCode=3:0"));
    let out = s
        .cmd_as(&b, "mgpu_control")
        .args(["show", "job", &id.to_string()])
        .output()
        .unwrap();
    assert_fails_with(&out, "no such job");
}
