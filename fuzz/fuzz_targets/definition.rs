//! The Definition decoder and loader (CVE-2024-23650): any bytes are decoded and, when
//! they decode, loaded with and without entitlements; neither may panic.
#![no_main]

use kiln_proto::{Entitlements, LoadOptions, decode_definition, decode_ops, load};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(def) = decode_definition(data) else {
        return;
    };
    let _ = decode_ops(&def);
    let _ = load(&def, &LoadOptions::default());
    let all = LoadOptions {
        entitlements: Entitlements::all(),
        ..Default::default()
    };
    if let Ok(graph) = load(&def, &all) {
        // Walk what the loader accepted, as the solver does.
        let _ = graph.vertex(graph.target().vertex);
    }
});
