//! The `copy` action: BuildKit's `docopy` driving fsutil's `copy.Copy`, reproduced on
//! descriptors.
//!
//! - Paths: source and destination are cleaned as BuildKit's `cleanPath` (a trailing `/`
//!   or `/.` is kept). Without `createDestPath` the destination's parent must exist.
//! - Sources: with `allowWildcard` the pattern is resolved first (no match is an error
//!   naming the pattern unless `allowEmptyWildcard`); each source is resolved in-root,
//!   its final symlink followed only with `followSymlink`.
//! - `attemptUnpackDockerCompatibility`: a source that is a tar archive (plain, gzip,
//!   bzip2, xz, zstd) is unpacked into the destination directory instead.
//! - Destination (`prepareTargetDir`): a destination ending in `/` is created as a
//!   directory; a file source onto an existing directory, or a directory source (without
//!   `dirCopyContents`) onto an existing path, goes *into* it under the source's base
//!   name; with `dirCopyContents` a directory's entries go into the destination, created
//!   if missing. Missing parents are created `0755` with the owner and timestamp.
//! - Entries (`cp -a` semantics): regular files, symlinks (copied as links), directories
//!   (merged into existing ones, whose metadata is then overwritten, except the top
//!   one's), device nodes; FIFOs and sockets are refused (BuildKit fails on them too) and
//!   never opened. Hard links within one source are kept as hard links. Each entry gets
//!   the owner (else the source's ids), the source mode with `mode`'s permission bits
//!   replacing `0777` (setuid/setgid/sticky kept), the timestamp (else the source's
//!   atime/mtime), then the source's xattrs where the destination allows them.
//! - `include_patterns` / `exclude_patterns`: see [`super::patterns`]; they apply to
//!   paths below the source, never to the source itself.
//!
//! Sources are read through descriptors opened `O_NOFOLLOW`, destinations are created
//! with `O_CREAT|O_EXCL`/`mkdirat`/`symlinkat` in already-open directories, and the walk
//! is iterative, so neither symlinks nor depth can take it anywhere unexpected.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use kiln_proto::pb;
use nix::sys::stat::{FileStat, SFlag};
use nix::sys::time::TimeSpec;

use crate::mkdir::{MkdirError, mkdir_all, timestamp};
use crate::owner::Owner;
use crate::patterns::{self, ExcludeMatcher, PatternError};
use crate::sys::{self, SysError};
use crate::unpack::{self, UnpackError};
use crate::walk::{self, WalkError, push_component};
use crate::wildcard::{self, WildcardError};
use kiln_proto::paths::clean as clean_path;

/// Errors copying.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{pattern} not found")]
    NoMatch { pattern: String },
    #[error("failed to stat {dest}: {parent}: no such file or directory")]
    DestinationParent { dest: String, parent: String },
    #[error("cannot replace to directory {path} with file")]
    ReplaceDirectory { path: String },
    #[error("cannot copy to non-directory: {path}")]
    NotDirectory { path: String },
    #[error("{path}: unsupported file type ({kind})")]
    Unsupported { path: String, kind: &'static str },
    #[error("{path}: the destination directory vanished during the copy")]
    Vanished { path: String },
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error(transparent)]
    Wildcard(#[from] WildcardError),
    #[error(transparent)]
    Mkdir(#[from] MkdirError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// BuildKit's `cleanPath`: absolute and clean, keeping a trailing `/` or `/.`.
pub fn clean_keep_suffix(s: &str) -> String {
    let cleaned = clean_path(&format!("/{s}"));
    if s.ends_with("/.") {
        if cleaned == "/" {
            "/.".to_owned()
        } else {
            format!("{cleaned}/.")
        }
    } else if s.ends_with('/') && cleaned != "/" {
        format!("{cleaned}/")
    } else {
        cleaned
    }
}

/// The per-action settings of fsutil's `CopyInfo`.
#[derive(Debug)]
struct Options<'a> {
    owner: Option<Owner>,
    time: Option<TimeSpec>,
    mode: Option<u32>,
    follow_links: bool,
    copy_dir_contents: bool,
    include: &'a [String],
    exclude: Option<ExcludeMatcher>,
}

/// The `copy` action from `src_root` into `dest_root`.
pub fn copy(
    src_root: BorrowedFd<'_>,
    dest_root: BorrowedFd<'_>,
    action: &pb::FileActionCopy,
    owner: Option<Owner>,
) -> Result<(), CopyError> {
    let src_path = clean_keep_suffix(&action.src);
    let dest_path = clean_keep_suffix(&action.dest);
    if !action.create_dest_path {
        let walked = walk::walk(dest_root, &action.dest, true)?;
        if let [first, _, ..] = walked.rest.as_slice() {
            let mut parent = walked.dir_path.clone();
            push_component(&mut parent, first);
            return Err(CopyError::DestinationParent {
                dest: action.dest.clone(),
                parent,
            });
        }
    }
    let options = Options {
        owner,
        time: timestamp(action.timestamp),
        mode: (action.mode != -1).then_some(action.mode as u32),
        follow_links: action.follow_symlink,
        copy_dir_contents: action.dir_copy_contents,
        include: &action.include_patterns,
        exclude: ExcludeMatcher::new(&action.exclude_patterns)?,
    };
    let sources = if action.allow_wildcard {
        let matches = wildcard::resolve(src_root, &src_path, action.follow_symlink)?;
        if matches.is_empty() {
            if action.allow_empty_wildcard {
                return Ok(());
            }
            return Err(CopyError::NoMatch { pattern: src_path });
        }
        matches
    } else {
        vec![src_path]
    };
    for source in &sources {
        if action.attempt_unpack_docker_compatibility
            && unpack::try_unpack(
                src_root,
                source,
                dest_root,
                &dest_path,
                owner,
                options.time.as_ref(),
            )?
        {
            continue;
        }
        copy_one(src_root, source, dest_root, &dest_path, &options)?;
    }
    Ok(())
}

/// Where the top of a copy lands in the prepared target directory.
enum Place {
    /// Into the target directory itself (`dirCopyContents` into a new directory, or `/`).
    Itself,
    Child(OsString),
}

/// fsutil's `Copy` for one source.
fn copy_one(
    src_root: BorrowedFd<'_>,
    src: &str,
    dest_root: BorrowedFd<'_>,
    dst: &str,
    options: &Options<'_>,
) -> Result<(), CopyError> {
    let (head, tail) = walk::split(dst);
    let ensure = if !tail.is_empty() && tail != "." {
        head
    } else {
        dst
    };
    if !ensure.is_empty() {
        mkdir_all(
            dest_root,
            ensure,
            0o755,
            options.owner,
            options.time.as_ref(),
        )?;
    }
    let dest_walk = walk::walk(dest_root, dst, true)?;
    let dest_stat = dest_walk.stat()?;
    let source = walk::walk(src_root, src, options.follow_links)?;
    let source_path = source.path();
    let Some(source_stat) = source.stat()? else {
        return Err(SysError::NotFound {
            path: clean_path(&format!("/{src}")),
        }
        .into());
    };
    let source_is_dir = sys::is_dir(&source_stat);

    // prepareTargetDir
    let dest_exists = dest_stat.is_some();
    let dest_is_dir = dest_stat.as_ref().is_some_and(sys::is_dir);
    let mut dest_path = dest_walk.path();
    if (!options.copy_dir_contents && source_is_dir && dest_exists)
        || (!source_is_dir && dest_is_dir)
    {
        dest_path = walk::join(&dest_path, &walk::base_of(src));
    }
    let into_new_dir = options.copy_dir_contents && source_is_dir && !dest_exists;
    let target = if into_new_dir {
        dest_path.clone()
    } else {
        walk::dir_of(&dest_path)
    };
    let (target_dir, target_path) = mkdir_all(
        dest_root,
        &target,
        0o755,
        options.owner,
        options.time.as_ref(),
    )?;
    let place = if into_new_dir || dest_path == "/" {
        Place::Itself
    } else {
        Place::Child(OsString::from(walk::base_of(&dest_path)))
    };

    let mut copier = Copier {
        options,
        dest_root,
        inodes: HashMap::new(),
    };
    match (source.single_name(), source_is_dir) {
        (Some(name), false) => {
            let Place::Child(dest_name) = place else {
                return Err(CopyError::ReplaceDirectory { path: target_path });
            };
            let mut path = target_path.clone();
            push_component(&mut path, &dest_name);
            copier.ensure_empty_file_target(target_dir.as_fd(), &dest_name, &path)?;
            copier.copy_leaf(
                source.dir.as_fd(),
                name,
                &source_stat,
                &source_path,
                target_dir.as_fd(),
                &dest_name,
                &path,
            )
        }
        (_, _) => {
            // A directory: `walk` has opened it (the root, or the final component).
            let source_dir = match source.single_name() {
                Some(name) => sys::open_dir_at(source.dir.as_fd(), name, &source_path)?,
                None => source.dir,
            };
            copier.copy_tree(
                source_dir,
                source_stat,
                source_path,
                target_dir,
                target_path,
                place,
            )
        }
    }
}

/// One directory being copied.
struct Frame {
    src: OwnedFd,
    src_stat: FileStat,
    src_path: String,
    names: std::vec::IntoIter<OsString>,
    /// Path relative to the copied source (fsutil's `srcComponents`).
    rel: String,
    /// The destination directory once it exists (include patterns delay creation).
    dst: Option<OwnedFd>,
    dst_path: String,
    place: Place,
    skip_include: bool,
    /// Apply owner/mode/times/xattrs when the directory is done.
    finish_info: bool,
}

impl Frame {
    /// The destination directory, which must exist by now.
    fn dst_fd(&self) -> Result<BorrowedFd<'_>, CopyError> {
        self.dst
            .as_ref()
            .map(AsFd::as_fd)
            .ok_or_else(|| CopyError::Vanished {
                path: self.dst_path.clone(),
            })
    }
}

struct Copier<'a> {
    options: &'a Options<'a>,
    dest_root: BorrowedFd<'a>,
    /// First destination path of each multiply-linked source inode.
    inodes: HashMap<(u64, u64), String>,
}

impl Copier<'_> {
    fn copy_tree(
        &mut self,
        src: OwnedFd,
        src_stat: FileStat,
        src_path: String,
        target_dir: OwnedFd,
        target_path: String,
        place: Place,
    ) -> Result<(), CopyError> {
        let skip_include = self.options.include.is_empty();
        let (dst, dst_path, finish_info) = match &place {
            Place::Itself => (
                Some(sys::dup(target_dir.as_fd(), &target_path)?),
                target_path.clone(),
                false,
            ),
            Place::Child(name) => {
                let mut path = target_path.clone();
                push_component(&mut path, name);
                if skip_include {
                    let (fd, created) =
                        copy_directory_only(target_dir.as_fd(), name, &src_stat, false, &path)?;
                    (Some(fd), path, created)
                } else {
                    (None, path, false)
                }
            }
        };
        let names = sys::list_dir(src.as_fd(), &src_path)?;
        let mut frames = vec![Frame {
            src,
            src_stat,
            src_path,
            names: names.into_iter(),
            rel: String::new(),
            dst,
            dst_path,
            place,
            skip_include,
            finish_info,
        }];
        while let Some(frame) = frames.last_mut() {
            let Some(name) = frame.names.next() else {
                let Some(done) = frames.pop() else { break };
                self.finish_dir(&frames, target_dir.as_fd(), done)?;
                continue;
            };
            self.copy_child(&mut frames, target_dir.as_fd(), &name)?;
        }
        Ok(())
    }

    /// Handles entry `name` of the innermost directory.
    fn copy_child(
        &mut self,
        frames: &mut Vec<Frame>,
        target_dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> Result<(), CopyError> {
        let Some(frame) = frames.last() else {
            return Ok(());
        };
        let mut src_path = frame.src_path.clone();
        push_component(&mut src_path, name);
        let mut rel = frame.rel.clone();
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(&String::from_utf8_lossy(name.as_bytes()));
        let mut dst_path = frame.dst_path.clone();
        push_component(&mut dst_path, name);
        let Some(stat) = sys::lstat_at(frame.src.as_fd(), name, &src_path)? else {
            // Vanished since the directory was listed.
            return Ok(());
        };
        let is_dir = sys::is_dir(&stat);
        let mut skip_include = frame.skip_include;
        let mut included = false;
        if !skip_include {
            let (include, skip) = patterns::include(self.options.include, &rel, is_dir);
            if !include {
                return Ok(());
            }
            included = true;
            skip_include = skip;
        }
        if let Some(exclude) = &self.options.exclude {
            if exclude.excludes(&rel, is_dir) {
                return Ok(());
            }
        }
        if !is_dir {
            if included {
                self.ensure_parents(frames, target_dir)?;
            }
            let parent = innermost_dst(frames)?;
            self.ensure_empty_file_target(parent, name, &dst_path)?;
            let Some(frame) = frames.last() else {
                return Ok(());
            };
            return self.copy_leaf(
                frame.src.as_fd(),
                name,
                &stat,
                &src_path,
                parent,
                name,
                &dst_path,
            );
        }
        if skip_include {
            self.ensure_parents(frames, target_dir)?;
        }
        let Some(frame) = frames.last() else {
            return Ok(());
        };
        let src = sys::open_dir_at(frame.src.as_fd(), name, &src_path)?;
        let names = sys::list_dir(src.as_fd(), &src_path)?;
        let (dst, finish_info) = if skip_include {
            let parent = innermost_dst(frames)?;
            let (fd, _) = copy_directory_only(parent, name, &stat, true, &dst_path)?;
            // Nested directories always take the source's metadata (overwrite).
            (Some(fd), true)
        } else {
            (None, false)
        };
        frames.push(Frame {
            src,
            src_stat: stat,
            src_path,
            names: names.into_iter(),
            rel,
            dst,
            dst_path,
            place: Place::Child(name.to_owned()),
            skip_include,
            finish_info,
        });
        Ok(())
    }

    /// fsutil's `createParentDirs`: creates directories whose creation include patterns
    /// delayed, now that something inside them is copied.
    fn ensure_parents(
        &self,
        frames: &mut [Frame],
        target_dir: BorrowedFd<'_>,
    ) -> Result<(), CopyError> {
        for i in 0..frames.len() {
            if frames[i].dst.is_some() {
                continue;
            }
            let (before, rest) = frames.split_at_mut(i);
            let frame = &mut rest[0];
            let parent = match before.last() {
                Some(parent) => parent.dst_fd()?,
                None => target_dir,
            };
            let Place::Child(name) = &frame.place else {
                continue;
            };
            // The top directory is not overwritten, as in a plain copy.
            let overwrite = i > 0;
            let (fd, created) =
                copy_directory_only(parent, name, &frame.src_stat, overwrite, &frame.dst_path)?;
            if created {
                self.copy_file_info(parent, name, &frame.src_stat, &frame.dst_path)?;
                let attrs = sys::read_xattrs(frame.src.as_fd(), None);
                sys::write_xattrs(parent, name, &attrs);
            }
            frame.dst = Some(fd);
        }
        Ok(())
    }

    /// Applies a finished directory's metadata (after its entries, so its mtime stays).
    fn finish_dir(
        &self,
        frames: &[Frame],
        target_dir: BorrowedFd<'_>,
        done: Frame,
    ) -> Result<(), CopyError> {
        if !done.finish_info || done.dst.is_none() {
            return Ok(());
        }
        let Place::Child(name) = &done.place else {
            return Ok(());
        };
        let parent = match frames.last() {
            Some(parent) => parent.dst_fd()?,
            None => target_dir,
        };
        self.copy_file_info(parent, name, &done.src_stat, &done.dst_path)?;
        let attrs = sys::read_xattrs(done.src.as_fd(), None);
        sys::write_xattrs(parent, name, &attrs);
        Ok(())
    }

    fn ensure_empty_file_target(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &str,
    ) -> Result<(), CopyError> {
        match sys::lstat_at(dir, name, path)? {
            None => Ok(()),
            Some(stat) if sys::is_dir(&stat) => Err(CopyError::ReplaceDirectory {
                path: path.to_owned(),
            }),
            Some(_) => Ok(sys::unlink_at(dir, name, false, path)?),
        }
    }

    /// Copies a non-directory entry (whose destination name is free) and its metadata.
    #[allow(clippy::too_many_arguments)]
    fn copy_leaf(
        &mut self,
        src_dir: BorrowedFd<'_>,
        src_name: &OsStr,
        stat: &FileStat,
        src_path: &str,
        dst_dir: BorrowedFd<'_>,
        dst_name: &OsStr,
        dst_path: &str,
    ) -> Result<(), CopyError> {
        match sys::kind(stat) {
            SFlag::S_IFREG => {
                if stat.st_nlink > 1 {
                    let key = (stat.st_dev, stat.st_ino);
                    if let Some(first) = self.inodes.get(&key) {
                        let linked = walk::walk(self.dest_root, first, false)?;
                        let Some(first_name) = linked.single_name() else {
                            return Err(SysError::NotFound {
                                path: first.clone(),
                            }
                            .into());
                        };
                        sys::link_at(linked.dir.as_fd(), first_name, dst_dir, dst_name, dst_path)?;
                    } else {
                        self.inodes.insert(key, dst_path.to_owned());
                        copy_contents(src_dir, src_name, src_path, dst_dir, dst_name, dst_path)?;
                    }
                } else {
                    copy_contents(src_dir, src_name, src_path, dst_dir, dst_name, dst_path)?;
                }
            }
            SFlag::S_IFLNK => {
                let target = sys::read_link_at(src_dir, src_name, src_path)?;
                sys::symlink_at(&target, dst_dir, dst_name, dst_path)?;
            }
            kind @ (SFlag::S_IFCHR | SFlag::S_IFBLK) => {
                sys::mknod_at(
                    dst_dir,
                    dst_name,
                    kind,
                    stat.st_mode & 0o7777,
                    stat.st_rdev,
                    dst_path,
                )?;
            }
            SFlag::S_IFIFO => {
                return Err(CopyError::Unsupported {
                    path: src_path.to_owned(),
                    kind: "fifo",
                });
            }
            _ => {
                return Err(CopyError::Unsupported {
                    path: src_path.to_owned(),
                    kind: "socket",
                });
            }
        }
        self.copy_file_info(dst_dir, dst_name, stat, dst_path)?;
        let attrs = sys::read_xattrs(src_dir, Some(src_name));
        sys::write_xattrs(dst_dir, dst_name, &attrs);
        Ok(())
    }

    /// fsutil's `copyFileInfo`: owner, mode (not for symlinks), times.
    fn copy_file_info(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        stat: &FileStat,
        path: &str,
    ) -> Result<(), CopyError> {
        let (uid, gid) = match self.options.owner {
            Some(owner) => (owner.uid, owner.gid),
            None => (stat.st_uid, stat.st_gid),
        };
        sys::chown_at(dir, name, uid, gid, path)?;
        if !sys::is_symlink(stat) {
            let mut mode = stat.st_mode & 0o7777;
            if let Some(bits) = self.options.mode {
                mode = (mode & !0o777) | (bits & 0o777);
            }
            sys::chmod_at(dir, name, mode, path)?;
        }
        let (atime, mtime) = match &self.options.time {
            Some(time) => (*time, *time),
            None => sys::stat_times(stat),
        };
        sys::set_times_at(dir, name, &atime, &mtime, path)?;
        Ok(())
    }
}

/// The destination directory of the innermost frame.
fn innermost_dst(frames: &[Frame]) -> Result<BorrowedFd<'_>, CopyError> {
    frames
        .last()
        .ok_or_else(|| CopyError::Vanished {
            path: String::from("/"),
        })?
        .dst_fd()
}

/// fsutil's `copyDirectoryOnly`: creates the directory, or reuses an existing one (whose
/// mode is reset to the source's when `overwrite`); anything else in the way is an error.
fn copy_directory_only(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    stat: &FileStat,
    overwrite: bool,
    path: &str,
) -> Result<(OwnedFd, bool), CopyError> {
    let created = match sys::lstat_at(parent, name, path)? {
        None => {
            sys::mkdir_at(parent, name, stat.st_mode & 0o7777, path)?;
            true
        }
        Some(existing) if !sys::is_dir(&existing) => {
            return Err(CopyError::NotDirectory {
                path: path.to_owned(),
            });
        }
        Some(_) => {
            if overwrite {
                sys::chmod_at(parent, name, stat.st_mode & 0o7777, path)?;
            }
            false
        }
    };
    Ok((sys::open_dir_at(parent, name, path)?, created))
}

/// Copies a regular file's bytes into a new file (`copy_file_range` where possible).
fn copy_contents(
    src_dir: BorrowedFd<'_>,
    src_name: &OsStr,
    src_path: &str,
    dst_dir: BorrowedFd<'_>,
    dst_name: &OsStr,
    dst_path: &str,
) -> Result<(), CopyError> {
    let mut input = sys::open_regular(src_dir, src_name, src_path)?;
    let mut output = sys::create_file(dst_dir, dst_name, 0o600, dst_path)?;
    std::io::copy(&mut input, &mut output).map_err(|source| SysError::Io {
        op: "copy",
        path: dst_path.to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_keep_suffix_is_buildkits_clean_path() {
        assert_eq!(clean_keep_suffix("a/b/"), "/a/b/");
        assert_eq!(clean_keep_suffix("/a/b/."), "/a/b/.");
        assert_eq!(clean_keep_suffix("/."), "/.");
        assert_eq!(clean_keep_suffix("/"), "/");
        assert_eq!(clean_keep_suffix("../x"), "/x");
        assert_eq!(clean_keep_suffix("/a//b"), "/a/b");
    }
}
