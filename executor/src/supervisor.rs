//! The async side of a step: writes the runner's bundle, starts the runner (a fresh,
//! single-threaded process: forking a multi-threaded tokio process would not be safe),
//! streams the step's output with an in-memory cap, and cancels by asking the runner to
//! kill the step's pid namespace, with SIGKILL as the fallback after a grace period.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::process::{ExitInfo, RunnerConfig};

/// Errors from running a step (a failing command is a [`StepResult`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("preparing the step directory {path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the step runner {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the step: {0}")]
    Wait(#[source] std::io::Error),
    #[error("{0}")]
    Setup(String),
    #[error("the step runner ended without a result ({0})")]
    NoResult(String),
}

/// How to start a runner process: `program args… <bundle>`.
#[derive(Clone, Debug)]
pub struct RunnerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl RunnerCommand {
    /// This executable with `arg` (how `kiln` starts `kiln __runner <bundle>`).
    pub fn current_exe(arg: &str) -> std::io::Result<Self> {
        Ok(RunnerCommand {
            program: std::env::current_exe()?,
            args: vec![arg.into()],
        })
    }
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Output kept per stream in memory (BuildKit clips a step's log at 2 MiB too).
pub const OUTPUT_CAP: usize = 2 << 20;

/// The result of a step that ran.
#[derive(Clone, Debug, Default)]
pub struct StepResult {
    pub exit: ExitInfo,
    /// The first [`OUTPUT_CAP`] bytes of each stream.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Whether output was clipped.
    pub truncated: bool,
}

/// One step to run.
#[derive(Clone, Debug)]
pub struct StepRequest {
    /// Unique among running steps; letters and digits only (it names a directory).
    pub id: String,
    pub config: RunnerConfig,
}

/// Runs steps through runner processes.
#[derive(Clone, Debug)]
pub struct Executor {
    runner: RunnerCommand,
    run_root: PathBuf,
}

/// Where the steps of `run_root` keep compiled seccomp programs: a name no step id can
/// take (ids are letters and digits).
pub fn seccomp_cache(run_root: &Path) -> PathBuf {
    run_root.join(".seccomp")
}

/// Where the steps of `run_root` record their cgroups while they run (see
/// [`crate::cgroup::clean_stale`]): a name no step id can take.
pub fn cgroup_registry(run_root: &Path) -> PathBuf {
    run_root.join(".cgroups")
}

/// A step id: ASCII letters and digits only (it names directories and cgroups).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Executor {
    /// `run_root` holds one private directory per running step. The cgroups of steps
    /// whose runner died (a kiln killed with SIGKILL) are removed here.
    pub fn new(runner: RunnerCommand, run_root: &Path) -> Result<Self, ExecError> {
        std::fs::create_dir_all(run_root).map_err(|source| ExecError::Bundle {
            path: run_root.to_owned(),
            source,
        })?;
        crate::cgroup::clean_stale(&cgroup_registry(run_root));
        Ok(Executor {
            runner,
            run_root: run_root.to_owned(),
        })
    }

    /// Creates the private directory of step `id` (mode 0711); spec generation writes the
    /// step's hosts and resolv.conf there.
    pub fn prepare_bundle(&self, id: &str) -> Result<PathBuf, ExecError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let path = self.run_root.join(id);
        if !valid_id(id) {
            return Err(ExecError::Bundle {
                path,
                source: std::io::Error::other("step ids are ASCII letters and digits"),
            });
        }
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(&path)
            .map_err(|source| ExecError::Bundle {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    /// Runs a step whose bundle was prepared; removes the bundle afterwards.
    pub async fn run(
        &self,
        request: &StepRequest,
        output: Option<mpsc::Sender<(Stream, Vec<u8>)>>,
        cancel: CancellationToken,
    ) -> Result<StepResult, ExecError> {
        let bundle = self.run_root.join(&request.id);
        let result = self.run_bundle(&bundle, request, output, cancel).await;
        let _ = std::fs::remove_dir_all(&bundle);
        result
    }

    async fn run_bundle(
        &self,
        bundle: &Path,
        request: &StepRequest,
        output: Option<mpsc::Sender<(Stream, Vec<u8>)>>,
        cancel: CancellationToken,
    ) -> Result<StepResult, ExecError> {
        let mut config = request.config.clone();
        if config.seccomp_cache.is_none() {
            config.seccomp_cache = Some(seccomp_cache(&self.run_root));
        }
        if config.cgroup_registry.is_none() {
            config.cgroup_registry = Some(cgroup_registry(&self.run_root));
        }
        let config = serde_json::to_vec(&config)
            .map_err(|e| ExecError::Setup(format!("encoding the step config: {e}")))?;
        let config_path = bundle.join("config.json");
        std::fs::write(&config_path, config).map_err(|source| ExecError::Bundle {
            path: config_path,
            source,
        })?;
        let mut command = tokio::process::Command::new(&self.runner.program);
        // The runner kills its step and cleans up on SIGTERM; it must get it even when
        // kiln is killed between the fork and the runner's own start.
        crate::sys::spawn_dying_with_parent(
            command.as_std_mut(),
            nix::sys::signal::Signal::SIGTERM,
        );
        let mut child = command
            .args(&self.runner.args)
            .arg(bundle)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ExecError::Spawn {
                program: self.runner.program.clone(),
                source,
            })?;
        let stdout = child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, Stream::Stdout, output.clone())));
        let stderr = child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, Stream::Stderr, output)));
        let mut cancelled = false;
        let status = tokio::select! {
            status = child.wait() => status.map_err(ExecError::Wait)?,
            () = cancel.cancelled() => {
                cancelled = true;
                if let Some(pid) = child.id() {
                    // The runner kills the step's pid namespace and cleans up on SIGTERM.
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                }
                match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                    Ok(status) => status.map_err(ExecError::Wait)?,
                    Err(_) => {
                        let _ = child.kill().await;
                        child.wait().await.map_err(ExecError::Wait)?
                    }
                }
            }
        };
        let mut result = StepResult::default();
        for (task, buffer) in [(stdout, &mut result.stdout), (stderr, &mut result.stderr)] {
            if let Some(task) = task {
                let (kept, truncated) = task.await.unwrap_or_default();
                *buffer = kept;
                result.truncated |= truncated;
            }
        }
        let result_path = bundle.join("result.json");
        let outcome: Option<serde_json::Value> = std::fs::read(&result_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        match outcome {
            Some(value) if value.get("ok").is_some() => {
                result.exit = serde_json::from_value(value["ok"].clone())
                    .map_err(|e| ExecError::NoResult(e.to_string()))?;
                result.exit.cancelled |= cancelled;
                Ok(result)
            }
            Some(value) => Err(ExecError::Setup(
                value["error"]
                    .as_str()
                    .unwrap_or("unknown runner error")
                    .to_owned(),
            )),
            None if cancelled => {
                // The runner was killed before it could clean up after its step.
                crate::cgroup::clean_stale(&cgroup_registry(&self.run_root));
                result.exit = ExitInfo {
                    exit_code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    cancelled: true,
                    ..ExitInfo::default()
                };
                Ok(result)
            }
            None => {
                // The runner died (killed from outside): its step's cgroups are ours to remove.
                crate::cgroup::clean_stale(&cgroup_registry(&self.run_root));
                Err(ExecError::NoResult(status.to_string()))
            }
        }
    }
}

/// Copies a stream to `output` while keeping its first [`OUTPUT_CAP`] bytes.
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    stream: Stream,
    output: Option<mpsc::Sender<(Stream, Vec<u8>)>>,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        let room = OUTPUT_CAP.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..room.min(n)]);
        truncated |= n > room;
        if let Some(tx) = &output {
            // A slow consumer slows the step down rather than losing output.
            let _ = tx.send((stream, chunk.to_vec())).await;
        }
    }
    (kept, truncated)
}

/// BuildKit's wording for a failed process: `exit code: <n>`, followed by the limit the
/// step exceeded, as BuildKit appends a cause (`exit code: 137: step exceeded its memory
/// limit of 512 MiB`).
pub fn exit_error_text(exit: &ExitInfo) -> String {
    match exit.exceeded {
        Some(exceeded) => format!("exit code: {}: {exceeded}", exit.exit_code),
        None => format!("exit code: {}", exit.exit_code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_letters_and_digits() {
        assert!(valid_id("abc123"));
        for bad in [
            "",
            "../../x",
            "a/b",
            ".",
            "a b",
            "é",
            &"a".repeat(65),
            "a\0b",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
