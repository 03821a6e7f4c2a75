//! Coming from Slurm: `mgpu_sbatch` batch scripts and their directives, Slurm's spellings on
//! `mgpu_srun`/`mgpu_sbatch`, `-o`/`-e` files written as the user, `--export`, `--wrap`, and
//! squeue/scancel-style filters on `mgpu_queue`/`mgpu_cancel`. Real binaries, real users.

mod common;

use std::time::Duration;

use common::*;

/// Runs `mgpu_sbatch --parsable ARGS` as root from `dir`; returns the job id.
fn sbatch(s: &Server, dir: &std::path::Path, args: &[&str]) -> u64 {
    let mut c = s.cmd("mgpu_sbatch");
    c.current_dir(dir).arg("--parsable").args(args);
    s.submit(c)
}

/// Waits for the job to be finished; returns its accounting record.
fn finished(s: &Server, id: u64) -> serde_json::Value {
    s.wait_gone(id);
    s.acct(id)
}

#[test]
fn sbatch_script_directives_set_options_and_the_command_line_wins() {
    let s = Server::start("2x24GiB", &[]);
    let dir = s.scratch.clone();
    write_file(
        &dir.join("job.sh"),
        "#!/bin/bash\n# a comment\n#SBATCH -J from-directive --gres=gpu:2\n#SBATCH --time=10 # minutes\n#MGPU --mem 1G\necho \"args=$* gpus=$CUDA_VISIBLE_DEVICES name=$SLURM_JOB_NAME\"\n#SBATCH -J ignored-after-a-command\n",
        0o755,
    );
    let id = sbatch(&s, &dir, &["job.sh", "a", "b"]);
    let rec = finished(&s, id);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    assert_eq!(rec["name"], "from-directive");
    assert_eq!(rec["gpus"], 2);
    assert_eq!(rec["mem_mib"], 1024);
    assert!(
        s.log(id).contains("args=a b gpus=0,1 name=from-directive"),
        "{}",
        s.log(id)
    );
    // The command line beats the directives.
    let id = sbatch(&s, &dir, &["-J", "from-cli", "--gpus", "1", "job.sh"]);
    let rec = finished(&s, id);
    assert_eq!(rec["name"], "from-cli");
    assert_eq!(rec["gpus"], 1);
    // Plain output: Slurm's words.
    let out = s
        .cmd("mgpu_sbatch")
        .current_dir(&dir)
        .arg("job.sh")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(line.starts_with("Submitted batch job "), "{line}");
    let id: u64 = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    finished(&s, id);
}

#[test]
fn sbatch_array_from_a_directive() {
    let s = Server::start("2x24GiB", &[]);
    let dir = s.scratch.clone();
    write_file(
        &dir.join("arr.sh"),
        "#!/bin/sh\n#SBATCH --array=0-2 --mem-per-gpu=100M\n#SBATCH -o arr-%4A_%3a.out\necho task=$SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID\n",
        0o644,
    );
    let first = sbatch(&s, &dir, &["arr.sh"]);
    for (i, id) in (first..first + 3).enumerate() {
        let rec = finished(&s, id);
        assert_eq!(rec["state"], "COMPLETED", "{rec}");
        assert_eq!(rec["mem_mib"], 100);
        assert!(
            s.log(id).contains(&format!("task={i} of {first}")),
            "{}",
            s.log(id)
        );
        // sbatch's zero-padded patterns: a file of its own for each task.
        let out = dir.join(format!("arr-{first:04}_{i:03}.out"));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap_or_default(),
            format!("task={i} of {first}\n"),
            "{}",
            out.display()
        );
    }
}

/// SLURM_SUBMIT_DIR is where sbatch ran, also with --chdir elsewhere (it was --chdir).
#[test]
fn slurm_submit_dir_is_where_the_client_ran() {
    let s = Server::start("1x24GiB", &[]);
    let (from, work) = (s.scratch.join("from"), s.scratch.join("work"));
    std::fs::create_dir(&from).unwrap();
    std::fs::create_dir(&work).unwrap();
    let show = "echo submit=$SLURM_SUBMIT_DIR pwd=$(pwd)";
    let elsewhere = sbatch(&s, &from, &["-D", work.to_str().unwrap(), "--wrap", show]);
    let here = sbatch(&s, &from, &["--wrap", show]);
    for (id, pwd) in [(elsewhere, &work), (here, &from)] {
        assert_eq!(finished(&s, id)["state"], "COMPLETED");
        let want = format!("submit={} pwd={}", from.display(), pwd.display());
        assert!(s.log(id).contains(&want), "{want}: {}", s.log(id));
    }
}

#[test]
fn sbatch_runs_the_copy_taken_at_submit() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    let gate = dir.join("gate");
    // A blocker holds the only GPU until the gate file appears.
    let blocker = s.detached(&[
        "--",
        "sh",
        "-c",
        &format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display()),
    ]);
    let script = dir.join("copy.sh");
    write_file(&script, "#!/bin/sh\necho original version\n", 0o755);
    let id = sbatch(&s, &dir, &["copy.sh"]);
    assert_eq!(s.job(id).unwrap()["state"], "PENDING");
    // Edited (and then removed) after the submit: the job still runs what was submitted.
    write_file(&script, "#!/bin/sh\necho edited version\n", 0o755);
    std::fs::remove_file(&script).unwrap();
    std::fs::write(&gate, "").unwrap();
    finished(&s, blocker);
    let rec = finished(&s, id);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    let log = s.log(id);
    assert!(
        log.contains("original version") && !log.contains("edited"),
        "{log}"
    );
}

#[test]
fn sbatch_wrap_export_and_refusals() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    // --wrap runs sh -c.
    let id = sbatch(&s, &dir, &["--wrap", "echo wrapped $((6 * 7))"]);
    assert_eq!(finished(&s, id)["name"], "wrap");
    assert!(s.log(id).contains("wrapped 42"), "{}", s.log(id));
    // --export: NONE keeps nothing of ours, a list adds only what it names.
    let show = "echo A=${MGPU_T_A:-unset} B=${MGPU_T_B:-unset} C=${MGPU_T_C:-unset}";
    let run = |export: &str| {
        let mut c = s.cmd("mgpu_sbatch");
        c.current_dir(&dir)
            .env("MGPU_T_A", "a")
            .env("MGPU_T_B", "b")
            .args(["--parsable", "--export", export, "--wrap", show]);
        let id = s.submit(c);
        finished(&s, id);
        s.log(id)
    };
    assert!(run("ALL").contains("A=a B=b C=unset"));
    assert!(run("NONE").contains("A=unset B=unset C=unset"));
    assert!(run("MGPU_T_A,MGPU_T_C=c").contains("A=a B=unset C=c"));
    assert!(run("ALL,MGPU_T_C=c").contains("A=a B=b C=c"));
    // The script on stdin (sbatch < job.sh), with its directives.
    let mut child = s
        .cmd("mgpu_sbatch")
        .current_dir(&dir)
        .arg("--parsable")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"#!/bin/sh\n#SBATCH -J from-stdin\necho via stdin\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let id: u64 = text(&out.stdout).trim().parse().unwrap();
    assert_eq!(finished(&s, id)["name"], "from-stdin");
    assert!(s.log(id).contains("via stdin"));
    let out = s
        .cmd("mgpu_sbatch")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_fails_with(&out, "no script given");
    // An unsupported Slurm option in a directive: one line naming the line; nothing submitted.
    write_file(
        &dir.join("part.sh"),
        "#!/bin/bash\n#SBATCH -J ok\n\n#SBATCH --partition=gpu\necho never\n",
        0o755,
    );
    let out = s
        .cmd("mgpu_sbatch")
        .current_dir(&dir)
        .arg("part.sh")
        .output()
        .unwrap();
    assert_fails_with(
        &out,
        "part.sh line 4 (#SBATCH): --partition: mgpu has no partitions",
    );
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    // DOS line breaks: refused at submit (as sbatch), not left to fail when it runs.
    write_file(
        &dir.join("dos.sh"),
        "#!/bin/sh\r\n#SBATCH -J dos\r\necho hi\r\n",
        0o755,
    );
    let out = s
        .cmd("mgpu_sbatch")
        .current_dir(&dir)
        .arg("dos.sh")
        .output()
        .unwrap();
    assert_fails_with(&out, "dos.sh: the batch script contains DOS line breaks");
    assert_fails_with(&out, "dos2unix dos.sh");
    // Not a script.
    write_file(&dir.join("nosheb.sh"), "echo hi\n", 0o755);
    let out = s
        .cmd("mgpu_sbatch")
        .current_dir(&dir)
        .arg("nosheb.sh")
        .output()
        .unwrap();
    assert_fails_with(&out, "does not look like a batch script");
    // Too large.
    let big = format!("#!/bin/sh\n{}\n", "#".repeat(1 << 20));
    write_file(&dir.join("big.sh"), &big, 0o755);
    let out = s
        .cmd("mgpu_sbatch")
        .current_dir(&dir)
        .arg("big.sh")
        .output()
        .unwrap();
    assert_fails_with(&out, "larger than 1024 KiB");
    assert!(s.queue_json()["jobs"].as_array().unwrap().is_empty());
}

#[test]
fn srun_takes_slurm_spellings_and_a_scripts_directives() {
    let s = Server::start("2x24GiB", &[]);
    let dir = s.scratch.clone();
    let out = s
        .cmd("mgpu_srun")
        .current_dir(&dir)
        .args([
            "--gres=gpu:2",
            "--mem-per-gpu=2G",
            "-c",
            "1",
            "--",
            "sh",
            "-c",
        ])
        .arg("echo gpus=$CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("gpus=0,1"));
    // gpu:TYPE:N: the type is not honoured, and srun says so.
    let out = s
        .cmd("mgpu_srun")
        .args(["--gres=gpu:a100:1", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("does not choose GPUs by type"));
    // A script with directives given to srun: they apply; #SBATCH --mem is host memory.
    write_file(
        &dir.join("d.sh"),
        "#!/bin/sh\n#SBATCH --gpus-per-task=2 --mem=300M\necho gpus=$CUDA_VISIBLE_DEVICES\n",
        0o755,
    );
    let out = s
        .cmd("mgpu_srun")
        .current_dir(&dir)
        .arg("./d.sh")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("gpus=0,1"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("#SBATCH --mem is host memory"),
        "{}",
        text(&out.stderr)
    );
    let _ = Duration::ZERO;
}

/// `-o`/`-e` files are created by the job's own process as its user, in the job's working
/// directory, with Slurm's patterns; sbatch's default is slurm-%j.out.
#[test]
fn output_files_are_written_as_the_user_with_patterns() {
    use std::os::unix::fs::MetadataExt;
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let dir = tempfile::Builder::new()
        .prefix("mgpu-out-")
        .tempdir_in(&a.home)
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(a.uid), Some(a.gid)).unwrap();
    write_file(
        &dir.path().join("io.sh"),
        "#!/bin/sh\n#SBATCH -J io -o out-%j-%x-%u.txt\n#SBATCH --error=err-%A_%a-100%%.txt\necho to-stdout\necho to-stderr >&2\n",
        0o644,
    );
    let mut c = s.cmd_as(&a, "mgpu_sbatch");
    c.current_dir(dir.path()).args(["--parsable", "io.sh"]);
    let id = s.submit(c);
    assert_eq!(finished(&s, id)["state"], "COMPLETED");
    let out = dir.path().join(format!("out-{id}-io-{}.txt", a.name));
    let err = dir.path().join(format!("err-{id}_4294967294-100%.txt"));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "to-stdout\n");
    assert_eq!(std::fs::read_to_string(&err).unwrap(), "to-stderr\n");
    for f in [&out, &err] {
        assert_eq!(
            std::fs::metadata(f).unwrap().uid(),
            a.uid,
            "{}",
            f.display()
        );
    }
    // The server's log has both as well.
    let log = s.log(id);
    assert!(
        log.contains("to-stdout") && log.contains("to-stderr"),
        "{log}"
    );
    // sbatch's default, and an array's: both streams in slurm-%j.out / slurm-%A_%a.out.
    let mut c = s.cmd_as(&a, "mgpu_sbatch");
    c.current_dir(dir.path())
        .args(["--parsable", "--wrap", "echo o; echo e >&2"]);
    let id = s.submit(c);
    finished(&s, id);
    let f = dir.path().join(format!("slurm-{id}.out"));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "o\ne\n");
    assert_eq!(std::fs::metadata(&f).unwrap().uid(), a.uid);
    let mut c = s.cmd_as(&a, "mgpu_sbatch");
    c.current_dir(dir.path()).args([
        "--parsable",
        "-a",
        "3,5",
        "--wrap",
        "echo t=$SLURM_ARRAY_TASK_ID",
    ]);
    let first = s.submit(c);
    finished(&s, first);
    finished(&s, first + 1);
    for (id, task) in [(first, 3), (first + 1, 5)] {
        let _ = id;
        let f = dir.path().join(format!("slurm-{first}_{task}.out"));
        assert_eq!(std::fs::read_to_string(&f).unwrap(), format!("t={task}\n"));
    }
    // srun's -o, relative to --chdir.
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["-D"])
        .arg(dir.path())
        .args(["-o", "srun-%j.log", "--", "echo", "attached"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "attached\n");
    let n = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("srun-") && name.ends_with(".log")
        })
        .count();
    assert_eq!(n, 1);
}

/// A user's `-o` into a place only root may write fails the job with a clear message, and
/// nothing is written there: the file is never opened with root's rights (not even through a
/// symlink the user planted).
#[test]
fn output_files_never_written_with_roots_rights() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let victim_dir = tempfile::Builder::new()
        .prefix("mgpu-rootonly-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        victim_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let target = victim_dir.path().join("owned-by-root");
    let planted = a.home.join(format!("mgpu-planted-{}", std::process::id()));
    let _ = std::fs::remove_file(&planted);
    std::os::unix::fs::symlink(&target, &planted).unwrap();
    for path in [target.to_str().unwrap(), planted.to_str().unwrap()] {
        let mut c = s.cmd_as(&a, "mgpu_sbatch");
        c.current_dir(&a.home)
            .args(["--parsable", "-o", path, "--wrap", "echo secret"]);
        let id = s.submit(c);
        let rec = finished(&s, id);
        assert_eq!(rec["state"], "FAILED", "{rec}");
        let msg = rec["message"].as_str().unwrap_or_default().to_string();
        assert!(
            msg.contains("cannot open the job's output file") && msg.contains("Permission denied"),
            "{rec}"
        );
        assert!(!target.exists(), "root wrote {}", target.display());
    }
    let _ = std::fs::remove_file(&planted);
}

/// The `-o`/`-e` files are written with the user's rights only, never with root's
/// capabilities: a user's `-o` naming the `timerslack_ns` of one of their own processes cannot
/// change it (writing another process's takes CAP_SYS_NICE, checked at write time: the
/// supervisor has it, the user has not). Same for `oom_score_adj` with CAP_SYS_RESOURCE.
#[test]
fn output_files_are_written_without_roots_capabilities() {
    use std::os::unix::process::CommandExt;
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let mut victim = std::process::Command::new("sleep")
        .arg("120")
        .uid(a.uid)
        .gid(a.gid)
        .spawn()
        .unwrap();
    let slack = format!("/proc/{}/timerslack_ns", victim.id());
    let before = std::fs::read_to_string(&slack).unwrap();
    let mut c = s.cmd_as(&a, "mgpu_sbatch");
    c.current_dir(&a.home).args([
        "--parsable",
        "-o",
        &slack,
        "-e",
        "/dev/null",
        "--wrap",
        "echo 12345",
    ]);
    let id = s.submit(c);
    let rec = finished(&s, id);
    let after = std::fs::read_to_string(&slack).unwrap();
    let _ = victim.kill();
    let _ = victim.wait();
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    assert_ne!(before.trim(), "12345");
    assert_eq!(
        after, before,
        "the job's output changed {slack} with root's rights"
    );
}

/// The `-o` file is held to the user's own file size limit (`fsize` from limits.conf, as a
/// login gets it), not the server's: output past it is left out, as the kernel would stop
/// the user's own writes.
#[test]
fn output_files_keep_the_users_file_size_limit() {
    let Some((a, _b)) = test_users() else { return };
    let conf = tempfile::tempdir().unwrap();
    std::fs::write(
        conf.path().join("limits.conf"),
        format!("{} soft fsize 1\n", a.name),
    )
    .unwrap();
    let s = Server::start(
        "1x24GiB",
        &["--limits-conf-dir", conf.path().to_str().unwrap()],
    );
    let dir = tempfile::Builder::new()
        .prefix("mgpu-fsize-")
        .tempdir_in(&a.home)
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(a.uid), Some(a.gid)).unwrap();
    let mut c = s.cmd_as(&a, "mgpu_sbatch");
    c.current_dir(dir.path()).args([
        "--parsable",
        "-o",
        "big.out",
        "--wrap",
        "head -c 3000 /dev/zero | tr '\\0' x; echo",
    ]);
    let id = s.submit(c);
    let rec = finished(&s, id);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    let out = std::fs::read(dir.path().join("big.out")).unwrap();
    assert_eq!(out.len(), 1024);
    // The server's log has all of it.
    assert!(s.log(id).contains(&"x".repeat(3000)));
}

/// An `-o` file that stops taking output (here a terminal nobody reads: its writes block once
/// its buffer is full) never holds up the job's supervisor: the output it cannot take is
/// dropped with a note in the job's log, the job is still cancelled, and its GPU is freed.
#[test]
fn a_stalled_output_file_never_holds_up_the_supervisor() {
    let Some((a, _b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let dir = tempfile::Builder::new()
        .prefix("mgpu-stall-")
        .tempdir_in(&a.home)
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(a.uid), Some(a.gid)).unwrap();
    // A terminal whose master side is never read.
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills two descriptors, closed at the end of the test.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0);
    let tty = std::fs::read_link(format!("/proc/self/fd/{slave}")).unwrap();
    std::os::unix::fs::chown(&tty, Some(a.uid), Some(a.gid)).unwrap();
    let ready = dir.path().join("written");
    let script = format!(
        "head -c 10000000 /dev/zero | tr '\\0' x; echo; touch {}; sleep 120",
        ready.display()
    );
    let mut c = s.cmd_as(&a, "mgpu_sbatch");
    c.current_dir(dir.path())
        .args(["--parsable", "-o", tty.to_str().unwrap(), "--wrap", &script]);
    let id = s.submit(c);
    wait_until(Duration::from_secs(120), || ready.exists());
    s.ok("mgpu_cancel", &[&id.to_string()]);
    let rec = finished(&s, id);
    assert_eq!(rec["state"], "CANCELLED", "{rec}");
    let log = s.log(id);
    assert!(
        log.contains(&format!(
            "the output file '{}' does not keep up",
            tty.display()
        )),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
    // The GPU is free again.
    let out = s
        .cmd_as(&a, "mgpu_srun")
        .args(["--", "echo", "after"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "after\n");
    // SAFETY: our descriptors from openpty.
    unsafe {
        libc::close(master);
        libc::close(slave);
    }
}

/// squeue-style `mgpu_queue -u A,B -t PD,R -j ID,ID -o FORMAT`, with two real users.
#[test]
fn queue_filters_and_format_like_squeue() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    // a holds the GPU; b's and a's next jobs wait behind it.
    let run_a = s.detached_as(&a, &["-J", "hold", "--", "sleep", "120"]);
    s.wait_state(run_a, "RUNNING");
    let pend_b = s.detached_as(&b, &["-J", "bjob", "-t", "5", "--", "true"]);
    let pend_a = s.detached_as(&a, &["-J", "ajob", "--", "true"]);
    let ids = |args: &[&str]| -> Vec<u64> {
        let out = s
            .cmd("mgpu_queue")
            .args(["--noheader", "-o", "%i"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect()
    };
    assert_eq!(ids(&[]), [run_a, pend_b, pend_a]);
    assert_eq!(ids(&["-u", &a.name]), [run_a, pend_a]);
    // User ids, as squeue takes them.
    assert_eq!(ids(&["-u", &a.uid.to_string()]), [run_a, pend_a]);
    assert_eq!(
        ids(&["-u", &format!("{},{}", a.uid, b.name)]),
        [run_a, pend_b, pend_a]
    );
    let out = s
        .cmd("mgpu_queue")
        .args(["-u", "4000000000"])
        .output()
        .unwrap();
    assert_fails_with(&out, "no user has the id 4000000000");
    assert_eq!(
        ids(&["-u", &format!("{},{}", a.name, b.name)]),
        [run_a, pend_b, pend_a]
    );
    assert_eq!(ids(&["-t", "PD"]), [pend_b, pend_a]);
    assert_eq!(ids(&["--states=RUNNING"]), [run_a]);
    assert_eq!(ids(&["-t", "pending,r", "-u", &b.name]), [pend_b]);
    assert_eq!(ids(&["-j", &format!("{pend_a},{run_a}")]), [run_a, pend_a]);
    // --me is the caller's own.
    let out = s
        .cmd_as(&b, "mgpu_queue")
        .args(["--me", "--noheader", "-o", "%i %u"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), format!("{pend_b} {}\n", b.name));
    // The fields, with squeue's widths.
    let out = s
        .cmd("mgpu_queue")
        .args([
            "-j",
            &pend_b.to_string(),
            "-o",
            "%.8i|%-6j|%u|%T|%t|%M|%l|%D|%b|%R|%%",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(
        lines[0],
        "   JOBID|NAME  |USER|STATE|ST|TIME|TIME_LIMIT|NODES|TRES_PER_NODE|NODELIST(REASON)|%"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{pend_b:>8}|bjob  |{}|PENDING|PD|0:00|5:00|1|gpu:1|(",
            b.name
        )),
        "{}",
        lines[1]
    );
    // Unknown fields and states are refused; a job that is not there is said so.
    let out = s.cmd("mgpu_queue").args(["-o", "%i %P"]).output().unwrap();
    assert_fails_with(&out, "unknown field %P");
    let out = s.cmd("mgpu_queue").args(["-t", "XX"]).output().unwrap();
    assert_fails_with(&out, "unknown state 'XX'");
    let out = s.cmd("mgpu_queue").args(["-j", "999999"]).output().unwrap();
    assert_fails_with(&out, "no such pending or running job: 999999");
    s.ok("mgpu_cancel", &[&run_a.to_string()]);
}

/// scancel-style `mgpu_cancel -u -t -n`, combinable; a user's filters only reach their own
/// jobs; no arguments shows every form.
#[test]
fn cancel_filters_like_scancel() {
    let Some((a, b)) = test_users() else { return };
    let s = Server::start("1x24GiB", &[]);
    let run_a = s.detached_as(&a, &["-J", "sweep", "--", "sleep", "120"]);
    s.wait_state(run_a, "RUNNING");
    let pend_a_sweep = s.detached_as(&a, &["-J", "sweep", "--", "true"]);
    let pend_a_other = s.detached_as(&a, &["-J", "other", "--", "true"]);
    let pend_b_sweep = s.detached_as(&b, &["-J", "sweep", "--", "true"]);
    let present = |id: u64| s.job(id).is_some();
    // a: -n sweep -t PD reaches only a's pending sweep (not b's, not the running one).
    let out = s
        .cmd_as(&a, "mgpu_cancel")
        .args(["-n", "sweep", "-t", "PD"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!present(pend_a_sweep));
    assert!(present(run_a) && present(pend_a_other) && present(pend_b_sweep));
    // b's filter on a's jobs: refused by the server, job by job.
    let out = s
        .cmd_as(&b, "mgpu_cancel")
        .args(["-u", &a.name, "-t", "PD"])
        .output()
        .unwrap();
    assert_fails_with(&out, "permission denied");
    assert!(present(pend_a_other));
    // b's own -t PENDING: only b's.
    let out = s
        .cmd_as(&b, "mgpu_cancel")
        .args(["-t", "PENDING"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!present(pend_b_sweep) && present(pend_a_other));
    // root: -u a -t R.
    s.ok("mgpu_cancel", &["-u", &a.name, "-t", "R"]);
    s.wait_gone(run_a);
    // Ids with a filter: those of them that match.
    let blocker = s.detached(&["--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let x = s.detached(&["-J", "x", "--", "true"]);
    s.ok("mgpu_cancel", &["-n", "nomatch", &x.to_string()]);
    assert!(present(x));
    // No arguments: every form.
    let out = s.cmd("mgpu_cancel").output().unwrap();
    assert_fails_with(&out, "mgpu_cancel -t STATE");
    for form in ["--array ID", "--all", "-u USER", "-n NAME", "ID [ID...]"] {
        assert!(
            text(&out.stderr).contains(form),
            "{form}: {}",
            text(&out.stderr)
        );
    }
    s.ok("mgpu_cancel", &["--all"]);
}

/// `-o /dev/null`: no output file at all (as sbatch's help says), the output only in the
/// job's log, and no note that a file lost output.
#[test]
fn sbatch_output_to_dev_null_writes_no_file() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    let id = sbatch(
        &s,
        &dir,
        &["-o", "/dev/null", "--wrap", "echo hi; echo oops >&2"],
    );
    let rec = finished(&s, id);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    let log = s.log(id);
    assert!(log.contains("hi") && log.contains("oops"), "{log}");
    assert!(!log.contains("output file"), "{log}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a file was written"
    );
}

/// `mgpu_cancel -n NAME` picking more jobs than one request may name (10,000) sends them in
/// several requests and cancels them all (it used to send one request the server refused).
#[test]
fn a_filtered_cancel_of_more_than_one_request_cancels_them_all() {
    let s = Server::start("1x24GiB", &[]);
    let held = ["--hold", "-J", "many", "--", "true"];
    for _ in 0..2 {
        s.detached(&[&["--array", "0-9999"][..], &held[..]].concat());
    }
    s.detached(&held);
    let other = s.detached(&["--hold", "-J", "other", "--", "true"]);
    assert_eq!(s.queue_json()["jobs"].as_array().unwrap().len(), 20_002);
    s.ok("mgpu_cancel", &["-n", "many"]);
    let jobs = s.queue_json()["jobs"].as_array().unwrap().clone();
    let ids: Vec<u64> = jobs.iter().map(|j| j["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [other]);
}

/// `--begin`: the job waits with REASON BeginTime (durably: across a restart), and runs once
/// its time comes, never before.
#[test]
fn begin_time_holds_then_starts() {
    let mut s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    // Far off: pending with BeginTime, also after a restart, and in the queue's %R.
    let far = sbatch(&s, &dir, &["--begin", "now+1hour", "--wrap", "true"]);
    let job = s.job(far).unwrap();
    assert_eq!(job["state"], "PENDING");
    assert_eq!(job["reason"], "BeginTime", "{job}");
    s.restart();
    let job = s.job(far).unwrap();
    assert_eq!(job["reason"], "BeginTime", "after a restart: {job}");
    let out = s.ok(
        "mgpu_queue",
        &["--noheader", "-j", &far.to_string(), "-o", "%t %R"],
    );
    assert_eq!(out, "PD (BeginTime)\n");
    // `show job` says when, in local time as the other times (as scontrol does).
    let shown = s
        .cmd("mgpu_control")
        .env("TZ", "UTC0")
        .args(["show", "job", &far.to_string()])
        .output()
        .unwrap();
    let shown = text(&shown.stdout);
    let begin = shown
        .lines()
        .find_map(|l| l.strip_prefix("BeginTime="))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        begin.len() == 19 && begin.as_bytes()[10] == b'T' && !begin.contains('Z'),
        "{shown}"
    );
    let shown_in_berlin = s
        .cmd("mgpu_control")
        .env("TZ", "UTC-2")
        .args(["show", "job", &far.to_string()])
        .output()
        .unwrap();
    assert!(
        !text(&shown_in_berlin.stdout).contains(&format!("BeginTime={begin}")),
        "times are shown in the reader's zone"
    );
    // A GPU is free all along: the job still waits for its time, then runs.
    write_file(
        &dir.join("soon.sh"),
        "#!/bin/sh\n#SBATCH --begin=now+3seconds\necho began\n",
        0o755,
    );
    let soon = sbatch(&s, &dir, &["soon.sh"]);
    let rec = finished(&s, soon);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    let (sub, start) = (
        rec["submitted_at"].as_str().unwrap().to_string(),
        rec["started_at"].as_str().unwrap().to_string(),
    );
    let ms = |t: &str| {
        let out = std::process::Command::new("date")
            .args(["-d", t, "+%s%3N"])
            .output()
            .unwrap();
        text(&out.stdout).trim().parse::<u64>().unwrap()
    };
    // (The client rounds "now" down to the second.)
    assert!(
        ms(&start) >= ms(&sub) + 2000,
        "started {start}, submitted {sub}"
    );
    assert!(s.log(soon).contains("began"));
    s.ok("mgpu_cancel", &[&far.to_string()]);
    let out = s
        .cmd("mgpu_sbatch")
        .args(["--begin", "soon", "--wrap", "true"])
        .output()
        .unwrap();
    assert_fails_with(&out, "invalid --begin 'soon'");
}

/// A batch script's content never shows in a process's argv (anyone may read /proc/PID/cmdline)
/// and does not linger in its environment.
#[test]
fn script_content_is_not_in_argv_or_left_in_the_environment() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    write_file(
        &dir.join("secret.sh"),
        "#!/bin/sh\n# token-3141592653\necho vars=$(env | grep -c '^MGPU_SCRIPT_')\necho parent=$(tr '\\0' ' ' < /proc/$PPID/cmdline)\necho self=\"$0\"\n",
        0o755,
    );
    let id = sbatch(&s, &dir, &["secret.sh", "an-arg"]);
    assert_eq!(finished(&s, id)["state"], "COMPLETED");
    let log = s.log(id);
    assert!(log.contains("vars=0"), "{log}");
    assert!(log.contains("parent=/bin/sh -c"), "{log}");
    assert!(
        log.contains("an-arg") && log.contains("/secret.sh"),
        "{log}"
    );
    assert!(!log.contains("token-3141592653"), "{log}");
}

/// A script of several pieces (each environment string holds at most 128 KiB) arrives whole.
#[test]
fn a_large_script_arrives_whole() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    let filler: String = (0..14000)
        .map(|i| format!("# filler line {i:>6} é\n"))
        .collect();
    let script =
        format!("#!/bin/sh\n{filler}echo lines=$(wc -l < \"$0\") bytes=$(wc -c < \"$0\")\n");
    assert!(script.len() > 300 << 10 && script.len() < 1 << 20);
    write_file(&dir.join("large.sh"), &script, 0o755);
    let id = sbatch(&s, &dir, &["large.sh"]);
    assert_eq!(finished(&s, id)["state"], "COMPLETED");
    let want = format!("lines={} bytes={}", script.lines().count(), script.len());
    assert!(s.log(id).contains(&want), "{} (want {want})", s.log(id));
}

/// A job switched out and run again (context switch) adds to its `-o` file: the first run's
/// output is kept, as in the server's log.
#[test]
fn output_file_keeps_earlier_runs_across_a_context_switch() {
    let s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.clone();
    let id = sbatch(
        &s,
        &dir,
        &[
            "-t",
            "1s",
            "-o",
            "switch-%j.out",
            "--wrap",
            "if [ $MGPU_RESTART_COUNT = 0 ]; then echo first; sleep 30; else echo second; fi",
        ],
    );
    s.wait_state(id, "RUNNING");
    // A waiting job makes the overdue one switch out; it runs again after it.
    let other = s.detached(&["--", "true"]);
    let rec = finished(&s, id);
    assert_eq!(rec["state"], "COMPLETED", "{rec}");
    assert_eq!(rec["restarts"], 1, "{rec}");
    finished(&s, other);
    let file = std::fs::read_to_string(dir.join(format!("switch-{id}.out"))).unwrap();
    assert_eq!(file, "first\nsecond\n");
}
