//! The step runner as a standalone program (`kiln-runner <bundle>`), for the executor's
//! own tests; the `kiln` binary runs the same code as `kiln __runner <bundle>`.

fn main() {
    let Some(bundle) = std::env::args_os().nth(1) else {
        eprintln!("usage: kiln-runner <bundle>");
        std::process::exit(2);
    };
    std::process::exit(kiln_executor::process::runner_main(std::path::Path::new(
        &bundle,
    )));
}
