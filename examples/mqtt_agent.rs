//! A kole edge agent over MQTT, as its own process: [`run_agent`] over an [`MqttConnector`], running
//! workloads as local processes ([`ProcessRuntime`]) or, with `--dry-run`, only recording them,
//! and keeping its desired state in a file so it restarts autonomously.
//!
//! ```text
//! cargo run -p kole-examples --example mqtt_agent -- --name edge-1 --labels tier=edge,site=lab \
//!     --broker mqtt://127.0.0.1:1883 --dry-run
//! ```
//!
//! Options (`--help` lists them): `--name NODE` (required; also the MQTT user name and client id),
//! `--labels k=v,...`, `--broker URL` (repeatable or a comma-separated list, the same list in the
//! same order as the controller's; env `KOLE_MQTT_BROKERS`; default `mqtt://127.0.0.1:1883`),
//! `--fleet NAME` (env `KOLE_FLEET`; default `default`), `--mqtt-password P` or `--password P` (env
//! `KOLE_MQTT_PASSWORD`), `--state FILE` (default `kole-agent-{name}.state` in the temp dir),
//! `--dry-run`, `--run-for SECS` (default: until Ctrl-C).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kole_core::agent::driver::{AgentDriverConfig, run_agent};
use kole_core::agent::{
    Agent, AgentConfig, AgentIdentity, FileAgentStore, ProcessRuntime, RecordingRuntime, WorkloadRuntime, load_or_empty,
};
use kole_core::model::{Labels, NodeInfo, NodeName};
use kole_examples::BrokerArgs;
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, MqttConnector, NodeConfig};
use tokio::sync::watch;

/// A kole edge agent over MQTT: registers, heartbeats, runs the workloads the controller sends.
#[derive(Debug, Parser)]
#[command(name = "mqtt_agent")]
struct Cli {
    /// The node's name; also its MQTT user name and client id.
    #[arg(long, value_name = "NODE")]
    name: String,
    /// The node's labels, `key=value,...`.
    #[arg(long, value_name = "K=V,...")]
    labels: Option<String>,
    /// File the desired state is kept in [default: `kole-agent-{name}.state` in the temp dir].
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
    /// Only record the workloads instead of running them as processes.
    #[arg(long)]
    dry_run: bool,
    /// Stop after this many seconds [default: until Ctrl-C].
    #[arg(long, value_name = "SECS")]
    run_for: Option<u64>,
    #[command(flatten)]
    mqtt: BrokerArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let name = NodeName::new(cli.name)?;
    let mut labels = Labels::new();
    if let Some(list) = &cli.labels {
        for pair in list.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("--labels: {pair:?} is not key=value"))?;
            labels.insert(k.trim(), v.trim())?;
        }
    }
    let brokers = cli.mqtt.brokers_or(BrokerAddr::tcp("127.0.0.1", 1883));
    let fleet = cli.mqtt.fleet;
    let password = cli.mqtt.mqtt_password;
    let state: PathBuf = cli.state.unwrap_or_else(|| std::env::temp_dir().join(format!("kole-agent-{name}.state")));
    let run_for = cli.run_for;

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
    let boot_id = (kole_core::clock::wall_clock_now().as_millis() as u32) ^ std::process::id().rotate_left(16);
    let mut agent = Agent::new(AgentConfig::default(), identity, boot_id, persisted);
    let connector = MqttConnector::new(
        Topics::new(&fleet)?,
        name.clone(),
        NodeConfig { brokers: brokers.clone(), password, ..NodeConfig::default() },
    )?;
    let mut runtime: Box<dyn WorkloadRuntime> =
        if cli.dry_run { Box::new(RecordingRuntime::instant()) } else { Box::new(ProcessRuntime::default()) };
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
    let stats =
        run_agent(&mut agent, &connector, runtime.as_mut(), &store, &AgentDriverConfig::default(), shutdown).await;
    stopper.abort();
    let running: Vec<String> =
        agent.workloads().map(|(w, phase)| format!("{} v{} {phase:?}", w.id, w.version)).collect();
    println!("{name}: stopped after {stats:?}; workloads: [{}]", running.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mqtt_agent").chain(line.split_whitespace()))
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The command lines of this file's docs, the README, `docs/mqtt.md` and `examples/mqtt_try.sh`.
    #[test]
    fn documented_command_lines_parse() {
        for line in [
            "--name edge-1 --labels tier=edge,site=lab --broker mqtt://127.0.0.1:1883 --dry-run",
            "--name edge-1 --labels tier=cdn --broker mqtt://127.0.0.1:1884 --dry-run",
            "--name edge-1 --labels tier=edge,site=lab-1 --broker mqtt://127.0.0.1:1884 --dry-run --state /tmp/e.state",
            "--name edge-1 --password p --fleet prod --run-for 5",
        ] {
            if let Err(e) = parse(line) {
                panic!("{line}: {e}");
            }
        }
        let cli = parse("--name edge-1 --dry-run --run-for 5 --state /tmp/s").unwrap();
        assert!(cli.dry_run);
        assert_eq!((cli.run_for, cli.state), (Some(5), Some(PathBuf::from("/tmp/s"))));
    }

    #[test]
    fn refuses_a_missing_name_unknown_flags_and_missing_values() {
        assert!(parse("--dry-run").is_err(), "--name is required");
        assert!(parse("--name n --typo 1").is_err());
        assert!(parse("--name n --run-for").is_err());
        assert!(parse("--name n --run-for soon").is_err());
    }
}
