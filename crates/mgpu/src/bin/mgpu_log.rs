//! `mgpu_log`: see [`mgpu_cli::log`].

fn main() -> std::process::ExitCode {
    mgpu_cli::log::main()
}
