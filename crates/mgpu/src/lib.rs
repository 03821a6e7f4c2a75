//! # mgpu
//!
//! The installable package: the daemon `mgpu_scheduler_server` and the client commands
//! `mgpu_srun`, `mgpu_queue`, `mgpu_cancel`, `mgpu_log` and `mgpu_acct`, each a thin `main` over
//! [`mgpu_daemon`] and [`mgpu_cli`]. Its `tests/` drive the real binaries end to end.
