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
#[derive(Debug, Parser)]
#[command(name = "mgpu_srun", version, verbatim_doc_comment)]
pub struct Args {
    /// Number of GPUs
    #[arg(short = 'G', long, default_value_t = 1)]
    pub gpus: u32,
    /// GPU memory needed on each of its GPUs, in MiB (or with a unit: 10G). With it, jobs may
    /// share a GPU; without it the job gets its GPUs exclusively
    #[arg(long, value_name = "MIB", value_parser = parse_mem_mib)]
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
    /// ends as OUT_OF_MEMORY [default: the server's --default-host-mem]
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
    /// Job name [default: the command's name]
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
    /// Print the job id and return at once instead of waiting for the job (no short form:
    /// Slurm's -d is --dependency)
    #[arg(long)]
    pub detach: bool,
    /// With --detach or --array: print only the job id (the array's id)
    #[arg(long)]
    pub parsable: bool,
    /// Submit a job array: one task per index, e.g. 0-99, 1,3,5-9 or 0-99:5 (every 5th); with
    /// %N (0-99%4) at most N tasks wait or run at once. Each task is a job of its own, with
    /// MGPU_ARRAY_TASK_ID set to its index; implies --detach
    #[arg(short = 'a', long, value_name = "SPEC", value_parser = mgpu_proto::parse_array_spec)]
    pub array: Option<ArraySpec>,
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

/// A parsed `--mail-type`: BEGIN, END, FAIL.
#[derive(Debug, Clone)]
pub struct MailTypes(pub Vec<String>);

/// A parsed `--time-limit`: `None` is no limit.
#[derive(Debug, Clone, Copy)]
pub struct TimeLimit(pub Option<u64>);

pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            if let Some(message) = unknown_option_message(&e) {
                eprintln!("mgpu_srun: error: {message}");
                return ExitCode::from(2);
            }
            e.exit()
        }
    };
    crate::run_main("mgpu_srun", run(args))
}

/// For an unknown option, one line naming it, and for a Slurm flag mgpu does not take (yet),
/// what to use instead. `None` for other errors (clap's own message says it best).
fn unknown_option_message(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
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
    if let Some(hint) = slurm_flag_hint(flag) {
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
    Some(format!(
        "unknown option '{word}'{suggestion}; the command goes after --, e.g. mgpu_srun --gpus 1 -- python train.py (see mgpu_srun --help)"
    ))
}

/// What to say about a Slurm `srun`/`sbatch` flag that mgpu_srun does not take.
pub fn slurm_flag_hint(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "-d" => "-d is Slurm's --dependency, not supported yet; use --detach to return at once",
        "--dependency" => "Slurm's --dependency is not supported yet",
        "--gres" | "--gpus-per-task" | "--gpus-per-node" | "--tres-per-task" => {
            "not supported yet; use --gpus N (-G N)"
        }
        "--mem-per-gpu" => {
            "not supported yet; use --mem SIZE (mgpu's --mem is GPU memory on each of the job's GPUs)"
        }
        "--mem-per-cpu" => "not supported; use --host-mem SIZE for the job's host memory (RAM)",
        "-o" | "--output" | "-e" | "--error" => {
            "not supported yet: the server keeps the job's output; read it with mgpu_log ID (an attached mgpu_srun prints it live)"
        }
        "-i" | "--input" => "not needed: redirect into mgpu_srun (mgpu_srun -- cmd < FILE); an attached job's stdin is srun's",
        "--export" => "not supported yet: the job gets your whole environment (as --export=ALL)",
        "--begin" | "--hold" => "not supported yet: a job is queued at once",
        "--wrap" => "not supported yet; put the command after --: mgpu_srun -- sh -c '...'",
        "-p" | "--partition" | "-q" | "--qos" | "-A" | "--account" | "--reservation" => {
            "mgpu has no partitions, QOS, accounts or reservations; leave it out"
        }
        "-N" | "--nodes" | "-w" | "--nodelist" | "-x" | "--exclude" | "-C" | "--constraint" => {
            "mgpu runs jobs on this one machine; leave it out"
        }
        "-n" | "--ntasks" | "--ntasks-per-node" => {
            "not supported: a job is one command; use -c N for CPUs and --gpus N for GPUs"
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

/// How much of a script is read to look for `#SBATCH` lines.
const SBATCH_SCAN_BYTES: u64 = 64 << 10;

/// The script the job runs, when it has `#SBATCH` lines at its top (which mgpu_srun does not
/// read): the command's first word (looked up in $PATH when it has no `/`, as the job would), or
/// the script a shell is given (`bash train.sh`). Read with our own rights, at most 64 KiB, and
/// only from a regular file (never blocks on a FIFO).
fn sbatch_script(command: &[String], cwd: &str) -> Option<PathBuf> {
    let first = command.first()?;
    let cwd = std::path::Path::new(cwd);
    let shell = std::path::Path::new(first)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| matches!(n, "sh" | "bash" | "dash" | "zsh" | "ksh"));
    let path = if shell {
        let script = command.get(1).filter(|a| !a.starts_with('-'))?;
        cwd.join(script)
    } else if first.contains('/') {
        cwd.join(first)
    } else {
        let path_var = std::env::var_os("PATH")?;
        std::env::split_paths(&path_var)
            .map(|dir| cwd.join(dir).join(first))
            .find(|p| p.is_file())?
    };
    has_sbatch_lines(&path).then_some(path)
}

/// Whether the file's directive block (after `#!`, through comments and blank lines, as sbatch
/// reads it) has an `#SBATCH` line.
fn has_sbatch_lines(path: &std::path::Path) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    else {
        return false;
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut head = Vec::new();
    if file.take(SBATCH_SCAN_BYTES).read_to_end(&mut head).is_err() {
        return false;
    }
    for line in String::from_utf8_lossy(&head).lines() {
        let line = line.trim_start();
        if line.starts_with("#SBATCH") {
            return true;
        }
        if !(line.is_empty() || line.starts_with('#')) {
            break;
        }
    }
    false
}

/// Our umask, from /proc (reading it with umask(2) would change it).
fn current_umask() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
}

fn utf8(s: OsString, what: &str) -> Result<String> {
    s.into_string()
        .map_err(|s| anyhow::anyhow!("{what} is not valid UTF-8: {}", s.to_string_lossy()))
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

fn build_request(args: Args) -> Result<SubmitRequest> {
    if args.command.is_empty() {
        bail!("no command given: put it after --, e.g. mgpu_srun --gpus 1 -- python train.py");
    }
    let cwd = match &args.chdir {
        Some(d) => usable_dir(d)?,
        None => usable_dir(&std::env::current_dir().context("reading the current directory")?)?,
    };
    let venv = if args.no_venv {
        Venv::Off
    } else if let Some(v) = &args.venv {
        let abs =
            std::fs::canonicalize(v).with_context(|| format!("cannot use venv {}", v.display()))?;
        if !abs.join("bin/activate").is_file() {
            bail!("{} is not a venv: it has no bin/activate", abs.display());
        }
        Venv::Dir(utf8(abs.into_os_string(), "the venv path")?)
    } else {
        Venv::Auto
    };
    let command = args
        .command
        .into_iter()
        .map(|a| utf8(a, "an argument"))
        .collect::<Result<Vec<_>>>()?;
    // Like Slurm's --export=ALL; variables that are not UTF-8 cannot be carried.
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    Ok(SubmitRequest {
        name: args.job_name,
        gpus: args.gpus,
        mem_mib: args.mem,
        time_limit_s: args.time_limit.and_then(|t| t.0),
        command,
        cwd: utf8(cwd.into_os_string(), "the working directory")?,
        env,
        venv,
        attach: !args.detach && args.array.is_none(),
        umask: current_umask(),
        no_requeue: args.no_requeue,
        max_restarts: args.max_restarts,
        signal: args.signal,
        nice: args.nice,
        cpus: args.cpus,
        host_mem_mib: args.host_mem,
        // Filled in by `run` (only an attached job's stdin is the user's).
        stdin: false,
        pty: None,
        notify: notify_request(args.notify, args.mail_type.map(|m| m.0), args.mail_user)
            .map(Box::new),
        array_limit: args.array.as_ref().and_then(|a| a.limit),
        array: args.array.map(|a| a.indices),
    })
}

async fn run(args: Args) -> Result<i32> {
    let socket = args.socket.clone();
    let pty_wanted = args.pty;
    let (detach, parsable) = (args.detach || args.array.is_some(), args.parsable);
    if parsable && !detach {
        bail!("--parsable goes with --detach or --array");
    }
    let request = build_request(args)?;
    // The server reads at most this much of a submit; say so here, with the figures.
    let size = json_size(&request)? + r#""type":"submit","#.len() + 1;
    if size > mgpu_proto::MAX_SUBMIT_FRAME {
        bail!(
            "the job's command and environment take {} KiB as sent, more than the server accepts ({} MiB); unset large environment variables or pass data in files",
            size >> 10,
            mgpu_proto::MAX_SUBMIT_FRAME >> 20
        );
    }
    if let Some(script) = sbatch_script(&request.command, &request.cwd) {
        eprintln!(
            "mgpu_srun: warning: {} has #SBATCH lines; mgpu_srun ignores them (sbatch support comes later): give those options on the command line",
            script.display()
        );
    }
    let mut request = request;
    // --pty: keystrokes go to the job's terminal through a socket pair whose far end is passed
    // as the job's stdin (see `PtyRelay`).
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
    // What is piped or redirected into an attached srun is the job's stdin (passed to the
    // server as a descriptor; the job reads it directly). A terminal is not: the job's stdin is
    // then /dev/null (--pty gives a terminal).
    request.stdin = pty.is_some() || (!detach && stdin_is_real_input());
    let mut client = Client::connect(socket.as_deref(), "mgpu_srun").await?;
    if detach {
        return match client.call(&Request::Submit(request)).await? {
            Response::Submitted { job } => {
                if parsable {
                    crate::print_out(&format!("{job}\n"))?;
                } else {
                    crate::print_out(&format!("Submitted job {job}\n"))?;
                }
                Ok(0)
            }
            Response::SubmittedArray { first, tasks } => {
                if parsable {
                    crate::print_out(&format!("{first}\n"))?;
                } else {
                    let last = first + u64::from(tasks) - 1;
                    crate::print_out(&format!(
                        "Submitted array job {first} ({tasks} tasks: jobs {first}-{last})\n"
                    ))?;
                }
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
            _ = sigint.recv() => { cancel(&mut client, job, &mut cancelling, &mut interrupted, 130).await; continue; }
            _ = sigterm.recv() => { cancel(&mut client, job, &mut cancelling, &mut interrupted, 143).await; continue; }
            _ = hangup(&mut sighup) => { cancel(&mut client, job, &mut cancelling, &mut interrupted, 129).await; continue; }
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
                    eprintln!("mgpu_srun: job {id} queued (position {position}): {reason}");
                }
                Response::Started {
                    job: id,
                    gpus,
                    log_offset,
                } => {
                    log_pos = log_offset;
                    if was_pending {
                        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
                        eprintln!("mgpu_srun: job {id} started on GPU {}", list.join(","));
                    }
                    if pty.is_some() && raw.is_none() {
                        raw = Some(RawMode::enter()?);
                    }
                }
                Response::SendStdin => match &mut pty {
                    Some(relay) => {
                        client.send_fd(relay.far_end()?).await?;
                        relay.start()?;
                    }
                    None => client.send_fd(0).await?,
                },
                Response::Notice { message } => eprintln!("mgpu_srun: {message}"),
                Response::Finished(outcome) => {
                    let _ = stdout.flush().await;
                    // The terminal as it was before our messages.
                    drop(raw.take());
                    if let Some(msg) = &outcome.message {
                        if !output_broken
                            && (outcome.state != mgpu_core::JobState::Cancelled || !cancelling)
                        {
                            eprintln!(
                                "mgpu_srun: job {} {}: {msg}",
                                outcome.job,
                                outcome.state.as_str()
                            );
                        }
                    } else if outcome.state == mgpu_core::JobState::Cancelled && !output_broken {
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
                    return Ok(match interrupted {
                        Some(141) => 141,
                        Some(code) if outcome.shell_code() == 0 => code,
                        _ => outcome.shell_code(),
                    });
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

/// `--pty`: our terminal's keystrokes and size, to the job's terminal. A socket pair: its far
/// end goes to the server as the job's stdin (the job's supervisor relays it into the job's
/// terminal); a thread copies our stdin into the near end as [`mgpu_proto::pty_frame`]s.
struct PtyRelay {
    near: std::sync::Arc<std::sync::Mutex<std::os::unix::net::UnixStream>>,
    far: Option<std::os::unix::net::UnixStream>,
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
        let (near, far) = std::os::unix::net::UnixStream::pair()?;
        Ok(PtyRelay {
            near: std::sync::Arc::new(std::sync::Mutex::new(near)),
            far: Some(far),
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

    fn far_end(&self) -> Result<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.far
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| anyhow::anyhow!("the terminal was already passed"))
    }

    /// The far end has been passed: close ours, and start copying keystrokes.
    fn start(&mut self) -> Result<()> {
        self.far = None;
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
                if out.write_all(&frame).is_err() {
                    return;
                }
            }
        });
        Ok(())
    }

    fn send_size(&self) {
        use std::io::Write;
        let [rows, cols] = self.size();
        let mut data = rows.to_be_bytes().to_vec();
        data.extend_from_slice(&cols.to_be_bytes());
        let frame = mgpu_proto::pty_frame(1, &data);
        let _ = self
            .near
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&frame);
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
    cancelling: &mut bool,
    interrupted: &mut Option<i32>,
    code: i32,
) {
    interrupted.get_or_insert(code);
    let what = job.map_or("the job".to_string(), |j| format!("job {j}"));
    if !*cancelling {
        *cancelling = true;
        eprintln!("mgpu_srun: cancelling {what}; waiting for its processes to end");
        // If the server is away, the request is sent again after reconnecting.
        let _ = client.send(&Request::CancelAttached).await;
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
    use super::parse_warn_signal;

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
