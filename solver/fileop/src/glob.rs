//! Go's `filepath.Match` (Unix flavour), which BuildKit uses for source wildcards
//! (`copy.ResolveWildcards`) and fsutil for include patterns (`prefix.Match`). Ported
//! rather than taken from `glob`/`globset`: those treat `[!…]`, `**` and escapes
//! differently, and matching Go here decides which files a COPY takes. `*` and `?` never
//! match `/`; `[…]` classes (negated with `^`) and `\` escapes work as in Go; a malformed
//! pattern is an error, reported the way Go's `ErrBadPattern` is.

/// Errors in a pattern.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    #[error("syntax error in pattern")]
    BadPattern,
}

/// Decodes one UTF-8 character; invalid bytes decode as U+FFFD of length 1, as in Go.
fn decode(s: &[u8]) -> (char, usize) {
    for n in 1..=s.len().min(4) {
        if let Ok(text) = std::str::from_utf8(&s[..n]) {
            if let Some(c) = text.chars().next() {
                return (c, n);
            }
        }
    }
    (char::REPLACEMENT_CHARACTER, 1)
}

/// `filepath.Match(pattern, name)`.
pub fn matches(pattern: &str, name: &str) -> Result<bool, GlobError> {
    let mut pattern = pattern.as_bytes();
    let mut name = name.as_bytes();
    'pattern: while !pattern.is_empty() {
        let (star, chunk, rest) = scan_chunk(pattern);
        pattern = rest;
        if star && chunk.is_empty() {
            // A trailing star matches the rest unless it contains a separator.
            return Ok(!name.contains(&b'/'));
        }
        let (tail, ok, err) = match_chunk(chunk, name);
        // The last chunk must consume the whole name.
        if ok && (tail.is_empty() || !pattern.is_empty()) {
            name = tail;
            continue;
        }
        if let Some(err) = err {
            return Err(err);
        }
        if star {
            // Try skipping 1..n bytes, but never a separator.
            let mut i = 0;
            while i < name.len() && name[i] != b'/' {
                let (tail, ok, err) = match_chunk(chunk, &name[i + 1..]);
                if ok {
                    if pattern.is_empty() && !tail.is_empty() {
                        i += 1;
                        continue;
                    }
                    name = tail;
                    continue 'pattern;
                }
                if let Some(err) = err {
                    return Err(err);
                }
                i += 1;
            }
        }
        // No match: the rest of the pattern must still be well formed.
        while !pattern.is_empty() {
            let (_, chunk, rest) = scan_chunk(pattern);
            pattern = rest;
            if let (_, _, Some(err)) = match_chunk(chunk, b"") {
                return Err(err);
            }
        }
        return Ok(false);
    }
    Ok(name.is_empty())
}

/// Splits off leading stars and the chunk up to the next star outside a class.
fn scan_chunk(mut pattern: &[u8]) -> (bool, &[u8], &[u8]) {
    let mut star = false;
    while let [b'*', rest @ ..] = pattern {
        pattern = rest;
        star = true;
    }
    let mut in_range = false;
    let mut i = 0;
    while i < pattern.len() {
        match pattern[i] {
            b'\\' if i + 1 < pattern.len() => i += 1,
            b'[' => in_range = true,
            b']' => in_range = false,
            b'*' if !in_range => break,
            _ => {}
        }
        i += 1;
    }
    (star, &pattern[..i], &pattern[i..])
}

/// Matches one chunk at the start of `s`: the unmatched rest, whether it matched, and a
/// syntax error found on the way (the chunk is checked to its end even after a miss).
fn match_chunk<'a>(mut chunk: &[u8], mut s: &'a [u8]) -> (&'a [u8], bool, Option<GlobError>) {
    let mut failed = false;
    while !chunk.is_empty() {
        if !failed && s.is_empty() {
            failed = true;
        }
        match chunk[0] {
            b'[' => {
                let mut r = '\0';
                if !failed {
                    let (c, n) = decode(s);
                    r = c;
                    s = &s[n..];
                }
                chunk = &chunk[1..];
                let mut negated = false;
                if chunk.first() == Some(&b'^') {
                    negated = true;
                    chunk = &chunk[1..];
                }
                let mut matched = false;
                let mut ranges = 0;
                loop {
                    if chunk.first() == Some(&b']') && ranges > 0 {
                        chunk = &chunk[1..];
                        break;
                    }
                    let lo = match get_esc(chunk) {
                        Ok((c, rest)) => {
                            chunk = rest;
                            c
                        }
                        Err(e) => return (b"", false, Some(e)),
                    };
                    let mut hi = lo;
                    if chunk.first() == Some(&b'-') {
                        match get_esc(&chunk[1..]) {
                            Ok((c, rest)) => {
                                chunk = rest;
                                hi = c;
                            }
                            Err(e) => return (b"", false, Some(e)),
                        }
                    }
                    if lo <= r && r <= hi {
                        matched = true;
                    }
                    ranges += 1;
                }
                if matched == negated {
                    failed = true;
                }
            }
            b'?' => {
                if !failed {
                    if s[0] == b'/' {
                        failed = true;
                    }
                    let (_, n) = decode(s);
                    s = &s[n..];
                }
                chunk = &chunk[1..];
            }
            first => {
                let literal = if first == b'\\' {
                    chunk = &chunk[1..];
                    match chunk.first() {
                        Some(c) => *c,
                        None => return (b"", false, Some(GlobError::BadPattern)),
                    }
                } else {
                    first
                };
                if !failed {
                    if literal != s[0] {
                        failed = true;
                    }
                    s = &s[1..];
                }
                chunk = &chunk[1..];
            }
        }
    }
    if failed {
        (b"", false, None)
    } else {
        (s, true, None)
    }
}

/// One possibly escaped class character; the class must go on after it.
fn get_esc(mut chunk: &[u8]) -> Result<(char, &[u8]), GlobError> {
    match chunk.first() {
        None | Some(b'-') | Some(b']') => return Err(GlobError::BadPattern),
        Some(b'\\') => {
            chunk = &chunk[1..];
            if chunk.is_empty() {
                return Err(GlobError::BadPattern);
            }
        }
        Some(_) => {}
    }
    let (c, n) = decode(chunk);
    if c == char::REPLACEMENT_CHARACTER && n == 1 {
        return Err(GlobError::BadPattern);
    }
    let rest = &chunk[n..];
    if rest.is_empty() {
        return Err(GlobError::BadPattern);
    }
    Ok((c, rest))
}

/// fsutil's `prefix.Match`: matches `name` against as many leading components of
/// `pattern` as `name` has; `partial` says the pattern had more components (so a
/// directory on the way to a match is "partially" matched).
pub fn prefix_match(pattern: &str, name: &str) -> (bool, bool) {
    let count = name.matches('/').count();
    let mut pattern = pattern;
    let mut partial = false;
    if pattern.matches('/').count() > count {
        // Keep the pattern up to (not including) its (count+1)-th separator.
        if let Some((i, _)) = pattern.match_indices('/').nth(count) {
            pattern = &pattern[..i];
        }
        partial = true;
    }
    (matches(pattern, name).unwrap_or(false), partial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_match_cases() {
        // From Go's path/filepath match_test.go.
        let cases: &[(&str, &str, Result<bool, GlobError>)] = &[
            ("abc", "abc", Ok(true)),
            ("*", "abc", Ok(true)),
            ("*c", "abc", Ok(true)),
            ("a*", "a", Ok(true)),
            ("a*", "abc", Ok(true)),
            ("a*", "ab/c", Ok(false)),
            ("a*/b", "abc/b", Ok(true)),
            ("a*/b", "a/c/b", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxe/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", Ok(true)),
            ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", Ok(false)),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", Ok(false)),
            ("a*b?c*x", "abxbbxdbxebxczzx", Ok(true)),
            ("a*b?c*x", "abxbbxdbxebxczzy", Ok(false)),
            ("ab[c]", "abc", Ok(true)),
            ("ab[b-d]", "abc", Ok(true)),
            ("ab[e-g]", "abc", Ok(false)),
            ("ab[^c]", "abc", Ok(false)),
            ("ab[^b-d]", "abc", Ok(false)),
            ("ab[^e-g]", "abc", Ok(true)),
            ("a\\*b", "a*b", Ok(true)),
            ("a\\*b", "ab", Ok(false)),
            ("a?b", "a☺b", Ok(true)),
            ("a[^a]b", "a☺b", Ok(true)),
            ("a???b", "a☺b", Ok(false)),
            ("a[^a][^a][^a]b", "a☺b", Ok(false)),
            ("[a-ζ]*", "α", Ok(true)),
            ("*[a-ζ]", "A", Ok(false)),
            ("a?b", "a/b", Ok(false)),
            ("a*b", "a/b", Ok(false)),
            ("[\\]a]", "]", Ok(true)),
            ("[\\-]", "-", Ok(true)),
            ("[x\\-]", "x", Ok(true)),
            ("[x\\-]", "-", Ok(true)),
            ("[x\\-]", "z", Ok(false)),
            ("[\\-x]", "x", Ok(true)),
            ("[\\-x]", "-", Ok(true)),
            ("[\\-x]", "a", Ok(false)),
            ("[]a]", "]", Err(GlobError::BadPattern)),
            ("[-]", "-", Err(GlobError::BadPattern)),
            ("[x-]", "x", Err(GlobError::BadPattern)),
            ("[x-]", "-", Err(GlobError::BadPattern)),
            ("[x-]", "z", Err(GlobError::BadPattern)),
            ("[-x]", "x", Err(GlobError::BadPattern)),
            ("[-x]", "-", Err(GlobError::BadPattern)),
            ("[-x]", "a", Err(GlobError::BadPattern)),
            ("\\", "a", Err(GlobError::BadPattern)),
            ("[a-b-c]", "a", Err(GlobError::BadPattern)),
            ("[", "a", Err(GlobError::BadPattern)),
            ("[^", "a", Err(GlobError::BadPattern)),
            ("[^bc", "a", Err(GlobError::BadPattern)),
            ("a[", "a", Err(GlobError::BadPattern)),
            ("a[", "ab", Err(GlobError::BadPattern)),
            ("a[", "x", Err(GlobError::BadPattern)),
            ("a/b[", "x", Err(GlobError::BadPattern)),
            ("*x", "xxx", Ok(true)),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                &matches(pattern, name),
                want,
                "Match({pattern:?}, {name:?})"
            );
        }
    }

    #[test]
    fn prefix_match_reports_partial_directory_matches() {
        assert_eq!(prefix_match("a/*/c", "a"), (true, true));
        assert_eq!(prefix_match("a/*/c", "a/b"), (true, true));
        assert_eq!(prefix_match("a/*/c", "a/b/c"), (true, false));
        assert_eq!(prefix_match("a/*/c", "x"), (false, true));
        assert_eq!(prefix_match("*.txt", "a.txt"), (true, false));
        assert_eq!(prefix_match("*.txt", "d/a.txt"), (false, false));
    }
}
