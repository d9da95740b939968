//! Interop with Debian's Mosquitto, with per-node credentials and the shipped ACL
//! (`deploy/mqtt/mosquitto.acl`, fleet `default`). Start it with `.ci/mosquitto.sh start`, which
//! prints `KOLE_TEST_MOSQUITTO=127.0.0.1:PORT` and `KOLE_TEST_MOSQUITTO_CREDENTIALS=FILE`
//! (`user:password` lines); then `cargo test -p kole-mqtt -- --include-ignored`.
//!
//! The tests share one broker, one fleet and its fixed node credentials: run them one at a time
//! (`-- --include-ignored --test-threads=1`), as `.ci/run` does.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{AgentHandle, Controller, bounded, workload};
use kole_core::model::{DesiredDigest, NodeName};
use kole_core::protocol::{self, Heartbeat, Message, NodeHealth, Topics, UplinkKind};
use kole_core::snapshot::MemorySnapshotStore;
use kole_core::transport::{NodePublish, NodeTransport};
use kole_mqtt::{BrokerAddr, CloudConfig, Credentials, MqttNode, NodeConfig};

struct Mosquitto {
    addr: BrokerAddr,
    passwords: HashMap<String, String>,
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
