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
        "#!/bin/sh\n#SBATCH --array=0-2 --mem-per-gpu=100M\necho task=$SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID\n",
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
