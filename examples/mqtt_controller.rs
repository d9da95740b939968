//! A kole controller over MQTT, as its own process: the engine behind [`MqttCloud`], restored from
//! and snapshotted to a directory, with one workload applied, printing what the driver reports.
//!
//! ```text
//! # zero setup: an embedded broker in this process (its address is printed)
//! cargo run -p kole-examples --example mqtt_controller -- --embedded-broker --snapshots /tmp/kole-ctl
//! # against a broker set, with credentials
//! KOLE_MQTT_PASSWORD=secret cargo run -p kole-examples --example mqtt_controller -- \
//!     --broker mqtt://10.0.0.1:1883 --broker mqtt://10.0.0.2:1883 --fleet prod --user kole-controller \
//!     --snapshots /var/lib/kole/snapshots --workload ./exporter.spec --workload-id edge/exporter --selector 'tier=edge'
//! ```
//!
//! Options: `--broker URL` (repeatable; default `mqtt://127.0.0.1:1883`), `--embedded-broker`,
//! `--fleet NAME` (default `default`), `--user NAME` and `--password P` (or env
//! `KOLE_MQTT_PASSWORD`), `--snapshots DIR` (default a directory under the temp dir),
//! `--workload FILE` (a process spec, see `ProcessRuntime`; default a built-in `sleep`),
//! `--workload-id NS/NAME` (default `demo/sleeper`), `--selector EXPR` (default every node),
//! `--version N` (default 1), `--apply-after SECS` (default 3: the demo shows a rollout to the
//! nodes that registered by then; later nodes get the spec too), `--run-for SECS` (default: until
//! Ctrl-C).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kole_core::cache::StateCache;
use kole_core::engine::driver::{DriverConfig, DriverEvent, EngineDriver, restore_engine, system_clock};
use kole_core::engine::{EngineConfig, WorkloadCommand};
use kole_core::model::{RolloutStrategy, Selector, Workload, WorkloadId};
use kole_core::snapshot::{DirSnapshotStore, RestoreLimits};
use kole_examples::Flags;
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig, Credentials, EmbeddedBroker, MqttCloud};
use tokio::sync::{mpsc, watch};

const SWITCHES: &[&str] = &["embedded-broker"];
const OPTIONS: &[&str] = &[
    "broker",
    "fleet",
    "user",
    "password",
    "snapshots",
    "workload",
    "workload-id",
    "selector",
    "version",
    "apply-after",
    "run-for",
];

/// The built-in demo workload: a process every agent can run.
const DEMO_SPEC: &str = "sleep 3600\nrestart=always\n";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flags = Flags::parse(std::env::args().skip(1), SWITCHES, OPTIONS)?;
    let mut brokers = flags.all("broker").iter().map(|b| b.parse::<BrokerAddr>()).collect::<Result<Vec<_>, _>>()?;
    let embedded = if flags.switch("embedded-broker") {
        let broker = EmbeddedBroker::start(Default::default()).await?;
        println!("embedded broker listening on {}", broker.broker_addr());
        brokers = vec![broker.broker_addr()];
        Some(broker)
    } else {
        None
    };
    if brokers.is_empty() {
        brokers.push(BrokerAddr::tcp("127.0.0.1", 1883));
    }
    let fleet: String = flags.get("fleet")?.unwrap_or_else(|| "default".into());
    let password = flags.get::<String>("password")?.or_else(|| std::env::var("KOLE_MQTT_PASSWORD").ok());
    let credentials = match (flags.get::<String>("user")?, password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (Some(username), None) => Some(Credentials { username, password: String::new() }),
        (None, _) => None,
    };
    let snapshots: PathBuf =
        flags.get("snapshots")?.unwrap_or_else(|| std::env::temp_dir().join(format!("kole-controller-{fleet}")));
    let spec = match flags.get::<PathBuf>("workload")? {
        Some(path) => std::fs::read(&path).map_err(|e| format!("reading the workload spec {}: {e}", path.display()))?,
        None => DEMO_SPEC.as_bytes().to_vec(),
    };
    let workload = Workload {
        id: WorkloadId::new(flags.get::<String>("workload-id")?.unwrap_or_else(|| "demo/sleeper".into()))?,
        version: flags.get("version")?.unwrap_or(1),
        spec,
        selector: match flags.get::<String>("selector")? {
            Some(s) => Selector::parse(&s)?,
            None => Selector::everything(),
        },
        delivery: Default::default(),
        rollout: RolloutStrategy::default(),
    };
    let run_for: Option<u64> = flags.get("run-for")?;
    let apply_after: u64 = flags.get("apply-after")?.unwrap_or(3);

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
    let driver = EngineDriver::new(DriverConfig::default(), engine, Arc::new(cloud), Some(store), clock, events_tx);
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
    }
}
