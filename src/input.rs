//! Reading a command's input: a file named on the command line, or standard input.

use std::io::Read;
use std::path::Path;

use anyhow::Context;

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
