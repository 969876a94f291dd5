//! The FileOp CacheMap as BuildKit v0.11.6 computes it (`fileOp.CacheMap`): every action's
//! message marshaled on its own (copy sources reduced to their base name and turned into
//! selectors), the `[input, secondaryInput, output]` index triples unless they follow the
//! common chain pattern, and the whole wrapped as
//! `{"Type":"buildkit.file.v0","Actions":[<base64>…],"indexes":[…]}`.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use kiln_proto::gojson::{ObjectWriter, to_go_json, write_string};
use kiln_proto::{Digest, paths, pb};

use super::error::CacheMapError;
use super::map::{CacheDigest, CacheMap, ContentSelector, Dep, dedupe_paths};

/// Type string of the file wrapper object.
pub const FILE_CACHE_TYPE: &str = "buildkit.file.v0";

/// Computes the CacheMap of `file` with `num_inputs` op inputs.
pub fn cache_map(
    op: &Digest,
    file: &pb::FileOp,
    num_inputs: usize,
) -> Result<CacheMap, CacheMapError> {
    // BTreeMap: BuildKit iterates a Go map here, but each input is handled independently,
    // so the order does not reach the result.
    let mut selectors: BTreeMap<i64, Vec<ContentSelector>> = BTreeMap::new();
    let mut invalid: BTreeSet<i64> = BTreeSet::new();
    let mut actions: Vec<Vec<u8>> = Vec::with_capacity(file.actions.len());
    let mut indexes: Vec<[i64; 3]> = Vec::with_capacity(file.actions.len());
    let mut mark_invalid = |input: i64| {
        if input != -1 {
            invalid.insert(input);
        }
    };
    for (index, action) in file.actions.iter().enumerate() {
        let json = match &action.action {
            Some(pb::file_action::Action::Mkdir(mkdir)) => {
                mark_invalid(action.input);
                process_owner(mkdir.owner.as_ref(), &mut selectors);
                to_go_json(mkdir)
            }
            Some(pb::file_action::Action::Mkfile(mkfile)) => {
                mark_invalid(action.input);
                process_owner(mkfile.owner.as_ref(), &mut selectors);
                to_go_json(mkfile)
            }
            Some(pb::file_action::Action::Rm(rm)) => {
                mark_invalid(action.input);
                to_go_json(rm)
            }
            Some(pb::file_action::Action::Copy(copy)) => {
                mark_invalid(action.input);
                process_owner(copy.owner.as_ref(), &mut selectors);
                let mut copy = copy.clone();
                let secondary_is_input = usize::try_from(action.secondary_input)
                    .is_ok_and(|secondary| secondary < num_inputs);
                if secondary_is_input {
                    selectors
                        .entry(action.secondary_input)
                        .or_default()
                        .push(ContentSelector {
                            path: copy.src.clone(),
                            follow_links: copy.follow_symlink,
                            wildcard: copy.allow_wildcard && paths::contains_wildcards(&copy.src),
                            include_patterns: copy.include_patterns.clone(),
                            exclude_patterns: copy.exclude_patterns.clone(),
                        });
                    copy.src = paths::base(&copy.src);
                }
                to_go_json(&copy)
            }
            None => {
                return Err(CacheMapError::Invalid {
                    op: op.clone(),
                    what: format!("file action {index} has no action"),
                });
            }
        };
        actions.push(json);
        indexes.push([action.input, action.secondary_input, action.output]);
    }
    if is_default_indexes(&indexes) {
        indexes.clear();
    }
    let hashed = wrapper_json(&actions, &indexes);

    let mut deps: Vec<Dep> = (0..num_inputs)
        .map(|_| Dep {
            selector: None,
            content: None,
            preprocess: true,
        })
        .collect();
    for (input, list) in selectors {
        if invalid.contains(&input) {
            continue;
        }
        // A chown by name may point at an action result (index >= inputs); that is not an
        // op input and has no dep (v0.11.6 would index out of range here).
        let Some(dep) = usize::try_from(input).ok().and_then(|i| deps.get_mut(i)) else {
            continue;
        };
        let mut paths: Vec<&[u8]> = list.iter().map(|s| s.path.as_bytes()).collect();
        paths.sort_by(|a, b| b.cmp(a));
        dep.selector = Some(Digest::of(&paths.join(&0u8)));
        dep.content = Some(dedupe_selectors(&list));
    }
    Ok(CacheMap {
        digest: CacheDigest::sha256_of(&hashed),
        deps,
        hashed: Some(hashed),
    })
}

/// The wrapper BuildKit hashes: `Actions` is a Go `[][]byte`, so each action's JSON is
/// written as a base64 string.
pub fn wrapper_json(actions: &[Vec<u8>], indexes: &[[i64; 3]]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut obj = ObjectWriter::new(&mut out);
    obj.string_always("Type", FILE_CACHE_TYPE);
    let list = obj.key("Actions");
    list.push(b'[');
    for (i, action) in actions.iter().enumerate() {
        if i > 0 {
            list.push(b',');
        }
        let encoded = base64::engine::general_purpose::STANDARD.encode(action);
        write_string(list, encoded.as_bytes());
    }
    list.push(b']');
    if !indexes.is_empty() {
        let list = obj.key("indexes");
        list.push(b'[');
        for (i, [a, b, c]) in indexes.iter().enumerate() {
            if i > 0 {
                list.push(b',');
            }
            list.extend_from_slice(format!("[{a},{b},{c}]").as_bytes());
        }
        list.push(b']');
    }
    obj.finish();
    out
}

/// `processOwner`: a user or group chosen by name needs `/etc/passwd` resp. `/etc/group`
/// of the named input. v0.11.6 ignores its error for a negative input, so do we.
fn process_owner(
    owner: Option<&pb::ChownOpt>,
    selectors: &mut BTreeMap<i64, Vec<ContentSelector>>,
) {
    let Some(owner) = owner else { return };
    for (user, file) in [(&owner.user, "/etc/passwd"), (&owner.group, "/etc/group")] {
        if let Some(pb::UserOpt {
            user: Some(pb::user_opt::User::ByName(named)),
        }) = user
        {
            if named.input >= 0 {
                selectors
                    .entry(named.input)
                    .or_default()
                    .push(ContentSelector::path(file, true));
            }
        }
    }
}

/// `isDefaultIndexes`: the chain pattern older BuildKit hashed without indexes.
fn is_default_indexes(indexes: &[[i64; 3]]) -> bool {
    if indexes.is_empty() {
        return false;
    }
    let n = indexes.len() as i64;
    indexes
        .iter()
        .enumerate()
        .all(|(i, [input, secondary, output])| {
            let i = i as i64;
            let input_ok = if i == 0 {
                *input == 0
            } else {
                *input == n + (i - 1)
            };
            let last = i == n - 1;
            input_ok
                && (*secondary == -1 || *secondary == 1)
                && if last { *output == 0 } else { *output == -1 }
        })
}

/// `dedupeSelectors`: plain paths deduplicated separately for followed and non-followed
/// links, wildcard/filter selectors kept as they are, all sorted by path. Go's sort is
/// not stable; ours is, which only matters for two selectors with the same path.
pub fn dedupe_selectors(selectors: &[ContentSelector]) -> Vec<ContentSelector> {
    let plain = |follow: bool| -> Vec<String> {
        selectors
            .iter()
            .filter(|s| !s.has_wildcard_or_filters() && s.follow_links == follow)
            .map(|s| s.path.clone())
            .collect()
    };
    let mut out: Vec<ContentSelector> = dedupe_paths(&plain(false))
        .into_iter()
        .map(|p| ContentSelector::path(p, false))
        .chain(
            dedupe_paths(&plain(true))
                .into_iter()
                .map(|p| ContentSelector::path(p, true)),
        )
        .chain(
            selectors
                .iter()
                .filter(|s| s.has_wildcard_or_filters())
                .cloned(),
        )
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Digest {
        Digest::of(b"file")
    }

    fn copy_action(input: i64, secondary: i64, output: i64, src: &str) -> pb::FileAction {
        pb::FileAction {
            input,
            secondary_input: secondary,
            output,
            action: Some(pb::file_action::Action::Copy(pb::FileActionCopy {
                src: src.into(),
                dest: "/dst".into(),
                mode: -1,
                follow_symlink: true,
                allow_wildcard: true,
                timestamp: -1,
                ..Default::default()
            })),
        }
    }

    fn mkdir_action(input: i64, output: i64, path: &str) -> pb::FileAction {
        pb::FileAction {
            input,
            secondary_input: -1,
            output,
            action: Some(pb::file_action::Action::Mkdir(pb::FileActionMkDir {
                path: path.into(),
                mode: 0o755,
                timestamp: -1,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn copy_source_becomes_a_selector_and_its_base_name_is_hashed() {
        let file = pb::FileOp {
            actions: vec![copy_action(0, 1, 0, "/out/dir")],
        };
        let cm = cache_map(&op(), &file, 2).unwrap();
        let action_json = br#"{"src":"dir","dest":"/dst","mode":-1,"followSymlink":true,"allowWildcard":true,"timestamp":-1}"#;
        let want = wrapper_json(&[action_json.to_vec()], &[]);
        assert_eq!(cm.hashed.as_deref(), Some(want.as_slice()));
        assert!(
            String::from_utf8(want)
                .unwrap()
                .starts_with(r#"{"Type":"buildkit.file.v0","Actions":["eyJzcmMiOiJkaXIi"#)
        );
        // Input 0 is the base of the copy: no selector, no content hash.
        assert_eq!(cm.deps[0].selector, None);
        assert!(!cm.deps[0].content_based());
        assert_eq!(cm.deps[1].selector, Some(Digest::of(b"/out/dir")));
        assert_eq!(
            cm.deps[1].content,
            Some(vec![ContentSelector::path("/out/dir", true)])
        );
    }

    #[test]
    fn non_default_indexes_are_written() {
        let file = pb::FileOp {
            actions: vec![mkdir_action(0, -1, "/a"), mkdir_action(1, 0, "/a/b")],
        };
        let cm = cache_map(&op(), &file, 1).unwrap();
        let text = String::from_utf8(cm.hashed.unwrap()).unwrap();
        assert!(
            text.ends_with(r#""indexes":[[0,-1,-1],[1,-1,0]]}"#),
            "{text}"
        );
        // Default chain: action 1 reads action 0 (index numInputs + 0).
        let file = pb::FileOp {
            actions: vec![mkdir_action(0, -1, "/a"), mkdir_action(2, 0, "/a/b")],
        };
        let cm = cache_map(&op(), &file, 2).unwrap();
        assert!(
            !String::from_utf8(cm.hashed.unwrap())
                .unwrap()
                .contains("indexes")
        );
    }

    #[test]
    fn default_index_rules() {
        assert!(is_default_indexes(&[[0, -1, 0]]));
        assert!(is_default_indexes(&[[0, 1, 0]]));
        assert!(!is_default_indexes(&[[0, 2, 0]]));
        assert!(!is_default_indexes(&[[-1, 0, 0]]));
        assert!(!is_default_indexes(&[[0, -1, -1]]));
        // Go compares with len(indexes) + (i - 1), whatever the input count.
        assert!(is_default_indexes(&[[0, -1, -1], [3, 1, -1], [4, -1, 0]]));
        assert!(!is_default_indexes(&[[0, -1, -1], [2, 1, -1], [3, -1, 0]]));
        assert!(!is_default_indexes(&[]));
    }

    #[test]
    fn selectors_sort_descending_for_the_digest_and_dedupe_for_content() {
        let file = pb::FileOp {
            actions: vec![
                copy_action(0, 1, -1, "/a"),
                copy_action(2, 1, -1, "/a/b"),
                copy_action(3, 1, 0, "/c*"),
            ],
        };
        let cm = cache_map(&op(), &file, 2).unwrap();
        assert_eq!(cm.deps[1].selector, Some(Digest::of(b"/c*\0/a/b\0/a")));
        let content = cm.deps[1].content.clone().unwrap();
        let paths: Vec<&str> = content.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["/a", "/c*"]);
        assert!(content[1].wildcard);
    }

    #[test]
    fn owner_by_name_adds_passwd_and_group_selectors() {
        let mut action = mkdir_action(-1, 0, "/x");
        if let Some(pb::file_action::Action::Mkdir(mkdir)) = &mut action.action {
            let named = |name: &str| pb::UserOpt {
                user: Some(pb::user_opt::User::ByName(pb::NamedUserOpt {
                    name: name.into(),
                    input: 0,
                })),
            };
            mkdir.owner = Some(pb::ChownOpt {
                user: Some(named("app")),
                group: Some(named("app")),
            });
        }
        let cm = cache_map(
            &op(),
            &pb::FileOp {
                actions: vec![action],
            },
            1,
        )
        .unwrap();
        assert_eq!(
            cm.deps[0].selector,
            Some(Digest::of(b"/etc/passwd\0/etc/group"))
        );
        assert_eq!(
            cm.deps[0].content,
            Some(vec![
                ContentSelector::path("/etc/group", true),
                ContentSelector::path("/etc/passwd", true)
            ])
        );
    }
}
