//! Property tests of the layer importer on hostile tars (run in CI; `fuzz/` has the
//! coverage-guided target over the same seam): absolute and `..` names, symlinks and
//! hard links out of the tree followed by writes through them, huge and malformed
//! extension headers, PAX records. Whatever the archive, applying it fails or succeeds
//! cleanly, never panics, and nothing outside the target directory changes.

use proptest::prelude::*;

use super::{ApplyMode, ImportOptions, apply};
use crate::backend::XattrNamespace;

/// One hostile tar entry.
#[derive(Clone, Debug)]
enum Entry {
    File { name: Vec<u8>, data: Vec<u8> },
    Dir { name: Vec<u8> },
    Symlink { name: Vec<u8>, target: Vec<u8> },
    Hardlink { name: Vec<u8>, target: Vec<u8> },
    Whiteout { name: Vec<u8> },
    Pax { records: Vec<u8>, then: Box<Entry> },
    LongName { name: Vec<u8>, data: Vec<u8> },
    Raw { header: Vec<u8> },
}

/// Names built from hostile pieces: `..`, absolute prefixes, the outside canary's name,
/// whiteout prefixes, empty and `.` components.
fn name() -> impl Strategy<Value = Vec<u8>> {
    let part = prop_oneof![
        Just(b"..".to_vec()),
        Just(b".".to_vec()),
        Just(b"".to_vec()),
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(b"out".to_vec()),
        Just(b"canary".to_vec()),
        Just(b".wh.a".to_vec()),
        Just(b".wh..wh..opq".to_vec()),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    (any::<bool>(), proptest::collection::vec(part, 1..5)).prop_map(|(absolute, parts)| {
        let mut name = if absolute { b"/".to_vec() } else { Vec::new() };
        name.extend(parts.join(&b'/'));
        name
    })
}

fn link_target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"..".to_vec()),
        Just(b"../canary".to_vec()),
        Just(b"../../../../..".to_vec()),
        Just(b"/".to_vec()),
        Just(b"/proc/self/root".to_vec()),
        name(),
    ]
}

fn entry() -> impl Strategy<Value = Entry> {
    let plain = prop_oneof![
        (name(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(name, data)| Entry::File { name, data }),
        name().prop_map(|name| Entry::Dir { name }),
        (name(), link_target()).prop_map(|(name, target)| Entry::Symlink { name, target }),
        (name(), link_target()).prop_map(|(name, target)| Entry::Hardlink { name, target }),
        name().prop_map(|name| Entry::Whiteout { name }),
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(name, data)| Entry::LongName { name, data }),
        proptest::collection::vec(any::<u8>(), 512..=512).prop_map(|header| Entry::Raw { header }),
    ];
    let pax_record = prop_oneof![
        (name()).prop_map(|n| {
            let mut r = b"path=".to_vec();
            r.extend(n);
            r
        }),
        (link_target()).prop_map(|n| {
            let mut r = b"linkpath=".to_vec();
            r.extend(n);
            r
        }),
        Just(b"size=99999999999999999999".to_vec()),
        Just(b"size=-1".to_vec()),
        Just(b"mtime=1.5e300".to_vec()),
        Just(b"uid=4294967296".to_vec()),
        Just(b"SCHILY.xattr.user.x=\n\0bin".to_vec()),
        Just(b"SCHILY.xattr.trusted.overlay.opaque=y".to_vec()),
        Just(b"SCHILY.xattr.security.capability=\x01\x00\x00\x02".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..40),
    ];
    (
        plain,
        proptest::option::of(proptest::collection::vec(pax_record, 1..4)),
        any::<bool>(),
    )
        .prop_map(|(entry, pax, lie_about_length)| match pax {
            None => entry,
            Some(records) => {
                let mut data = Vec::new();
                for r in records {
                    // "<len> <record>\n" with a correct (or, sometimes, a wrong) length.
                    let body_len = r.len() + 2;
                    let mut len = body_len + body_len.to_string().len();
                    if len.to_string().len() + body_len != len {
                        len += 1;
                    }
                    if lie_about_length {
                        len = len.saturating_mul(3) + 7;
                    }
                    data.extend(format!("{len} ").as_bytes());
                    data.extend(r);
                    data.push(b'\n');
                }
                Entry::Pax {
                    records: data,
                    then: Box::new(entry),
                }
            }
        })
}

fn header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    // Names that do not fit go through the raw bytes (truncated), as a hostile writer may.
    let bytes = h.as_old_mut().name.len();
    let n = name.len().min(bytes);
    h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_cksum();
    h
}

fn write_entry(out: &mut Vec<u8>, entry: &Entry) {
    let mut push = |h: tar::Header, data: &[u8]| {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    };
    match entry {
        Entry::File { name, data } => push(
            header(name, tar::EntryType::Regular, data.len() as u64),
            data,
        ),
        Entry::Dir { name } => push(header(name, tar::EntryType::Directory, 0), &[]),
        Entry::Symlink { name, target } | Entry::Hardlink { name, target } => {
            let kind = if matches!(entry, Entry::Symlink { .. }) {
                tar::EntryType::Symlink
            } else {
                tar::EntryType::Link
            };
            let mut h = header(name, kind, 0);
            let n = target.len().min(100);
            h.as_old_mut().linkname[..n].copy_from_slice(&target[..n]);
            h.set_cksum();
            push(h, &[]);
        }
        Entry::Whiteout { name } => {
            let mut n = b".wh.".to_vec();
            n.extend(name.rsplit(|b| *b == b'/').next().unwrap_or_default());
            push(header(&n, tar::EntryType::Regular, 0), &[]);
        }
        Entry::Pax { records, then } => {
            push(
                header(b"pax", tar::EntryType::XHeader, records.len() as u64),
                records,
            );
            write_entry(out, then);
        }
        Entry::LongName { name, data } => {
            push(
                header(
                    b"././@LongLink",
                    tar::EntryType::GNULongName,
                    name.len() as u64,
                ),
                name,
            );
            push(
                header(b"x", tar::EntryType::Regular, data.len() as u64),
                data,
            );
        }
        Entry::Raw { header } => out.extend_from_slice(header),
    }
}

fn archive(entries: &[Entry], then_write_through: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        write_entry(&mut out, e);
    }
    if then_write_through {
        // Files written through every planted link name: the classic escape.
        for e in entries {
            if let Entry::Symlink { name, .. } | Entry::Hardlink { name, .. } = e {
                let mut through = name.clone();
                through.extend(b"/pwned");
                write_entry(
                    &mut out,
                    &Entry::File {
                        name: through,
                        data: b"pwned".to_vec(),
                    },
                );
                write_entry(
                    &mut out,
                    &Entry::File {
                        name: name.clone(),
                        data: b"pwned".to_vec(),
                    },
                );
            }
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Applies `bytes` into `<parent>/layer` next to `<parent>/canary` (and `<parent>/out`,
/// a directory), in both modes; the outside must be unchanged.
fn check_outside_untouched(bytes: &[u8]) {
    let parent = tempfile::tempdir().expect("tempdir");
    let canary = parent.path().join("canary");
    std::fs::write(&canary, b"canary").expect("canary");
    std::fs::create_dir(parent.path().join("out")).expect("out");
    for mode in [ApplyMode::Overlay(XattrNamespace::User), ApplyMode::Merged] {
        let dir = parent.path().join("layer");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("layer dir");
        let _ = apply(&dir, bytes, mode, &ImportOptions::default());
        let mut outside: Vec<String> = std::fs::read_dir(parent.path())
            .expect("read parent")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        outside.sort();
        assert_eq!(outside, ["canary", "layer", "out"], "{mode:?}");
        assert_eq!(
            std::fs::read(&canary).expect("canary"),
            b"canary",
            "{mode:?}"
        );
        assert_eq!(
            std::fs::read_dir(parent.path().join("out"))
                .expect("out")
                .count(),
            0,
            "{mode:?}: wrote into a sibling directory"
        );
        let meta = std::fs::symlink_metadata(&canary).expect("canary meta");
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&meta),
            1,
            "{mode:?}: canary hard-linked"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hostile_archives_stay_inside(entries in proptest::collection::vec(entry(), 0..8), through in any::<bool>()) {
        check_outside_untouched(&archive(&entries, through));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        check_outside_untouched(&bytes);
    }

    #[test]
    fn compressed_hostile_archives_stay_inside(entries in proptest::collection::vec(entry(), 0..6)) {
        let plain = archive(&entries, true);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).expect("gzip");
        check_outside_untouched(&gz.finish().expect("gzip"));
    }
}

/// Regression cases: each once crashed or escaped something, or is the canonical form of
/// an escape (kept so the property tests' random search need not find it again).
#[test]
fn known_hostile_archives() {
    let cases: Vec<Vec<Entry>> = vec![
        vec![Entry::Symlink {
            name: b"a".to_vec(),
            target: b"..".to_vec(),
        }],
        vec![Entry::Symlink {
            name: b"a".to_vec(),
            target: b"/".to_vec(),
        }],
        vec![Entry::Hardlink {
            name: b"a".to_vec(),
            target: b"../canary".to_vec(),
        }],
        vec![Entry::File {
            name: b"../canary".to_vec(),
            data: b"pwned".to_vec(),
        }],
        vec![Entry::File {
            name: b"/../../canary".to_vec(),
            data: b"pwned".to_vec(),
        }],
        vec![
            Entry::Symlink {
                name: b"out".to_vec(),
                target: b"../out".to_vec(),
            },
            Entry::File {
                name: b"out/x".to_vec(),
                data: b"pwned".to_vec(),
            },
        ],
        vec![Entry::Pax {
            records: b"30 path=../../canary\n".to_vec(),
            then: Box::new(Entry::File {
                name: b"x".to_vec(),
                data: b"pwned".to_vec(),
            }),
        }],
        vec![Entry::Pax {
            records: b"99999999999 x=y\n".to_vec(),
            then: Box::new(Entry::Dir {
                name: b"d".to_vec(),
            }),
        }],
        vec![Entry::LongName {
            name: vec![b'a'; 5000],
            data: Vec::new(),
        }],
        // `.wh...` at the layer root: removing `..` emptied the directory above the
        // target (found by this test).
        vec![Entry::Whiteout {
            name: b"..".to_vec(),
        }],
        vec![Entry::Whiteout {
            name: b"a/..".to_vec(),
        }],
        vec![Entry::Whiteout {
            name: b".".to_vec(),
        }],
        // A huge extension header (above the importer's bound) is refused, not buffered.
        vec![Entry::Pax {
            records: vec![b'a'; 3 << 20],
            then: Box::new(Entry::Dir {
                name: b"d".to_vec(),
            }),
        }],
    ];
    for entries in cases {
        check_outside_untouched(&archive(&entries, true));
    }
}
