//! The registry's manifest, index and image-config parsers (what image cache keys are
//! computed from): any bytes under every media type may fail, never panic.
#![no_main]

use kiln_proto::{Digest, pb};
use kiln_registry::manifest::{self, ConfigSummary, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let digest = Digest::of(data);
    for media_type in [
        manifest::MEDIA_OCI_MANIFEST,
        manifest::MEDIA_OCI_INDEX,
        manifest::MEDIA_DOCKER_MANIFEST,
        manifest::MEDIA_DOCKER_LIST,
        "",
        "application/json",
    ] {
        if let Ok(Parsed::Index(entries)) = manifest::parse(&digest, media_type, data) {
            let want = pb::Platform {
                os: "linux".into(),
                architecture: "amd64".into(),
                ..Default::default()
            };
            let _ = manifest::select_platform(&entries, &want);
        }
    }
    if let Ok(config) = ConfigSummary::parse(data) {
        let _ = config.platform();
    }
});
