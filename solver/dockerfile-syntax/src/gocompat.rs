//! Small re-implementations of Go standard-library behaviour that BuildKit's output depends
//! on byte for byte (Go's `path` package is `kiln_proto::paths`): `strconv.Quote`/`QuoteRune` (what `%q` prints),
//! `time.Duration` parsing and printing, `strconv.ParseBool`/`ParseInt`, `encoding/csv`
//! for one record, Levenshtein suggestions (`util/suggest`), and `math.Log10`.
//!
//! Everything here works on Rust strings (valid UTF-8): the frontend decodes the Dockerfile
//! lossily once, so Go's handling of invalid byte sequences is not reproduced.

use std::fmt::Write as _;

/// Errors of the Go-compatible parsers, with Go's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoError {
    #[error("time: invalid duration {0}")]
    InvalidDuration(String),
    #[error("time: missing unit in duration {0}")]
    MissingUnit(String),
    #[error("time: unknown unit {unit} in duration {duration}")]
    UnknownUnit { unit: String, duration: String },
    #[error("strconv.{func}: parsing {input}: invalid syntax")]
    Syntax { func: &'static str, input: String },
    #[error("strconv.{func}: parsing {input}: value out of range")]
    Range { func: &'static str, input: String },
    #[error("parse error on line 1, column {column}: {reason}")]
    Csv { column: usize, reason: &'static str },
    #[error("EOF")]
    CsvEof,
}

/// Approximates Go's `unicode.IsPrint` (letters, marks, numbers, punctuation, symbols and
/// the ASCII space). Outside ASCII, controls, spaces, format characters and private-use
/// code points are treated as non-printable; unassigned code points count as printable.
pub fn is_print(c: char) -> bool {
    if c.is_ascii() {
        return (' '..='~').contains(&c);
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(c,
        '\u{00AD}'
        | '\u{0600}'..='\u{0605}'
        | '\u{061C}'
        | '\u{06DD}'
        | '\u{070F}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}'
        | '\u{E0020}'..='\u{E007F}'
        | '\u{E000}'..='\u{F8FF}'
        | '\u{F0000}'..='\u{FFFFD}'
        | '\u{100000}'..='\u{10FFFD}')
}

fn push_escaped(out: &mut String, c: char, quote: char) {
    if c == quote || c == '\\' {
        out.push('\\');
        out.push(c);
        return;
    }
    if is_print(c) {
        out.push(c);
        return;
    }
    match c {
        '\u{7}' => out.push_str("\\a"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{b}' => out.push_str("\\v"),
        c if c < ' ' || c == '\u{7f}' => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if (c as u32) < 0x10000 => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\U{:08x}", c as u32);
        }
    }
}

/// Go's `strconv.Quote` (what `%q` prints for a string).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        push_escaped(&mut out, c, '"');
    }
    out.push('"');
    out
}

/// What Go's `%q` prints for an integer: the quoted rune (`'\x03'`).
pub fn quote_rune(value: i64) -> String {
    let c = u32::try_from(value)
        .ok()
        .and_then(char::from_u32)
        .unwrap_or('\u{FFFD}');
    let mut out = String::from("'");
    push_escaped(&mut out, c, '\'');
    out.push('\'');
    out
}

/// `%q` of a `[]string`: `["a" "b"]`.
pub fn quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(" "))
}

/// `%v` of a `[]string`: `[a b]`.
pub fn plain_list(items: &[String]) -> String {
    format!("[{}]", items.join(" "))
}

/// Go's `time.ParseDuration`, in nanoseconds.
pub fn parse_duration(input: &str) -> Result<i64, GoError> {
    let quoted = format!("\"{input}\"");
    let invalid = || GoError::InvalidDuration(quoted.clone());
    let mut s = input;
    let mut neg = false;
    if let Some(rest) = s.strip_prefix('-') {
        neg = true;
        s = rest;
    } else if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !(bytes[i] == b'.' || bytes[i].is_ascii_digit()) {
            return Err(invalid());
        }
        let start = i;
        let mut v: u64 = 0;
        let mut overflow = false;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            match v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(bytes[i] - b'0')))
            {
                Some(n) if n <= 1 << 63 => v = n,
                _ => overflow = true,
            }
            i += 1;
        }
        if overflow {
            return Err(invalid());
        }
        let pre = i != start;
        let mut f: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if i < bytes.len() && bytes[i] == b'.' {
            i += 1;
            let fstart = i;
            let mut fover = false;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                if !fover {
                    match f
                        .checked_mul(10)
                        .and_then(|f| f.checked_add(u64::from(bytes[i] - b'0')))
                    {
                        Some(n) if n <= 1 << 63 => {
                            f = n;
                            scale *= 10.0;
                        }
                        _ => fover = true,
                    }
                }
                i += 1;
            }
            post = i != fstart;
        }
        if !pre && !post {
            return Err(invalid());
        }
        let ustart = i;
        while i < bytes.len() && !(bytes[i] == b'.' || bytes[i].is_ascii_digit()) {
            i += 1;
        }
        if ustart == i {
            return Err(GoError::MissingUnit(quoted));
        }
        let unit_str = &s[ustart..i];
        let unit: u64 = match unit_str {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => {
                return Err(GoError::UnknownUnit {
                    unit: format!("\"{unit_str}\""),
                    duration: quoted,
                });
            }
        };
        if v > (1u64 << 63) / unit {
            return Err(invalid());
        }
        v *= unit;
        if f > 0 {
            v += (f as f64 * (unit as f64 / scale)) as u64;
            if v > 1 << 63 {
                return Err(invalid());
            }
        }
        total = total.checked_add(v).ok_or_else(invalid)?;
        if total > 1 << 63 {
            return Err(invalid());
        }
    }
    if neg {
        return Ok((total as i128).wrapping_neg() as i64);
    }
    if total > (1u64 << 63) - 1 {
        return Err(invalid());
    }
    Ok(total as i64)
}

fn with_fraction(int_part: u64, frac: u64, prec: usize) -> String {
    let digits = format!("{frac:0prec$}");
    let digits = digits.trim_end_matches('0');
    if digits.is_empty() {
        int_part.to_string()
    } else {
        format!("{int_part}.{digits}")
    }
}

/// Go's `time.Duration.String` for a duration in nanoseconds.
pub fn format_duration(d: i64) -> String {
    let sign = if d < 0 { "-" } else { "" };
    let u = d.unsigned_abs();
    if u == 0 {
        return "0s".to_owned();
    }
    if u < 1_000_000_000 {
        let (unit, prec) = if u < 1_000 {
            ("ns", 0)
        } else if u < 1_000_000 {
            ("\u{b5}s", 3)
        } else {
            ("ms", 6)
        };
        let scale = 10u64.pow(prec as u32);
        return format!("{sign}{}{unit}", with_fraction(u / scale, u % scale, prec));
    }
    let secs = u / 1_000_000_000;
    let seconds = with_fraction(secs % 60, u % 1_000_000_000, 9);
    let minutes = secs / 60 % 60;
    let hours = secs / 3600;
    if hours > 0 {
        format!("{sign}{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{sign}{minutes}m{seconds}s")
    } else {
        format!("{sign}{seconds}s")
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseUint(s, base, bits)` for bases 8 and 10.
pub fn parse_uint(s: &str, base: u32, bits: u32) -> Result<u64, GoError> {
    let syntax = || GoError::Syntax {
        func: "ParseUint",
        input: quote(s),
    };
    if s.is_empty() || !s.chars().all(|c| c.is_digit(base)) {
        return Err(syntax());
    }
    let value = u64::from_str_radix(s, base).map_err(|_| GoError::Range {
        func: "ParseUint",
        input: quote(s),
    })?;
    if bits < 64 && value >= 1u64 << bits {
        return Err(GoError::Range {
            func: "ParseUint",
            input: quote(s),
        });
    }
    Ok(value)
}

/// Go's `strconv.ParseInt(s, 10, bits)` (an optional sign, then decimal digits).
pub fn parse_int(s: &str, bits: u32) -> Result<i64, GoError> {
    let syntax = || GoError::Syntax {
        func: "ParseInt",
        input: quote(s),
    };
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }
    let range = || GoError::Range {
        func: "ParseInt",
        input: quote(s),
    };
    let magnitude: u128 = digits.parse().map_err(|_| range())?;
    let limit: u128 = 1u128 << (bits - 1);
    let value = if neg {
        if magnitude > limit {
            return Err(range());
        }
        -(magnitude as i128)
    } else {
        if magnitude >= limit {
            return Err(range());
        }
        magnitude as i128
    };
    Ok(value as i64)
}

/// Go's `strconv.Atoi`.
pub fn atoi(s: &str) -> Option<i64> {
    parse_int(s, 64).ok()
}

/// Reads the first record of `input` the way Go's `encoding/csv` reader does with default
/// settings (comma `,`, no lazy quotes, no space trimming).
pub fn csv_record(input: &str) -> Result<Vec<String>, GoError> {
    let line = input.split('\n').next().unwrap_or("");
    let line = line.strip_suffix('\r').unwrap_or(line);
    if input.is_empty() {
        return Err(GoError::CsvEof);
    }
    let chars: Vec<char> = line.chars().collect();
    let mut fields = Vec::new();
    let mut i = 0;
    loop {
        let mut field = String::new();
        if chars.get(i) == Some(&'"') {
            // Quoted field: `""` is a quote, the field ends at a closing quote followed by
            // a comma or the end of the line.
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        return Err(GoError::Csv {
                            column: line.len() + 1,
                            reason: "extraneous or missing \" in quoted-field",
                        });
                    }
                    Some('"') => match chars.get(i + 1) {
                        Some('"') => {
                            field.push('"');
                            i += 2;
                        }
                        Some(',') => {
                            i += 2;
                            fields.push(field);
                            break;
                        }
                        None => {
                            fields.push(field);
                            return Ok(fields);
                        }
                        Some(_) => {
                            let column = chars[..=i + 1].iter().map(|c| c.len_utf8()).sum();
                            return Err(GoError::Csv {
                                column,
                                reason: "extraneous or missing \" in quoted-field",
                            });
                        }
                    },
                    Some(c) => {
                        field.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            loop {
                match chars.get(i) {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => {
                        i += 1;
                        fields.push(field);
                        break;
                    }
                    Some('"') => {
                        let column = chars[..=i].iter().map(|c| c.len_utf8()).sum();
                        return Err(GoError::Csv {
                            column,
                            reason: "bare \" in non-quoted-field",
                        });
                    }
                    Some(c) => {
                        field.push(*c);
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Levenshtein distance over characters (unit costs), as `agext/levenshtein.Distance`.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// BuildKit's `suggest.WrapError`: the closest option (distance < 3) to append as
/// ` (did you mean X?)`, or `None` when `value` is an option itself or nothing is close.
/// Go walks a map in random order; ties are broken here by the order of `options`.
pub fn suggest<'a>(
    value: &str,
    options: impl IntoIterator<Item = &'a str>,
    case_sensitive: bool,
) -> Option<String> {
    let val = if case_sensitive {
        value.to_owned()
    } else {
        value.to_lowercase()
    };
    let mut best: Option<String> = None;
    let mut min = 3;
    for opt in options {
        let opt = if case_sensitive {
            opt.to_owned()
        } else {
            opt.to_lowercase()
        };
        if val == opt {
            return None;
        }
        let dist = levenshtein(&val, &opt);
        if dist < min {
            min = dist;
            best = Some(if case_sensitive {
                opt
            } else if value == value.to_lowercase() {
                opt.to_lowercase()
            } else if value == value.to_uppercase() {
                opt.to_uppercase()
            } else {
                opt
            });
        }
    }
    best
}

/// Appends BuildKit's suggestion suffix to `message` when one applies.
pub fn with_suggestion<'a>(
    message: String,
    value: &str,
    options: impl IntoIterator<Item = &'a str>,
    case_sensitive: bool,
) -> String {
    match suggest(value, options, case_sensitive) {
        Some(m) => format!("{message} (did you mean {m}?)"),
        None => message,
    }
}

/// Go's `math.Frexp` for positive finite `x`: `x = frac * 2^exp`, `frac` in [0.5, 1).
fn frexp(x: f64) -> (f64, i64) {
    let (x, adjust) = if x < f64::MIN_POSITIVE {
        (x * (1u64 << 52) as f64, -52)
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1022 + adjust;
    let frac = f64::from_bits((bits & !(0x7ff << 52)) | (1022 << 52));
    (frac, exp)
}

/// Go's `math.Log` (the FDLIBM algorithm Go implements), so results agree with Go to the
/// last bit rather than with the platform's libm. The constants are FDLIBM's, as printed
/// there.
#[allow(clippy::excessive_precision)]
fn go_log(x: f64) -> f64 {
    const LN2_HI: f64 = 6.93147180369123816490e-01;
    const LN2_LO: f64 = 1.90821492927058770002e-10;
    const L1: f64 = 6.666666666666735130e-01;
    const L2: f64 = 3.999999999940941908e-01;
    const L3: f64 = 2.857142874366239149e-01;
    const L4: f64 = 2.222219843214978396e-01;
    const L5: f64 = 1.818357216161805012e-01;
    const L6: f64 = 1.531383769920937332e-01;
    const L7: f64 = 1.479819860511658591e-01;
    if x.is_nan() || x.is_infinite() || x <= 0.0 {
        return x.ln();
    }
    let (mut f1, mut ki) = frexp(x);
    if f1 < std::f64::consts::SQRT_2 / 2.0 {
        f1 *= 2.0;
        ki -= 1;
    }
    let f = f1 - 1.0;
    let k = ki as f64;
    let s = f / (2.0 + f);
    let s2 = s * s;
    let s4 = s2 * s2;
    let t1 = s2 * (L1 + s4 * (L3 + s4 * (L5 + s4 * L7)));
    let t2 = s4 * (L2 + s4 * (L4 + s4 * L6));
    let r = t1 + t2;
    let hfsq = 0.5 * f * f;
    k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)
}

/// Go's `math.Log2` (exact for powers of two, as Go special-cases them).
fn go_log2(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return x.log2();
    }
    let (frac, exp) = frexp(x);
    if frac == 0.5 {
        return (exp - 1) as f64;
    }
    go_log(frac) * std::f64::consts::LOG2_E + exp as f64
}

/// Go's `math.Log10` on amd64: `Log2(x) * (Ln2/Ln10)` with Go's own `Log`. (Where Go fuses
/// multiply-adds, as on arm64, some powers of ten come out one ulp low.)
pub fn go_log10(x: f64) -> f64 {
    go_log2(x) * std::f64::consts::LOG10_2
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quoting_matches_go_fmt_q() {
        assert_eq!(quote("a \"b\" \\ c\n"), r#""a \"b\" \\ c\n""#);
        assert_eq!(quote("é\u{1}\u{7f}"), "\"é\\x01\\x7f\"");
        assert_eq!(quote("\u{200b}"), "\"\\u200b\"");
        assert_eq!(quote_rune(3), r"'\x03'");
        assert_eq!(quote_rune(65), "'A'");
        assert_eq!(quote_rune(39), r"'\''");
        assert_eq!(quote_rune(0), r"'\x00'");
        assert_eq!(
            quote_list(&["CMD".into(), "a b".into()]),
            r#"["CMD" "a b"]"#
        );
    }

    #[test]
    fn durations_round_trip_like_go() {
        assert_eq!(parse_duration("30s").unwrap(), 30_000_000_000);
        assert_eq!(parse_duration("1m30s").unwrap(), 90_000_000_000);
        assert_eq!(parse_duration("1.5h").unwrap(), 5_400_000_000_000);
        assert_eq!(parse_duration("0").unwrap(), 0);
        assert_eq!(parse_duration("-2ms").unwrap(), -2_000_000);
        assert_eq!(
            parse_duration("10").unwrap_err().to_string(),
            "time: missing unit in duration \"10\""
        );
        assert_eq!(
            parse_duration("3x").unwrap_err().to_string(),
            "time: unknown unit \"x\" in duration \"3x\""
        );
        assert_eq!(
            parse_duration("abc").unwrap_err().to_string(),
            "time: invalid duration \"abc\""
        );
        for (ns, want) in [
            (0, "0s"),
            (30_000_000_000, "30s"),
            (90_000_000_000, "1m30s"),
            (3_600_000_000_000, "1h0m0s"),
            (1_500_000, "1.5ms"),
            (1_500, "1.5µs"),
            (12, "12ns"),
            (1_500_000_000, "1.5s"),
            (-5_000_000_000, "-5s"),
        ] {
            assert_eq!(format_duration(ns), want, "{ns}");
        }
    }

    #[test]
    fn integers_and_bools() {
        assert_eq!(parse_uint("0700", 8, 32).unwrap(), 0o700);
        assert!(parse_uint("0800", 8, 32).is_err());
        assert!(parse_uint("-1", 10, 32).is_err());
        assert!(parse_uint("4294967296", 10, 32).is_err());
        assert_eq!(parse_int("+5", 32).unwrap(), 5);
        assert_eq!(parse_int("-2147483648", 32).unwrap(), -2147483648);
        assert!(parse_int("2147483648", 32).is_err());
        assert_eq!(
            parse_int("x", 32).unwrap_err().to_string(),
            "strconv.ParseInt: parsing \"x\": invalid syntax"
        );
        assert_eq!(parse_bool("True"), Some(true));
        assert_eq!(parse_bool("yes"), None);
    }

    #[test]
    fn csv_reads_one_record() {
        assert_eq!(
            csv_record("type=cache,target=/x").unwrap(),
            vec!["type=cache", "target=/x"]
        );
        assert_eq!(
            csv_record(r#""a,b=c",d"#).unwrap(),
            vec!["a,b=c".to_owned(), "d".to_owned()]
        );
        assert!(
            csv_record(r#""a,b"=c,d"#).is_err(),
            "text after a closing quote"
        );
        assert_eq!(csv_record("a,,b").unwrap(), vec!["a", "", "b"]);
        assert_eq!(
            csv_record(r#"a"b"#).unwrap_err().to_string(),
            "parse error on line 1, column 2: bare \" in non-quoted-field"
        );
        assert_eq!(csv_record("").unwrap_err(), GoError::CsvEof);
    }

    #[test]
    fn suggestions() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(
            suggest("RUNN", ["ADD", "RUN", "ENV"], false),
            Some("RUN".into())
        );
        assert_eq!(suggest("FROBNICATE", ["ADD", "RUN"], false), None);
        assert_eq!(suggest("run", ["RUN"], false), None);
        assert_eq!(
            suggest("chwon", ["chown", "from"], true),
            Some("chown".into())
        );
    }

    #[test]
    fn log10_is_gos() {
        assert_eq!(go_log10(1000.0), 3.0);
        assert_eq!(go_log10(1e15), 15.0, "amd64 Go: no fused multiply-add");
        assert_eq!(go_log10(10.0), 1.0);
        assert_eq!((1.0 + go_log10(9.0)) as i64, 1);
        assert_eq!((1.0 + go_log10(100.0)) as i64, 3);
    }
}
