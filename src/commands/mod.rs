//! One module per `kiln` subcommand.

mod build;
mod debug;
mod run;

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = cli.root_dir();
    match cli.command {
        Command::Build(args) => {
            let config = cli.config.clone().unwrap_or_else(|| root.join("kiln.toml"));
            build::build(&root, &config, &args)
        }
        Command::Prune(args) => build::prune(&root, &args),
        Command::Du(args) => build::du(&root, &args),
        Command::Run(args) => run::run(&root, &args),
        Command::Spec(args) => run::spec(&root, &args),
        Command::Debug(command) => debug::run(command),
    }
}

/// Reads a Definition from `file`, or standard input when absent.
pub fn read_input(file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match file {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("reading the definition from standard input")?;
            Ok(bytes)
        }
    }
}
