//! # mgpu-cli
//!
//! The client commands (`mgpu_srun`, `mgpu_sbatch`, `mgpu_queue`, `mgpu_cancel`, `mgpu_log`, `mgpu_acct`). Each binary is a
//! thin `main` calling into a module here; [`client`] holds what they share: finding the
//! socket, checking who is really behind it, and the hello exchange.

pub mod acct;
pub mod cancel;
pub mod client;
pub mod control;
pub mod fit;
pub mod jobref;
pub mod localtime;
pub mod log;
pub mod queue;
pub mod sbatch;
pub mod srun;

use std::process::ExitCode;

/// A user as squeue and sacct take one: a name, or a numeric user id (when no user has that
/// name), which becomes its name.
pub fn user_name(text: &str) -> Result<String, String> {
    use nix::unistd::{Uid, User};
    let t = text.trim();
    let numeric = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !numeric || matches!(User::from_name(t), Ok(Some(_))) {
        return Ok(t.to_string());
    }
    match t
        .parse::<u32>()
        .map(|uid| User::from_uid(Uid::from_raw(uid)))
    {
        Ok(Ok(Some(user))) => Ok(user.name),
        _ => Err(format!("no user has the id {t}")),
    }
}

/// Runs `f` on a single-threaded runtime; prints an error as `PROG: error: ...` (exit 1).
pub fn run_main<F>(prog: &str, f: F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<i32>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{prog}: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        // `mgpu_acct | head`: the reader has all it wanted; nothing to complain about.
        Err(e) if e.downcast_ref::<OutputClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prog}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A job's name as the tables show it: a job array's task carries its index, `sweep[3]`.
pub fn display_name(name: &str, array: Option<mgpu_proto::ArrayTask>) -> String {
    match array {
        Some(a) => format!("{name}[{}]", a.task),
        None => name.to_string(),
    }
}

/// Our standard output was closed by its reader (`mgpu_acct --json | head`): the command ends
/// quietly (exit 0), like a pipeline's reader expects, instead of panicking or complaining.
#[derive(Debug)]
pub struct OutputClosed;

impl std::fmt::Display for OutputClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for OutputClosed {}

/// A failed write to standard output: a closed pipe becomes [`OutputClosed`].
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(OutputClosed)
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// A failed JSON write to standard output (see [`stdout_error`]).
pub fn json_stdout_error(e: serde_json::Error) -> anyhow::Error {
    match e.io_error_kind() {
        Some(kind) => stdout_error(kind.into()),
        None => e.into(),
    }
}

/// Writes `text` to standard output and flushes it (see [`stdout_error`]).
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}
