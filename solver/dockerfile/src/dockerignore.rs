//! `.dockerignore` reading (BuildKit v0.11.6 `frontend/dockerfile/dockerignore`): the
//! patterns become the build context's `local.excludepatterns`. Matching the patterns
//! against files is the job of whoever transfers the context.

/// Reads `.dockerignore` content into exclude patterns: comments and blank lines dropped,
/// each pattern trimmed and cleaned, a leading `/` removed, `!` exceptions kept.
pub fn read_all(content: &[u8]) -> Vec<String> {
    let content = content.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(content);
    let text = String::from_utf8_lossy(content);
    let mut excludes = Vec::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern[1..].trim();
        }
        let mut cleaned = String::new();
        if !pattern.is_empty() {
            cleaned = kiln_proto::paths::clean(pattern);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
        }
        if invert {
            cleaned.insert(0, '!');
        }
        excludes.push(cleaned);
    }
    excludes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_cleaned_like_buildkit() {
        let input = b"\xEF\xBB\xBF# comment\n  node_modules/  \r\n\n/abs/./x\n! keep/../me\n!\n/\n*.md\n #not a comment\n";
        assert_eq!(
            read_all(input),
            vec![
                "node_modules",
                "abs/x",
                "!me",
                "!",
                "/",
                "*.md",
                "#not a comment"
            ]
        );
        assert!(read_all(b"").is_empty());
    }
}
