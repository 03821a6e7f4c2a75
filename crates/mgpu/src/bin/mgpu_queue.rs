//! `mgpu_queue`: see [`mgpu_cli::queue`].

fn main() -> std::process::ExitCode {
    mgpu_cli::queue::main()
}
