//! Entering kiln's user namespace as the unprivileged test user: the subordinate range is
//! mapped through newuidmap/newgidmap, setgroups stays allowed, and ids across the range
//! can own files.

use std::os::unix::fs::MetadataExt;

use kiln_executor::userns::{self, MappingKind};
use kiln_testsupport::{AsTestUser, rerun_as_test_user};

#[test]
fn rootless_namespace_maps_the_subordinate_range() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    let plan = userns::plan_mappings().expect("plan");
    assert_eq!(
        plan.kind,
        MappingKind::Subordinate,
        "the test user has a subuid range"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("owned");
    let code = userns::run_in_user_namespace(|| {
        let checks = || -> Result<(), String> {
            let map = userns::current_uid_map().map_err(|e| e.to_string())?;
            if map.len() != 2 || map[0].container_id != 0 || map[1].size != 65536 {
                return Err(format!("unexpected uid map {map:?}"));
            }
            if !nix::unistd::Uid::current().is_root() {
                return Err("not uid 0 inside".into());
            }
            let setgroups = std::fs::read_to_string("/proc/self/setgroups").unwrap_or_default();
            if setgroups.trim() != "allow" {
                return Err(format!("setgroups is {setgroups:?}"));
            }
            std::fs::write(&path, b"x").map_err(|e| e.to_string())?;
            std::os::unix::fs::lchown(&path, Some(1000), Some(1000)).map_err(|e| e.to_string())?;
            let meta = std::fs::metadata(&path).map_err(|e| e.to_string())?;
            if meta.uid() != 1000 {
                return Err(format!("uid inside is {}", meta.uid()));
            }
            Ok(())
        };
        match checks() {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("inside the namespace: {e}");
                1
            }
        }
    })
    .expect("enter user namespace");
    assert_eq!(code, 0);
    // Outside, the file belongs to the subordinate id that container uid 1000 maps to.
    let host_uid = std::fs::metadata(&path).expect("stat").uid();
    assert_eq!(host_uid, plan.uids[1].host_id + 999);
}

#[test]
fn panics_inside_become_exit_code_101() {
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    let code = userns::run_in_user_namespace(|| panic!("boom")).expect("enter");
    assert_eq!(code, 101);
}
