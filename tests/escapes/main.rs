//! The escape suite: every known runtime and BuildKit escape and every generic isolation
//! check of part A of ../shared/research/executor-security-and-style.md, tried against
//! kiln as users drive it (`kiln build` with Definitions from `kiln_proto::builder`,
//! `kiln run`), as root and as the unprivileged test user. Each test ends by checking the
//! host is untouched: canary files outside every root, the host's mount table, the test
//! process's descriptors, the hashes of kiln's binary and the host's shell, the host's
//! `core_pattern` and hostname.
//!
//! Races run [`harness::race_iterations`] times: a short budget under `cargo test`, at
//! least 10,000 with `scripts/escapes --long`. The executor's own, lower-level checks
//! (driving the runner directly) are in `executor/tests/escapes.rs`.

mod buildkit;
mod harness;
mod images;
mod isolation;
mod lifetime;
mod paths;
mod races;
mod runc;

both_modes! {
    plain_build_leaves_host_untouched => runc::host_untouched_by_plain_build;
    // A.1: the runc lineage.
    cve_2019_5736_proc_self_exe => runc::cve_2019_5736_proc_self_exe;
    cve_2016_9962_init_not_inspectable => runc::cve_2016_9962_init_not_inspectable;
    cve_2019_16884_mounts_over_proc => runc::cve_2019_16884_mounts_over_proc;
    cve_2019_19921_proc_sys_symlinks => runc::cve_2019_19921_proc_sys_symlinks;
    cve_2021_30465_mount_destination_race => races::cve_2021_30465_mount_destination_race;
    cve_2023_25809_readonly_sys => runc::cve_2023_25809_readonly_sys;
    cve_2024_21626_leaked_descriptors => runc::cve_2024_21626_leaked_descriptors;
    cve_2025_31133_devnull => runc::cve_2025_31133_devnull;
    cve_2025_52565_console => runc::cve_2025_52565_console;
    cve_2026_41579_dev_symlink => runc::cve_2026_41579_dev_symlink;
    cve_2022_29162_capabilities => runc::cve_2022_29162_capabilities;
    // A.2: BuildKit.
    cve_2024_23651_cache_selector_race => races::cve_2024_23651_cache_selector_race;
    cve_2024_23652_stub_cleaner => buildkit::cve_2024_23652_stub_cleaner;
    cve_2024_23653_entitlements => buildkit::cve_2024_23653_entitlements;
    cve_2024_23650_malformed_messages => buildkit::cve_2024_23650_malformed_messages;
    cve_2026_33747_ids_never_name_files => buildkit::cve_2026_33747_ids_never_name_files;
    cve_2026_33748_selectors => buildkit::cve_2026_33748_selectors_stay_in_their_snapshot;
    cache_selector_planted_symlink => buildkit::cache_selector_symlink_planted_by_a_step;
    hostile_image_layer => images::hostile_image_layer;
    // Every path a Definition carries; hostile sources.
    mount_destinations => paths::mount_destinations;
    dangling_symlink_destination => paths::dangling_symlink_destination;
    cwd_paths => paths::cwd_paths;
    user_lookup_files => paths::user_lookup_files;
    hosts_and_resolv_conf => paths::hosts_and_resolv_conf;
    file_op_paths => paths::file_op_paths;
    local_context_links_and_fifos => paths::local_context_links_and_fifos;
    fifo_device_and_magic_link_sources => paths::fifo_device_and_magic_link_sources;
    // A.3: generic isolation.
    masked_and_readonly_paths => runc::masked_and_readonly_paths;
    pivot_root_hides_the_host => runc::pivot_root_hides_the_host;
    no_new_privs_and_setuid => isolation::no_new_privs_and_setuid;
    seccomp_filter => isolation::seccomp_filter;
    mount_propagation => isolation::mount_propagation;
    kill_all_on_exit_and_cancel => isolation::kill_all_on_exit_and_cancel;
    id_mapping_boundaries => isolation::id_mapping_boundaries;
    devices => isolation::devices;
    rlimits => isolation::rlimits;
    namespaces_are_private => isolation::namespaces_are_private;
    // Part 7: killing kiln kills what it started.
    sigkill_at_random_points => lifetime::sigkill_at_random_points;
}
