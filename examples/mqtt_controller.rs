//! A kole controller over MQTT, as its own process: the engine behind [`MqttCloud`], restored from
//! and snapshotted to a directory, with one workload applied, printing what the driver reports.
//!
//! ```text
//! # zero setup: an embedded broker in this process (its address is printed)
//! cargo run -p kole-examples --example mqtt_controller -- --embedded-broker --snapshots /tmp/kole-ctl
//! # against a broker set, with credentials
//! KOLE_MQTT_PASSWORD=secret cargo run -p kole-examples --example mqtt_controller -- \
//!     --broker mqtt://10.0.0.1:1883 --broker mqtt://10.0.0.2:1883 --fleet prod --user kole-controller \
//!     --snapshots /var/lib/kole/snapshots --run /usr/local/bin/exporter --workload-id edge/exporter --selector 'tier=edge'
//! ```
//!
//! Options (`--help` lists them): `--broker URL` (repeatable or a comma-separated list; env
//! `KOLE_MQTT_BROKERS`; default `mqtt://127.0.0.1:1883`), `--embedded-broker`, `--fleet NAME` (env
//! `KOLE_FLEET`; default `default`), `--mqtt-user NAME` or `--user NAME` (env `KOLE_MQTT_USER`) and
//! `--mqtt-password-file FILE` or `--password-file FILE` (else env `KOLE_MQTT_PASSWORD`), `--snapshots DIR` (default a
//! directory under the temp dir), `--run 'PROGRAM ARGS'` (the process
//! every agent runs, words split on whitespace; default `sleep 3600`), `--workload-id NS/NAME` (default `demo/sleeper`), `--selector EXPR`
//! (default every node), `--version N` (default 1), `--apply-after SECS` (default 3: the demo
//! shows a rollout to the nodes that registered by then; later nodes get the spec too),
//! `--run-for SECS` (default: until Ctrl-C).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kole_core::cache::StateCache;
use kole_core::engine::driver::{DriverEvent, EngineDriver, EngineDriverConfig, restore_engine, system_clock};
use kole_core::engine::{EngineConfig, WorkloadCommand};
use kole_core::model::{RolloutStrategy, Selector, Workload, WorkloadId};
use kole_core::runspec::RunSpec;
use kole_core::snapshot::{DirSnapshotStore, RestoreLimits};
use kole_examples::{BrokerArgs, ControllerLoginArgs};
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig, Credentials, EmbeddedBroker, MqttCloud};
use tokio::sync::{mpsc, watch};

/// A kole controller over MQTT: the engine, a directory snapshot store, one workload applied.
// No `#[command(version)]`: `--version` is the workload's version here.
#[derive(Debug, Parser)]
#[command(name = "mqtt_controller")]
struct Cli {
    /// Start an MQTT broker in this process (its address is printed) instead of using `--broker`.
    #[arg(long)]
    embedded_broker: bool,
    /// Directory of the snapshot store [default: `kole-controller-{fleet}` in the temp dir].
    #[arg(long, value_name = "DIR")]
    snapshots: Option<PathBuf>,
    /// The process every targeted agent runs: program and arguments, split on whitespace (no
    /// quoting; for more, apply an EdgeWorkload through kole-controller).
    #[arg(long, value_name = "COMMAND", default_value = "sleep 3600")]
    run: String,
    /// The workload's id.
    #[arg(long, value_name = "NS/NAME", default_value = "demo/sleeper")]
    workload_id: String,
    /// Which nodes run the workload, a label selector [default: every node].
    #[arg(long, value_name = "EXPR")]
    selector: Option<String>,
    /// The workload's version.
    #[arg(long, value_name = "N", default_value_t = 1)]
    version: u64,
    /// Apply the workload this many seconds after the start: the demo shows a rollout to the nodes
    /// registered by then (later nodes get the spec too).
    #[arg(long, value_name = "SECS", default_value_t = 3)]
    apply_after: u64,
    /// Stop after this many seconds [default: until Ctrl-C].
    #[arg(long, value_name = "SECS")]
    run_for: Option<u64>,
    #[command(flatten)]
    mqtt: BrokerArgs,
    #[command(flatten)]
    login: ControllerLoginArgs,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    let mut brokers = cli.mqtt.brokers_or(BrokerAddr::tcp("127.0.0.1", 1883));
    let embedded = if cli.embedded_broker {
        let broker = EmbeddedBroker::start(Default::default()).await?;
        println!("embedded broker listening on {}", broker.broker_addr());
        brokers = vec![broker.broker_addr()];
        Some(broker)
    } else {
        None
    };
    let fleet = cli.mqtt.fleet.clone();
    let password = cli.mqtt.password().map_err(|e| format!("{e:#}"))?;
    let credentials = match (cli.login.mqtt_user, password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (Some(username), None) => Some(Credentials { username, password: String::new() }),
        (None, _) => None,
    };
    let snapshots: PathBuf =
        cli.snapshots.unwrap_or_else(|| std::env::temp_dir().join(format!("kole-controller-{fleet}")));
    let spec = RunSpec::process(cli.run.split_whitespace()).encode().map_err(|e| format!("--run: {e}"))?;
    let workload = Workload {
        id: WorkloadId::new(cli.workload_id)?,
        version: cli.version,
        spec,
        selector: match cli.selector {
            Some(s) => Selector::parse(&s)?,
            None => Selector::everything(),
        },
        delivery: Default::default(),
        rollout: RolloutStrategy::default(),
    };
    let run_for = cli.run_for;
    let apply_after = cli.apply_after;

    let topics = Topics::new(&fleet)?;
    let list: Vec<String> = brokers.iter().map(ToString::to_string).collect();
    let cloud = MqttCloud::connect(topics, CloudConfig { brokers, credentials, ..CloudConfig::default() }).await?;
    println!("connected to {} (fleet {fleet})", list.join(", "));

    let store = Arc::new(DirSnapshotStore::open(&snapshots)?);
    let clock = system_clock();
    let (engine, manifest, faults) =
        restore_engine(EngineConfig::default(), store.as_ref(), &RestoreLimits::default(), clock()).await?;
    for f in &faults {
        println!("snapshot skipped: {f}");
    }
    match manifest {
        Some(m) => {
            println!("restored generation {} from {}: {} nodes", m.generation, snapshots.display(), m.node_count)
        }
        None => println!("no snapshot in {}: starting empty", snapshots.display()),
    }

    let (events_tx, mut events) = mpsc::channel(1024);
    let driver =
        EngineDriver::new(EngineDriverConfig::default(), engine, Arc::new(cloud), Some(store), clock, events_tx);
    let (commands, commands_rx) = mpsc::channel(16);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(driver.run(commands_rx, stop_rx));
    let apply = tokio::time::sleep(Duration::from_secs(apply_after));
    tokio::pin!(apply);
    let mut pending = Some(workload);
    let deadline = tokio::time::sleep(Duration::from_secs(run_for.unwrap_or(u64::MAX / 4)));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => print_event(&ev),
                None => break,
            },
            r = tokio::signal::ctrl_c() => { r?; break; }
            () = &mut deadline => break,
            () = &mut apply, if pending.is_some() => if let Some(workload) = pending.take() {
                println!("applying {} v{} ({} bytes of spec)", workload.id, workload.version, workload.spec.len());
                commands.send(WorkloadCommand::Apply { workload, progress: None }).await?;
            },
        }
    }
    println!("shutting down (final snapshot)");
    let _ = stop.send(true);
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(Ok(engine))) => println!("stopped: {} nodes known", engine.store().read().len()),
        Ok(Ok(Err(e))) => println!("driver stopped: {e}"),
        Ok(Err(e)) => println!("driver task failed: {e}"),
        Err(_) => println!("driver did not stop within 30 s"),
    }
    while let Ok(ev) = events.try_recv() {
        print_event(&ev);
    }
    if let Some(broker) = embedded {
        broker.shutdown().await;
    }
    Ok(())
}

fn print_event(ev: &DriverEvent) {
    match ev {
        DriverEvent::Status(s) => println!(
            "status {} v{}: targeted {} updated {} ready {} failed {} wave {}/{} {:?}",
            s.id, s.version, s.targeted, s.updated, s.ready, s.failed, s.wave, s.waves, s.phase
        ),
        DriverEvent::Engine(e) => println!("event {e:?}"),
        DriverEvent::Reject(r) => println!("rejected from {}: {} ({})", r.node, r.reason, r.detail),
        DriverEvent::SnapshotWritten(m) => {
            println!("snapshot generation {}: {} nodes, {} bytes", m.generation, m.node_count, m.total_bytes)
        }
        DriverEvent::SnapshotFailed(e) => println!("snapshot failed: {e}"),
        DriverEvent::SendFailed(e) => println!("send failed: {e}"),
        other => println!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mqtt_controller").chain(line.split_whitespace()))
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The command lines of this file's docs, the README, `docs/mqtt.md` and `examples/mqtt_try.sh`.
    #[test]
    fn documented_command_lines_parse() {
        for line in [
            "--embedded-broker",
            "--embedded-broker --snapshots /tmp/kole-ctl",
            "--broker mqtt://10.0.0.1:1883 --broker mqtt://10.0.0.2:1883 --fleet prod --user kole-controller \
             --snapshots /var/lib/kole/snapshots --run /usr/local/bin/exporter --workload-id edge/exporter --selector tier=edge",
        ] {
            if let Err(e) = parse(line) {
                panic!("{line}: {e}");
            }
        }
        let cli = parse("--broker a:1,b:2 --user u --version 7 --apply-after 0 --run-for 9").unwrap();
        assert_eq!(cli.mqtt.brokers().len(), 2);
        assert_eq!(cli.login.mqtt_user.as_deref(), Some("u"));
        assert_eq!((cli.version, cli.apply_after, cli.run_for), (7, 0, Some(9)));
    }

    #[test]
    fn refuses_unknown_flags_and_missing_values() {
        assert!(parse("--typo").is_err());
        assert!(parse("--version").is_err(), "--version is the workload's version and takes a value");
        assert!(parse("--apply-after soon").is_err());
    }
}
