//! Writes `examples/hello.pb`, the example build graph the README's main job runs, as a
//! BuildKit client would send it: a local root filesystem (`--local rootfs=DIR`, made by
//! `scripts/example-rootfs`) copied into an empty base (like `FROM scratch` + `COPY . /`;
//! the copy is content-hashed, so later builds hit the cache even though each build's
//! local source is new), two RUN steps (the second with a cache mount and a bind-mounted
//! output) and a copy of that output into an empty result.
//! Run with `cargo run -p kiln-proto --example make_hello -- examples/hello.pb`.

use std::collections::BTreeMap;

use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount, FileActions, default_copy};
use kiln_proto::encode::GogoEncode;
use kiln_proto::pb;

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples/hello.pb".to_owned());
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let rootfs = b.source(
        "local://rootfs",
        BTreeMap::from([("local.sharedkeyhint".to_owned(), "rootfs".to_owned())]),
    );
    let base = b.file(FileActions::on(None).copy(
        rootfs,
        "/",
        "/",
        pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ));
    let greet = b.exec(
        &Exec::new(
            Some(base),
            &[
                "/bin/sh",
                "-c",
                "echo \"hello from kiln, running as $(id -un) on $(hostname)\" > /hello",
            ],
        )
        .env("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    );
    let count = b.exec(
        &Exec::new(
            greet.root(),
            &[
                "/bin/sh",
                "-c",
                "echo run >> /cache/runs && wc -c < /hello > /out/size && cp /hello /out/ \
                 && wc -l < /cache/runs > /out/runs-seen-by-cache",
            ],
        )
        .env("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .mount(ExecMount::bind("/out", None))
        .mount(ExecMount::cache(
            "/cache",
            "kiln-example",
            pb::CacheSharingOpt::Shared,
        )),
    );
    let result = b.file(FileActions::on(None).copy(
        count.output("/out").expect("/out is an output"),
        "/",
        "/",
        pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ));
    std::fs::write(&path, b.finish(&result).gogo_encode())?;
    eprintln!("wrote {path}");
    Ok(())
}
