//! `mgpu_sbatch`: submit a batch script, like Slurm's `sbatch`. The script is read here, as
//! the user, and its content travels with the job: the job runs a copy, so changing the file
//! after submitting changes nothing. `#SBATCH` and `#MGPU` lines at its top (before the first
//! line that is neither blank nor a comment, as sbatch reads them) set options; the command
//! line wins. In an `#SBATCH` line `--mem` has Slurm's meaning (host memory, mgpu's
//! `--host-mem`); in an `#MGPU` line and on the command line it is mgpu's (GPU memory per GPU).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args as _, Parser};

use crate::srun::{build_request, exit_parse_error, unknown_option_message, JobOpts, Submission};

/// Submit a batch script to the mgpu scheduler; returns at once ("Submitted batch job N").
/// Its output goes to slurm-%j.out (slurm-%A_%a.out for an array) in the job's working
/// directory unless -o says otherwise (-o /dev/null: none), and to the server's log (mgpu_log).
///
/// Options come from the command line and from #SBATCH / #MGPU lines at the script's top (the
/// command line wins). The job runs a copy of the script taken now. In #SBATCH lines --mem is
/// Slurm's host memory (mgpu's --host-mem); in #MGPU lines and here it is GPU memory per GPU.
///
/// Examples:
///   mgpu_sbatch train.sh --lr 3e-4
///   mgpu_sbatch --gres=gpu:2 -t 2:00:00 -o train-%j.out train.sh
///   mgpu_sbatch --array 0-9 -J sweep sweep.sh
///   mgpu_sbatch --wrap "python train.py"
///   mgpu_sbatch < job.sh
#[derive(Debug, Parser)]
#[command(
    name = "mgpu_sbatch",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
pub struct Args {
    #[command(flatten)]
    pub opts: JobOpts,
    /// Run CMD with sh -c instead of a script (Slurm's --wrap)
    #[arg(long, value_name = "CMD")]
    pub wrap: Option<String>,
    /// Print only the job id (an array's id)
    #[arg(long)]
    pub parsable: bool,
    /// Server socket [default: $MGPU_SOCKET, else /run/mgpu/mgpu.sock, or your own server's in $XDG_RUNTIME_DIR/mgpu]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The script (read from stdin when absent and stdin is not a terminal) and its arguments
    #[arg(trailing_var_arg = true, value_name = "SCRIPT [ARGS]")]
    pub script: Vec<OsString>,
}

/// One directive line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// 1-based line number in the script.
    pub line: usize,
    /// `#SBATCH` or `#MGPU`.
    pub slurm: bool,
    pub words: Vec<String>,
}

/// Reads a script with our own rights: a regular file (never blocks on a FIFO), at most
/// [`mgpu_proto::MAX_SCRIPT_BYTES`], UTF-8.
pub fn read_script(path: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        bail!("{} is not a regular file", path.display());
    }
    read_bounded(file, &path.display().to_string())
}

/// The first `limit` bytes of a regular file (read as [`read_script`] does), as text.
pub fn read_head(path: &Path, limit: u64) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return None;
    }
    let mut head = Vec::new();
    file.take(limit).read_to_end(&mut head).ok()?;
    Some(String::from_utf8_lossy(&head).into_owned())
}

fn read_bounded(r: impl std::io::Read, what: &str) -> Result<String> {
    use std::io::Read;
    let mut data = Vec::new();
    r.take(mgpu_proto::MAX_SCRIPT_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {what}"))?;
    if data.len() > mgpu_proto::MAX_SCRIPT_BYTES {
        bail!(
            "{what} is larger than {} KiB, the most a batch script may be; keep data in files the script reads",
            mgpu_proto::MAX_SCRIPT_BYTES >> 10
        );
    }
    String::from_utf8(data).map_err(|_| anyhow::anyhow!("{what} is not valid UTF-8 text"))
}

/// The `#SBATCH` / `#MGPU` lines at the top of `text`: after the `#!` line, through comments
/// and blank lines, up to the first command (later ones are ignored, as by sbatch).
pub fn directives(text: &str) -> Result<Vec<Directive>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if i == 0 && t.starts_with("#!") {
            continue;
        }
        if t.is_empty() {
            continue;
        }
        if !t.starts_with('#') {
            break;
        }
        let (slurm, rest) = if let Some(r) = t.strip_prefix("#SBATCH") {
            (true, r)
        } else if let Some(r) = t.strip_prefix("#MGPU") {
            (false, r)
        } else {
            continue;
        };
        // `#SBATCHX` is a comment; `#SBATCH` alone is an empty directive.
        if !(rest.is_empty() || rest.starts_with(char::is_whitespace)) {
            continue;
        }
        let words = split_words(rest).with_context(|| format!("line {}", i + 1))?;
        out.push(Directive {
            line: i + 1,
            slurm,
            words,
        });
    }
    Ok(out)
}

/// Splits a directive's options like a shell would (quotes, backslashes); an unquoted word
/// starting with `#` ends it (a comment).
fn split_words(text: &str) -> Result<Vec<String>> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            '#' if cur.is_none() => break,
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => bail!("unclosed ' quote"),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => w.push(c),
                            None => bail!("unclosed \" quote"),
                        },
                        Some(c) => w.push(c),
                        None => bail!("unclosed \" quote"),
                    }
                }
            }
            '\\' => {
                if let Some(c) = chars.next() {
                    cur.get_or_insert_with(String::new).push(c);
                }
            }
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = cur {
        words.push(w);
    }
    Ok(words)
}

/// `#SBATCH --mem SIZE` is Slurm's host memory: mgpu's `--host-mem`.
fn slurm_meaning(words: &[String]) -> (Vec<String>, bool) {
    let mut changed = false;
    let words = words
        .iter()
        .map(|w| {
            if w == "--mem" {
                changed = true;
                "--host-mem".to_string()
            } else if let Some(v) = w.strip_prefix("--mem=") {
                changed = true;
                format!("--host-mem={v}")
            } else {
                w.clone()
            }
        })
        .collect();
    (words, changed)
}

/// The options the directives of `text` give, checked line by line (an error names the
/// line), as words to put before the command line's.
pub fn directive_words(prog: &'static str, name: &str, text: &str) -> Result<Vec<OsString>> {
    let dirs = directives(text).with_context(|| name.to_string())?;
    let mut out = Vec::new();
    for d in dirs {
        let (words, host_mem) = if d.slurm {
            slurm_meaning(&d.words)
        } else {
            (d.words.clone(), false)
        };
        let check = JobOpts::augment_args(
            clap::Command::new(prog)
                .no_binary_name(true)
                .args_override_self(true),
        );
        if let Err(e) = check.try_get_matches_from(&words) {
            let why = unknown_option_message(prog, &e).unwrap_or_else(|| {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or_default();
                first.strip_prefix("error: ").unwrap_or(first).to_string()
            });
            bail!(
                "{name} line {} ({}): {why}",
                d.line,
                if d.slurm { "#SBATCH" } else { "#MGPU" }
            );
        }
        if host_mem {
            eprintln!(
                "{prog}: note: {name} line {}: #SBATCH --mem is host memory (RAM), as in Slurm: the job gets it as --host-mem; GPU memory per GPU is --mem-per-gpu (or --mem in an #MGPU line)",
                d.line
            );
        }
        out.extend(words.into_iter().map(OsString::from));
    }
    Ok(out)
}

/// The directives of the script at `path` (see [`directive_words`]).
pub fn script_directives(prog: &'static str, path: &Path) -> Result<Vec<OsString>> {
    let text = read_script(path)?;
    directive_words(prog, &path.display().to_string(), &text)
}

pub fn main() -> ExitCode {
    let prog = "mgpu_sbatch";
    let argv: Vec<OsString> = std::env::args_os().collect();
    let args = match Args::try_parse_from(&argv) {
        Ok(args) => args,
        Err(e) => exit_parse_error(prog, e),
    };
    match prepare(args, &argv) {
        Ok(sub) => crate::run_main(prog, crate::srun::run(sub)),
        Err(e) => {
            eprintln!("{prog}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Reads the script and its directives, and builds the submission.
fn prepare(args: Args, argv: &[OsString]) -> Result<Submission> {
    let prog = "mgpu_sbatch";
    if let Some(wrap) = &args.wrap {
        if !args.script.is_empty() {
            bail!("--wrap runs its command instead of a script: give one or the other");
        }
        let mut opts = args.opts;
        opts.job_name.get_or_insert_with(|| "wrap".to_string());
        default_output(&mut opts);
        let command = vec!["sh".into(), "-c".into(), wrap.into()];
        return Ok(Submission {
            request: build_request(opts, command, false, None)?,
            detach: true,
            parsable: args.parsable,
            socket: args.socket,
            batch: true,
            pty: false,
        });
    }
    let (command, name, text) = match args.script.first() {
        Some(path) => {
            let p = Path::new(path);
            let text = read_script(p)?;
            let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "script".into());
            let mut command = vec![abs.into_os_string()];
            command.extend(args.script[1..].iter().cloned());
            (command, name, text)
        }
        None => {
            use std::io::IsTerminal;
            if std::io::stdin().is_terminal() {
                bail!(
                    "no script given: mgpu_sbatch SCRIPT [ARGS], mgpu_sbatch --wrap \"CMD\", or the script on stdin (mgpu_sbatch < job.sh)"
                );
            }
            let text = read_bounded(std::io::stdin().lock(), "the script on stdin")?;
            if text.is_empty() {
                bail!(
                    "no script given (stdin is empty): mgpu_sbatch SCRIPT [ARGS], mgpu_sbatch --wrap \"CMD\", or mgpu_sbatch < job.sh"
                );
            }
            (vec![OsString::from("sbatch")], "sbatch".to_string(), text)
        }
    };
    if !text.starts_with("#!") {
        bail!(
            "{name} does not look like a batch script: its first line must start with #! followed by the path to an interpreter (e.g. #!/bin/bash); or use --wrap \"CMD\""
        );
    }
    // As sbatch: the shell would take each line's '\r' as part of its last word, and fail
    // only when the job runs, cryptically ("$'\r': command not found").
    if text.contains("\r\n") {
        let (what, fix) = if args.script.is_empty() {
            (
                "the script on stdin".to_string(),
                "dos2unix < job.sh > fixed.sh".to_string(),
            )
        } else {
            (name.clone(), format!("dos2unix {name}"))
        };
        bail!(
            "{what}: the batch script contains DOS line breaks (\\r\\n) instead of the expected UNIX line breaks (\\n); convert it first, e.g. with '{fix}'"
        );
    }
    // The directives first: the command line (after them) wins.
    let extra = directive_words(prog, &name, &text)?;
    let args = if extra.is_empty() {
        args
    } else {
        let mut all = vec![argv[0].clone()];
        all.extend(extra);
        all.extend(argv[1..].iter().cloned());
        match Args::try_parse_from(all) {
            Ok(a) => a,
            Err(e) => exit_parse_error(prog, e),
        }
    };
    let mut opts = args.opts;
    opts.job_name.get_or_insert(name);
    default_output(&mut opts);
    Ok(Submission {
        request: build_request(opts, command, false, Some(text))?,
        detach: true,
        parsable: args.parsable,
        socket: args.socket,
        batch: true,
        pty: false,
    })
}

/// Slurm's default: stdout (and stderr, unless -e) into `slurm-%j.out` (`slurm-%A_%a.out`
/// for an array) in the job's working directory.
fn default_output(opts: &mut JobOpts) {
    if opts.output.is_none() {
        opts.output = Some(if opts.array.is_some() {
            "slurm-%A_%a.out".into()
        } else {
            "slurm-%j.out".into()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_at_the_top_only() {
        let text = "#!/bin/bash\n#SBATCH -J a --gres=gpu:2 # two GPUs\n\n# note\n#MGPU --mem 4G\n#SBATCHx\necho hi\n#SBATCH -t 5\n";
        let d = directives(text).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].line, d[0].slurm), (2, true));
        assert_eq!(d[0].words, ["-J", "a", "--gres=gpu:2"]);
        assert_eq!((d[1].line, d[1].slurm), (5, false));
        assert_eq!(d[1].words, ["--mem", "4G"]);
        let d = directives("#!/bin/sh\n#SBATCH -J \"my job\" --export='A=1 2'\n").unwrap();
        assert_eq!(d[0].words, ["-J", "my job", "--export=A=1 2"]);
        assert!(directives("#!/bin/sh\n#SBATCH -J 'x\n").is_err());
    }

    #[test]
    fn sbatch_mem_is_host_memory() {
        let words = directive_words(
            "mgpu_sbatch",
            "s",
            "#!/bin/sh\n#SBATCH --mem=4G\n#MGPU --mem 2G\n",
        )
        .unwrap();
        assert_eq!(words, ["--host-mem=4G", "--mem", "2G"]);
    }

    #[test]
    fn refused_directives_name_their_line() {
        let e = directive_words(
            "mgpu_sbatch",
            "s.sh",
            "#!/bin/sh\n\n#SBATCH --partition=gpu\n",
        )
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("s.sh line 3") && msg.contains("partitions"),
            "{msg}"
        );
        let e =
            directive_words("mgpu_sbatch", "s.sh", "#!/bin/sh\n#SBATCH --time=x\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        let e = directive_words("mgpu_sbatch", "s.sh", "#!/bin/sh\n#SBATCH echo\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
    }
}
