//! The worker threads that run engine commands, so the agent's event loop never waits on a pull.
//!
//! The runtime hands [`Job`]s to a fixed pool (it keeps no more jobs in flight than workers, so
//! the channel stays bounded in practice) and reads [`Done`] results back in `poll`. Each command
//! runs with a timeout, its output captured in a per-worker file (a daemonizing helper such as
//! conmon may keep a pipe open long after the CLI exits; a file never blocks).
//!
//! Shutdown (the runtime dropped): pulls in flight are killed, applies and lists still queued are
//! skipped, and removals still queued run to their end, so a removal asked for is never lost.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{NodeName, WorkloadId};
use crate::runspec::RunSpec;

use super::engine::{
    self, ContainerEngine, ObservedContainer, ObservedState, RunContext, container_name, grace_secs, parse_ps,
};

/// Most bytes of a command's stdout or stderr read back.
const MAX_OUTPUT: u64 = 8 * 1024 * 1024;

/// How workers reach the engine.
#[derive(Debug)]
pub(super) struct EngineCli {
    pub engine: ContainerEngine,
    pub binary: PathBuf,
    /// The only environment the CLI gets.
    pub env: Vec<(OsString, OsString)>,
    pub node: NodeName,
    pub state_dir: PathBuf,
    pub command_timeout: Duration,
    pub pull_timeout: Duration,
    pub log_options: Vec<String>,
}

/// A command's result.
#[derive(Debug)]
pub(super) struct Output {
    /// Exit status; `None` when killed by a signal.
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    fn ok(&self) -> bool {
        self.status == Some(0)
    }

    fn message(&self) -> String {
        engine::engine_message(&self.stderr, self.status)
    }
}

/// Why a command gave no [`Output`].
#[derive(Debug)]
pub(super) enum CommandError {
    /// The binary could not be started.
    Spawn(std::io::Error),
    /// It ran past its timeout and was killed.
    TimedOut(Duration),
    /// The runtime is shutting down; the command was killed.
    Cancelled,
    /// Capturing its output failed.
    Capture(std::io::Error),
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Spawn(e) => write!(f, "cannot run the engine binary: {e}"),
            CommandError::TimedOut(t) => write!(f, "the engine command did not finish within {} s", t.as_secs()),
            CommandError::Cancelled => f.write_str("cancelled: the runtime is shutting down"),
            CommandError::Capture(e) => write!(f, "cannot capture the engine's output: {e}"),
        }
    }
}

/// What one worker asks of the engine.
#[derive(Debug)]
pub(super) enum JobKind {
    /// Run `version` of the workload: adopt its running container, or pull the image when
    /// missing, replace every other container of the workload, and run it. `recreate` replaces
    /// even a running container of this version (a restart).
    Apply { version: u64, spec: Arc<RunSpec>, image: String, recreate: bool },
    /// Stop (with the grace period, or the container's own when `None`) and remove every
    /// container of the workload.
    Remove { grace_ms: Option<u32> },
    /// List the node's kole containers.
    List { epoch: u64 },
}

/// A job: for one workload (`None` for a list).
#[derive(Debug)]
pub(super) struct Job {
    pub workload: Option<WorkloadId>,
    pub kind: JobKind,
}

/// What an apply came to.
#[derive(Debug)]
pub(super) enum ApplyOutcome {
    /// A container of this version was already running: adopted.
    Adopted,
    /// The container was started.
    Started,
    /// The image is missing and the pull failed (the engine's message).
    PullFailed(String),
    /// `run` failed (the engine's message).
    RunFailed(String),
    /// The engine did not answer (the reason).
    Unreachable(String),
}

/// A finished job.
#[derive(Debug)]
pub(super) enum Done {
    Apply { id: WorkloadId, version: u64, outcome: ApplyOutcome },
    Remove { id: WorkloadId, grace_ms: Option<u32>, error: Option<String> },
    List { epoch: u64, result: Result<Vec<ObservedContainer>, String> },
}

/// The worker pool.
#[derive(Debug)]
pub(super) struct Pool {
    jobs: Option<Sender<Job>>,
    pub done: Receiver<Done>,
    shutdown: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(cli: EngineCli, workers: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let (jobs, job_rx) = std::sync::mpsc::channel::<Job>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let shutdown = Arc::new(AtomicBool::new(false));
        let cli = Arc::new(cli);
        let mut pool = Self { jobs: Some(jobs), done, shutdown: shutdown.clone(), workers: Vec::new() };
        for n in 0..workers {
            let (cli, job_rx, done_tx, shutdown) = (cli.clone(), job_rx.clone(), done_tx.clone(), shutdown.clone());
            let out_dir = cli.state_dir.join(format!(".engine-output-{n}"));
            let handle = std::thread::Builder::new()
                .name(format!("kole-container-{n}"))
                .spawn(move || worker_loop(&cli, &job_rx, &done_tx, &shutdown, &out_dir))?;
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Hands a job to the workers; `false` if they are gone.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker_loop(
    cli: &EngineCli,
    jobs: &Mutex<Receiver<Job>>,
    done: &Sender<Done>,
    shutdown: &AtomicBool,
    out_dir: &Path,
) {
    let runner = Runner { cli, shutdown, out_dir };
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        if shutdown.load(Ordering::SeqCst) && !matches!(job.kind, JobKind::Remove { .. }) {
            continue;
        }
        // After shutdown nobody reads results; the removal still had to happen.
        let _ = done.send(runner.execute(job));
    }
}

struct Runner<'a> {
    cli: &'a EngineCli,
    shutdown: &'a AtomicBool,
    out_dir: &'a Path,
}

impl Runner<'_> {
    fn execute(&self, job: Job) -> Done {
        match (job.workload, job.kind) {
            (Some(id), JobKind::Apply { version, spec, image, recreate }) => {
                let outcome = self.apply(&id, version, &spec, &image, recreate);
                Done::Apply { id, version, outcome }
            }
            (Some(id), JobKind::Remove { grace_ms }) => {
                let error = self.remove(&id, grace_ms).err();
                Done::Remove { id, grace_ms, error }
            }
            (_, JobKind::List { epoch }) => Done::List { epoch, result: self.list(None) },
            (None, _) => Done::List { epoch: 0, result: Err("internal: a workload job without a workload".into()) },
        }
    }

    fn list(&self, workload: Option<&WorkloadId>) -> Result<Vec<ObservedContainer>, String> {
        let args = engine::ps_args(self.cli.engine, &self.cli.node, workload);
        let out = self.run(&args, self.cli.command_timeout).map_err(|e| e.to_string())?;
        if !out.ok() {
            return Err(out.message());
        }
        let mut containers = parse_ps(&out.stdout).map_err(|e| e.to_string())?;
        // Engines filter by label already; checking again keeps a foreign container out even
        // when an engine ignores a filter.
        containers.retain(|c| {
            c.labels.get(engine::LABEL_MANAGED).is_some_and(|v| v == "true")
                && c.labels.get(engine::LABEL_NODE).is_some_and(|v| v == self.cli.node.as_str())
                && workload.is_none_or(|id| c.labels.get(engine::LABEL_WORKLOAD).is_some_and(|v| v == id.as_str()))
        });
        Ok(containers)
    }

    fn apply(&self, id: &WorkloadId, version: u64, spec: &RunSpec, image: &str, recreate: bool) -> ApplyOutcome {
        let target = container_name(id, version);
        let existing = match self.list(Some(id)) {
            Ok(c) => c,
            Err(e) => return ApplyOutcome::Unreachable(e),
        };
        if self.shutdown.load(Ordering::SeqCst) {
            return ApplyOutcome::Unreachable(CommandError::Cancelled.to_string());
        }
        if !recreate && existing.iter().any(|c| c.name == target && c.state == ObservedState::Running) {
            let others: Vec<&str> = existing.iter().filter(|c| c.name != target).map(|c| c.name.as_str()).collect();
            if let Err(e) = self.stop_and_remove(&others, None) {
                return ApplyOutcome::Unreachable(e);
            }
            return ApplyOutcome::Adopted;
        }
        // Pull before replacing: the old version keeps serving while the new image downloads.
        match self.run(&engine::image_exists_args(self.cli.engine, image), self.cli.command_timeout) {
            Ok(out) if out.ok() => {}
            Ok(_) => match self.run_pull(image) {
                Ok(out) if out.ok() => {}
                Ok(out) => return ApplyOutcome::PullFailed(out.message()),
                Err(e) => return ApplyOutcome::PullFailed(e.to_string()),
            },
            Err(e) => return ApplyOutcome::Unreachable(e.to_string()),
        }
        if self.shutdown.load(Ordering::SeqCst) {
            return ApplyOutcome::Unreachable(CommandError::Cancelled.to_string());
        }
        // One workload never runs twice: every container of it goes before the new one starts.
        let names: Vec<&str> = existing.iter().map(|c| c.name.as_str()).collect();
        if let Err(e) = self.stop_and_remove(&names, None) {
            return ApplyOutcome::Unreachable(e);
        }
        let config_file = match self.write_config(&target, spec) {
            Ok(f) => f,
            Err(e) => return ApplyOutcome::RunFailed(format!("cannot write the workload's config file: {e}")),
        };
        let ctx = RunContext {
            node: &self.cli.node,
            id,
            version,
            image,
            config_file: config_file.as_deref(),
            log_options: &self.cli.log_options,
        };
        match self.run(&engine::run_args(&ctx, spec), self.cli.command_timeout) {
            Ok(out) if out.ok() => ApplyOutcome::Started,
            Ok(out) => {
                // A failed start can leave a created container behind; it must not block a retry.
                let _ = self.run(&["rm".to_owned(), "-f".to_owned(), target], self.cli.command_timeout);
                ApplyOutcome::RunFailed(out.message())
            }
            Err(e) => ApplyOutcome::Unreachable(e.to_string()),
        }
    }

    fn remove(&self, id: &WorkloadId, grace_ms: Option<u32>) -> Result<(), String> {
        let existing = self.list(Some(id))?;
        let names: Vec<&str> = existing.iter().map(|c| c.name.as_str()).collect();
        self.stop_and_remove(&names, grace_ms)?;
        for name in names {
            let _ = std::fs::remove_dir_all(self.cli.state_dir.join(name));
        }
        Ok(())
    }

    /// `stop` (with `-t` when the grace is known; else the engine uses the container's own
    /// `--stop-timeout`), then `rm -f`.
    fn stop_and_remove(&self, names: &[&str], grace_ms: Option<u32>) -> Result<(), String> {
        if names.is_empty() {
            return Ok(());
        }
        let mut stop = vec!["stop".to_owned()];
        let grace = grace_ms.unwrap_or(crate::runspec::MAX_STOP_GRACE_MS);
        if let Some(ms) = grace_ms {
            stop.push("-t".into());
            stop.push(grace_secs(ms).to_string());
        }
        stop.extend(names.iter().map(|n| (*n).to_owned()));
        let timeout = self.cli.command_timeout + Duration::from_millis(u64::from(grace));
        // A stop that fails (already exited, already gone) is fine: `rm -f` settles it.
        self.run(&stop, timeout).map_err(|e| e.to_string())?;
        let mut rm = vec!["rm".to_owned(), "-f".to_owned()];
        rm.extend(names.iter().map(|n| (*n).to_owned()));
        let out = self.run(&rm, self.cli.command_timeout).map_err(|e| e.to_string())?;
        if !out.ok() && !String::from_utf8_lossy(&out.stderr).to_ascii_lowercase().contains("no such container") {
            return Err(out.message());
        }
        Ok(())
    }

    /// Writes the spec's config to `<state_dir>/<container>/config` (readable by the container's
    /// user; the state directory itself is private to the agent).
    fn write_config(&self, container: &str, spec: &RunSpec) -> std::io::Result<Option<PathBuf>> {
        use std::os::unix::fs::PermissionsExt;
        let Some(config) = &spec.config else { return Ok(None) };
        let dir = self.cli.state_dir.join(container);
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("config");
        std::fs::write(&file, config)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        Ok(Some(file))
    }

    /// `pull`, killed at shutdown (it may take minutes).
    fn run_pull(&self, image: &str) -> Result<Output, CommandError> {
        self.run_with(&["pull".to_owned(), image.to_owned()], self.cli.pull_timeout, true)
    }

    fn run(&self, args: &[String], timeout: Duration) -> Result<Output, CommandError> {
        self.run_with(args, timeout, false)
    }

    /// Runs the engine binary with `args`, a cleared environment (plus the pass-through list), no
    /// stdin, and a timeout; `cancellable` commands are killed at shutdown.
    fn run_with(&self, args: &[String], timeout: Duration, cancellable: bool) -> Result<Output, CommandError> {
        std::fs::create_dir_all(self.out_dir).map_err(CommandError::Capture)?;
        let out_path = self.out_dir.join("stdout");
        let err_path = self.out_dir.join("stderr");
        let stdout = std::fs::File::create(&out_path).map_err(CommandError::Capture)?;
        let stderr = std::fs::File::create(&err_path).map_err(CommandError::Capture)?;
        let mut child = Command::new(&self.cli.binary)
            .args(args)
            .env_clear()
            .envs(self.cli.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(CommandError::Spawn)?;
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(CommandError::Capture(e)),
            }
            let cancelled = cancellable && self.shutdown.load(Ordering::SeqCst);
            if cancelled || Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(if cancelled { CommandError::Cancelled } else { CommandError::TimedOut(timeout) });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        };
        let read = |p: &Path| -> Result<Vec<u8>, CommandError> {
            let mut buf = Vec::new();
            std::fs::File::open(p)
                .and_then(|f| f.take(MAX_OUTPUT).read_to_end(&mut buf))
                .map_err(CommandError::Capture)?;
            Ok(buf)
        };
        Ok(Output { status: status.code(), stdout: read(&out_path)?, stderr: read(&err_path)? })
    }
}
