//! The configuration file (`/etc/mgpu/mgpu.toml`): every option of the command line, plus the
//! per-user and per-group limits (`[limits]`).
//!
//! A top-level key is a command-line option with `_` for `-` (`max_restarts = 10` is
//! `--max-restarts 10`): the file's keys are turned into those options and parsed by the very
//! same parser as the command line, so the file and the flags can never mean different things.
//! An option given on the command line beats the file. A key that is no option, or a value the
//! option refuses, is an error that names the key.
//!
//! The file is root's: as root, a file that is a symbolic link, is not owned by root or is
//! writable by group or others is refused (as is one in a directory others could swap it in).
//!
//! On SIGHUP the daemon reads it again ([`Loaded::changes`]): what can change live (the
//! scheduling knobs and the limits, [`is_live`]) takes effect at the next pass; a change of
//! anything else is reported as needing a restart and the old value stays.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};
use mgpu_core::UserLimits;
use serde::Deserialize;

use crate::run::Args;

/// Where the configuration file is unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/mgpu/mgpu.toml";

/// Options that are not configuration (they choose the file, or what the run does).
const NOT_IN_FILE: [&str; 2] = ["config", "check_config"];

/// Keys a reload applies at once (the rest need a restart): the scheduler's knobs and the
/// limits.
const LIVE_KEYS: [&str; 15] = [
    "max_job_time",
    "min_slice",
    "reserve_after",
    "reserve_after_wait_factor",
    "max_restarts",
    "policy",
    "fair_half_life",
    "user_weight",
    "default_estimate",
    "size_weight",
    "no_learned_estimates",
    "fair_usage_factor",
    "fair_age_factor",
    "reserve_below_share",
    "flood_factor",
];

/// Why `--size-factor` / `size_factor` (a linear weight until this release) is ignored: a
/// warning, not an error, so that an upgraded server with the old key still starts.
pub const SIZE_FACTOR_REPLACED: &str = "size_factor (--size-factor) is ignored: it was replaced \
     by size_weight (--size-weight HOURS: hours of priority a job loses per doubling of its \
     expected run time); a linear factor does not carry over, so the default weight applies \
     until size_weight is set (remove size_factor)";

/// Can a change of `key` (dotted, as in [`Loaded::effective`]) be applied by a reload?
pub fn is_live(key: &str) -> bool {
    key.starts_with("limits.") || LIVE_KEYS.contains(&key)
}

/// The configuration in effect: the command line over the file.
pub struct Loaded {
    pub args: Args,
    /// The file read, if any.
    pub path: Option<PathBuf>,
    pub limits: LimitRules,
    /// Every option's value (and every limit), by dotted key, as TOML text: what
    /// `--check-config` prints and what reloads compare.
    pub effective: BTreeMap<String, String>,
    /// The effective configuration as a TOML document.
    pub document: toml::Table,
    /// Options with no value (their defaults depend on how the server runs).
    pub unset: Vec<String>,
    /// Things worth saying that do not make the file invalid (a limit for an unknown user).
    pub warnings: Vec<String>,
}

/// The command line's explicit `--config`, if any (read before anything else is parsed).
fn config_flag(matches: &clap::ArgMatches) -> Option<PathBuf> {
    matches.get_one::<PathBuf>("config").cloned()
}

/// Reads the file `--config` names (or the default one, which may be missing) and merges it
/// under the command line `argv` (program name first).
pub fn load(argv: &[OsString]) -> Result<Loaded> {
    let command = Args::command();
    let cli = command
        .clone()
        .try_get_matches_from(argv)
        .map_err(|e| anyhow!("{}", first_line(&e.render().to_string())))?;
    let explicit = config_flag(&cli);
    let path = explicit
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let text = read_file(&path, explicit.is_some())?;
    let table: toml::Table = match &text {
        Some(t) => t
            .parse()
            .map_err(|e| anyhow!("{}: {}", path.display(), toml_error(&e)))?,
        None => toml::Table::new(),
    };
    let program = argv
        .first()
        .cloned()
        .unwrap_or_else(|| "mgpu_scheduler_server".into());
    let mut extra: Vec<OsString> = Vec::new();
    let mut limits_value = None;
    let mut replaced = Vec::new();
    for (key, value) in &table {
        if key == "limits" {
            limits_value = Some(value.clone());
            continue;
        }
        if key == "size_factor" {
            replaced.push(format!("{}: {SIZE_FACTOR_REPLACED}", path.display()));
            continue;
        }
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(flag.as_str())
                    && !a.is_hide_set()
                    && !NOT_IN_FILE.contains(&a.get_id().as_str())
            })
            .ok_or_else(|| {
                anyhow!(
                    "{}: unknown key '{key}' (the keys are the server's options with _ for -, \
                     see mgpu_scheduler_server --help, and [limits])",
                    path.display()
                )
            })?;
        let words = flag_words(arg, &flag, value)
            .map_err(|e| anyhow!("{}: key '{key}': {e}", path.display()))?;
        // The same parser as the command line, one key at a time: its errors name the key.
        let mut alone = vec![program.clone()];
        alone.extend(words.iter().cloned());
        if let Err(e) = command.clone().try_get_matches_from(&alone) {
            bail!(
                "{}: key '{key}': {}",
                path.display(),
                first_line(&e.render().to_string()).trim_start_matches("error: ")
            );
        }
        if cli.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            extra.extend(words);
        }
    }
    let mut full: Vec<OsString> = argv.to_vec();
    full.extend(extra);
    let matches = command.clone().try_get_matches_from(&full).map_err(|e| {
        anyhow!(
            "{} with the command line: {}",
            path.display(),
            first_line(&e.render().to_string()).trim_start_matches("error: ")
        )
    })?;
    let args = Args::from_arg_matches(&matches).map_err(|e| anyhow!("{e}"))?;
    let (limits, limits_doc, mut warnings) = LimitRules::from_value(limits_value.as_ref())
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if args.size_factor.is_some() {
        replaced.push(format!("--size-factor: {SIZE_FACTOR_REPLACED}"));
    }
    warnings.splice(0..0, replaced);
    let mut document = toml::Table::new();
    let mut unset = Vec::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || NOT_IN_FILE.contains(&id) || arg.get_long().is_none() {
            continue;
        }
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            document.insert(key_of(arg), toml::Value::Boolean(matches.get_flag(id)));
            continue;
        }
        let Some(raw) = matches.get_raw(id) else {
            unset.push(key_of(arg));
            continue;
        };
        let values: Vec<toml::Value> = raw.map(|v| literal(&v.to_string_lossy())).collect();
        let value = if matches!(arg.get_action(), ArgAction::Append) {
            toml::Value::Array(values)
        } else {
            values.into_iter().next().expect("a value")
        };
        document.insert(key_of(arg), value);
    }
    if !limits_doc.is_empty() {
        document.insert("limits".into(), toml::Value::Table(limits_doc));
    }
    let mut effective = BTreeMap::new();
    flatten("", &document, &mut effective);
    Ok(Loaded {
        args,
        path: text.map(|_| path),
        limits,
        effective,
        document,
        unset,
        warnings,
    })
}

fn key_of(arg: &clap::Arg) -> String {
    arg.get_long().unwrap_or_default().replace('-', "_")
}

/// Dotted keys and their values as TOML text.
fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
    for (k, v) in table {
        let key = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => flatten(&format!("{key}."), t, out),
            other => {
                out.insert(key, other.to_string());
            }
        }
    }
}

/// A command-line value as the TOML value it reads as.
fn literal(text: &str) -> toml::Value {
    if let Ok(i) = text.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if text.contains('.') {
        if let Ok(f) = text.parse::<f64>() {
            return toml::Value::Float(f);
        }
    }
    toml::Value::String(text.to_string())
}

/// The command-line words a file value stands for.
fn flag_words(arg: &clap::Arg, flag: &str, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let scalar = |v: &toml::Value| -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            _ => Err(format!(
                "expected a string or a number, not {}",
                v.type_str()
            )),
        }
    };
    let opt = format!("--{flag}");
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![opt.into()]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            v => Err(format!("expected true or false, not {}", v.type_str())),
        };
    }
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    let values: Vec<String> = match value {
        toml::Value::Array(items) if repeatable => {
            items.iter().map(scalar).collect::<Result<_, _>>()?
        }
        // `user_weight = { alice = 2 }`: NAME=VALUE pairs.
        toml::Value::Table(t) if repeatable => t
            .iter()
            .map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
            .collect::<Result<_, _>>()?,
        v => vec![scalar(v)?],
    };
    // One word per value (`--flag=value`): a negative number is a value, not an option.
    Ok(values
        .into_iter()
        .map(|v| OsString::from(format!("{opt}={v}")))
        .collect())
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

fn toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim().replace('\n', " ").replace("  ", " ")
}

/// Reads the configuration file, refusing one others could have written (see the module
/// docs). `None`: the default file does not exist.
fn read_file(path: &Path, explicit: bool) -> Result<Option<String>> {
    let missing = matches!(
        std::fs::symlink_metadata(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    );
    if missing {
        if explicit {
            bail!("configuration file {} does not exist", path.display());
        }
        return Ok(None);
    }
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            },
            n,
        ),
        _ => bail!("{} is not a file", path.display()),
    };
    let dir_fd = crate::safe_fs::checked_dir(
        dir,
        crate::safe_fs::Want::Existing,
        "configuration directory",
    )?;
    use nix::fcntl::{openat, OFlag};
    let fd = openat(
        Some(dir_fd.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| match e {
        nix::errno::Errno::ELOOP => anyhow!(
            "configuration file {} is a symbolic link; refusing it (name the file itself)",
            path.display()
        ),
        e => anyhow!("cannot open the configuration file {}: {e}", path.display()),
    })?;
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(file.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        bail!(
            "configuration file {} is not a regular file",
            path.display()
        );
    }
    // Root's (or, for a server run by a user, that user's).
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != euid {
        bail!(
            "configuration file {} is owned by uid {}, not root: refusing it (chown root {})",
            path.display(),
            st.st_uid,
            path.display()
        );
    }
    if st.st_mode & 0o022 != 0 {
        bail!(
            "configuration file {} is writable by {}: refusing it (chmod go-w {})",
            path.display(),
            if st.st_mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            path.display()
        );
    }
    /// A configuration is small; a bigger file is a mistake.
    const MAX_BYTES: u64 = 1 << 20;
    let mut text = String::new();
    (&mut file)
        .take(MAX_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_BYTES {
        bail!("configuration file {} is over 1 MiB", path.display());
    }
    Ok(Some(text))
}

/// A time in the file: Slurm's forms as a string (`"2-00:00:00"`, `"90"` minutes, `"4h"`), or
/// a number of minutes (as Slurm reads a bare number); 0 or `"UNLIMITED"`: no limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TimeValue {
    Minutes(u64),
    Text(String),
}

/// GPU memory in the file: MiB, or a string with a unit (`"80G"`); 0: no limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum MemValue {
    Mib(u64),
    Text(String),
}

/// One set of limits as written (`[limits]`, `[limits.users.NAME]`, `[limits.groups.NAME]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitSetFile {
    max_gpus_per_user: Option<u32>,
    max_gpu_mem_per_user: Option<MemValue>,
    max_jobs_per_user: Option<u32>,
    max_pending_jobs_per_user: Option<u32>,
    max_time: Option<TimeValue>,
    default_time: Option<TimeValue>,
}

/// One set of limits, parsed: `None` is not set here (inherited), `Some(0)` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSet {
    pub max_gpus: Option<u64>,
    pub max_gpu_mem_mib: Option<u64>,
    pub max_jobs: Option<u64>,
    pub max_pending_jobs: Option<u64>,
    pub max_time_s: Option<u64>,
    pub default_time_s: Option<u64>,
}

impl LimitSet {
    fn parse(file: LimitSetFile) -> Result<LimitSet, String> {
        let time = |key: &str, v: Option<TimeValue>| -> Result<Option<u64>, String> {
            Ok(match v {
                None => None,
                Some(TimeValue::Minutes(m)) => Some(
                    m.checked_mul(60)
                        .ok_or_else(|| format!("{key}: {m} minutes is too long"))?,
                ),
                Some(TimeValue::Text(t)) => Some(
                    mgpu_core::timefmt::parse_time_limit(&t)
                        .map_err(|e| format!("{key}: {e}"))?
                        .unwrap_or(0),
                ),
            })
        };
        let max_gpu_mem_mib = match file.max_gpu_mem_per_user {
            None => None,
            Some(MemValue::Mib(m)) => Some(m),
            Some(MemValue::Text(t)) if t.trim() == "0" => Some(0),
            Some(MemValue::Text(t)) => Some(
                mgpu_proto::parse_mem_mib(&t).map_err(|e| format!("max_gpu_mem_per_user: {e}"))?,
            ),
        };
        let set = LimitSet {
            max_gpus: file.max_gpus_per_user.map(u64::from),
            max_gpu_mem_mib,
            max_jobs: file.max_jobs_per_user.map(u64::from),
            max_pending_jobs: file.max_pending_jobs_per_user.map(u64::from),
            max_time_s: time("max_time", file.max_time)?,
            default_time_s: time("default_time", file.default_time)?,
        };
        if let (Some(d), Some(m)) = (set.default_time_s, set.max_time_s) {
            if m > 0 && (d == 0 || d > m) {
                return Err("default_time is longer than max_time".into());
            }
        }
        Ok(set)
    }

    fn fields(&self) -> [Option<u64>; 6] {
        [
            self.max_gpus,
            self.max_gpu_mem_mib,
            self.max_jobs,
            self.max_pending_jobs,
            self.max_time_s,
            self.default_time_s,
        ]
    }

    fn from_fields(f: [Option<u64>; 6]) -> LimitSet {
        LimitSet {
            max_gpus: f[0],
            max_gpu_mem_mib: f[1],
            max_jobs: f[2],
            max_pending_jobs: f[3],
            max_time_s: f[4],
            default_time_s: f[5],
        }
    }
}

/// The limits of one user, resolved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// What their running jobs may hold at once (enforced by the scheduler core).
    pub running: UserLimits,
    /// Jobs they may have waiting (refused at submit past it).
    pub max_pending_jobs: Option<u64>,
    /// Longest time limit a job may ask for (refused at submit past it).
    pub max_time_s: Option<u64>,
    /// Time limit of a job that asks for none (else `max_time_s`, as in Slurm).
    pub default_time_s: Option<u64>,
}

/// The `[limits]` table: defaults, then group entries (the strictest of a user's groups),
/// then the user's own entry, field by field. Root has none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LimitRules {
    defaults: LimitSet,
    users: HashMap<String, LimitSet>,
    /// By gid (names resolved when the file is read).
    groups: Vec<(u32, LimitSet)>,
}

impl LimitRules {
    /// Parses the `[limits]` value; returns the rules, the table as written (for display) and
    /// warnings (entries for users or groups this machine does not know).
    fn from_value(value: Option<&toml::Value>) -> Result<(LimitRules, toml::Table, Vec<String>)> {
        let Some(value) = value else {
            return Ok(Default::default());
        };
        let toml::Value::Table(table) = value else {
            bail!("'limits' must be a table ([limits])");
        };
        let mut table = table.clone();
        let mut rules = LimitRules::default();
        let mut warnings = Vec::new();
        let users = table.remove("users");
        let groups = table.remove("groups");
        let parse = |what: &str, t: toml::Table| -> Result<LimitSet> {
            let file: LimitSetFile = toml::Value::Table(t)
                .try_into()
                .map_err(|e: toml::de::Error| anyhow!("[{what}]: {}", toml_error(&e)))?;
            LimitSet::parse(file).map_err(|e| anyhow!("[{what}]: {e}"))
        };
        rules.defaults = parse("limits", table.clone())?;
        let entries = |v: Option<toml::Value>, what: &str| -> Result<Vec<(String, toml::Table)>> {
            match v {
                None => Ok(Vec::new()),
                Some(toml::Value::Table(t)) => t
                    .into_iter()
                    .map(|(name, v)| match v {
                        toml::Value::Table(t) => Ok((name, t)),
                        _ => bail!("[limits.{what}.{name}] must be a table"),
                    })
                    .collect(),
                Some(_) => bail!("limits.{what} must be a table of [limits.{what}.NAME] tables"),
            }
        };
        let mut shown = table;
        let users = entries(users, "users")?;
        let groups = entries(groups, "groups")?;
        let mut shown_users = toml::Table::new();
        for (name, t) in users {
            let set = parse(&format!("limits.users.{name}"), t.clone())?;
            if crate::users::uid_of(&name).is_none() {
                warnings.push(format!("[limits.users.{name}]: no such user here"));
            }
            rules.users.insert(name.clone(), set);
            shown_users.insert(name, toml::Value::Table(t));
        }
        let mut shown_groups = toml::Table::new();
        for (name, t) in groups {
            let set = parse(&format!("limits.groups.{name}"), t.clone())?;
            match nix::unistd::Group::from_name(&name).ok().flatten() {
                Some(g) => rules.groups.push((g.gid.as_raw(), set)),
                None => warnings.push(format!(
                    "[limits.groups.{name}]: no such group here; it limits nobody"
                )),
            }
            shown_groups.insert(name, toml::Value::Table(t));
        }
        if !shown_users.is_empty() {
            shown.insert("users".into(), toml::Value::Table(shown_users));
        }
        if !shown_groups.is_empty() {
            shown.insert("groups".into(), toml::Value::Table(shown_groups));
        }
        Ok((rules, shown, warnings))
    }

    /// The limits of a user (by name, uid and all its groups).
    pub fn resolve(&self, uid: u32, name: &str, groups: &[u32]) -> Limits {
        if uid == 0 {
            return Limits::default();
        }
        let mut fields = self.defaults.fields();
        // Of the user's groups that set a field, the strictest value (0: no limit).
        let mut strictest: [Option<u64>; 6] = [None; 6];
        for (gid, set) in &self.groups {
            if !groups.contains(gid) {
                continue;
            }
            for (s, v) in strictest.iter_mut().zip(set.fields()) {
                if let Some(v) = v {
                    let key = |x: u64| if x == 0 { u64::MAX } else { x };
                    *s = Some(s.map_or(v, |old| if key(v) < key(old) { v } else { old }));
                }
            }
        }
        for (f, s) in fields.iter_mut().zip(strictest) {
            if s.is_some() {
                *f = s;
            }
        }
        if let Some(own) = self.users.get(name) {
            for (f, v) in fields.iter_mut().zip(own.fields()) {
                if v.is_some() {
                    *f = v;
                }
            }
        }
        let set = LimitSet::from_fields(fields.map(|f| f.filter(|&v| v > 0)));
        let small = |v: Option<u64>| v.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
        let max_time_s = set.max_time_s;
        Limits {
            running: UserLimits {
                max_gpus: small(set.max_gpus),
                max_gpu_mem_mib: set.max_gpu_mem_mib,
                max_jobs: small(set.max_jobs),
            },
            max_pending_jobs: set.max_pending_jobs,
            max_time_s,
            // A default above the maximum (from entries of different levels) is the maximum.
            default_time_s: match (set.default_time_s, max_time_s) {
                (Some(d), Some(m)) => Some(d.min(m)),
                (d, _) => d,
            },
        }
    }

    /// The limits of the account with this uid (none when it cannot be looked up: the
    /// submit itself fails then).
    pub fn resolve_uid(&self, uid: u32) -> Limits {
        if *self == LimitRules::default() {
            return Limits::default();
        }
        match crate::users::account(uid) {
            Ok(a) => self.resolve(uid, &a.name, &a.groups),
            Err(_) => self.resolve(uid, "", &[]),
        }
    }
}

impl Loaded {
    /// What a reload to `new` changes, as (key, old, new, live); keys gone or added count
    /// as changed (an absent value shows as `(default)`).
    pub fn changes(&self, new: &Loaded) -> Vec<(String, String, String, bool)> {
        let unset = "(default)".to_string();
        let mut keys: Vec<&String> = self.effective.keys().chain(new.effective.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let old = self.effective.get(k).unwrap_or(&unset);
                let now = new.effective.get(k).unwrap_or(&unset);
                (old != now).then(|| (k.clone(), old.clone(), now.clone(), is_live(k)))
            })
            .collect()
    }

    /// `new` with the values of keys that cannot change live kept from `self`: what is in
    /// effect after a reload.
    pub fn keep_restart_only(&self, new: &mut Loaded) {
        let mut merged: BTreeMap<String, String> = new
            .effective
            .iter()
            .filter(|(k, _)| is_live(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &self.effective {
            if !is_live(k) {
                merged.insert(k.clone(), v.clone());
            }
        }
        new.effective = merged;
    }

    /// The effective configuration as a TOML document (`--check-config`).
    pub fn render(&self) -> String {
        let source = match &self.path {
            Some(p) => format!("{} and the command line", p.display()),
            None => format!("the command line (no {DEFAULT_PATH})"),
        };
        format!(
            "# mgpu_scheduler_server: effective configuration, from {source}.\n\
             # Unset (their defaults depend on how the server runs): {}.\n{}",
            self.unset.join(", "),
            toml::to_string(&self.document).unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(t: &str) -> LimitRules {
        let v: toml::Table = t.parse().unwrap();
        LimitRules::from_value(v.get("limits")).unwrap().0
    }

    /// Defaults, then the strictest of the user's groups, then the user's own entry; 0 is no
    /// limit; root has none.
    #[test]
    fn limits_resolve_defaults_groups_then_user() {
        let root_gid = 0;
        let rules = set(r#"
            [limits]
            max_gpus_per_user = 4
            max_time = "2-00:00:00"
            default_time = 60
            [limits.groups.root]
            max_gpus_per_user = 2
            max_jobs_per_user = 0
            [limits.users.alice]
            max_gpus_per_user = 0
            max_gpu_mem_per_user = "80G"
            "#);
        let plain = rules.resolve(1000, "bob", &[1000]);
        assert_eq!(plain.running.max_gpus, Some(4));
        assert_eq!(plain.max_time_s, Some(2 * 86400));
        assert_eq!(plain.default_time_s, Some(3600));
        let grouped = rules.resolve(1000, "bob", &[1000, root_gid]);
        assert_eq!(grouped.running.max_gpus, Some(2));
        assert_eq!(grouped.running.max_jobs, None);
        let alice = rules.resolve(1001, "alice", &[root_gid]);
        assert_eq!(alice.running.max_gpus, None);
        assert_eq!(alice.running.max_gpu_mem_mib, Some(80 * 1024));
        assert_eq!(rules.resolve(0, "root", &[0]), Limits::default());
    }

    #[test]
    fn bad_limits_name_the_key() {
        for (text, needle) in [
            ("[limits]\nmax_gpu_per_user = 2", "max_gpu_per_user"),
            ("[limits]\nmax_time = \"soon\"", "max_time"),
            ("[limits.users.x]\nmax_jobs_per_user = -1", "limits.users.x"),
            (
                "[limits]\nmax_time = 60\ndefault_time = 120",
                "default_time",
            ),
            (
                "[limits]\nmax_gpu_mem_per_user = \"lots\"",
                "max_gpu_mem_per_user",
            ),
        ] {
            let v: toml::Table = text.parse().unwrap();
            let e = LimitRules::from_value(v.get("limits"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
