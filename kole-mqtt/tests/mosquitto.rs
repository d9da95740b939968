//! Interop with Debian's Mosquitto, with per-node credentials and the shipped ACL
//! (`deploy/mqtt/mosquitto.acl`, fleet `default`). Start it with `.ci/mosquitto.sh start`, which
//! prints `KOLE_TEST_MOSQUITTO=127.0.0.1:PORT`, `KOLE_TEST_MOSQUITTO_CREDENTIALS=FILE`
//! (`user:password` lines) and `KOLE_TEST_MOSQUITTO_DIR` (its state directory, holding the
//! `passwd` and `acl` files); then
//! `cargo test -p kole-mqtt --test mosquitto -- --include-ignored --test-threads=1`.
//!
//! What runs here, all against Mosquitto:
//! - round trips (register, heartbeat, deliver, roll out v1 then v2) of five agents;
//! - wrong credentials are refused; the ACL confines a node to its own topics;
//! - impersonation: node A publishing on B's uplink is dropped by the broker and leaves B's state
//!   as it was; A claiming B's identity on its own topic is rejected by the controller;
//! - garbage and oversize payloads on a node's own uplink are counted, change nothing else, and a
//!   packet over the broker's `message_size_limit` never reaches (or disconnects) the controller;
//! - a broker killed mid-rollout (SIGTERM with persistence, SIGKILL without) and restarted on the
//!   same port: controller and agents reconnect and converge. These two start a *private* Mosquitto
//!   of their own (same `passwd` and `acl`, a free port), killed by a drop guard;
//! - a controller restart from its shutdown snapshot converges without resending anything;
//! - the shipped `deploy/mqtt/mosquitto.conf` (its own ports and paths), attacked: a node cannot
//!   take over the controller's or another node's client id there (and can without its
//!   `use_username_as_clientid`, the control);
//! - with the `tls` feature (`cargo test -p kole-mqtt --features tls --test mosquitto …`): the
//!   same round trip over Mosquitto's TLS listener (`KOLE_TEST_MOSQUITTO_TLS`, a throw-away CA in
//!   `KOLE_TEST_MOSQUITTO_CA`), and a client that does not trust that CA is refused.
//!
//! The tests share one broker, one fleet and its fixed node credentials: run them one at a time
//! (`-- --include-ignored --test-threads=1`), as `.ci/run` does. Each test uses a workload id of
//! its own, so retained specs left by another test do not matter.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{AgentHandle, Controller, bounded, restart_after_convergence, workload};
use kole_core::cache::StateCache as _;
use kole_core::engine::{RolloutPhase, WorkloadCommand};
use kole_core::model::{DesiredDigest, Labels, NodeInfo, NodeName, NodeRecord, wave_point};
use kole_core::protocol::{self, Heartbeat, Message, NodeHealth, Register, RegisterOutcome, UplinkKind};
use kole_core::snapshot::MemorySnapshotStore;
use kole_core::transport::{NodePublish, NodeTransport};
use kole_mqtt::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig, Credentials, MqttNode, NodeConfig};

struct Mosquitto {
    addr: BrokerAddr,
    passwords: HashMap<String, String>,
}

/// The shared broker's credentials, pointed at another broker (a private one) with the same
/// password file.
fn at(mq: &Mosquitto, addr: BrokerAddr) -> Mosquitto {
    Mosquitto { addr, passwords: mq.passwords.clone() }
}

fn mosquitto() -> Mosquitto {
    let addr = std::env::var("KOLE_TEST_MOSQUITTO").expect("KOLE_TEST_MOSQUITTO (run .ci/mosquitto.sh start)");
    let creds = std::env::var("KOLE_TEST_MOSQUITTO_CREDENTIALS").expect("KOLE_TEST_MOSQUITTO_CREDENTIALS");
    let passwords = std::fs::read_to_string(creds)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(u, p)| (u.to_owned(), p.to_owned()))
        .collect();
    Mosquitto { addr: addr.parse().unwrap(), passwords }
}

impl Mosquitto {
    fn cloud(&self) -> CloudConfig {
        CloudConfig {
            brokers: vec![self.addr.clone()],
            credentials: Some(Credentials {
                username: "kole-controller".into(),
                password: self.passwords["kole-controller"].clone(),
            }),
            ..CloudConfig::default()
        }
    }

    fn node(&self, name: &str) -> NodeConfig {
        NodeConfig {
            brokers: vec![self.addr.clone()],
            password: Some(self.passwords[name].clone()),
            ..NodeConfig::default()
        }
    }
}

fn topics() -> Topics {
    Topics::new("default").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_round_trips() {
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let fleet: Vec<_> =
            (0..5).map(|i| format!("edge-{i:03}")).map(|n| AgentHandle::start(&topics, &n, mq.node(&n))).collect();
        ctl.wait_nodes(5).await;
        let w1 = workload("default/app", 1);
        ctl.apply(w1.clone()).await;
        ctl.wait_converged(&w1, 5).await;
        let w2 = workload("default/app", 2);
        ctl.apply(w2.clone()).await;
        ctl.wait_converged(&w2, 5).await;
        let stats = ctl.stop().await;
        assert_eq!(stats.registered_new, 5);
        for a in fleet {
            let (agent, _) = a.stop().await;
            assert!(agent.workloads().any(|(w, _)| w.version == 2));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_rejects_wrong_credentials() {
    bounded(30, async {
        let mq = mosquitto();
        let mut cfg = mq.node("node-a");
        cfg.password = Some("wrong".into());
        assert!(MqttNode::connect(topics(), NodeName::new("node-a").unwrap(), &cfg).await.is_err());
    })
    .await;
}

/// Node A, with its own valid credentials, can neither publish on B's uplink (the broker drops
/// it, so the controller never sees it) nor read B's downlink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_acl_confines_a_node_to_its_topics() {
    bounded(30, async {
        let mq = mosquitto();
        let topics = topics();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let base = topics.base().to_owned();
        let mut opts = rumqttc::MqttOptions::new("node-a", mq.addr.host.clone(), mq.addr.port);
        opts.set_credentials("node-a", mq.passwords["node-a"].clone());
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev {
                    let _ = tx.send(p.topic);
                }
            }
        });
        let hb = protocol::encode(&Message::Heartbeat(Heartbeat {
            seq: 1,
            boot_id: 1,
            applied: DesiredDigest::EMPTY,
            health: NodeHealth::OK,
        }));
        let qos = rumqttc::QoS::AtLeastOnce;
        client.subscribe(format!("{base}/down/node/node-b"), qos).await.unwrap();
        client.publish(format!("{base}/up/node-b/hb"), qos, false, hb.clone()).await.unwrap();
        client.publish(format!("{base}/up/node-b/register"), qos, false, hb.clone()).await.unwrap();
        // B is real and gets a downlink message (its registration ack would do; a raw one is enough).
        let b = MqttNode::connect(topics.clone(), NodeName::new("node-b").unwrap(), &mq.node("node-b")).await.unwrap();
        let ping = protocol::encode(&Message::Heartbeat(Heartbeat {
            seq: 2,
            boot_id: 2,
            applied: DesiredDigest::EMPTY,
            health: NodeHealth::OK,
        }));
        b.publish(vec![NodePublish { kind: UplinkKind::Heartbeat, payload: ping }]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // A saw nothing of B's downlink, and the controller received only B's own heartbeat.
        assert!(rx.try_recv().is_err(), "node-a read node-b's downlink");
        let received = ctl.cloud.stats().received;
        assert_eq!(received, 1, "the broker let node-a publish as node-b: {:?}", ctl.cloud.stats());
        pump.abort();
        ctl.stop().await;
    })
    .await;
}

/// What of a node's record a forged or garbage message could change (not `last_seen`, which the
/// node's own heartbeats move).
fn record(ctl: &Controller, name: &str) -> Option<NodeRecord> {
    ctl.store.read().get(name).map(|mut r| {
        r.last_seen = Default::default();
        r
    })
}

/// A raw MQTT client (not kole's) with a node's credentials. Its event loop stops when dropped.
struct RawClient {
    client: rumqttc::AsyncClient,
    /// Incoming publishes as `(topic, payload)`.
    incoming: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Connects a [`RawClient`] with `user`'s credentials (client id = user name, as kole's nodes use).
fn raw_client(mq: &Mosquitto, user: &str) -> RawClient {
    let mut opts = rumqttc::MqttOptions::new(user, mq.addr.host.clone(), mq.addr.port);
    opts.set_credentials(user, mq.passwords[user].clone());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send((p.topic, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("raw client: {e}");
                    break;
                }
            }
        }
    });
    RawClient { client, incoming: rx, pump }
}

/// Node A (valid credentials of its own) against a registered, converged node B: A's publishes on
/// B's uplink (a registration with other labels and boot, a heartbeat with another digest) are
/// dropped by the broker, and A's registration on its own topic claiming to be B is rejected by
/// the controller. B's record is unchanged and A is never registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_a_node_cannot_impersonate_another() {
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let base = topics.base().to_owned();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let b = AgentHandle::start(&topics, "node-b", mq.node("node-b"));
        ctl.wait_nodes(1).await;
        let w = workload("default/impersonation", 1);
        ctl.apply(w.clone()).await;
        ctl.wait_converged(&w, 1).await;
        let before = record(&ctl, "node-b").expect("node-b registered");
        assert_ne!(before.applied, DesiredDigest::EMPTY);

        let mut a = raw_client(&mq, "node-a");
        let qos = rumqttc::QoS::AtLeastOnce;
        a.client.subscribe(format!("{base}/down/node/node-a"), qos).await.unwrap();
        let claim = |name: &str| {
            protocol::encode(&Message::Register(Register {
                name: NodeName::new(name).unwrap(),
                boot_id: 9,
                labels: Labels::from_pairs([("tier", "evil")]).unwrap(),
                info: NodeInfo::default(),
                applied: DesiredDigest::EMPTY,
                workloads: vec![],
            }))
        };
        let hb = protocol::encode(&Message::Heartbeat(Heartbeat {
            seq: 1_000,
            boot_id: 9,
            applied: DesiredDigest::EMPTY,
            health: NodeHealth::OK,
        }));
        // On B's topics: the ACL drops these.
        a.client.publish(format!("{base}/up/node-b/register"), qos, false, claim("node-b")).await.unwrap();
        a.client.publish(format!("{base}/up/node-b/hb"), qos, false, hb).await.unwrap();
        // On A's own topic, claiming to be B: delivered, and answered on A's downlink with a
        // rejection. (It reaches the controller after the forged registration above, which would
        // take the same path; the forged heartbeat may take another controller connection, hence
        // the wait below.)
        a.client.publish(format!("{base}/up/node-a/register"), qos, false, claim("node-b")).await.unwrap();
        let outcome = loop {
            let (topic, payload) = a.incoming.recv().await.expect("node-a's connection ended");
            assert_eq!(topic, format!("{base}/down/node/node-a"));
            if let Message::RegisterAck(ack) = protocol::decode(&payload, &Default::default()).unwrap() {
                break ack.outcome;
            }
        };
        assert!(matches!(outcome, RegisterOutcome::Rejected { .. }), "{outcome:?}");
        // A few of B's own heartbeats later, B is as it was.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(record(&ctl, "node-b"), Some(before));
        assert!(!ctl.has_node("node-a"));
        assert_eq!(ctl.nodes(), 1);
        assert!(ctl.status(&w.id).is_some_and(|s| s.updated == 1 && s.targeted == 1));
        drop(a);
        let stats = ctl.stop().await;
        assert_eq!(stats.identity_mismatch, 1, "{stats:?}");
        assert_eq!(stats.registered_new, 1, "{stats:?}");
        assert_eq!(stats.restarts, 0, "{stats:?}");
        assert_eq!(stats.boot_mismatch, 0, "{stats:?}");
        let (agent, _) = b.stop().await;
        assert!(agent.workloads().any(|(x, _)| x.id == w.id && x.version == 1));
    })
    .await;
}

/// A node publishing garbage on its own uplink topics (which the ACL allows): undecodable,
/// oversize (100 kB, over the protocol's 64 KiB) and empty payloads are decode errors the
/// controller counts and rejects; an unknown kind is not delivered at all; a payload over the broker's
/// `message_size_limit` (256 KiB) is dropped by Mosquitto and never reaches the controller, whose
/// connections stay up. The other nodes and their workload are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_garbage_and_oversize_payloads_are_counted_and_change_nothing() {
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let base = topics.base().to_owned();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let fleet: Vec<_> =
            ["edge-000", "edge-001"].iter().map(|n| AgentHandle::start(&topics, n, mq.node(n))).collect();
        ctl.wait_nodes(2).await;
        let w = workload("default/garbage", 1);
        ctl.apply(w.clone()).await;
        ctl.wait_converged(&w, 2).await;
        let before: Vec<_> = ["edge-000", "edge-001"].iter().map(|n| record(&ctl, n).unwrap()).collect();
        let cloud_before = ctl.cloud.stats();

        let vandal = raw_client(&mq, "node-a");
        let qos = rumqttc::QoS::AtLeastOnce;
        let up = |kind: &str| format!("{base}/up/node-a/{kind}");
        vandal.client.publish(up("hb"), qos, false, vec![0xff; 7]).await.unwrap();
        vandal.client.publish(up("register"), qos, false, vec![1u8; 100_000]).await.unwrap();
        vandal.client.publish(up("status"), qos, false, Vec::new()).await.unwrap();
        vandal.client.publish(up("bogus"), qos, false, vec![1, 2]).await.unwrap();
        vandal.client.publish(up("status"), qos, false, vec![2u8; 300_000]).await.unwrap();
        // A last one, behind the 300 kB one on the same topic and connection: once the controller
        // has seen it (the fourth reject), it has seen the big one too, had the broker let it by.
        vandal.client.publish(up("status"), qos, false, vec![0xfe; 3]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while *ctl.rejects.lock().unwrap() < 4 {
            let rejects = *ctl.rejects.lock().unwrap();
            assert!(tokio::time::Instant::now() < deadline, "{rejects} rejects, {:?}", ctl.cloud.stats());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cloud = ctl.cloud.stats();
        // The unknown kind matches none of the controller's uplink filters: never delivered.
        assert_eq!(cloud.bad_topic, cloud_before.bad_topic, "{cloud:?}");
        assert_eq!(*ctl.rejects.lock().unwrap(), 4, "the 300 kB payload got through");
        assert_eq!(cloud.connection_errors, cloud_before.connection_errors, "{cloud:?}");
        assert_eq!(cloud.connected, cloud_before.connected, "{cloud:?}");
        assert_eq!(ctl.nodes(), 2);
        assert!(!ctl.has_node("node-a"));
        let after: Vec<_> = ["edge-000", "edge-001"].iter().map(|n| record(&ctl, n).unwrap()).collect();
        assert_eq!(after, before);
        assert!(ctl.status(&w.id).is_some_and(|s| s.updated == 2 && s.ready == 2));
        drop(vandal);
        let stats = ctl.stop().await; // the driver ended cleanly: no panic
        assert_eq!(stats.decode_errors, 4, "{stats:?}");
        assert_eq!(stats.registered_new, 2, "{stats:?}");
        assert_eq!(stats.restarts, 0, "{stats:?}");
        for a in fleet {
            let (agent, _) = a.stop().await;
            assert!(agent.workloads().any(|(x, _)| x.id == w.id && x.version == 1));
        }
    })
    .await;
}

/// A Mosquitto of a test's own, on a free port, with the shared broker's `passwd` and `acl`
/// (`KOLE_TEST_MOSQUITTO_DIR`). Dropping it kills the process and removes its directory.
struct PrivateMosquitto {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl PrivateMosquitto {
    async fn start(persistence: bool) -> Self {
        let shared = PathBuf::from(
            std::env::var("KOLE_TEST_MOSQUITTO_DIR").expect("KOLE_TEST_MOSQUITTO_DIR (run .ci/mosquitto.sh start)"),
        );
        for attempt in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let dir = std::env::temp_dir().join(format!("kole-mosquitto-{}-{port}-{attempt}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = format!(
                "user root\n\
                 listener {port} 127.0.0.1\n\
                 allow_anonymous false\n\
                 password_file {passwd}\n\
                 acl_file {acl}\n\
                 persistence {persistence}\n\
                 persistence_location {dir}/\n\
                 max_queued_messages 1000000\n\
                 max_inflight_messages 1000\n\
                 message_size_limit 262144\n\
                 log_dest file {dir}/mosquitto.log\n\
                 log_type error\n\
                 log_type warning\n\
                 log_type notice\n",
                passwd = shared.join("passwd").display(),
                acl = shared.join("acl").display(),
                dir = dir.display(),
            );
            std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
            let mut broker = Self { child: None, dir, port };
            if broker.spawn().await {
                return broker;
            }
        }
        panic!("could not start a private mosquitto");
    }

    fn addr(&self) -> BrokerAddr {
        BrokerAddr::tcp("127.0.0.1", self.port)
    }

    /// Starts mosquitto on the port and waits until it listens; false when it exits first (the
    /// port was taken) or does not listen within 5 s.
    async fn spawn(&mut self) -> bool {
        assert!(self.child.is_none());
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto on PATH");
        for _ in 0..50 {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Sends `signal` (`TERM`, `KILL`) and waits for the process to exit.
    async fn kill(&mut self, signal: &str) {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
        assert!(ok.success());
        for _ in 0..100 {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mosquitto did not exit on SIG{signal}");
    }

    /// Starts it again on the same port (retrying while the old socket lingers).
    async fn restart(&mut self) {
        for _ in 0..20 {
            if self.spawn().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("could not restart mosquitto on port {}", self.port);
    }
}

impl Drop for PrivateMosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
            eprintln!("private mosquitto log ({}):\n{log}", self.dir.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Five agents converge on v1 through a private Mosquitto; v2 rolls out in two waves and is paused
/// after the first (some nodes on v2, the rest on v1); the broker is killed with `signal`, the
/// rollout resumed while it is down, and a new broker started on the same port. The controller and
/// every agent reconnect, and all five converge on v2.
async fn broker_restart_mid_rollout(persistence: bool, signal: &str, id: &str) {
    bounded(120, async {
        let shared = mosquitto();
        let mut broker = PrivateMosquitto::start(persistence).await;
        let mq = at(&shared, broker.addr());
        let topics = topics();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let names: Vec<_> = (0..5).map(|i| format!("edge-{i:03}")).collect();
        let fleet: Vec<_> = names.iter().map(|n| AgentHandle::start(&topics, n, mq.node(n))).collect();
        ctl.wait_nodes(5).await;
        let w1 = workload(id, 1);
        ctl.apply(w1.clone()).await;
        ctl.wait_converged(&w1, 5).await;

        let mut w2 = workload(id, 2);
        w2.rollout.waves = vec![50, 100];
        let first_wave = names.iter().filter(|n| wave_point(n, &w2.id) < 5_000).count() as u32;
        assert!((1..5).contains(&first_wave), "pick another workload id: {first_wave} of 5 in the first wave");
        ctl.apply(w2.clone()).await;
        ctl.command(WorkloadCommand::Pause(w2.id.clone())).await;
        ctl.wait_status(&w2.id, |s| {
            s.version == 2 && s.phase == RolloutPhase::Paused && s.updated == first_wave && s.ready == first_wave
        })
        .await;
        let held = ctl.status(&w2.id).unwrap();
        assert_eq!(held.by_version, vec![(1, 5 - first_wave), (2, first_wave)], "{held:?}");
        let connects_before = ctl.cloud.stats().connects;

        broker.kill(signal).await;
        // SIGTERM makes a persistent broker save its database (the retained specs); SIGKILL of one
        // without persistence leaves nothing: the new broker starts empty.
        assert_eq!(broker.dir.join("mosquitto.db").exists(), persistence);
        ctl.command(WorkloadCommand::Resume(w2.id.clone())).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.restart().await;
        let restarted = common::now();
        ctl.wait_converged(&w2, 5).await;
        assert!(ctl.cloud.stats().connects > connects_before, "{:?}", ctl.cloud.stats());
        // Nodes of the first wave count as updated from before the restart: wait until every node
        // has been heard from through the new broker (`last_seen` has second precision).
        let heard_since = |n: &String| ctl.store.read().get(n).is_some_and(|r| r.last_seen > restarted);
        while !names.iter().all(heard_since) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stats = ctl.stop().await;
        assert_eq!(stats.registered_new, 5, "{stats:?}");
        for a in fleet {
            let (agent, stats) = a.stop().await;
            let versions: Vec<_> = agent.workloads().map(|(w, _)| (w.id.clone(), w.version)).collect();
            assert!(versions.contains(&(w2.id.clone(), 2)), "{versions:?}");
            assert!(stats.connects >= 2, "{stats:?}");
        }
        drop(broker);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO_DIR"]
async fn mosquitto_restart_with_persistence_mid_rollout_reconverges() {
    broker_restart_mid_rollout(true, "TERM", "default/restart-persistent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO_DIR"]
async fn mosquitto_killed_without_persistence_mid_rollout_reconverges() {
    broker_restart_mid_rollout(false, "KILL", "default/restart-empty").await;
}

/// A controller converges four nodes, stops (writing its shutdown snapshot), and a new one restores
/// from the snapshot: it knows the nodes, re-applies the workload and converges without a single
/// new registration, catch-up or per-node delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_controller_restart_restores_without_resending() {
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let snapshots = Arc::new(MemorySnapshotStore::new());
        let ctl = Controller::start(&topics, mq.cloud(), snapshots.clone()).await;
        let fleet: Vec<_> =
            (0..4).map(|i| format!("edge-{i:03}")).map(|n| AgentHandle::start(&topics, &n, mq.node(&n))).collect();
        let w = workload("default/controller-restart", 1);
        let (first, stats) = restart_after_convergence(ctl, &topics, mq.cloud(), snapshots, &w, 4).await;
        assert_eq!(first.registered_new, 4, "{first:?}");
        assert_eq!(stats.registered_new, 0, "{stats:?}");
        assert_eq!(stats.catchups, 0, "{stats:?}");
        assert_eq!(stats.per_node_deliveries, 0, "{stats:?}");
        assert!(stats.heartbeats >= 4, "{stats:?}");
        for a in fleet {
            let (agent, _) = a.stop().await;
            assert!(agent.workloads().any(|(x, _)| x.id == w.id && x.version == 1));
        }
    })
    .await;
}

/// TLS settings that trust the PEM certificates in `ca` (nothing else), with the ring provider.
#[cfg(feature = "tls")]
fn tls_trusting(ca: &[u8]) -> kole_mqtt::TlsSettings {
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    kole_mqtt::TlsSettings { client_config: Arc::new(config) }
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto with its TLS listener: eval \"$(.ci/mosquitto.sh start)\"; cargo test --features tls"]
async fn mosquitto_round_trips_over_tls() {
    bounded(60, async {
        let mq = mosquitto();
        let addr = std::env::var("KOLE_TEST_MOSQUITTO_TLS").expect("KOLE_TEST_MOSQUITTO_TLS");
        let ca = std::fs::read(std::env::var("KOLE_TEST_MOSQUITTO_CA").expect("KOLE_TEST_MOSQUITTO_CA")).unwrap();
        let broker: BrokerAddr = format!("mqtts://{addr}").parse().unwrap();
        assert!(broker.tls);
        let tls = tls_trusting(&ca);
        let connection = |tls: kole_mqtt::TlsSettings| kole_mqtt::ConnectionConfig {
            tls: Some(tls),
            ..kole_mqtt::ConnectionConfig::default()
        };
        let cloud = CloudConfig {
            brokers: vec![broker.clone()],
            connection: kole_mqtt::ConnectionConfig { inflight: 4_096, ..connection(tls.clone()) },
            ..mq.cloud()
        };
        let node = |name: &str| NodeConfig {
            brokers: vec![broker.clone()],
            connection: connection(tls.clone()),
            ..mq.node(name)
        };

        // A node that trusts another CA (here: none) cannot connect.
        let untrusting = NodeConfig { connection: connection(tls_trusting(b"")), ..node("node-a") };
        assert!(MqttNode::connect(topics(), NodeName::new("node-a").unwrap(), &untrusting).await.is_err());

        let topics = topics();
        let ctl = Controller::start(&topics, cloud, Arc::new(MemorySnapshotStore::new())).await;
        let fleet: Vec<_> =
            (0..3).map(|i| format!("edge-{i:03}")).map(|n| AgentHandle::start(&topics, &n, node(&n))).collect();
        ctl.wait_nodes(3).await;
        let w = workload("default/tls-app", 1);
        ctl.apply(w.clone()).await;
        ctl.wait_converged(&w, 3).await;
        let stats = ctl.stop().await;
        assert_eq!(stats.registered_new, 3);
        for a in fleet {
            let (agent, driver) = a.stop().await;
            assert!(agent.workloads().any(|(x, _)| x.id == w.id && x.version == 1));
            assert!(driver.connects >= 1, "{driver:?}");
        }
    })
    .await;
}

/// The controller lists the retained specs on a real broker (fleet-wide and group spec topics),
/// complete on every scan, and a cleared spec disappears from the list: what a controller taking
/// the lead reconciles against the live workloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_lists_the_retained_specs() {
    use kole_core::model::WorkloadId;
    use kole_core::transport::{CloudTransport, Destination, GroupName, Outbound};
    use std::collections::BTreeSet;
    bounded(90, async {
        let mq = mosquitto();
        let cloud = kole_mqtt::MqttCloud::connect(topics(), mq.cloud()).await.unwrap();
        // Other tests share the broker: this test's specs live in a namespace of their own.
        let ns = format!("scan{}", kole_core::clock::wall_clock_now().as_millis());
        let group = GroupName::new("site-1").unwrap();
        let mut mine: BTreeSet<Destination> =
            (0..60)
                .map(|i| Destination::WorkloadSpec(WorkloadId::new(format!("{ns}/w{i}")).unwrap()))
                .chain((0..5).map(|i| {
                    Destination::GroupWorkloadSpec(group.clone(), WorkloadId::new(format!("{ns}/g{i}")).unwrap())
                }))
                .collect();
        let publish =
            |to: &Destination, payload: &[u8]| Outbound { to: to.clone(), payload: payload.to_vec(), retain: true };
        cloud.send(mine.iter().map(|d| publish(d, b"a spec")).collect()).await.unwrap();
        async fn listed(cloud: &kole_mqtt::MqttCloud, ns: &str) -> BTreeSet<Destination> {
            let all = cloud.retained_specs().await.unwrap();
            all.into_iter()
                .filter(|d| match d {
                    Destination::WorkloadSpec(id) | Destination::GroupWorkloadSpec(_, id) => {
                        id.as_str().starts_with(&format!("{ns}/"))
                    }
                    _ => false,
                })
                .collect()
        }
        // The publishes travel on another connection: wait until the broker has them all.
        while listed(&cloud, &ns).await != mine {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // From then on every scan is complete: the marker comes back after the last retained spec.
        for _ in 0..5 {
            assert_eq!(listed(&cloud, &ns).await, mine);
        }

        // Clearing a spec (an empty retained payload) takes it off the list.
        let cleared: Vec<Destination> = mine.iter().step_by(2).cloned().collect();
        cloud.send(cleared.iter().map(|d| publish(d, b"")).collect()).await.unwrap();
        for d in &cleared {
            mine.remove(d);
        }
        while listed(&cloud, &ns).await != mine {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cloud.send(mine.iter().map(|d| publish(d, b"")).collect()).await.unwrap();
        while !listed(&cloud, &ns).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// A raw client with `user`'s credentials and a client id of its choosing; returns whether the
/// broker accepted it (a CONNACK came), and keeps it connected for `hold`.
async fn connect_as(mq: &Mosquitto, user: &str, client_id: &str, hold: Duration) -> bool {
    let mut opts = rumqttc::MqttOptions::new(client_id, mq.addr.host.clone(), mq.addr.port);
    opts.set_credentials(user, mq.passwords[user].clone());
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    let connected = matches!(
        tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await,
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))))
    );
    let _ = tokio::time::timeout(hold, async { while eventloop.poll().await.is_ok() {} }).await;
    connected
}

/// The takeover of issue 12: node-a, with its own valid credentials, connects with the client ids
/// the controller used to have (`kole-controller-0-0`, `-0-1`). Mosquitto disconnects the older
/// of two clients with one id, so that used to drop the controller's connections every time; now
/// its ids carry a random tag per process and nothing happens to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_a_node_cannot_take_over_the_controllers_client_ids() {
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let agent = AgentHandle::start(&topics, "edge-005", mq.node("edge-005"));
        ctl.wait_nodes(1).await;
        let before = ctl.cloud.stats();
        assert_eq!(before.connected, 2, "{before:?}");
        for round in 0..3 {
            for id in ["kole-controller-0-0", "kole-controller-0-1", "kole-controller-0-scan"] {
                assert!(
                    connect_as(&mq, "node-a", id, Duration::from_millis(300)).await,
                    "round {round}: the broker refused node-a as {id}; the test proves nothing"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = ctl.cloud.stats();
        assert_eq!(after.connection_errors, before.connection_errors, "{after:?}");
        assert_eq!(after.connects, before.connects, "no reconnect either: {after:?}");
        assert_eq!(after.connected, 2, "{after:?}");
        // And the fleet still works through it.
        let w = workload("default/takeover", 1);
        ctl.apply(w.clone()).await;
        ctl.wait_converged(&w, 1).await;
        ctl.stop().await;
        agent.stop().await;
    })
    .await;
}

/// The size limits at their exact boundaries, with Mosquitto's `message_size_limit 262144` (the
/// payload) and kole's `max_packet_bytes` of 256 KiB (the whole packet, as rumqttc counts it):
/// - downlink: a message whose PUBLISH packet is exactly 256 KiB is sent and arrives; one byte more
///   is dropped by `send` (the rest of its batch goes out), and the controller stays connected;
/// - uplink: a node's payload of exactly `message_size_limit` passes the broker, and its packet to
///   the controller is larger than 256 KiB by the topic: the controller takes it (and refuses it as
///   a decode error) instead of dropping its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_payloads_at_the_exact_size_limits_keep_the_controller_connected() {
    use kole_core::transport::{CloudTransport, Destination, Outbound, TransportError};
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let name = NodeName::new("node-b").unwrap();
        let node = MqttNode::connect(topics.clone(), name.clone(), &mq.node("node-b")).await.unwrap();
        let before = ctl.cloud.stats();
        let max_packet = kole_mqtt::ConnectionConfig::default().max_packet_bytes;
        assert_eq!(max_packet, 262_144);
        // A PUBLISH of this size: fixed header 1, remaining length 3 bytes, topic length 2,
        // topic, packet id 2, payload.
        let topic = topics.downlink(&Destination::Node(name.clone()));
        let at_limit = max_packet - (1 + 3 + 2 + topic.len() + 2);
        let to = Destination::Node(name.clone());
        let msg = |len: usize, fill: u8| Outbound { to: to.clone(), payload: vec![fill; len], retain: false };
        // Only what comes on the node's own topic (retained specs of other tests arrive too). A
        // message that does not come names the counters that tell where it went: dropped by the
        // node's full inbox, or lost to a reconnect or an error of the controller's connections.
        let own = || async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let got = match tokio::time::timeout_at(deadline, node.recv(1)).await {
                    Ok(got) => got.unwrap(),
                    Err(_) => panic!(
                        "no message on node-b's own topic within 20 s: node {:?}, controller {:?}",
                        node.stats(),
                        ctl.cloud.stats()
                    ),
                };
                if let Some(d) = got.into_iter().find(|d| d.from == to) {
                    return d;
                }
            }
        };
        ctl.cloud.send(vec![msg(at_limit, 1)]).await.unwrap();
        assert_eq!(own().await.payload.len(), at_limit);
        match ctl.cloud.send(vec![msg(at_limit + 1, 2), msg(3, 3)]).await {
            Err(TransportError::OversizeDropped { dropped: 1, largest, max, .. }) => {
                assert_eq!((largest, max), (at_limit + 1, at_limit));
            }
            other => panic!("one byte over the packet limit must be dropped alone, got {other:?}"),
        }
        assert_eq!(&own().await.payload[..], &[3, 3, 3], "the rest of the batch arrives, not the oversize one");

        // Uplink at the broker's exact limit.
        let vandal = raw_client(&mq, "node-a");
        let rejects = *ctl.rejects.lock().unwrap();
        let up = topics.uplink(&NodeName::new("node-a").unwrap(), UplinkKind::Status);
        vandal.client.publish(up, rumqttc::QoS::AtLeastOnce, false, vec![7u8; 262_144]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while *ctl.rejects.lock().unwrap() == rejects {
            assert!(tokio::time::Instant::now() < deadline, "the payload never arrived: {:?}", ctl.cloud.stats());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = ctl.cloud.stats();
        assert_eq!(after.connection_errors, before.connection_errors, "{after:?}");
        assert_eq!(after.connected, before.connected, "{after:?}");
        assert_eq!(after.oversize_dropped, before.oversize_dropped + 1, "{after:?}");
        drop(vandal);
        drop(node);
        ctl.stop().await;
    })
    .await;
}

/// A node's retained uplink is replayed by the broker to every new subscription: the controller
/// ignores uplink delivered retained (counted), so a registration node-a left retained does not
/// register it again when a controller (re)subscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto: eval \"$(.ci/mosquitto.sh start)\" sets KOLE_TEST_MOSQUITTO"]
async fn mosquitto_retained_uplink_is_ignored() {
    bounded(60, async {
        let mq = mosquitto();
        let topics = topics();
        let vandal = raw_client(&mq, "node-a");
        let name = NodeName::new("node-a").unwrap();
        let reg = protocol::encode(&Message::Register(Register {
            name: name.clone(),
            boot_id: 77,
            labels: Labels::default(),
            info: NodeInfo { arch: "arm64".into(), os: "linux".into(), agent_version: "1".into(), addresses: vec![] },
            applied: DesiredDigest::EMPTY,
            workloads: vec![],
        }));
        let up = topics.uplink(&name, UplinkKind::Register);
        vandal.client.publish(up.clone(), rumqttc::QoS::AtLeastOnce, true, reg).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A controller that subscribes now gets it replayed, flagged retained.
        let ctl = Controller::start(&topics, mq.cloud(), Arc::new(MemorySnapshotStore::new())).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ctl.cloud.stats().retained_uplink_dropped == 0 {
            assert!(tokio::time::Instant::now() < deadline, "no retained replay seen: {:?}", ctl.cloud.stats());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!ctl.has_node("node-a"), "a retained registration registered node-a");
        assert_eq!(ctl.cloud.stats().received, 0, "{:?}", ctl.cloud.stats());
        // Clean up the broker's retained store for the other tests.
        vandal.client.publish(up, rumqttc::QoS::AtLeastOnce, true, Vec::<u8>::new()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        ctl.stop().await;
    })
    .await;
}

/// The shipped `deploy/mqtt/mosquitto.conf`, run as written except for its ports (free ones on
/// 127.0.0.1), its directories (a fresh one) and its log (a file): the nodes' listener, the
/// controller's listener, their password files (made with `mosquitto_passwd` from the shared
/// broker's credentials), the shared ACL and the shared broker's TLS key pair. `bind_ids: false`
/// removes `use_username_as_clientid` (the control).
#[cfg(feature = "tls")]
struct ShippedMosquitto {
    child: Child,
    dir: PathBuf,
    nodes: BrokerAddr,
    controller: BrokerAddr,
}

#[cfg(feature = "tls")]
impl ShippedMosquitto {
    fn start(mq: &Mosquitto, bind_ids: bool) -> Self {
        let shipped = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mqtt/mosquitto.conf"),
        )
        .unwrap();
        let shared = PathBuf::from(std::env::var("KOLE_TEST_MOSQUITTO_DIR").expect("KOLE_TEST_MOSQUITTO_DIR"));
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let (np, cp) = (free(), free());
        let dir = std::env::temp_dir().join(format!("kole-shipped-mosquitto-{}-{np}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = |file: &str, users: &[&str]| {
            for u in users {
                let ok = Command::new("mosquitto_passwd")
                    .args(if dir.join(file).exists() { vec!["-b"] } else { vec!["-c", "-b"] })
                    .arg(dir.join(file))
                    .args([*u, mq.passwords[*u].as_str()])
                    .status()
                    .unwrap();
                assert!(ok.success(), "mosquitto_passwd {file} {u}");
            }
        };
        passwd("nodes.passwd", &["node-a", "node-b", "edge-005"]);
        passwd("controller.passwd", &["kole-controller"]);
        std::fs::copy(shared.join("acl"), dir.join("mosquitto.acl")).unwrap();
        for f in ["ca.crt", "server.crt", "server.key"] {
            std::fs::copy(shared.join(f), dir.join(f)).unwrap();
        }
        // Each edit must find its line, so a change to the shipped file cannot slip past the test.
        let mut conf = shipped;
        let mut edit = |from: &str, to: &str| {
            assert!(conf.contains(from), "deploy/mqtt/mosquitto.conf no longer has {from:?}");
            conf = conf.replace(from, to);
        };
        let d = format!("{}/", dir.display());
        edit("/etc/mosquitto/kole/", &d);
        edit("persistence_location /var/lib/mosquitto/", &format!("persistence_location {d}"));
        edit("log_dest syslog", &format!("log_dest file {d}mosquitto.log"));
        edit("listener 8883 0.0.0.0", &format!("listener {np} 127.0.0.1"));
        edit("listener 8884 0.0.0.0", &format!("listener {cp} 127.0.0.1"));
        if !bind_ids {
            edit("use_username_as_clientid true", "");
        }
        if running_as_root() {
            // Mosquitto started as root drops to the `mosquitto` user, which cannot read the 0600 files.
            conf.insert_str(0, "user root\n");
        }
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto on PATH");
        let broker = Self {
            child,
            dir,
            nodes: format!("mqtts://127.0.0.1:{np}").parse().unwrap(),
            controller: format!("mqtts://127.0.0.1:{cp}").parse().unwrap(),
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", np)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", cp)).is_ok()
            {
                return broker;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the shipped mosquitto.conf did not start: {}", broker.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// The client ids the broker logged for the controller's connections (an attacker who reads
    /// the broker's log knows them; so does this test).
    fn controller_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .log()
            .lines()
            .filter_map(|l| l.split(" as ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .filter(|id| id.starts_with("kole-controller-"))
            .map(str::to_owned)
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(feature = "tls")]
impl Drop for ShippedMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("shipped mosquitto log ({}):\n{}", self.dir.display(), self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(feature = "tls")]
fn running_as_root() -> bool {
    // No libc call needed: `id -u` is everywhere the tier runs.
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// A raw TLS client with `user`'s credentials and a client id of its choosing: whether the broker
/// accepted it, kept connected for `hold`.
#[cfg(feature = "tls")]
async fn connect_tls_as(
    mq: &Mosquitto,
    at: &BrokerAddr,
    tls: &kole_mqtt::TlsSettings,
    user: &str,
    client_id: &str,
    hold: Duration,
) -> bool {
    let mut opts = rumqttc::MqttOptions::new(client_id, at.host.clone(), at.port);
    opts.set_credentials(user, mq.passwords[user].clone());
    opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
        tls.client_config.clone(),
    )));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
    let connected = matches!(
        tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await,
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(rumqttc::ConnAck {
            code: rumqttc::ConnectReturnCode::Success,
            ..
        }))))
    );
    let _ = tokio::time::timeout(hold, async { while eventloop.poll().await.is_ok() {} }).await;
    connected
}

/// The takeover of issue 12 against the shipped broker configuration. node-a, with its own valid
/// password, connects on the nodes' listener with each client id the controller has (read from
/// the broker's log) and with another node's id, three rounds. With the shipped
/// `use_username_as_clientid` the broker renames it `node-a`, and neither the controller nor
/// edge-005 loses a connection; node-a cannot log in on the controller's listener at all. The
/// control run, the same file without that line, shows the attack does work there (the controller
/// is disconnected), so the test would catch the option going missing.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Mosquitto with its TLS files: eval \"$(.ci/mosquitto.sh start)\"; cargo test --features tls"]
async fn mosquitto_shipped_config_binds_client_ids_to_user_names() {
    for bind_ids in [true, false] {
        bounded(90, shipped_takeover(bind_ids)).await;
    }
}

#[cfg(feature = "tls")]
async fn shipped_takeover(bind_ids: bool) {
    let mq = mosquitto();
    let broker = ShippedMosquitto::start(&mq, bind_ids);
    let ca = std::fs::read(std::env::var("KOLE_TEST_MOSQUITTO_CA").expect("KOLE_TEST_MOSQUITTO_CA")).unwrap();
    let tls = tls_trusting(&ca);
    let connection = kole_mqtt::ConnectionConfig { tls: Some(tls.clone()), ..kole_mqtt::ConnectionConfig::default() };
    let topics = topics();
    let cloud = CloudConfig { brokers: vec![broker.controller.clone()], connection: connection.clone(), ..mq.cloud() };
    let ctl = Controller::start(&topics, cloud, Arc::new(MemorySnapshotStore::new())).await;
    let node_cfg = NodeConfig { brokers: vec![broker.nodes.clone()], connection, ..mq.node("edge-005") };
    let agent = AgentHandle::start(&topics, "edge-005", node_cfg);
    ctl.wait_nodes(1).await;
    let ids = broker.controller_ids();
    assert_eq!(ids.len(), 2, "the controller's two connections in the log: {ids:?}");

    // Wrong listener: a node's password is not accepted where the controller connects.
    let hold = Duration::from_millis(300);
    assert!(!connect_tls_as(&mq, &broker.controller, &tls, "node-a", "node-a", hold).await);

    let before = ctl.cloud.stats();
    for round in 0..3 {
        for id in ids.iter().map(String::as_str).chain(["edge-005"]) {
            assert!(
                connect_tls_as(&mq, &broker.nodes, &tls, "node-a", id, hold).await,
                "round {round}: node-a was refused as {id}; the test proves nothing"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ctl.cloud.stats();
    if bind_ids {
        assert_eq!(after.connection_errors, before.connection_errors, "{after:?}");
        assert_eq!(after.connects, before.connects, "no reconnect either: {after:?}");
        assert!(!broker.log().contains("already connected, closing old connection"), "{}", broker.log());
        // The fleet still works through it.
        let w = workload("default/shipped-conf", 1);
        ctl.apply(w.clone()).await;
        ctl.wait_converged(&w, 1).await;
        ctl.stop().await;
        let (_, driver) = agent.stop().await;
        assert_eq!(driver.connects, 1, "edge-005 was never disconnected: {driver:?}");
    } else {
        assert!(
            after.connection_errors > before.connection_errors,
            "without use_username_as_clientid the takeover should work: {after:?}"
        );
        ctl.stop().await;
        agent.stop().await;
    }
}
