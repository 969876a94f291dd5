//! Path semantics of LLB as BuildKit applies them: Go's `path.Clean`, `Join`, `IsAbs` and
//! `Base`
//! (lexical, slash-separated, independent of the host), and wildcard detection for
//! FileOp copy sources. CacheMaps, the FileOp backend and the frontend must agree on
//! these byte for byte.

/// Go's `path.Clean`: lexical, `..` clamped at the root of an absolute path, no trailing
/// slash, `.` for an empty result.
pub fn clean(p: &str) -> String {
    if p.is_empty() {
        return ".".to_owned();
    }
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

/// Go's `path.Join`: non-empty elements joined by `/` and cleaned; `""` if all are empty.
pub fn join(elems: &[&str]) -> String {
    let parts: Vec<&str> = elems.iter().copied().filter(|e| !e.is_empty()).collect();
    if parts.is_empty() {
        return String::new();
    }
    clean(&parts.join("/"))
}

/// Go's `path.IsAbs`.
pub fn is_abs(p: &str) -> bool {
    p.starts_with('/')
}

/// `containsWildcards` (Unix): `*`, `?` or `[` not escaped by a backslash.
pub fn contains_wildcards(name: &str) -> bool {
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// Go's `path.Base`.
pub fn base(p: &str) -> String {
    if p.is_empty() {
        return ".".to_owned();
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".to_owned();
    }
    match trimmed.rfind('/') {
        Some(i) => trimmed[i + 1..].to_owned(),
        None => trimmed.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_go() {
        for (input, want) in [
            ("", "."),
            ("/", "/"),
            ("/a/b/", "/a/b"),
            ("/a//b/./c", "/a/b/c"),
            ("/../a", "/a"),
            ("/a/../../b", "/b"),
            ("a/../..", ".."),
            ("./a", "a"),
        ] {
            assert_eq!(clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn wildcards_and_base() {
        assert!(contains_wildcards("/a/*.go"));
        assert!(contains_wildcards("x?"));
        assert!(contains_wildcards("[ab]"));
        assert!(!contains_wildcards(r"a\*b"));
        assert!(!contains_wildcards("/plain"));
        assert_eq!(base("/out/dir/"), "dir");
        assert_eq!(base("/"), "/");
        assert_eq!(base(""), ".");
        assert_eq!(base("file"), "file");
    }

    #[test]
    fn join_and_base_follow_go() {
        for (input, want) in [
            ("", "."),
            ("/", "/"),
            ("a/b/../c", "a/c"),
            ("/../a", "/a"),
            ("../../a", "../../a"),
            ("a//b/./", "a/b"),
            ("/a/b/", "/a/b"),
        ] {
            assert_eq!(clean(input), want, "{input:?}");
        }
        assert_eq!(join(&["/", "a", "", "b/"]), "/a/b");
        assert_eq!(join(&["", ""]), "");
        assert_eq!(join(&[".", "/a.txt"]), "a.txt");
        assert_eq!(base("/a/b/"), "b");
        assert_eq!(base("///"), "/");
        assert_eq!(base(""), ".");
    }
}
