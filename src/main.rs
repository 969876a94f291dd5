//! The `kiln` command line: a thin layer over the kiln crates.

mod cli;
mod commands;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::parse();
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

fn one_line(message: &str) -> String {
    message.trim().replace('\n', " ")
}
