//! A [`WorkloadRuntime`] that runs each workload as a local process group.
//!
//! (See [`ProcessRuntime`] for what it does with a spec, and `docs/runtime.md`.)

mod group;
mod log;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::process::Signal;

use self::group::{PidRecord, StopJob, proc_stat, signal_group};
use self::log::{RotatingLog, SharedLog, spawn_reader};
use super::runtime::WorkloadRuntime;
use crate::backoff::Backoff;
use crate::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase, mix64, truncate_for_error};
use crate::protocol::DecodeLimits;
use crate::rng::SplitMix64;
use crate::runspec::{RestartPolicy, RunSpec};

/// The `PATH` a workload gets when its spec sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Settings of a [`ProcessRuntime`].
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessRuntimeConfig {
    /// The directory holding one directory per workload (logs, pid record, config file). One
    /// runtime per directory: a runtime takes over (stops) what another left there. An agent
    /// passes `<state dir>/workloads`. Default `$TMPDIR/kole-workloads`.
    pub dir: PathBuf,
    /// Backoff between restarts of a process that exited. Default 1 s doubling to 60 s.
    pub restart_backoff: Backoff,
    /// A process that ran this long (ms) before it exited was healthy: its restart count and
    /// backoff start over, as the kubelet does. Default 10 minutes.
    pub healthy_run_ms: u64,
    /// `PATH` of workloads whose spec sets none. Default [`DEFAULT_PATH`].
    pub path: String,
    /// Run workloads as this `(uid, gid)` (supplementary groups dropped) instead of the agent's
    /// own user. Default `None`. Needs an agent running as root.
    pub user: Option<(u32, u32)>,
    /// Largest log file, in bytes, before it is rotated. Default 10 MiB.
    pub log_max_bytes: u64,
    /// Rotated log files kept per stream (`stdout.log.1` … `.N`). Default 2.
    pub log_keep: u32,
    /// Limits the spec is decoded under. Default [`DecodeLimits::default`].
    pub limits: DecodeLimits,
    /// Seed of the restart jitter. Default 0.
    pub seed: u64,
}

impl Default for ProcessRuntimeConfig {
    fn default() -> Self {
        Self {
            dir: std::env::temp_dir().join("kole-workloads"),
            restart_backoff: Backoff::new(1_000, 60_000, 2.0),
            healthy_run_ms: 10 * 60 * 1_000,
            path: DEFAULT_PATH.to_owned(),
            user: None,
            log_max_bytes: 10 * 1024 * 1024,
            log_keep: 2,
            limits: DecodeLimits::default(),
            seed: 0,
        }
    }
}

/// A workload group that an earlier runtime (an agent that crashed or was killed) left running
/// in the directory, and that [`ProcessRuntime::new`] stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftoverWorkload {
    /// The workload id.
    pub id: String,
    /// Its version.
    pub version: u64,
    /// The group leader's pid.
    pub pid: u32,
}

/// The running instance of a workload.
#[derive(Debug)]
struct Instance {
    child: Child,
    record: PidRecord,
    started_ms: u64,
}

#[derive(Debug)]
struct Proc {
    node: NodeName,
    version: u64,
    /// Its directory's name under [`ProcessRuntimeConfig::dir`].
    dir_name: String,
    /// `Err`: why the spec is unusable.
    spec: Result<RunSpec, String>,
    instance: Option<Instance>,
    logs: Option<[SharedLog; 2]>,
    restarts: u32,
    restart_at: Option<u64>,
    /// Starts once the previous instance (an older version, a leftover) has stopped.
    waiting: bool,
    phase: WorkloadPhase,
    reported: WorkloadPhase,
    reason: Option<String>,
}

/// Runs workloads as local processes. One per node: the `node` argument of the trait's methods
/// names the node in the workload's environment and is otherwise ignored.
///
/// # Specs
///
/// A workload's spec is a [`RunSpec`]; the runtime runs its `command` then `args`. Bytes that do
/// not decode, and a spec with an `image` but no `command` (it needs a container runtime), make
/// the workload `Failed` at once, with the reason in [`WorkloadRuntime::failure_reason`].
///
/// # What a workload gets
///
/// - Its own process group (the leader is the spawned program).
/// - An environment of exactly the spec's `env`, plus `KOLE_NODE`, `KOLE_WORKLOAD`,
///   `KOLE_WORKLOAD_VERSION`, `KOLE_CONFIG_FILE` (when the spec has `config`: a 0600 file in the
///   workload's directory, owned by the workload's user) and `PATH` ([`ProcessRuntimeConfig::path`])
///   unless the spec sets it. Nothing of the agent's own environment.
/// - The spec's working directory, else `/`. Stdin is `/dev/null`.
/// - stdout and stderr piped through the runtime into `<dir>/<workload>/stdout.log` and
///   `stderr.log`, rotated at [`ProcessRuntimeConfig::log_max_bytes`], keeping
///   [`ProcessRuntimeConfig::log_keep`] old files (`stdout.log.1` newest).
/// - [`ProcessRuntimeConfig::user`], when set.
///
/// # Lifecycle
///
/// `apply` stops any running version and starts the new one (`Running`; `Pending` while the old
/// version is still stopping). `poll` reaps exited processes, kills what is left of their group,
/// and restarts them per the spec's policy after a jittered, bounded backoff (`Pending` while
/// waiting); once `max_restarts` restarts in a row are spent, a process that last failed is
/// `Failed` and one that last exited successfully `Stopped`. A run longer than
/// [`ProcessRuntimeConfig::healthy_run_ms`] resets the count.
///
/// Stopping (`remove`, a replaced version, `restart`, dropping the runtime) sends SIGTERM to the
/// group, waits for the leader up to the spec's `stop_grace_ms`, then SIGKILLs the whole group and
/// reaps the leader. It runs on a thread of its own, so the calls return at once and many
/// workloads stop side by side. `remove` deletes the workload's directory, logs included;
/// dropping the runtime (an agent that shuts down) stops every workload and keeps their logs.
///
/// # Agent restarts
///
/// Each start writes `<dir>/<workload>/pid` (pid, process start time, version, grace). The
/// output pipes end in the agent, so a workload cannot outlive its agent usefully: `new` finds
/// the records an agent that died left behind and stops those groups (same start time, so never
/// a reused pid), listed in [`ProcessRuntime::leftovers`]. The agent's re-apply of its saved
/// desired state then starts them afresh, each once it is gone: a workload never runs twice.
#[derive(Debug)]
pub struct ProcessRuntime {
    config: ProcessRuntimeConfig,
    jitter: SplitMix64,
    procs: BTreeMap<WorkloadId, Proc>,
    /// Stop jobs still running, by directory name.
    stopping: BTreeMap<String, Vec<JoinHandle<()>>>,
    leftovers: Vec<LeftoverWorkload>,
}

impl Default for ProcessRuntime {
    fn default() -> Self {
        Self::new(ProcessRuntimeConfig::default())
    }
}

/// The directory name of a workload: the id with `/` as `+` (neither appears in ids otherwise);
/// a long id is cut and suffixed with its hash (`~` marks it), to fit a file name.
fn dir_name(id: &WorkloadId) -> String {
    const MAX: usize = 200;
    let name = id.as_str().replace('/', "+");
    if name.len() <= MAX {
        return name;
    }
    // Ids are ASCII: any byte index is a character boundary.
    let fnv =
        id.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("{}~{:016x}", &name[..MAX - 17], mix64(fnv))
}

impl ProcessRuntime {
    /// A runtime over `config.dir`. Groups that an earlier runtime left running there (its agent
    /// died) are stopped in the background; a workload applied again starts once its old group
    /// is gone. A directory that cannot be read holds nothing to stop; one that cannot be created
    /// fails each workload with the reason.
    pub fn new(config: ProcessRuntimeConfig) -> Self {
        let mut rt = Self {
            jitter: SplitMix64::new(config.seed),
            config,
            procs: BTreeMap::new(),
            stopping: BTreeMap::new(),
            leftovers: Vec::new(),
        };
        rt.stop_leftovers();
        rt
    }

    fn stop_leftovers(&mut self) {
        let Ok(entries) = fs::read_dir(&self.config.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let dir = entry.path();
            let Some(record) = fs::read_to_string(dir.join(PidRecord::FILE)).ok().and_then(|t| PidRecord::parse(&t))
            else {
                continue;
            };
            if record.may_be_ours() {
                self.leftovers.push(LeftoverWorkload {
                    id: record.id.clone(),
                    version: record.version,
                    pid: record.pid,
                });
            }
            self.spawn_stop(name, StopJob { child: None, record, dir, remove_dir: false, after: Vec::new() });
        }
    }

    /// The workloads an earlier runtime left running in the directory, which [`Self::new`]
    /// stopped (for the agent to log).
    pub fn leftovers(&self) -> &[LeftoverWorkload] {
        &self.leftovers
    }

    /// The phase of a workload, as last determined.
    pub fn phase(&self, id: &WorkloadId) -> Option<WorkloadPhase> {
        self.procs.get(id).map(|p| p.phase)
    }

    /// How often a workload's process was restarted in a row.
    pub fn restarts(&self, id: &WorkloadId) -> Option<u32> {
        self.procs.get(id).map(|p| p.restarts)
    }

    /// The OS process id of a workload's running process (its group id too).
    pub fn pid(&self, id: &WorkloadId) -> Option<u32> {
        self.procs.get(id)?.instance.as_ref().map(|i| i.record.pid)
    }

    /// The directory of a workload: its logs (`stdout.log`, `stderr.log`), pid record and config
    /// file.
    pub fn workload_dir(&self, id: &WorkloadId) -> PathBuf {
        self.config.dir.join(dir_name(id))
    }

    /// Runs `job` on a thread of its own (inline if no thread can be had).
    fn spawn_stop(&mut self, dir_name: String, job: StopJob) {
        let slot = Arc::new(Mutex::new(Some(job)));
        let theirs = Arc::clone(&slot);
        let spawned = std::thread::Builder::new().name(format!("kole-stop-{dir_name}")).spawn(move || {
            if let Some(job) = theirs.lock().unwrap_or_else(PoisonError::into_inner).take() {
                job.run();
            }
        });
        match spawned {
            Ok(handle) => self.stopping.entry(dir_name).or_default().push(handle),
            Err(_) => {
                if let Some(job) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    job.run();
                }
            }
        }
    }

    /// Whether nothing of workload directory `dir_name` is still stopping.
    fn stopped(&mut self, dir_name: &str) -> bool {
        let Some(jobs) = self.stopping.get_mut(dir_name) else {
            return true;
        };
        let (done, running): (Vec<_>, Vec<_>) = jobs.drain(..).partition(JoinHandle::is_finished);
        for handle in done {
            let _ = handle.join();
        }
        *jobs = running;
        if jobs.is_empty() {
            self.stopping.remove(dir_name);
            return true;
        }
        false
    }

    /// Hands a running instance to a stop job.
    fn stop_instance(&mut self, dir_name: &str, instance: Option<Instance>, remove_dir: bool) {
        let dir = self.config.dir.join(dir_name);
        match instance {
            Some(i) => {
                self.spawn_stop(
                    dir_name.to_owned(),
                    StopJob { child: Some(i.child), record: i.record, dir, remove_dir, after: Vec::new() },
                );
            }
            None if remove_dir && self.stopped(dir_name) => {
                let _ = fs::remove_dir_all(&dir);
            }
            None if remove_dir => {
                // Remove the directory once the older stop jobs are done.
                let after = self.stopping.remove(dir_name).unwrap_or_default();
                let job = StopJob { child: None, record: PidRecord::NONE, dir, remove_dir, after };
                self.spawn_stop(dir_name.to_owned(), job);
            }
            None => {}
        }
    }

    /// Starts workload `id` now, or marks it waiting for its previous instance to stop.
    fn start(&mut self, id: &WorkloadId, now: u64) {
        let Some(dir_name) = self.procs.get(id).map(|p| p.dir_name.clone()) else {
            return;
        };
        let ready = self.stopped(&dir_name);
        let Some(p) = self.procs.get_mut(id) else {
            return;
        };
        if p.spec.is_err() {
            return;
        }
        p.restart_at = None;
        if !ready {
            p.waiting = true;
            p.phase = WorkloadPhase::Pending;
            return;
        }
        p.waiting = false;
        match launch(&self.config, id, p, now) {
            Ok(instance) => {
                p.instance = Some(instance);
                p.phase = WorkloadPhase::Running;
            }
            Err(reason) => self.settle(id, false, reason, now),
        }
    }

    /// An instance exited (or could not start): schedule a restart or settle the phase.
    fn settle(&mut self, id: &WorkloadId, success: bool, reason: String, now: u64) {
        let Some(p) = self.procs.get_mut(id) else {
            return;
        };
        let Ok(spec) = &p.spec else {
            return;
        };
        if let Some(i) = p.instance.take()
            && now.saturating_sub(i.started_ms) >= self.config.healthy_run_ms
        {
            p.restarts = 0;
        }
        let again = match spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Never => false,
        };
        if again && p.restarts < spec.max_restarts {
            let delay = self.config.restart_backoff.delay_ms(p.restarts, &mut self.jitter);
            p.restarts += 1;
            p.restart_at = Some(now.saturating_add(delay));
            p.phase = WorkloadPhase::Pending;
        } else if success {
            p.phase = WorkloadPhase::Stopped;
        } else {
            p.reason = Some(match p.restarts {
                0 => reason,
                1 => format!("{reason} after 1 restart"),
                n => format!("{reason} after {n} restarts"),
            });
            p.phase = WorkloadPhase::Failed;
        }
    }
}

/// Why a spec cannot run here, or the spec.
fn usable_spec(bytes: &[u8], limits: &DecodeLimits) -> Result<RunSpec, String> {
    let spec = RunSpec::decode(bytes, limits).map_err(|e| format!("invalid runtime spec: {e}"))?;
    if spec.command.is_empty() {
        let image = spec.image.as_deref().unwrap_or("");
        return Err(format!(
            "the process runtime runs `command`; image {} needs a container runtime (kole-agent --runtime podman)",
            truncate_for_error(image)
        ));
    }
    Ok(spec)
}

fn exit_reason(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exited".to_owned(),
    }
}

/// Creates the workload's directory (0711: a workload running as another user may reach its
/// config file by name, and list nothing).
fn prepare_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o711).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
}

fn write_config(path: &Path, config: &str, user: Option<(u32, u32)>) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
    io::Write::write_all(&mut file, config.as_bytes())?;
    drop(file);
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
    }
    fs::rename(&tmp, path)
}

/// Spawns an instance of `p`: directory, logs, config file, process group, pid record, readers.
fn launch(config: &ProcessRuntimeConfig, id: &WorkloadId, p: &mut Proc, now: u64) -> Result<Instance, String> {
    let spec = p.spec.as_ref().map_err(Clone::clone)?;
    let dir = config.dir.join(&p.dir_name);
    prepare_dir(&dir).map_err(|e| format!("cannot create the workload directory {}: {e}", dir.display()))?;
    let logs = match &p.logs {
        Some(logs) => logs.clone(),
        None => {
            let open = |name: &str| {
                RotatingLog::open(dir.join(name), config.log_max_bytes, config.log_keep)
                    .map(|log| Arc::new(Mutex::new(log)))
                    .map_err(|e| format!("cannot open the log {}: {e}", dir.join(name).display()))
            };
            let logs = [open("stdout.log")?, open("stderr.log")?];
            p.logs = Some(logs.clone());
            logs
        }
    };
    let mut argv = spec.argv();
    let program = argv.next().ok_or("the spec has no program to run")?;
    let mut cmd = Command::new(program);
    cmd.args(argv).env_clear();
    if !spec.env.contains_key("PATH") {
        cmd.env("PATH", &config.path);
    }
    cmd.envs(&spec.env)
        .env("KOLE_NODE", p.node.as_str())
        .env("KOLE_WORKLOAD", id.as_str())
        .env("KOLE_WORKLOAD_VERSION", p.version.to_string());
    if let Some(text) = &spec.config {
        let path = dir.join("config");
        write_config(&path, text, config.user)
            .map_err(|e| format!("cannot write the config file {}: {e}", path.display()))?;
        cmd.env("KOLE_CONFIG_FILE", &path);
    }
    let workdir = spec.working_dir.as_deref().unwrap_or("/");
    if !Path::new(workdir).is_dir() {
        return Err(format!("working directory {} does not exist", truncate_for_error(workdir)));
    }
    cmd.current_dir(workdir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    if let Some((uid, gid)) = config.user {
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().map_err(|e| format!("exec {}: {e}", truncate_for_error(program)))?;
    let pid = child.id();
    // Anything that fails from here on kills the group it just started: never a process that no
    // record names.
    let abort = |child: &mut Child, reason: String| {
        signal_group(pid, Signal::KILL);
        let _ = child.wait();
        reason
    };
    let record = PidRecord {
        id: id.as_str().to_owned(),
        version: p.version,
        pid,
        start: proc_stat(pid).map_or(0, |s| s.start),
        grace_ms: spec.stop_grace_ms,
    };
    if let Err(e) = record.write(&dir) {
        return Err(abort(&mut child, format!("cannot write the pid record in {}: {e}", dir.display())));
    }
    let [out_log, err_log] = logs;
    let readers = match (child.stdout.take(), child.stderr.take()) {
        (Some(out), Some(err)) => spawn_reader(format!("kole-log-{}", p.dir_name), out, out_log)
            .and_then(|_| spawn_reader(format!("kole-log-{}", p.dir_name), err, err_log)),
        _ => Err(io::Error::other("the output pipes are missing")),
    };
    if let Err(e) = readers {
        let _ = fs::remove_file(dir.join(PidRecord::FILE));
        return Err(abort(&mut child, format!("cannot start the log readers: {e}")));
    }
    Ok(Instance { child, record, started_ms: now })
}

impl WorkloadRuntime for ProcessRuntime {
    fn apply(&mut self, node: &NodeName, workload: &Arc<Workload>, now: Timestamp) -> WorkloadPhase {
        let name = dir_name(&workload.id);
        let mut logs = None;
        if let Some(old) = self.procs.remove(&workload.id) {
            logs = old.logs;
            self.stop_instance(&name, old.instance, false);
        }
        let spec = usable_spec(&workload.spec, &self.config.limits);
        let reason = spec.as_ref().err().cloned();
        self.procs.insert(
            workload.id.clone(),
            Proc {
                node: node.clone(),
                version: workload.version,
                dir_name: name,
                spec,
                instance: None,
                logs,
                restarts: 0,
                restart_at: None,
                waiting: false,
                phase: WorkloadPhase::Failed,
                reported: WorkloadPhase::Failed,
                reason,
            },
        );
        self.start(&workload.id, now.as_millis());
        let Some(p) = self.procs.get_mut(&workload.id) else {
            return WorkloadPhase::Failed;
        };
        p.reported = p.phase;
        p.phase
    }

    fn remove(&mut self, _node: &NodeName, id: &WorkloadId, _now: Timestamp) {
        if let Some(p) = self.procs.remove(id) {
            self.stop_instance(&p.dir_name, p.instance, true);
        }
    }

    fn restart(&mut self, _node: &NodeName, id: &WorkloadId, now: Timestamp) -> Option<WorkloadPhase> {
        let p = self.procs.get_mut(id)?;
        let (name, instance) = (p.dir_name.clone(), p.instance.take());
        p.restarts = 0;
        if p.spec.is_ok() {
            p.reason = None;
        }
        self.stop_instance(&name, instance, false);
        self.start(id, now.as_millis());
        let p = self.procs.get_mut(id)?;
        p.reported = p.phase;
        Some(p.phase)
    }

    fn poll(&mut self, _node: &NodeName, now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>) {
        let now = now.as_millis();
        let ids: Vec<WorkloadId> = self.procs.keys().cloned().collect();
        for id in ids {
            let exit = match self.procs.get_mut(&id).and_then(|p| p.instance.as_mut()) {
                Some(i) => match i.child.try_wait() {
                    Ok(Some(status)) => Some((status.success(), exit_reason(status), i.record.pid)),
                    Ok(None) => None,
                    Err(e) => Some((false, format!("cannot wait for the process: {e}"), i.record.pid)),
                },
                None => None,
            };
            if let Some((success, reason, pgid)) = exit {
                // The leader is gone: what is left of its group goes too (it was reaped just now,
                // and a group id is not reused while members remain).
                signal_group(pgid, Signal::KILL);
                if let Some(p) = self.procs.get(&id) {
                    let _ = fs::remove_file(self.config.dir.join(&p.dir_name).join(PidRecord::FILE));
                }
                self.settle(&id, success, reason, now);
            }
            let due = self.procs.get(&id).is_some_and(|p| p.waiting || p.restart_at.is_some_and(|at| now >= at));
            if due {
                self.start(&id, now);
            }
            if let Some(p) = self.procs.get_mut(&id)
                && p.phase != p.reported
            {
                p.reported = p.phase;
                changes.push((id, p.phase));
            }
        }
        // Forget finished stop jobs of removed workloads.
        let names: Vec<String> = self.stopping.keys().cloned().collect();
        for name in names {
            self.stopped(&name);
        }
    }

    fn failure_reason(&self, _node: &NodeName, id: &WorkloadId) -> Option<String> {
        let p = self.procs.get(id)?;
        if p.phase == WorkloadPhase::Failed { p.reason.clone() } else { None }
    }
}

impl Drop for ProcessRuntime {
    /// Stops every workload (side by side, each within its grace period) and waits for them.
    fn drop(&mut self) {
        let procs = std::mem::take(&mut self.procs);
        for p in procs.into_values() {
            self.stop_instance(&p.dir_name, p.instance, false);
        }
        for handle in std::mem::take(&mut self.stopping).into_values().flatten() {
            let _ = handle.join();
        }
    }
}
