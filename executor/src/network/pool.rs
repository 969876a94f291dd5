//! Ready sandbox networks, so a step does not wait for one to be set up (BuildKit's
//! network providers pool theirs the same way).
//!
//! One thread of the pool's own creates namespaces and starts their stacks: a stack gets
//! SIGKILL when the thread that started it ends, so that thread must live as long as the
//! pool (a blocking thread of tokio's would end after a while and take the stacks with
//! it). A step takes a namespace with [`Pool::acquire`] and gives it back when its
//! [`Lease`] drops; namespaces a step could have changed (insecure steps hold
//! `CAP_NET_ADMIN` in them) are [discarded](Lease::discard) instead. At most `pool_size`
//! idle namespaces are kept; [`Pool::prewarm`] starts one in the background so the first
//! step of a build finds it ready.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::config::{Attachment, Config, NetworkError, Stack};
use super::namespace::Namespace;

/// Counters for tests and `--debug`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Namespaces created.
    pub created: u64,
    /// Leases served by a namespace an earlier step used.
    pub reused: u64,
    /// Namespaces idle now.
    pub idle: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Ready namespaces, the most recently returned last. `used` marks one a step had.
    idle: Vec<(Namespace, bool)>,
    /// Creations asked for and not started yet.
    wanted: usize,
    /// Creations under way.
    creating: usize,
    /// Callers waiting in `acquire`.
    waiters: usize,
    /// The last creation failed: handed to one waiter.
    failure: Option<String>,
    closed: bool,
    worker_started: bool,
    stats: PoolStats,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// `None` when no stack is installed: every acquire fails with [`NetworkError::NoStack`].
    stack: Option<Stack>,
    pool_size: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pool of ready sandbox networks of one stack. Dropping it stops every idle
/// namespace's stack; namespaces still leased stop when their lease drops.
#[derive(Debug)]
pub struct Pool {
    shared: Arc<Shared>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Pool {
    /// A pool for the stack `config` selects. Nothing is created until a step asks (or
    /// [`Pool::prewarm`]); without an installed stack, only acquiring fails.
    pub fn new(config: &Config) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                stack: config.resolve_stack().ok(),
                pool_size: config.pool_size,
            }),
            worker: Mutex::new(None),
        }
    }

    /// The stack this pool runs, if one is installed.
    pub fn stack(&self) -> Option<Stack> {
        self.shared.stack
    }

    /// Starts creating a namespace in the background unless one is ready or coming.
    pub fn prewarm(&self) {
        let mut state = self.shared.lock();
        if self.shared.stack.is_none()
            || state.closed
            || !state.idle.is_empty()
            || state.wanted + state.creating > 0
        {
            return;
        }
        state.wanted += 1;
        self.start_worker(&mut state);
        self.shared.changed.notify_all();
    }

    /// An idle namespace if one is ready now, without waiting; `None` otherwise (then
    /// [`acquire`](Pool::acquire) makes one, or says why it cannot).
    pub fn try_acquire(&self) -> Option<Lease> {
        let stack = self.shared.stack?;
        let mut state = self.shared.lock();
        if state.closed {
            return None;
        }
        let ns = take_idle(&mut state, stack)?;
        drop(state);
        Some(self.lease(ns))
    }

    /// A ready namespace: an idle one, else one created now. Blocks while it is set up.
    pub fn acquire(&self) -> Result<Lease, NetworkError> {
        let stack = self.shared.stack.ok_or(NetworkError::NoStack)?;
        let mut state = self.shared.lock();
        state.waiters += 1;
        let result = loop {
            if state.closed {
                break Err(NetworkError::Closed);
            }
            if let Some(ns) = take_idle(&mut state, stack) {
                break Ok(ns);
            }
            if let Some(message) = state.failure.take() {
                break Err(NetworkError::Helper { stack, message });
            }
            if state.wanted + state.creating < state.waiters {
                state.wanted += 1;
                self.start_worker(&mut state);
                self.shared.changed.notify_all();
            }
            state = self
                .shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        };
        state.waiters -= 1;
        drop(state);
        result.map(|ns| self.lease(ns))
    }

    fn lease(&self, ns: Namespace) -> Lease {
        Lease {
            attachment: ns.attachment(),
            ns: Some(ns),
            shared: self.shared.clone(),
            reusable: true,
        }
    }

    /// One namespace created on the calling thread, outside any pool, stopped when the
    /// lease drops: for a single step run by a process that must stay single-threaded
    /// (`kiln run`). Its stack dies with the calling thread.
    pub fn standalone(config: &Config) -> Result<Lease, NetworkError> {
        let stack = config.resolve_stack()?;
        let ns = Namespace::create(stack)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                closed: true,
                ..State::default()
            }),
            changed: Condvar::new(),
            stack: Some(stack),
            pool_size: 0,
        });
        Ok(Lease {
            attachment: ns.attachment(),
            ns: Some(ns),
            shared,
            reusable: false,
        })
    }

    /// What the pool did so far.
    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        PoolStats {
            idle: state.idle.len(),
            ..state.stats
        }
    }

    fn start_worker(&self, state: &mut State) {
        if state.worker_started {
            return;
        }
        state.worker_started = true;
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("kiln-network".to_owned())
            .spawn(move || create_loop(&shared));
        match spawned {
            Ok(handle) => {
                *self.worker.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
            }
            Err(e) => {
                state.worker_started = false;
                state.failure = Some(format!("starting the network thread: {e}"));
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle = {
            let mut state = self.shared.lock();
            state.closed = true;
            std::mem::take(&mut state.idle)
        };
        self.shared.changed.notify_all();
        drop(idle);
        if let Some(handle) = self
            .worker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = handle.join();
        }
    }
}

/// The pool's thread: creates namespaces as they are asked for, until the pool closes.
fn create_loop(shared: &Shared) {
    let Some(stack) = shared.stack else {
        return;
    };
    let mut state = shared.lock();
    loop {
        while !state.closed && state.wanted == 0 {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return;
        }
        state.wanted -= 1;
        state.creating += 1;
        drop(state);
        let started = Instant::now();
        let created = Namespace::create(stack);
        state = shared.lock();
        state.creating -= 1;
        match created {
            Ok(ns) if !state.closed => {
                tracing::debug!(
                    %stack,
                    millis = started.elapsed().as_secs_f64() * 1000.0,
                    "sandbox network ready"
                );
                state.stats.created += 1;
                state.idle.push((ns, false));
            }
            Ok(ns) => {
                drop(state);
                drop(ns);
                state = shared.lock();
            }
            Err(e) => state.failure = Some(error_text(&e)),
        }
        shared.changed.notify_all();
    }
}

fn error_text(e: &NetworkError) -> String {
    match e {
        NetworkError::Helper { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A namespace one step uses; given back to the pool (or stopped) when dropped.
#[derive(Debug)]
pub struct Lease {
    ns: Option<Namespace>,
    attachment: Attachment,
    shared: Arc<Shared>,
    reusable: bool,
}

impl Lease {
    /// How the step joins the namespace.
    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// The step could change the namespace (its routes, interfaces, firewall): stop it
    /// after use instead of handing it to another step.
    pub fn discard(&mut self) {
        self.reusable = false;
    }

    /// The stack's process id (tests check it ends with kiln).
    pub fn helper_pid(&self) -> Option<u32> {
        self.ns.as_ref().map(Namespace::helper_pid)
    }
}

/// The last idle namespace whose stack still runs (dead ones are dropped on the way).
fn take_idle(state: &mut State, stack: Stack) -> Option<Namespace> {
    while let Some((mut ns, used)) = state.idle.pop() {
        if !ns.alive() {
            tracing::warn!(%stack, "a pooled network's stack died; starting another");
            continue;
        }
        if used {
            state.stats.reused += 1;
        }
        return Some(ns);
    }
    None
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(mut ns) = self.ns.take() else {
            return;
        };
        if !self.reusable || !ns.alive() {
            return;
        }
        let mut state = self.shared.lock();
        if state.closed || state.idle.len() >= self.shared.pool_size {
            drop(state);
            drop(ns);
            return;
        }
        state.idle.push((ns, true));
        self.shared.changed.notify_all();
    }
}
