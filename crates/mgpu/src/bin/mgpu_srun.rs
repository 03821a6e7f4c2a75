//! `mgpu_srun`: see [`mgpu_cli::srun`].

fn main() -> std::process::ExitCode {
    mgpu_cli::srun::main()
}
