//! `mgpu_srun`: submit a job. Attached by default (like Slurm's `srun`): says on stderr why the
//! job waits, streams its stdout/stderr live, and exits with its exit code. Ctrl-C, SIGTERM or
//! SIGHUP cancel the job; srun returns only once its processes are gone.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mgpu_core::timefmt::parse_time_limit;
use mgpu_proto::{
    ArraySpec, AttachRequest, Frame, Request, Response, SubmitRequest, Venv, WarnSignal,
};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::client::{parse_mem_mib, Client};

/// How often a detached-from-its-server srun tries to reconnect.
const RECONNECT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Submit a GPU job to the mgpu scheduler.
///
/// Examples:
///   mgpu_srun -- nvidia-smi
///   mgpu_srun --gpus 2 --mem 20G --time-limit 2:00:00 -- python train.py --lr 3e-4
///   mgpu_srun --detach --job-name sweep-1 -- ./run.sh 1
///   mgpu_srun --array 0-99 --mem 10G -- sh -c 'python sweep.py --seed $MGPU_ARRAY_TASK_ID'
///
/// A script given as the command with #SBATCH or #MGPU lines at its top gets those options
/// (the command line wins); see mgpu_sbatch.
#[derive(Debug, Parser)]
#[command(
    name = "mgpu_srun",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
pub struct Args {
    #[command(flatten)]
    pub opts: JobOpts,
    /// Print the job id and return at once instead of waiting for the job (no short form:
    /// Slurm's -d is --dependency)
    #[arg(long)]
    pub detach: bool,
    /// With --detach or --array: print only the job id (the array's id)
    #[arg(long)]
    pub parsable: bool,
    /// Run the job on a terminal of its own (an interactive shell: mgpu_srun --pty bash): your
    /// terminal is put in raw mode and relayed, window size changes follow, Ctrl-C and Ctrl-Z
    /// go to the job
    #[arg(long, conflicts_with_all = ["detach", "array"])]
    pub pty: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The command and its arguments (after --, or from the first word that is not an option;
    /// a word before -- that starts with - is an option, and an unknown one is refused)
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// The job's options: the same on mgpu_srun's and mgpu_sbatch's command lines and in a batch
/// script's `#SBATCH` / `#MGPU` lines.
#[derive(Debug, Clone, clap::Args)]
pub struct JobOpts {
    /// Number of GPUs (Slurm: --gpus-per-task, as a job is one task)
    #[arg(
        short = 'G',
        long,
        default_value_t = 1,
        visible_alias = "gpus-per-task",
        overrides_with = "gres"
    )]
    pub gpus: u32,
    /// Slurm's generic resource request: gpu:N (or gpu, one GPU); gpu:TYPE:N takes N GPUs of
    /// any type (mgpu does not choose GPUs by type; it says so)
    #[arg(long, value_name = "gpu:N", value_parser = parse_gres, overrides_with = "gpus")]
    pub gres: Option<Gres>,
    /// GPU memory needed on each of its GPUs, in MiB (or with a unit: 10G). With it, jobs may
    /// share a GPU; without it the job gets its GPUs exclusively. Slurm's --mem-per-gpu means
    /// the same. (In an #SBATCH line, --mem is Slurm's host memory: see --host-mem)
    #[arg(long, visible_alias = "mem-per-gpu", value_name = "MIB", value_parser = parse_mem_mib)]
    pub mem: Option<u64>,
    /// Time limit, as Slurm's --time: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or
    /// with a unit (30s, 90m, 2h, 1d); 0 or UNLIMITED: no limit
    #[arg(
        short = 't',
        long,
        visible_alias = "time",
        value_name = "TIME",
        value_parser = |s: &str| parse_time_limit(s).map(TimeLimit)
    )]
    pub time_limit: Option<TimeLimit>,
    /// At the time limit, end the job as TIMEOUT instead of requeueing it
    #[arg(long)]
    pub no_requeue: bool,
    /// End the job as TIMEOUT after this many context switches
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// Send SIG this many seconds before the time limit, e.g. USR1@60 (Slurm style; SECS
    /// defaults to 60)
    #[arg(long, value_name = "SIG@SECS", value_parser = parse_warn_signal)]
    pub signal: Option<WarnSignal>,
    /// CPUs for the job: its processes together get at most N CPUs' time (a cgroup quota)
    /// [default: the server's --default-cpus]
    #[arg(short = 'c', long, visible_alias = "cpus-per-task", value_name = "N")]
    pub cpus: Option<u32>,
    /// Host memory (RAM) for the job, MiB or with a unit (16G); over it, the job is killed and
    /// ends as OUT_OF_MEMORY [default: the server's --default-host-mem]. An #SBATCH line's
    /// --mem (Slurm's meaning) sets this
    #[arg(long, value_name = "SIZE", value_parser = parse_mem_mib)]
    pub host_mem: Option<u64>,
    /// Lower the job's priority by N (only root may give a negative value)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub nice: i32,
    /// Job name [default: the command's name; a batch script's name]
    #[arg(short = 'J', long, value_name = "NAME")]
    pub job_name: Option<String>,
    /// Working directory of the job [default: the current directory]
    #[arg(short = 'D', long, value_name = "DIR")]
    pub chdir: Option<PathBuf>,
    /// Activate this Python venv (its bin/activate) [default: ~/venv when it exists]
    #[arg(long, value_name = "DIR", conflicts_with = "no_venv")]
    pub venv: Option<PathBuf>,
    /// Do not activate any venv
    #[arg(long)]
    pub no_venv: bool,
    /// Submit a job array: one task per index, e.g. 0-99, 1,3,5-9 or 0-99:5 (every 5th); with
    /// %N (0-99%4) at most N tasks wait or run at once. Each task is a job of its own, with
    /// MGPU_ARRAY_TASK_ID (and SLURM_ARRAY_TASK_ID) set to its index; implies --detach
    #[arg(short = 'a', long, value_name = "SPEC", value_parser = mgpu_proto::parse_array_spec)]
    pub array: Option<ArraySpec>,
    /// Also write the job's stdout (and stderr, unless -e) to FILE, created as you, relative
    /// to the job's working directory; %j job id, %A array id, %a task index, %x job name,
    /// %u user, %% a %; %3a zero-pads to 3 digits (the server keeps its log too: mgpu_log)
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,
    /// Also write the job's stderr to FILE (patterns as -o)
    #[arg(short = 'e', long, value_name = "FILE")]
    pub error: Option<String>,
    /// Which of your environment variables the job gets (Slurm's --export): ALL (the
    /// default), NONE, or a list NAME or NAME=VALUE, with ALL to add them to everything
    /// (ALL,DEBUG=1)
    #[arg(long, value_name = "ALL|NONE|VARS")]
    pub export: Option<String>,
    /// Do not start the job before TIME (Slurm's --begin; it waits with REASON BeginTime):
    /// now+N[seconds|minutes|hours|days|weeks] (now+90, now+2hours), HH:MM[:SS] (today, or
    /// tomorrow once past), YYYY-MM-DD[THH:MM[:SS]], midnight, noon, fika, teatime, today,
    /// tomorrow; in local time
    #[arg(long, value_name = "TIME", value_parser = parse_begin)]
    pub begin: Option<u64>,
    /// Start only when these jobs are done, as Slurm's --dependency: afterok:ID[:ID...] (ended
    /// COMPLETED), afterany:ID (ended), afternotok:ID (ended otherwise), after:ID (started),
    /// singleton (no other job of yours with this name runs, nor an earlier one waits); ID_TASK names
    /// one task of a job array, an array's ID all its tasks; join with ',' (all) or '?' (any)
    #[arg(short = 'd', long, value_name = "TYPE:ID", value_parser = parse_dependency_text)]
    pub dependency: Option<String>,
    /// Submit the job held: it waits (REASON JobHeldUser) until 'mgpu_control release ID'
    #[arg(short = 'H', long)]
    pub hold: bool,
    /// When the job ends, run `sh -c CMD` as you (at most 60 s, output discarded), with
    /// MGPU_JOB_ID, MGPU_JOB_NAME, MGPU_JOB_STATE and MGPU_JOB_EXIT_CODE set
    #[arg(long, value_name = "CMD")]
    pub notify: Option<String>,
    /// Mail when the job begins, ends or fails: BEGIN, END, FAIL, ALL or NONE, comma-separated
    /// (sent as you through the machine's sendmail)
    #[arg(long, value_name = "TYPES", value_parser = |s: &str| parse_mail_types(s).map(MailTypes))]
    pub mail_type: Option<MailTypes>,
    /// Where the mail goes [default: your user name, with --mail-type]
    #[arg(long, value_name = "ADDR", requires = "mail_type")]
    pub mail_user: Option<String>,
    /// Slurm's node count: only 1 (mgpu runs jobs on this one machine); taken so that Slurm
    /// scripts with -N 1 run unchanged
    #[arg(short = 'N', long, value_name = "1", value_parser = |s: &str| only_one(s, "--nodes", "mgpu runs jobs on this one machine"))]
    pub nodes: Option<u32>,
    /// Slurm's task count: only 1 (a job is one command: -c N for CPUs, --gpus N for GPUs);
    /// taken so that Slurm scripts with -n 1 run unchanged
    #[arg(short = 'n', long, visible_alias = "ntasks-per-node", value_name = "1", value_parser = |s: &str| only_one(s, "--ntasks", "a job is one command; use -c N for CPUs and --gpus N for GPUs"))]
    pub ntasks: Option<u32>,
}

/// Slurm's `-N`/`-n` as mgpu takes them: 1 (or `1-1`), anything else refused saying why.
fn only_one(text: &str, flag: &str, why: &str) -> Result<u32, String> {
    match text.trim() {
        "1" | "1-1" => Ok(1),
        _ => Err(format!("{flag} {text}: {why} (only 1 is taken)")),
    }
}

/// Slurm's `--begin` forms, as ms since the epoch (local time, as Slurm reads them).
pub fn parse_begin(text: &str) -> Result<u64, String> {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    begin_at(text, now_s).map(|s| s.max(0) as u64 * 1000)
}

/// [`parse_begin`] in seconds, with `now` given.
fn begin_at(text: &str, now: i64) -> Result<i64, String> {
    let bad = || {
        format!(
            "invalid --begin '{text}': use now+N[seconds|minutes|hours|days|weeks], HH:MM[:SS], YYYY-MM-DD[THH:MM[:SS]], midnight, noon, fika, teatime, today or tomorrow"
        )
    };
    let t = text.trim().to_ascii_lowercase();
    if let Some(rest) = t.strip_prefix("now") {
        if rest.is_empty() {
            return Ok(now);
        }
        let rest = rest.strip_prefix('+').ok_or_else(bad)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let unit = match &rest[digits.len()..] {
            "" | "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86400,
            "w" | "week" | "weeks" => 7 * 86400,
            _ => return Err(bad()),
        };
        return n
            .checked_mul(unit)
            .and_then(|d| now.checked_add(d))
            .ok_or_else(bad);
    }
    // SAFETY: localtime_r fills the zeroed struct; mktime reads it.
    let local = |secs: i64| -> libc::tm {
        unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            libc::localtime_r(&(secs as libc::time_t), &mut tm);
            tm
        }
    };
    let make = |mut tm: libc::tm| -> i64 {
        tm.tm_isdst = -1;
        unsafe { libc::mktime(&mut tm) as i64 }
    };
    let today = local(now);
    let at_today = |h: i32, m: i32, s: i32, day_offset: i32| {
        let mut tm = today;
        tm.tm_hour = h;
        tm.tm_min = m;
        tm.tm_sec = s;
        tm.tm_mday += day_offset;
        make(tm)
    };
    // A time of day: today, or tomorrow once it has passed (as Slurm).
    let next = |h: i32, m: i32, s: i32| {
        let t = at_today(h, m, s, 0);
        if t <= now {
            at_today(h, m, s, 1)
        } else {
            t
        }
    };
    let hms = |p: &str| -> Option<(i32, i32, i32)> {
        let parts: Vec<i32> = p
            .split(':')
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let (h, m, s) = match parts.as_slice() {
            [h, m] => (*h, *m, 0),
            [h, m, s] => (*h, *m, *s),
            _ => return None,
        };
        ((0..24).contains(&h) && (0..60).contains(&m) && (0..61).contains(&s)).then_some((h, m, s))
    };
    match t.as_str() {
        "midnight" => return Ok(at_today(0, 0, 0, 1)),
        "noon" => return Ok(next(12, 0, 0)),
        "fika" => return Ok(next(15, 0, 0)),
        "teatime" => return Ok(next(16, 0, 0)),
        "today" => return Ok(at_today(0, 0, 0, 0)),
        "tomorrow" => return Ok(at_today(0, 0, 0, 1)),
        _ => {}
    }
    if let Some((h, m, s)) = hms(&t) {
        return Ok(next(h, m, s));
    }
    let (date, time) = match t.split_once('t') {
        Some((d, tm)) => (d, Some(tm)),
        None => (t.as_str(), None),
    };
    let ymd: Vec<i32> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    let [y, mo, d] = ymd.as_slice() else {
        return Err(bad());
    };
    let (h, mi, s) = match time {
        Some(tm) => hms(tm).ok_or_else(bad)?,
        None => (0, 0, 0),
    };
    if !(1..=12).contains(mo) || !(1..=31).contains(d) || *y < 1970 {
        return Err(bad());
    }
    let mut tm = today;
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = *d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;
    Ok(make(tm))
}

/// A parsed `--gres`: the GPU count, and a type mgpu cannot honour.
#[derive(Debug, Clone)]
pub struct Gres {
    pub gpus: u32,
    pub ignored_type: Option<String>,
}

/// Slurm's `--gres=gpu[:TYPE][:N]`, also as a comma list (`gpu:2,shard:1`): each entry is
/// read on its own, so that one mgpu cannot honour is refused rather than taken for a type.
pub fn parse_gres(text: &str) -> Result<Gres, String> {
    let bad = |why: &str| format!("invalid --gres '{text}': {why}");
    let only_gpus = "mgpu knows only GPUs: gpu:N, e.g. --gres=gpu:2 (or --gpus 2)";
    let mut found: Option<Gres> = None;
    for entry in text.split(',') {
        let mut parts = entry.split(':');
        match parts.next() {
            Some("gpu") => {}
            _ if entry.is_empty() => return Err(bad(only_gpus)),
            _ => return Err(bad(&format!("'{entry}' cannot be honoured: {only_gpus}"))),
        }
        let rest: Vec<&str> = parts.collect();
        let (ty, n) = match rest.as_slice() {
            [] => (None, "1"),
            [n] if n.parse::<u32>().is_ok() => (None, *n),
            [ty] => (Some(*ty), "1"),
            [ty, n] => (Some(*ty), *n),
            _ => return Err(bad(only_gpus)),
        };
        // (Digits only: `parse` would take a sign.)
        let gpus = Some(n)
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
            .ok_or_else(|| bad(only_gpus))?;
        if found.is_some() {
            return Err(bad(
                "more than one gpu entry: mgpu does not tell GPU types apart, so give the total once (gpu:N)",
            ));
        }
        found = Some(Gres {
            gpus,
            ignored_type: ty.map(str::to_string),
        });
    }
    found.ok_or_else(|| bad(only_gpus))
}

impl JobOpts {
    /// GPUs asked for (--gpus or --gres, whichever came last).
    pub fn gpu_count(&self) -> u32 {
        self.gres.as_ref().map_or(self.gpus, |g| g.gpus)
    }
}

/// `--dependency` as written, once it parses (the server resolves its job ids).
fn parse_dependency_text(text: &str) -> Result<String, String> {
    mgpu_core::parse_dependency(text).map(|_| text.to_string())
}

/// A parsed `--mail-type`: BEGIN, END, FAIL.
#[derive(Debug, Clone)]
pub struct MailTypes(pub Vec<String>);

/// A parsed `--time-limit`: `None` is no limit.
#[derive(Debug, Clone, Copy)]
pub struct TimeLimit(pub Option<u64>);

pub fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let args = match Args::try_parse_from(&argv) {
        Ok(args) => args,
        Err(e) => exit_parse_error("mgpu_srun", e),
    };
    // A script with #SBATCH / #MGPU lines: those options first, so the command line wins.
    let cwd = args
        .opts
        .chdir
        .clone()
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    let args = match directive_script(&args.command, &cwd) {
        None => args,
        Some(path) => {
            let extra = match crate::sbatch::script_directives("mgpu_srun", &path) {
                Ok(extra) => extra,
                Err(e) => {
                    eprintln!("mgpu_srun: error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let mut all = vec![argv[0].clone()];
            all.extend(extra);
            all.extend(argv[1..].iter().cloned());
            match Args::try_parse_from(all) {
                Ok(args) => args,
                Err(e) => exit_parse_error("mgpu_srun", e),
            }
        }
    };
    let detach = args.detach || args.opts.array.is_some();
    if args.parsable && !detach {
        eprintln!("mgpu_srun: error: --parsable goes with --detach or --array");
        return ExitCode::from(2);
    }
    let sub = build_request(args.opts, args.command, !detach, None).map(|request| Submission {
        request,
        detach,
        parsable: args.parsable,
        socket: args.socket,
        batch: false,
        pty: args.pty,
    });
    crate::run_main("mgpu_srun", async move { run(sub?).await })
}

/// Prints a command-line error (one line for an unknown option) and exits.
pub fn exit_parse_error(prog: &str, e: clap::Error) -> ! {
    if let Some(message) = unknown_option_message(prog, &e) {
        eprintln!("{prog}: error: {message}");
        std::process::exit(2);
    }
    e.exit()
}

/// For an unknown option, one line naming it, and for a Slurm flag mgpu does not take (yet),
/// what to use instead. `None` for other errors (clap's own message says it best).
pub fn unknown_option_message(prog: &str, e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::ValueValidation {
        // -N/-n other than 1: the reason in one line.
        let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else {
            return None;
        };
        if arg.starts_with("--nodes") || arg.starts_with("--ntasks") {
            let source = std::error::Error::source(e)?;
            return Some(source.to_string());
        }
        return None;
    }
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let ContextValue::String(word) = e.get(ContextKind::InvalidArg)? else {
        return None;
    };
    let flag = if word.starts_with("--") {
        word.split('=').next().unwrap_or(word)
    } else {
        word.get(..2).unwrap_or(word)
    };
    if let Some(hint) = slurm_flag_hint(prog, flag) {
        return Some(if hint.starts_with(flag) {
            hint.to_string()
        } else {
            format!("{flag}: {hint}")
        });
    }
    let suggestion = match e.get(ContextKind::SuggestedArg) {
        Some(ContextValue::String(s)) => format!(" (did you mean {s}?)"),
        Some(ContextValue::Strings(s)) if !s.is_empty() => format!(" (did you mean {}?)", s[0]),
        _ => String::new(),
    };
    let example = if prog == "mgpu_sbatch" {
        "mgpu_sbatch --gpus 1 train.sh"
    } else {
        "mgpu_srun --gpus 1 -- python train.py"
    };
    Some(format!(
        "unknown option '{word}'{suggestion}; the command goes after --, e.g. {example} (see {prog} --help)"
    ))
}

/// What to say about a Slurm `srun`/`sbatch` flag that `prog` does not take.
pub fn slurm_flag_hint(prog: &str, flag: &str) -> Option<&'static str> {
    Some(match flag {
        "--gpus-per-node" | "--tres-per-task" => "not supported; use --gpus N (-G N)",
        "--mem-per-cpu" => "not supported; use --host-mem SIZE for the job's host memory (RAM)",
        "-i" | "--input" => "not needed: redirect into mgpu_srun (mgpu_srun -- cmd < FILE); an attached job's stdin is srun's",
        "--wrap" if prog == "mgpu_srun" => {
            "--wrap is mgpu_sbatch's; with mgpu_srun put the command after --: mgpu_srun -- sh -c '...'"
        }
        "--detach" if prog == "mgpu_sbatch" => "not needed: mgpu_sbatch always returns at once",
        "--open-mode" => {
            "not supported: -o/-e files are truncated when the job first starts (a run after a context switch appends)"
        }
        "-p" | "--partition" | "-q" | "--qos" | "-A" | "--account" | "--reservation" => {
            "mgpu has no partitions, QOS, accounts or reservations; leave it out"
        }
        "-w" | "--nodelist" | "-x" | "--exclude" | "-C" | "--constraint" => {
            "mgpu runs jobs on this one machine; leave it out"
        }
        "--exclusive" => "not needed: without --mem a job gets its GPUs exclusively",
        _ => return None,
    })
}

/// Parses Slurm's `--mail-type`: a comma-separated list of BEGIN, END, FAIL, ALL (all three)
/// and NONE; Slurm's other types are refused by name.
pub fn parse_mail_types(text: &str) -> Result<Vec<String>, String> {
    let mut types: Vec<String> = Vec::new();
    for t in text.split(',') {
        let t = t.trim().to_ascii_uppercase();
        let add: &[&str] = match t.as_str() {
            "BEGIN" => &["BEGIN"],
            "END" => &["END"],
            "FAIL" => &["FAIL"],
            "ALL" => &["BEGIN", "END", "FAIL"],
            "NONE" => &[],
            _ => {
                return Err(format!(
                    "mail type '{t}' is not supported: use BEGIN, END, FAIL, ALL or NONE"
                ))
            }
        };
        for a in add {
            if !types.iter().any(|x| x == a) {
                types.push(a.to_string());
            }
        }
    }
    Ok(types)
}

/// An absolute path for `dir` that the caller can enter (checked with the caller's own rights).
fn usable_dir(dir: &std::path::Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(dir)
        .with_context(|| format!("cannot use working directory {}", dir.display()))?;
    if !abs.is_dir() {
        bail!("working directory {} is not a directory", abs.display());
    }
    nix::unistd::access(&abs, nix::unistd::AccessFlags::X_OK)
        .with_context(|| format!("cannot enter working directory {}", abs.display()))?;
    Ok(abs)
}

/// Parses Slurm's `--signal` form: `[R:|B:]SIG[@SECS]`, SIG a name (`USR1`, `SIGUSR1`) or a
/// number. The signal goes to all of the job's processes.
pub fn parse_warn_signal(text: &str) -> Result<WarnSignal, String> {
    let t = text
        .strip_prefix("R:")
        .or_else(|| text.strip_prefix("B:"))
        .unwrap_or(text);
    let (sig, secs) = match t.split_once('@') {
        Some((s, n)) => (
            s,
            n.parse::<u64>()
                .map_err(|_| format!("invalid --signal '{text}': SECS must be a number"))?,
        ),
        None => (t, 60),
    };
    let number = match sig.parse::<i32>() {
        Ok(n) => n,
        Err(_) => {
            let name = sig.to_ascii_uppercase();
            let name = if name.starts_with("SIG") {
                name
            } else {
                format!("SIG{name}")
            };
            name.parse::<nix::sys::signal::Signal>()
                .map_err(|_| format!("invalid --signal '{text}': unknown signal {sig}"))?
                as i32
        }
    };
    if nix::sys::signal::Signal::try_from(number).is_err() {
        return Err(format!(
            "invalid --signal '{text}': unknown signal {number}"
        ));
    }
    Ok(WarnSignal {
        signal: number,
        secs_before: secs,
    })
}

/// Whether our stdin is input the user means for the job: not a terminal, not /dev/null, not
/// closed (a pipe or a file).
fn stdin_is_real_input() -> bool {
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return false;
    }
    let Ok(fd) = stdin.as_fd().try_clone_to_owned() else {
        return false; // closed
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    let is_null = std::fs::metadata("/dev/null").is_ok_and(|null| {
        meta.file_type().is_char_device()
            && null.file_type().is_char_device()
            && meta.rdev() == null.rdev()
    });
    !is_null
}

/// The script the job runs, when it has `#SBATCH` or `#MGPU` lines at its top: the command's
/// first word (looked up in $PATH when it has no `/`, as the job would), or the script a shell
/// is given (`bash train.sh`). Read with our own rights, and only from a regular file (never
/// blocks on a FIFO).
fn directive_script(command: &[OsString], cwd: &std::path::Path) -> Option<PathBuf> {
    let first = command.first()?.to_str()?;
    let shell = std::path::Path::new(first)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| matches!(n, "sh" | "bash" | "dash" | "zsh" | "ksh"));
    let path = if shell {
        let script = command.get(1)?.to_str().filter(|a| !a.starts_with('-'))?;
        cwd.join(script)
    } else if first.contains('/') {
        cwd.join(first)
    } else {
        let path_var = std::env::var_os("PATH")?;
        std::env::split_paths(&path_var)
            .map(|dir| cwd.join(dir).join(first))
            .find(|p| p.is_file())?
    };
    // Directives are at the top: its first 64 KiB tell (a program's binary is not read whole).
    let head = crate::sbatch::read_head(&path, 64 << 10)?;
    let found = crate::sbatch::directives(&head)
        .map(|d| !d.is_empty())
        .unwrap_or(true);
    found.then_some(path)
}

/// Our umask, from /proc (reading it with umask(2) would change it).
fn current_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
}

/// What `--notify`, `--mail-type` and `--mail-user` ask for (none: `None`).
fn notify_request(
    command: Option<String>,
    mail_types: Option<Vec<String>>,
    mail_user: Option<String>,
) -> Option<mgpu_proto::Notify> {
    let mail_types = mail_types.unwrap_or_default();
    let mail_user = (!mail_types.is_empty()).then(|| {
        mail_user.unwrap_or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_default()
        })
    });
    (command.is_some() || mail_user.is_some()).then(|| mgpu_proto::Notify {
        command,
        mail_user,
        mail_types,
        job_name: String::new(),
    })
}

fn utf8(s: OsString, what: &str) -> Result<String> {
    s.into_string()
        .map_err(|s| anyhow::anyhow!("{what} is not valid UTF-8: {}", s.to_string_lossy()))
}

/// What to submit, and how to wait for it.
pub struct Submission {
    pub request: SubmitRequest,
    pub detach: bool,
    pub parsable: bool,
    pub socket: Option<PathBuf>,
    /// Say it as sbatch does ("Submitted batch job N").
    pub batch: bool,
    /// `--pty`: the job gets a terminal, relayed from ours.
    pub pty: bool,
}

/// The environment the job gets, as Slurm's `--export` says (ALL when absent).
pub fn export_env(export: Option<&str>) -> Result<Vec<(String, String)>> {
    // Variables that are not UTF-8 cannot be carried.
    let mine = || {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
    };
    let Some(spec) = export else {
        return Ok(mine().collect());
    };
    let mut env: Vec<(String, String)> = Vec::new();
    let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
        env.retain(|(e, _)| *e != k);
        env.push((k, v));
    };
    let items: Vec<&str> = spec.split(',').collect();
    if items.iter().any(|i| i.trim().eq_ignore_ascii_case("ALL")) {
        env.extend(mine());
    }
    for item in items {
        let item = item.trim();
        if item.eq_ignore_ascii_case("ALL") || item.eq_ignore_ascii_case("NONE") {
            continue;
        }
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("invalid --export '{spec}': '{item}' is not NAME or NAME=VALUE (use ALL, NONE or a list: ALL,DEBUG=1)");
        }
        match v {
            Some(v) => set(&mut env, k.to_string(), v.to_string()),
            None => {
                if let Some(v) = std::env::var_os(k).and_then(|v| v.into_string().ok()) {
                    set(&mut env, k.to_string(), v);
                }
            }
        }
    }
    Ok(env)
}

/// The submit request for `opts` and `command` (a batch script's name and arguments when
/// `script` holds its content).
pub fn build_request(
    opts: JobOpts,
    command: Vec<OsString>,
    attach: bool,
    script: Option<String>,
) -> Result<SubmitRequest> {
    if command.is_empty() {
        bail!("no command given: put it after --, e.g. mgpu_srun --gpus 1 -- python train.py");
    }
    let here = std::env::current_dir();
    let cwd = match (&opts.chdir, &here) {
        (Some(d), _) => usable_dir(d)?,
        (None, Ok(h)) => usable_dir(h)?,
        (None, Err(e)) => bail!("reading the current directory: {e}"),
    };
    // Slurm's SLURM_SUBMIT_DIR is where sbatch ran, not --chdir (where that cannot be read,
    // the job's own directory stands in).
    let submit_dir = (here.ok())
        .filter(|_| opts.chdir.is_some())
        .and_then(|d| d.into_os_string().into_string().ok())
        .filter(|d| std::path::Path::new(d) != cwd);
    let venv = if opts.no_venv {
        Venv::Off
    } else if let Some(v) = &opts.venv {
        let abs =
            std::fs::canonicalize(v).with_context(|| format!("cannot use venv {}", v.display()))?;
        if !abs.join("bin/activate").is_file() {
            bail!("{} is not a venv: it has no bin/activate", abs.display());
        }
        Venv::Dir(utf8(abs.into_os_string(), "the venv path")?)
    } else {
        Venv::Auto
    };
    let command = command
        .into_iter()
        .map(|a| utf8(a, "an argument"))
        .collect::<Result<Vec<_>>>()?;
    if let Some(ty) = opts.gres.as_ref().and_then(|g| g.ignored_type.as_ref()) {
        eprintln!(
            "mgpu: note: --gres=gpu:{ty}:N: mgpu does not choose GPUs by type; the job gets any {} GPU(s)",
            opts.gpu_count()
        );
    }
    let env = export_env(opts.export.as_deref())?;
    let gpus = opts.gpu_count();
    Ok(SubmitRequest {
        name: opts.job_name,
        gpus,
        mem_mib: opts.mem,
        // An explicit "no limit" is sent as 0, so that the server can tell it from no `-t`.
        time_limit_s: opts.time_limit.map(|t| t.0.unwrap_or(0)),
        command,
        cwd: utf8(cwd.into_os_string(), "the working directory")?,
        submit_dir,
        env,
        venv,
        attach: attach && opts.array.is_none(),
        umask: current_umask(),
        no_requeue: opts.no_requeue,
        max_restarts: opts.max_restarts,
        signal: opts.signal,
        nice: opts.nice,
        cpus: opts.cpus,
        host_mem_mib: opts.host_mem,
        array_limit: opts.array.as_ref().and_then(|a| a.limit),
        array: opts.array.map(|a| a.indices),
        script,
        // `-o /dev/null`: no file (the output is in the job's log anyway), as sbatch's help
        // says; stderr too unless -e names one.
        output: opts.output.filter(|o| o != "/dev/null"),
        error: opts.error,
        begin_at: opts.begin,
        dependency: opts.dependency,
        hold: opts.hold,
        // Filled in by `run` (only an attached job's stdin is the user's).
        stdin: false,
        pty: None,
        notify: notify_request(opts.notify, opts.mail_type.map(|m| m.0), opts.mail_user)
            .map(Box::new),
    })
}

pub async fn run(sub: Submission) -> Result<i32> {
    let Submission {
        request,
        detach,
        parsable,
        socket,
        batch,
        pty: pty_wanted,
    } = sub;
    // The server reads at most this much of a submit; say so here, with the figures.
    let size = json_size(&request)? + r#""type":"submit","#.len() + 1;
    if size > mgpu_proto::MAX_SUBMIT_FRAME {
        bail!(
            "the job's command, script and environment take {} KiB as sent, more than the server accepts ({} MiB); unset large environment variables or pass data in files",
            size >> 10,
            mgpu_proto::MAX_SUBMIT_FRAME >> 20
        );
    }
    let mut request = request;
    // --pty: keystrokes go to the job's terminal through the job's stdin pipe (see
    // `PtyRelay`).
    let mut pty = if pty_wanted {
        let relay = PtyRelay::new()?;
        request.pty = Some(relay.size());
        // A terminal session is not restarted from its command by a context switch: at its
        // time limit it ends.
        request.no_requeue = true;
        Some(relay)
    } else {
        None
    };
    let mut raw: Option<RawMode> = None;
    // What is piped or redirected into an attached srun is the job's stdin (copied into a pipe
    // the server makes, whose other end the job reads). A terminal is not: the job's stdin is
    // then /dev/null (--pty gives a terminal).
    request.stdin = pty.is_some() || (!detach && stdin_is_real_input());
    let mut client = Client::connect(socket.as_deref(), "mgpu_srun").await?;
    if detach {
        return match client.call(&Request::Submit(request)).await? {
            Response::Submitted { job } | Response::SubmittedArray { first: job, .. }
                if parsable =>
            {
                crate::print_out(&format!("{job}\n"))?;
                Ok(0)
            }
            Response::Submitted { job } | Response::SubmittedArray { first: job, .. } if batch => {
                crate::print_out(&format!("Submitted batch job {job}\n"))?;
                Ok(0)
            }
            Response::Submitted { job } => {
                crate::print_out(&format!("Submitted job {job}\n"))?;
                Ok(0)
            }
            Response::SubmittedArray { first, tasks } => {
                let last = first + u64::from(tasks) - 1;
                crate::print_out(&format!(
                    "Submitted array job {first} ({tasks} tasks: jobs {first}-{last})\n"
                ))?;
                Ok(0)
            }
            other => bail!("unexpected answer from the server: {other:?}"),
        };
    }
    // Signal handlers before submitting, so an early Ctrl-C is not lost.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Under nohup SIGHUP is ignored, and must stay so: the job should outlive the terminal.
    let mut sighup = if sighup_ignored() {
        None
    } else {
        Some(signal(SignalKind::hangup())?)
    };
    client.send(&Request::Submit(request)).await?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut job = None;
    let mut was_pending = false;
    // Whether the job has processes: a Ctrl-C before that has nothing to wait for.
    let mut started = false;
    let mut cancelling = false;
    // The exit code a signal that cancelled the job asks for (as a shell's 128 + signal):
    // srun interrupted does not exit 0, whatever the job's trap does.
    let mut interrupted: Option<i32> = None;
    // How far into the job's log we have its output: where to resume after a reconnect.
    let mut log_pos = 0u64;
    let mut output_broken = false;
    loop {
        let frame = tokio::select! {
            f = client.recv() => match f {
                Ok(f) => f,
                // Before the job is accepted, the server's refusal is the answer.
                Err(e) if job.is_none() => return Err(e),
                Err(_) => None,
            },
            _ = sigint.recv() => { cancel(&mut client, job, started, &mut cancelling, &mut interrupted, 130).await; continue; }
            _ = sigterm.recv() => { cancel(&mut client, job, started, &mut cancelling, &mut interrupted, 143).await; continue; }
            _ = hangup(&mut sighup) => { cancel(&mut client, job, started, &mut cancelling, &mut interrupted, 129).await; continue; }
            _ = window_changed(&mut pty) => continue,
        };
        let Some(frame) = frame else {
            // The server went away (restart or crash): the job lives on under its supervisor.
            let Some(id) = job else {
                bail!("lost the connection to the mgpu server before it accepted the job");
            };
            eprintln!("mgpu_srun: lost the connection to the mgpu server; reconnecting to follow job {id}");
            let mut refused: Option<String> = None;
            client = loop {
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
                    _ = sigint.recv() => { cancelling = true; interrupted.get_or_insert(130); }
                    _ = sigterm.recv() => { cancelling = true; interrupted.get_or_insert(143); }
                    _ = hangup(&mut sighup) => { cancelling = true; interrupted.get_or_insert(129); }
                }
                if let Ok(mut c) = Client::connect(socket.as_deref(), "mgpu_srun").await {
                    let attach = Request::Attach(AttachRequest {
                        job: id,
                        log_offset: log_pos,
                    });
                    if c.send(&attach).await.is_ok() {
                        match c.welcome().await {
                            Ok(()) => {
                                if cancelling {
                                    let _ = c.send(&Request::CancelAttached).await;
                                }
                                break c;
                            }
                            // A server that refuses us: say why (once), and keep trying.
                            Err(e) => {
                                let why = format!("{e:#}");
                                if refused.as_ref() != Some(&why) {
                                    eprintln!("mgpu_srun: the server refused to reconnect: {why}");
                                    refused = Some(why);
                                }
                            }
                        }
                    }
                }
            };
            eprintln!("mgpu_srun: reconnected; following job {id}");
            continue;
        };
        match frame {
            Frame::Stdout(data) => {
                log_pos += data.len() as u64;
                if !output_broken && write_out(&mut stdout, &data).await.is_err() {
                    // Nobody reads us any more (closed terminal or pipe): like Ctrl-C, quietly
                    // (`mgpu_srun ... | head`), ending as a process killed by SIGPIPE would.
                    output_broken = true;
                    quiet_cancel(&mut client, &mut cancelling, &mut interrupted).await;
                }
            }
            Frame::Stderr(data) => {
                log_pos += data.len() as u64;
                if !output_broken && write_out(&mut stderr, &data).await.is_err() {
                    output_broken = true;
                    quiet_cancel(&mut client, &mut cancelling, &mut interrupted).await;
                }
            }
            Frame::Control(_) => match frame.parse::<Response>()? {
                Response::Submitted { job: id } => job = Some(id),
                Response::Pending {
                    job: id,
                    position,
                    reason,
                } => {
                    was_pending = true;
                    if position == 0 {
                        eprintln!("mgpu_srun: job {id} waits: {reason}");
                    } else {
                        eprintln!("mgpu_srun: job {id} queued (position {position}): {reason}");
                    }
                }
                Response::Started {
                    job: id,
                    gpus,
                    log_offset,
                } => {
                    log_pos = log_offset;
                    started = true;
                    if was_pending {
                        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
                        eprintln!("mgpu_srun: job {id} started on GPU {}", list.join(","));
                    }
                    if pty.is_some() && raw.is_none() {
                        raw = Some(RawMode::enter()?);
                    }
                }
                Response::StdinPipe => {
                    let Some(pipe) = client.take_fd() else {
                        bail!("the server did not pass the job's stdin pipe");
                    };
                    match &mut pty {
                        Some(relay) => relay.start(pipe),
                        None => copy_stdin(pipe),
                    }
                }
                Response::Notice { message } => eprintln!("mgpu_srun: {message}"),
                Response::Finished(outcome) => {
                    let _ = stdout.flush().await;
                    // The terminal as it was before our messages.
                    drop(raw.take());
                    let cancelled = outcome.state == mgpu_core::JobState::Cancelled;
                    if cancelled && cancelling {
                        // Ours: the server's words ("cancelled by root") would only confuse.
                        if !output_broken {
                            eprintln!("mgpu_srun: job {} cancelled", outcome.job);
                        }
                    } else if let Some(msg) = &outcome.message {
                        if !output_broken {
                            eprintln!(
                                "mgpu_srun: job {} {}: {msg}",
                                outcome.job,
                                outcome.state.as_str()
                            );
                        }
                    } else if cancelled && !output_broken {
                        eprintln!("mgpu_srun: job {} cancelled", outcome.job);
                    } else if outcome.state == mgpu_core::JobState::OutOfMemory {
                        eprintln!(
                            "mgpu_srun: job {} went over its host memory limit and was killed (OUT_OF_MEMORY)",
                            outcome.job
                        );
                    } else if outcome.state == mgpu_core::JobState::Timeout {
                        eprintln!(
                            "mgpu_srun: job {} reached its time limit (TIMEOUT)",
                            outcome.job
                        );
                    }
                    // An interrupted srun exits as the signal asks (130 for Ctrl-C), whatever
                    // the job's end made of it (143 from the SIGTERM it got, a trap's 0).
                    return Ok(interrupted.unwrap_or_else(|| outcome.shell_code()));
                }
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected message from the server: {other:?}"),
            },
        }
    }
}

/// Bytes of `value` as JSON, counted without building it.
fn json_size(value: &impl serde::Serialize) -> Result<usize> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value)?;
    Ok(count.0)
}

async fn write_out(w: &mut (impl AsyncWriteExt + Unpin), data: &[u8]) -> std::io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}

/// Resolves once the terminal's size changed and the job's terminal was told; never without
/// `--pty`.
async fn window_changed(pty: &mut Option<PtyRelay>) {
    match pty {
        Some(relay) => {
            relay.winch.recv().await;
            relay.send_size();
        }
        None => std::future::pending().await,
    }
}

/// Copies our stdin into the job's stdin pipe (`pipe`, its write end, from the server), in a
/// thread of its own, and closes it at the end of our input: the job sees its end then. A job
/// that does not read makes this thread wait (the pipe's buffer is the kernel's); one that
/// ended makes it stop. When we go away, the pipe closes and the job sees the end.
fn copy_stdin(pipe: std::os::fd::OwnedFd) {
    std::thread::spawn(move || {
        let mut to = std::fs::File::from(pipe);
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut to);
    });
}

/// `--pty`: our terminal's keystrokes and size, to the job's terminal, through the job's stdin
/// pipe (made by the server; the job's supervisor relays it into the job's terminal): a thread
/// copies our stdin into it as [`mgpu_proto::pty_frame`]s.
struct PtyRelay {
    /// The pipe's write end, once the server passed it.
    near: std::sync::Arc<std::sync::Mutex<Option<std::fs::File>>>,
    winch: tokio::signal::unix::Signal,
}

impl PtyRelay {
    fn new() -> Result<PtyRelay> {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            bail!(
                "--pty needs a terminal on stdin (without --pty, piped input is the job's stdin)"
            );
        }
        Ok(PtyRelay {
            near: std::sync::Arc::default(),
            winch: signal(SignalKind::window_change())?,
        })
    }

    /// Our terminal's size: rows, columns.
    fn size(&self) -> [u16; 2] {
        // SAFETY: TIOCGWINSZ fills the winsize we own.
        unsafe {
            let mut ws: libc::winsize = std::mem::zeroed();
            libc::ioctl(0, libc::TIOCGWINSZ, &mut ws);
            [ws.ws_row, ws.ws_col]
        }
    }

    /// The job's stdin pipe came: start copying keystrokes into it (the size first, in case it
    /// changed since the submission).
    fn start(&mut self, pipe: std::os::fd::OwnedFd) {
        *self.near.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::fs::File::from(pipe));
        self.send_size();
        let near = self.near.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut buf = [0u8; 4096];
            let mut input = std::io::stdin().lock();
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let frame = mgpu_proto::pty_frame(0, &buf[..n]);
                let mut out = near.lock().unwrap_or_else(|p| p.into_inner());
                match out.as_mut().map(|f| f.write_all(&frame)) {
                    Some(Ok(())) => {}
                    // The job is gone: no more keystrokes for it.
                    _ => {
                        *out = None;
                        return;
                    }
                }
            }
        });
    }

    fn send_size(&self) {
        use std::io::Write;
        let [rows, cols] = self.size();
        let mut data = rows.to_be_bytes().to_vec();
        data.extend_from_slice(&cols.to_be_bytes());
        let frame = mgpu_proto::pty_frame(1, &data);
        if let Some(f) = self.near.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = f.write_all(&frame);
        }
    }
}

/// Our terminal in raw mode (keystrokes, Ctrl-C included, go to the job as typed) until
/// dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with termios structs we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                bail!(
                    "cannot read the terminal's settings: {}",
                    std::io::Error::last_os_error()
                );
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
            Ok(RawMode(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

/// Resolves on SIGHUP, or never when we do not listen for it.
async fn hangup(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Was SIGHUP ignored when we started (nohup)?
fn sighup_ignored() -> bool {
    // SAFETY: querying the current disposition into a zeroed struct.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

async fn cancel(
    client: &mut Client,
    job: Option<u64>,
    started: bool,
    cancelling: &mut bool,
    interrupted: &mut Option<i32>,
    code: i32,
) {
    interrupted.get_or_insert(code);
    let what = job.map_or("the job".to_string(), |j| format!("job {j}"));
    if !*cancelling {
        *cancelling = true;
        if started {
            eprintln!("mgpu_srun: cancelling {what}; waiting for its processes to end");
        } else {
            eprintln!("mgpu_srun: cancelling {what} (it has not started)");
        }
        // If the server is away, the request is sent again after reconnecting.
        let _ = client.send(&Request::CancelAttached).await;
    } else if !started {
        eprintln!("mgpu_srun: still waiting for the server to confirm that {what} is cancelled");
    } else {
        // Asked again: say what we wait for (the job's processes still run their exit
        // handlers; the server kills what is left after its grace period).
        eprintln!(
            "mgpu_srun: still waiting for {what} to end: its processes got SIGTERM and get SIGKILL after the server's grace period (mgpu_queue -j {} shows it)",
            job.map_or("ID".to_string(), |j| j.to_string())
        );
    }
}

/// Cancels the job without a word: our output is gone.
async fn quiet_cancel(client: &mut Client, cancelling: &mut bool, interrupted: &mut Option<i32>) {
    interrupted.get_or_insert(141);
    if !*cancelling {
        *cancelling = true;
        let _ = client.send(&Request::CancelAttached).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{begin_at, parse_gres, parse_warn_signal};

    #[test]
    fn gres_lists_are_read_entry_by_entry() {
        let gpus = |t: &str| parse_gres(t).map(|g| (g.gpus, g.ignored_type));
        assert_eq!(gpus("gpu"), Ok((1, None)));
        assert_eq!(gpus("gpu:2"), Ok((2, None)));
        assert_eq!(gpus("gpu:a100:3"), Ok((3, Some("a100".into()))));
        assert_eq!(gpus("gpu:a100"), Ok((1, Some("a100".into()))));
        // What mgpu cannot honour is refused, named, never taken for a GPU type.
        for (text, says) in [
            ("gpu:2,shard:1", "'shard:1' cannot be honoured"),
            ("shard:1", "'shard:1' cannot be honoured"),
            ("gpu:1,mps:50", "'mps:50' cannot be honoured"),
            ("gpu:1,gpu:v100:1", "more than one gpu entry"),
            ("gpu:2,", "mgpu knows only GPUs"),
            ("gpu:a:b:c", "mgpu knows only GPUs"),
            ("gpu:t:+2", "mgpu knows only GPUs"),
            ("", "mgpu knows only GPUs"),
        ] {
            let err = parse_gres(text).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid --gres '{text}'")) && err.contains(says),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn begin_times_like_slurm() {
        let now = 1_700_000_000;
        assert_eq!(begin_at("now", now), Ok(now));
        assert_eq!(begin_at("now+90", now), Ok(now + 90));
        assert_eq!(begin_at("now+3seconds", now), Ok(now + 3));
        assert_eq!(begin_at("now+2hours", now), Ok(now + 7200));
        assert_eq!(begin_at("NOW+1day", now), Ok(now + 86400));
        assert_eq!(begin_at("now+1w", now), Ok(now + 7 * 86400));
        // A time of day is in the next 24 hours; a date at its midnight or given time.
        let t = begin_at("16:00", now).unwrap();
        assert!(t > now && t <= now + 86400, "{t}");
        assert_eq!(begin_at("teatime", now), Ok(t));
        let d = begin_at("2030-01-02T03:04:05", now).unwrap();
        assert_eq!(begin_at("2030-01-02T03:04", now), Ok(d - 5));
        assert_eq!(begin_at("2030-01-02", now), Ok(d - 3 * 3600 - 4 * 60 - 5));
        for bad in [
            "soon",
            "now-5",
            "now+5parsecs",
            "25:00",
            "2030-13-01",
            "1/2/30",
        ] {
            assert!(begin_at(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn warn_signals() {
        let s = parse_warn_signal("USR1@30").unwrap();
        assert_eq!((s.signal, s.secs_before), (libc::SIGUSR1, 30));
        let s = parse_warn_signal("B:SIGTERM").unwrap();
        assert_eq!((s.signal, s.secs_before), (libc::SIGTERM, 60));
        assert_eq!(parse_warn_signal("10@5").unwrap().signal, 10);
        assert!(parse_warn_signal("NOPE@1").is_err());
        assert!(parse_warn_signal("USR1@x").is_err());
    }
}
