//! # mgpu
//!
//! The installable package: the daemon `mgpu_scheduler_server` and the client commands
//! `mgpu_srun`, `mgpu_sbatch`, `mgpu_queue`, `mgpu_cancel`, `mgpu_log`, `mgpu_acct` and `mgpu_top`, each a thin
//! `main` over [`mgpu_daemon`], [`mgpu_cli`] and [`mgpu_top`]. Its `tests/` drive the real
//! binaries end to end. [`write_docs`] makes every command's man page and shell completions
//! from its argument definitions (`scripts/build-release.sh` runs it through the `gen-docs`
//! example), so they never drift from `--help`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Every command mgpu installs, as clap defines it.
pub fn commands() -> Vec<clap::Command> {
    vec![
        mgpu_daemon::run::Args::command(),
        mgpu_cli::srun::Args::command(),
        mgpu_cli::sbatch::Args::command(),
        mgpu_cli::queue::Args::command(),
        mgpu_cli::cancel::Args::command(),
        mgpu_cli::log::Args::command(),
        mgpu_cli::acct::Args::command(),
        mgpu_top::Args::command(),
        mgpu_cli::control::Args::command(),
    ]
}

/// Writes each command's man page (`man/man1/NAME.1`) and its bash, zsh and fish completions
/// under `dir`, laid out as `/usr/local/share` expects them. Returns the files written.
pub fn write_docs(dir: &Path) -> Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    let places = [
        ("man/man1", None),
        ("bash-completion/completions", Some(Shell::Bash)),
        ("zsh/site-functions", Some(Shell::Zsh)),
        ("fish/vendor_completions.d", Some(Shell::Fish)),
    ];
    let mut written = Vec::new();
    for (sub, shell) in places {
        let out = dir.join(sub);
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        for cmd in commands() {
            let name = cmd.get_name().to_string();
            let path = match shell {
                None => {
                    let path = out.join(format!("{name}.1"));
                    let mut page = Vec::new();
                    clap_mangen::Man::new(cmd).render(&mut page)?;
                    std::fs::write(&path, page)?;
                    path
                }
                Some(shell) => {
                    let mut shown = without_hidden(&cmd);
                    clap_complete::generate_to(shell, &mut shown, &name, &out)?
                }
            };
            written.push(path);
        }
    }
    Ok(written)
}

/// `cmd` as shell completions should offer it: without its hidden arguments and subcommands
/// (the internal `--supervise` and the retired `--size-factor`). clap_complete's generators
/// list every argument, hidden or not, and clap cannot remove one, so the command is built
/// again from what is shown.
fn without_hidden(cmd: &clap::Command) -> clap::Command {
    let hidden: Vec<&clap::Id> = cmd
        .get_arguments()
        .filter(|a| a.is_hide_set())
        .map(|a| a.get_id())
        .collect();
    let mut shown = clap::Command::new(cmd.get_name().to_string())
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned())
        .groups(cmd.get_groups().map(|g| {
            // (`is_multiple` takes `&mut self`.)
            let multiple = g.clone().is_multiple();
            clap::ArgGroup::new(g.get_id().clone())
                .args(g.get_args().filter(|id| !hidden.contains(id)).cloned())
                .multiple(multiple)
                .required(g.is_required_set())
        }))
        .subcommands(
            cmd.get_subcommands()
                .filter(|c| !c.is_hide_set())
                .map(without_hidden),
        );
    if let Some(about) = cmd.get_about() {
        shown = shown.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        shown = shown.long_about(about.clone());
    }
    if let Some(version) = cmd.get_version() {
        shown = shown.version(version.to_string());
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_docs(dir.path()).unwrap();
        assert_eq!(files.len(), 4 * commands().len());
        let page = std::fs::read_to_string(dir.path().join("man/man1/mgpu_srun.1")).unwrap();
        assert!(
            page.contains(".TH mgpu_srun") && page.contains("array"),
            "{page}"
        );
        let bash = std::fs::read_to_string(
            dir.path()
                .join("bash-completion/completions/mgpu_cancel.bash"),
        )
        .unwrap();
        assert!(bash.contains("--array"), "{bash}");
        // The daemon's internal and retired options are not offered; its others are.
        for shell in [
            "bash-completion/completions/mgpu_scheduler_server.bash",
            "zsh/site-functions/_mgpu_scheduler_server",
            "fish/vendor_completions.d/mgpu_scheduler_server.fish",
        ] {
            let text = std::fs::read_to_string(dir.path().join(shell)).unwrap();
            assert!(
                text.contains("socket") && text.contains("version"),
                "{text}"
            );
            for hidden in ["supervise", "launch-id", "launcher", "size-factor"] {
                assert!(!text.contains(hidden), "{shell} offers {hidden}");
            }
        }
        for name in ["mgpu_scheduler_server", "mgpu_top", "mgpu_acct"] {
            assert!(dir.path().join(format!("man/man1/{name}.1")).is_file());
            assert!(dir
                .path()
                .join(format!("zsh/site-functions/_{name}"))
                .is_file());
            assert!(dir
                .path()
                .join(format!("fish/vendor_completions.d/{name}.fish"))
                .is_file());
        }
    }
}
