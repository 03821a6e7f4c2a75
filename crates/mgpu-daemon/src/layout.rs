//! Where a server keeps its files when it is not told: the Filesystem Hierarchy Standard for a
//! root server, the XDG base directories for a single-user one (docs/layout.md has the table).
//!
//! | what  | root server      | single-user server     | root, `--state-dir S` elsewhere |
//! |-------|------------------|------------------------|---------------------------------|
//! | state | `/var/lib/mgpu`  | `$XDG_STATE_HOME/mgpu` | `S`                             |
//! | logs  | `/var/log/mgpu`  | `STATE/logs`           | `S/logs`                        |
//! | runs  | `/run/mgpu/runs` | `STATE/runs`           | `S/runs`                        |
//!
//! Earlier releases put job logs in `~/.mgpu/logs` of the server's user (`/root/.mgpu/logs`
//! for a root server) and run directories in `STATE/runs`: a server that finds jobs' logs there
//! (and none where this release puts them), or run directories of jobs there, keeps using them
//! (the store names a job's log only by its id, and running jobs' supervisors write where they
//! were told), and says how to move.

use std::path::{Path, PathBuf};

/// A root server's state directory.
pub const ROOT_STATE_DIR: &str = "/var/lib/mgpu";
/// A root server's job logs (the systemd unit's `LogsDirectory=mgpu`).
pub const ROOT_LOG_DIR: &str = "/var/log/mgpu";
/// A root server's run directories: on tmpfs, they mean nothing after a reboot (the systemd
/// unit's `RuntimeDirectory=mgpu`, preserved across restarts).
pub const ROOT_RUN_DIR: &str = "/run/mgpu/runs";
/// Where earlier releases kept job logs, below the server's user's home.
pub const OLD_LOG_DIR_IN_HOME: &str = ".mgpu/logs";

/// The default state directory: [`ROOT_STATE_DIR`] as root, else `$XDG_STATE_HOME/mgpu`
/// (`~/.local/state/mgpu` when that is unset).
pub fn default_state_dir(root: bool, home: &Path) -> PathBuf {
    if root {
        return ROOT_STATE_DIR.into();
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        Some(x) => PathBuf::from(x).join("mgpu"),
        None => home.join(".local/state/mgpu"),
    }
}

/// What the server chose for a directory it was not given, and whether that is an earlier
/// release's location still in use (then `note` says so, for the log).
#[derive(Debug, PartialEq, Eq)]
pub struct Chosen {
    pub dir: PathBuf,
    pub note: Option<String>,
}

/// Whether a server keeps the FHS layout: as root, on [`ROOT_STATE_DIR`]. Another state
/// directory keeps everything below it (two root servers never share logs or run directories).
fn fhs(root: bool, state_dir: &Path) -> bool {
    root && state_dir == Path::new(ROOT_STATE_DIR)
}

/// The default log directory of a server with this state directory.
pub fn default_log_dir(root: bool, state_dir: &Path, home: &Path) -> Chosen {
    let old = home.join(OLD_LOG_DIR_IN_HOME);
    let new = if fhs(root, state_dir) {
        PathBuf::from(ROOT_LOG_DIR)
    } else {
        state_dir.join("logs")
    };
    if has_job_logs(&old) && !has_job_logs(&new) {
        return Chosen {
            note: Some(format!(
                "job logs stay in {} (an earlier release's default); to use this release's \
                 default, stop the server while no job runs and move the job-*.log files to {}, \
                 then remove {}, or keep them with --log-dir",
                old.display(),
                new.display(),
                old.display()
            )),
            dir: old,
        };
    }
    Chosen {
        dir: new,
        note: None,
    }
}

/// Whether `runs` holds a job's run directory (named by the job's id).
fn runs_in_use(runs: &Path) -> bool {
    std::fs::read_dir(runs)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_type().is_ok_and(|t| t.is_dir())
                && e.file_name()
                    .to_str()
                    .is_some_and(|n| n.parse::<u64>().is_ok())
        })
}

/// Whether `dir` (not followed if a link) holds a job's log.
fn has_job_logs(dir: &Path) -> bool {
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return false;
    }
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with("job-") && n.ends_with(".log"))
        })
}

/// The default run directory: [`ROOT_RUN_DIR`] for a root server on [`ROOT_STATE_DIR`], else
/// `STATE/runs`. `STATE/runs` still holding run directories (jobs started by an
/// earlier release, which may still run) keeps it in use until they are gone.
pub fn default_run_dir(root: bool, state_dir: &Path) -> Chosen {
    let in_state = state_dir.join("runs");
    if !fhs(root, state_dir) {
        return Chosen {
            dir: in_state,
            note: None,
        };
    }
    let in_use = runs_in_use(&in_state);
    if in_use {
        return Chosen {
            note: Some(format!(
                "run directories stay in {} while jobs started there exist (an earlier \
                 release's default); once none is left the server uses {ROOT_RUN_DIR}",
                in_state.display()
            )),
            dir: in_state,
        };
    }
    Chosen {
        dir: ROOT_RUN_DIR.into(),
        note: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_defaults_follow_the_fhs_and_another_state_dir_keeps_everything_below_it() {
        let home = tempfile::tempdir().unwrap();
        let state = Path::new(ROOT_STATE_DIR);
        let logs = default_log_dir(true, state, home.path());
        assert_eq!(
            logs,
            Chosen {
                dir: ROOT_LOG_DIR.into(),
                note: None
            }
        );
        let s = Path::new("/srv/mgpu");
        assert_eq!(default_log_dir(true, s, home.path()).dir, s.join("logs"));
        assert_eq!(default_run_dir(true, s).dir, s.join("runs"));
        let user_state = home.path().join("state/mgpu");
        assert_eq!(
            default_log_dir(false, &user_state, home.path()).dir,
            user_state.join("logs")
        );
        assert_eq!(
            default_run_dir(false, &user_state).dir,
            user_state.join("runs")
        );
        // A single-user server whose state is (oddly) /var/lib/mgpu is no root server.
        assert_eq!(default_run_dir(false, state).dir, state.join("runs"));
    }

    #[test]
    fn an_earlier_releases_log_directory_stays_in_use_while_it_holds_the_logs() {
        let home = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let old = home.path().join(".mgpu/logs");
        std::fs::create_dir_all(&old).unwrap();
        // An empty old directory is not in use.
        let c = default_log_dir(false, state.path(), home.path());
        assert_eq!(c.dir, state.path().join("logs"));
        std::fs::write(old.join("job-7.log"), "x").unwrap();
        let c = default_log_dir(false, state.path(), home.path());
        assert_eq!(c.dir, old);
        let note = c.note.unwrap();
        let new = state.path().join("logs");
        assert!(note.contains(&new.display().to_string()), "{note}");
        // Once logs are where this release puts them (moved), those win.
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(new.join("job-7.log"), "x").unwrap();
        let c = default_log_dir(false, state.path(), home.path());
        assert_eq!(c.dir, new);
        assert_eq!(c.note, None);
    }

    #[test]
    fn run_directories_of_an_earlier_release_keep_state_runs_in_use() {
        let state = tempfile::tempdir().unwrap();
        let runs = state.path().join("runs");
        std::fs::create_dir_all(runs.join("not-a-job")).unwrap();
        std::fs::write(runs.join("runs.lock"), "").unwrap();
        assert!(!runs_in_use(&runs));
        std::fs::create_dir_all(runs.join("17")).unwrap();
        assert!(runs_in_use(&runs));
    }
}
