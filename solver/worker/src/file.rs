//! The FileOp: BuildKit's FileOpSolver over snapshots. Action indexes below the number of op
//! inputs name inputs, above it the results of other actions, `-1` scratch. Each action runs
//! the [`kiln_fileop`] backend on a new mutable layer over its base; a result used only as
//! the base of one other action (and not an output) is carried forward as the same layer
//! instead of being committed, so a chain such as `mkdir` + `mkfile` + `copy` makes one
//! snapshot. Outputs are the results of the actions with `output != -1`, by output number.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_proto::{Vertex, pb};
use kiln_snapshotter::{ImmutableRef, MutableRef, RefOptions};

use crate::mounts::StepMounts;
use crate::state::{Inner, blocking, failed};
use kiln_fileop as fileop;
use kiln_solver::cachemap;
use kiln_solver::op::{CacheMapResponse, JobContext, Op, OpError};

pub(crate) struct FileOp {
    inner: Arc<Inner>,
    vertex: Vertex,
    file: pb::FileOp,
}

impl FileOp {
    pub fn new(inner: Arc<Inner>, vertex: Vertex, file: pb::FileOp) -> Self {
        FileOp {
            inner,
            vertex,
            file,
        }
    }
}

/// Checks indexes and outputs as BuildKit's FileOpSolver does; returns the action index of
/// each output, in output order.
fn check(actions: &[pb::FileAction], inputs: usize) -> Result<Vec<usize>, OpError> {
    let limit = i64::try_from(inputs + actions.len()).unwrap_or(i64::MAX);
    let mut outputs: HashMap<i64, usize> = HashMap::new();
    for (i, a) in actions.iter().enumerate() {
        if a.input < -1 || a.input >= limit {
            return Err(failed(format!(
                "invalid input index {}, {limit} provided",
                a.input
            )));
        }
        if a.secondary_input < -1 || a.secondary_input >= limit {
            return Err(failed(format!(
                "invalid secondary input index {}, {inputs} provided",
                a.secondary_input
            )));
        }
        if a.output != -1 && outputs.insert(a.output, i).is_some() {
            return Err(failed(format!("duplicate output {}", a.output)));
        }
    }
    if outputs.is_empty() {
        return Err(failed("no outputs specified"));
    }
    (0..outputs.len())
        .map(|o| {
            let o = i64::try_from(o).unwrap_or(i64::MAX);
            outputs
                .get(&o)
                .copied()
                .ok_or_else(|| failed(format!("missing output index {o}")))
        })
        .collect()
}

/// Where an action index points.
enum Ref {
    Scratch,
    Input(usize),
    Action(usize),
}

fn target(index: i64, inputs: usize) -> Ref {
    match usize::try_from(index) {
        Err(_) => Ref::Scratch,
        Ok(i) if i < inputs => Ref::Input(i),
        Ok(i) => Ref::Action(i - inputs),
    }
}

/// Solving state of one FileOp run (blocking).
struct Solving<'a> {
    inner: &'a Inner,
    actions: &'a [pb::FileAction],
    inputs: &'a [ImmutableRef],
    name: String,
    /// How many times each action's result is used (as an input, secondary input, owner
    /// root or output).
    uses: Vec<usize>,
    committed: HashMap<usize, ImmutableRef>,
    in_progress: Vec<bool>,
}

impl Solving<'_> {
    /// The result of `index` as an immutable ref (`None` = scratch).
    fn immutable(&mut self, index: i64) -> Result<Option<ImmutableRef>, OpError> {
        match target(index, self.inputs.len()) {
            Ref::Scratch => Ok(None),
            Ref::Input(i) => Ok(Some(self.inputs[i].clone())),
            Ref::Action(j) => {
                if let Some(r) = self.committed.get(&j) {
                    return Ok(Some(r.clone()));
                }
                let layer = self.run(j)?;
                let id = layer.id().to_owned();
                let r = layer
                    .commit()
                    .map_err(|e| failed(format!("error committing {id}: {e}")))?;
                self.committed.insert(j, r.clone());
                Ok(Some(r))
            }
        }
    }

    /// Runs action `j` and returns its (uncommitted) layer.
    fn run(&mut self, j: usize) -> Result<MutableRef, OpError> {
        if std::mem::replace(&mut self.in_progress[j], true) {
            return Err(failed(format!("loop from index {}", j + self.inputs.len())));
        }
        let action = &self.actions[j];
        // The base layer: carried forward when nothing else needs the base's result.
        let layer = match target(action.input, self.inputs.len()) {
            Ref::Action(k) if self.uses[k] == 1 && !self.committed.contains_key(&k) => {
                self.run(k)?
            }
            _ => {
                let base = self.immutable(action.input)?;
                self.inner
                    .snapshotter
                    .new_mutable(
                        base.as_ref(),
                        &RefOptions {
                            description: format!("fileop target of {}", self.name),
                            ..RefOptions::default()
                        },
                    )
                    .map_err(failed)?
            }
        };
        let secondary = self.immutable(action.secondary_input)?;
        let user_input = owner_input(action, |c| c.user.as_ref());
        let group_input = owner_input(action, |c| c.group.as_ref());
        let user_root = match user_input {
            Some(i) => self.immutable(i)?,
            None => None,
        };
        let group_root = match group_input {
            Some(i) => self.immutable(i)?,
            None => None,
        };
        let mut mounts =
            StepMounts::new(&self.inner.mounts_dir, &self.inner.next_id()).map_err(failed)?;
        let dest = mounts
            .mount("dest", &layer.mountable(), false)
            .map_err(failed)?;
        let mount_ro = |mounts: &mut StepMounts,
                        name: &str,
                        r: &Option<ImmutableRef>|
         -> Result<Option<PathBuf>, OpError> {
            match r {
                Some(r) => mounts
                    .mount(name, &r.mountable(), true)
                    .map(Some)
                    .map_err(failed),
                None => Ok(None),
            }
        };
        let user_path = mount_ro(&mut mounts, "user", &user_root)?;
        let group_path = mount_ro(&mut mounts, "group", &group_root)?;
        let outcome = match &action.action {
            Some(pb::file_action::Action::Mkdir(a)) => {
                owner(a.owner.as_ref(), &user_path, &group_path)
                    .and_then(|o| fileop::mkdir(&dest, a, o).map_err(failed))
            }
            Some(pb::file_action::Action::Mkfile(a)) => {
                owner(a.owner.as_ref(), &user_path, &group_path)
                    .and_then(|o| fileop::mkfile(&dest, a, o).map_err(failed))
            }
            Some(pb::file_action::Action::Rm(a)) => fileop::rm(&dest, a).map_err(failed),
            Some(pb::file_action::Action::Copy(a)) => {
                let src = match mount_ro(&mut mounts, "src", &secondary)? {
                    Some(path) => path,
                    None => {
                        let empty = mounts.dir().join("empty");
                        std::fs::create_dir(&empty)
                            .map_err(|e| failed(format!("{}: {e}", empty.display())))?;
                        empty
                    }
                };
                let result = owner(a.owner.as_ref(), &user_path, &group_path)
                    .and_then(|o| fileop::copy(&src, &dest, a, o).map_err(failed));
                let _ = std::fs::remove_dir(mounts.dir().join("empty"));
                result
            }
            None => Err(failed(format!("invalid action type at index {j}"))),
        };
        mounts.release();
        match outcome {
            Ok(()) => Ok(layer),
            Err(e) => {
                let _ = layer.release();
                Err(e)
            }
        }
    }
}

fn owner_input(
    action: &pb::FileAction,
    pick: impl Fn(&pb::ChownOpt) -> Option<&pb::UserOpt>,
) -> Option<i64> {
    let chown = match &action.action {
        Some(pb::file_action::Action::Mkdir(a)) => a.owner.as_ref(),
        Some(pb::file_action::Action::Mkfile(a)) => a.owner.as_ref(),
        Some(pb::file_action::Action::Copy(a)) => a.owner.as_ref(),
        _ => None,
    }?;
    match &pick(chown)?.user {
        Some(pb::user_opt::User::ByName(named)) => Some(named.input),
        _ => None,
    }
}

fn owner(
    chown: Option<&pb::ChownOpt>,
    user_root: &Option<PathBuf>,
    group_root: &Option<PathBuf>,
) -> Result<Option<fileop::Owner>, OpError> {
    fileop::resolve_owner(chown, user_root.as_deref(), group_root.as_deref()).map_err(failed)
}

/// Counts how often each action's result is used.
fn uses(actions: &[pb::FileAction], inputs: usize) -> Vec<usize> {
    let mut uses = vec![0; actions.len()];
    let mut count = |index: i64| {
        if let Ref::Action(j) = target(index, inputs) {
            if let Some(u) = uses.get_mut(j) {
                *u += 1;
            }
        }
    };
    for a in actions {
        count(a.input);
        count(a.secondary_input);
        if let Some(i) = owner_input(a, |c| c.user.as_ref()) {
            count(i);
        }
        if let Some(i) = owner_input(a, |c| c.group.as_ref()) {
            count(i);
        }
    }
    for (j, a) in actions.iter().enumerate() {
        if a.output != -1 {
            uses[j] += 1;
        }
    }
    uses
}

/// Runs every action an output needs; returns the outputs in order.
fn solve(
    inner: &Inner,
    name: &str,
    actions: &[pb::FileAction],
    inputs: &[ImmutableRef],
) -> Result<Vec<ImmutableRef>, OpError> {
    let outputs = check(actions, inputs.len())?;
    let mut solving = Solving {
        inner,
        actions,
        inputs,
        name: name.to_owned(),
        uses: uses(actions, inputs.len()),
        committed: HashMap::new(),
        in_progress: vec![false; actions.len()],
    };
    let base = inputs.len();
    outputs
        .into_iter()
        .map(|j| {
            let index = i64::try_from(base + j).unwrap_or(i64::MAX);
            solving
                .immutable(index)?
                .ok_or_else(|| failed("internal error: an action produced scratch"))
        })
        .collect()
}

#[async_trait]
impl Op<ImmutableRef> for FileOp {
    async fn cache_map(
        &self,
        _ctx: &JobContext,
        _index: usize,
    ) -> Result<CacheMapResponse, OpError> {
        let map =
            cachemap::file::cache_map(&self.vertex.digest, &self.file, self.vertex.op.inputs.len())
                .map_err(failed)?;
        Ok(CacheMapResponse { map, done: true })
    }

    async fn exec(
        &self,
        _ctx: &JobContext,
        inputs: Vec<ImmutableRef>,
    ) -> Result<Vec<ImmutableRef>, OpError> {
        let inner = self.inner.clone();
        let name = self.vertex.name.clone();
        let actions = self.file.actions.clone();
        blocking(move || solve(&inner, &name, &actions, &inputs)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(input: i64, secondary: i64, output: i64) -> pb::FileAction {
        pb::FileAction {
            input,
            secondary_input: secondary,
            output,
            action: Some(pb::file_action::Action::Mkdir(
                pb::FileActionMkDir::default(),
            )),
        }
    }

    #[test]
    fn index_and_output_checks_use_buildkits_words() {
        assert_eq!(check(&[action(0, -1, 0)], 1).unwrap(), vec![0]);
        assert_eq!(
            check(&[action(0, -1, -1)], 1).unwrap_err().to_string(),
            "no outputs specified"
        );
        assert_eq!(
            check(&[action(0, -1, 0), action(1, -1, 0)], 1)
                .unwrap_err()
                .to_string(),
            "duplicate output 0"
        );
        assert_eq!(
            check(&[action(0, -1, 1)], 1).unwrap_err().to_string(),
            "missing output index 0"
        );
        assert_eq!(
            check(&[action(5, -1, 0)], 1).unwrap_err().to_string(),
            "invalid input index 5, 2 provided"
        );
    }

    #[test]
    fn chained_results_used_once_are_not_outputs() {
        // mkdir on input 0, then mkfile on its result, which is the only output.
        let actions = [action(0, -1, -1), action(1, -1, 0)];
        assert_eq!(uses(&actions, 1), vec![1, 1]);
        // A result that is also a copy source is used twice and must be committed.
        let actions = [action(0, -1, -1), action(1, 1, 0)];
        assert_eq!(uses(&actions, 1), vec![2, 1]);
    }
}
