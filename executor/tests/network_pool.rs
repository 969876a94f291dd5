//! The sandbox network pool, rootful and rootless: a namespace given back is handed to
//! the next step (its stack keeps running; without waiting, through `try_acquire`), a discarded one is stopped, a step run through
//! the runner joins the leased namespace (whose stack configured `tap0`), and dropping the
//! pool stops every stack.

mod common;

use common::{expect_eq, output_of, step};
use kiln_executor::network::{Config, Pool, Stack};

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Whether `pid` ends within a few seconds (a stopped stack is reaped in the background).
fn ends(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while running(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

fn slirp_pool() -> Pool {
    Pool::new(&Config {
        stack: Some(Stack::Slirp4netns),
        pool_size: 2,
    })
}

fn leases_are_reused_or_discarded() -> Result<(), String> {
    let pool = slirp_pool();
    if pool.try_acquire().is_some() {
        return Err("try_acquire gave a namespace before any was made".into());
    }
    let first = pool.acquire().map_err(|e| e.to_string())?;
    let first_pid = first.helper_pid().ok_or("no helper")?;
    if !running(first_pid) {
        return Err("the stack of a leased namespace is not running".into());
    }
    if pool.try_acquire().is_some() {
        return Err("try_acquire gave a namespace while the only one was leased".into());
    }
    drop(first);
    let mut again = pool
        .try_acquire()
        .ok_or("try_acquire missed the idle namespace")?;
    if again.helper_pid() != Some(first_pid) {
        return Err("a returned namespace was not handed out again".into());
    }
    let stats = pool.stats();
    if stats.created != 1 || stats.reused != 1 {
        return Err(format!("after reuse: {stats:?}"));
    }
    again.discard();
    drop(again);
    if !ends(first_pid) {
        return Err("a discarded namespace's stack still runs".into());
    }
    let other = pool.acquire().map_err(|e| e.to_string())?;
    let other_pid = other.helper_pid().ok_or("no helper")?;
    if other_pid == first_pid || pool.stats().created != 2 {
        return Err(format!(
            "no new namespace after a discard: {:?}",
            pool.stats()
        ));
    }
    drop(other);
    pool.prewarm();
    drop(pool);
    if !ends(other_pid) {
        return Err("an idle namespace's stack outlived its pool".into());
    }
    Ok(())
}

fn a_step_joins_its_leased_namespace() -> Result<(), String> {
    let rootfs = common::busybox();
    let pool = slirp_pool();
    let lease = pool.acquire().map_err(|e| e.to_string())?;
    let mut s = step(
        rootfs.path(),
        "ls /sys/class/net | tr '\\n' ' '; ip route | grep default; cat /etc/resolv.conf | grep nameserver",
    );
    s.network = kiln_executor::spec::Network::Sandbox;
    let out = common::output_with_network(&s, Some(lease.attachment().clone()))?;
    expect_eq(
        "the step's network",
        &out,
        "lo tap0 default via 10.0.2.2 dev tap0 \nnameserver 10.0.2.3",
    )?;
    // Without a lease a sandbox step has only loopback, and the host's resolvers.
    let out = output_of(&s)?;
    if !out.starts_with("lo nameserver") || out.contains("10.0.2.3") {
        return Err(format!("a sandbox step without a lease: {out:?}"));
    }
    drop(lease);
    Ok(())
}

common::both_modes! {
    pool_reuse => leases_are_reused_or_discarded;
    pool_join => a_step_joins_its_leased_namespace;
}
