//! `mgpu_scheduler_server`: the mgpu daemon.

fn main() -> std::process::ExitCode {
    mgpu_daemon::run::main()
}
