//! A [`WorkloadRuntime`] that runs each workload as a container of the engine the node already
//! has (podman, docker or nerdctl), driven through its CLI.
//!
//! See [`ContainerRuntime`] for the lifecycle and `docs/runtime.md` for what a user
//! sees on the node.

mod engine;
mod worker;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};
use crate::protocol::{DecodeLimits, NodeHealth};
use crate::rng::SplitMix64;
use crate::runspec::{RestartPolicy, RunSpec};

use super::runtime::WorkloadRuntime;

pub use engine::{
    CONFIG_MOUNT_PATH, ContainerEngine, LABEL_MANAGED, LABEL_NODE, LABEL_VERSION, LABEL_WORKLOAD, UnknownEngine,
    container_name,
};
use engine::{ObservedContainer, ObservedState};
use worker::{ApplyOutcome, Done, EngineCli, Job, JobKind, Pool};

/// Environment variables the engine CLI is started with (when the agent has them), and no
/// others: what podman, docker and nerdctl need to find their daemon, configuration and
/// registries. The agent's own settings and credentials never reach the CLI, so they cannot reach
/// a container either.
pub const DEFAULT_PASSTHROUGH_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "CONTAINERS_CONF",
    "CONTAINERS_STORAGE_CONF",
    "CONTAINERS_REGISTRIES_CONF",
    "CONTAINER_HOST",
    "CONTAINER_CONNECTION",
    "REGISTRY_AUTH_FILE",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "CONTAINERD_ADDRESS",
    "CONTAINERD_NAMESPACE",
    "NERDCTL_TOML",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// Settings of a [`ContainerRuntime`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ContainerRuntimeConfig {
    /// The engine.
    pub engine: ContainerEngine,
    /// Its binary.
    pub binary: PathBuf,
    /// The node: labels (`dev.kole.node`), `KOLE_NODE`, and which containers this runtime owns.
    pub node: NodeName,
    /// A directory private to the agent, for workload config files (mounted read-only into
    /// containers) and the engine's captured output. Created when missing.
    pub state_dir: PathBuf,
    /// Backoff between pull attempts (and between attempts while the engine does not answer).
    /// Default 5 s doubling to 5 min.
    pub pull_backoff: Backoff,
    /// Attempts before a workload whose image does not pull is `Failed`
    /// ([`WorkloadRuntime::restart`] tries again). Default 5.
    pub pull_attempts: u32,
    /// Longest one pull may take before it is killed. Default 15 min.
    pub pull_timeout: Duration,
    /// Longest any other engine command may take (a stop gets the grace period on top). Default
    /// 60 s.
    pub command_timeout: Duration,
    /// How often [`WorkloadRuntime::poll`] lists the node's containers, in milliseconds (polls in
    /// between report what the last list said). Default 2 000.
    pub status_interval_ms: u64,
    /// `--log-opt` values for every container. Default `["max-size=10m"]`, which bounds the
    /// default log drivers of podman (`k8s-file`) and docker and nerdctl (`json-file`); empty it
    /// when the engine's log driver takes no such option (e.g. `journald`).
    pub log_options: Vec<String>,
    /// Environment variables the engine CLI gets from the agent's environment (see
    /// [`DEFAULT_PASSTHROUGH_ENV`], the default).
    pub passthrough_env: Vec<String>,
    /// Worker threads running engine commands (a slow pull holds one). Default 2.
    pub workers: usize,
    /// Seed of the pull-retry jitter. Default 0.
    pub seed: u64,
}

impl ContainerRuntimeConfig {
    /// Settings for `engine` at `binary`, on `node`, keeping files in `state_dir`; every other
    /// field at its default.
    pub fn new(
        node: NodeName,
        engine: ContainerEngine,
        binary: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            engine,
            binary: binary.into(),
            node,
            state_dir: state_dir.into(),
            pull_backoff: Backoff::new(5_000, 300_000, 2.0),
            pull_attempts: 5,
            pull_timeout: Duration::from_secs(15 * 60),
            command_timeout: Duration::from_secs(60),
            status_interval_ms: 2_000,
            log_options: vec!["max-size=10m".to_owned()],
            passthrough_env: DEFAULT_PASSTHROUGH_ENV.iter().map(|s| (*s).to_owned()).collect(),
            workers: 2,
            seed: 0,
        }
    }

    /// Settings for `engine`, its binary looked up in `PATH`.
    pub fn for_engine(
        node: NodeName,
        engine: ContainerEngine,
        state_dir: impl Into<PathBuf>,
    ) -> Result<Self, ContainerError> {
        let binary = engine.find_binary().ok_or(ContainerError::EngineNotFound(engine))?;
        Ok(Self::new(node, engine, binary, state_dir))
    }

    /// Settings for the first engine found in `PATH` (podman, docker, nerdctl).
    pub fn detect(node: NodeName, state_dir: impl Into<PathBuf>) -> Result<Self, ContainerError> {
        let (engine, binary) = ContainerEngine::detect().ok_or(ContainerError::NoEngine)?;
        Ok(Self::new(node, engine, binary, state_dir))
    }
}

/// Why a [`ContainerRuntime`] cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// No engine binary in `PATH`.
    #[error("no container engine found in PATH (looked for podman, docker, nerdctl): install one, or name its binary")]
    NoEngine,
    /// The named engine's binary is not in `PATH`.
    #[error("{0} not found in PATH: install it, or name its binary")]
    EngineNotFound(ContainerEngine),
    /// The state directory cannot be created.
    #[error("cannot create the container runtime's state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The worker threads cannot be started.
    #[error("cannot start the container runtime's worker threads: {0}")]
    Spawn(#[source] std::io::Error),
}

#[derive(Debug)]
struct Slot {
    workload: Arc<Workload>,
    /// `None` when the spec is unusable (the slot is `Failed` for good).
    spec: Option<Arc<RunSpec>>,
    phase: WorkloadPhase,
    reported: WorkloadPhase,
    reason: Option<String>,
    /// Failed attempts (pull, or the engine not answering) since the last success.
    failed_attempts: u32,
    retry_at: Option<u64>,
    /// The container of this version was started or adopted: engine lists now tell its phase.
    started: bool,
    /// List results from lists dispatched at or before this epoch predate the start.
    settled_epoch: u64,
}

/// Per-workload job order: one job at a time, later ones wait.
#[derive(Debug, Default)]
struct Lane {
    busy: bool,
    waiting: VecDeque<JobKind>,
}

/// Runs each workload as a container of podman, docker or nerdctl, through the engine's CLI. One
/// per node: the `node` argument of the trait's methods is ignored (the configured node is used).
///
/// # Spec
///
/// A workload's spec is a [`RunSpec`] with an `image`; anything else is `Failed` with the reason.
/// It maps onto `run -d` as follows (see [`container_name`] and the `LABEL_*` constants):
///
/// - name `kole-<id>-v<version>`; labels `dev.kole.managed=true`, `dev.kole.node`,
///   `dev.kole.workload`, `dev.kole.version`;
/// - `restart`: `always` → `--restart=always`, `on-failure` → `--restart=on-failure:<max_restarts>`
///   (`no` when `max_restarts` is 0), `never` → `--restart=no`;
/// - `stop_grace_ms` → `--stop-timeout` (whole seconds, rounded up), and `stop -t` on removal;
/// - `env` → `-e NAME=value`, plus `KOLE_NODE`, `KOLE_WORKLOAD`, `KOLE_WORKLOAD_VERSION`; nothing
///   from the agent's environment;
/// - `config` → a file under [`ContainerRuntimeConfig::state_dir`] mounted read-only at
///   [`CONFIG_MOUNT_PATH`], named by `KOLE_CONFIG_FILE`;
/// - `working_dir` → `-w`; `command[0]` → `--entrypoint`, the rest of `command` and `args` after
///   the image; `--pull=never` and the configured `--log-opt`s.
///
/// # Lifecycle
///
/// Engine commands run on worker threads; calls never wait for them. [`WorkloadRuntime::apply`]
/// returns `Pending` (or `Running` when a list already showed this version running) and a worker
/// adopts a running container of this version, or pulls the image when it is missing (retried
/// with [`ContainerRuntimeConfig::pull_backoff`], `Failed` with "image pull failed: <engine's
/// message>" after [`ContainerRuntimeConfig::pull_attempts`]), then stops and removes every other
/// container of the workload (the old version serves until the new image is present) and runs
/// the new one. [`WorkloadRuntime::poll`] reports outcomes and, every
/// [`ContainerRuntimeConfig::status_interval_ms`], lists the node's containers: running →
/// `Running`; exited 0 → `Stopped`; exited non-zero → `Failed` ("container exited with code N");
/// engine-counted restarts over `max_restarts` → `Failed`; gone → `Failed`. Removal stops with
/// the grace period and removes every container of the workload (a removal that fails is
/// retried with the pull backoff until it succeeds or the workload is applied again). A new runtime (a restarted
/// agent) lists the node's containers at once, so re-applied workloads are adopted, not
/// restarted. When the engine does not answer, [`WorkloadRuntime::health`] is
/// [`NodeHealth::DEGRADED`]. Dropping the runtime leaves containers running (the agent's restart
/// adopts them), kills pulls in flight, abandons queued applies, and waits for the removals
/// already asked for.
///
/// ```no_run
/// use kole_core::agent::{ContainerRuntime, ContainerRuntimeConfig, WorkloadRuntime};
/// use kole_core::model::{NodeName, Timestamp};
///
/// let node = NodeName::new("edge-7")?;
/// // The first of podman, docker, nerdctl in PATH.
/// let config = ContainerRuntimeConfig::detect(node.clone(), "/var/lib/kole/containers")?;
/// let mut runtime = ContainerRuntime::new(config)?;
/// // The agent drives it: apply, remove, restart, and poll from its event loop.
/// let mut changes = Vec::new();
/// runtime.poll(&node, Timestamp::from_secs(1), &mut changes);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ContainerRuntime {
    config: ContainerRuntimeConfig,
    pool: Pool,
    slots: BTreeMap<WorkloadId, Slot>,
    lanes: HashMap<WorkloadId, Lane>,
    ready: VecDeque<Job>,
    in_flight: usize,
    list_epoch: u64,
    list_in_flight: bool,
    next_list_at: u64,
    /// The node's kole containers, by workload, from the last list.
    observed: HashMap<WorkloadId, Vec<ObservedContainer>>,
    /// Why the engine did not answer the last list or job; `None` when it did.
    unreachable: Option<String>,
    /// Removals that failed, retried with the pull backoff: grace, when, failures so far.
    removal_retries: BTreeMap<WorkloadId, (Option<u32>, u64, u32)>,
    rng: SplitMix64,
}

impl ContainerRuntime {
    /// Starts the worker threads and lists the node's containers (for adoption).
    pub fn new(config: ContainerRuntimeConfig) -> Result<Self, ContainerError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| ContainerError::StateDir { path: dir.clone(), source })?;
        let env: Vec<(OsString, OsString)> = config
            .passthrough_env
            .iter()
            .filter_map(|name| std::env::var_os(name).map(|v| (OsString::from(name), v)))
            .collect();
        let cli = EngineCli {
            engine: config.engine,
            binary: config.binary.clone(),
            env,
            node: config.node.clone(),
            state_dir: config.state_dir.clone(),
            command_timeout: config.command_timeout,
            pull_timeout: config.pull_timeout,
            log_options: config.log_options.clone(),
        };
        let pool = Pool::start(cli, config.workers).map_err(ContainerError::Spawn)?;
        let rng = SplitMix64::new(config.seed);
        let mut rt = Self {
            config,
            pool,
            slots: BTreeMap::new(),
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            in_flight: 0,
            list_epoch: 0,
            list_in_flight: false,
            next_list_at: 0,
            observed: HashMap::new(),
            unreachable: None,
            removal_retries: BTreeMap::new(),
            rng,
        };
        rt.submit_list();
        rt.dispatch();
        Ok(rt)
    }

    /// The settings.
    pub fn config(&self) -> &ContainerRuntimeConfig {
        &self.config
    }

    /// The phase of workload `id` as last computed (before [`WorkloadRuntime::poll`] reports it).
    pub fn phase(&self, id: &WorkloadId) -> Option<WorkloadPhase> {
        self.slots.get(id).map(|s| s.phase)
    }

    /// Whether no engine command is running or waiting (everything asked so far is done).
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.ready.is_empty() && self.lanes.values().all(|l| !l.busy && l.waiting.is_empty())
    }

    /// Workloads whose containers the last list showed on this node (adopted or not).
    pub fn observed_workloads(&self) -> Vec<WorkloadId> {
        let mut ids: Vec<WorkloadId> = self.observed.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn submit_list(&mut self) {
        self.list_epoch += 1;
        self.list_in_flight = true;
        self.ready.push_back(Job { workload: None, kind: JobKind::List { epoch: self.list_epoch } });
    }

    /// Queues a job for workload `id`, after the job it has in flight. An apply or a removal
    /// supersedes whatever was waiting.
    fn submit(&mut self, id: &WorkloadId, kind: JobKind) {
        let lane = self.lanes.entry(id.clone()).or_default();
        lane.waiting.clear();
        if lane.busy {
            lane.waiting.push_back(kind);
        } else {
            lane.busy = true;
            self.ready.push_back(Job { workload: Some(id.clone()), kind });
        }
    }

    fn dispatch(&mut self) {
        while self.in_flight < self.config.workers.max(1) {
            let Some(job) = self.ready.pop_front() else { break };
            if self.pool.submit(job) {
                self.in_flight += 1;
            } else {
                // The workers are gone (they only stop when the runtime is dropped).
                self.unreachable = Some("the container runtime's worker threads stopped".into());
                break;
            }
        }
    }

    fn lane_done(&mut self, id: &WorkloadId) {
        if let Some(lane) = self.lanes.get_mut(id) {
            lane.busy = false;
            if let Some(kind) = lane.waiting.pop_front() {
                lane.busy = true;
                self.ready.push_back(Job { workload: Some(id.clone()), kind });
            } else {
                self.lanes.remove(id);
            }
        }
    }

    fn lane_busy(&self, id: &WorkloadId) -> bool {
        self.lanes.get(id).is_some_and(|l| l.busy)
    }

    fn apply_job(&mut self, id: &WorkloadId, recreate: bool) {
        let Some(slot) = self.slots.get(id) else { return };
        let Some(spec) = slot.spec.clone() else { return };
        let image = spec.image.clone().unwrap_or_default();
        let version = slot.workload.version;
        self.submit(id, JobKind::Apply { version, spec, image, recreate });
    }

    fn handle_done(&mut self, done: Done, now: u64) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match done {
            Done::List { epoch, result } => {
                self.list_in_flight = false;
                match result {
                    Ok(containers) => {
                        self.unreachable = None;
                        self.observed.clear();
                        for c in containers {
                            if let Some(id) = c.workload() {
                                self.observed.entry(id).or_default().push(c);
                            }
                        }
                        self.refresh_from_list(epoch);
                    }
                    Err(e) => self.unreachable = Some(e),
                }
            }
            Done::Remove { id, grace_ms, error } => {
                self.lane_done(&id);
                match error {
                    // A removal is never dropped: a workload applied again replaces its
                    // containers anyway; otherwise try again later.
                    Some(e) if !self.slots.contains_key(&id) => {
                        self.unreachable = Some(e);
                        let failures = self.removal_retries.get(&id).map_or(0, |r| r.2) + 1;
                        let at = now + self.config.pull_backoff.delay_ms(failures - 1, &mut self.rng);
                        self.removal_retries.insert(id, (grace_ms, at, failures));
                    }
                    Some(e) => self.unreachable = Some(e),
                    None => {
                        self.unreachable = None;
                        self.removal_retries.remove(&id);
                    }
                }
            }
            Done::Apply { id, version, outcome } => {
                self.lane_done(&id);
                let epoch = self.list_epoch;
                let backoff = self.config.pull_backoff.clone();
                let attempts = self.config.pull_attempts.max(1);
                let Some(slot) = self.slots.get_mut(&id) else { return };
                if slot.workload.version != version {
                    return;
                }
                match outcome {
                    ApplyOutcome::Adopted | ApplyOutcome::Started => {
                        self.unreachable = None;
                        slot.phase = WorkloadPhase::Running;
                        slot.reason = None;
                        slot.failed_attempts = 0;
                        slot.started = true;
                        slot.settled_epoch = epoch;
                    }
                    ApplyOutcome::RunFailed(msg) => {
                        slot.phase = WorkloadPhase::Failed;
                        slot.reason = Some(format!("container start failed: {msg}"));
                        slot.started = false;
                    }
                    ApplyOutcome::PullFailed(msg) => {
                        let reason = format!("image pull failed: {msg}");
                        Self::attempt_failed(slot, reason, &backoff, attempts, now, &mut self.rng);
                    }
                    ApplyOutcome::Unreachable(msg) => {
                        self.unreachable = Some(msg.clone());
                        let reason = format!("container engine did not answer: {msg}");
                        Self::attempt_failed(slot, reason, &backoff, attempts, now, &mut self.rng);
                    }
                }
            }
        }
    }

    fn attempt_failed(
        slot: &mut Slot,
        reason: String,
        backoff: &Backoff,
        attempts: u32,
        now: u64,
        rng: &mut SplitMix64,
    ) {
        slot.failed_attempts += 1;
        slot.reason = Some(reason);
        slot.started = false;
        if slot.failed_attempts >= attempts {
            slot.phase = WorkloadPhase::Failed;
            slot.retry_at = None;
        } else {
            slot.phase = WorkloadPhase::Pending;
            slot.retry_at = Some(now + backoff.delay_ms(slot.failed_attempts - 1, rng));
        }
    }

    /// Reads the phases of started workloads from the last list.
    fn refresh_from_list(&mut self, epoch: u64) {
        let busy: Vec<WorkloadId> = self.lanes.iter().filter(|(_, l)| l.busy).map(|(id, _)| id.clone()).collect();
        for (id, slot) in &mut self.slots {
            if !slot.started || epoch <= slot.settled_epoch || busy.contains(id) {
                continue;
            }
            let Some(spec) = &slot.spec else { continue };
            let name = container_name(id, slot.workload.version);
            let found = self.observed.get(id).and_then(|cs| cs.iter().find(|c| c.name == name));
            let (phase, reason) = match found {
                Some(c) => phase_of(c, spec),
                None => (
                    WorkloadPhase::Failed,
                    Some(format!(
                        "container {name} is gone (removed outside kole?); restart the workload to run it again"
                    )),
                ),
            };
            slot.phase = phase;
            slot.reason = reason;
        }
    }
}

/// A container's phase and failure reason, from what the engine lists.
fn phase_of(c: &ObservedContainer, spec: &RunSpec) -> (WorkloadPhase, Option<String>) {
    match &c.state {
        ObservedState::Running => match c.restarts {
            Some(n) if spec.restart != RestartPolicy::Never && n > u64::from(spec.max_restarts) => (
                WorkloadPhase::Failed,
                Some(format!("container restarted {n} times, more than maxRestarts {}", spec.max_restarts)),
            ),
            _ => (WorkloadPhase::Running, None),
        },
        ObservedState::Starting | ObservedState::Paused => (WorkloadPhase::Pending, None),
        ObservedState::Exited => match c.exit_code {
            Some(0) => (WorkloadPhase::Stopped, None),
            Some(code) if code > 128 && code < 160 => (
                WorkloadPhase::Failed,
                Some(format!("container exited with code {code} (killed by signal {})", code - 128)),
            ),
            Some(code) => (WorkloadPhase::Failed, Some(format!("container exited with code {code}"))),
            None => (WorkloadPhase::Failed, Some("container exited (the engine gives no exit code)".into())),
        },
        ObservedState::Other(state) => {
            (WorkloadPhase::Failed, Some(format!("container is in state {state:?}, which kole does not know")))
        }
    }
}

impl Drop for ContainerRuntime {
    /// Hands every removal not yet started to the workers, which finish them before the pool's
    /// drop returns (applies, lists and pulls are abandoned; containers keep running).
    fn drop(&mut self) {
        let mut removals: Vec<Job> =
            self.ready.drain(..).filter(|j| matches!(j.kind, JobKind::Remove { .. })).collect();
        for (id, lane) in &mut self.lanes {
            removals.extend(
                lane.waiting
                    .drain(..)
                    .filter(|k| matches!(k, JobKind::Remove { .. }))
                    .map(|kind| Job { workload: Some(id.clone()), kind }),
            );
        }
        // Failed removals get one last try.
        removals.extend(
            std::mem::take(&mut self.removal_retries)
                .into_iter()
                .map(|(id, (grace_ms, _, _))| Job { workload: Some(id), kind: JobKind::Remove { grace_ms } }),
        );
        for job in removals {
            self.pool.submit(job);
        }
    }
}

impl WorkloadRuntime for ContainerRuntime {
    fn apply(&mut self, _node: &NodeName, workload: &Arc<Workload>, _now: Timestamp) -> WorkloadPhase {
        let id = workload.id.clone();
        self.removal_retries.remove(&id);
        if let Some(slot) = self.slots.get(&id)
            && slot.workload.version == workload.version
            && slot.workload.spec == workload.spec
            && slot.phase != WorkloadPhase::Failed
        {
            return slot.phase;
        }
        let spec = match RunSpec::decode(&workload.spec, &DecodeLimits::default()) {
            Ok(spec) if spec.image.is_some() => Ok(spec),
            Ok(_) => Err("the container runtime needs an image, and this spec has none (a process workload: \
                          run it on an agent with the process runtime)"
                .to_owned()),
            Err(e) => Err(e.to_string()),
        };
        let mut slot = Slot {
            workload: workload.clone(),
            spec: None,
            phase: WorkloadPhase::Pending,
            reported: WorkloadPhase::Pending,
            reason: None,
            failed_attempts: 0,
            retry_at: None,
            started: false,
            settled_epoch: self.list_epoch,
        };
        match spec {
            Ok(spec) => {
                let name = container_name(&id, workload.version);
                let running = self
                    .observed
                    .get(&id)
                    .is_some_and(|cs| cs.iter().any(|c| c.name == name && c.state == ObservedState::Running));
                if running {
                    slot.phase = WorkloadPhase::Running;
                }
                slot.spec = Some(Arc::new(spec));
                slot.reported = slot.phase;
                self.slots.insert(id.clone(), slot);
                self.apply_job(&id, false);
            }
            Err(reason) => {
                slot.phase = WorkloadPhase::Failed;
                slot.reported = WorkloadPhase::Failed;
                slot.reason = Some(reason);
                self.slots.insert(id.clone(), slot);
                // Whatever version ran before is replaced, here by nothing.
                self.submit(&id, JobKind::Remove { grace_ms: None });
            }
        }
        self.dispatch();
        self.slots.get(&id).map_or(WorkloadPhase::Failed, |s| s.phase)
    }

    fn remove(&mut self, _node: &NodeName, id: &WorkloadId, _now: Timestamp) {
        let grace_ms = self.slots.remove(id).and_then(|s| s.spec.map(|spec| spec.stop_grace_ms));
        self.submit(id, JobKind::Remove { grace_ms });
        self.dispatch();
    }

    fn restart(&mut self, _node: &NodeName, id: &WorkloadId, _now: Timestamp) -> Option<WorkloadPhase> {
        let slot = self.slots.get_mut(id)?;
        slot.spec.as_ref()?;
        slot.phase = WorkloadPhase::Pending;
        slot.reported = WorkloadPhase::Pending;
        slot.reason = None;
        slot.failed_attempts = 0;
        slot.retry_at = None;
        slot.started = false;
        self.apply_job(id, true);
        self.dispatch();
        Some(WorkloadPhase::Pending)
    }

    fn poll(&mut self, _node: &NodeName, now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>) {
        let now = now.as_millis();
        while let Ok(done) = self.pool.done.try_recv() {
            self.handle_done(done, now);
        }
        let due: Vec<WorkloadId> = self
            .slots
            .iter()
            .filter(|(id, s)| s.retry_at.is_some_and(|t| t <= now) && !self.lane_busy(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(slot) = self.slots.get_mut(&id) {
                slot.retry_at = None;
            }
            self.apply_job(&id, false);
        }
        let due: Vec<(WorkloadId, Option<u32>)> = self
            .removal_retries
            .iter()
            .filter(|(id, r)| r.1 <= now && !self.lane_busy(id) && !self.slots.contains_key(*id))
            .map(|(id, r)| (id.clone(), r.0))
            .collect();
        for (id, grace_ms) in due {
            if let Some(r) = self.removal_retries.get_mut(&id) {
                r.1 = u64::MAX;
            }
            self.submit(&id, JobKind::Remove { grace_ms });
        }
        if !self.list_in_flight && now >= self.next_list_at {
            self.next_list_at = now + self.config.status_interval_ms;
            self.submit_list();
        }
        self.dispatch();
        for (id, slot) in &mut self.slots {
            if slot.phase != slot.reported {
                slot.reported = slot.phase;
                changes.push((id.clone(), slot.phase));
            }
        }
    }

    fn failure_reason(&self, _node: &NodeName, id: &WorkloadId) -> Option<String> {
        self.slots.get(id).filter(|s| s.phase == WorkloadPhase::Failed).and_then(|s| s.reason.clone())
    }

    fn health(&self, _node: &NodeName) -> NodeHealth {
        if self.unreachable.is_some() { NodeHealth::DEGRADED } else { NodeHealth::OK }
    }
}
