//! The `kiln` command line: a thin layer over the kiln crates.

mod cli;
mod commands;
mod input;
mod progress;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any thread: two heaps serve kiln's threads (see the function).
    kiln_executor::sys::limit_malloc_arenas(2);
    // `kiln __runner …`: the single-threaded step launcher kiln starts per build, or a
    // runner of one step.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "__runner") {
        let args: Vec<_> = args.collect();
        let code = kiln_executor::launcher::runner_program_main(&args);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = cli::parse();
    init_logging(cli.debug);
    // A panic must still end as one `error:` line and exit status 1, never a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {}{location}", one_line(&message));
    }));
    match std::panic::catch_unwind(|| commands::run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            eprintln!("error: {}", one_line(&format!("{err:#}")));
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(1),
    }
}

/// Warnings (and with `--debug`, decisions) go to standard error.
fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', " ")
}
