//! Writes `examples/hello.pb`: busybox, two RUN steps and a file copy, as a BuildKit client
//! would send it. Run with `cargo run -p kiln-proto --example make_hello -- examples/hello.pb`.

use kiln_proto::builder::{DefinitionBuilder, Exec, ExecMount, FileActions, default_copy};
use kiln_proto::encode::GogoEncode;

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "examples/hello.pb".to_owned());
    let mut b = DefinitionBuilder::new().platform("linux", "amd64", "");
    let busybox = b.image("localhost:5000/busybox:latest");
    let greet = b.exec(&Exec::new(
        Some(busybox.clone()),
        &["/bin/sh", "-c", "echo hello from kiln > /hello"],
    ));
    let count = b.exec(
        &Exec::new(
            greet.root(),
            &[
                "/bin/sh",
                "-c",
                "wc -c < /hello > /out/size && cp /hello /out/",
            ],
        )
        .mount(ExecMount::bind("/out", None)),
    );
    let result = b.file(FileActions::on(None).copy(
        count.output("/out").expect("/out is an output"),
        "/",
        "/",
        kiln_proto::pb::FileActionCopy {
            dir_copy_contents: true,
            ..default_copy()
        },
    ));
    std::fs::write(&path, b.finish(&result).gogo_encode())?;
    eprintln!("wrote {path}");
    Ok(())
}
