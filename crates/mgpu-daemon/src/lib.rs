//! # mgpu-daemon
//!
//! The imperative shell around [`mgpu_core`]: the UNIX socket server (with kernel-verified
//! identities), the durable job store, GPU backends (NVML or simulated), starting jobs as their
//! users, and their logs.

pub mod cgroup;
pub mod config;
pub mod conn;
pub mod exec;
pub mod gpu;
pub mod handlers;
pub mod launcher;
pub mod layout;
pub mod logquota;
pub mod metrics;
pub mod notify;
pub mod outfiles;
pub mod recovery;
pub mod run;
pub mod safe_fs;
pub mod server;
pub mod state;
pub mod store;
pub mod supervisor;
pub mod userlimits;
pub mod users;
