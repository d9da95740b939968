//! Round trips of a real engine and real agents through the embedded broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{AgentHandle, Controller, bounded, restart_after_convergence, workload};
use kole_core::backoff::Backoff;
use kole_core::model::{DesiredDigest, Labels, NodeInfo, mix64, stable_hash};
use kole_core::protocol::{self, Message, Register, RegisterOutcome, UplinkKind, WorkloadSpec};
use kole_core::rng::SplitMix64;
use kole_core::snapshot::MemorySnapshotStore;
use kole_core::transport::{CloudTransport, Destination, NodeDelivery, NodePublish, NodeTransport, Outbound};
use kole_mqtt::Topics;
use kole_mqtt::{CloudConfig, EmbeddedBroker, EmbeddedBrokerConfig, MqttCloud, MqttNode, NodeConfig};
use kole_tests::fixtures;

fn cloud_cfg(broker: &EmbeddedBroker) -> CloudConfig {
    CloudConfig { brokers: vec![broker.broker_addr()], ..CloudConfig::default() }
}

fn node_cfg(broker: &EmbeddedBroker) -> NodeConfig {
    NodeConfig { brokers: vec![broker.broker_addr()], ..NodeConfig::default() }
}

fn agents(topics: &Topics, broker: &EmbeddedBroker, n: usize) -> Vec<AgentHandle> {
    (0..n).map(|i| AgentHandle::start(topics, &format!("edge-{i:03}"), node_cfg(broker))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_heartbeat_deliver_and_rollout() {
    round_trips(cloud_cfg).await;
}

/// The same with the controller subscribed to the uplink at QoS 0
/// (`CloudConfig::uplink_subscription_qos`): status reports still arrive and rollouts complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_with_uplink_subscriptions_at_qos_0() {
    round_trips(|b| CloudConfig { uplink_subscription_qos: rumqttc::QoS::AtMostOnce, ..cloud_cfg(b) }).await;
}

async fn round_trips(cloud: fn(&EmbeddedBroker) -> CloudConfig) {
    bounded(60, async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
        let topics = Topics::new("test").unwrap();
        let ctl = Controller::start(&topics, cloud(&broker), Arc::new(MemorySnapshotStore::new())).await;
        let fleet = agents(&topics, &broker, 5);
        ctl.wait_nodes(5).await;
        let w1 = workload("default/app", 1);
        ctl.apply(w1.clone()).await;
        ctl.wait_converged(&w1, 5).await;
        // A new version rolls out to everyone.
        let w2 = workload("default/app", 2);
        ctl.apply(w2.clone()).await;
        ctl.wait_converged(&w2, 5).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let stats = ctl.stop().await;
        assert_eq!(stats.registered_new, 5);
        assert!(stats.heartbeats >= 5, "{stats:?}");
        for a in fleet {
            let (agent, _) = a.stop().await;
            assert!(agent.workloads().any(|(w, _)| w.id == w2.id && w.version == 2));
        }
        broker.shutdown().await;
    })
    .await;
}

/// A retained spec replayed to an MQTT 3.1.1 node that connects later carries exactly the bytes the
/// cloud sent. (`mqtt5` 0.46 encoded retained replays as MQTT 5, so the node read the properties'
/// bytes as the start of the payload and could not decode the spec; fixed in 0.49.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_spec_reaches_a_later_node_byte_for_byte() {
    bounded(30, async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
        let topics = Topics::new("test").unwrap();
        let cloud = MqttCloud::connect(topics.clone(), cloud_cfg(&broker)).await.unwrap();
        let w = workload("default/app", 1);
        let to = Destination::WorkloadSpec(w.id.clone());
        let payload = protocol::encode(&Message::WorkloadSpec(WorkloadSpec {
            workload: w,
            wave_threshold: WorkloadSpec::ALL_WAVES,
        }));
        let spec = Outbound { to: to.clone(), payload: payload.clone(), retain: true };
        // Once a connected node got the spec live, the broker holds it retained. Resent until then,
        // since the node's SUBSCRIBE is acknowledged after `connect` returns (a resend is idempotent;
        // a replay, if the SUBSCRIBE came after the first send, is not what this waits for).
        let early =
            MqttNode::connect(topics.clone(), fixtures::node_name("node-early"), &node_cfg(&broker)).await.unwrap();
        let live = loop {
            cloud.send(vec![spec.clone()]).await.unwrap();
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), early.recv(10)).await
                && let Some(d) = got.unwrap().into_iter().find(|d| !d.retained)
            {
                break d;
            }
        };
        assert_eq!((&live.from, &*live.payload), (&to, &payload[..]), "the live spec's bytes");

        let late =
            MqttNode::connect(topics.clone(), fixtures::node_name("node-late"), &node_cfg(&broker)).await.unwrap();
        let replayed: Vec<NodeDelivery> = late.recv(10).await.unwrap();
        assert_eq!(replayed.len(), 1, "{replayed:?}");
        assert_eq!((&replayed[0].from, replayed[0].retained), (&to, true));
        assert_eq!(&*replayed[0].payload, &payload[..], "the replayed spec's bytes");
        assert!(matches!(replayed[0].decode(&Default::default()), Ok(Message::WorkloadSpec(_))));
        broker.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_another_identity_is_ignored() {
    bounded(30, async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
        let topics = Topics::new("test").unwrap();
        let ctl = Controller::start(&topics, cloud_cfg(&broker), Arc::new(MemorySnapshotStore::new())).await;
        let a = MqttNode::connect(topics.clone(), fixtures::node_name("node-a"), &node_cfg(&broker)).await.unwrap();
        let claim = Message::Register(Register {
            name: fixtures::node_name("node-b"),
            boot_id: 9,
            labels: Labels::new(),
            info: NodeInfo::default(),
            applied: DesiredDigest::EMPTY,
            workloads: vec![],
        });
        a.publish(vec![NodePublish { kind: UplinkKind::Register, payload: protocol::encode(&claim) }]).await.unwrap();
        // The controller answers on A's own topic with a rejection, and learns neither name.
        let ack = a.recv(1).await.unwrap();
        match ack[0].decode(&Default::default()).unwrap() {
            Message::RegisterAck(ack) => assert!(matches!(ack.outcome, RegisterOutcome::Rejected { .. })),
            other => panic!("expected a RegisterAck, got {other:?}"),
        }
        assert!(!ctl.has_node("node-b") && !ctl.has_node("node-a"));
        let stats = ctl.stop().await;
        assert_eq!(stats.identity_mismatch, 1);
        assert_eq!(stats.registered_new, 0);
        broker.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversize_payloads_are_counted_and_change_nothing() {
    bounded(30, async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
        let topics = Topics::new("test").unwrap();
        let ctl = Controller::start(&topics, cloud_cfg(&broker), Arc::new(MemorySnapshotStore::new())).await;
        let fleet = agents(&topics, &broker, 2);
        ctl.wait_nodes(2).await;
        let mut opts = rumqttc::MqttOptions::new("vandal", "127.0.0.1", broker.port());
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let base = topics.base().to_owned();
        let qos = rumqttc::QoS::AtLeastOnce;
        client.publish(format!("{base}/up/edge-000/hb"), qos, false, vec![0xff; 7]).await.unwrap();
        client.publish(format!("{base}/up/edge-001/register"), qos, false, vec![1u8; 100_000]).await.unwrap();
        client.publish(format!("{base}/up/edge-001/status"), qos, false, Vec::new()).await.unwrap();
        // Not subscribed by the controller (unknown kind), and a node level that is no node name.
        client.publish(format!("{base}/up/edge-000/bogus"), qos, false, vec![1, 2]).await.unwrap();
        client.publish(format!("{base}/up/$evil/hb"), qos, false, vec![1, 2]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while ctl.cloud.stats().bad_topic < 1 || *ctl.rejects.lock().unwrap() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "{:?}", ctl.cloud.stats());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ctl.nodes(), 2);
        let stats = ctl.stop().await;
        assert!(stats.decode_errors >= 3, "{stats:?}");
        assert_eq!(stats.registered_new, 2);
        pump.abort();
        for a in fleet {
            a.stop().await;
        }
        broker.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_rollout_reconverges() {
    bounded(90, async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
        let bind = broker.addr();
        let topics = Topics::new("test").unwrap();
        let ctl = Controller::start(&topics, cloud_cfg(&broker), Arc::new(MemorySnapshotStore::new())).await;
        let fleet = agents(&topics, &broker, 5);
        ctl.wait_nodes(5).await;
        let w1 = workload("default/app", 1);
        ctl.apply(w1.clone()).await;
        ctl.wait_converged(&w1, 5).await;
        let connects_before = ctl.cloud.stats().connects;
        // Start a rollout and kill the broker under it; a new one (empty: no retained specs, no
        // sessions) comes up on the same port.
        let w2 = workload("default/app", 2);
        ctl.apply(w2.clone()).await;
        broker.shutdown().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig { bind, ..Default::default() }).await.unwrap();
        ctl.wait_converged(&w2, 5).await;
        assert!(ctl.cloud.stats().connects > connects_before);
        ctl.stop().await;
        for a in fleet {
            let (agent, stats) = a.stop().await;
            assert!(agent.workloads().any(|(w, _)| w.version == 2));
            assert!(stats.connects >= 2, "{stats:?}");
        }
        broker.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_restores_without_resending() {
    bounded(60, async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
        let topics = Topics::new("test").unwrap();
        let snapshots = Arc::new(MemorySnapshotStore::new());
        let ctl = Controller::start(&topics, cloud_cfg(&broker), snapshots.clone()).await;
        let fleet = agents(&topics, &broker, 4);
        let w = workload("default/app", 1);
        let (_, stats) = restart_after_convergence(ctl, &topics, cloud_cfg(&broker), snapshots, &w, 4).await;
        assert_eq!(stats.registered_new, 0, "{stats:?}");
        assert_eq!(stats.catchups, 0, "{stats:?}");
        assert_eq!(stats.per_node_deliveries, 0, "{stats:?}");
        assert!(stats.heartbeats >= 4, "{stats:?}");
        for a in fleet {
            a.stop().await;
        }
        broker.shutdown().await;
    })
    .await;
}

/// 10,000 agents that lost the broker at the same instant retry spread over the whole backoff
/// window, not in one burst: the agent driver seeds its jitter from the boot id and the wait is
/// jittered into `[d/2, d]`. The cloud's connections use the same policy. (The measured connect
/// rate of a real reconnect storm is in docs/benchmarks.md.)
#[test]
fn reconnect_storm_is_spread_by_the_backoff() {
    let policy = Backoff::new(1_000, 60_000, 2.0); // the agent driver's default
    for attempt in 0..3 {
        let nominal = policy.nominal_ms(attempt);
        let bins = 10u64;
        let mut hist = vec![0u32; bins as usize];
        for i in 0..10_000u32 {
            let boot = stable_hash(3, format!("edge-{i:05}").as_bytes()) as u32;
            let mut jitter = SplitMix64::new(mix64(u64::from(boot) ^ 0x6472_6976_6572));
            let d = policy.delay_ms(attempt, &mut jitter);
            assert!(d >= nominal / 2 && d <= nominal);
            let bin = ((d - nominal / 2) * bins / (nominal - nominal / 2 + 1)).min(bins - 1);
            hist[bin as usize] += 1;
        }
        // Uniform over the window: every tenth of it holds 1,000 ± 20 %; the peak connect rate is
        // therefore about 10,000 / (d/2) instead of 10,000 at once.
        assert!(hist.iter().all(|&c| (800..=1_200).contains(&c)), "attempt {attempt}: {hist:?}");
    }
}

/// Heartbeats that trickle in are let gather on the heartbeat connection
/// (`CloudConfig::heartbeat_read_coalesce`): after a short burst it waits before reading again, so
/// twenty heartbeats sent 5 ms apart while it waits reach the inbox in a few batches, not twenty,
/// and every one of them arrives. The same trickle without the wait (`Duration::ZERO`) arrives
/// one batch per heartbeat, or close to it: that is what the wait saves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_heartbeats_are_read_together() {
    bounded(60, async {
        let gathered = trickle(Duration::from_secs(1)).await;
        assert!(gathered <= 4, "20 heartbeats sent 5 ms apart during the wait came in {gathered} batches");
        let at_once = trickle(Duration::ZERO).await;
        assert!(at_once > gathered, "without the wait: {at_once} batches, with it: {gathered}");
    })
    .await;
}

/// Sends one heartbeat, then twenty more 5 ms apart, on nodes' heartbeat topics; returns the
/// batches the twenty came in, once all twenty-one arrived (in order, intact).
async fn trickle(coalesce: Duration) -> u64 {
    let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.unwrap();
    let topics = Topics::new("test").unwrap();
    let cfg = CloudConfig { heartbeat_read_coalesce: coalesce, ..cloud_cfg(&broker) };
    let cloud = MqttCloud::connect(topics.clone(), cfg).await.unwrap();
    let (client, mut eventloop) =
        rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("beats", "127.0.0.1", broker.port()), 64);
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let base = topics.base().to_owned();
    let beat = |i: u8| {
        let client = client.clone();
        let topic = format!("{base}/up/edge-{i:03}/hb");
        async move { client.publish(topic, rumqttc::QoS::AtMostOnce, false, vec![i; 17]).await.unwrap() }
    };
    let mut got = Vec::new();
    // The first heartbeat is a burst of one: the connection then waits `coalesce`.
    beat(0).await;
    while got.is_empty() {
        got.extend(cloud.recv(64).await.unwrap());
    }
    let before = cloud.stats().uplink_batches;
    for i in 1..=20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        beat(i).await;
    }
    while got.len() < 21 {
        got.extend(cloud.recv(64).await.unwrap());
    }
    let batches = cloud.stats().uplink_batches - before;
    for (i, m) in got.iter().enumerate() {
        assert_eq!((m.node.as_str(), m.kind), (format!("edge-{i:03}").as_str(), UplinkKind::Heartbeat));
        assert_eq!(m.payload, vec![i as u8; 17]);
    }
    pump.abort();
    drop(cloud);
    broker.shutdown().await;
    batches
}
