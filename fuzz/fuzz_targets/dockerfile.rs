//! The Dockerfile parser and instruction checks (what `kiln build` reads first, from
//! whoever wrote the Dockerfile): any text may fail with an error, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The frontend decodes Dockerfiles lossily, so any bytes reach the parser as text.
    let text = String::from_utf8_lossy(data);
    let _ = kiln_dockerfile_syntax::parser::detect_syntax(&text);
    if let Ok(parsed) = kiln_dockerfile_syntax::parser::parse(&text) {
        let _ = kiln_dockerfile_syntax::instructions::parse(&parsed);
    }
});
