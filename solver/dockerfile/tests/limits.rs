//! Large inputs stay within a worker thread's stack: no recursion proportional to the
//! number of instructions (graph marshaling and teardown are iterative).
#![allow(clippy::unwrap_used)]

use kiln_dockerfile::{
    ConvertOptions, ImageMetaResolver, ResolveImageConfigOptions, ResolvedImageConfig,
    dockerfile_to_llb,
};

struct Scratch;

#[async_trait::async_trait]
impl ImageMetaResolver for Scratch {
    async fn resolve_image_config(
        &self,
        reference: &str,
        _opts: &ResolveImageConfigOptions,
    ) -> Result<ResolvedImageConfig, String> {
        Err(format!("{reference}: unexpected"))
    }
}

#[test]
fn thousands_of_instructions_on_a_small_stack() {
    let mut df = String::from("FROM scratch\n");
    for i in 0..20_000 {
        df.push_str(&format!("RUN echo {i}\nCOPY a{i} /b/\n"));
    }
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let converted = rt
                .block_on(dockerfile_to_llb(
                    df.as_bytes(),
                    &ConvertOptions::default(),
                    &Scratch,
                ))
                .unwrap();
            // 40 000 ops, the context source and the terminal.
            assert_eq!(converted.definition.def.len(), 40_002);
        })
        .unwrap();
    handle.join().unwrap();
}
