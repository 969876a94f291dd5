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
//!
//! [`PatternMatcher`] is `moby/patternmatcher` v0.5.0 as fsutil's walker uses it for
//! local sources (both include and exclude patterns there): the same pattern language,
//! with its exact, prefix (`a/**`) and suffix (`**/a`, `**a`) shortcuts, matched with
//! `MatchesUsingParentResults` (a directory's per-pattern results carry to its entries).

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
    #[error("invalid {which}: {patterns:?}: {reason}")]
    Invalid {
        which: &'static str,
        patterns: Vec<String>,
        reason: String,
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

/// How one [`PatternMatcher`] pattern matches (patternmatcher's `matchType`).
#[derive(Debug)]
enum MatchKind {
    Exact,
    /// `prefix**`: everything starting with the prefix.
    Prefix(String),
    /// `**suffix` (the suffix may start with `/`).
    Suffix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct MatcherPattern {
    cleaned: String,
    exclusion: bool,
    kind: MatchKind,
}

impl MatcherPattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            MatchKind::Exact => path == self.cleaned,
            MatchKind::Prefix(prefix) => path.starts_with(prefix.as_str()),
            MatchKind::Suffix(suffix) => {
                path.ends_with(suffix.as_str())
                    || suffix.strip_prefix('/').is_some_and(|bare| path == bare)
            }
            MatchKind::Regex(regex) => regex.is_match(path),
        }
    }

    /// The pattern without a trailing `/**` or `/*` (fsutil's `patternWithoutTrailingGlob`).
    fn without_trailing_glob(&self) -> &str {
        let p = self.cleaned.as_str();
        let p = p.strip_suffix("/**").unwrap_or(p);
        p.strip_suffix("/*").unwrap_or(p)
    }
}

/// patternmatcher's `Pattern.compile`: the match kind of a cleaned pattern.
fn compile(pattern: &str) -> Result<MatchKind, regex::Error> {
    #[derive(PartialEq)]
    enum Kind {
        Exact,
        Prefix,
        Suffix,
        Regex,
    }
    let mut re = String::from("^");
    let mut kind = Kind::Exact;
    let chars: Vec<char> = pattern.chars().collect();
    let mut pos = 0;
    let mut i = 0;
    while pos < chars.len() {
        let c = chars[pos];
        pos += 1;
        match c {
            '*' if chars.get(pos) == Some(&'*') => {
                pos += 1;
                if chars.get(pos) == Some(&'/') {
                    pos += 1;
                }
                if pos == chars.len() {
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = Kind::Regex;
                    }
                } else {
                    re.push_str("(.*/)?");
                    kind = Kind::Regex;
                }
                if i == 0 {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                kind = Kind::Regex;
            }
            '?' => {
                re.push_str("[^/]");
                kind = Kind::Regex;
            }
            '.' | '+' | '(' | ')' | '|' | '{' | '}' | '$' => {
                re.push('\\');
                re.push(c);
            }
            '\\' => match chars.get(pos) {
                Some(&next) => {
                    pos += 1;
                    re.push('\\');
                    re.push(next);
                    kind = Kind::Regex;
                }
                None => re.push('\\'),
            },
            '[' | ']' => {
                re.push(c);
                kind = Kind::Regex;
            }
            c => re.push(c),
        }
        i += 1;
    }
    Ok(match kind {
        Kind::Exact => MatchKind::Exact,
        Kind::Prefix => MatchKind::Prefix(pattern[..pattern.len() - 2].to_owned()),
        Kind::Suffix => MatchKind::Suffix(pattern[2..].to_owned()),
        Kind::Regex => {
            re.push('$');
            MatchKind::Regex(Regex::new(&re)?)
        }
    })
}

/// The per-pattern results of a directory, handed to its entries (patternmatcher's
/// `MatchInfo`; the default means "no parent results").
#[derive(Clone, Debug, Default)]
pub struct MatchInfo {
    parent_matched: Vec<bool>,
}

/// `moby/patternmatcher` v0.5.0's `PatternMatcher`.
#[derive(Debug)]
pub struct PatternMatcher {
    patterns: Vec<MatcherPattern>,
    exclusions: bool,
}

impl PatternMatcher {
    /// `patternmatcher.New`; `which` names the list in errors (`includepatterns`,
    /// `excludepatterns`), as fsutil's walker does.
    pub fn new(which: &'static str, patterns: &[String]) -> Result<Self, PatternError> {
        let invalid = |reason: &str| PatternError::Invalid {
            which,
            patterns: patterns.to_vec(),
            reason: reason.to_owned(),
        };
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
                    return Err(invalid("illegal exclusion pattern: \"!\""));
                }
                exclusion = true;
                exclusions = true;
                cleaned = rest.to_owned();
            }
            glob::matches(&cleaned, ".").map_err(|_| invalid("syntax error in pattern"))?;
            let kind = compile(&cleaned).map_err(|_| invalid("syntax error in pattern"))?;
            compiled.push(MatcherPattern {
                cleaned,
                exclusion,
                kind,
            });
        }
        Ok(PatternMatcher {
            patterns: compiled,
            exclusions,
        })
    }

    /// Whether any pattern is an exception (`!…`).
    pub fn exclusions(&self) -> bool {
        self.exclusions
    }

    /// `MatchesUsingParentResults`: whether `path` (relative, `/`-separated) matches, and
    /// the results its entries need when it is a directory.
    pub fn matches(&self, path: &str, parent: &MatchInfo) -> (bool, MatchInfo) {
        let mut matched = false;
        let mut info = MatchInfo {
            parent_matched: vec![false; self.patterns.len()],
        };
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut hit = parent.parent_matched.get(i).copied().unwrap_or(false);
            if !hit {
                // An inclusion cannot change a match, an exception cannot change a miss.
                if pattern.exclusion != matched {
                    continue;
                }
                hit = pattern.matches(path);
                if !hit && parent.parent_matched.is_empty() {
                    // No parent results: try the parent directories themselves.
                    if let Some((dir, _)) = path.rsplit_once('/') {
                        let mut prefix_end = 0;
                        for component in dir.split('/') {
                            prefix_end += component.len();
                            if pattern.matches(&dir[..prefix_end]) {
                                hit = true;
                                break;
                            }
                            prefix_end += 1;
                        }
                    }
                }
            }
            info.parent_matched[i] = hit;
            if hit {
                matched = !pattern.exclusion;
            }
        }
        (matched, info)
    }

    /// Whether every pattern of the given kind (exceptions or not), without a trailing
    /// glob, is a plain path: then whether a directory can hold matches is a prefix test.
    pub fn only_prefixes(&self, exceptions: bool) -> bool {
        self.patterns
            .iter()
            .filter(|p| p.exclusion == exceptions)
            .all(|p| {
                !p.without_trailing_glob()
                    .contains(['*', '[', ']', '?', '^', '\\'])
            })
    }

    /// Whether a pattern of the given kind (without its trailing glob) lies below `dir`.
    pub fn has_pattern_below(&self, dir: &str, exceptions: bool) -> bool {
        let dir_slash = format!("{dir}/");
        self.patterns
            .iter()
            .filter(|p| p.exclusion == exceptions)
            .any(|p| format!("{}/", p.without_trailing_glob()).starts_with(&dir_slash))
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

    fn pm(patterns: &[&str]) -> PatternMatcher {
        let patterns: Vec<String> = patterns.iter().map(|s| (*s).to_owned()).collect();
        PatternMatcher::new("excludepatterns", &patterns).unwrap()
    }

    /// Matches `path` as fsutil's walker does: each parent directory first.
    fn walk_match(m: &PatternMatcher, path: &str) -> bool {
        let mut info = MatchInfo::default();
        let mut result = false;
        let mut current = String::new();
        for component in path.split('/') {
            if !current.is_empty() {
                current.push('/');
            }
            current.push_str(component);
            (result, info) = m.matches(&current, &info);
        }
        result
    }

    #[test]
    fn pattern_matcher_kinds() {
        let m = pm(&["exact.txt", "pre/**", "**/suf", "**tail", "*.log", "a\\*b"]);
        assert!(matches!(m.patterns[0].kind, MatchKind::Exact));
        assert!(matches!(m.patterns[1].kind, MatchKind::Prefix(ref p) if p == "pre/"));
        assert!(matches!(m.patterns[2].kind, MatchKind::Suffix(ref s) if s == "/suf"));
        assert!(matches!(m.patterns[3].kind, MatchKind::Suffix(ref s) if s == "tail"));
        assert!(matches!(m.patterns[4].kind, MatchKind::Regex(_)));
        assert!(walk_match(&m, "exact.txt"));
        assert!(walk_match(&m, "pre/x/y"));
        assert!(walk_match(&m, "suf") && walk_match(&m, "a/b/suf"));
        assert!(walk_match(&m, "xtail"), "the suffix shortcut of v0.5.0");
        assert!(walk_match(&m, "x.log") && !walk_match(&m, "d/x.log"));
        assert!(walk_match(&m, "a*b") && !walk_match(&m, "axb"));
        assert!(
            walk_match(&m, "exact.txt/inside"),
            "a matching parent matches"
        );
    }

    #[test]
    fn pattern_matcher_exceptions_and_parents() {
        let m = pm(&["dir", "!dir/keep", "*.md", "!README.md"]);
        assert!(walk_match(&m, "dir"));
        assert!(walk_match(&m, "dir/other"));
        assert!(!walk_match(&m, "dir/keep"));
        assert!(
            !walk_match(&m, "dir/keep/deep"),
            "the exception's results carry down"
        );
        assert!(walk_match(&m, "a.md") && !walk_match(&m, "README.md"));
        assert!(m.exclusions());
        assert!(m.has_pattern_below("dir", true));
        assert!(!m.has_pattern_below("other", true));
        // Without parent results the parents are tried (a root-level call).
        let (hit, _) = m.matches("dir/x", &MatchInfo::default());
        assert!(hit);
    }

    #[test]
    fn pattern_matcher_prefix_analysis() {
        assert!(pm(&["a/b", "c/**", "d/*"]).only_prefixes(false));
        assert!(!pm(&["a/*.go"]).only_prefixes(false));
        assert!(pm(&["a/*.go", "!keep"]).only_prefixes(true));
        let err = PatternMatcher::new("includepatterns", &["!".to_owned()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid includepatterns: [\"!\"]: illegal exclusion pattern: \"!\""
        );
        assert!(PatternMatcher::new("includepatterns", &["[".to_owned()]).is_err());
    }
}
