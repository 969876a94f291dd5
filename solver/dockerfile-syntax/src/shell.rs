//! Shell-word processing as BuildKit v0.11.6's `frontend/dockerfile/shell` lexer does it:
//! quotes, escapes and `$VAR` / `${VAR}` / `${VAR:-x}` / `${VAR:+x}` / `${VAR?x}` /
//! `${VAR:?x}` expansion against an environment, plus splitting into words.
//!
//! The modes (`raw_quotes`, `raw_escapes`, `skip_process_quotes`, `skip_unset_env`) are the
//! ones the parser and the converter switch on for heredoc detection, display names and
//! heredoc bodies.

use std::collections::{BTreeMap, BTreeSet};

/// Errors from word processing. Display texts are BuildKit's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// Every error is reported wrapped with the word being processed.
    #[error("failed to process {word}: {reason}")]
    Process { word: String, reason: String },
}

/// An environment as BuildKit's `BuildEnvs` builds it: later entries win.
pub type Env = BTreeMap<String, String>;

/// `KEY=VALUE` entries to a map (an entry without `=` maps to the empty string).
pub fn build_envs<S: AsRef<str>>(entries: &[S]) -> Env {
    let mut env = Env::new();
    for entry in entries {
        let entry = entry.as_ref();
        match entry.split_once('=') {
            Some((k, v)) => env.insert(k.to_owned(), v.to_owned()),
            None => env.insert(entry.to_owned(), String::new()),
        };
    }
    env
}

/// A word processor configured like BuildKit's `shell.Lex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lex {
    pub escape_token: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset_env: bool,
}

impl Lex {
    pub fn new(escape_token: char) -> Self {
        Lex {
            escape_token,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Expands `word` against `env`.
    pub fn process_word(&self, word: &str, env: &Env) -> Result<String, ShellError> {
        self.process(word, env).map(|(w, _, _)| w)
    }

    /// Expands `word` and splits the result into words (quotes keep spaces).
    pub fn process_words(&self, word: &str, env: &Env) -> Result<Vec<String>, ShellError> {
        self.process(word, env).map(|(_, words, _)| words)
    }

    /// Expands `word` and also returns the names of the variables that were found.
    pub fn process_word_with_matches(
        &self,
        word: &str,
        env: &Env,
    ) -> Result<(String, BTreeSet<String>), ShellError> {
        self.process(word, env).map(|(w, _, m)| (w, m))
    }

    fn process(
        &self,
        word: &str,
        env: &Env,
    ) -> Result<(String, Vec<String>, BTreeSet<String>), ShellError> {
        let mut chars: Vec<char> = word.chars().collect();
        // Go's text/scanner skips a byte-order mark at the very start.
        if chars.first() == Some(&'\u{FEFF}') {
            chars.remove(0);
        }
        let mut sw = ShellWord {
            lex: *self,
            env,
            chars,
            pos: 0,
            matches: BTreeSet::new(),
        };
        match sw.process_stop_on(None) {
            Ok((w, words)) => Ok((w, words, sw.matches)),
            Err(reason) => Err(ShellError::Process {
                word: crate::gocompat::quote(word),
                reason,
            }),
        }
    }
}

struct ShellWord<'a> {
    lex: Lex,
    env: &'a Env,
    chars: Vec<char>,
    pos: usize,
    matches: BTreeSet<String>,
}

#[derive(Default)]
struct Words {
    word: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !self.word.is_empty() {
                self.words.push(std::mem::take(&mut self.word));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.word.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }

    fn add_raw_string(&mut self, s: &str) {
        self.word.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.word.is_empty() {
            self.words.push(std::mem::take(&mut self.word));
        }
        self.words
    }
}

type Step<T> = Result<T, String>;

impl ShellWord<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_stop_on(&mut self, stop: Option<char>) -> Step<(String, Vec<String>)> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.next();
                return Ok((result, words.finish()));
            }
            let special = ch == '$' || (!self.lex.skip_process_quotes && (ch == '\'' || ch == '"'));
            if special {
                let tmp = match ch {
                    '$' => self.process_dollar()?,
                    '\'' => self.process_single_quote()?,
                    _ => self.process_double_quote()?,
                };
                result.push_str(&tmp);
                if ch == '$' {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
                continue;
            }
            let mut ch = ch;
            self.next();
            if ch == self.lex.escape_token {
                if self.lex.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                // The escape character escapes the next one, except at the end.
                match self.next() {
                    None => break,
                    Some(c) => {
                        ch = c;
                        words.add_raw_char(ch);
                    }
                }
            } else {
                words.add_char(ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Step<String> {
        // Everything up to the next single quote is literal; it cannot be escaped.
        let mut result = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Step<String> {
        // Literal except `$` expansions; the escape character only escapes `"`, `$` and
        // itself.
        let mut result = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let value = self.process_dollar()?;
                    result.push_str(&value);
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape_token {
                        if self.lex.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape_token => {
                                ch = c;
                                self.next();
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Step<String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            let value = self.get_env(&name);
            return match value {
                None if self.lex.skip_unset_env => Ok(format!("${name}")),
                v => Ok(v.unwrap_or_default()),
            };
        }
        self.next();
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.process_name();
        match self.next() {
            Some('}') => match self.get_env(&name) {
                None if self.lex.skip_unset_env => Ok(format!("${{{name}}}")),
                v => Ok(v.unwrap_or_default()),
            },
            Some('?') => {
                let word = self.stop_on_brace()?;
                match self.get_env(&name) {
                    None if self.lex.skip_unset_env => Ok(format!("${{{name}?{word}}}")),
                    None => {
                        let message = if word.is_empty() {
                            "is not allowed to be unset".to_owned()
                        } else {
                            word
                        };
                        Err(format!("{name}: {message}"))
                    }
                    Some(v) => Ok(v),
                }
            }
            Some(':') => {
                let modifier = self.next();
                let word = self.stop_on_brace()?;
                let found = self.get_env(&name);
                let unset_raw = || {
                    format!(
                        "${{{name}:{}{word}}}",
                        modifier.map(String::from).unwrap_or_default()
                    )
                };
                match modifier {
                    Some('+') => {
                        if found.is_none() && self.lex.skip_unset_env {
                            return Ok(unset_raw());
                        }
                        let value = found.unwrap_or_default();
                        Ok(if value.is_empty() {
                            value
                        } else {
                            word.clone()
                        })
                    }
                    Some('-') => {
                        if found.is_none() && self.lex.skip_unset_env {
                            return Ok(unset_raw());
                        }
                        let value = found.unwrap_or_default();
                        Ok(if value.is_empty() {
                            word.clone()
                        } else {
                            value
                        })
                    }
                    Some('?') => match found {
                        None if self.lex.skip_unset_env => Ok(unset_raw()),
                        None => Err(format!(
                            "{name}: {}",
                            if word.is_empty() {
                                "is not allowed to be unset"
                            } else {
                                &word
                            }
                        )),
                        Some(v) if v.is_empty() => Err(format!(
                            "{name}: {}",
                            if word.is_empty() {
                                "is not allowed to be empty"
                            } else {
                                &word
                            }
                        )),
                        Some(v) => Ok(v),
                    },
                    other => Err(format!(
                        "unsupported modifier ({}) in substitution",
                        other
                            .map(String::from)
                            .unwrap_or_else(|| "%!c(int32=-1)".into())
                    )),
                }
            }
            _ => Err("missing ':' in substitution".into()),
        }
    }

    /// The word up to the closing brace of a `${…}` form.
    fn stop_on_brace(&mut self) -> Step<String> {
        match self.process_stop_on(Some('}')) {
            Ok((word, _)) => Ok(word),
            Err(e) => {
                if self.peek().is_none() {
                    Err("syntax error: missing '}'".into())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn process_name(&mut self) -> String {
        // A name is alphanumeric or `_`; a leading digit reads all digits; a special
        // parameter is one character.
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_decimal_digit(ch) {
                while let Some(c) = self.peek() {
                    if !is_decimal_digit(c) {
                        break;
                    }
                    self.next();
                    name.push(c);
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !(ch.is_alphabetic() || is_decimal_digit(ch) || ch == '_') {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let value = self.env.get(name).cloned();
        if value.is_some() {
            self.matches.insert(name.to_owned());
        }
        value
    }
}

/// Go's `unicode.IsDigit` (category Nd): ASCII digits and the common decimal-digit blocks
/// (Rust has no Nd test; `char::is_numeric` also admits letter and other numbers).
fn is_decimal_digit(c: char) -> bool {
    const ZEROS: [u32; 36] = [
        0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6,
        0x0D66, 0x0DE6, 0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0,
        0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0,
        0xAA50, 0xABF0, 0xFF10,
    ];
    let cp = c as u32;
    c.is_ascii_digit() || ZEROS.iter().any(|zero| (*zero..zero + 10).contains(&cp))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env(entries: &[&str]) -> Env {
        build_envs(entries)
    }

    #[test]
    fn basic_expansion() {
        let lex = Lex::new('\\');
        let e = env(&["A=one", "B=two words", "EMPTY="]);
        assert_eq!(lex.process_word("${A}-x", &e).unwrap(), "one-x");
        assert_eq!(lex.process_word("${UNSET:-dflt}", &e).unwrap(), "dflt");
        assert_eq!(lex.process_word("${EMPTY:-dflt}", &e).unwrap(), "dflt");
        assert_eq!(lex.process_word("${A:+alt}", &e).unwrap(), "alt");
        assert_eq!(lex.process_word("${UNSET:+alt}", &e).unwrap(), "");
        assert_eq!(lex.process_word("\"${B}\"", &e).unwrap(), "two words");
        assert_eq!(lex.process_word("'$A'", &e).unwrap(), "$A");
        assert_eq!(lex.process_word("\\$A", &e).unwrap(), "$A");
        assert_eq!(
            lex.process_words("x${B}y \"a  b\"", &e).unwrap(),
            vec!["xtwo", "wordsy", "a  b"]
        );
    }

    #[test]
    fn errors_name_the_word() {
        let lex = Lex::new('\\');
        let err = lex.process_word("${VAR:?need it}", &env(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to process \"${VAR:?need it}\": VAR: need it"
        );
        let err = lex.process_word("${", &env(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "failed to process \"${\": syntax error: missing '}'"
        );
        let err = lex.process_word("\"abc", &env(&[])).unwrap_err();
        assert!(err.to_string().contains("matching double-quote"));
    }

    #[test]
    fn raw_modes_keep_quotes_and_unset_refs() {
        let mut lex = Lex::new('\\');
        lex.raw_quotes = true;
        lex.skip_unset_env = true;
        let e = env(&["HOME=/root"]);
        assert_eq!(
            lex.process_word("echo \"$HOME\" '$X' ${Y:-z} $Z", &e)
                .unwrap(),
            "echo \"/root\" '$X' ${Y:-z} $Z"
        );
    }

    #[test]
    fn matches_report_used_variables() {
        let lex = Lex::new('\\');
        let (w, m) = lex
            .process_word_with_matches("$A/${B}/$C", &env(&["A=1", "B=2"]))
            .unwrap();
        assert_eq!(w, "1/2/");
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec!["A", "B"]);
    }

    #[test]
    fn backtick_escape() {
        let lex = Lex::new('`');
        assert_eq!(lex.process_word("a`$b\\c", &env(&[])).unwrap(), "a$b\\c");
    }
}
