//! Generates the LLB message types from `proto/ops.proto`.
//!
//! protox compiles the schema in-process, so building kiln needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ops.proto");
    let descriptors = protox::compile(["ops.proto"], ["proto"])?;
    let mut config = prost_build::Config::new();
    // Ordered maps keep iteration (and our gogo-compatible encoding) deterministic.
    config.btree_map(["."]);
    config.compile_fds(descriptors)?;
    Ok(())
}
