//! Runs BuildKit v0.11.6's own parser and shell-lexer case files (copied under
//! `tests/data/buildkit`) against kiln's parser and lexer.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kiln_dockerfile_syntax::parser;
use kiln_dockerfile_syntax::shell::{Lex, build_envs};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/buildkit")
}

fn read(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
}

#[test]
fn parser_dumps_match_buildkit() {
    let dir = data().join("parser/testfiles");
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() > 30);
    let mut failures = Vec::new();
    for case in &cases {
        let df = read(&case.join("Dockerfile"));
        let want = read(&case.join("result"));
        match parser::parse(&df) {
            Ok(parsed) => {
                let got = parsed.dump() + "\n";
                if got != want {
                    failures.push(format!(
                        "{}:\n--- want\n{want}--- got\n{got}",
                        case.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", case.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn parser_rejects_buildkit_negative_cases() {
    let dir = data().join("parser/testfiles-negative");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path().join("Dockerfile");
        let df = read(&path);
        // BuildKit's negative cases fail either in the parser or in instruction parsing.
        let parsed = parser::parse(&df);
        let instr = parsed
            .as_ref()
            .ok()
            .map(kiln_dockerfile_syntax::instructions::parse);
        assert!(
            parsed.is_err() || instr.is_some_and(|r| r.is_err()),
            "{} must be rejected",
            path.display()
        );
    }
}

#[test]
fn parser_line_numbers_match_buildkit() {
    let df = read(&data().join("parser/testfile-line/Dockerfile"));
    let parsed = parser::parse(&df).unwrap();
    let lines: Vec<(usize, usize)> = parsed
        .children
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    // From BuildKit's TestParseIncludesLineNumbers.
    assert_eq!(lines, vec![(5, 5), (11, 12), (17, 31)]);
}

#[test]
fn env_var_cases() {
    let lex = Lex::new('\\');
    let env = build_envs(&["PWD=/home", "SHELL=bash", "KOREAN=한국어", "NULL="]);
    let text = read(&data().join("shell/envVarTest"));
    let mut count = 0;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.trim().split('|').collect();
        assert_eq!(parts.len(), 3, "line {}", n + 1);
        let (platform, source, expected) = (parts[0].trim(), parts[1].trim(), parts[2].trim());
        if platform == "W" {
            continue;
        }
        let got = lex.process_word(source, &env);
        if expected == "error" {
            assert!(got.is_err(), "line {}: {source:?} gave {got:?}", n + 1);
        } else {
            assert_eq!(got.unwrap(), expected, "line {}: {source:?}", n + 1);
        }
        count += 1;
    }
    assert!(count > 100);
}

#[test]
fn words_cases() {
    let lex = Lex::new('\\');
    let text = read(&data().join("shell/wordsTest"));
    let mut envs: Vec<String> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            envs.push(rest.trim_start_matches(' ').to_owned());
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        assert_eq!(parts.len(), 2, "line {}", n + 1);
        let test = parts[0].trim();
        let expected: Vec<&str> = parts[1].trim_start_matches(' ').split(',').collect();
        let got = lex
            .process_words(test, &build_envs(&envs))
            .unwrap_or_else(|_| vec!["error".into()]);
        assert_eq!(got, expected, "line {}: {test:?}", n + 1);
    }
}
