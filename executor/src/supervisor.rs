//! The async side of a step: has the launcher fork the step's runner with its config (a
//! single-threaded process: forking a multi-threaded tokio process would not be safe; see
//! [`crate::launcher`]), streams the step's output with an in-memory cap, takes the
//! runner's outcome, and cancels by asking the runner to kill the step's pid namespace,
//! with SIGKILL as the fallback after a grace period.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::launcher::{Launched, Launcher, LauncherError, Outputs, WarmRunner};
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
    #[error(transparent)]
    Launch(#[from] LauncherError),
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

/// Runs steps through runner processes, forked by a launcher started with the first step.
///
/// Each step's runner is started ahead when it can be: once a step's outcome is in, the
/// launcher forks a *warm* runner from that step's config (or from the template of the
/// warm runner it ran on: only the shape matters), which makes its cgroups, takes its
/// seccomp program (loaded once per template by the launcher) and clones its init into
/// its pid, ipc and uts namespaces and cgroups while kiln finishes that step and prepares
/// the next one (on the other CPU);
/// the next step takes it when it has the same [`RunnerConfig::warm_shape`]. One is kept
/// at most; the last clone of an executor lets it go and waits until it is gone.
#[derive(Clone, Debug)]
pub struct Executor {
    runner: RunnerCommand,
    run_root: PathBuf,
    launcher: Arc<Mutex<Option<Arc<Launcher>>>>,
    warm: Arc<WarmSlot>,
}

/// The warm runner an executor keeps (see [`Executor`]).
#[derive(Debug, Default)]
struct WarmSlot {
    slot: Mutex<Option<Warm>>,
    /// Numbers the warm runners' cgroups.
    started: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Warm {
    template: Template,
    /// The launcher that forked it: a warm runner of a launcher that was replaced is gone.
    launcher: Arc<Launcher>,
    runner: WarmRunner,
}

/// The config a warm runner starts from, and that config as JSON. The runner uses only its
/// shape, so the next one starts from the same template after a step of that shape.
#[derive(Debug)]
struct Template {
    config: RunnerConfig,
    bytes: Vec<u8>,
}

/// How long the last executor waits for its warm runner to be gone.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest config a runner is started ahead for (its step must fit one message).
const MAX_WARM_CONFIG: usize = 64 << 10;

impl Drop for WarmSlot {
    fn drop(&mut self) {
        let warm = self
            .slot
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(warm) = warm {
            warm.runner.discard(DISCARD_TIMEOUT);
        }
    }
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
            launcher: Arc::default(),
            warm: Arc::default(),
        })
    }

    /// The private directory of step `id`, for what spec generation writes there (a hosts
    /// file of the step's own), created only then (mode 0711); removed after the run.
    pub fn prepare_bundle(&self, id: &str) -> Result<PathBuf, ExecError> {
        let path = self.run_root.join(id);
        if !valid_id(id) {
            return Err(ExecError::Bundle {
                path,
                source: std::io::Error::other("step ids are ASCII letters and digits"),
            });
        }
        Ok(path)
    }

    /// Has the launcher start a runner for `bundle`; starts the launcher first when there
    /// is none, or a new one when it is gone (killed from outside).
    fn launch(
        &self,
        bundle: &Path,
        config: &[u8],
        outputs: &Outputs,
    ) -> Result<Launched, ExecError> {
        let launcher = self.launcher()?;
        match launcher.launch(bundle, config, outputs) {
            Err(e) if e.launcher_gone() => {
                tracing::warn!("the step launcher is gone ({e}); starting a new one");
                {
                    let mut slot = self.launcher.lock().unwrap_or_else(PoisonError::into_inner);
                    if slot
                        .as_ref()
                        .is_some_and(|current| Arc::ptr_eq(current, &launcher))
                    {
                        *slot = None;
                    }
                }
                Ok(self.launcher()?.launch(bundle, config, outputs)?)
            }
            result => Ok(result?),
        }
    }

    /// Hands the step to the warm runner when `warm` allows and there is one of its shape
    /// (sent without its seccomp profile, which that runner has), else has the launcher
    /// fork a runner for it (sent whole, as `encoded`, made here if it is not yet). With
    /// the warm runner's template when that runner took it.
    fn launch_step(
        &self,
        bundle: &Path,
        config: &mut RunnerConfig,
        warm: bool,
        encoded: &mut Option<Vec<u8>>,
        outputs: &Outputs,
    ) -> Result<(Launched, Option<Template>), ExecError> {
        let taken = self
            .warm
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(ready) = taken {
            let current = self
                .launcher
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &ready.launcher));
            let fits = warm && current && config.warm_shape() == ready.template.config.warm_shape();
            if let (true, Some(bytes)) = (fits, encode_for_warm(config)?) {
                match ready.runner.start(bundle, &bytes, outputs) {
                    Ok(started) => return Ok((started, Some(ready.template))),
                    // Gone (killed from outside): a runner forked for the step takes it,
                    // and its cgroups are ours to remove once it was reaped (it holds
                    // their registry entry until then).
                    Err((e, runner)) => {
                        tracing::debug!("the warm runner did not take the step: {e}");
                        if let Some(runner) = runner {
                            runner.discard(DISCARD_TIMEOUT);
                            crate::cgroup::clean_stale(&cgroup_registry(&self.run_root));
                        }
                    }
                }
            }
            // A runner for another kind of step ends by itself once its go closes here.
        }
        let bytes = match encoded {
            Some(bytes) => bytes,
            None => encoded.insert(encode(config)?),
        };
        Ok((self.launch(bundle, bytes, outputs)?, None))
    }

    /// Starts a warm runner from `template` unless there is one.
    fn warm_ahead(&self, template: Template) {
        let mut slot = self
            .warm
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return;
        }
        let Ok(launcher) = self.launcher() else {
            return;
        };
        let number = self
            .warm
            .started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Its cgroups are named after it, not after the step whose config it starts from.
        let id = format!("w{}x{number}", std::process::id());
        match launcher.warm(&id, &template.bytes) {
            Ok(runner) => {
                *slot = Some(Warm {
                    template,
                    launcher,
                    runner,
                });
            }
            Err(e) => tracing::debug!("no runner started ahead: {e}"),
        }
    }

    fn launcher(&self) -> Result<Arc<Launcher>, ExecError> {
        let mut slot = self.launcher.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(launcher) = slot.as_ref() {
            return Ok(Arc::clone(launcher));
        }
        let launcher = Arc::new(Launcher::start(&self.runner)?);
        *slot = Some(Arc::clone(&launcher));
        Ok(launcher)
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
        // The config as JSON, made when a runner is forked for the step.
        let mut encoded = None;
        let mut ran = self
            .run_once(
                bundle,
                &mut config,
                true,
                &mut encoded,
                output.clone(),
                &cancel,
            )
            .await?;
        if ran.is_none() {
            tracing::debug!("the warm runner ended before it took the step; forking one");
            ran = self
                .run_once(bundle, &mut config, false, &mut encoded, output, &cancel)
                .await?;
        }
        let (result, warm_template) =
            ran.ok_or_else(|| ExecError::NoResult("the runner did not take the step".to_owned()))?;
        // The next step's runner starts now, while kiln finishes this step and prepares
        // the next (started with the step instead, it would compete with the step's setup
        // for the CPUs and the kernel's locks): from the template of the runner that took
        // this step, or from this step's config when it fits one message.
        if !result.exit.cancelled {
            let template = warm_template.or_else(|| {
                encoded
                    .filter(|bytes| bytes.len() <= MAX_WARM_CONFIG)
                    .map(|bytes| Template { config, bytes })
            });
            if let Some(template) = template {
                self.warm_ahead(template);
            }
        }
        Ok(result)
    }

    /// Runs the step once, on the warm runner when `warm` allows and there is one of its
    /// shape. `None` when that warm runner ended before it took the step (the step did not
    /// start: another runner may run it).
    async fn run_once(
        &self,
        bundle: &Path,
        config: &mut RunnerConfig,
        warm: bool,
        encoded: &mut Option<Vec<u8>>,
        output: Option<mpsc::Sender<(Stream, Vec<u8>)>>,
        cancel: &CancellationToken,
    ) -> Result<Option<(StepResult, Option<Template>)>, ExecError> {
        let (stdout_r, stdout_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ExecError::Setup(format!("creating the step's output pipe: {e}")))?;
        let (stderr_r, stderr_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ExecError::Setup(format!("creating the step's output pipe: {e}")))?;
        let outputs = Outputs {
            stdout: stdout_w,
            stderr: stderr_w,
        };
        let (mut launched, warm_template) =
            self.launch_step(bundle, config, warm, encoded, &outputs)?;
        let on_warm = warm_template.is_some();
        // Only the runner holds the write ends now: the pumps end when its step is done.
        drop(outputs);
        let receiver = |fd| {
            tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                .map_err(|e| ExecError::Setup(format!("reading the step's output: {e}")))
        };
        let stdout = tokio::spawn(pump(receiver(stdout_r)?, Stream::Stdout, output.clone()));
        let stderr = tokio::spawn(pump(receiver(stderr_r)?, Stream::Stderr, output));
        let mut cancelled = false;
        // Cancellation asks the runner to kill the step's pid namespace and clean up
        // (SIGTERM); SIGKILL follows after a grace period.
        let mut terminated = false;
        let mut kill_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                more = launched.next() => {
                    if !more.map_err(|e| ExecError::Wait(std::io::Error::other(e)))? {
                        break;
                    }
                }
                () = cancel.cancelled(), if !cancelled => cancelled = true,
                () = sleep_until(kill_at), if kill_at.is_some() => {
                    launched.signal(Signal::SIGKILL);
                    kill_at = None;
                }
            }
            // The pidfd may arrive after the cancellation.
            if cancelled && !terminated && launched.signal(Signal::SIGTERM) {
                terminated = true;
                kill_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
        }
        let status = launched.wait_status();
        let mut result = StepResult::default();
        for (task, buffer) in [(stdout, &mut result.stdout), (stderr, &mut result.stderr)] {
            let (kept, truncated) = task.await.unwrap_or_default();
            *buffer = kept;
            result.truncated |= truncated;
        }
        if on_warm && !cancelled && !launched.taken() && launched.result().is_none() {
            // It was killed (from outside, or with its launcher): its cgroups are ours.
            crate::cgroup::clean_stale(&cgroup_registry(&self.run_root));
            return Ok(None);
        }
        let outcome: Option<serde_json::Value> = launched
            .result()
            .and_then(|bytes| serde_json::from_slice(bytes).ok());
        match outcome {
            Some(value) if value.get("ok").is_some() => {
                result.exit = serde_json::from_value(value["ok"].clone())
                    .map_err(|e| ExecError::NoResult(e.to_string()))?;
                result.exit.cancelled |= cancelled;
                Ok(Some((result, warm_template)))
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
                Ok(Some((result, warm_template)))
            }
            None => {
                // The runner died (killed from outside): its step's cgroups are ours to remove.
                crate::cgroup::clean_stale(&cgroup_registry(&self.run_root));
                Err(ExecError::NoResult(status))
            }
        }
    }
}

/// A runner's config as JSON, whole.
fn encode(config: &RunnerConfig) -> Result<Vec<u8>, ExecError> {
    serde_json::to_vec(config)
        .map_err(|e| ExecError::Setup(format!("encoding the step config: {e}")))
}

/// A step's config as JSON for a warm runner of its shape: without its seccomp profile,
/// the runner's own (compared before), and marked so. `None` when it does not fit one
/// message.
fn encode_for_warm(config: &mut RunnerConfig) -> Result<Option<Vec<u8>>, ExecError> {
    let profile = config
        .spec
        .linux_mut()
        .as_mut()
        .and_then(|linux| linux.seccomp_mut().take());
    config.seccomp_of_warm_runner = true;
    let encoded = encode(config);
    config.seccomp_of_warm_runner = false;
    if let Some(linux) = config.spec.linux_mut() {
        *linux.seccomp_mut() = profile;
    }
    Ok(Some(encoded?).filter(|bytes| bytes.len() <= MAX_WARM_CONFIG))
}

/// Sleeps until `at`, or forever without it.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
    use oci_spec::runtime::{LinuxBuilder, LinuxSeccompAction, LinuxSeccompBuilder};

    #[test]
    fn a_step_goes_to_a_warm_runner_without_its_profile_and_keeps_it() {
        let profile = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActErrno)
            .build()
            .expect("profile");
        let mut spec = oci_spec::runtime::Spec::default();
        spec.set_linux(Some(
            LinuxBuilder::default()
                .seccomp(profile)
                .build()
                .expect("linux"),
        ));
        let mut config = RunnerConfig {
            spec,
            stub_paths: vec!["/etc/hosts".to_owned()],
            stubs_recursive: false,
            real_root: true,
            own_cgroups: false,
            seccomp_cache: None,
            cgroup_registry: None,
            seccomp_of_warm_runner: false,
        };
        let whole = encode(&config).expect("encodes");
        let sent = encode_for_warm(&mut config)
            .expect("encodes")
            .expect("fits a message");
        let decoded: RunnerConfig = serde_json::from_slice(&sent).expect("decodes");
        assert!(decoded.seccomp_of_warm_runner);
        assert!(
            decoded
                .spec
                .linux()
                .as_ref()
                .expect("linux")
                .seccomp()
                .is_none()
        );
        assert_eq!(decoded.stub_paths, config.stub_paths);
        assert!(sent.len() < whole.len());
        // The step's own config is as it was: a runner forked for it gets it whole.
        assert_eq!(encode(&config).expect("encodes"), whole);
    }

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
