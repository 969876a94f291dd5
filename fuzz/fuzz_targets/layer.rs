//! The layer importer on hostile tars (absolute and `..` names, links out of the tree,
//! huge headers, PAX records, compressed or not): applying any bytes into a fresh
//! directory may fail, never panic, and never touches anything outside that directory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parent = tempfile::tempdir().expect("tempdir");
    let canary = parent.path().join("canary");
    std::fs::write(&canary, b"canary").expect("canary");
    let dir = parent.path().join("layer");
    std::fs::create_dir(&dir).expect("layer dir");
    let _ = kiln_snapshotter::fuzzing::apply_layer(&dir, data);
    let _ = kiln_snapshotter::fuzzing::apply_layer_merged(&dir, data);
    let outside: Vec<_> = std::fs::read_dir(parent.path())
        .expect("read parent")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(outside.len(), 2, "the layer wrote outside its directory: {outside:?}");
    assert_eq!(std::fs::read(&canary).expect("canary"), b"canary");
});
