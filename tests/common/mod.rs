//! Helpers shared by the `kiln` binary's integration tests.

use kiln_testsupport::{is_root, unpack_test_image};

/// The busybox root filesystem as a directory whose files the caller owns: unpacked as
/// root, or (rootless) inside a user namespace so its files belong to ids kiln's
/// namespace maps.
pub fn busybox_rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    if is_root() {
        unpack_test_image("busybox", dir.path());
    } else {
        let path = dir.path().to_owned();
        let code = kiln_executor::userns::run_in_user_namespace(move || {
            unpack_test_image("busybox", &path);
            0
        })
        .expect("user namespace");
        assert_eq!(code, 0, "unpacking in the user namespace");
    }
    dir
}
