//! BuildKit's own corpus (../shared/conformance) built with `kiln build` exactly as a user
//! would build it with buildctl: every Definition cold (after `kiln prune --all`) and warm
//! (again on the same state, where no ExecOp may run — read from `--progress rawjson`),
//! checked against its `.expect.json` with every assertion kind, as root and as the
//! unprivileged test user. The image is served by a real registry on 127.0.0.1:5000.
//!
//! Failures the host imposes (its capability bounding set lacks CAP_SYS_RESOURCE, so
//! "all capabilities" cannot be granted to rootful insecure steps, as BuildKit cannot
//! either) are checked to fail for exactly that reason and reported, never skipped.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_testsupport::{
    AsTestUser, conformance_defs, is_root, require, rerun_as_test_user, shared_dir,
};
use serde_json::Value;

struct Case {
    name: String,
    def: PathBuf,
    expect: Value,
}

fn cases() -> Vec<Case> {
    conformance_defs()
        .into_iter()
        .map(|(name, def)| {
            let path = shared_dir().join(format!("conformance/defs/{name}.expect.json"));
            let expect: Value = serde_json::from_slice(&std::fs::read(&path).expect("read expect"))
                .expect("parse expect");
            Case { name, def, expect }
        })
        .collect()
}

fn kiln(root: &Path, args: &[String], stdin: &Path) -> (Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::from(
            std::fs::File::open(stdin).expect("open definition"),
        ))
        .output()
        .expect("run kiln");
    (output, started.elapsed())
}

fn bounding_has_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:\t"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << 24) != 0)
}

/// Which cases the host itself makes fail, and why.
fn host_limitation(name: &str, rootless: bool) -> Option<&'static str> {
    let insecure_all_caps = matches!(name, "testSecurityMode_insecure" | "df10_security_insecure");
    if insecure_all_caps && !rootless && !bounding_has_sys_resource() {
        return Some(
            "the host's capability bounding set lacks CAP_SYS_RESOURCE, so a rootful \
             insecure step cannot hold every capability (BuildKit fails here too)",
        );
    }
    None
}

/// Relative paths under `dir`, directories with a trailing `/`.
fn file_list(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = rel.join(entry.file_name());
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let mut name = path.to_string_lossy().into_owned();
            if is_dir {
                name.push('/');
                stack.push(path);
            }
            out.push(name);
        }
    }
    out.sort();
    out
}

fn read(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read(dir.join(file))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .map_err(|e| format!("{file}: {e}"))
}

fn object(expect: &Value, key: &str) -> Vec<(String, Value)> {
    expect
        .get(key)
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Every assertion kind of ../shared/conformance/README.md.
fn check_files(name: &str, expect: &Value, out: &Path) -> Result<(), String> {
    for (file, want) in object(expect, "files") {
        let got = read(out, &file)?;
        if Some(got.as_str()) != want.as_str() {
            return Err(format!("{file}: {got:?} != {want}"));
        }
    }
    for (file, want) in object(expect, "files_trimmed") {
        let got = read(out, &file)?;
        if Some(got.trim()) != want.as_str().map(str::trim) {
            return Err(format!("{file} (trimmed): {:?} != {want}", got.trim()));
        }
    }
    for (file, want) in object(expect, "files_not_equal_trimmed") {
        let got = read(out, &file)?;
        if Some(got.trim()) == want.as_str().map(str::trim) {
            return Err(format!("{file} must not be {want}"));
        }
    }
    for (file, wants) in object(expect, "files_contains") {
        let got = read(out, &file)?;
        for want in strings(&wants) {
            if !got.contains(&want) {
                return Err(format!("{file} does not contain {want:?}: {got:?}"));
            }
        }
    }
    for (file, wants) in object(expect, "files_not_contains") {
        let got = read(out, &file)?;
        for want in strings(&wants) {
            if got.contains(&want) {
                return Err(format!("{file} contains {want:?}: {got:?}"));
            }
        }
    }
    for (file, want) in object(expect, "files_prefix") {
        let got = read(out, &file)?;
        let want = want.as_str().unwrap_or_default();
        if !got.starts_with(want) {
            return Err(format!("{file} does not start with {want:?}: {got:?}"));
        }
    }
    for (file, other) in object(expect, "files_equal_file") {
        let other = other.as_str().unwrap_or_default();
        if read(out, &file)? != read(out, other)? {
            return Err(format!("{file} differs from {other}"));
        }
    }
    for file in expect.get("files_exist").map(strings).unwrap_or_default() {
        if std::fs::symlink_metadata(out.join(&file)).is_err() {
            return Err(format!("{file} does not exist"));
        }
    }
    for file in expect.get("files_absent").map(strings).unwrap_or_default() {
        if std::fs::symlink_metadata(out.join(&file)).is_ok() {
            return Err(format!("{file} exists"));
        }
    }
    if let Some(list) = expect.get("file_list_exact") {
        let want = strings(list);
        let got = file_list(out);
        if got != want {
            return Err(format!("file list {got:?} != {want:?}"));
        }
    }
    for (file, want) in object(expect, "mtime_unix") {
        let meta =
            std::fs::symlink_metadata(out.join(&file)).map_err(|e| format!("{file}: {e}"))?;
        let mtime = std::os::unix::fs::MetadataExt::mtime(&meta);
        if Some(mtime) != want.as_i64() {
            return Err(format!("{file} mtime {mtime} != {want}"));
        }
    }
    for (file, rule) in object(expect, "hex_mask") {
        let got = read(out, &file)?;
        let parse = |v: &Value| -> u64 {
            u64::from_str_radix(v.as_str().unwrap_or("0").trim_start_matches("0x"), 16).unwrap_or(0)
        };
        let value =
            u64::from_str_radix(got.trim(), 16).map_err(|e| format!("{file}: {got:?}: {e}"))?;
        let (mask, equals) = (parse(&rule["mask"]), parse(&rule["equals"]));
        if value & mask != equals {
            return Err(format!(
                "{file}: {value:#x} & {mask:#x} = {:#x}, want {equals:#x} ({name})",
                value & mask
            ));
        }
    }
    Ok(())
}

struct Outcome {
    name: String,
    result: Result<(), String>,
    cold: Duration,
    warm: Duration,
    note: Option<&'static str>,
}

fn build_args(case: &Case, out: &Path, secrets_dir: &Path) -> Vec<String> {
    let mut args = vec![
        "build".to_owned(),
        "--progress".to_owned(),
        "rawjson".to_owned(),
        "--output".to_owned(),
        format!("type=local,dest={}", out.display()),
    ];
    args.extend(strings(
        case.expect.get("buildctl_args").unwrap_or(&Value::Null),
    ));
    for (i, (id, content)) in object(&case.expect, "secrets").into_iter().enumerate() {
        let file = secrets_dir.join(format!("secret{i}"));
        std::fs::write(&file, content.as_str().unwrap_or_default()).expect("write secret");
        args.push("--secret".to_owned());
        args.push(format!("id={id},src={}", file.display()));
    }
    args
}

fn check_outcome(case: &Case, output: &Output, out: &Path) -> Result<(), String> {
    let expect = &case.expect["expect"];
    let stderr = String::from_utf8_lossy(&output.stderr);
    let want_success = expect["success"] == true;
    if output.status.success() != want_success {
        let last = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "success {} (want {want_success}): {last}",
            output.status.success()
        ));
    }
    if !want_success {
        for want in expect
            .get("error_contains")
            .map(strings)
            .unwrap_or_default()
        {
            if !stderr.contains(&want) {
                return Err(format!("error does not contain {want:?}: {stderr}"));
            }
        }
        return Ok(());
    }
    let mut expect = expect.clone();
    if case.name == "df09_network_host" {
        // Recorded as `ls /sys/class/net` of the host that generated the vectors.
        let mut ifaces: Vec<String> = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ifaces.sort();
        expect["files_trimmed"]["o/ifaces"] = Value::String(ifaces.join("\n"));
    }
    check_files(&case.name, &expect, out)
}

fn run_case(case: &Case, all: &[Case], state: &Path, work: &Path, rootless: bool) -> Outcome {
    let out = work.join(format!("{}-out", case.name));
    let secrets = work.join(format!("{}-secrets", case.name));
    std::fs::create_dir_all(&secrets).expect("secrets dir");
    let prune = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(state)
        .args(["prune", "--all"])
        .output()
        .expect("prune");
    let mut outcome = Outcome {
        name: case.name.clone(),
        result: Ok(()),
        cold: Duration::ZERO,
        warm: Duration::ZERO,
        note: host_limitation(&case.name, rootless),
    };
    if !prune.status.success() {
        outcome.result = Err(format!(
            "prune failed: {}",
            String::from_utf8_lossy(&prune.stderr)
        ));
        return outcome;
    }
    for before in case.expect.get("after").map(strings).unwrap_or_default() {
        let Some(first) = all.iter().find(|c| c.name == before) else {
            outcome.result = Err(format!("unknown prerequisite {before}"));
            return outcome;
        };
        let first_out = work.join(format!("{}-before-{}", case.name, first.name));
        let (o, _) = kiln(state, &build_args(first, &first_out, &secrets), &first.def);
        if let Err(e) = check_outcome(first, &o, &first_out) {
            outcome.result = Err(format!("prerequisite {before}: {e}"));
            return outcome;
        }
    }
    let args = build_args(case, &out, &secrets);
    let (cold, took) = kiln(state, &args, &case.def);
    outcome.cold = took;
    let cold_result = check_outcome(case, &cold, &out);
    let _ = std::fs::remove_dir_all(&out);
    let (warm, took) = kiln(state, &args, &case.def);
    outcome.warm = took;
    let warm_result = check_outcome(case, &warm, &out).map_err(|e| format!("warm: {e}"));
    let mut result = cold_result.and(warm_result);
    if result.is_ok() && warm.status.success() {
        let rerun: Vec<String> = common::executed(&warm.stderr)
            .intersection(&common::corpus_exec_digests(&case.name))
            .cloned()
            .collect();
        if !rerun.is_empty() {
            result = Err(format!("warm build executed exec ops again: {rerun:?}"));
        }
    }
    outcome.result = match (result, outcome.note) {
        // A host limitation must show as exactly that failure (the capability mask).
        (Err(e), Some(_)) if e.contains("& 0x3fffffffff") => Ok(()),
        (Ok(()), Some(why)) => Err(format!("expected to fail on this host ({why}) but passed")),
        (other, _) => other,
    };
    outcome
}

fn run_corpus(rootless: bool) {
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    let work = tempfile::tempdir().expect("work dir");
    let state = work.path().join("state");
    let all = cases();
    let mut outcomes = Vec::new();
    for case in &all {
        outcomes.push(run_case(case, &all, &state, work.path(), rootless));
    }
    let mode = if rootless { "rootless" } else { "rootful" };
    let mut failures = BTreeMap::new();
    let (mut cold, mut warm) = (Duration::ZERO, Duration::ZERO);
    eprintln!(
        "{:<36} {:<6} {:>8} {:>8}  note",
        format!("kiln {mode}"),
        "result",
        "cold s",
        "warm s"
    );
    for o in &outcomes {
        cold += o.cold;
        warm += o.warm;
        let status = match (&o.result, o.note) {
            (Ok(()), Some(_)) => "HOST",
            (Ok(()), None) => "PASS",
            (Err(_), _) => "FAIL",
        };
        eprintln!(
            "{:<36} {status:<6} {:>8.3} {:>8.3}  {}",
            o.name,
            o.cold.as_secs_f64(),
            o.warm.as_secs_f64(),
            o.note.unwrap_or_default()
        );
        if let Err(e) = &o.result {
            failures.insert(o.name.clone(), e.clone());
        }
    }
    eprintln!(
        "total cold {:.2}s, warm {:.2}s over {} definitions",
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        outcomes.len()
    );
    assert!(failures.is_empty(), "{mode} failures: {failures:#?}");
}

/// The two corpus runs take turns: each is a long series of builds, and timings taken
/// while the other runs would mean little.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn corpus_rootful() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !require(is_root(), "root") {
        return;
    }
    run_corpus(false);
}

#[test]
fn corpus_rootless() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Started (or borrowed) before the re-run, which borrows it as the test user.
    let Some(_registry) = kiln_testsupport::test_registry() else {
        return;
    };
    if rerun_as_test_user() != AsTestUser::Inner {
        return;
    }
    run_corpus(true);
}
