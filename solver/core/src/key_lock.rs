//! The lock that makes an op run once per cache key across solves and processes.
//!
//! Every key locks one byte of a single file, `<locks>/keys`, with an exclusive open file
//! description lock (`F_OFD_SETLK[W]`), the byte chosen by the key's digest: a key costs
//! no file of its own (a lock file per key was one more inode to allocate for every step,
//! and one more file left in the store for good). Each lock opens the file anew, so two
//! tasks of one process exclude each other as two processes do, and the kernel drops the
//! lock with its holder. Two keys sharing a byte (62 bits of their digests) would only wait
//! for each other.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use kiln_proto::Digest;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

/// The file whose bytes the keys lock, in the locks directory.
const KEYS_FILE: &str = "keys";

/// An exclusive lock on a key, released when dropped.
#[derive(Debug)]
pub(crate) struct KeyLock {
    _file: File,
}

/// A key's place in the keys file.
#[derive(Clone, Debug)]
pub(crate) struct KeySlot {
    path: PathBuf,
    offset: i64,
}

impl KeySlot {
    pub(crate) fn new(locks_dir: &Path, key: &Digest) -> Self {
        // 62 bits keep the byte's offset and its end within a positive off_t.
        let head = key.hex().get(..16).unwrap_or_default();
        let bits = u64::from_str_radix(head, 16).unwrap_or(0) & ((1 << 62) - 1);
        Self {
            path: locks_dir.join(KEYS_FILE),
            offset: i64::try_from(bits).unwrap_or(0),
        }
    }

    /// Takes the lock if nobody holds it; `None` when another holder has it.
    pub(crate) fn try_lock(&self) -> Result<Option<KeyLock>, String> {
        let file = self.open()?;
        match set_lock(&file, self.offset, false) {
            Ok(()) => Ok(Some(KeyLock { _file: file })),
            Err(Errno::EAGAIN | Errno::EACCES) => Ok(None),
            Err(e) => Err(self.failed(&e)),
        }
    }

    /// Waits for the lock (blocking: call it on the blocking pool, off the runtime's one thread).
    pub(crate) fn wait(&self) -> Result<KeyLock, String> {
        let file = self.open()?;
        set_lock(&file, self.offset, true).map_err(|e| self.failed(&e))?;
        Ok(KeyLock { _file: file })
    }

    fn open(&self) -> Result<File, String> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)
            .map_err(|e| self.failed(&e))
    }

    fn failed(&self, e: &dyn std::fmt::Display) -> String {
        format!("lock {} at {}: {e}", self.path.display(), self.offset)
    }
}

/// An exclusive OFD lock on the byte at `offset` of `file`, waited for when `wait`.
fn set_lock(file: &File, offset: i64, wait: bool) -> Result<(), Errno> {
    let range = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: offset,
        l_len: 1,
        // OFD locks require l_pid to be 0.
        l_pid: 0,
    };
    loop {
        let arg = if wait {
            FcntlArg::F_OFD_SETLKW(&range)
        } else {
            FcntlArg::F_OFD_SETLK(&range)
        };
        match fcntl(file.as_fd(), arg) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_once_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let key = Digest::of(b"a key");
        let slot = KeySlot::new(dir.path(), &key);
        let held = slot.try_lock().unwrap().expect("free at first");
        // Another description, even in this process, finds it taken.
        assert!(slot.try_lock().unwrap().is_none());
        // Another key is free meanwhile.
        let other = KeySlot::new(dir.path(), &Digest::of(b"another key"));
        assert!(other.try_lock().unwrap().is_some());
        drop(held);
        assert!(slot.try_lock().unwrap().is_some());
        // Both live in the one file.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEYS_FILE)]);
    }

    #[test]
    fn a_waiter_gets_the_key_when_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let slot = KeySlot::new(dir.path(), &Digest::of(b"contended"));
        let held = slot.try_lock().unwrap().expect("free at first");
        let waiter = {
            let slot = slot.clone();
            std::thread::spawn(move || slot.wait().map(|_| ()))
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiter.is_finished(), "waited while held");
        drop(held);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn offsets_follow_the_digest_and_stay_positive() {
        let dir = Path::new("/locks");
        let a = KeySlot::new(dir, &Digest::of(b"a"));
        let b = KeySlot::new(dir, &Digest::of(b"b"));
        assert_ne!(a.offset, b.offset);
        assert!(a.offset >= 0 && b.offset >= 0);
        assert_eq!(a.offset, KeySlot::new(dir, &Digest::of(b"a")).offset);
    }
}
