//! `mgpu_top`: see [`mgpu_top`].

fn main() -> std::process::ExitCode {
    mgpu_top::main()
}
