//! `kole-agent`: the kole edge agent. Registers with the controller over MQTT, heartbeats, runs the
//! workloads the controller sends, and keeps its desired state under its state directory so it
//! restarts autonomously (edge autonomy: it keeps running its last desired state while offline).
//!
//! ```text
//! kole-agent --name edge-1 --labels tier=edge,site=lab --broker mqtts://broker.example:8883 \
//!     --tls-ca /etc/kole/ca.crt --password-file /etc/kole/password
//! ```
//!
//! `kole-agent --help` lists every flag and its environment variable; `docs/agent.md` covers the
//! installation (systemd unit in `deploy/agent/`), the credentials, the CA and the state directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kole_core::agent::driver::{AgentDriverConfig, run_agent_observed};
use kole_core::agent::{
    Agent, AgentConfig, AgentEvent, AgentIdentity, ContainerEngine, ContainerRuntime, ContainerRuntimeConfig,
    FileAgentStore, ProcessRuntime, ProcessRuntimeConfig, RecordingRuntime, WorkloadRuntime, load_or_empty,
};
use kole_core::model::{Labels, NodeInfo, NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};
use kole_core::protocol::NodeHealth;
use kole_examples::{BrokerArgs, LogArgs, TlsArgs};
use kole_mqtt::{BrokerAddr, ConnectionConfig, MqttConnector, NodeConfig, Topics};
use tokio::sync::watch;

/// The kole edge agent: registers with the controller over MQTT, heartbeats, and runs the
/// workloads the controller sends.
///
/// Every flag falls back to its environment variable (a flag wins). The MQTT password comes from
/// `--password-file` or the environment variable KOLE_MQTT_PASSWORD, never from the command line.
#[derive(Debug, Parser)]
#[command(name = "kole-agent", version)]
struct Cli {
    /// The node's name; also its MQTT user name and client id.
    #[arg(long, value_name = "NODE", env = "KOLE_NODE_NAME")]
    name: String,
    /// The node's labels, `key=value,...`.
    #[arg(long, value_name = "K=V,...", env = "KOLE_LABELS")]
    labels: Option<String>,
    /// Directory of the agent's state (created 0700; files in it 0600). The workloads run with it
    /// (its `work/` subdirectory) as their working directory.
    #[arg(long, value_name = "DIR", env = "KOLE_STATE_DIR", default_value = "/var/lib/kole")]
    state_dir: PathBuf,
    /// How workloads run.
    #[arg(long, value_name = "RUNTIME", env = "KOLE_RUNTIME", default_value = "process")]
    runtime: RuntimeKind,
    /// Run process workloads as this user (name or uid from /etc/passwd) instead of the agent's
    /// own; needs an agent running as root [default: the agent's user].
    #[arg(long, value_name = "USER", env = "KOLE_WORKLOAD_USER")]
    workload_user: Option<String>,
    /// The controller's downlink keys to trust (`ed25519:<hex>` per line, `revoked:<key id>` to
    /// refuse one; `kole-controller credentials` writes it). With it, every message from the
    /// controller must be signed by one of them and newer than what the agent accepted before;
    /// refusals are reported in the heartbeat (health flag DownlinkRefused). Without it, messages
    /// are not verified (a warning says so).
    #[arg(long, value_name = "FILE", env = "KOLE_TRUSTED_KEYS")]
    trusted_keys: Option<PathBuf>,
    /// Stop after this many seconds [default: until SIGTERM or Ctrl-C].
    #[arg(long, value_name = "SECS")]
    run_for: Option<u64>,
    #[command(flatten)]
    mqtt: BrokerArgs,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    log: LogArgs,
}

/// The workload runtimes this program ships. Adding one is a variant here and an arm in
/// [`RuntimeKind::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeKind {
    /// Local processes: the spec's `command` in its own process group, logs under the state
    /// directory (see docs/runtime.md).
    Process,
    /// Containers through Podman's CLI (the spec's `image`).
    Podman,
    /// Containers through Docker's CLI.
    Docker,
    /// Containers through nerdctl (containerd).
    Nerdctl,
    /// Containers through the first engine found in PATH: podman, docker, then nerdctl.
    Container,
    /// Nothing runs: workloads are only recorded as running (to try a fleet out).
    Record,
}

impl RuntimeKind {
    fn build(
        self,
        node: &NodeName,
        state_dir: &Path,
        user: Option<(u32, u32)>,
    ) -> anyhow::Result<Box<dyn WorkloadRuntime>> {
        let container = |engine: ContainerEngine| -> anyhow::Result<Box<dyn WorkloadRuntime>> {
            let config = ContainerRuntimeConfig::for_engine(node.clone(), engine, state_dir.join("containers"))
                .with_context(|| format!("--runtime {}: install it, or pick another --runtime", engine.as_str()))?;
            let runtime =
                ContainerRuntime::new(config).with_context(|| format!("starting the {} runtime", engine.as_str()))?;
            Ok(Box::new(runtime))
        };
        Ok(match self {
            Self::Process => {
                let config =
                    ProcessRuntimeConfig { dir: state_dir.join("workloads"), user, ..ProcessRuntimeConfig::default() };
                Box::new(ProcessRuntime::new(config))
            }
            Self::Podman => container(ContainerEngine::Podman)?,
            Self::Docker => container(ContainerEngine::Docker)?,
            Self::Nerdctl => container(ContainerEngine::Nerdctl)?,
            Self::Container => {
                let config = ContainerRuntimeConfig::detect(node.clone(), state_dir.join("containers")).context(
                    "--runtime container: no podman, docker or nerdctl in PATH; install one or pick --runtime process",
                )?;
                Box::new(ContainerRuntime::new(config).context("starting the container runtime")?)
            }
            Self::Record => Box::new(RecordingRuntime::instant()),
        })
    }
}

/// The runtime, with a log line for every workload it starts, stops, or sees change phase (and
/// the reason when one fails): what an operator on the box reads in `journalctl -u kole-agent`.
struct Logged(Box<dyn WorkloadRuntime>);

impl Logged {
    fn log_phase(&self, node: &NodeName, id: &WorkloadId, version: Option<u64>, phase: WorkloadPhase) {
        if phase == WorkloadPhase::Failed {
            let reason = self.0.failure_reason(node, id).unwrap_or_else(|| "no reason given".into());
            tracing::warn!(workload = %id, version, %reason, "workload failed");
        } else {
            tracing::info!(workload = %id, version, phase = ?phase, "workload phase");
        }
    }
}

impl WorkloadRuntime for Logged {
    fn apply(&mut self, node: &NodeName, workload: &Arc<Workload>, now: Timestamp) -> WorkloadPhase {
        let phase = self.0.apply(node, workload, now);
        self.log_phase(node, &workload.id, Some(workload.version), phase);
        phase
    }

    fn remove(&mut self, node: &NodeName, id: &WorkloadId, now: Timestamp) {
        self.0.remove(node, id, now);
        tracing::info!(workload = %id, "workload removed");
    }

    fn restart(&mut self, node: &NodeName, id: &WorkloadId, now: Timestamp) -> Option<WorkloadPhase> {
        let phase = self.0.restart(node, id, now);
        tracing::info!(workload = %id, phase = ?phase, "workload restarted on request");
        phase
    }

    fn poll(&mut self, node: &NodeName, now: Timestamp, changes: &mut Vec<(WorkloadId, WorkloadPhase)>) {
        let from = changes.len();
        self.0.poll(node, now, changes);
        for (id, phase) in &changes[from..] {
            self.log_phase(node, id, None, *phase);
        }
    }

    fn failure_reason(&self, node: &NodeName, id: &WorkloadId) -> Option<String> {
        self.0.failure_reason(node, id)
    }

    fn health(&self, node: &NodeName) -> NodeHealth {
        self.0.health(node)
    }
}

/// The uid and gid of a user named in `/etc/passwd` (name or numeric uid).
fn lookup_user(user: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd for --workload-user")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && (fields[0] == user || fields[2] == user) {
            let uid = fields[2].parse().with_context(|| format!("/etc/passwd: bad uid for {user}"))?;
            let gid = fields[3].parse().with_context(|| format!("/etc/passwd: bad gid for {user}"))?;
            return Ok((uid, gid));
        }
    }
    anyhow::bail!("--workload-user {user:?} is not in /etc/passwd (create it, e.g. `useradd --system kole-workload`)")
}

/// `key=value,...` into labels, with an error naming the bad pair.
fn parse_labels(list: Option<&str>) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for pair in list.unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').with_context(|| format!("--labels: {pair:?} is not key=value"))?;
        labels.insert(k.trim(), v.trim()).with_context(|| format!("--labels: {pair:?}"))?;
    }
    Ok(labels)
}

/// Creates the state directory (0700) and its `work/` subdirectory, and sets the process umask to
/// 0077 so every file the agent writes there is 0600.
fn prepare_state_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let work = dir.join("work");
    std::fs::create_dir_all(&work).with_context(|| {
        format!("creating the state directory {} (--state-dir; it must be writable by this user)", dir.display())
    })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making the state directory {} private (0700)", dir.display()))?;
    Ok(work)
}

/// Errors are logged once, with their causes, and give exit status 1.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.log.init() {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let name = NodeName::new(cli.name.as_str()).with_context(|| format!("--name {:?} is not a node name", cli.name))?;
    let labels = parse_labels(cli.labels.as_deref())?;
    let brokers = cli.mqtt.brokers_or(BrokerAddr::tcp("127.0.0.1", 1883));
    let password = cli.mqtt.password()?;
    if password.is_none() {
        tracing::warn!(
            "no MQTT password (--password-file or KOLE_MQTT_PASSWORD): only an open broker accepts this agent"
        );
    }
    let tls = cli.tls.settings(&brokers)?;
    let work = prepare_state_dir(&cli.state_dir)?;
    // Workloads inherit the working directory: their relative paths land in the state directory.
    std::env::set_current_dir(&work).with_context(|| format!("entering {}", work.display()))?;
    let state = cli.state_dir.join("desired.state");

    let store = FileAgentStore::new(&state);
    let (persisted, load_error) = load_or_empty(&store);
    if let Some(e) = load_error {
        tracing::warn!(error = %e, path = %state.display(), "ignoring the saved desired state");
    }
    let info = NodeInfo {
        arch: kole_examples::go_arch().into(),
        os: std::env::consts::OS.into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        addresses: Vec::new(),
    };
    let identity = AgentIdentity { name: name.clone(), labels: Arc::new(labels), info: Arc::new(info) };
    // A new boot id per start: the controller tells a restart from a duplicate by it.
    let boot_id = (kole_core::clock::wall_clock_now().as_millis() as u32) ^ std::process::id().rotate_left(16);
    let trust = match &cli.trusted_keys {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the trusted keys {} (--trusted-keys)", path.display()))?;
            let keys = kole_core::protocol::seal::TrustedKeys::from_text(&text)
                .map_err(|e| anyhow::anyhow!("{} (--trusted-keys): {e}", path.display()))?;
            if keys.is_empty() {
                anyhow::bail!("{} (--trusted-keys) trusts no key: every message would be refused", path.display());
            }
            let ids: Vec<String> = keys.key_ids().iter().map(ToString::to_string).collect();
            tracing::info!(keys = %ids.join(","), "verifying the downlink");
            Some(Arc::new(keys))
        }
        None => {
            tracing::warn!(
                "no --trusted-keys: messages from the controller are not verified, so whoever can \
                 publish on this node's topics controls it"
            );
            None
        }
    };
    let config = AgentConfig { trust, ..AgentConfig::default() };
    let mut agent = Agent::new(config, identity, boot_id, persisted);
    let connection = ConnectionConfig { tls, ..ConnectionConfig::default() };
    let connector = MqttConnector::new(
        Topics::new(&cli.mqtt.fleet)?,
        name.clone(),
        NodeConfig { brokers: brokers.clone(), password, connection, ..NodeConfig::default() },
    )?;
    let user = cli.workload_user.as_deref().map(lookup_user).transpose()?;
    if user.is_some() && cli.runtime != RuntimeKind::Process {
        anyhow::bail!("--workload-user applies to --runtime process only (containers run as their image says)");
    }
    let mut runtime = Logged(cli.runtime.build(&name, &cli.state_dir, user)?);
    let list: Vec<String> = brokers.iter().map(ToString::to_string).collect();
    tracing::info!(
        node = %name, fleet = %cli.mqtt.fleet, brokers = %list.join(","), runtime = ?cli.runtime,
        state_dir = %cli.state_dir.display(), "agent starting"
    );

    let (stop, shutdown) = watch::channel(false);
    let run_for = cli.run_for;
    let stopper = tokio::spawn(async move {
        match run_for {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => match kole_examples::termination_signal().await {
                Ok(sig) => tracing::info!(signal = sig, "stopping"),
                Err(e) => tracing::error!("{e:#}"),
            },
        }
        let _ = stop.send(true);
    });
    let mut log = EventLog::default();
    let mut observe = |e: &AgentEvent| {
        log.event(e, std::time::Instant::now());
    };
    let config = AgentDriverConfig::default();
    let stats = run_agent_observed(&mut agent, &connector, &mut runtime, &store, &config, shutdown, &mut observe).await;
    stopper.abort();
    let running: Vec<String> =
        agent.workloads().map(|(w, phase)| format!("{} v{} {phase:?}", w.id, w.version)).collect();
    tracing::info!(node = %name, stats = ?stats, workloads = %running.join(", "), "agent stopped");
    Ok(())
}

/// Logs what the agent refused or ignored as it happens. A refusal (unsigned, forged, replayed) can
/// be an attack and is a warning; a flood of them is summarised, at most one line a second, so a
/// vandal publishing in a loop cannot fill the box's journal.
#[derive(Default)]
struct EventLog {
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl EventLog {
    const EVERY: Duration = Duration::from_secs(1);

    fn event(&mut self, e: &AgentEvent, now: std::time::Instant) -> bool {
        match e {
            AgentEvent::Refused { reason, detail } => {
                if self.last.is_some_and(|at| now.duration_since(at) < Self::EVERY) {
                    self.suppressed += 1;
                    return false;
                }
                self.last = Some(now);
                let earlier = std::mem::take(&mut self.suppressed);
                tracing::warn!(
                    reason,
                    detail = %detail,
                    suppressed_since_last = earlier,
                    "refused a message from the broker (not signed by a trusted key, or replayed): \
                     nothing changed; if this repeats, someone other than the controller publishes \
                     to this node"
                );
                true
            }
            AgentEvent::Ignored { reason } => {
                tracing::debug!(reason, "ignored a message");
                false
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kole-agent").chain(line.split_whitespace()))
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The command lines of this file's docs, the README, `docs/agent.md`, `docs/mqtt.md` and
    /// `examples/mqtt_try.sh`.
    #[test]
    fn documented_command_lines_parse() {
        for line in [
            "--name edge-1 --labels tier=edge,site=lab --broker mqtts://broker.example:8883 --tls-ca /etc/kole/ca.crt --password-file /etc/kole/password",
            "--name edge-1 --labels tier=cdn --broker mqtt://127.0.0.1:1884 --runtime record --state-dir /tmp/e",
            "--name edge-1 --password-file p --fleet prod --run-for 5 --log-format json --log-level debug",
        ] {
            if let Err(e) = parse(line) {
                panic!("{line}: {e}");
            }
        }
        let cli = parse("--name edge-1 --run-for 5").unwrap();
        assert_eq!((cli.run_for, cli.runtime), (Some(5), RuntimeKind::Process));
        assert_eq!(cli.state_dir, PathBuf::from("/var/lib/kole"));
    }

    #[test]
    fn refuses_a_missing_name_unknown_flags_and_bad_values() {
        assert!(parse("--run-for 1").is_err(), "--name is required");
        assert!(parse("--name n --typo 1").is_err());
        assert!(parse("--name n --run-for").is_err());
        assert!(parse("--name n --runtime kvm").is_err());
        assert!(parse("--name n --password secret").is_err(), "no password on the command line");
    }

    #[test]
    fn labels_parse_and_bad_pairs_are_named() {
        let l = parse_labels(Some("tier=edge, site=lab-1,")).unwrap();
        assert_eq!(l.len(), 2);
        let err = parse_labels(Some("tier=edge,oops")).unwrap_err().to_string();
        assert!(err.contains("\"oops\""), "{err}");
    }

    #[test]
    fn the_state_dir_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("kole-agent-state-{}", std::process::id()));
        let work = prepare_state_dir(&dir).unwrap();
        assert!(work.is_dir());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::write(dir.join("f"), b"x").unwrap();
        assert_eq!(std::fs::metadata(dir.join("f")).unwrap().permissions().mode() & 0o777, 0o600, "umask 0077");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A flood of refusals gives one warning a second, the next one counting what it left out.
    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let mut log = EventLog::default();
        let refused = AgentEvent::Refused { reason: "unsigned", detail: "x".into() };
        let t0 = std::time::Instant::now();
        let logged: Vec<bool> = (0..10).map(|i| log.event(&refused, t0 + Duration::from_millis(i * 150))).collect();
        // 0 ms, then the first at or after 1 s (1050 ms); the rest are counted.
        assert_eq!(logged.iter().filter(|l| **l).count(), 2, "{logged:?}");
        assert!(logged[0] && logged[7], "{logged:?}");
        assert_eq!(log.suppressed, 2, "the two after the second line");
        assert!(!log.event(&AgentEvent::Ignored { reason: "stale_ack" }, t0 + Duration::from_secs(9)));
    }
}
