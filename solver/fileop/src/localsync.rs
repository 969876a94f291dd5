//! Local sources (`local://NAME`, a directory of the user's): the directory transferred
//! into a destination root as BuildKit v0.11.6 does it through the session's filesync
//! (fsutil's `Walk` on the sending side, its metadata differ on the receiving side), but
//! both ends on this machine and without copying what the destination already has.
//!
//! - Selection, as fsutil's walker: `local.includepattern` and `local.excludepatterns`
//!   are [`PatternMatcher`] lists (the `.dockerignore` language, `!` exceptions included);
//!   `local.followpaths` are paths whose symlinks are resolved (in the source, by
//!   descriptor) into extra include patterns. A directory that is not selected itself is
//!   still walked when something below it may be, and is created (with its own metadata)
//!   when something below it is transferred.
//! - Transfer, as fsutil's `DiffMetadata`: an entry whose type, size, modification time,
//!   mode, owner, device number and link target (symlink target, or the hard link it
//!   shares) equal the destination's is left alone; any other is replaced whole (a new
//!   inode, never written in place, so an overlay lower layer below the destination is
//!   never copied up just to be overwritten); destination entries the selection no longer
//!   has are removed. Directories are updated in place. Extended attributes are copied
//!   with new entries but not compared, and a change that keeps size and modification
//!   time (and mode and owner) is not seen: the same limits as BuildKit's differ.
//!
//! The source belongs to the user, the destination to kiln, and neither is trusted to be
//! free of symlinks: every entry on both sides is reached from an open directory by one
//! name, `lstat`ed and opened `O_NOFOLLOW` (regular files also `O_NONBLOCK` and checked,
//! so FIFOs are never read), and nothing is created except by name in an open directory.
//! A symlink is transferred as a symlink and never followed on either side.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::{FileStat, SFlag};

use crate::patterns::{MatchInfo, PatternError, PatternMatcher};
use crate::rm::remove_all;
use crate::sys::{self, SysError};
use kiln_proto::paths::clean as clean_path;

/// Errors transferring a local directory.
#[derive(Debug, thiserror::Error)]
pub enum LocalSyncError {
    #[error(transparent)]
    Pattern(#[from] PatternError),
    #[error("{path}: unsupported file type (socket)")]
    Socket { path: String },
    #[error(transparent)]
    Sys(#[from] SysError),
}

/// What a transfer did, counted per entry (the destination root itself not included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Regular files whose contents were copied.
    pub files_copied: u64,
    /// Bytes of those contents.
    pub bytes_copied: u64,
    /// Directories, symlinks, hard links and special files created.
    pub entries_created: u64,
    /// Existing directories whose metadata was updated.
    pub dirs_updated: u64,
    /// Destination entries removed (replaced or no longer selected), trees counted once.
    pub removed: u64,
    /// Entries left as they were.
    pub unchanged: u64,
}

impl SyncStats {
    /// Whether the destination was changed at all.
    pub fn changed(&self) -> bool {
        self.files_copied + self.entries_created + self.dirs_updated + self.removed > 0
    }
}

/// How entries already in the destination are compared (LLB's `local.differ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Differ {
    /// fsutil's `DiffMetadata` (`metadata`, the default): equal metadata is equal.
    #[default]
    Metadata,
    /// fsutil's `DiffNone` (`none`): nothing is equal, every entry is transferred again.
    None,
}

impl Differ {
    /// The `local.differ` attribute (`None` for an unknown value, which BuildKit ignores).
    pub fn from_attr(value: Option<&str>) -> Option<Self> {
        match value {
            None | Some("" | "metadata") => Some(Differ::Metadata),
            Some("none") => Some(Differ::None),
            Some(_) => None,
        }
    }
}

/// Which entries of the source are transferred (fsutil's `WalkOpt`, compiled).
#[derive(Debug)]
pub struct Selection {
    include: Option<PatternMatcher>,
    exclude: Option<PatternMatcher>,
    only_prefix_includes: bool,
    only_prefix_exceptions: bool,
}

impl Selection {
    /// Compiles the patterns; `follow_paths` are resolved against `src_root` now.
    pub fn new(
        src_root: BorrowedFd<'_>,
        include: Option<&[String]>,
        exclude: Option<&[String]>,
        follow_paths: Option<&[String]>,
    ) -> Result<Self, LocalSyncError> {
        let mut includes: Option<Vec<String>> = include.map(<[String]>::to_vec);
        if let Some(follow) = follow_paths {
            if let Some(targets) = follow_links(src_root, follow)? {
                let mut all = includes.unwrap_or_default();
                all.extend(targets);
                includes = Some(dedupe_paths(all));
            }
        }
        let include = match includes.filter(|i| !i.is_empty()) {
            Some(list) => Some(PatternMatcher::new("includepatterns", &list)?),
            None => None,
        };
        let exclude = match exclude {
            Some(list) => Some(PatternMatcher::new("excludepatterns", list)?),
            None => None,
        };
        Ok(Selection {
            only_prefix_includes: include.as_ref().is_none_or(|m| m.only_prefixes(false)),
            only_prefix_exceptions: exclude.as_ref().is_none_or(|m| m.only_prefixes(true)),
            include,
            exclude,
        })
    }

    /// fsutil's walk decision for one entry.
    fn decide(&self, rel: &str, is_dir: bool, parent: &Matches) -> (Decision, Matches) {
        let mut skip = false;
        let mut matches = Matches::default();
        if let Some(include) = &self.include {
            let (hit, info) = include.matches(rel, &parent.include);
            matches.include = info;
            if !hit {
                if is_dir && self.only_prefix_includes && !include.has_pattern_below(rel, false) {
                    return (Decision::Prune, matches);
                }
                skip = true;
            }
        }
        if let Some(exclude) = &self.exclude {
            let (hit, info) = exclude.matches(rel, &parent.exclude);
            matches.exclude = info;
            if hit {
                if is_dir
                    && self.only_prefix_exceptions
                    && (!exclude.exclusions() || !exclude.has_pattern_below(rel, true))
                {
                    return (Decision::Prune, matches);
                }
                skip = true;
            }
        }
        let decision = if skip {
            Decision::WalkOnly
        } else {
            Decision::Transfer
        };
        (decision, matches)
    }
}

/// fsutil's `dedupePaths` (on the list as given): drops paths below an earlier one, and
/// everything when `.` is among them.
fn dedupe_paths(paths: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(paths.len());
    let mut last = String::new();
    for p in paths {
        if p == "." {
            return Vec::new();
        }
        if p.starts_with(&format!("{last}/")) {
            continue;
        }
        last = p.clone();
        out.push(p);
    }
    out
}

/// fsutil's `FollowLinks`: each path with the symlinks on its way replaced by their
/// targets (the links themselves kept too), as sorted, deduplicated relative paths;
/// `None` when one of them is the whole directory. Links are read in-root: an absolute
/// target starts again at the source root and `..` never leaves it.
fn follow_links(root: BorrowedFd<'_>, paths: &[String]) -> Result<Option<Vec<String>>, SysError> {
    let mut resolved: HashSet<String> = HashSet::new();
    for p in paths {
        follow_one(root, p, &mut resolved, 0)?;
    }
    let mut list: Vec<String> = resolved.into_iter().collect();
    list.sort();
    let deduped = dedupe_paths(list);
    Ok((!deduped.is_empty()).then_some(deduped))
}

/// Symlinks resolved while following one path (fsutil has no limit, but loops end there
/// through the resolved set; this bounds pathological chains).
const MAX_FOLLOW_DEPTH: usize = 255;

/// Root-relative clean form (`.` for the root).
fn rel_clean(p: &str) -> String {
    let cleaned = clean_path(&format!("/{p}"));
    match cleaned.trim_start_matches('/') {
        "" => ".".to_owned(),
        rel => rel.to_owned(),
    }
}

fn join_rel(a: &str, b: &str) -> String {
    if a == "." {
        rel_clean(b)
    } else {
        rel_clean(&format!("{a}/{b}"))
    }
}

/// fsutil's `symlinkResolver.append`.
fn follow_one(
    root: BorrowedFd<'_>,
    path: &str,
    resolved: &mut HashSet<String>,
    depth: usize,
) -> Result<(), SysError> {
    if depth > MAX_FOLLOW_DEPTH {
        return Ok(());
    }
    let mut rest = rel_clean(path);
    let mut current = ".".to_owned();
    loop {
        let (part, tail) = match rest.split_once('/') {
            Some((part, tail)) => (part.to_owned(), tail.to_owned()),
            None => (rest.clone(), String::new()),
        };
        current = join_rel(&current, &part);
        let targets = read_symlink(root, &current, true)?;
        rest = tail;
        if (rest.is_empty() || targets.is_some()) && resolved.contains(&current) {
            return Ok(());
        }
        if let Some(targets) = targets {
            resolved.insert(current);
            for target in targets {
                follow_one(root, &join_rel(&target, &rest), resolved, depth + 1)?;
            }
            return Ok(());
        }
        if rest.is_empty() {
            resolved.insert(current);
            return Ok(());
        }
    }
}

/// Opens the directory `rel` (root-relative) without following any symlink; `None` when
/// some component is missing or not a directory.
fn open_rel_dir(root: BorrowedFd<'_>, rel: &str) -> Result<Option<OwnedFd>, SysError> {
    let mut dir = sys::dup(root, "/")?;
    if rel == "." || rel.is_empty() {
        return Ok(Some(dir));
    }
    for component in rel.split('/') {
        let name = OsStr::new(component);
        match sys::lstat_at(dir.as_fd(), name, rel)? {
            Some(stat) if sys::is_dir(&stat) => {
                dir = sys::open_dir_at(dir.as_fd(), name, rel)?;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(dir))
}

fn split_rel(rel: &str) -> (&str, &str) {
    match rel.rsplit_once('/') {
        Some((dir, base)) => (dir, base),
        None => (".", rel),
    }
}

/// fsutil's `readSymlink`: the targets of `rel` if it is a symlink (or, for a base name
/// with wildcards, of the symlinks it matches), as root-relative paths.
fn read_symlink(
    root: BorrowedFd<'_>,
    rel: &str,
    allow_wildcard: bool,
) -> Result<Option<Vec<String>>, SysError> {
    let (dir_rel, base) = split_rel(rel);
    let Some(dir) = open_rel_dir(root, dir_rel)? else {
        return Ok(None);
    };
    if allow_wildcard && contains_wildcards(base) {
        let mut out: Option<Vec<String>> = None;
        for name in sys::list_dir(dir.as_fd(), dir_rel)? {
            let name = String::from_utf8_lossy(name.as_bytes()).into_owned();
            if crate::glob::matches(base, &name).unwrap_or(false) {
                if let Some(targets) = read_symlink(root, &join_rel(dir_rel, &name), false)? {
                    out.get_or_insert_with(Vec::new).extend(targets);
                }
            }
        }
        return Ok(out);
    }
    let Some(stat) = sys::lstat_at(dir.as_fd(), OsStr::new(base), rel)? else {
        return Ok(None);
    };
    if !sys::is_symlink(&stat) {
        return Ok(None);
    }
    let link = sys::read_link_at(dir.as_fd(), OsStr::new(base), rel)?;
    let link = String::from_utf8_lossy(link.as_bytes()).into_owned();
    let target = if link.starts_with('/') {
        rel_clean(&link)
    } else {
        join_rel(dir_rel, &link)
    };
    Ok(Some(vec![target]))
}

/// fsutil's `containsWildcards` (a `\` escapes the next character).
fn contains_wildcards(name: &str) -> bool {
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
        i += 1;
    }
    false
}

/// What the walk does with one entry.
enum Decision {
    /// Transfer it (and, for a directory, walk it).
    Transfer,
    /// Walk a directory without transferring it (patterns may select entries below).
    WalkOnly,
    /// Neither (fsutil's `SkipDir`).
    Prune,
}

/// Per-pattern results of a directory for its entries.
#[derive(Clone, Debug, Default)]
struct Matches {
    include: MatchInfo,
    exclude: MatchInfo,
}

/// One source directory being walked.
struct Frame {
    src: OwnedFd,
    stat: FileStat,
    /// Root-relative path (empty for the root).
    rel: String,
    names: std::vec::IntoIter<OsString>,
    matches: Matches,
    /// The destination directory, once the directory is transferred.
    dst: Option<OwnedFd>,
    /// Names of this directory transferred so far (the others are removed at the end).
    kept: HashSet<OsString>,
}

impl Frame {
    fn path(&self, name: &OsStr) -> String {
        let mut path = self.rel.clone();
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(&String::from_utf8_lossy(name.as_bytes()));
        path
    }
}

struct Syncer<'a> {
    dst_root: BorrowedFd<'a>,
    selection: &'a Selection,
    differ: Differ,
    stats: SyncStats,
    /// The first transferred path of each multiply-linked source inode.
    links: HashMap<(u64, u64), String>,
}

/// Makes `dst_root` hold exactly what `selection` takes from `src_root`, changing only
/// what differs (by `differ`). The destination root's own metadata is left alone.
pub fn sync(
    src_root: BorrowedFd<'_>,
    dst_root: BorrowedFd<'_>,
    selection: &Selection,
    differ: Differ,
) -> Result<SyncStats, LocalSyncError> {
    let mut syncer = Syncer {
        dst_root,
        selection,
        differ,
        stats: SyncStats::default(),
        links: HashMap::new(),
    };
    syncer.run(src_root)?;
    Ok(syncer.stats)
}

/// Display form of a root-relative path in errors.
fn shown(rel: &str) -> String {
    format!("/{rel}")
}

impl Syncer<'_> {
    fn run(&mut self, src_root: BorrowedFd<'_>) -> Result<(), LocalSyncError> {
        let src = sys::dup(src_root, "/")?;
        let stat = sys::stat_fd(src.as_fd(), "/")?;
        let names = sys::list_dir(src.as_fd(), "/")?;
        let mut frames = vec![Frame {
            src,
            stat,
            rel: String::new(),
            names: names.into_iter(),
            matches: Matches::default(),
            dst: Some(sys::dup(self.dst_root, "/")?),
            kept: HashSet::new(),
        }];
        while let Some(frame) = frames.last_mut() {
            match frame.names.next() {
                Some(name) => self.entry(&mut frames, name)?,
                None => {
                    let Some(done) = frames.pop() else { break };
                    self.finish(&frames, done)?;
                }
            }
        }
        Ok(())
    }

    /// One entry of the innermost directory.
    fn entry(&mut self, frames: &mut Vec<Frame>, name: OsString) -> Result<(), LocalSyncError> {
        let Some(frame) = frames.last() else {
            return Ok(());
        };
        let rel = frame.path(&name);
        let Some(stat) = sys::lstat_at(frame.src.as_fd(), &name, &shown(&rel))? else {
            return Ok(()); // vanished since the listing
        };
        let is_dir = sys::is_dir(&stat);
        let (decision, matches) = self.selection.decide(&rel, is_dir, &frame.matches);
        match decision {
            Decision::Prune => Ok(()),
            Decision::WalkOnly if !is_dir => Ok(()),
            Decision::WalkOnly => self.enter(frames, name, stat, rel, matches, false),
            Decision::Transfer => {
                self.ensure_parents(frames)?;
                if is_dir {
                    return self.enter(frames, name, stat, rel, matches, true);
                }
                let Some(frame) = frames.last_mut() else {
                    return Ok(());
                };
                frame.kept.insert(name.clone());
                let Some(dst) = frame.dst.as_ref() else {
                    return Ok(());
                };
                self.leaf(frame.src.as_fd(), dst.as_fd(), &name, &stat, &rel)
            }
        }
    }

    /// Starts walking a source directory; `transfer` creates it in the destination now.
    fn enter(
        &mut self,
        frames: &mut Vec<Frame>,
        name: OsString,
        stat: FileStat,
        rel: String,
        matches: Matches,
        transfer: bool,
    ) -> Result<(), LocalSyncError> {
        let Some(parent) = frames.last_mut() else {
            return Ok(());
        };
        let src = match sys::open_dir_at(parent.src.as_fd(), &name, &shown(&rel)) {
            Ok(fd) => fd,
            // Replaced by something else since the lstat: skip it as vanished.
            Err(SysError::NotFound { .. } | SysError::NotDirectory { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let names = sys::list_dir(src.as_fd(), &shown(&rel))?;
        let dst = if transfer {
            parent.kept.insert(name.clone());
            match parent.dst.as_ref() {
                Some(pdst) => Some(self.ensure_dir(pdst.as_fd(), &name, &stat, &rel)?),
                None => None,
            }
        } else {
            None
        };
        frames.push(Frame {
            src,
            stat,
            rel,
            names: names.into_iter(),
            matches,
            dst,
            kept: HashSet::new(),
        });
        Ok(())
    }

    /// Creates the destination directories of walked-only parents, now that something
    /// below them is transferred (fsutil emits them just before it).
    fn ensure_parents(&mut self, frames: &mut [Frame]) -> Result<(), LocalSyncError> {
        for i in 1..frames.len() {
            if frames[i].dst.is_some() {
                continue;
            }
            let (before, rest) = frames.split_at_mut(i);
            let frame = &mut rest[0];
            let Some(parent) = before.last_mut() else {
                continue;
            };
            let Some(pdst) = parent.dst.as_ref() else {
                continue;
            };
            let (_, base) = split_rel(&frame.rel);
            let name = OsString::from(base);
            let fd = self.ensure_dir(pdst.as_fd(), &name, &frame.stat, &frame.rel)?;
            parent.kept.insert(name);
            frame.dst = Some(fd);
        }
        Ok(())
    }

    /// The destination directory `name` in `parent`: kept if it is one, else created (and
    /// whatever was there removed). Its metadata is settled in [`Syncer::finish`].
    fn ensure_dir(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        stat: &FileStat,
        rel: &str,
    ) -> Result<OwnedFd, LocalSyncError> {
        let path = shown(rel);
        match sys::lstat_at(parent, name, &path)? {
            Some(existing) if sys::is_dir(&existing) => {}
            existing => {
                if existing.is_some() {
                    remove_all(parent, name, &path)?;
                    self.stats.removed += 1;
                }
                // Writable for the transfer; the source's mode is applied when it is done.
                sys::mkdir_at(parent, name, (stat.st_mode & 0o7777) | 0o700, &path)?;
                self.stats.entries_created += 1;
            }
        }
        Ok(sys::open_dir_at(parent, name, &path)?)
    }

    /// A directory is done: remove what the source no longer has, then settle its
    /// metadata (after its entries, whose changes touch its modification time).
    fn finish(&mut self, frames: &[Frame], done: Frame) -> Result<(), LocalSyncError> {
        let Some(dst) = done.dst.as_ref() else {
            return Ok(());
        };
        let dir_path = shown(&done.rel);
        for name in sys::list_dir(dst.as_fd(), &dir_path)? {
            if !done.kept.contains(&name) {
                let mut path = dir_path.clone();
                crate::walk::push_component(&mut path, &name);
                remove_all(dst.as_fd(), &name, &path)?;
                self.stats.removed += 1;
            }
        }
        // The root's own metadata is the snapshot's, not the source's.
        let Some(parent) = frames.last() else {
            return Ok(());
        };
        let Some(pdst) = parent.dst.as_ref() else {
            return Ok(());
        };
        let (_, base) = split_rel(&done.rel);
        let name = OsStr::new(base);
        let current = sys::stat_fd(dst.as_fd(), &dir_path)?;
        let src = &done.stat;
        let same = self.differ == Differ::Metadata
            && current.st_mode == src.st_mode
            && current.st_uid == src.st_uid
            && current.st_gid == src.st_gid
            && current.st_mtime == src.st_mtime
            && current.st_mtime_nsec == src.st_mtime_nsec;
        if !same {
            apply_metadata(pdst.as_fd(), name, src, &dir_path)?;
            sys::write_xattrs(
                pdst.as_fd(),
                name,
                &sys::read_xattrs(done.src.as_fd(), None),
            );
            self.stats.dirs_updated += 1;
        } else {
            self.stats.unchanged += 1;
        }
        Ok(())
    }

    /// Brings one non-directory entry up to date.
    fn leaf(
        &mut self,
        src_dir: BorrowedFd<'_>,
        dst_dir: BorrowedFd<'_>,
        name: &OsStr,
        stat: &FileStat,
        rel: &str,
    ) -> Result<(), LocalSyncError> {
        let path = shown(rel);
        let kind = sys::kind(stat);
        if kind == SFlag::S_IFSOCK {
            return Err(LocalSyncError::Socket { path });
        }
        // A second name of a multiply-linked file is a hard link to the first.
        let link_to = if kind == SFlag::S_IFREG && stat.st_nlink > 1 {
            let key = (stat.st_dev, stat.st_ino);
            match self.links.get(&key) {
                Some(first) => Some(first.clone()),
                None => {
                    self.links.insert(key, rel.to_owned());
                    None
                }
            }
        } else {
            None
        };
        let existing = sys::lstat_at(dst_dir, name, &path)?;
        if let Some(current) = &existing {
            let same = self.differ == Differ::Metadata
                && match &link_to {
                    Some(first) => self.same_inode(first, current)?,
                    None => same_entry(src_dir, dst_dir, name, stat, current, &path)?,
                };
            if same {
                self.stats.unchanged += 1;
                return Ok(());
            }
            remove_all(dst_dir, name, &path)?;
            self.stats.removed += 1;
        }
        if let Some(first) = link_to {
            if let Some((dir, first_name)) = self.open_dst_parent(&first)? {
                sys::link_at(dir.as_fd(), &first_name, dst_dir, name, &path)?;
                self.stats.entries_created += 1;
                return Ok(());
            }
        }
        match kind {
            SFlag::S_IFREG => {
                let mut input = match sys::open_regular(src_dir, name, &path) {
                    Ok(file) => file,
                    // Gone or replaced since the lstat: skip it as vanished.
                    Err(SysError::NotFound { .. }) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                let mut output = sys::create_file(dst_dir, name, 0o600, &path)?;
                let copied =
                    std::io::copy(&mut input, &mut output).map_err(|source| SysError::Io {
                        op: "copy",
                        path: path.clone(),
                        source,
                    })?;
                self.stats.files_copied += 1;
                self.stats.bytes_copied += copied;
            }
            SFlag::S_IFLNK => {
                let target = sys::read_link_at(src_dir, name, &path)?;
                sys::symlink_at(&target, dst_dir, name, &path)?;
                self.stats.entries_created += 1;
            }
            kind => {
                sys::mknod_at(
                    dst_dir,
                    name,
                    kind,
                    stat.st_mode & 0o7777,
                    stat.st_rdev,
                    &path,
                )?;
                self.stats.entries_created += 1;
            }
        }
        apply_metadata(dst_dir, name, stat, &path)?;
        sys::write_xattrs(dst_dir, name, &sys::read_xattrs(src_dir, Some(name)));
        Ok(())
    }

    /// The destination directory holding the transferred path `rel`, and its name there.
    fn open_dst_parent(&self, rel: &str) -> Result<Option<(OwnedFd, OsString)>, SysError> {
        let (dir, base) = split_rel(rel);
        Ok(open_rel_dir(self.dst_root, dir)?.map(|fd| (fd, OsString::from(base))))
    }

    /// Whether `current` is the same inode as the destination of `first`.
    fn same_inode(&self, first: &str, current: &FileStat) -> Result<bool, SysError> {
        let Some((dir, name)) = self.open_dst_parent(first)? else {
            return Ok(false);
        };
        Ok(sys::lstat_at(dir.as_fd(), &name, &shown(first))?
            .is_some_and(|s| s.st_dev == current.st_dev && s.st_ino == current.st_ino))
    }
}

/// fsutil's `sameFile` with `DiffMetadata` (plus the link target for symlinks, which its
/// stat carries): type and permission bits, owner, device, and for non-directories size
/// and modification time.
fn same_entry(
    src_dir: BorrowedFd<'_>,
    dst_dir: BorrowedFd<'_>,
    name: &OsStr,
    src: &FileStat,
    dst: &FileStat,
    path: &str,
) -> Result<bool, SysError> {
    let same = src.st_mode == dst.st_mode
        && src.st_uid == dst.st_uid
        && src.st_gid == dst.st_gid
        && src.st_size == dst.st_size
        && src.st_mtime == dst.st_mtime
        && src.st_mtime_nsec == dst.st_mtime_nsec
        && (!matches!(sys::kind(src), SFlag::S_IFCHR | SFlag::S_IFBLK)
            || src.st_rdev == dst.st_rdev);
    if !same || !sys::is_symlink(src) {
        return Ok(same);
    }
    Ok(sys::read_link_at(src_dir, name, path)? == sys::read_link_at(dst_dir, name, path)?)
}

/// Owner, mode (not for symlinks) and times of the source on a destination entry.
fn apply_metadata(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    stat: &FileStat,
    path: &str,
) -> Result<(), SysError> {
    sys::chown_at(dir, name, stat.st_uid, stat.st_gid, path)?;
    sys::chmod_at(dir, name, stat.st_mode & 0o7777, path)?;
    let (atime, mtime) = sys::stat_times(stat);
    sys::set_times_at(dir, name, &atime, &mtime, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
    use std::path::Path;

    /// Everything a transfer must reproduce, per relative path.
    fn tree(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                let kind = if meta.is_dir() {
                    stack.push(path.clone());
                    "dir".to_owned()
                } else if meta.file_type().is_symlink() {
                    format!("link->{}", std::fs::read_link(&path).unwrap().display())
                } else if meta.is_file() {
                    format!(
                        "file:{}",
                        String::from_utf8_lossy(&std::fs::read(&path).unwrap())
                    )
                } else {
                    "special".to_owned()
                };
                let mtime = if meta.is_dir() {
                    String::new()
                } else {
                    format!("{}.{}", meta.mtime(), meta.mtime_nsec())
                };
                out.insert(
                    rel,
                    format!(
                        "{kind} {:o} {}:{} {mtime}",
                        meta.mode(),
                        meta.uid(),
                        meta.gid()
                    ),
                );
            }
        }
        out
    }

    fn open(dir: &Path) -> OwnedFd {
        sys::open_root(dir).unwrap()
    }

    fn sync_dirs(
        src: &Path,
        dst: &Path,
        include: Option<&[&str]>,
        exclude: Option<&[&str]>,
        follow: Option<&[&str]>,
    ) -> SyncStats {
        let own =
            |l: Option<&[&str]>| l.map(|l| l.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        let (include, exclude, follow) = (own(include), own(exclude), own(follow));
        let s = open(src);
        let selection = Selection::new(
            s.as_fd(),
            include.as_deref(),
            exclude.as_deref(),
            follow.as_deref(),
        )
        .unwrap();
        sync(s.as_fd(), open(dst).as_fd(), &selection, Differ::Metadata).unwrap()
    }

    fn write(path: &Path, content: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(&d.join("a.txt"), "a");
        write(&d.join("sub/b.txt"), "bb");
        write(&d.join("sub/deep/c.txt"), "ccc");
        std::fs::set_permissions(d.join("sub/b.txt"), std::fs::Permissions::from_mode(0o751))
            .unwrap();
        symlink("/etc/passwd", d.join("abs-link")).unwrap();
        symlink("../../outside", d.join("sub/rel-link")).unwrap();
        std::fs::hard_link(d.join("a.txt"), d.join("sub/hard.txt")).unwrap();
        nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        dir
    }

    #[test]
    fn a_first_transfer_copies_everything_and_a_second_nothing() {
        let src = context();
        let dst = tempfile::tempdir().unwrap();
        let first = sync_dirs(src.path(), dst.path(), None, None, None);
        assert_eq!(tree(src.path()), tree(dst.path()));
        assert_eq!(first.files_copied, 3, "a.txt, b.txt, c.txt: {first:?}");
        assert_eq!(first.bytes_copied, 6);
        // sub, deep; two links, the fifo, the hard link.
        assert_eq!(first.entries_created, 6, "{first:?}");
        let a = std::fs::metadata(dst.path().join("a.txt")).unwrap();
        let hard = std::fs::metadata(dst.path().join("sub/hard.txt")).unwrap();
        assert_eq!(a.ino(), hard.ino(), "hard links stay links");

        let second = sync_dirs(src.path(), dst.path(), None, None, None);
        assert!(!second.changed(), "{second:?}");
        assert_eq!(second.unchanged, 9, "every entry but the root: {second:?}");
        assert_eq!(tree(src.path()), tree(dst.path()));

        // `local.differ=none`: everything again.
        let s = open(src.path());
        let selection = Selection::new(s.as_fd(), None, None, None).unwrap();
        let again = sync(
            s.as_fd(),
            open(dst.path()).as_fd(),
            &selection,
            Differ::None,
        )
        .unwrap();
        assert_eq!((again.files_copied, again.unchanged), (3, 0), "{again:?}");
        assert_eq!(tree(src.path()), tree(dst.path()));
        assert_eq!(Differ::from_attr(Some("none")), Some(Differ::None));
        assert_eq!(Differ::from_attr(None), Some(Differ::Metadata));
        assert_eq!(Differ::from_attr(Some("bogus")), None);
    }

    #[test]
    fn changes_additions_and_deletions_are_transferred_alone() {
        let src = context();
        let dst = tempfile::tempdir().unwrap();
        sync_dirs(src.path(), dst.path(), None, None, None);
        let s = src.path();
        write(&s.join("sub/b.txt"), "changed");
        write(&s.join("sub/new.txt"), "new");
        std::fs::remove_file(s.join("sub/deep/c.txt")).unwrap();
        std::fs::remove_file(s.join("abs-link")).unwrap();
        symlink("elsewhere", s.join("abs-link")).unwrap();
        std::fs::set_permissions(s.join("a.txt"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let stats = sync_dirs(s, dst.path(), None, None, None);
        assert_eq!(tree(s), tree(dst.path()));
        // b.txt, new.txt and a.txt (its mode changed, so both names of it) are copied.
        assert_eq!(stats.files_copied, 3, "{stats:?}");
        assert_eq!(stats.bytes_copied, 7 + 3 + 1);
        // c.txt, the old link, b.txt, a.txt and its second name were removed.
        assert_eq!(stats.removed, 5, "{stats:?}");
        // fifo, sub/rel-link are as they were.
        assert_eq!(stats.unchanged, 2, "{stats:?}");
    }

    #[test]
    fn type_changes_never_write_through_destination_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        write(&outside.path().join("f"), "outside");
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        write(&src.path().join("d/f"), "inside");
        // The destination has a symlink where the source has a directory.
        symlink(outside.path(), dst.path().join("d")).unwrap();
        sync_dirs(src.path(), dst.path(), None, None, None);
        assert_eq!(
            std::fs::read_to_string(outside.path().join("f")).unwrap(),
            "outside"
        );
        assert_eq!(tree(src.path()), tree(dst.path()));
        // And the source's own symlinks are links, never followed into.
        std::fs::remove_dir_all(src.path().join("d")).unwrap();
        symlink(outside.path(), src.path().join("d")).unwrap();
        let stats = sync_dirs(src.path(), dst.path(), None, None, None);
        assert_eq!(stats.files_copied, 0);
        assert!(
            std::fs::symlink_metadata(dst.path().join("d"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(outside.path().join("f")).unwrap(),
            "outside"
        );
    }

    #[test]
    fn excludes_with_exceptions_as_dockerignore() {
        let src = context();
        let dst = tempfile::tempdir().unwrap();
        write(&src.path().join("notes.md"), "n");
        write(&src.path().join("README.md"), "r");
        sync_dirs(
            src.path(),
            dst.path(),
            None,
            Some(&["*.md", "!README.md", "sub", "!sub/deep/c.txt", "fifo"]),
            None,
        );
        let names: Vec<String> = tree(dst.path()).into_keys().collect();
        assert_eq!(
            names,
            [
                "README.md",
                "a.txt",
                "abs-link",
                "sub",
                "sub/deep",
                "sub/deep/c.txt"
            ]
        );
        // The re-included file's parents carry their own metadata.
        let mode = std::fs::metadata(dst.path().join("sub")).unwrap().mode();
        assert_eq!(
            mode,
            std::fs::metadata(src.path().join("sub")).unwrap().mode()
        );
        // Narrowing the selection removes what it no longer takes.
        let stats = sync_dirs(src.path(), dst.path(), None, Some(&["sub", "*.md"]), None);
        let names: Vec<String> = tree(dst.path()).into_keys().collect();
        assert_eq!(names, ["a.txt", "abs-link", "fifo"]);
        assert_eq!(stats.removed, 2, "README.md and sub: {stats:?}");
    }

    #[test]
    fn includes_and_follow_paths() {
        let src = context();
        let s = src.path();
        write(&s.join("real/f"), "f");
        write(&s.join("real/g"), "g");
        symlink("real", s.join("link")).unwrap();
        let dst = tempfile::tempdir().unwrap();
        sync_dirs(s, dst.path(), Some(&["*.txt"]), None, None);
        assert_eq!(tree(dst.path()).into_keys().collect::<Vec<_>>(), ["a.txt"]);
        let dst = tempfile::tempdir().unwrap();
        sync_dirs(s, dst.path(), Some(&["sub/deep"]), None, None);
        assert_eq!(
            tree(dst.path()).into_keys().collect::<Vec<_>>(),
            ["sub", "sub/deep", "sub/deep/c.txt"]
        );
        // Follow paths: the link and what it leads to.
        let dst = tempfile::tempdir().unwrap();
        sync_dirs(s, dst.path(), None, None, Some(&["link/f", "a.txt"]));
        assert_eq!(
            tree(dst.path()).into_keys().collect::<Vec<_>>(),
            ["a.txt", "link", "real", "real/f"]
        );
        // An absolute link is followed inside the source, never on the host.
        symlink("/real", s.join("abs-real")).unwrap();
        symlink("../../../../real/g", s.join("sub/up")).unwrap();
        let dst = tempfile::tempdir().unwrap();
        sync_dirs(s, dst.path(), None, None, Some(&["abs-real/f", "sub/up"]));
        assert_eq!(
            tree(dst.path()).into_keys().collect::<Vec<_>>(),
            ["abs-real", "real", "real/f", "real/g", "sub", "sub/up"]
        );
        // `.` means everything.
        let dst = tempfile::tempdir().unwrap();
        sync_dirs(s, dst.path(), None, None, Some(&["link", "."]));
        assert_eq!(tree(s), tree(dst.path()));
    }

    #[test]
    fn follow_links_is_fsutils() {
        assert_eq!(
            dedupe_paths(vec!["a".into(), "a/b".into(), "ab".into(), "c".into()]),
            ["a", "ab", "c"]
        );
        assert!(dedupe_paths(vec!["a".into(), ".".into()]).is_empty());
        assert!(contains_wildcards("a*") && !contains_wildcards("a\\*"));
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        write(&s.join("dir/x.txt"), "x");
        symlink("dir/x.txt", s.join("l1.txt")).unwrap();
        symlink("loop", s.join("loop")).unwrap();
        let root = open(s);
        let resolved = follow_links(root.as_fd(), &["*.txt".to_owned(), "loop/x".to_owned()])
            .unwrap()
            .unwrap();
        assert_eq!(resolved, ["*.txt", "dir/x.txt", "loop"]);
    }
}
