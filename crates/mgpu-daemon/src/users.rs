//! Resolving kernel uids to accounts (password database and group list).
//!
//! Done in the daemon (the parent) before a job is forked: the child must only make
//! async-signal-safe system calls.

use std::ffi::CString;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use nix::unistd::{getgrouplist, Gid, Uid, User};

/// A local account as the job will run under it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups (including the primary one).
    pub groups: Vec<u32>,
}

/// Looks up the account of `uid`, with its supplementary groups.
pub fn account(uid: u32) -> Result<Account> {
    let user = User::from_uid(Uid::from_raw(uid))
        .with_context(|| format!("looking up uid {uid}"))?
        .ok_or_else(|| anyhow!("uid {uid} has no entry in the password database"))?;
    let cname = CString::new(user.name.as_bytes()).context("user name contains NUL")?;
    let groups = getgrouplist(&cname, user.gid)
        .with_context(|| format!("reading the groups of {}", user.name))?;
    Ok(Account {
        uid,
        gid: user.gid.as_raw(),
        name: user.name,
        home: user.dir,
        shell: user.shell,
        groups: groups.into_iter().map(Gid::as_raw).collect(),
    })
}

/// The uid of a user name, if it exists.
pub fn uid_of(name: &str) -> Option<u32> {
    User::from_name(name).ok().flatten().map(|u| u.uid.as_raw())
}

/// The name of a uid, or the number when it has no entry.
pub fn name_of(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}
