//! The capability IDs BuildKit v0.11.6 registers; `OpMetadata.caps` may only name these.

/// Registered capabilities, verbatim (including BuildKit's misspelled `soruce.http.uidgid`).
pub const REGISTERED: &[&str] = &[
    "source.image",
    "source.image.resolvemode",
    "source.image.layerlimit",
    "source.local",
    "source.local.unique",
    "source.local.sessionid",
    "source.local.includepatterns",
    "source.local.followpaths",
    "source.local.excludepatterns",
    "source.local.sharedkeyhint",
    "source.local.differ",
    "source.git",
    "source.git.keepgitdir",
    "source.git.fullurl",
    "source.git.httpauth",
    "source.git.knownsshhosts",
    "source.git.mountsshsock",
    "source.git.subdir",
    "source.http",
    "source.http.checksum",
    "source.http.perm",
    "soruce.http.uidgid",
    "source.ocilayout",
    "source.buildop.llbfilename",
    "exec.meta.base",
    "exec.meta.cgroup.parent",
    "exec.meta.proxyenv",
    "exec.meta.network",
    "exec.meta.setsdefaultpath",
    "exec.meta.security",
    "exec.meta.security.devices.v1",
    "exec.meta.ulimit",
    "exec.mount.bind",
    "exec.mount.bind.readwrite-nooutput",
    "exec.mount.cache",
    "exec.mount.cache.sharing",
    "exec.mount.selector",
    "exec.mount.tmpfs",
    "exec.mount.tmpfs.size",
    "exec.mount.secret",
    "exec.mount.ssh",
    "exec.cgroup",
    "exec.secretenv",
    "file.base",
    "file.rm.wildcard",
    "file.rm.nofollowsymlink",
    "file.copy.includeexcludepatterns",
    "constraints",
    "platform",
    "meta.ignorecache",
    "meta.description",
    "meta.exportcache",
    "cache.gha",
    "cache.s3",
    "cache.azblob",
    "mergeop",
    "diffop",
    "exporter.image.annotations",
    "exporter.image.attestations",
    "exporter.sourcedateepoch",
    "source.policy",
];

/// Whether BuildKit v0.11.6 knows `id`.
pub fn is_registered(id: &str) -> bool {
    REGISTERED.contains(&id)
}

#[cfg(test)]
mod tests {
    #[test]
    fn misspelled_cap_is_registered_and_the_fixed_spelling_is_not() {
        assert!(super::is_registered("soruce.http.uidgid"));
        assert!(!super::is_registered("source.http.uidgid"));
        assert!(!super::is_registered(
            "exec.meta.removemountstubs.recursive"
        ));
    }
}
