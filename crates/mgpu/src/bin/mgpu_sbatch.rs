//! `mgpu_sbatch`: see [`mgpu_cli::sbatch`].

fn main() -> std::process::ExitCode {
    mgpu_cli::sbatch::main()
}
