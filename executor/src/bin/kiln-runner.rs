//! The step runner as a standalone program (`kiln-runner <bundle>`, or `kiln-runner
//! --launcher <fd>` as the launcher that forks runners), for the executor's own tests; the
//! `kiln` binary runs the same code as `kiln __runner …`.

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    std::process::exit(kiln_executor::launcher::runner_program_main(&args));
}
