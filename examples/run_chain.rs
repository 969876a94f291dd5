//! Writes a Definition of N chained RUN steps on `local://rootfs` to standard output, for
//! benchmarks (`scripts/bench-network`): each step runs CMD with the given network mode.
//!
//! Usage: `cargo run --example run_chain -- N sandbox|none|host [CMD]` (CMD defaults to
//! `true`; it runs under `/bin/sh -c`).

use std::collections::BTreeMap;
use std::io::Write as _;

use kiln_proto::builder::{DefinitionBuilder, Exec, FileActions, default_copy};
use kiln_proto::encode::GogoEncode as _;
use kiln_proto::pb;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args.next().ok_or("missing N")?.parse()?;
    let network = match args.next().as_deref() {
        Some("sandbox") | None => pb::NetMode::Unset,
        Some("none") => pb::NetMode::None,
        Some("host") => pb::NetMode::Host,
        Some(other) => return Err(format!("unknown network mode {other:?}").into()),
    };
    let command = args.next().unwrap_or_else(|| "true".to_owned());
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let local = b.source(
        "local://rootfs",
        BTreeMap::from([("local.sharedkeyhint".to_owned(), "rootfs".to_owned())]),
    );
    // Copied into scratch, so the steps run on snapshots as they do on an image.
    let mut root = b.file(FileActions::on(None).copy(
        local,
        "/",
        "/",
        pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ));
    for n in 0..count {
        let mut exec =
            Exec::new(Some(root), &["/bin/sh", "-c", &command]).env(&format!("STEP={n}"));
        exec.network = network;
        root = b.exec(&exec).root().ok_or("exec without a root output")?;
    }
    let def = b.finish(&root).gogo_encode();
    std::io::stdout().write_all(&def)?;
    Ok(())
}
