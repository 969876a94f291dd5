//! The network namespace of a `none` step made ahead: a new namespace with only loopback,
//! up, created on a short-lived thread while the caller prepares the step (its rootfs,
//! spec, cgroups), then joined by path as a sandbox network is. Creating a namespace
//! costs ≈0.7 ms on the machines here; made this way it is off the step's critical path.
//!
//! A thread's network namespace is its own, so `unshare` on that thread changes nothing
//! else of the process; once the thread is joined the process is single-threaded again,
//! as a step runner forking its namespaces requires. The namespace is held by a
//! descriptor only, never bound to a path: it goes away with the process.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::PathBuf;
use std::thread::JoinHandle;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::config::NetworkError;
use crate::sys;

fn ns_err(op: &'static str) -> impl FnOnce(nix::Error) -> NetworkError {
    move |source| NetworkError::Namespace { op, source }
}

/// A loopback-only network namespace being made; [`LoopbackNamespace::finish`] waits for
/// it. Its [`path`](LoopbackNamespace::path) is known at once, so a step's spec can name it
/// before the namespace exists.
#[derive(Debug)]
pub struct LoopbackNamespace {
    /// `/proc/<pid>/fd/<n>`: descriptor `n` holds `/dev/null` until the thread puts the
    /// namespace in its place.
    path: PathBuf,
    making: Option<JoinHandle<Result<OwnedFd, NetworkError>>>,
    /// The namespace, once made (descriptor `n`).
    netns: Option<OwnedFd>,
}

impl LoopbackNamespace {
    /// Starts making the namespace. The caller must be where the namespace is to belong:
    /// rootless, inside kiln's user namespace (which then owns it).
    pub fn start() -> Result<LoopbackNamespace, NetworkError> {
        // The descriptor number is taken now, so the path is fixed; the thread owns it
        // until it hands it back holding the namespace.
        let mut slot = nix::fcntl::open(
            "/dev/null",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(ns_err("reserve a descriptor"))?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            slot.as_raw_fd()
        ));
        let making = std::thread::Builder::new()
            .name("kiln-netns".into())
            .spawn(move || -> Result<OwnedFd, NetworkError> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(ns_err("unshare"))?;
                sys::set_interface_up("lo").map_err(ns_err("bring up lo"))?;
                let netns = nix::fcntl::open(
                    "/proc/thread-self/ns/net",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(ns_err("open the new namespace"))?;
                nix::unistd::dup3(&netns, &mut slot, OFlag::O_CLOEXEC)
                    .map_err(ns_err("hand the namespace over"))?;
                Ok(slot)
            })
            .map_err(|e| NetworkError::Namespace {
                op: "start a thread",
                source: e
                    .raw_os_error()
                    .map_or(nix::Error::EAGAIN, nix::Error::from_raw),
            })?;
        Ok(LoopbackNamespace {
            path,
            making: Some(making),
            netns: None,
        })
    }

    /// Where a step joins the namespace (valid once [`finish`](Self::finish) returned and
    /// for as long as this value lives).
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Waits until the namespace is ready.
    pub fn finish(&mut self) -> Result<(), NetworkError> {
        let Some(making) = self.making.take() else {
            return Ok(());
        };
        let netns = making.join().map_err(|_| NetworkError::Namespace {
            op: "the thread making it panicked",
            source: nix::Error::EINVAL,
        })??;
        self.netns = Some(netns);
        Ok(())
    }
}

impl Drop for LoopbackNamespace {
    /// Joins the thread if nobody did: the process must be single-threaded again before a
    /// runner forks.
    fn drop(&mut self) {
        if let Some(making) = self.making.take() {
            let _ = making.join();
        }
    }
}
