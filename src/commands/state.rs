//! `kiln prune` and `kiln du`: the results and cache directories builds leave under
//! `--root`, listed and removed.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};

use super::namespaces::enter_namespaces;
use crate::cli::{DuArgs, PruneArgs};

pub fn prune(root: &Path, args: &PruneArgs) -> anyhow::Result<ExitCode> {
    enter_namespaces()?;
    let snapshotter = kiln_snapshotter::Snapshotter::open(root)
        .with_context(|| format!("opening the snapshot store at {}", root.display()))?;
    let before: HashMap<String, u64> = snapshotter
        .du()?
        .into_iter()
        .map(|u| (u.id.clone(), u.size))
        .collect();
    let keep_duration = args
        .keep_duration
        .as_deref()
        .map(parse_duration)
        .transpose()?;
    let removed = snapshotter.prune(kiln_snapshotter::PruneOptions { keep_duration })?;
    if args.all {
        let content = root.join("content");
        if content.exists() {
            std::fs::remove_dir_all(&content)
                .with_context(|| format!("removing {}", content.display()))?;
        }
    }
    let mut total = 0;
    println!("{:<28}\t{:>10}", "ID", "RECLAIMED");
    for id in &removed {
        let size = before.get(id).copied().unwrap_or(0);
        total += size;
        println!("{id:<28}\t{:>10}", human(size));
    }
    println!("Total:\t{}", human(total));
    Ok(ExitCode::SUCCESS)
}

/// `30s`, `15m`, `2h`, `7d` (or plain seconds).
fn parse_duration(text: &str) -> anyhow::Result<std::time::Duration> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .with_context(|| format!("--keep-duration {text}: not a duration (e.g. 48h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => bail!("--keep-duration {text}: unknown unit {other:?} (s, m, h or d)"),
    };
    Ok(std::time::Duration::from_secs(secs))
}

pub fn du(root: &Path, args: &DuArgs) -> anyhow::Result<ExitCode> {
    enter_namespaces()?;
    let snapshotter = kiln_snapshotter::Snapshotter::open(root)
        .with_context(|| format!("opening the snapshot store at {}", root.display()))?;
    let mut usage = snapshotter.du()?;
    usage.sort_by_key(|u| std::cmp::Reverse(u.size));
    let (mut total, mut reclaimable) = (0, 0);
    if args.verbose {
        for u in &usage {
            println!("ID:\t\t{}", u.id);
            if let Some(parent) = &u.parent {
                println!("Parent:\t\t{parent}");
            }
            println!("Created at:\t{}", ago(u.created_at));
            println!(
                "Mutable:\t{}",
                u.state == kiln_snapshotter::RecordState::Mutable
            );
            println!("Reclaimable:\t{}", u.reclaimable);
            println!("In use:\t\t{}", u.in_use);
            println!("Size:\t\t{}", human(u.size));
            println!("Description:\t{}", u.description);
            println!("Usage count:\t{}", u.usage_count);
            println!("Last used:\t{}", ago(u.last_used_at));
            println!("Type:\t\t{}\n", u.record_type);
        }
    } else {
        println!(
            "{:<28}\t{:<11}\t{:>10}\t{:<16}",
            "ID", "RECLAIMABLE", "SIZE", "LAST ACCESSED"
        );
    }
    for u in &usage {
        total += u.size;
        if u.reclaimable {
            reclaimable += u.size;
        }
        if !args.verbose {
            println!(
                "{:<28}\t{:<11}\t{:>10}\t{:<16}",
                u.id,
                u.reclaimable,
                human(u.size),
                ago(u.last_used_at)
            );
        }
    }
    println!("Reclaimable:\t{}", human(reclaimable));
    println!("Total:\t\t{}", human(total));
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", UNITS[unit])
    }
}

fn ago(at: std::time::SystemTime) -> String {
    let secs = at.elapsed().map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86_399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("48h").unwrap().as_secs(), 48 * 3600);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert!(parse_duration("3w").is_err());
    }
}
