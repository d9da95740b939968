//! A [`WorkloadRuntime`] that runs each workload as a local process.
//!
//! (See [`ProcessRuntime`] for the spec format and the lifecycle.)

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use crate::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};

use super::runtime::WorkloadRuntime;
use crate::backoff::Backoff;
use crate::rng::SplitMix64;

/// When a process that exited is started again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RestartPolicy {
    /// After every exit.
    Always,
    /// After an exit with a failure status (the default).
    #[default]
    OnFailure,
    /// Never.
    Never,
}

/// Most restarts a spec may ask for.
pub const MAX_RESTARTS_LIMIT: u32 = 1_000;

/// A parsed process spec (see [`ProcessRuntime`] for the format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program to run (looked up in `PATH` when it has no `/`).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// When to restart it.
    pub restart: RestartPolicy,
    /// How many restarts before giving up.
    pub max_restarts: u32,
}

/// Why a spec is not a valid process spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessSpecError {
    /// Not UTF-8.
    #[error("process spec is not UTF-8 text")]
    NotUtf8,
    /// No command line.
    #[error("process spec has no command line")]
    NoCommand,
    /// A quote is not closed.
    #[error("unterminated quote in the command line of the process spec")]
    UnterminatedQuote,
    /// A directive line is unknown or its value invalid.
    #[error("line {line} of the process spec: {reason}")]
    Directive {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

fn split_command(line: &str) -> Result<Vec<String>, ProcessSpecError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => word.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                in_word = true;
            }
            None if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            None => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return Err(ProcessSpecError::UnterminatedQuote);
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

impl ProcessSpec {
    /// Parses spec bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProcessSpecError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ProcessSpecError::NotUtf8)?;
        let mut command: Option<Vec<String>> = None;
        let mut restart = RestartPolicy::default();
        let mut max_restarts = 5;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if command.is_none() {
                command = Some(split_command(line)?);
                continue;
            }
            // Directives may carry a trailing comment.
            let line = line.split('#').next().unwrap_or("").trim();
            let bad = |reason| ProcessSpecError::Directive { line: i + 1, reason };
            let (key, value) = line.split_once('=').ok_or_else(|| bad("expected key=value"))?;
            match (key.trim(), value.trim()) {
                ("restart", "always") => restart = RestartPolicy::Always,
                ("restart", "on-failure") => restart = RestartPolicy::OnFailure,
                ("restart", "never") => restart = RestartPolicy::Never,
                ("restart", _) => return Err(bad("restart must be always, on-failure or never")),
                ("max_restarts", v) => {
                    max_restarts = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n <= MAX_RESTARTS_LIMIT)
                        .ok_or_else(|| bad("max_restarts must be an integer from 0 to 1000"))?;
                }
                _ => {
                    return Err(bad("unknown directive (expected restart= or max_restarts=)"));
                }
            }
        }
        let mut words = command.ok_or(ProcessSpecError::NoCommand)?.into_iter();
        let program = words.next().ok_or(ProcessSpecError::NoCommand)?;
        Ok(Self { program, args: words.collect(), restart, max_restarts })
    }
}

/// Settings of a [`ProcessRuntime`].
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessRuntimeConfig {
    /// Backoff between restarts of a process that exited. Default 1 s doubling to 60 s.
    pub restart_backoff: Backoff,
    /// Whether processes inherit the agent's stdout and stderr (else they go to `/dev/null`).
    /// Default true. Stdin is always closed.
    pub inherit_output: bool,
    /// Seed of the restart jitter. Default 0.
    pub seed: u64,
}

impl Default for ProcessRuntimeConfig {
    fn default() -> Self {
        Self { restart_backoff: Backoff::new(1_000, 60_000, 2.0), inherit_output: true, seed: 0 }
    }
}

#[derive(Debug)]
struct Proc {
    spec: Option<ProcessSpec>,
    child: Option<Child>,
    restarts: u32,
    restart_at: Option<u64>,
    phase: WorkloadPhase,
    reported: WorkloadPhase,
}

/// Runs workloads as local processes. One per node: the `node` argument of the trait's methods is
/// ignored.
///
/// # Spec format
///
/// A workload's spec bytes are UTF-8 text, one directive per line; blank lines and lines starting
/// with `#` are ignored:
///
/// ```text
/// # the first directive line is the command: program and arguments, separated by whitespace;
/// # '…' or "…" group words containing spaces (no escapes inside quotes)
/// sh -c 'while true; do date; sleep 5; done'
/// restart=on-failure     # always | on-failure | never          (default on-failure)
/// max_restarts=5         # restarts before giving up, 0 to 1000 (default 5)
/// ```
///
/// Unknown directives, a missing command or an unterminated quote make the spec invalid: the
/// workload is reported `Failed` without anything being started.
///
/// # Lifecycle
///
/// [`WorkloadRuntime::apply`] kills any running version, spawns the new one (`Running`, or per the
/// policy after a failed spawn); [`WorkloadRuntime::poll`] reaps exited processes with
/// `try_wait` and restarts them per the policy after a jittered, bounded backoff (`Pending` while
/// waiting); once the restarts are spent, a process that last failed is `Failed` and one that last
/// exited successfully is `Stopped`. Removing a workload (or dropping the runtime) kills its
/// process and reaps it.
#[derive(Debug)]
pub struct ProcessRuntime {
    config: ProcessRuntimeConfig,
    jitter: SplitMix64,
    procs: BTreeMap<WorkloadId, Proc>,
}

impl Default for ProcessRuntime {
    fn default() -> Self {
        Self::new(ProcessRuntimeConfig::default())
    }
}

impl ProcessRuntime {
    /// A runtime with no processes.
    pub fn new(config: ProcessRuntimeConfig) -> Self {
        Self { jitter: SplitMix64::new(config.seed), config, procs: BTreeMap::new() }
    }

    /// The phase of a workload, as last determined.
    pub fn phase(&self, id: &WorkloadId) -> Option<WorkloadPhase> {
        self.procs.get(id).map(|p| p.phase)
    }

    /// How often a workload's process was restarted since it was applied.
    pub fn restarts(&self, id: &WorkloadId) -> Option<u32> {
        self.procs.get(id).map(|p| p.restarts)
    }

    /// The OS process id of a workload's running process.
    pub fn pid(&self, id: &WorkloadId) -> Option<u32> {
        self.procs.get(id)?.child.as_ref().map(Child::id)
    }

    fn spawn(&self, spec: &ProcessSpec) -> std::io::Result<Child> {
        let (out, err) = if self.config.inherit_output {
            (Stdio::inherit(), Stdio::inherit())
        } else {
            (Stdio::null(), Stdio::null())
        };
        Command::new(&spec.program).args(&spec.args).stdin(Stdio::null()).stdout(out).stderr(err).spawn()
    }

    /// Starts (or restarts) `p`'s process; on failure to spawn, handles it like a failed exit.
    fn start(&mut self, id: &WorkloadId, now: u64) {
        let Some(spec) = self.procs.get(id).and_then(|p| p.spec.clone()) else {
            return;
        };
        let spawned = self.spawn(&spec);
        let Some(p) = self.procs.get_mut(id) else {
            return;
        };
        p.restart_at = None;
        match spawned {
            Ok(child) => {
                p.child = Some(child);
                p.phase = WorkloadPhase::Running;
            }
            Err(_) => self.exited(id, false, now),
        }
    }

    /// A process exited (or failed to spawn): schedule a restart or settle its phase.
    fn exited(&mut self, id: &WorkloadId, success: bool, now: u64) {
        let Some(p) = self.procs.get_mut(id) else {
            return;
        };
        p.child = None;
        let Some(spec) = &p.spec else {
            p.phase = WorkloadPhase::Failed;
            return;
        };
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
        } else {
            p.phase = if success { WorkloadPhase::Stopped } else { WorkloadPhase::Failed };
        }
    }
}

fn kill(child: &mut Child) {
    // Already exited is fine; `wait` reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

impl WorkloadRuntime for ProcessRuntime {
    fn apply(&mut self, _node: &NodeName, workload: &Arc<Workload>, now: Timestamp) -> WorkloadPhase {
        if let Some(mut old) = self.procs.remove(&workload.id)
            && let Some(child) = old.child.as_mut()
        {
            kill(child);
        }
        let spec = ProcessSpec::parse(&workload.spec).ok();
        let invalid = spec.is_none();
        self.procs.insert(
            workload.id.clone(),
            Proc {
                spec,
                child: None,
                restarts: 0,
                restart_at: None,
                phase: WorkloadPhase::Failed,
                reported: WorkloadPhase::Failed,
            },
        );
        if !invalid {
            self.start(&workload.id, now.as_millis());
        }
        let Some(p) = self.procs.get_mut(&workload.id) else {
            return WorkloadPhase::Failed;
        };
        p.reported = p.phase;
        p.phase
    }

    fn remove(&mut self, _node: &NodeName, id: &WorkloadId, _now: Timestamp) {
        if let Some(mut p) = self.procs.remove(id)
            && let Some(child) = p.child.as_mut()
        {
            kill(child);
        }
    }

    fn restart(&mut self, _node: &NodeName, id: &WorkloadId, now: Timestamp) -> Option<WorkloadPhase> {
        let p = self.procs.get_mut(id)?;
        if let Some(child) = p.child.as_mut() {
            kill(child);
        }
        p.child = None;
        p.restarts = 0;
        if p.spec.is_some() {
            self.start(id, now.as_millis());
        }
        let p = self.procs.get_mut(id)?;
        p.reported = p.phase;
        Some(p.phase)
    }

    fn poll(&mut self, _node: &NodeName, now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>) {
        let now = now.as_millis();
        let ids: Vec<WorkloadId> = self.procs.keys().cloned().collect();
        for id in ids {
            let exit = match self.procs.get_mut(&id).and_then(|p| p.child.as_mut()) {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => Some(status.success()),
                    Ok(None) => None,
                    // The process cannot be observed: count it as failed.
                    Err(_) => Some(false),
                },
                None => None,
            };
            if let Some(success) = exit {
                self.exited(&id, success, now);
            }
            if self.procs.get(&id).and_then(|p| p.restart_at).is_some_and(|at| now >= at) {
                self.start(&id, now);
            }
            if let Some(p) = self.procs.get_mut(&id)
                && p.phase != p.reported
            {
                p.reported = p.phase;
                changes.push((id, p.phase));
            }
        }
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        for p in self.procs.values_mut() {
            if let Some(child) = p.child.as_mut() {
                kill(child);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::model::Selector;

    fn workload(id: &str, version: u64, spec: &str) -> Arc<Workload> {
        Arc::new(Workload {
            id: WorkloadId::new(id).unwrap(),
            version,
            spec: spec.as_bytes().to_vec(),
            selector: Selector::everything(),
            delivery: Default::default(),
            rollout: Default::default(),
        })
    }

    fn runtime() -> ProcessRuntime {
        ProcessRuntime::new(ProcessRuntimeConfig {
            restart_backoff: Backoff::new(10, 40, 2.0),
            inherit_output: false,
            seed: 1,
        })
    }

    fn node() -> NodeName {
        NodeName::new("edge-1").unwrap()
    }

    /// Polls (on the real clock) until `id` reaches `phase`, for at most 10 s.
    fn poll_until(rt: &mut ProcessRuntime, id: &WorkloadId, phase: WorkloadPhase) -> Vec<WorkloadPhase> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while rt.phase(id) != Some(phase) {
            assert!(start.elapsed() < Duration::from_secs(10), "stuck; saw {seen:?}");
            std::thread::sleep(Duration::from_millis(5));
            let mut changes = Vec::new();
            let now = Timestamp::from_millis(start.elapsed().as_millis() as u64);
            rt.poll(&node(), now, &mut changes);
            seen.extend(changes.into_iter().map(|(_, p)| p));
        }
        seen
    }

    #[test]
    fn spec_format() {
        let s = ProcessSpec::parse(b"# comment\n\nsh -c 'exit 1'  \"a b\"\nrestart=always # why\nmax_restarts=3\n")
            .unwrap();
        assert_eq!(s.program, "sh");
        assert_eq!(s.args, ["-c", "exit 1", "a b"]);
        assert_eq!((s.restart, s.max_restarts), (RestartPolicy::Always, 3));
        let d = ProcessSpec::parse(b"true").unwrap();
        assert_eq!((d.restart, d.max_restarts), (RestartPolicy::OnFailure, 5));
        for bad in [
            &b""[..],
            b"# only a comment",
            b"sh -c 'exit 1",
            b"true\nrestart=sometimes",
            b"true\nmax_restarts=-1",
            b"true\nmax_restarts=1001",
            b"true\ncolour=blue",
            b"true\nrestart",
            b"\xff\xfe",
        ] {
            assert!(ProcessSpec::parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn failing_process_is_restarted_then_failed() {
        let mut rt = runtime();
        let w = workload("crash", 1, "sh -c 'exit 1'\nrestart=on-failure\nmax_restarts=2");
        rt.apply(&node(), &w, Timestamp::from_millis(0));
        let seen = poll_until(&mut rt, &w.id, WorkloadPhase::Failed);
        assert_eq!(rt.restarts(&w.id), Some(2));
        assert_eq!(seen.last(), Some(&WorkloadPhase::Failed));
        assert!(seen.contains(&WorkloadPhase::Pending), "{seen:?}");
    }

    #[test]
    fn successful_exit_is_stopped_and_not_restarted_on_failure_policy() {
        let mut rt = runtime();
        let w = workload("once", 1, "true");
        assert_eq!(rt.apply(&node(), &w, Timestamp::from_millis(0)), WorkloadPhase::Running);
        assert_eq!(poll_until(&mut rt, &w.id, WorkloadPhase::Stopped), [WorkloadPhase::Stopped]);
        assert_eq!(rt.restarts(&w.id), Some(0));
        // restart=always restarts even successful exits, up to its bound.
        let w = workload("loop", 1, "true\nrestart=always\nmax_restarts=2");
        rt.apply(&node(), &w, Timestamp::from_millis(0));
        poll_until(&mut rt, &w.id, WorkloadPhase::Stopped);
        assert_eq!(rt.restarts(&w.id), Some(2));
    }

    #[test]
    fn long_running_process_runs_until_removed() {
        let mut rt = runtime();
        let w = workload("sleeper", 1, "sleep 30");
        assert_eq!(rt.apply(&node(), &w, Timestamp::from_millis(0)), WorkloadPhase::Running);
        let pid = rt.pid(&w.id).unwrap();
        let mut changes = Vec::new();
        std::thread::sleep(Duration::from_millis(20));
        rt.poll(&node(), Timestamp::from_millis(20), &mut changes);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(rt.phase(&w.id), Some(WorkloadPhase::Running));
        // A new version replaces the process.
        let w2 = workload("sleeper", 2, "sleep 30");
        rt.apply(&node(), &w2, Timestamp::from_millis(30));
        assert_ne!(rt.pid(&w.id), Some(pid));
        let started = Instant::now();
        rt.remove(&node(), &w.id, Timestamp::from_millis(40));
        assert!(started.elapsed() < Duration::from_secs(5), "killed, not waited for");
        assert_eq!(rt.phase(&w.id), None);
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || cfg!(not(target_os = "linux")),
            "the first process was killed and reaped"
        );
    }

    #[test]
    fn invalid_spec_or_missing_program_fails() {
        let mut rt = runtime();
        let w = workload("bad", 1, "sh -c 'unterminated");
        assert_eq!(rt.apply(&node(), &w, Timestamp::from_millis(0)), WorkloadPhase::Failed);
        let w = workload("missing", 1, "/nonexistent/kole-test-binary\nrestart=never");
        assert_eq!(rt.apply(&node(), &w, Timestamp::from_millis(0)), WorkloadPhase::Failed);
        assert_eq!(rt.restart(&node(), &w.id, Timestamp::from_millis(1)), Some(WorkloadPhase::Failed));
    }
}
