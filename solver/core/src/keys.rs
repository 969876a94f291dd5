//! Cache keys (cache-keys.md §2–§3): deterministic root keys, random key IDs, links and
//! the key-ID resolution that finds an existing key through stored links.

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::cachemap::CacheDigest;
use crate::store::{Link, Store, StoreError};

/// Where stored links are looked up: the local store, or it together with imported
/// caches ([`crate::source`]).
pub trait Links {
    /// Targets of `link` from `source`, sorted, with the ones the local store itself links
    /// to (the rest an imported cache knows).
    fn targets_and_local(
        &self,
        source: &str,
        link: &Link,
    ) -> Result<(Vec<String>, Vec<String>), StoreError>;

    /// Targets of `link` from `source`, sorted.
    fn targets(&self, source: &str, link: &Link) -> Result<Vec<String>, StoreError> {
        Ok(self.targets_and_local(source, link)?.0)
    }
}

/// What a hit lookup found: the candidate keys, and which links the local store already
/// has, so that a hit saves only the links it lacks.
#[derive(Debug, Default)]
pub struct Candidates {
    pub keys: Vec<String>,
    stored: std::collections::BTreeSet<(String, Link, String)>,
}

impl Candidates {
    /// The links of `key` that the local store does not point at `target` yet. Exact
    /// when `target` is one of [`Candidates::keys`]: then every link was looked up.
    pub fn missing_links(&self, key: &CacheKey, target: &str) -> Vec<(String, Link)> {
        key.links()
            .into_iter()
            .filter(|(source, link)| {
                !self
                    .stored
                    .contains(&(source.clone(), link.clone(), target.to_owned()))
            })
            .collect()
    }
}

impl Links for Store {
    fn targets_and_local(
        &self,
        source: &str,
        link: &Link,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let targets = Store::targets(self, source, link)?;
        Ok((targets.clone(), targets))
    }
}

/// `rootKey(d, o)`: `sha256("<d>@<o>")`, keeping the `random:` prefix for random digests.
pub fn root_key(digest: &CacheDigest, output: i64) -> String {
    let hex = hex::encode(Sha256::digest(format!("{digest}@{output}").as_bytes()));
    if digest.is_random() {
        format!("random:{hex}")
    } else {
        format!("sha256:{hex}")
    }
}

/// A new random key ID: 17 random bytes with the top bit set, in base 36, characters
/// 1..=25 (BuildKit's `identity.NewID`).
pub fn random_id() -> String {
    let mut bytes = [0u8; 17];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] |= 0x80;
    let text = base36(&bytes);
    text.get(1..26).map(str::to_owned).unwrap_or(text)
}

/// Big-endian bytes as a base-36 number, lowercase, no leading zeros.
fn base36(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut number: Vec<u8> = bytes.to_vec();
    let mut out: Vec<u8> = Vec::new();
    while number.iter().any(|b| *b != 0) {
        let mut remainder: u32 = 0;
        for byte in &mut number {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = (value / 36) as u8;
            remainder = value % 36;
        }
        out.push(DIGITS[remainder as usize]);
    }
    if out.is_empty() {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

/// One dependency of a key: a key ID of the input and the selector it is used with.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDep {
    pub key: String,
    pub selector: String,
}

/// A cache key with inputs: CacheMap digest, output and, per input, every known key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheKey {
    pub digest: CacheDigest,
    pub output: i64,
    pub deps: Vec<Vec<KeyDep>>,
}

impl CacheKey {
    fn link(&self, input: usize, selector: &str) -> Link {
        Link {
            input: input as i64,
            output: self.output,
            digest: self.digest.as_str().to_owned(),
            selector: selector.to_owned(),
        }
    }

    /// Every `(source, link)` pair that must point at this key's ID once it is saved.
    pub fn links(&self) -> Vec<(String, Link)> {
        self.deps
            .iter()
            .enumerate()
            .flat_map(|(i, deps)| {
                deps.iter()
                    .map(move |d| (d.key.clone(), self.link(i, &d.selector)))
            })
            .collect()
    }

    /// `getID`'s lookup: input 0 contributes the union of targets over its deps; every
    /// other input intersects with the targets of each of its deps separately (asymmetric,
    /// as in v0.11.6). Sorted, so the pick among several is stable.
    pub fn existing_ids(&self, store: &dyn Links) -> Result<Vec<String>, StoreError> {
        let Some(first) = self.deps.first() else {
            return Ok(Vec::new());
        };
        let mut matches: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for dep in first {
            matches.extend(store.targets(&dep.key, &self.link(0, &dep.selector))?);
        }
        for (i, deps) in self.deps.iter().enumerate().skip(1) {
            for dep in deps {
                if matches.is_empty() {
                    return Ok(Vec::new());
                }
                let found: std::collections::BTreeSet<String> = store
                    .targets(&dep.key, &self.link(i, &dep.selector))?
                    .into_iter()
                    .collect();
                matches.retain(|m| found.contains(m));
            }
        }
        Ok(matches.into_iter().collect())
    }

    /// Lookup for cache hits (§3 `Query`): a candidate must be reached from **every**
    /// input, from any of that input's deps.
    pub fn candidates(&self, store: &dyn Links) -> Result<Candidates, StoreError> {
        let mut matches: Option<std::collections::BTreeSet<String>> = None;
        let mut stored = std::collections::BTreeSet::new();
        for (i, deps) in self.deps.iter().enumerate() {
            let mut found = std::collections::BTreeSet::new();
            for dep in deps {
                let link = self.link(i, &dep.selector);
                let (targets, local) = store.targets_and_local(&dep.key, &link)?;
                found.extend(targets);
                stored.extend(
                    local
                        .into_iter()
                        .map(|target| (dep.key.clone(), link.clone(), target)),
                );
            }
            matches = Some(match matches {
                None => found,
                Some(m) => m.intersection(&found).cloned().collect(),
            });
            if matches
                .as_ref()
                .is_some_and(std::collections::BTreeSet::is_empty)
            {
                break;
            }
        }
        Ok(Candidates {
            keys: matches.unwrap_or_default().into_iter().collect(),
            stored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Links as a map `(source, link) -> (targets, the ones stored locally)`.
    struct FakeLinks(std::collections::HashMap<(String, Link), (Vec<String>, Vec<String>)>);

    impl Links for FakeLinks {
        fn targets_and_local(
            &self,
            source: &str,
            link: &Link,
        ) -> Result<(Vec<String>, Vec<String>), StoreError> {
            Ok(self
                .0
                .get(&(source.to_owned(), link.clone()))
                .cloned()
                .unwrap_or_default())
        }
    }

    #[test]
    fn a_hit_lacks_only_the_links_the_local_store_does_not_have() {
        let key = CacheKey {
            digest: CacheDigest::new("sha256:aa"),
            output: 0,
            deps: vec![
                vec![KeyDep {
                    key: "a".into(),
                    selector: String::new(),
                }],
                vec![
                    KeyDep {
                        key: "b1".into(),
                        selector: "s".into(),
                    },
                    KeyDep {
                        key: "b2".into(),
                        selector: "s".into(),
                    },
                ],
            ],
        };
        let [(a, la), (b1, lb1), (b2, lb2)] = <[(String, Link); 3]>::try_from(key.links())
            .unwrap_or_else(|links| panic!("three links expected: {links:?}"));
        let hit = "k".to_owned();
        let local = |targets: &[&str]| -> (Vec<String>, Vec<String>) {
            let t: Vec<String> = targets.iter().map(|s| (*s).to_owned()).collect();
            (t.clone(), t)
        };
        let mut links = std::collections::HashMap::new();
        // Input 0 links locally; b1 only through an imported cache; b2 to another key.
        links.insert((a.clone(), la.clone()), local(&["k"]));
        links.insert((b1.clone(), lb1.clone()), (vec![hit.clone()], Vec::new()));
        links.insert((b2.clone(), lb2.clone()), local(&["other"]));
        let found = key.candidates(&FakeLinks(links.clone())).expect("lookup");
        assert_eq!(found.keys, vec![hit.clone()]);
        assert_eq!(
            found.missing_links(&key, &hit),
            vec![(b1.clone(), lb1.clone()), (b2.clone(), lb2.clone())]
        );
        // Every link stored locally: nothing to write.
        links.insert((b1, lb1), local(&["k"]));
        links.insert((b2, lb2), local(&["k", "other"]));
        let found = key.candidates(&FakeLinks(links)).expect("lookup");
        assert_eq!(found.missing_links(&key, &hit), Vec::new());
    }

    #[test]
    fn root_keys_follow_the_spec() {
        let d = CacheDigest::new(
            "sha256:d8a17310c81e3890a075ce77349ddb3798c46464a127342121d6a991850cd24e",
        );
        assert_eq!(
            root_key(&d, 0),
            "sha256:a3fa8b79f6ff74371d622547deb880a0f65ca86d66688aa87d10dbc49c644dff"
        );
        // Slow key of the content-hash example (cache-keys.md §6).
        let c = CacheDigest::new(
            "sha256:2a79c45f23b9efc25d89ff8352774ef46e6092f0d84dba6fee152cebce8f656d",
        );
        assert_eq!(
            root_key(&c, -1),
            "sha256:01cf68612f8dafef86477ce0176676c0de391b55f5f4fbc2ba0dbecf23ec9a19"
        );
        let r = CacheDigest::new("random:abc");
        let key = root_key(&r, 0);
        let want = hex::encode(Sha256::digest(b"random:abc@0"));
        assert_eq!(key, format!("random:{want}"));
    }

    #[test]
    fn random_ids_are_25_base36_chars_and_differ() {
        let a = random_id();
        let b = random_id();
        assert_eq!(a.len(), 25);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
        assert_ne!(a, b);
        assert_eq!(base36(&[0x01, 0x00]), "74");
        assert_eq!(base36(&[35]), "z");
        assert_eq!(base36(&[0]), "0");
    }
}
