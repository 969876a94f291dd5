//! The Dockerfile parser of BuildKit v0.11.6 (`frontend/dockerfile/parser`): lines,
//! comments, parser directives (`# escape=`, `# syntax=`), line continuations, heredocs and
//! the per-instruction argument forms (JSON arrays, whitespace lists, `KEY=VALUE` pairs,
//! `ONBUILD` sub-commands, `HEALTHCHECK` types), producing an AST of [`Node`]s.
//!
//! Instruction names are not validated here; [`crate::instructions`] does that.

use std::sync::LazyLock;

use regex::Regex;

use crate::shell::{Env, Lex};

/// Errors from parsing. Display texts are BuildKit's; [`ParseError::lines`] gives the
/// location BuildKit attaches.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid escape token '{0}' does not match ` or \\")]
    InvalidEscapeToken(String, usize),
    #[error("only one {0} parser directive can be used")]
    RepeatedDirective(String, usize),
    #[error("unterminated heredoc")]
    UnterminatedHeredoc(usize, usize),
    #[error("file with no instructions")]
    NoInstructions(usize),
    #[error("dockerfile line greater than max allowed size of 65535")]
    LineTooLong(usize),
    #[error("{message}")]
    Line {
        message: String,
        start: usize,
        end: usize,
    },
}

impl ParseError {
    /// First and last line (1-based) of the location BuildKit reports.
    pub fn lines(&self) -> (usize, usize) {
        match self {
            ParseError::InvalidEscapeToken(_, l)
            | ParseError::RepeatedDirective(_, l)
            | ParseError::NoInstructions(l)
            | ParseError::LineTooLong(l) => (*l, *l),
            ParseError::UnterminatedHeredoc(s, e) => (*s, (*e).max(*s)),
            ParseError::Line { start, end, .. } => (*start, (*end).max(*start)),
        }
    }
}

/// An inline document attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    pub name: String,
    pub file_descriptor: u64,
    /// Whether variables in the content are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are removed from content lines.
    pub chomp: bool,
    pub content: String,
}

/// One element of an instruction's argument list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    Word(String),
    /// The instruction inside `ONBUILD`.
    Sub(Box<Node>),
}

/// One instruction as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The instruction name as written.
    pub value: String,
    pub args: Vec<Arg>,
    pub heredocs: Vec<Heredoc>,
    /// The arguments were a JSON array.
    pub json: bool,
    /// The logical line (continuations joined) the node was parsed from.
    pub original: String,
    /// `--flag[=value]` words before the arguments.
    pub flags: Vec<String>,
    pub start_line: usize,
    pub end_line: usize,
    /// Comment lines directly above the instruction.
    pub prev_comment: Vec<String>,
}

impl Node {
    /// The lines the node spans, one per line as BuildKit reports locations.
    pub fn location(&self) -> Vec<(usize, usize)> {
        to_ranges(self.start_line, self.end_line)
    }

    /// BuildKit's `Node.Dump` (used by its parser tests).
    pub fn dump(&self) -> String {
        let mut out = self.value.to_lowercase();
        if !self.flags.is_empty() {
            out.push(' ');
            out.push_str(&crate::gocompat::quote_list(&self.flags));
        }
        for arg in &self.args {
            match arg {
                Arg::Word(w) => {
                    out.push(' ');
                    out.push_str(&crate::gocompat::quote(w));
                }
                Arg::Sub(node) => {
                    out.push_str(" (");
                    out.push_str(&node.dump());
                    out.push(')');
                }
            }
        }
        out.trim().to_owned()
    }

    fn can_contain_heredoc(&self) -> bool {
        let mut node = self;
        if node.value.eq_ignore_ascii_case("onbuild")
            && let Some(Arg::Sub(child)) = node.args.first()
        {
            node = child;
        }
        matches!(node.value.to_lowercase().as_str(), "add" | "copy" | "run") && !node.json
    }
}

/// One line per range, as BuildKit's `toRanges`.
pub fn to_ranges(start: usize, end: usize) -> Vec<(usize, usize)> {
    let end = end.max(start);
    (start..=end).map(|l| (l, l)).collect()
}

/// A non-fatal finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub short: String,
    pub detail: Vec<String>,
    pub url: String,
    pub line: Option<usize>,
}

/// The parsed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub children: Vec<Node>,
    pub escape_token: char,
    pub warnings: Vec<Warning>,
}

impl Parsed {
    /// BuildKit's root `Node.Dump`.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for child in &self.children {
            out.push('(');
            out.push_str(&child.dump());
            out.push_str(")\n");
        }
        out.trim().to_owned()
    }
}

/// A parser directive found at the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    pub value: String,
    pub line: usize,
}

/// Go RE2 `\s` is ASCII only and excludes `\v`.
const SPACE: &str = r"[\t\n\f\r ]";

static WHITESPACE: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"[\t\x0B\f\r ]+"));
static HEREDOC: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"^([0-9]*)<<(-?)([^<]*)$"));
static LEADING_TABS: LazyLock<Regex> = LazyLock::new(|| regex_or_never(r"(?m)^\t+"));
static HASH_DIRECTIVE: LazyLock<Regex> = LazyLock::new(|| directive_regex("#"));
static SLASH_DIRECTIVE: LazyLock<Regex> = LazyLock::new(|| directive_regex("//"));

fn directive_regex(comment: &str) -> Regex {
    regex_or_never(&format!(
        r"^{}{SPACE}*([a-zA-Z][a-zA-Z0-9]*){SPACE}*={SPACE}*(.+?){SPACE}*$",
        regex::escape(comment)
    ))
}

/// The patterns here are constants; should one ever fail to compile, a pattern that matches
/// nothing keeps the parser total instead of panicking.
fn regex_or_never(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|_| {
        #[allow(clippy::unwrap_used)] // a constant, valid pattern
        Regex::new(r"[^\s\S]").unwrap()
    })
}

/// Splits like Go's `regexp.Split(s, n)` on runs of Dockerfile whitespace.
fn split_whitespace(s: &str, n: Option<usize>) -> Vec<String> {
    match n {
        Some(n) => WHITESPACE.splitn(s, n).map(str::to_owned).collect(),
        None => WHITESPACE.split(s).map(str::to_owned).collect(),
    }
}

/// The directive parser: only leading comment lines of the form `# key=value` count.
#[derive(Debug, Default)]
struct DirectiveParser {
    line: usize,
    seen: Vec<String>,
    done: bool,
    slash_comments: bool,
}

impl DirectiveParser {
    fn parse_line(&mut self, line: &str) -> Result<Option<Directive>, ParseError> {
        self.line += 1;
        if self.done {
            return Ok(None);
        }
        let re = if self.slash_comments {
            &*SLASH_DIRECTIVE
        } else {
            &*HASH_DIRECTIVE
        };
        let Some(caps) = re.captures(line) else {
            self.done = true;
            return Ok(None);
        };
        let key = caps
            .get(1)
            .map(|m| m.as_str().to_lowercase())
            .unwrap_or_default();
        if key != "syntax" && key != "escape" {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&key) {
            return Err(ParseError::RepeatedDirective(key, self.line));
        }
        self.seen.push(key.clone());
        Ok(Some(Directive {
            name: key,
            value: caps
                .get(2)
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            line: self.line,
        }))
    }
}

/// The escape token and its line-continuation rule.
#[derive(Debug)]
struct Directives {
    parser: DirectiveParser,
    escape_token: char,
}

impl Directives {
    fn new() -> Self {
        Directives {
            parser: DirectiveParser::default(),
            escape_token: '\\',
        }
    }

    fn possible_parser_directive(&mut self, line: &str, line_no: usize) -> Result<(), ParseError> {
        if let Some(d) = self.parser.parse_line(line)?
            && d.name == "escape"
        {
            if d.value != "`" && d.value != "\\" {
                return Err(ParseError::InvalidEscapeToken(d.value, line_no));
            }
            self.escape_token = d.value.chars().next().unwrap_or('\\');
        }
        Ok(())
    }

    /// Strips a trailing continuation token (optionally followed by blanks) unless it is
    /// itself escaped; returns the line and whether the logical line ends here.
    fn trim_continuation(&self, line: &str) -> (String, bool) {
        let trimmed = line.trim_end_matches([' ', '\t']);
        let Some(before) = trimmed.strip_suffix(self.escape_token) else {
            return (line.to_owned(), true);
        };
        if before.is_empty() {
            return (String::new(), false);
        }
        if before.ends_with(self.escape_token) {
            return (line.to_owned(), true);
        }
        (before.to_owned(), false)
    }
}

fn trim_newline(s: &[u8]) -> &[u8] {
    let mut end = s.len();
    while end > 0 && (s[end - 1] == b'\n' || s[end - 1] == b'\r') {
        end -= 1;
    }
    &s[..end]
}

fn trim_leading_whitespace(s: &str) -> &str {
    s.trim_start()
}

fn is_comment(line: &str) -> bool {
    trim_leading_whitespace(line.trim_end_matches(['\r', '\n'])).starts_with('#')
}

fn process_line(
    d: &mut Directives,
    token: &str,
    strip_left_whitespace: bool,
    line_no: usize,
) -> Result<String, ParseError> {
    let mut token = token.trim_end_matches(['\r', '\n']);
    if strip_left_whitespace {
        token = trim_leading_whitespace(token);
    }
    let trimmed = if token.starts_with('#') { "" } else { token };
    d.possible_parser_directive(token, line_no)?;
    Ok(trimmed.to_owned())
}

/// Removes leading tabs from every line (`<<-` heredocs).
pub fn chomp_heredoc_content(src: &str) -> String {
    LEADING_TABS.replace_all(src, "").into_owned()
}

/// Parses `<<[-]WORD` (with an optional fd prefix) into a heredoc, or `None` when `src`
/// is not one.
pub fn parse_heredoc(src: &str) -> Result<Option<Heredoc>, String> {
    let Some(caps) = HEREDOC.captures(src) else {
        return Ok(None);
    };
    let fd = caps
        .get(1)
        .and_then(|m| m.as_str().parse::<u64>().ok())
        .unwrap_or(0);
    let chomp = caps.get(2).is_some_and(|m| m.as_str() == "-");
    let rest = caps.get(3).map(|m| m.as_str()).unwrap_or("");
    if rest.is_empty() {
        return Ok(None);
    }
    let env = Env::new();
    let mut lex = Lex::new('\\');
    lex.skip_unset_env = true;
    // Lexed with and without quotes: a difference in quote count means part of the word
    // was quoted, which turns expansion of the content off.
    let words = lex.process_words(rest, &env).map_err(|e| e.to_string())?;
    if words.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let raw = lex.process_words(rest, &env).map_err(|e| e.to_string())?;
    if raw.len() != words.len() {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    }
    let count = |w: &str| w.matches(['\'', '"']).count();
    let word = words[0].clone();
    Ok(Some(Heredoc {
        expand: count(&word) == count(&raw[0]),
        name: word,
        chomp,
        file_descriptor: fd,
        content: String::new(),
    }))
}

/// `parse_heredoc`, errors treated as "not a heredoc".
pub fn must_parse_heredoc(src: &str) -> Option<Heredoc> {
    parse_heredoc(src).ok().flatten()
}

fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let mut lex = Lex::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let words = lex.process_words(line, &Env::new()).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Parses a Dockerfile.
pub fn parse(data: &str) -> Result<Parsed, ParseError> {
    let mut d = Directives::new();
    let mut current_line = 0usize;
    let mut children: Vec<Node> = Vec::new();
    let mut warnings = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    let mut lines = ScanLines::new(data);

    while let Some(raw) = lines.next_line()? {
        let raw = if current_line == 0 {
            raw.strip_prefix('\u{FEFF}').unwrap_or(raw)
        } else {
            raw
        };
        if is_comment(raw) {
            // BuildKit drops the first byte (the `#` unless indented) before trimming.
            let comment = String::from_utf8_lossy(raw.as_bytes().get(1..).unwrap_or_default());
            let comment = comment.trim();
            if comment.is_empty() {
                comments.clear();
            } else {
                comments.push(comment.to_owned());
            }
        }
        let processed = process_line(&mut d, raw, true, current_line)?;
        current_line += 1;
        let start_line = current_line;
        let (mut line, mut end) = d.trim_continuation(&processed);
        if end && line.is_empty() {
            continue;
        }
        let mut has_empty_continuation = false;
        while !end {
            let Some(next) = lines.next_line()? else {
                break;
            };
            let processed = process_line(&mut d, next, false, current_line)?;
            current_line += 1;
            if is_comment(next) {
                continue;
            }
            if trim_leading_whitespace(&processed).is_empty() {
                has_empty_continuation = true;
                continue;
            }
            let (cont, e) = d.trim_continuation(&processed);
            end = e;
            line.push_str(&cont);
        }
        if has_empty_continuation {
            warnings.push(Warning {
                short: format!("Empty continuation line found in: {line}"),
                detail: vec![
                    "Empty continuation lines will become errors in a future release".into(),
                ],
                url: "https://github.com/moby/moby/pull/33719".into(),
                line: Some(current_line),
            });
        }
        let mut child =
            new_node_from_line(&line, &d, std::mem::take(&mut comments)).map_err(|message| {
                ParseError::Line {
                    message,
                    start: start_line,
                    end: current_line,
                }
            })?;
        if child.can_contain_heredoc() {
            let docs = heredocs_from_line(&line).map_err(|message| ParseError::Line {
                message,
                start: start_line,
                end: current_line,
            })?;
            for mut doc in docs {
                let mut terminated = false;
                while let Some(body) = lines.next_line()? {
                    current_line += 1;
                    let mut candidate = trim_newline(body.as_bytes());
                    if doc.chomp {
                        while let [b'\t', rest @ ..] = candidate {
                            candidate = rest;
                        }
                    }
                    if candidate == doc.name.as_bytes() {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(body);
                }
                if !terminated {
                    return Err(ParseError::UnterminatedHeredoc(start_line, current_line));
                }
                child.heredocs.push(doc);
            }
        }
        child.start_line = start_line;
        child.end_line = current_line;
        children.push(child);
        comments.clear();
    }
    if children.is_empty() {
        return Err(ParseError::NoInstructions(current_line));
    }
    Ok(Parsed {
        children,
        escape_token: d.escape_token,
        warnings,
    })
}

/// Lines with their endings kept, with bufio.Scanner's 64 KiB token limit.
struct ScanLines<'a> {
    rest: &'a str,
    line: usize,
}

impl<'a> ScanLines<'a> {
    fn new(data: &'a str) -> Self {
        ScanLines {
            rest: data,
            line: 0,
        }
    }

    fn next_line(&mut self) -> Result<Option<&'a str>, ParseError> {
        const MAX_TOKEN: usize = 64 * 1024;
        if self.rest.is_empty() {
            return Ok(None);
        }
        let (line, rest) = match self.rest.find('\n') {
            Some(i) => self.rest.split_at(i + 1),
            None => (self.rest, ""),
        };
        let too_long = if line.ends_with('\n') {
            line.len() > MAX_TOKEN
        } else {
            line.len() >= MAX_TOKEN
        };
        if too_long {
            return Err(ParseError::LineTooLong(self.line));
        }
        self.line += 1;
        self.rest = rest;
        Ok(Some(line))
    }
}

fn new_node_from_line(line: &str, d: &Directives, comments: Vec<String>) -> Result<Node, String> {
    let (cmd, flags, args) = split_command(line);
    let (args, json) = match cmd.to_lowercase().as_str() {
        "add" | "copy" | "volume" => parse_maybe_json_to_list(&args)?,
        "arg" => (parse_name_or_name_val(&args, d), false),
        "cmd" | "entrypoint" | "run" | "shell" => parse_maybe_json(&args)?,
        "env" => (parse_name_val(&args, "ENV", d)?, false),
        "label" => (parse_name_val(&args, "LABEL", d)?, false),
        "expose" | "from" => (parse_strings_whitespace_delimited(&args), false),
        "healthcheck" => parse_health_config(&args)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => (parse_string(&args), false),
        "onbuild" => (parse_sub_command(&args, d)?, false),
        // Unknown instructions keep an empty argument; instructions rejects them.
        _ => (vec![Arg::Word(String::new())], false),
    };
    Ok(Node {
        value: cmd,
        args,
        heredocs: Vec::new(),
        json,
        original: line.to_owned(),
        flags,
        start_line: 0,
        end_line: 0,
        prev_comment: comments,
    })
}

fn split_command(line: &str) -> (String, Vec<String>, String) {
    let parts = split_whitespace(line.trim(), Some(2));
    let cmd = parts.first().cloned().unwrap_or_default();
    let (args, flags) = match parts.get(1) {
        Some(rest) => extract_builder_flags(rest),
        None => (String::new(), Vec::new()),
    };
    (cmd, flags, args.trim().to_owned())
}

/// Splits leading `--flag` words off `line`; returns the rest and the flags.
fn extract_builder_flags(line: &str) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let bytes = line.as_bytes();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word: Vec<u8> = Vec::new();
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0;
    let finish = |w: &[u8]| String::from_utf8_lossy(w).into_owned();
    let rest_at = |pos: usize| String::from_utf8_lossy(&bytes[pos..]).into_owned();
    while pos <= bytes.len() {
        let ch = bytes.get(pos).copied().unwrap_or(0);
        if phase == Phase::Spaces {
            if pos == bytes.len() {
                break;
            }
            if is_space_byte(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == bytes.len() || bytes[pos + 1] != b'-' {
                return (rest_at(pos), words);
            }
            phase = Phase::Word;
        }
        if (phase == Phase::Word || phase == Phase::Quote) && pos == bytes.len() {
            if word != b"--" && (blank_ok || !word.is_empty()) {
                words.push(finish(&word));
            }
            break;
        }
        if phase == Phase::Word {
            if is_space_byte(ch) {
                phase = Phase::Spaces;
                if word == b"--" {
                    return (rest_at(pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(finish(&word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            let mut c = ch;
            if c == b'\\' {
                if pos + 1 == bytes.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                c = bytes[pos];
            }
            word.push(c);
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        let mut c = ch;
        if c == b'\\' {
            if pos + 1 == bytes.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            c = bytes[pos];
        }
        word.push(c);
        pos += 1;
    }
    (String::new(), words)
}

/// Splits words on whitespace keeping quotes (removed later by expansion).
fn parse_words(rest: &str, d: &Directives) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = chars.get(pos).copied().unwrap_or('\0');
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if (phase == Phase::Word || phase == Phase::Quote) && at_end {
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == d.escape_token {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                // An unquoted escape keeps itself and the next character, even a quote.
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Phase::Quote
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == d.escape_token && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

fn parse_name_val(rest: &str, key: &str, d: &Directives) -> Result<Vec<Arg>, String> {
    let words = parse_words(rest, d);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        // Old form: `KEY name value…`.
        let parts = split_whitespace(rest, Some(2));
        if parts.len() < 2 {
            return Err(format!("{key} must have two arguments"));
        }
        return Ok(parts.into_iter().map(Arg::Word).collect());
    }
    let mut out = Vec::new();
    for word in words {
        let Some((k, v)) = word.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                crate::gocompat::quote(&word)
            ));
        };
        out.push(Arg::Word(k.to_owned()));
        out.push(Arg::Word(v.to_owned()));
    }
    Ok(out)
}

fn parse_name_or_name_val(rest: &str, d: &Directives) -> Vec<Arg> {
    parse_words(rest, d).into_iter().map(Arg::Word).collect()
}

fn parse_strings_whitespace_delimited(rest: &str) -> Vec<Arg> {
    if rest.is_empty() {
        return Vec::new();
    }
    split_whitespace(rest, None)
        .into_iter()
        .map(Arg::Word)
        .collect()
}

fn parse_string(rest: &str) -> Vec<Arg> {
    if rest.is_empty() {
        return Vec::new();
    }
    vec![Arg::Word(rest.to_owned())]
}

enum JsonOutcome {
    Array(Vec<Arg>),
    NotJson,
    NotStrings,
}

fn parse_json(rest: &str) -> JsonOutcome {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return JsonOutcome::NotJson;
    }
    // Go's json.Decoder reads the first value and ignores what follows.
    let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
    match stream.next() {
        Some(Ok(serde_json::Value::Array(items))) => {
            let mut out = Vec::new();
            for item in items {
                match item {
                    serde_json::Value::String(s) => out.push(Arg::Word(s)),
                    _ => return JsonOutcome::NotStrings,
                }
            }
            JsonOutcome::Array(out)
        }
        _ => JsonOutcome::NotJson,
    }
}

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

fn parse_maybe_json(rest: &str) -> Result<(Vec<Arg>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json(rest) {
        JsonOutcome::Array(args) => Ok((args, true)),
        JsonOutcome::NotStrings => Err(NOT_STRING_ARRAY.into()),
        JsonOutcome::NotJson => Ok((vec![Arg::Word(rest.to_owned())], false)),
    }
}

fn parse_maybe_json_to_list(rest: &str) -> Result<(Vec<Arg>, bool), String> {
    match parse_json(rest) {
        JsonOutcome::Array(args) => Ok((args, true)),
        JsonOutcome::NotStrings => Err(NOT_STRING_ARRAY.into()),
        JsonOutcome::NotJson => Ok((parse_strings_whitespace_delimited(rest), false)),
    }
}

/// Go's `unicode.IsSpace(rune(b))` for a single byte (BuildKit tests bytes, not runes, here).
fn is_space_byte(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0)
}

fn parse_health_config(rest: &str) -> Result<(Vec<Arg>, bool), String> {
    let is_space = is_space_byte;
    let bytes = rest.as_bytes();
    let sep = bytes
        .iter()
        .position(|b| is_space(*b))
        .unwrap_or(bytes.len());
    if sep == 0 {
        return Ok((Vec::new(), false));
    }
    let next = bytes[sep..]
        .iter()
        .position(|b| !is_space(*b))
        .map_or(bytes.len(), |p| sep + p);
    let typ = String::from_utf8_lossy(&bytes[..sep]).into_owned();
    let rest_str = String::from_utf8_lossy(&bytes[next..]).into_owned();
    let (cmd, json) = parse_maybe_json(&rest_str)?;
    let mut args = vec![Arg::Word(typ)];
    args.extend(cmd);
    Ok((args, json))
}

fn parse_sub_command(rest: &str, d: &Directives) -> Result<Vec<Arg>, String> {
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let child = new_node_from_line(rest, d, Vec::new())?;
    Ok(vec![Arg::Sub(Box::new(child))])
}

/// What a `syntax` directive names: the frontend reference (up to the first space), the
/// full value and its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syntax {
    pub reference: String,
    pub cmdline: String,
    pub line: usize,
}

/// BuildKit's `DetectSyntax`: `# syntax=…`, then `// syntax=…`, then a JSON object with a
/// `syntax` key; a leading `#!` line is skipped.
pub fn detect_syntax(data: &str) -> Option<Syntax> {
    let (data, line) = match data.split_once('\n') {
        Some((first, rest)) if first.starts_with("#!") => (rest, 1),
        None if data.starts_with("#!") => ("", 1),
        _ => (data, 0),
    };
    for slash in [false, true] {
        let mut parser = DirectiveParser {
            line,
            slash_comments: slash,
            ..Default::default()
        };
        for l in data.lines() {
            if parser.done {
                break;
            }
            match parser.parse_line(l) {
                Ok(Some(d)) if d.name == "syntax" => {
                    let reference = d.value.split(' ').next().unwrap_or("").to_owned();
                    return Some(Syntax {
                        reference,
                        cmdline: d.value,
                        line: d.line,
                    });
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct JsonDirective {
        #[serde(default)]
        syntax: String,
    }
    if let Ok(j) = serde_json::from_str::<JsonDirective>(data)
        && !j.syntax.is_empty()
    {
        return Some(Syntax {
            reference: j.syntax.clone(),
            cmdline: j.syntax,
            line,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn words(node: &Node) -> Vec<String> {
        node.args
            .iter()
            .map(|a| match a {
                Arg::Word(w) => w.clone(),
                Arg::Sub(n) => format!("<{}>", n.value),
            })
            .collect()
    }

    #[test]
    fn continuation_comments_and_lines() {
        let p = parse("FROM x\nRUN a \\\n  # comment\n  b \\\n\n  c\nRUN d\n").unwrap();
        assert_eq!(p.children.len(), 3);
        let run = &p.children[1];
        assert_eq!(run.original, "RUN a   b   c");
        assert_eq!((run.start_line, run.end_line), (2, 6));
        assert_eq!(p.children[2].start_line, 7);
        assert_eq!(p.warnings.len(), 1, "empty continuation line warns");
        assert!(
            p.warnings[0]
                .short
                .starts_with("Empty continuation line found in: RUN a")
        );
    }

    #[test]
    fn escape_directive_changes_continuation() {
        let p = parse("# escape=`\nFROM x\nRUN a `\n  b\nCOPY c\\d e\n").unwrap();
        assert_eq!(p.escape_token, '`');
        assert_eq!(p.children[1].original, "RUN a   b");
        assert_eq!(words(&p.children[2]), vec!["c\\d", "e"]);
        let err = parse("# escape=x\nFROM x\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid escape token 'x' does not match ` or \\"
        );
        let err = parse("# escape=`\n# escape=\\\nFROM x\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "only one escape parser directive can be used"
        );
        // A directive after an instruction is an ordinary comment.
        let p = parse("FROM x\n# escape=`\nRUN a \\\n b\n").unwrap();
        assert_eq!(p.escape_token, '\\');
        assert_eq!(p.children[1].original, "RUN a  b");
    }

    #[test]
    fn flags_and_json_forms() {
        let p = parse("COPY --from=a --chown=\"x y\" [\"a b\", \"c\"]\nRUN [\"echo\", 1]\n");
        assert_eq!(
            p.unwrap_err().to_string(),
            "when using JSON array syntax, arrays must be comprised of strings only"
        );
        let p = parse("COPY --from=a --chown=\"x y\" [\"a b\", \"c\"]\nCMD [\"x\"] trailing\n")
            .unwrap();
        let copy = &p.children[0];
        assert_eq!(copy.flags, vec!["--from=a", "--chown=x y"]);
        assert!(copy.json);
        assert_eq!(words(copy), vec!["a b", "c"]);
        assert!(
            p.children[1].json,
            "trailing text after the array is ignored"
        );
        let p = parse("RUN -- --not-a-flag\nRUN [not json\n").unwrap();
        assert!(p.children[0].flags.is_empty());
        assert_eq!(words(&p.children[0]), vec!["--not-a-flag"]);
        assert!(!p.children[1].json);
        assert_eq!(words(&p.children[1]), vec!["[not json"]);
    }

    #[test]
    fn env_and_label_forms() {
        let p = parse("ENV A=1 B=\"two words\"\nENV OLD some value\nLABEL \"a b\"=c\n").unwrap();
        assert_eq!(words(&p.children[0]), vec!["A", "1", "B", "\"two words\""]);
        assert_eq!(words(&p.children[1]), vec!["OLD", "some value"]);
        assert_eq!(words(&p.children[2]), vec!["\"a b\"", "c"]);
        assert_eq!(
            parse("ENV A=1 B\n").unwrap_err().to_string(),
            "Syntax error - can't find = in \"B\". Must be of the form: name=value"
        );
        assert_eq!(
            parse("ENV A\n").unwrap_err().to_string(),
            "ENV must have two arguments"
        );
    }

    #[test]
    fn heredocs() {
        let df = "FROM x\nRUN <<EOF\necho hi\nEOF\nRUN <<-\"EOT\" cat\n\tkeep $X\n\tEOT\nCOPY <<A <<B /d/\na\nA\nb\nB\n";
        let p = parse(df).unwrap();
        let run = &p.children[1];
        assert_eq!(run.heredocs.len(), 1);
        assert_eq!(run.heredocs[0].name, "EOF");
        assert_eq!(run.heredocs[0].content, "echo hi\n");
        assert!(run.heredocs[0].expand);
        let quoted = &p.children[2];
        assert!(!quoted.heredocs[0].expand);
        assert!(quoted.heredocs[0].chomp);
        assert_eq!(quoted.heredocs[0].content, "\tkeep $X\n");
        let copy = &p.children[3];
        assert_eq!(copy.heredocs.len(), 2);
        assert_eq!((copy.start_line, copy.end_line), (8, 12));
        assert_eq!(
            parse("FROM x\nRUN <<EOF\nno end\n").unwrap_err(),
            ParseError::UnterminatedHeredoc(2, 3)
        );
        // JSON forms never carry heredocs.
        let p = parse("RUN [\"<<EOF\"]\nEOF\n").unwrap();
        assert!(p.children[0].heredocs.is_empty());
        assert_eq!(p.children.len(), 2);
        assert_eq!(chomp_heredoc_content("\t\ta\n\tb\nc"), "a\nb\nc");
        let h = parse_heredoc("3<<-EOF").unwrap().unwrap();
        assert_eq!(
            (h.file_descriptor, h.chomp, h.name.as_str()),
            (3, true, "EOF")
        );
        assert!(parse_heredoc("<<EOF sh").unwrap().is_none());
    }

    #[test]
    fn onbuild_subcommand() {
        let p = parse("ONBUILD RUN <<EOF\nx\nEOF\nONBUILD\n").unwrap();
        let ob = &p.children[0];
        assert_eq!(words(ob), vec!["<RUN>"]);
        assert_eq!(ob.heredocs.len(), 1);
        assert!(p.children[1].args.is_empty());
    }

    #[test]
    fn comments_are_collected_and_reset() {
        let p = parse("# first\n# second\nFROM x\n#\n# only\nRUN y\n").unwrap();
        assert_eq!(p.children[0].prev_comment, vec!["first", "second"]);
        assert_eq!(p.children[1].prev_comment, vec!["only"]);
    }

    #[test]
    fn empty_and_long_files() {
        assert_eq!(
            parse("# just a comment\n\n").unwrap_err(),
            ParseError::NoInstructions(2)
        );
        let long = format!("RUN {}\n", "x".repeat(70_000));
        assert_eq!(
            parse(&long).unwrap_err().to_string(),
            "dockerfile line greater than max allowed size of 65535"
        );
    }

    #[test]
    fn syntax_detection() {
        let s = detect_syntax("#!/bin/x\n# syntax=docker/dockerfile:1.5 --x\nFROM a\n").unwrap();
        assert_eq!(s.reference, "docker/dockerfile:1.5");
        assert_eq!(s.cmdline, "docker/dockerfile:1.5 --x");
        assert_eq!(s.line, 2);
        assert_eq!(
            detect_syntax("// syntax = foo\n").unwrap().reference,
            "foo".to_owned()
        );
        assert!(detect_syntax("FROM a\n# syntax=foo\n").is_none());
    }
}
