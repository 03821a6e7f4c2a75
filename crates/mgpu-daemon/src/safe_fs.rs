//! Directories and files the daemon creates or opens as root, safe from planted links.
//!
//! A path is walked from `/` one component at a time with `openat(O_NOFOLLOW)`, each directory
//! checked on its open descriptor (`fstat`): it must belong to root or to us, and if others may
//! write to it, it must be sticky (like `/tmp`), so that nobody else can rename or replace what
//! is in it. A symbolic link on the way is followed only when root or we own it; the directory
//! itself (the last component) is never a link and must be ours, and its mode is fixed with
//! `fchmod` on the descriptor, never by path. Once a directory has passed, nobody but root and
//! us can change what any of its paths lead to, so what the daemon then does inside it by path
//! is safe too.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode};

/// What the last directory of a path must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Ours and private (0700), created if missing: state, log and run directories.
    Private,
    /// Ours, readable by all and writable by nobody else (0755), created if missing: the
    /// directory of the server's socket, e.g. `/run/mgpu`.
    Shared,
    /// An existing directory that root or we own, which others may write to only if it is
    /// sticky (the directory of a socket named with `--socket`, e.g. `/tmp`).
    Existing,
}

fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Why a directory on the way (or the last one) cannot be trusted, if it cannot.
fn untrusted_dir(st: &FileStat, last: Option<Want>) -> Option<String> {
    let mode = st.st_mode & 0o7777;
    if !is_dir(st) {
        return Some("is not a directory".into());
    }
    if matches!(last, Some(Want::Private | Want::Shared))
        && st.st_uid != nix::unistd::geteuid().as_raw()
    {
        return Some(format!(
            "is owned by uid {}, not by the server's user",
            st.st_uid
        ));
    }
    if !trusted(st.st_uid) {
        return Some(format!(
            "is owned by uid {}, neither root nor the server's user, who could swap what is in it",
            st.st_uid
        ));
    }
    if matches!(last, Some(Want::Private | Want::Shared)) {
        return None; // its mode is fixed below
    }
    let sticky = mode & libc::S_ISVTX != 0;
    let others_write = mode & 0o002 != 0;
    let foreign_group_write =
        mode & 0o020 != 0 && st.st_gid != 0 && st.st_gid != nix::unistd::getegid().as_raw();
    if (others_write || foreign_group_write) && !sticky {
        return Some(format!(
            "is writable by others (mode {mode:o}) and not sticky, so anyone could swap what is in it"
        ));
    }
    None
}

fn open_dir_at(dir: &OwnedFd, name: &OsStr, follow: bool) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    if !follow {
        flags |= OFlag::O_NOFOLLOW;
    }
    let fd = openat(Some(dir.as_raw_fd()), name, flags, Mode::empty())?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens (creating when `want` says so) the directory `path`, checking every component as the
/// module says. Returns the directory's descriptor. `what` names it in errors ("state
/// directory").
pub fn checked_dir(path: &Path, want: Want, what: &str) -> Result<OwnedFd> {
    let abs = std::path::absolute(path)
        .with_context(|| format!("cannot resolve the {what} {}", path.display()))?;
    let refuse = |at: &Path, why: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "refusing the {what} {}: {} {why}",
            abs.display(),
            at.display()
        )
    };
    let names: Vec<&OsStr> = abs
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            Component::ParentDir => Some(OsStr::from_bytes(b"..")),
            _ => None,
        })
        .collect();
    let root = nix::fcntl::open(
        "/",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .context("opening /")?;
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut dir = unsafe { OwnedFd::from_raw_fd(root) };
    let mut at = PathBuf::from("/");
    let create_mode = match want {
        Want::Private => Some(0o700),
        Want::Shared => Some(0o755),
        Want::Existing => None,
    };
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        at.push(name);
        let next = match open_dir_at(&dir, name, false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) if create_mode.is_some() => {
                match mkdirat(
                    Some(dir.as_raw_fd()),
                    *name,
                    Mode::from_bits_truncate(create_mode.unwrap_or(0o700)),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("cannot create the {what} {}", at.display()))
                    }
                }
                open_dir_at(&dir, name, false)
                    .with_context(|| format!("cannot open the {what} {}", at.display()))?
            }
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                let st = fstatat(
                    Some(dir.as_raw_fd()),
                    *name,
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .with_context(|| format!("cannot inspect {}", at.display()))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
                    return Err(refuse(&at, "is not a directory"));
                }
                if last && want != Want::Existing {
                    return Err(refuse(
                        &at,
                        "is a symbolic link (a planted link would redirect what root writes)",
                    ));
                }
                if !trusted(st.st_uid) {
                    return Err(refuse(
                        &at,
                        &format!(
                            "is a symbolic link owned by uid {}, neither root nor the server's user",
                            st.st_uid
                        ),
                    ));
                }
                // A link root or we made: where it leads is checked like the rest.
                open_dir_at(&dir, name, true)
                    .with_context(|| format!("cannot open the {what} {}", at.display()))?
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open the {what} {}", at.display()))
            }
        };
        let st =
            fstat(next.as_raw_fd()).with_context(|| format!("cannot inspect {}", at.display()))?;
        if let Some(why) = untrusted_dir(&st, last.then_some(want)) {
            return Err(refuse(&at, &why));
        }
        dir = next;
    }
    if names.is_empty() && want != Want::Existing {
        bail!("refusing / as the {what}");
    }
    // Its mode, on the descriptor: never a chmod by path, which a swapped link could redirect.
    let st = fstat(dir.as_raw_fd())?;
    let mode = st.st_mode & 0o7777;
    let fixed = match want {
        Want::Private => Some(0o700).filter(|_| mode & 0o077 != 0),
        Want::Shared => Some(mode & !0o022 & 0o7777).filter(|_| mode & 0o022 != 0),
        Want::Existing => None,
    };
    if let Some(m) = fixed {
        fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(m as _))
            .with_context(|| format!("making the {what} {} mode {m:o}", abs.display()))?;
    }
    Ok(dir)
}

/// Opens (creating it when `create`) the file `name` in a checked directory, without following
/// a link, mode 0600 for a new file; an existing one must be ours and is made 0600.
pub fn open_private_file(dir: &OwnedFd, name: &str, create: bool) -> Result<Option<std::fs::File>> {
    let mut flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if create {
        flags |= OFlag::O_CREAT;
    }
    let fd = match openat(
        Some(dir.as_raw_fd()),
        name,
        flags,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) if !create => return Ok(None),
        Err(Errno::ELOOP) => bail!("refusing {name}: it is a symbolic link"),
        Err(e) => return Err(e).with_context(|| format!("cannot open {name}")),
    };
    // SAFETY: a fresh descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let st = fstat(file.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        bail!("refusing {name}: it is not a regular file");
    }
    if st.st_uid != nix::unistd::geteuid().as_raw() {
        bail!("refusing {name}: it is owned by uid {}", st.st_uid);
    }
    if st.st_mode & 0o077 != 0 {
        fchmod(file.as_raw_fd(), Mode::from_bits_truncate(0o600))
            .with_context(|| format!("making {name} private"))?;
    }
    // Back to blocking (O_NONBLOCK only kept a planted FIFO from stalling the open).
    nix::fcntl::fcntl(
        file.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_RDWR),
    )?;
    Ok(Some(file))
}

/// Makes the file at `path` (in a directory already checked) private: created 0600 when
/// `create`, else only fixed if it exists.
pub fn private_file(path: &Path, create: bool) -> Result<()> {
    let dir_path = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .with_context(|| format!("bad file name {}", path.display()))?;
    let dir = nix::fcntl::open(
        dir_path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", dir_path.display()))?;
    // SAFETY: a fresh descriptor that nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(dir) };
    open_private_file(&dir, name, create).with_context(|| format!("in {}", dir_path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! As root, "another user" is a directory or link chowned to nobody (65534); the
    //! end-to-end tests plant them as real accounts.

    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn creates_private_and_shared_directories_and_fixes_their_modes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("a/b/state");
        checked_dir(&p, Want::Private, "state directory").unwrap();
        assert_eq!(mode(&p), 0o700);
        let s = t.path().join("run/mgpu");
        checked_dir(&s, Want::Shared, "socket directory").unwrap();
        assert_eq!(mode(&s), 0o755);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o777)).unwrap();
        checked_dir(&p, Want::Private, "state directory").unwrap();
        checked_dir(&s, Want::Shared, "socket directory").unwrap();
        assert_eq!((mode(&p), mode(&s)), (0o700, 0o755));
        // Relative paths and `..` work.
        let rel = p.join("../state");
        checked_dir(&rel, Want::Private, "state directory").unwrap();
    }

    #[test]
    fn a_link_as_the_directory_is_refused_and_its_target_untouched() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("victim");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = t.path().join("state");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for want in [Want::Private, Want::Shared] {
            let e = checked_dir(&link, want, "state directory").unwrap_err();
            assert!(format!("{e:#}").contains("symbolic link"), "{e:#}");
        }
        assert_eq!(mode(&target), 0o755);
        // A link of ours on the way is fine (like /var/run -> /run).
        let via = t.path().join("via");
        std::os::unix::fs::symlink(t.path(), &via).unwrap();
        checked_dir(&via.join("inner"), Want::Private, "state directory").unwrap();
        assert_eq!(mode(&t.path().join("inner")), 0o700);
    }

    #[test]
    fn foreign_owners_and_open_parents_are_refused() {
        if !root() {
            return;
        }
        let nobody = nix::unistd::Uid::from_raw(65534);
        let t = tempfile::tempdir().unwrap();
        // Theirs: the directory itself, or one on the way.
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nobody), None).unwrap();
        for (p, want) in [
            (theirs.clone(), Want::Private),
            (theirs.clone(), Want::Shared),
            (theirs.clone(), Want::Existing),
            (theirs.join("state"), Want::Private),
        ] {
            let e = checked_dir(&p, want, "state directory").unwrap_err();
            assert!(format!("{e:#}").contains("owned by uid 65534"), "{e:#}");
        }
        assert!(!theirs.join("state").exists());
        // A link they own on the way.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(t.path(), &link).unwrap();
        nix::unistd::fchownat(
            None,
            &link,
            Some(nobody),
            None,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        let e = checked_dir(&link.join("x"), Want::Private, "log directory").unwrap_err();
        assert!(
            format!("{e:#}").contains("symbolic link owned by uid 65534"),
            "{e:#}"
        );
        // World-writable without the sticky bit: anyone could swap the directory.
        let open = t.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = checked_dir(&open.join("state"), Want::Private, "state directory").unwrap_err();
        assert!(format!("{e:#}").contains("not sticky"), "{e:#}");
        let e = checked_dir(&open, Want::Existing, "socket directory").unwrap_err();
        assert!(format!("{e:#}").contains("not sticky"), "{e:#}");
        // Sticky (like /tmp): fine.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        checked_dir(&open.join("state"), Want::Private, "state directory").unwrap();
        checked_dir(&open, Want::Existing, "socket directory").unwrap();
    }

    #[test]
    fn private_files_are_0600_and_links_refused() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("mgpu.db");
        private_file(&f, true).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&f, false).unwrap();
        assert_eq!(mode(&f), 0o600);
        private_file(&t.path().join("absent"), false).unwrap();
        assert!(!t.path().join("absent").exists());
        let victim = t.path().join("victim");
        std::fs::write(&victim, "x").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("link")).unwrap();
        assert!(private_file(&t.path().join("link"), true).is_err());
        assert_eq!(mode(&victim), 0o644);
    }
}
