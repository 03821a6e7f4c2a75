//! The real `mgpu-sim` binary on bad input: every case ends with a clear error (non-zero exit,
//! an `Error:` line naming the problem), never a panic or a hang. And `--split`, `--users`,
//! `--load` and `--json` with `--matrix` on small traces.

use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;

const HEADER: &str = "submission_time,duration,num_gpu\n";

/// A small trace: 12 jobs of 1, 2 and 4 GPUs, one a minute.
fn small_trace() -> String {
    let mut text = HEADER.to_string();
    for i in 0..12u32 {
        text += &format!(
            "{},{},{}\n",
            i * 60,
            300 + 100 * (i % 5),
            [1, 2, 4][i as usize % 3]
        );
    }
    text
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sim(args: &[&str]) -> assert_cmd::assert::Assert {
    Command::cargo_bin("mgpu-sim")
        .unwrap()
        .env("RUST_BACKTRACE", "0")
        .args(args)
        .timeout(Duration::from_secs(120))
        .assert()
}

/// Runs `args`, expects a clean failure whose message contains `expected`.
fn fails_with(args: &[&str], expected: &str) {
    let out = sim(args).get_output().clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {stderr}"
    );
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("Error: ") && stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr}"
    );
}

fn succeeds(args: &[&str]) -> String {
    let out = sim(args).get_output().clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bad_inputs_are_clear_errors_not_panics_or_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.csv", &small_trace());
    let good = good.to_str().unwrap();
    let t = |name: &str, text: &str| write(dir.path(), name, text).to_str().unwrap().to_string();
    let cases: Vec<(String, &str)> = vec![
        (t("empty.csv", ""), "the trace is empty"),
        (t("header.csv", HEADER), "has no GPU jobs"),
        (t("cols.csv", "a,b,c\n1,2,3\n"), "needs the columns"),
        (t("word.csv", &format!("{HEADER}0,ten,1\n")), "bad duration"),
        (t("nan.csv", &format!("{HEADER}0,NaN,1\n")), "bad duration"),
        (
            t("inf.csv", &format!("{HEADER}inf,10,1\n")),
            "bad submission_time",
        ),
        (t("neg.csv", &format!("{HEADER}0,-10,1\n")), "bad duration"),
        (
            t("huge.csv", &format!("{HEADER}0,1e300,1\n")),
            "bad duration",
        ),
        (t("gpus.csv", &format!("{HEADER}0,10,-1\n")), "bad num_gpu"),
        (
            t("wide.csv", &format!("{HEADER}0,10,99999999999\n")),
            "bad num_gpu",
        ),
        (
            t("binary.csv", "\u{0}\u{1}\u{2}\n\u{3}"),
            "needs the columns",
        ),
        (
            t(
                "lim.csv",
                "submission_time,duration,num_gpu,time_limit\n0,10,1,nan\n",
            ),
            "bad time_limit",
        ),
        (
            t(
                "mem.csv",
                "submission_time,duration,num_gpu,mem_mib\n0,10,1,-5\n",
            ),
            "bad mem_mib",
        ),
    ];
    for (trace, expected) in &cases {
        fails_with(&["--trace", trace], expected);
    }
    fails_with(
        &["--trace", "/nonexistent/trace.csv"],
        "cannot read the trace",
    );
    for (flag, value, expected) in [
        ("--load", "nan", "--load must be"),
        ("--load", "0", "--load must be"),
        ("--load", "-1", "--load must be"),
        ("--load", "1e300", "--load must be"),
        ("--load", "1e-300", "too low for this trace"),
        ("--limit-factor", "nan", "--limit-factor must be"),
        ("--limit-factor", "inf", "--limit-factor must be"),
        ("--limit-factor", "-1", "--limit-factor must be"),
        ("--limit-factor", "0.5", "--limit-factor must be"),
        ("--users", "0", "--users must be"),
        ("--users", "4000000000", "--users must be"),
        ("--gpus", "0x80GiB", "no GPUs"),
        ("--gpus", "8x0GiB", "bad GPU size"),
        ("--gpus", "99999999999x80GiB", "bad GPU count"),
        ("--gpus", "8x99999999999999999999GiB", "bad GPU size"),
        ("--split", "0", "--split must be at least 1"),
        ("--split", "13", "cannot split 12 jobs into 13"),
        ("--repeat", "0", "--repeat must be"),
        ("--repeat", "4000000000", "--repeat must be"),
        ("--mem-fraction", "nan", "--mem-fraction must be"),
        ("--half-life-h", "0", "--half-life-h must be"),
        ("--usage-factor", "nan", "--usage-factor must be"),
        // The daemon refuses these too: the simulator replays only what a server would run.
        ("--age-factor", "0", "--age-factor must be"),
        ("--size-weight", "10001", "--size-weight must be"),
        (
            "--reserve-below-share",
            "2",
            "--reserve-below-share must be",
        ),
        ("--reserve-after-h", "-1", "--reserve-after-h must be"),
        (
            "--reserve-below-share",
            "nan",
            "--reserve-below-share must be",
        ),
    ] {
        fails_with(&["--trace", good, &format!("{flag}={value}")], expected);
    }
    // A flood draws its jobs from the trace's 1-GPU jobs.
    let multi = t("multi.csv", &format!("{HEADER}0,600,2\n5,600,4\n"));
    fails_with(&["--trace", &multi, "--flood"], "1-GPU jobs");
    // The matrix: no traces, a bad trace among them, bad options.
    let empty_dir = tempfile::tempdir().unwrap();
    fails_with(
        &["--matrix", empty_dir.path().to_str().unwrap()],
        "no *.csv traces",
    );
    fails_with(
        &["--matrix", "/nonexistent/dir"],
        "cannot read the directory",
    );
    let matrix = tempfile::tempdir().unwrap();
    write(matrix.path(), "a.csv", &small_trace());
    let m = matrix.path().to_str().unwrap();
    fails_with(
        &["--matrix", m, "--split", "0"],
        "--split must be at least 1",
    );
    fails_with(&["--matrix", m, "--load", "nan"], "--load must be");
    fails_with(&["--matrix", m, "--users", "0"], "--users must be");
    // Every trace is checked before the table starts.
    let out = sim(&["--matrix", m, "--split", "13"]).failure();
    assert!(out.get_output().stdout.is_empty());
    write(matrix.path(), "b.csv", HEADER);
    fails_with(&["--matrix", m], "has no GPU jobs");
}

#[test]
fn refused_jobs_are_counted_and_odd_but_valid_inputs_run() {
    let dir = tempfile::tempdir().unwrap();
    // Zero memory, more memory than a GPU, wider than the server: refused, not errors.
    let trace = write(
        dir.path(),
        "odd.csv",
        "submission_time,duration,num_gpu,mem_mib\n0,600,1,0\n1,600,1,18446744073709551615\n\
         2,600,9,\n3,600,1,\n4,0,1,\n",
    );
    let out = succeeds(&["--trace", trace.to_str().unwrap(), "--load", "100"]);
    assert!(out.contains("refused (wider than the server or more memory than a GPU): 3 jobs"));
    // Every job at one instant (a load as high as allowed) and a huge time-limit factor.
    let good = write(dir.path(), "good.csv", &small_trace());
    let good = good.to_str().unwrap();
    succeeds(&["--trace", good, "--load", "100", "--limit-factor", "1e300"]);
    // A flood of a trace whose 1-GPU jobs are all there is.
    succeeds(&["--trace", good, "--flood", "--policy", "fair"]);
}

#[test]
fn split_replays_each_segment_as_a_trace_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let trace = write(dir.path(), "small.csv", &small_trace());
    let out = succeeds(&[
        "--trace",
        trace.to_str().unwrap(),
        "--split",
        "3",
        "--load",
        "0.9",
        "--policy",
        "fair",
        "--json",
    ]);
    let runs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let runs = runs.as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["trace"].as_str().unwrap()).collect();
    assert_eq!(names, ["small#1of3", "small#2of3", "small#3of3"]);
    for r in runs {
        assert_eq!(r["jobs"], 4);
        // Load rescaled per segment.
        assert!(
            (r["offered_load"].as_f64().unwrap() - 0.9).abs() < 1e-3,
            "{r}"
        );
    }
}

#[test]
fn matrix_reports_goal_5_with_split_users_and_load() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "small.csv", &small_trace());
    // A trace without 1-GPU jobs: its flood is reported as impossible, the rest runs.
    write(
        dir.path(),
        "wide.csv",
        &format!("{HEADER}0,600,2\n60,900,4\n120,300,2\n180,600,8\n"),
    );
    let d = dir.path().to_str().unwrap();
    let text = succeeds(&[
        "--matrix", d, "--split", "2", "--users", "3", "--load", "0.8",
    ]);
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.last().unwrap();
    // 2 traces x 2 segments x 6 cells, and 2 floods (small's segments; wide has no 1-GPU job).
    let (passed, rest) = last.split_once('/').unwrap();
    assert!(passed.parse::<usize>().unwrap() <= 26, "{last}");
    assert_eq!(rest, "26 cells pass (policy fair, 8 GPUs, load 0.8)");
    assert!(
        lines[lines.len() - 2].starts_with("goal 5: fair fairest in "),
        "{text}"
    );
    assert!(
        text.contains("small#1of2") && text.contains("wide#2of2"),
        "{text}"
    );
    assert!(text.contains("wide#1of2              flood: "), "{text}");
    let json = succeeds(&[
        "--matrix", d, "--split", "2", "--users", "3", "--load", "0.8", "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (r["users"].as_u64(), r["load"].as_f64()),
        (Some(3), Some(0.8))
    );
    assert_eq!(r["cells"].as_array().unwrap().len(), 24);
    assert_eq!(r["total"], 26);
    let mut meets = 0;
    let mut fairest = 0;
    for cell in r["cells"].as_array().unwrap() {
        let policies = cell["policies"].as_array().unwrap();
        let names: Vec<&str> = policies
            .iter()
            .map(|p| p["policy"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["strict-fifo", "fifo-firstfit", "backfill", "fair"]);
        // The PASS column is fair's goals 1-3; goal 5 is judged only where fair meets them.
        let fair_ok = policies[3]["goals"]["ok"].as_bool().unwrap();
        assert_eq!(cell["pass"].as_bool(), Some(fair_ok));
        assert_eq!(cell["fair_fairest"].is_null(), !fair_ok, "{cell}");
        meets += usize::from(fair_ok);
        fairest += usize::from(cell["fair_fairest"] == true);
        for p in policies {
            assert!(p["min_fair_share"].as_f64().unwrap() > 0.0, "{p}");
        }
    }
    assert_eq!(r["fair_meets_1_to_3"], meets);
    assert_eq!(r["fair_fairest"], fairest);
}

#[test]
fn a_failed_flood_cell_gives_the_wait_without_the_flood() {
    let dir = tempfile::tempdir().unwrap();
    // Steady users whose 100-hour 8-GPU jobs queue behind each other: some seeds fail goal 4.
    write(
        dir.path(),
        "long.csv",
        &format!("{HEADER}0,36000,1\n60,360000,8\n120,600,8\n"),
    );
    let d = dir.path().to_str().unwrap();
    let args = ["--matrix", d, "--seed", "1", "--seed", "2", "--seed", "3"];
    let json = succeeds(&[&args[..], &["--json"]].concat());
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let floods = r["floods"].as_array().unwrap();
    assert_eq!(floods.len(), 3);
    let mut failed = 0;
    for f in floods {
        let pass = f["pass"].as_bool().unwrap();
        // Measured only where the goal is missed.
        assert_eq!(f["alone_mean_wait_s"].is_null(), pass, "{f}");
        if pass {
            continue;
        }
        failed += 1;
        let alone = f["alone_mean_wait_s"].as_f64().unwrap();
        let first_fit =
            f["others_mean_wait_s"].as_f64().unwrap() / f["vs_first_fit"].as_f64().unwrap();
        let ratio = f["alone_vs_first_fit"].as_f64().unwrap();
        assert!(
            alone > 0.0 && (ratio - alone / first_fit).abs() < 1e-9,
            "{f}"
        );
    }
    assert!(failed > 0, "{floods:?}");
    let text = succeeds(&args);
    assert!(
        text.lines()
            .any(|l| l.contains("goal 4 FAIL (with no flood at all they wait ")),
        "{text}"
    );
}
