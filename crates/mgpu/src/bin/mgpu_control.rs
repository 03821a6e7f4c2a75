//! `mgpu_control`: see [`mgpu_cli::control`].

fn main() -> std::process::ExitCode {
    mgpu_cli::control::main()
}
