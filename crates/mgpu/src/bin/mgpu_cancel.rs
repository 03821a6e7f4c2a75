//! `mgpu_cancel`: see [`mgpu_cli::cancel`].

fn main() -> std::process::ExitCode {
    mgpu_cli::cancel::main()
}
