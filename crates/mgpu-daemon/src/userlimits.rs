//! The resource limits (rlimits) a job gets: what a login of its user gets.
//!
//! A login's limits are the limits its session started from (for mgpu: those the daemon itself
//! inherited, recorded before it raised anything, see [`record_inherited`]) adjusted by
//! `pam_limits` from `/etc/security/limits.conf` and `/etc/security/limits.d/*.conf`. This
//! module reads those files as `pam_limits` does (same domains, precedence, items and units)
//! and returns the limits for one account; the daemon resolves them per run, off its lock, and
//! the job's child applies them with `setrlimit` before it drops its privileges.
//!
//! What `pam_limits` does, followed here:
//! - lines `<domain> <type> <item> <value>`; `#` starts a comment; case of type, item and value
//!   does not matter; a malformed line is skipped;
//! - domains: a user name, `@group` (member of it), `@:gid`, `@lo:hi`/`@lo:` (primary gid in
//!   range), a uid range `lo:hi`, `lo:`, `:uid`, and `*`; `%group` lines only set
//!   `maxlogins`, which mgpu ignores (as `priority`, `nonewprivs` and `maxsyslogins`);
//! - precedence: a user (or uid range) line beats a group line, which beats `*`; among lines of
//!   the same kind the later wins (limits.conf first, then limits.d in name order);
//! - types `soft`, `hard`, `-` (both); values `unlimited`, `infinity`, `-1`, `-` for no limit
//!   (`nofile` then means `/proc/sys/fs/nr_open`); `cpu` in minutes, sizes in KiB, `nice`
//!   as a nice value (-20..19);
//! - a two-field line `<domain> -` that applies means: no limits from these files at all;
//! - a soft limit above its hard limit is lowered to it.

// The libc types behind the casts differ between targets (rlim_t, __rlimit_resource_t).
#![allow(clippy::unnecessary_cast)]

use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// No limit (`RLIM_INFINITY`).
pub const INFINITY: u64 = libc::RLIM_INFINITY as u64;

/// One resource limit to apply (`resource` is a `RLIMIT_*` number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The resources a session carries (all of Linux's).
const RESOURCES: [libc::__rlimit_resource_t; 16] = [
    libc::RLIMIT_CPU,
    libc::RLIMIT_FSIZE,
    libc::RLIMIT_DATA,
    libc::RLIMIT_STACK,
    libc::RLIMIT_CORE,
    libc::RLIMIT_RSS,
    libc::RLIMIT_NPROC,
    libc::RLIMIT_NOFILE,
    libc::RLIMIT_MEMLOCK,
    libc::RLIMIT_AS,
    libc::RLIMIT_LOCKS,
    libc::RLIMIT_SIGPENDING,
    libc::RLIMIT_MSGQUEUE,
    libc::RLIMIT_NICE,
    libc::RLIMIT_RTPRIO,
    libc::RLIMIT_RTTIME,
];

static INHERITED: OnceLock<Vec<Rlimit>> = OnceLock::new();

/// Records the limits this process was started with; call first thing in `main`, before
/// anything raises a limit (the daemon raises its open-files limit).
pub fn record_inherited() {
    INHERITED.get_or_init(current);
}

/// The limits recorded by [`record_inherited`] (the current ones if it was not called).
pub fn inherited() -> &'static [Rlimit] {
    INHERITED.get_or_init(current)
}

fn current() -> Vec<Rlimit> {
    RESOURCES
        .iter()
        .filter_map(|&r| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit on a local struct.
            (unsafe { libc::getrlimit(r, &mut lim) } == 0).then_some(Rlimit {
                resource: r as u32,
                soft: lim.rlim_cur as u64,
                hard: lim.rlim_max as u64,
            })
        })
        .collect()
}

/// Who the limits are for.
pub struct Who<'a> {
    pub name: &'a str,
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// All its groups (the primary one included).
    pub groups: &'a [u32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Domain {
    User(String),
    Group(String),
    GroupGid(u32),
    /// Primary gid in `lo..=hi`.
    GidRange(u32, u32),
    UidRange(u32, u32),
    All,
    /// `%...`: only `maxlogins`, ignored.
    Ignored,
}

/// What a line does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Limit {
        domain: Domain,
        soft: bool,
        hard: bool,
        resource: u32,
        value: u64,
    },
    /// `<domain> -`: no limits for whom it applies to.
    NoLimits(Domain),
}

/// Precedence of a line's domain (lower wins), as `pam_limits`' `LIMITS_DEF_*`.
fn source(d: &Domain) -> u8 {
    match d {
        Domain::User(_) | Domain::UidRange(..) => 0,
        Domain::Group(_) | Domain::GroupGid(_) | Domain::GidRange(..) => 1,
        Domain::All => 4,
        Domain::Ignored => u8::MAX,
    }
}

fn parse_range(s: &str) -> Option<Result<(u32, u32), ()>> {
    let (lo, hi) = s.split_once(':')?;
    let num = |t: &str| t.parse::<u32>().map_err(|_| ());
    Some(match (lo.is_empty(), hi.is_empty()) {
        (true, true) => Err(()),
        (true, false) => num(hi).map(|h| (h, h)),
        (false, true) => num(lo).map(|l| (l, u32::MAX)),
        (false, false) => num(lo).and_then(|l| num(hi).map(|h| (l, h))),
    })
}

fn parse_domain(d: &str) -> Option<Domain> {
    if let Some(g) = d.strip_prefix('@') {
        return match parse_range(g) {
            None => Some(Domain::Group(g.to_string())),
            Some(Err(())) => None,
            Some(Ok((lo, hi))) if g.starts_with(':') => {
                debug_assert_eq!(lo, hi);
                Some(Domain::GroupGid(hi))
            }
            Some(Ok((lo, hi))) => Some(Domain::GidRange(lo, hi)),
        };
    }
    if d.starts_with('%') {
        return Some(Domain::Ignored);
    }
    if d == "*" {
        return Some(Domain::All);
    }
    match parse_range(d) {
        None => Some(Domain::User(d.to_string())),
        Some(Ok((lo, hi))) => Some(Domain::UidRange(lo, hi)),
        Some(Err(())) => None,
    }
}

/// The value of `item` in `RLIMIT` units, or `None` for an item mgpu does not apply.
fn parse_item(item: &str, value: &str, nr_open: u64) -> Option<(u32, u64)> {
    let unlimited = matches!(value, "unlimited" | "infinity" | "-1" | "-");
    let number = || -> Option<u64> {
        if unlimited {
            return Some(INFINITY);
        }
        let digits: &str = value
            .find(|c: char| !c.is_ascii_digit())
            .map_or(value, |end| &value[..end]);
        digits.parse().ok()
    };
    let scaled = |n: u64, by: u64| {
        if n == INFINITY || n >= INFINITY / by {
            INFINITY
        } else {
            n * by
        }
    };
    let (resource, v) = match item {
        "cpu" => (libc::RLIMIT_CPU, scaled(number()?, 60)),
        "fsize" => (libc::RLIMIT_FSIZE, scaled(number()?, 1024)),
        "data" => (libc::RLIMIT_DATA, scaled(number()?, 1024)),
        "stack" => (libc::RLIMIT_STACK, scaled(number()?, 1024)),
        "core" => (libc::RLIMIT_CORE, scaled(number()?, 1024)),
        "rss" => (libc::RLIMIT_RSS, scaled(number()?, 1024)),
        "memlock" => (libc::RLIMIT_MEMLOCK, scaled(number()?, 1024)),
        "as" => (libc::RLIMIT_AS, scaled(number()?, 1024)),
        "nproc" => (libc::RLIMIT_NPROC, number()?),
        "nofile" => {
            let n = number()?;
            (libc::RLIMIT_NOFILE, if n == INFINITY { nr_open } else { n })
        }
        "locks" => (libc::RLIMIT_LOCKS, number()?),
        "sigpending" => (libc::RLIMIT_SIGPENDING, number()?),
        "msgqueue" => (libc::RLIMIT_MSGQUEUE, number()?),
        "rtprio" => (libc::RLIMIT_RTPRIO, number()?),
        "rttime" => (libc::RLIMIT_RTTIME, number()?),
        "nice" => {
            // strtol: an optional sign and digits.
            let (neg, digits) = match value.strip_prefix('-') {
                Some(d) => (true, d),
                None => (false, value.strip_prefix('+').unwrap_or(value)),
            };
            let end = digits
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(digits.len());
            let n: i64 = digits[..end].parse().ok()?;
            let nice = if neg { -n } else { n }.clamp(-20, 19);
            (libc::RLIMIT_NICE, (20 - nice) as u64)
        }
        _ => return None, // maxlogins, maxsyslogins, priority, nonewprivs, unknown
    };
    Some((resource as u32, v))
}

/// The lines of one configuration file that mgpu applies (others are skipped, as
/// `pam_limits` skips them).
fn parse(text: &str, nr_open: u64) -> Vec<Line> {
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [domain, "-"] => {
                if let Some(d) = parse_domain(domain) {
                    out.push(Line::NoLimits(d));
                }
            }
            [domain, kind, item, value @ ..] if !value.is_empty() => {
                let Some(domain) = parse_domain(domain) else {
                    continue;
                };
                let (soft, hard) = match kind.to_ascii_lowercase().as_str() {
                    "soft" => (true, false),
                    "hard" => (false, true),
                    "-" => (true, true),
                    _ => continue,
                };
                let value = value.join(" ").to_ascii_lowercase();
                if let Some((resource, value)) =
                    parse_item(&item.to_ascii_lowercase(), &value, nr_open)
                {
                    out.push(Line::Limit {
                        domain,
                        soft,
                        hard,
                        resource,
                        value,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

fn applies(d: &Domain, who: &Who, gid_of: &dyn Fn(&str) -> Option<u32>) -> bool {
    match d {
        Domain::User(name) => name == who.name,
        Domain::UidRange(lo, hi) => (*lo..=*hi).contains(&who.uid),
        Domain::Group(name) => gid_of(name).is_some_and(|g| who.groups.contains(&g)),
        Domain::GroupGid(g) => who.groups.contains(g),
        Domain::GidRange(lo, hi) => (*lo..=*hi).contains(&who.gid),
        Domain::All => true,
        Domain::Ignored => false,
    }
}

/// The limits of `who`: `base` adjusted by the configuration `files` (their contents, in the
/// order `pam_limits` reads them). `gid_of` resolves group names; `nr_open` is the kernel's
/// `fs.nr_open` (what an unlimited `nofile` becomes).
pub fn resolve(
    base: &[Rlimit],
    files: &[String],
    who: &Who,
    gid_of: &dyn Fn(&str) -> Option<u32>,
    nr_open: u64,
) -> Vec<Rlimit> {
    // (limit, source of soft, source of hard); NONE = 255 until a line sets it.
    let mut out: Vec<(Rlimit, u8, u8)> = base.iter().map(|r| (*r, 255, 255)).collect();
    for text in files {
        for line in parse(text, nr_open) {
            match line {
                Line::NoLimits(d) => {
                    if applies(&d, who, gid_of) {
                        return base.to_vec();
                    }
                }
                Line::Limit {
                    domain,
                    soft,
                    hard,
                    resource,
                    value,
                } => {
                    if !applies(&domain, who, gid_of) {
                        continue;
                    }
                    let src = source(&domain);
                    let Some(entry) = out.iter_mut().find(|(r, ..)| r.resource == resource) else {
                        continue; // not supported here
                    };
                    // As pam_limits: a soft line that loses also skips its hard part.
                    if soft {
                        if entry.1 < src {
                            continue;
                        }
                        entry.0.soft = value;
                        entry.1 = src;
                    }
                    if hard {
                        if entry.2 < src {
                            continue;
                        }
                        entry.0.hard = value;
                        entry.2 = src;
                    }
                }
            }
        }
    }
    out.into_iter()
        .map(|(mut r, ..)| {
            r.soft = r.soft.min(r.hard);
            r
        })
        .collect()
}

/// The contents of `DIR/limits.conf` and `DIR/limits.d/*.conf` (in name order), as
/// `pam_limits` reads them; missing or unreadable files are left out.
pub fn read_config(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    if let Ok(t) = std::fs::read_to_string(dir.join("limits.conf")) {
        files.push(t);
    }
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join("limits.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    names.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    for p in names {
        if let Ok(t) = std::fs::read_to_string(p) {
            files.push(t);
        }
    }
    files
}

/// The kernel's ceiling for open files (`fs.nr_open`).
fn nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

fn gid_of(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// The limits a run gets: as root (`multi_user`), a login's of its account, with the
/// configuration in `dir`; otherwise (jobs run as the server's user) the server's own, as it
/// was started.
pub fn for_run(
    multi_user: bool,
    dir: &Path,
    account: Option<&crate::users::Account>,
) -> Vec<Rlimit> {
    match account {
        Some(a) if multi_user => for_account(a, dir),
        _ => inherited().to_vec(),
    }
}

/// The limits a login of `account` gets, with the configuration in `dir` (`/etc/security`).
pub fn for_account(account: &crate::users::Account, dir: &Path) -> Vec<Rlimit> {
    let who = Who {
        name: &account.name,
        uid: account.uid,
        gid: account.gid,
        groups: &account.groups,
    };
    resolve(inherited(), &read_config(dir), &who, &gid_of, nr_open())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<Rlimit> {
        [
            (libc::RLIMIT_NOFILE, 1024, 4096),
            (libc::RLIMIT_NPROC, 5000, 5000),
            (libc::RLIMIT_CPU, INFINITY, INFINITY),
            (libc::RLIMIT_AS, INFINITY, INFINITY),
            (libc::RLIMIT_NICE, 0, 0),
            (libc::RLIMIT_CORE, 0, INFINITY),
        ]
        .map(|(r, soft, hard)| Rlimit {
            resource: r as u32,
            soft,
            hard,
        })
        .to_vec()
    }

    fn alice() -> Who<'static> {
        Who {
            name: "alice",
            uid: 1500,
            gid: 100,
            groups: &[100, 27],
        }
    }

    fn gids(name: &str) -> Option<u32> {
        match name {
            "users" => Some(100),
            "sudo" => Some(27),
            "gpu" => Some(44),
            _ => None,
        }
    }

    fn get(limits: &[Rlimit], r: libc::__rlimit_resource_t) -> (u64, u64) {
        let l = limits.iter().find(|l| l.resource == r as u32).unwrap();
        (l.soft, l.hard)
    }

    fn resolve_for(files: &[&str], who: &Who) -> Vec<Rlimit> {
        let files: Vec<String> = files.iter().map(|s| s.to_string()).collect();
        resolve(&base(), &files, who, &gids, 1 << 20)
    }

    #[test]
    fn without_configuration_the_inherited_limits_stand() {
        assert_eq!(resolve_for(&[], &alice()), base());
        assert_eq!(resolve_for(&["# nothing\n\n"], &alice()), base());
    }

    #[test]
    fn items_types_and_units() {
        let l = resolve_for(
            &["alice - nofile 1234\n\
               alice soft nproc 100   # comment\n\
               alice hard cpu 2\n\
               alice - as 1024\n\
               ALICE - nofile 1\n\
               alice - nice -5\n\
               alice soft core unlimited\n"],
            &alice(),
        );
        assert_eq!(get(&l, libc::RLIMIT_NOFILE), (1234, 1234));
        assert_eq!(get(&l, libc::RLIMIT_NPROC), (100, 5000));
        // Minutes; the soft limit is lowered to the hard one.
        assert_eq!(get(&l, libc::RLIMIT_CPU), (120, 120));
        assert_eq!(get(&l, libc::RLIMIT_AS), (1 << 20, 1 << 20));
        assert_eq!(get(&l, libc::RLIMIT_NICE), (25, 25));
        assert_eq!(get(&l, libc::RLIMIT_CORE), (INFINITY, INFINITY));
    }

    #[test]
    fn unlimited_nofile_is_nr_open_and_case_does_not_matter() {
        let l = resolve_for(
            &["alice HARD NOFILE Unlimited\n* soft nofile -1\n"],
            &alice(),
        );
        assert_eq!(get(&l, libc::RLIMIT_NOFILE), (1 << 20, 1 << 20));
    }

    #[test]
    fn a_user_line_beats_a_group_line_which_beats_the_wildcard() {
        let conf = "alice - nofile 300\n@users - nofile 200\n* - nofile 100\n";
        assert_eq!(
            get(&resolve_for(&[conf], &alice()), libc::RLIMIT_NOFILE),
            (300, 300)
        );
        // Whatever the order.
        let conf = "* - nofile 100\n@users - nofile 200\n";
        assert_eq!(
            get(&resolve_for(&[conf], &alice()), libc::RLIMIT_NOFILE),
            (200, 200)
        );
        let bob = Who {
            name: "bob",
            uid: 1501,
            gid: 1501,
            groups: &[1501],
        };
        assert_eq!(
            get(&resolve_for(&[conf], &bob), libc::RLIMIT_NOFILE),
            (100, 100)
        );
    }

    #[test]
    fn later_lines_and_files_of_the_same_kind_win() {
        let l = resolve_for(
            &["* - nofile 100\n* - nofile 150\n", "* soft nofile 120\n"],
            &alice(),
        );
        assert_eq!(get(&l, libc::RLIMIT_NOFILE), (120, 150));
    }

    #[test]
    fn group_and_uid_ranges() {
        let who = alice();
        let n = |conf: &str| get(&resolve_for(&[conf], &who), libc::RLIMIT_NPROC).0;
        assert_eq!(n("1000:2000 soft nproc 7\n"), 7);
        assert_eq!(n("1000: soft nproc 7\n"), 7);
        assert_eq!(n(":1500 soft nproc 7\n"), 7);
        assert_eq!(n("2000: soft nproc 7\n"), 5000);
        assert_eq!(n(":1499 soft nproc 7\n"), 5000);
        assert_eq!(n("@:27 soft nproc 7\n"), 7, "member of gid 27");
        assert_eq!(n("@:44 soft nproc 7\n"), 5000);
        assert_eq!(n("@100:100 soft nproc 7\n"), 7, "primary gid in range");
        assert_eq!(
            n("@27:27 soft nproc 7\n"),
            5000,
            "ranges look at the primary gid"
        );
        assert_eq!(n("@sudo soft nproc 7\n"), 7);
        assert_eq!(n("@gpu soft nproc 7\n"), 5000);
        assert_eq!(n("@nosuchgroup soft nproc 7\n"), 5000);
        // %group sets maxlogins only; maxlogins and priority are not rlimits.
        assert_eq!(n("%users soft nproc 7\n"), 5000);
        assert_eq!(n("alice - maxlogins 1\nalice - priority 5\n"), 5000);
        // A uid range counts as a user line: it beats a group line.
        assert_eq!(n("1000:2000 soft nproc 7\n@users soft nproc 8\n"), 7);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let l = resolve_for(
            &[
                "alice\nalice soft\nalice soft nofile\nalice bogus nofile 5\n\
               alice soft nofile abc\nx:y soft nofile 5\nalice soft nofile 77\n",
            ],
            &alice(),
        );
        assert_eq!(get(&l, libc::RLIMIT_NOFILE), (77, 4096));
    }

    #[test]
    fn a_no_limits_line_leaves_the_inherited_limits() {
        let l = resolve_for(&["* - nofile 100\n", "@users -\n"], &alice());
        assert_eq!(l, base());
        let bob = Who {
            name: "bob",
            uid: 1501,
            gid: 1501,
            groups: &[1501],
        };
        assert_eq!(
            get(
                &resolve_for(&["* - nofile 100\n@users -\n"], &bob),
                libc::RLIMIT_NOFILE
            ),
            (100, 100)
        );
    }

    #[test]
    fn config_files_are_read_in_pam_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("limits.conf"), "a\n").unwrap();
        std::fs::create_dir(dir.path().join("limits.d")).unwrap();
        std::fs::write(dir.path().join("limits.d/20-x.conf"), "c\n").unwrap();
        std::fs::write(dir.path().join("limits.d/10-x.conf"), "b\n").unwrap();
        std::fs::write(dir.path().join("limits.d/30-x.conf.rpmsave"), "z\n").unwrap();
        assert_eq!(read_config(dir.path()), ["a\n", "b\n", "c\n"]);
        assert!(read_config(&dir.path().join("none")).is_empty());
    }
}
