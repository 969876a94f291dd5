//! A copy's `include_patterns` and `exclude_patterns`, filtered as fsutil's copier does.
//!
//! Exclude patterns are Docker's `fileutils.PatternMatcher` (the `.dockerignore` syntax):
//! each pattern is cleaned, a leading `!` makes it an exception, and it is translated to an
//! anchored regular expression (`*` = `[^/]*`, `?` = `[^/]`, `**` = any number of
//! components, `\` escapes); the last pattern that matches a path or one of its parent
//! directories decides. This is neither gitignore (patterns are anchored at the source
//! root, a `/`-less pattern does not float to every level) nor a shell glob, so `ignore`
//! and `globset` would select different files; the translation to the `regex` crate (the
//! same RE2 dialect as Go's `regexp`) keeps Docker's exact behaviour, including its
//! quirks for unusual characters in patterns.
//!
//! Include patterns are matched with `filepath.Match` against as many leading components
//! as the path has (`prefix.Match`), so `a/*/c` lets the walk enter `a` and `a/b` and
//! creates those directories only when something below them is included.

use regex::Regex;

use crate::glob;
use kiln_proto::paths::clean as clean_path;

/// Errors in include/exclude patterns.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("invalid excludepatterns: {patterns:?}: illegal exclusion pattern: \"!\"")]
    BareExclamation { patterns: Vec<String> },
    #[error("invalid excludepatterns: {patterns:?}: {pattern:?}: syntax error in pattern")]
    Syntax {
        patterns: Vec<String>,
        pattern: String,
    },
}

#[derive(Debug)]
struct Pattern {
    cleaned: String,
    components: usize,
    exclusion: bool,
    regex: Regex,
}

/// The compiled exclude patterns.
#[derive(Debug)]
pub struct ExcludeMatcher {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl ExcludeMatcher {
    /// `fileutils.NewPatternMatcher`; `None` when there are no patterns.
    pub fn new(patterns: &[String]) -> Result<Option<Self>, PatternError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut compiled = Vec::new();
        let mut exclusions = false;
        for raw in patterns {
            let trimmed = raw.trim();
            if trimmed.is_empty() {
                continue;
            }
            let mut cleaned = clean_path(trimmed);
            let mut exclusion = false;
            if let Some(rest) = cleaned.strip_prefix('!') {
                if rest.is_empty() {
                    return Err(PatternError::BareExclamation {
                        patterns: patterns.to_vec(),
                    });
                }
                exclusion = true;
                exclusions = true;
                cleaned = rest.to_owned();
            }
            let syntax = || PatternError::Syntax {
                patterns: patterns.to_vec(),
                pattern: raw.clone(),
            };
            // Docker checks the syntax with filepath.Match before translating.
            glob::matches(&cleaned, ".").map_err(|_| syntax())?;
            let regex = Regex::new(&to_regex(&cleaned)).map_err(|_| syntax())?;
            compiled.push(Pattern {
                components: cleaned.split('/').count(),
                cleaned,
                exclusion,
                regex,
            });
        }
        Ok(Some(ExcludeMatcher {
            patterns: compiled,
            exclusions,
        }))
    }

    /// `PatternMatcher.Matches(path)` for a `/`-separated path relative to the source.
    fn matches(&self, path: &str) -> bool {
        let parent = match path.rfind('/') {
            Some(i) => &path[..i],
            None => ".",
        };
        let parent_dirs: Vec<&str> = parent.split('/').collect();
        let mut matched = false;
        for pattern in &self.patterns {
            // An inclusion cannot change a match, an exception cannot change a miss.
            if pattern.exclusion != matched {
                continue;
            }
            let mut hit = pattern.regex.is_match(path);
            if !hit && parent != "." && pattern.components <= parent_dirs.len() {
                hit = pattern
                    .regex
                    .is_match(&parent_dirs[..pattern.components].join("/"));
            }
            if hit {
                matched = !pattern.exclusion;
            }
        }
        matched
    }

    /// fsutil's `exclude`: a matched directory is still entered when an exception
    /// pattern lies below it, so re-included files inside can be found.
    pub fn excludes(&self, path: &str, is_dir: bool) -> bool {
        if !self.matches(path) {
            return false;
        }
        if is_dir && self.exclusions {
            let dir_slash = format!("{path}/");
            let reincluded_below = self
                .patterns
                .iter()
                .filter(|p| p.exclusion)
                .any(|p| format!("{}/", p.cleaned).starts_with(&dir_slash));
            if reincluded_below {
                return false;
            }
        }
        true
    }
}

/// fileutils' pattern → regular expression translation.
fn to_regex(pattern: &str) -> String {
    let mut out = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => {
                if chars.peek() == Some(&'*') {
                    chars.next();
                    // `**/` is `**`.
                    if chars.peek() == Some(&'/') {
                        chars.next();
                    }
                    if chars.peek().is_none() {
                        out.push_str(".*");
                    } else {
                        out.push_str("(.*/)?");
                    }
                } else {
                    out.push_str("[^/]*");
                }
            }
            '?' => out.push_str("[^/]"),
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '\\' => match chars.next() {
                Some(next) => {
                    out.push('\\');
                    out.push(next);
                }
                None => out.push_str("\\\\"),
            },
            c => out.push(c),
        }
    }
    out.push('$');
    out
}

/// fsutil's `include`: whether `path` is included, and whether everything below it is
/// (so patterns need not be checked further down).
pub fn include(patterns: &[String], path: &str, is_dir: bool) -> (bool, bool) {
    let mut matched = false;
    let mut partial = true;
    for pattern in patterns {
        let pattern = if is_dir {
            pattern.strip_suffix('/').unwrap_or(pattern)
        } else {
            pattern.as_str()
        };
        let (ok, is_partial) = glob::prefix_match(pattern, path);
        if ok {
            matched = true;
            if !is_partial {
                partial = false;
                break;
            }
        }
    }
    if !matched {
        return (false, false);
    }
    if is_dir {
        (true, !partial)
    } else {
        (!partial, !partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(patterns: &[&str]) -> ExcludeMatcher {
        let patterns: Vec<String> = patterns.iter().map(|s| (*s).to_owned()).collect();
        ExcludeMatcher::new(&patterns).unwrap().unwrap()
    }

    #[test]
    fn dockerignore_semantics() {
        let m = matcher(&["*.log", "!keep.log", "build/**", "**/tmp"]);
        assert!(m.matches("a.log"));
        assert!(!m.matches("keep.log"));
        assert!(!m.matches("sub/a.log"), "patterns are anchored at the root");
        assert!(m.matches("build/x/y"));
        assert!(m.matches("tmp") && m.matches("a/b/tmp"));
        assert!(
            m.matches("a/tmp/inside"),
            "a matching parent directory counts"
        );
        assert!(!m.matches("a.txt"));
    }

    #[test]
    fn regex_translation_escapes_what_filepath_match_treats_literally() {
        assert_eq!(to_regex("a.b"), "^a\\.b$");
        assert_eq!(to_regex("**"), "^.*$");
        assert_eq!(to_regex("**/x"), "^(.*/)?x$");
        assert_eq!(to_regex("a?[bc]"), "^a[^/][bc]$");
        let m = matcher(&["a+b(c)"]);
        assert!(m.matches("a+b(c)"));
    }

    #[test]
    fn excluded_directories_with_exceptions_below_are_entered() {
        let m = matcher(&["dir", "!dir/keep"]);
        assert!(!m.excludes("dir", true));
        assert!(m.excludes("dir/other", false));
        assert!(!m.excludes("dir/keep", false));
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(ExcludeMatcher::new(&["!".to_owned()]).is_err());
        assert!(ExcludeMatcher::new(&["[".to_owned()]).is_err());
        assert!(ExcludeMatcher::new(&[]).unwrap().is_none());
    }

    #[test]
    fn include_partial_and_full_matches() {
        let pats = vec!["a/*/c".to_owned()];
        assert_eq!(include(&pats, "a", true), (true, false));
        assert_eq!(include(&pats, "a/b", true), (true, false));
        assert_eq!(include(&pats, "a/b/c", false), (true, true));
        assert_eq!(include(&pats, "a/b/d", false), (false, false));
        assert_eq!(include(&pats, "x", true), (false, false));
        let pats = vec!["*.txt".to_owned()];
        assert_eq!(include(&pats, "a.txt", false), (true, true));
        assert_eq!(include(&pats, "dir", true), (false, false));
    }
}
