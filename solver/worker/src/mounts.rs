//! Where the worker mounts snapshots for a step, and how those mounts go away.
//!
//! Each kiln process that mounts something owns `<root>/mnt/<pid>/` while it holds
//! `<root>/mnt/<pid>.lock`, with a tmpfs of its own on it for the mount points; its
//! mounts live in its own mount namespace, so they vanish if it dies, and the next kiln
//! process to mount removes the empty directories of dead owners (never a directory whose owner
//! still holds its lock: its mounts are invisible from here, and deleting the mount points
//! would detach them). A [`StepMounts`] unmounts everything it mounted, in reverse, and
//! removes only directories it created — never recursively — so a failed unmount can
//! never delete snapshot content.
//!
//! Selectors (sub-paths of a mount source, chosen by the build) are resolved in-root by fd
//! inside the mounted source and bound onto a private mount point from that fd, so the
//! executor only ever sees kiln-owned paths (CVE-2024-23651).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use kiln_executor::sys::{FileKind, LinuxSys, Sys};
use kiln_snapshotter::Mountable;
use nix::fcntl::{Flock, FlockArg, OFlag};

/// Errors from step mounts; each names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum MountsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mount(#[from] kiln_snapshotter::mount::MountError),
    #[error("selector {selector:?}: {source}")]
    Selector {
        selector: String,
        #[source]
        source: kiln_executor::path::PathError,
    },
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MountsError + '_ {
    move |source| MountsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// This process's directory for mount points, made when a step first needs it (a fully
/// cached build mounts nothing).
#[derive(Debug)]
pub struct MountsDir {
    base: PathBuf,
    dir: PathBuf,
    made: Mutex<Option<Made>>,
    unmounter: Arc<Unmounter>,
}

/// What making the directory left to undo.
#[derive(Debug)]
struct Made {
    /// Whether the directory has a tmpfs of this process mounted on it.
    on_tmpfs: bool,
    _lock: Flock<File>,
}

/// An exclusive lock on `file` if nobody holds it.
fn try_lock(file: File) -> Option<Flock<File>> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

impl MountsDir {
    /// This process's directory under `<root>/mnt`, not made yet.
    pub fn new(root: &Path) -> Self {
        let base = root.join("mnt");
        let dir = base.join(std::process::id().to_string());
        MountsDir {
            base,
            dir,
            made: Mutex::new(None),
            unmounter: Arc::default(),
        }
    }

    /// Creates the directory (once) and removes those of dead kiln processes.
    fn make(&self) -> Result<(), MountsError> {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        if made.is_some() {
            return Ok(());
        }
        let base = &self.base;
        std::fs::create_dir_all(base).map_err(io(base))?;
        let pid = std::process::id();
        let lock_path = base.join(format!("{pid}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lock = try_lock(file).ok_or_else(|| MountsError::Io {
            path: lock_path.clone(),
            source: std::io::Error::other("locked by another process with this pid"),
        })?;
        clean_stale(base, pid);
        let dir = &self.dir;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir(dir).map_err(io(dir))?;
        // Every step makes and removes its mount points here: on the state's filesystem
        // that is an inode and a block each, and on ext4 mounted `discard` every removal
        // waits for a discard (≈0.2 ms a step measured). A tmpfs in kiln's own mount
        // namespace takes them instead and vanishes with it.
        let on_tmpfs = mount_tmpfs(dir, "mode=0755");
        if let Err(e) = &on_tmpfs {
            tracing::debug!(path = %dir.display(), error = %e, "mount points stay on the state's filesystem");
        }
        *made = Some(Made {
            on_tmpfs: on_tmpfs.is_ok(),
            _lock: lock,
        });
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Waits until every unmount released in the background so far is done.
    pub fn settle(&self) {
        self.unmounter.settle();
    }
}

impl Drop for MountsDir {
    /// Leaves nothing behind on a clean exit. `remove_dir` (not recursive): if a step's
    /// mount point were still there, it stays for the next kiln to clean up. The lock
    /// file goes while the lock is still held, so no other process can mistake it for a
    /// dead owner's.
    fn drop(&mut self) {
        self.unmounter.stop();
        let made = self.made.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Some(made) = made.as_ref() else {
            return;
        };
        if made.on_tmpfs {
            // Steps' mount points still there (a step's mounts not released) stay with the
            // detached tmpfs until their last user is gone.
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
        if std::fs::remove_dir(&self.dir).is_ok() {
            let mut lock = self.dir.clone().into_os_string();
            lock.push(".lock");
            let _ = std::fs::remove_file(lock);
        }
    }
}

/// Unmounts released steps on a thread of its own (see [`StepMounts::release_later`]): an
/// unmount waits for an RCU grace period (≈0.25 ms a step here), which then passes while
/// kiln commits the step and prepares the next. Every new mount first waits until the
/// unmounts handed over before it are done, so a snapshot is never mounted as a lower
/// layer while its last mount as an upper is still there.
#[derive(Debug, Default)]
struct Unmounter {
    state: Mutex<UnmounterState>,
    settled: Condvar,
}

#[derive(Debug, Default)]
struct UnmounterState {
    queue: Vec<Unmount>,
    /// Whether an unmount is running (taken off the queue, not done yet).
    busy: bool,
    thread: Option<std::thread::JoinHandle<()>>,
    stopping: bool,
}

/// What one [`StepMounts`] leaves to undo: its mounts (unmounted in reverse), then the
/// mount points and directories it created (removed in reverse).
#[derive(Debug)]
struct Unmount {
    mounted: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

impl Unmount {
    fn run(self) {
        for target in self.mounted.into_iter().rev() {
            if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(path = %target.display(), error = %e, "unmount failed");
            }
        }
        for path in self.created.into_iter().rev() {
            let removed = if path.is_dir() {
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = removed {
                tracing::debug!(path = %path.display(), error = %e, "mount point left behind");
            }
        }
    }
}

impl Unmounter {
    fn lock(&self) -> std::sync::MutexGuard<'_, UnmounterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `unmount` for the thread (started on first use); runs it here when the
    /// thread cannot be started or the unmounter is stopping.
    fn submit(self: &Arc<Self>, unmount: Unmount) {
        let mut state = self.lock();
        if state.stopping {
            drop(state);
            return unmount.run();
        }
        if state.thread.is_none() {
            let this = Arc::clone(self);
            match std::thread::Builder::new()
                .name("kiln-unmount".into())
                .spawn(move || this.serve())
            {
                Ok(thread) => state.thread = Some(thread),
                Err(_) => {
                    drop(state);
                    return unmount.run();
                }
            }
        }
        state.queue.push(unmount);
        self.settled.notify_all();
    }

    fn serve(&self) {
        let mut state = self.lock();
        loop {
            if let Some(unmount) = (!state.queue.is_empty()).then(|| state.queue.remove(0)) {
                state.busy = true;
                drop(state);
                unmount.run();
                state = self.lock();
                state.busy = false;
                self.settled.notify_all();
            } else if state.stopping {
                return;
            } else {
                state = self
                    .settled
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Waits until every unmount handed over so far is done.
    fn settle(&self) {
        let mut state = self.lock();
        while state.busy || !state.queue.is_empty() {
            state = self
                .settled
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Finishes the queued unmounts and ends the thread.
    fn stop(&self) {
        let thread = {
            let mut state = self.lock();
            state.stopping = true;
            self.settled.notify_all();
            state.thread.take()
        };
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// Mounts a fresh tmpfs (nosuid, nodev, noexec) with `options` at `target`.
fn mount_tmpfs(target: &Path, options: &str) -> nix::Result<()> {
    nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(options),
    )
}

/// Removes the mount directories of kiln processes that no longer hold their lock.
fn clean_stale(base: &Path, own_pid: u32) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_suffix(".lock") else {
            continue;
        };
        if pid == own_pid.to_string() {
            continue;
        }
        let Ok(file) = File::open(entry.path()) else {
            continue;
        };
        if try_lock(file).is_some() {
            // Its owner is gone, and with it its mount namespace: only empty mount
            // points and directories remain.
            let _ = std::fs::remove_dir_all(base.join(pid));
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The mounts of one step (or one cache directory), unmounted when dropped.
#[derive(Debug)]
pub struct StepMounts {
    dir: PathBuf,
    mounted: Vec<PathBuf>,
    created: Vec<PathBuf>,
    unmounter: Arc<Unmounter>,
}

impl StepMounts {
    /// A fresh directory `<mounts dir>/<name>`.
    pub fn new(parent: &MountsDir, name: &str) -> Result<Self, MountsError> {
        parent.make()?;
        let dir = parent.path().join(name);
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        Ok(StepMounts {
            dir: dir.clone(),
            mounted: Vec::new(),
            created: vec![dir],
            unmounter: Arc::clone(&parent.unmounter),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new mount point `<dir>/<name>`; first waits for the unmounts released before
    /// (see [`Unmounter`]).
    fn target(&mut self, name: &str, kind: FileKind) -> Result<PathBuf, MountsError> {
        self.unmounter.settle();
        let path = self.dir.join(name);
        match kind {
            FileKind::Directory => std::fs::create_dir(&path).map_err(io(&path))?,
            _ => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io(&path))?;
            }
        }
        self.created.push(path.clone());
        Ok(path)
    }

    /// Mounts `mountable` at `<dir>/<name>` (read-only when asked).
    pub fn mount(
        &mut self,
        name: &str,
        mountable: &Mountable,
        readonly: bool,
    ) -> Result<PathBuf, MountsError> {
        let target = self.target(name, FileKind::Directory)?;
        if readonly {
            mountable.mount_readonly(&target)?;
        } else {
            mountable.mount(&target)?;
        }
        self.mounted.push(target.clone());
        Ok(target)
    }

    /// Mounts a fresh tmpfs at `<dir>/<name>` with `options` (for secrets).
    pub fn tmpfs(&mut self, name: &str, options: &str) -> Result<PathBuf, MountsError> {
        let target = self.target(name, FileKind::Directory)?;
        mount_tmpfs(&target, options).map_err(|source| MountsError::Sys {
            op: "mount tmpfs",
            path: target.clone(),
            source,
        })?;
        self.mounted.push(target.clone());
        Ok(target)
    }

    /// Binds `selector` (resolved in-root inside the mounted `source`) onto
    /// `<dir>/<name>`. `/` or empty returns `source` itself.
    pub fn select(
        &mut self,
        name: &str,
        source: &Path,
        selector: &str,
    ) -> Result<PathBuf, MountsError> {
        if kiln_executor::path::clean(selector) == "/" {
            return Ok(source.to_owned());
        }
        let sys = LinuxSys;
        let root = nix::fcntl::open(
            source,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| MountsError::Sys {
            op: "open",
            path: source.to_owned(),
            source: e,
        })?;
        let selected = kiln_executor::path::open(&sys, root.as_fd(), selector, OFlag::O_PATH)
            .map_err(|source| MountsError::Selector {
                selector: selector.to_owned(),
                source,
            })?;
        let kind = sys
            .file_kind(selected.as_fd())
            .map_err(|e| MountsError::Sys {
                op: "stat selector",
                path: source.join(selector.trim_start_matches('/')),
                source: e,
            })?;
        // Bind from the descriptor itself: a swap of the path after resolution cannot
        // change what is mounted.
        let tree = sys
            .clone_tree(selected.as_fd(), Path::new(""), true)
            .map_err(|e| MountsError::Sys {
                op: "clone selector",
                path: source.to_owned(),
                source: e,
            })?;
        let target = self.target(name, kind)?;
        let target_fd = nix::fcntl::open(
            &target,
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| MountsError::Sys {
            op: "open",
            path: target.clone(),
            source: e,
        })?;
        sys.move_mount_onto(tree.as_fd(), target_fd.as_fd())
            .map_err(|e| MountsError::Sys {
                op: "bind selector",
                path: target.clone(),
                source: e,
            })?;
        self.mounted.push(target.clone());
        Ok(target)
    }

    /// Unmounts everything (lazily: a process that still holds a file open cannot keep a
    /// snapshot mounted) and removes the directories and files this guard created.
    pub fn release(&mut self) {
        self.take().run();
    }

    /// As [`StepMounts::release`], on the unmount thread: returns at once. What was
    /// mounted may then be committed (a commit writes only metadata) but not deleted
    /// before [`StepMounts::settle`]; the next mount anywhere waits for it by itself.
    pub fn release_later(&mut self) {
        let unmount = self.take();
        if !unmount.mounted.is_empty() || !unmount.created.is_empty() {
            self.unmounter.submit(unmount);
        }
    }

    /// Waits until every unmount released so far (by any step) is done.
    pub fn settle(&self) {
        self.unmounter.settle();
    }

    fn take(&mut self) -> Unmount {
        Unmount {
            mounted: std::mem::take(&mut self.mounted),
            created: std::mem::take(&mut self.created),
        }
    }
}

impl Drop for StepMounts {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mount points of a process's steps are on a tmpfs of its own, and nothing of it
    /// stays under `mnt/` once it is done.
    fn mount_points_on_a_tmpfs() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        // Nothing is made (nor mounted) until a step needs it.
        let dir = MountsDir::new(root.path());
        anyhow::ensure!(!root.path().join("mnt").exists(), "mnt/ made up front");
        let mut first = StepMounts::new(&dir, "s0")?;
        anyhow::ensure!(first.dir().starts_with(dir.path()) && dir.path().is_dir());
        first.release();
        drop(dir);
        let dir = MountsDir::new(root.path());
        let mut step = StepMounts::new(&dir, "s1")?;
        let fs = nix::sys::statfs::statfs(dir.path())?;
        anyhow::ensure!(
            fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
            "{} is not a tmpfs",
            dir.path().display()
        );
        let target = step.tmpfs("m0", "size=4k")?;
        anyhow::ensure!(target.starts_with(dir.path()));
        step.release();
        drop(dir);
        nothing_left_under_mnt(root.path())
    }

    /// Mounts released in the background are gone (unmounted, mount points removed) by the
    /// time the next mount is made, and by the time the mounts directory is.
    fn background_unmounts_finish_before_the_next_mount() -> anyhow::Result<()> {
        let mounted = |path: &Path| -> anyhow::Result<bool> {
            let table = std::fs::read_to_string("/proc/self/mountinfo")?;
            let path = path.to_string_lossy();
            Ok(table.lines().any(|l| l.split(' ').nth(4) == Some(&*path)))
        };
        let root = tempfile::tempdir()?;
        let dir = MountsDir::new(root.path());
        let mut first = StepMounts::new(&dir, "s0")?;
        let first_target = first.tmpfs("m0", "size=4k")?;
        anyhow::ensure!(
            mounted(&first_target)?,
            "{} not mounted",
            first_target.display()
        );
        first.release_later();
        let mut second = StepMounts::new(&dir, "s1")?;
        let second_target = second.tmpfs("m0", "size=4k")?;
        anyhow::ensure!(
            !mounted(&first_target)? && !first_target.exists() && !first.dir().exists(),
            "{} still there when the next mount was made",
            first_target.display()
        );
        second.release_later();
        second.settle();
        anyhow::ensure!(!mounted(&second_target)? && !second.dir().exists());
        let mut third = StepMounts::new(&dir, "s2")?;
        let third_target = third.tmpfs("m0", "size=4k")?;
        third.release_later();
        // Dropping the directory finishes what is queued first.
        drop(dir);
        anyhow::ensure!(
            !mounted(&third_target)?,
            "{} left mounted",
            third_target.display()
        );
        nothing_left_under_mnt(root.path())
    }

    fn nothing_left_under_mnt(root: &Path) -> anyhow::Result<()> {
        let left: Vec<_> = std::fs::read_dir(root.join("mnt"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(left.is_empty(), "left under mnt/: {left:?}");
        Ok(())
    }

    #[test]
    fn background_unmounts_finish_before_the_next_mount_rootful() {
        kiln_testsupport::rootful(background_unmounts_finish_before_the_next_mount);
    }

    #[test]
    fn background_unmounts_finish_before_the_next_mount_rootless() {
        kiln_testsupport::rootless(background_unmounts_finish_before_the_next_mount);
    }

    #[test]
    fn mount_points_on_a_tmpfs_rootful() {
        kiln_testsupport::rootful(mount_points_on_a_tmpfs);
    }

    #[test]
    fn mount_points_on_a_tmpfs_rootless() {
        kiln_testsupport::rootless(mount_points_on_a_tmpfs);
    }
}
