//! A kole edge agent over MQTT, as its own process: [`run_agent`] over an [`MqttConnector`], running
//! workloads as local processes ([`ProcessRuntime`]) or, with `--dry-run`, only recording them,
//! and keeping its desired state in a file so it restarts autonomously.
//!
//! ```text
//! cargo run -p kole-examples --example mqtt_agent -- --name edge-1 --labels tier=edge,site=lab \
//!     --broker mqtt://127.0.0.1:1883 --dry-run
//! ```
//!
//! Options: `--name NODE` (required; also the MQTT user name and client id), `--labels k=v,...`,
//! `--broker URL` (repeatable, the same list in the same order as the controller's; default
//! `mqtt://127.0.0.1:1883`), `--fleet NAME` (default `default`), `--password P` (or env
//! `KOLE_MQTT_PASSWORD`), `--state FILE` (default `kole-agent-{name}.state` in the temp dir),
//! `--dry-run`, `--run-for SECS` (default: until Ctrl-C).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kole_core::agent::driver::{DriverConfig, run_agent};
use kole_core::agent::{
    Agent, AgentConfig, AgentIdentity, FileAgentStore, ProcessRuntime, RecordingRuntime, WorkloadRuntime, load_or_empty,
};
use kole_core::model::{Labels, NodeInfo, NodeName};
use kole_examples::Flags;
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, MqttConnector, NodeConfig};
use tokio::sync::watch;

const SWITCHES: &[&str] = &["dry-run"];
const OPTIONS: &[&str] = &["name", "labels", "broker", "fleet", "password", "state", "run-for"];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flags = Flags::parse(std::env::args().skip(1), SWITCHES, OPTIONS)?;
    let name = NodeName::new(flags.get::<String>("name")?.ok_or("--name NODE is required")?)?;
    let mut labels = Labels::new();
    if let Some(list) = flags.get::<String>("labels")? {
        for pair in list.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("--labels: {pair:?} is not key=value"))?;
            labels.insert(k.trim(), v.trim())?;
        }
    }
    let mut brokers = flags.all("broker").iter().map(|b| b.parse::<BrokerAddr>()).collect::<Result<Vec<_>, _>>()?;
    if brokers.is_empty() {
        brokers.push(BrokerAddr::tcp("127.0.0.1", 1883));
    }
    let fleet: String = flags.get("fleet")?.unwrap_or_else(|| "default".into());
    let password = flags.get::<String>("password")?.or_else(|| std::env::var("KOLE_MQTT_PASSWORD").ok());
    let state: PathBuf =
        flags.get("state")?.unwrap_or_else(|| std::env::temp_dir().join(format!("kole-agent-{name}.state")));
    let run_for: Option<u64> = flags.get("run-for")?;

    let store = FileAgentStore::new(&state);
    let (persisted, load_error) = load_or_empty(&store);
    if let Some(e) = load_error {
        println!("{name}: ignoring the saved state in {}: {e}", state.display());
    }
    let info = NodeInfo {
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        addresses: Vec::new(),
    };
    let identity = AgentIdentity { name: name.clone(), labels: Arc::new(labels), info: Arc::new(info) };
    // A new boot id per start: the controller tells a restart from a duplicate by it.
    let boot_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() ^ std::process::id().rotate_left(16));
    let mut agent = Agent::new(AgentConfig::default(), identity, boot_id, persisted);
    let connector = MqttConnector::new(
        Topics::new(&fleet)?,
        name.clone(),
        NodeConfig { brokers: brokers.clone(), password, ..NodeConfig::default() },
    )?;
    let mut runtime: Box<dyn WorkloadRuntime> = if flags.switch("dry-run") {
        Box::new(RecordingRuntime::instant())
    } else {
        Box::new(ProcessRuntime::default())
    };
    let list: Vec<String> = brokers.iter().map(ToString::to_string).collect();
    println!("{name}: agent of fleet {fleet} on {} (state in {})", list.join(", "), state.display());

    let (stop, shutdown) = watch::channel(false);
    let stopper = tokio::spawn(async move {
        match run_for {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let _ = stop.send(true);
    });
    let stats = run_agent(&mut agent, &connector, runtime.as_mut(), &store, &DriverConfig::default(), shutdown).await;
    stopper.abort();
    let running: Vec<String> =
        agent.workloads().map(|(w, phase)| format!("{} v{} {phase:?}", w.id, w.version)).collect();
    println!("{name}: stopped after {stats:?}; workloads: [{}]", running.join(", "));
    Ok(())
}
