//! One module per `kiln` subcommand.

mod build;
mod debug;
mod flags;
mod frontend;
mod namespaces;
mod run;
mod state;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let root = cli.root_dir();
    match cli.command {
        Command::Build(args) => {
            let config = cli.config.clone().unwrap_or_else(|| root.join("kiln.toml"));
            build::build(&root, &config, &args)
        }
        Command::Prune(args) => state::prune(&root, &args),
        Command::Du(args) => state::du(&root, &args),
        Command::Run(args) => {
            let config = cli.config.clone().unwrap_or_else(|| root.join("kiln.toml"));
            run::run(&root, &config, &args)
        }
        Command::Spec(args) => {
            let config = cli.config.clone().unwrap_or_else(|| root.join("kiln.toml"));
            run::spec(&root, &config, &args)
        }
        Command::Debug(command) => {
            let config = cli.config.clone().unwrap_or_else(|| root.join("kiln.toml"));
            debug::run(&root, &config, command)
        }
    }
}
