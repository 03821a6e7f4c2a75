//! `mgpu_scheduler_server`: the mgpu daemon; see [`mgpu_daemon`].

fn main() -> std::process::ExitCode {
    mgpu_daemon::run::main()
}
