//! `mgpu_acct`: see [`mgpu_cli::acct`].

fn main() -> std::process::ExitCode {
    mgpu_cli::acct::main()
}
