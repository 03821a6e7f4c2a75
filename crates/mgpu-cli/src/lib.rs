//! # mgpu-cli
//!
//! The client commands (`mgpu_srun`, `mgpu_queue`, `mgpu_cancel`, `mgpu_log`, `mgpu_acct`). Each binary is a
//! thin `main` calling into a module here; [`client`] holds what they share: finding the
//! socket, checking who is really behind it, and the hello exchange.

pub mod acct;
pub mod cancel;
pub mod client;
pub mod log;
pub mod queue;
pub mod srun;

use std::process::ExitCode;

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
