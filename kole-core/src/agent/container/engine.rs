//! What kole asks of a container engine's CLI (podman, docker, nerdctl), as argument vectors, and
//! what it reads back: container names, labels, the `run` options a [`RunSpec`] maps to, and the
//! decoder of `ps` output. Pure functions: the worker threads run the commands.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::model::{NodeName, WorkloadId};
use crate::runspec::{RestartPolicy, RunSpec};

/// Label every container kole starts carries, set to `true`.
pub const LABEL_MANAGED: &str = "dev.kole.managed";
/// Label naming the workload a container runs (its [`WorkloadId`]).
pub const LABEL_WORKLOAD: &str = "dev.kole.workload";
/// Label naming the workload version a container runs.
pub const LABEL_VERSION: &str = "dev.kole.version";
/// Label naming the node that started the container.
pub const LABEL_NODE: &str = "dev.kole.node";
/// Where a workload's `config` is mounted (read-only) inside its container; `KOLE_CONFIG_FILE`
/// names it.
pub const CONFIG_MOUNT_PATH: &str = "/run/kole/config";

/// A container engine kole drives through its command-line interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContainerEngine {
    /// Podman (4.x): `podman`.
    Podman,
    /// Docker: `docker`.
    Docker,
    /// nerdctl (containerd): `nerdctl`.
    Nerdctl,
}

impl ContainerEngine {
    /// Every engine, in the order [`ContainerEngine::detect`] tries them.
    pub const ALL: [ContainerEngine; 3] = [ContainerEngine::Podman, ContainerEngine::Docker, ContainerEngine::Nerdctl];

    /// The engine's name, which is also the name of its binary: `podman`, `docker`, `nerdctl`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerEngine::Podman => "podman",
            ContainerEngine::Docker => "docker",
            ContainerEngine::Nerdctl => "nerdctl",
        }
    }

    /// The first engine whose binary is in the process's `PATH` (podman, then docker, then
    /// nerdctl), with the binary's path.
    pub fn detect() -> Option<(ContainerEngine, PathBuf)> {
        Self::detect_in(&std::env::var_os("PATH")?)
    }

    /// [`detect`](Self::detect) with a given `PATH` value (directories separated by `:`).
    pub fn detect_in(path: &OsStr) -> Option<(ContainerEngine, PathBuf)> {
        Self::ALL.into_iter().find_map(|engine| engine.find_in(path).map(|p| (engine, p)))
    }

    /// This engine's binary in the process's `PATH`.
    pub fn find_binary(self) -> Option<PathBuf> {
        self.find_in(&std::env::var_os("PATH")?)
    }

    /// This engine's binary in a given `PATH` value.
    pub fn find_in(self, path: &OsStr) -> Option<PathBuf> {
        std::env::split_paths(path).map(|dir| dir.join(self.as_str())).find(|p| is_executable(p))
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl fmt::Display for ContainerEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not `podman`, `docker` or `nerdctl`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown container engine {0:?}: expected podman, docker or nerdctl")]
pub struct UnknownEngine(pub String);

impl FromStr for ContainerEngine {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| UnknownEngine(crate::model::truncate_for_error(s)))
    }
}

/// The container name of `version` of workload `id`: `kole-<id>-v<version>`, with `/` written as
/// `_` and `_` as `__` (a `/` in an id always sits between letters or digits, so the name maps
/// back to one id; engines allow `[a-zA-Z0-9][a-zA-Z0-9_.-]*`).
pub fn container_name(id: &WorkloadId, version: u64) -> String {
    let mut name = String::with_capacity(id.as_str().len() + 16);
    name.push_str("kole-");
    for c in id.as_str().chars() {
        match c {
            '/' => name.push('_'),
            '_' => name.push_str("__"),
            c => name.push(c),
        }
    }
    name.push_str("-v");
    name.push_str(&version.to_string());
    name
}

/// Seconds a stop grace period of `ms` milliseconds is, rounded up (engines take whole seconds).
pub(super) fn grace_secs(ms: u32) -> u32 {
    ms.div_ceil(1000)
}

/// The engine's `--restart` value for a spec. `max_restarts` of 0 with `on-failure` means "do not
/// restart" (docker reads `on-failure:0` as "without limit").
pub(super) fn restart_flag(spec: &RunSpec) -> String {
    match spec.restart {
        RestartPolicy::Always => "--restart=always".to_owned(),
        RestartPolicy::OnFailure if spec.max_restarts == 0 => "--restart=no".to_owned(),
        RestartPolicy::OnFailure => format!("--restart=on-failure:{}", spec.max_restarts),
        RestartPolicy::Never => "--restart=no".to_owned(),
    }
}

/// What a `run` needs besides the spec.
pub(super) struct RunContext<'a> {
    pub node: &'a NodeName,
    pub id: &'a WorkloadId,
    pub version: u64,
    pub image: &'a str,
    /// Host path of the workload's config file, when the spec has a config.
    pub config_file: Option<&'a Path>,
    /// `--log-opt` values.
    pub log_options: &'a [String],
}

/// The `run` argument vector for a spec (without the binary).
pub(super) fn run_args(ctx: &RunContext<'_>, spec: &RunSpec) -> Vec<String> {
    let name = container_name(ctx.id, ctx.version);
    let mut a: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name];
    for (k, v) in [
        (LABEL_MANAGED, "true".to_owned()),
        (LABEL_NODE, ctx.node.as_str().to_owned()),
        (LABEL_WORKLOAD, ctx.id.as_str().to_owned()),
        (LABEL_VERSION, ctx.version.to_string()),
    ] {
        a.push("--label".into());
        a.push(format!("{k}={v}"));
    }
    a.push(restart_flag(spec));
    a.push("--stop-timeout".into());
    a.push(grace_secs(spec.stop_grace_ms).to_string());
    // kole pulls first (with its own retries); `run` must never pull behind its back.
    a.push("--pull=never".into());
    for opt in ctx.log_options {
        a.push("--log-opt".into());
        a.push(opt.clone());
    }
    if let Some(dir) = &spec.working_dir {
        a.push("-w".into());
        a.push(dir.clone());
    }
    // Values are given explicitly: the engine CLI never copies its own environment into a
    // container this way (and kole starts the CLI with a cleared environment anyway).
    let mut env = vec![
        ("KOLE_NODE".to_owned(), ctx.node.as_str().to_owned()),
        ("KOLE_WORKLOAD".to_owned(), ctx.id.as_str().to_owned()),
        ("KOLE_WORKLOAD_VERSION".to_owned(), ctx.version.to_string()),
    ];
    if let Some(file) = ctx.config_file {
        env.push(("KOLE_CONFIG_FILE".to_owned(), CONFIG_MOUNT_PATH.to_owned()));
        a.push("-v".into());
        a.push(format!("{}:{CONFIG_MOUNT_PATH}:ro", file.display()));
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    for (k, v) in env {
        a.push("-e".into());
        a.push(format!("{k}={v}"));
    }
    let mut command = spec.command.iter();
    if let Some(entry) = command.next() {
        a.push("--entrypoint".into());
        a.push(entry.clone());
    }
    a.push(ctx.image.to_owned());
    a.extend(command.cloned());
    a.extend(spec.args.iter().cloned());
    a
}

/// The `ps` argument vector listing this node's kole containers (of one workload, when given).
pub(super) fn ps_args(engine: ContainerEngine, node: &NodeName, workload: Option<&WorkloadId>) -> Vec<String> {
    let mut a: Vec<String> = vec!["ps".into(), "-a".into()];
    let mut filters = vec![format!("label={LABEL_MANAGED}=true"), format!("label={LABEL_NODE}={}", node.as_str())];
    if let Some(id) = workload {
        filters.push(format!("label={LABEL_WORKLOAD}={}", id.as_str()));
    }
    for f in filters {
        a.push("--filter".into());
        a.push(f);
    }
    a.push("--format".into());
    // Podman prints one JSON array; docker and nerdctl print one object per line with `{{json .}}`
    // (docker before 23.0 has no `--format json`).
    a.push(if engine == ContainerEngine::Podman { "json".into() } else { "{{json .}}".into() });
    a
}

/// The argument vector that exits 0 when `image` is present locally.
pub(super) fn image_exists_args(engine: ContainerEngine, image: &str) -> Vec<String> {
    match engine {
        ContainerEngine::Podman => vec!["image".into(), "exists".into(), image.into()],
        ContainerEngine::Docker | ContainerEngine::Nerdctl => {
            vec!["image".into(), "inspect".into(), "--format".into(), "{{.Id}}".into(), image.into()]
        }
    }
}

/// The state of a container as the engine reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ObservedState {
    /// Running.
    Running,
    /// Created, not yet started, or between restarts.
    Starting,
    /// Paused.
    Paused,
    /// Exited (or stopped, dead).
    Exited,
    /// A state kole does not know (kept for the reason).
    Other(String),
}

/// One container from `ps` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ObservedContainer {
    /// Its (first) name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its state.
    pub state: ObservedState,
    /// Exit code of its last run, when it exited and the engine says.
    pub exit_code: Option<i64>,
    /// Restarts by the engine's restart policy, when the engine says (podman 4.3 and docker's
    /// `ps` do not).
    pub restarts: Option<u64>,
}

impl ObservedContainer {
    /// The workload it runs, from its label.
    pub fn workload(&self) -> Option<WorkloadId> {
        self.labels.get(LABEL_WORKLOAD).and_then(|s| WorkloadId::new(s.as_str()).ok())
    }
}

/// Why `ps` output does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the engine's `ps --format json` output does not decode: {0}")]
pub(super) struct PsDecodeError(pub String);

/// Decodes `ps` output: one JSON array of objects (podman) or one object per line (docker,
/// nerdctl). Names are an array or a comma-separated string; labels an object or a
/// comma-separated `k=v` string; the exit code a number (`ExitCode`) or read from a
/// docker-style status (`Exited (3) 2 minutes ago`).
pub(super) fn parse_ps(output: &[u8]) -> Result<Vec<ObservedContainer>, PsDecodeError> {
    let text = std::str::from_utf8(output).map_err(|_| PsDecodeError("not UTF-8".into()))?;
    let trimmed = text.trim();
    let values: Vec<serde_json::Value> = if trimmed.is_empty() {
        Vec::new()
    } else if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| PsDecodeError(e.to_string()))?
    } else {
        trimmed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| PsDecodeError(e.to_string())))
            .collect::<Result<_, _>>()?
    };
    values.iter().map(container_from_json).collect()
}

fn container_from_json(v: &serde_json::Value) -> Result<ObservedContainer, PsDecodeError> {
    use serde_json::Value;
    let obj = v.as_object().ok_or_else(|| PsDecodeError("an entry is not an object".into()))?;
    let name = match obj.get("Names") {
        Some(Value::Array(names)) => names.first().and_then(Value::as_str).map(str::to_owned),
        Some(Value::String(names)) => names.split(',').next().map(str::to_owned),
        _ => None,
    }
    .filter(|n| !n.is_empty())
    .ok_or_else(|| PsDecodeError("an entry has no Names".into()))?;
    let labels = match obj.get("Labels") {
        Some(Value::Object(map)) => {
            map.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect()
        }
        Some(Value::String(s)) => {
            s.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
        }
        _ => BTreeMap::new(),
    };
    let status = obj.get("Status").and_then(Value::as_str).unwrap_or("");
    let state_text = obj.get("State").and_then(Value::as_str).unwrap_or(status).to_ascii_lowercase();
    let state = match state_text.split_whitespace().next().unwrap_or("") {
        "running" | "up" => ObservedState::Running,
        "created" | "configured" | "initialized" | "restarting" | "stopping" => ObservedState::Starting,
        "paused" => ObservedState::Paused,
        "exited" | "stopped" | "dead" => ObservedState::Exited,
        other => ObservedState::Other(crate::model::truncate_for_error(other)),
    };
    let exit_code = (state == ObservedState::Exited)
        .then(|| obj.get("ExitCode").and_then(Value::as_i64).or_else(|| exit_code_from_status(status)))
        .flatten();
    let restarts = obj.get("Restarts").and_then(Value::as_u64);
    Ok(ObservedContainer { name, labels, state, exit_code, restarts })
}

/// `Exited (137) 5 seconds ago` → 137.
fn exit_code_from_status(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest.split_once(')')?.0.trim().parse().ok()
}

/// The line of an engine's stderr worth showing: the last `Error…` line (podman prints warnings
/// and retries first), else the last non-empty line, without the `Error: ` prefix, bounded.
pub(super) fn engine_message(stderr: &[u8], status: Option<i32>) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Error") || l.starts_with("error") || l.starts_with("FATA"))
        .or(lines.last())
        .copied();
    match line {
        Some(line) => {
            let line = ["Error response from daemon: ", "Error: ", "error: "]
                .iter()
                .find_map(|p| line.strip_prefix(p))
                .unwrap_or(line);
            bounded(line, 300)
        }
        None => match status {
            Some(code) => format!("exit status {code}, no message"),
            None => "killed by a signal, no message".to_owned(),
        },
    }
}

/// `s` cut to at most `max` bytes at a character boundary, with an ellipsis when cut.
pub(super) fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
