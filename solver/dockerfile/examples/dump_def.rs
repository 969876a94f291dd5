//! Prints a marshaled Definition's ops and metadata (Debug), for diagnosing mismatches.
#![allow(clippy::unwrap_used)]

fn main() {
    let path = std::env::args().nth(1).expect("usage: dump_def FILE.pb");
    let bytes = std::fs::read(&path).unwrap();
    let def = kiln_proto::decode_definition(&bytes).unwrap();
    for op in kiln_proto::decode_ops(&def).unwrap() {
        println!("{} {:?}", op.digest, op.op);
        if let Some(md) = def.metadata.get(op.digest.as_str()) {
            println!("    meta {md:?}");
        }
    }
    println!("source: {:?}", def.source);
    let known: std::collections::HashSet<String> = kiln_proto::decode_ops(&def)
        .unwrap()
        .iter()
        .map(|o| o.digest.to_string())
        .collect();
    for k in def.metadata.keys() {
        if !known.contains(k) {
            println!("metadata for unknown op {k}: {:?}", def.metadata[k]);
        }
    }
}
