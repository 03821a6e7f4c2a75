//! Backup and restore of the job database as the README documents it: `sqlite3 STATE/mgpu.db
//! ".backup FILE"` on the live store (WAL), then the copy as the `mgpu.db` of a fresh state
//! directory for a new server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn a_backup_of_the_live_store_restores_pending_jobs_with_their_ids() {
    let mut s = Server::start("1x24GiB", &[]);
    let dir = s.scratch.display().to_string();
    // The one GPU held, so what follows stays pending.
    let blocker = s.detached(&["-J", "blocker", "--", "sleep", "120"]);
    s.wait_state(blocker, "RUNNING");
    let a = s.detached(&[
        "-J",
        "kept-a",
        "--",
        "sh",
        "-c",
        &format!("echo a >> {dir}/a"),
    ]);
    let b = s.detached(&[
        "-J",
        "kept-b",
        "--",
        "sh",
        "-c",
        &format!("echo b >> {dir}/b"),
    ]);
    assert_eq!(s.pending_order(), vec![a, b]);

    // The documented command, on the store the running server is writing.
    let backup = s.dir.join("backup.db");
    let out = Command::new("sqlite3")
        .arg(s.state_dir.join("mgpu.db"))
        .arg(format!(".backup '{}'", backup.display()))
        .output()
        .expect("the sqlite3 command-line tool (apt install sqlite3)");
    assert!(
        out.status.success(),
        "sqlite3 .backup: {}",
        text(&out.stderr)
    );

    // The original server ends its jobs (pending ones first, so none starts) and stops.
    s.ok("mgpu_cancel", &[&a.to_string(), &b.to_string()]);
    s.ok("mgpu_cancel", &[&blocker.to_string()]);
    s.wait_gone(blocker);
    s.stop();

    // A new server, on a fresh state directory holding only the restored database.
    let mut r = Server::start("1x24GiB", &[]);
    r.stop();
    std::fs::remove_dir_all(&r.state_dir).unwrap();
    std::fs::create_dir(&r.state_dir).unwrap();
    std::fs::set_permissions(&r.state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(&backup, r.state_dir.join("mgpu.db")).unwrap();

    assert!(
        !s.scratch.join("a").exists() && !s.scratch.join("b").exists(),
        "a pending job ran on the original server"
    );
    r.restart();

    // The pending jobs are back under their ids and run there, once (their commands write to
    // the original server's scratch directory).
    let (ra, rb) = (r.acct_of(a), r.acct_of(b));
    assert_eq!(ra["name"], "kept-a", "{ra}");
    assert_eq!(rb["name"], "kept-b", "{rb}");
    assert_eq!(ra["state"], "COMPLETED", "{ra}");
    assert_eq!(rb["state"], "COMPLETED", "{rb}");
    assert_eq!(std::fs::read_to_string(s.scratch.join("a")).unwrap(), "a\n");
    assert_eq!(std::fs::read_to_string(s.scratch.join("b")).unwrap(), "b\n");
    // The job that was running when the backup was taken is not started again: its outcome
    // is unknown to the restored server, which says so.
    let rblocker = r.acct(blocker);
    assert_eq!(rblocker["state"], "FAILED", "{rblocker}");
    assert!(
        rblocker["message"]
            .as_str()
            .is_some_and(|m| m.contains("outcome is unknown")),
        "{rblocker}"
    );
    // Ids continue after the restored ones.
    let next = r.detached(&["--", "true"]);
    assert_eq!(next, b + 1);
    r.wait_gone(next);
}

trait AcctOf {
    /// The job's accounting record once it has ended.
    fn acct_of(&self, id: u64) -> serde_json::Value;
}

impl AcctOf for Server {
    fn acct_of(&self, id: u64) -> serde_json::Value {
        wait_until(Duration::from_secs(30), || self.job(id).is_none());
        self.acct(id)
    }
}
