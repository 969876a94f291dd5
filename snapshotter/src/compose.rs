//! Merge and diff: new snapshots made of the layers of existing ones (LLB's MergeOp and
//! DiffOp, which `COPY --link` produces), with BuildKit's semantics.
//!
//! - `merge(A, B, …)` is A with every layer of B's chain, then C's, … applied on top in
//!   order (a layer shared by several inputs is applied again where it recurs, as in
//!   BuildKit). On overlay the result reuses the layers' directories: each applied layer
//!   becomes a record on the growing chain whose contents are the original layer's
//!   directory, so the merge is a longer lowerdir stack and nothing is copied. Overlay
//!   refuses the same directory twice in one stack, so a layer that recurs is copied (its
//!   diff exported and applied), as is every layer on the native backend, whose snapshots
//!   are full trees.
//! - `diff(L, U)` is what U changes relative to L. When L's chain is the start of U's,
//!   that is U's layers above it, reused the same way; otherwise the two trees are
//!   compared and the difference becomes one new layer. The native backend has no form
//!   for a deletion in a lone layer: there, a diff that deletes something is refused.

use std::collections::HashSet;
use std::io::{Seek as _, SeekFrom};
use std::path::Path;

use crate::backend::Backend;
use crate::layer::{self, Compression, ImportOptions};
use crate::mount::View;
use crate::refs::{DIFF_RECORD_TYPE, Error, ImmutableRef, RefOptions, Snapshotter};

type Result<T, E = Error> = std::result::Result<T, E>;

/// `r`'s layers from the bottom of its chain to `r` itself.
fn layers(r: &ImmutableRef) -> Vec<ImmutableRef> {
    let mut chain: Vec<ImmutableRef> = r.parents().cloned().collect();
    chain.reverse();
    chain.push(r.clone());
    chain
}

/// The record whose directory holds a layer's contents: what identifies it in a stack.
fn content_id(r: &ImmutableRef) -> &str {
    r.content().map_or_else(|| r.id(), ImmutableRef::id)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

impl Snapshotter {
    /// The merge of `inputs` in order (see the module docs); `None` when there is nothing
    /// to merge.
    pub fn merge(
        &self,
        inputs: &[ImmutableRef],
        options: &RefOptions,
    ) -> Result<Option<ImmutableRef>> {
        let Some((first, rest)) = inputs.split_first() else {
            return Ok(None);
        };
        let mut top = first.clone();
        let mut stacked: HashSet<String> = layers(&top)
            .iter()
            .map(|l| content_id(l).to_owned())
            .collect();
        for input in rest {
            for layer in layers(input) {
                top = self.apply_layer(Some(&top), &layer, &mut stacked, options)?;
            }
        }
        Ok(Some(top))
    }

    /// What `upper` changes relative to `lower` (see the module docs); scratch (`None`)
    /// on either side is an empty tree. `None` when there is no change to describe.
    pub fn diff(
        &self,
        lower: Option<&ImmutableRef>,
        upper: Option<&ImmutableRef>,
        options: &RefOptions,
    ) -> Result<Option<ImmutableRef>> {
        let lower = match (lower, upper) {
            (None, None) => return Ok(None),
            (None, Some(upper)) => return Ok(Some(upper.clone())),
            (Some(lower), Some(upper)) if lower.id() == upper.id() => return Ok(None),
            (Some(lower), _) => lower,
        };
        if let Some(upper) = upper {
            let below = layers(lower);
            let above = layers(upper);
            let is_ancestor = matches!(self.backend(), Backend::Overlay { .. })
                && below.len() < above.len()
                && below
                    .iter()
                    .zip(&above)
                    .all(|(l, u)| content_id(l) == content_id(u));
            if is_ancestor {
                let mut stacked = HashSet::new();
                let mut top: Option<ImmutableRef> = None;
                for layer in &above[below.len()..] {
                    top = Some(self.apply_layer(top.as_ref(), layer, &mut stacked, options)?);
                }
                return Ok(top);
            }
        }
        self.compare_trees(lower, upper, options).map(Some)
    }

    /// `layer` applied on `parent`: its directory reused when overlay allows, else its
    /// diff copied. `stacked` holds the directories already in the stack below.
    fn apply_layer(
        &self,
        parent: Option<&ImmutableRef>,
        layer: &ImmutableRef,
        stacked: &mut HashSet<String>,
        options: &RefOptions,
    ) -> Result<ImmutableRef> {
        let reusable = matches!(self.backend(), Backend::Overlay { .. })
            && stacked.insert(content_id(layer).to_owned());
        if reusable {
            return self.reuse_layer(parent, layer, options);
        }
        let mut tar = tempfile::tempfile_in(self.root()).map_err(io_err(self.root()))?;
        self.export_layer(layer, &mut tar, Compression::None)?;
        tar.seek(SeekFrom::Start(0)).map_err(io_err(self.root()))?;
        let copied = self.import_layer(
            parent,
            tar,
            &ImportOptions {
                description: options.description.clone(),
                ..ImportOptions::default()
            },
        )?;
        stacked.insert(copied.id().to_owned());
        Ok(copied)
    }

    /// One new layer holding the difference of `upper`'s tree (empty when `None`) against
    /// `lower`'s: changed and added entries, whiteouts for removed ones.
    fn compare_trees(
        &self,
        lower: &ImmutableRef,
        upper: Option<&ImmutableRef>,
        options: &RefOptions,
    ) -> Result<ImmutableRef> {
        let lower_view = View::mount(self.root(), &lower.mountable())?;
        let upper_view = match upper {
            Some(upper) => Some(View::mount(self.root(), &upper.mountable())?),
            None => None,
        };
        let empty = tempfile::Builder::new()
            .prefix("kiln-empty-")
            .tempdir_in(self.root())
            .map_err(io_err(self.root()))?;
        let own = upper_view
            .as_ref()
            .map_or(empty.path(), |v| v.path.as_path());
        let mut tar = tempfile::tempfile_in(self.root()).map_err(io_err(self.root()))?;
        layer::export_compare(own, Some(&lower_view.path), &mut tar, Compression::None)?;
        drop((lower_view, upper_view));
        tar.seek(SeekFrom::Start(0)).map_err(io_err(self.root()))?;
        if matches!(self.backend(), Backend::Native { .. }) {
            // A native snapshot is a plain tree: a deletion has no form there, and dropping
            // it would make a later merge keep what the diff removed.
            if let Some(path) = first_whiteout(&mut tar).map_err(io_err(self.root()))? {
                return Err(Error::NativeDiffDeletion { path });
            }
            tar.seek(SeekFrom::Start(0)).map_err(io_err(self.root()))?;
        }
        self.import_layer(
            None,
            tar,
            &ImportOptions {
                description: options.description.clone(),
                record_type: DIFF_RECORD_TYPE.to_owned(),
                ..ImportOptions::default()
            },
        )
    }
}

/// The path the first deletion (`.wh.` entry) of an uncompressed layer tar removes.
fn first_whiteout(tar: &mut std::fs::File) -> std::io::Result<Option<String>> {
    for entry in tar::Archive::new(tar).entries()? {
        let entry = entry?;
        let path = entry.path()?;
        let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        if let Some(deleted) = name.strip_prefix(".wh.") {
            return Ok(Some(
                path.with_file_name(deleted).to_string_lossy().into_owned(),
            ));
        }
    }
    Ok(None)
}
