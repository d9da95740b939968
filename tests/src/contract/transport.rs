//! The contract of [`CloudTransport`] and [`NodeTransport`]: what every message transport must do.
//!
//! [`check`] runs every check below, each on a fresh fleet from the caller's factory:
//!
//! 1. **Uplink identity**: what a node publishes reaches the cloud's `recv` stamped with that
//!    node's name and the topic's kind, payload intact, in the node's publish order; `recv(0)`
//!    returns an empty batch at once.
//! 2. **Downlink routing**: a message to a node reaches that node only, one to a group reaches its
//!    subscribers only, one to the fleet reaches every node, one to a node that is not connected
//!    reaches nobody; after `unsubscribe` the group's messages stop.
//! 3. **Retained specs**: a retained spec reaches the nodes connected now (not flagged retained)
//!    and, flagged retained, a node that connects later (fleet-wide spec topics) or subscribes to
//!    the group later (group spec topics); a message sent without `retain` does not; a retained
//!    empty payload deletes the spec for later nodes.
//! 4. **Oversize payloads**: a node's batch with one is refused with
//!    [`TransportError::PayloadTooLarge`] and nothing of it is delivered; the cloud's oversize
//!    message is dropped alone with [`TransportError::OversizeDropped`] and the rest of its batch
//!    is delivered (one message must not cost the others, e.g. registration acks).
//! 5. **Closed endpoints**: `close` wakes a pending `recv` with [`TransportError::Closed`]; every later
//!    call fails with `Closed`; `close` is idempotent.
//!
//! Transports may take effect asynchronously (an MQTT SUBSCRIBE is acknowledged after `subscribe`
//! returns), which the traits allow: the checks wait for a node's subscriptions by sending probe
//! messages until one arrives, and every wait is bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kole_core::model::{DesiredDigest, NodeName, WorkloadId};
use kole_core::protocol::{self, Command, CommandKind, DecodeLimits, Heartbeat, Message, NodeHealth};
use kole_core::transport::{
    CloudTransport, Destination, GroupName, NodeDelivery, NodePublish, NodeTransport, Outbound, TransportError,
    UplinkKind,
};

use crate::{bounded, fixtures};

/// Bound on waiting for a message that must arrive.
const ARRIVAL_LIMIT: Duration = Duration::from_secs(10);

/// Ids of probe messages (never used by the checks' own messages).
const PROBE: u64 = 1 << 40;

/// One isolated fleet on the transport under test: a `MemoryHub`, or a fresh topic prefix on an
/// MQTT broker.
#[async_trait]
pub trait TransportFleet: Send + Sync {
    /// The fleet's cloud endpoint, connected (called once per check).
    async fn cloud(&self) -> Arc<dyn CloudTransport>;

    /// A connected endpoint of node `name` in the fleet.
    async fn node(&self, name: &NodeName) -> Arc<dyn NodeTransport>;

    /// A payload length that both sides must refuse with [`TransportError::PayloadTooLarge`].
    fn oversize_payload(&self) -> usize;

    /// How long to watch for a message that must *not* arrive (longer over a real network).
    fn quiet(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// Runs every check of the module documentation; `fresh` returns a new, isolated fleet each time.
/// Panics at the first broken rule.
pub async fn check<F: TransportFleet>(mut fresh: impl AsyncFnMut() -> F) {
    uplink_is_stamped_with_the_sender(&fresh().await).await;
    downlink_reaches_exactly_its_destination(&fresh().await).await;
    retained_specs_reach_later_nodes(&fresh().await).await;
    oversize_payloads_are_refused_whole(&fresh().await).await;
    closed_endpoints_refuse_every_call(&fresh().await).await;
}

/// Check 1: uplink identity and order.
pub async fn uplink_is_stamped_with_the_sender(fleet: &dyn TransportFleet) {
    let cloud = fleet.cloud().await;
    let a = fleet.node(&fixtures::node_name("node-a")).await;
    let b = fleet.node(&fixtures::node_name("node-b")).await;
    assert!(bounded(ARRIVAL_LIMIT, "cloud recv(0)", cloud.recv(0)).await.expect("recv(0)").is_empty());
    // The boot id says who really sent each heartbeat; the stamp must agree with it.
    let hb = |boot_id, seq| NodePublish { kind: UplinkKind::Heartbeat, payload: heartbeat(boot_id, seq) };
    publish(&*a, vec![hb(1, 1), hb(1, 2), hb(1, 3)]).await;
    publish(&*b, vec![hb(2, 1)]).await;

    let mut got: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
    let mut n = 0;
    while n < 4 {
        for inbound in bounded(ARRIVAL_LIMIT, "4 heartbeats at the cloud", cloud.recv(16)).await.expect("cloud recv") {
            assert_eq!(inbound.kind, UplinkKind::Heartbeat, "the topic's kind is stamped");
            match inbound.decode(&DecodeLimits::default()) {
                Ok(Message::Heartbeat(h)) => got.entry(inbound.node.to_string()).or_default().push((h.boot_id, h.seq)),
                other => panic!("the payload from {} arrived changed: {other:?}", inbound.node),
            }
            n += 1;
        }
    }
    let want =
        BTreeMap::from([("node-a".to_owned(), vec![(1, 1), (1, 2), (1, 3)]), ("node-b".to_owned(), vec![(2, 1)])]);
    assert_eq!(got, want, "each uplink stamped with its sender, in the sender's order");
    close_all(&*cloud, &[a, b]);
}

/// Check 2: node, group, fleet and absent-node destinations; unsubscribe.
pub async fn downlink_reaches_exactly_its_destination(fleet: &dyn TransportFleet) {
    let quiet = fleet.quiet();
    let cloud = fleet.cloud().await;
    let (na, nb) = (fixtures::node_name("node-a"), fixtures::node_name("node-b"));
    let a = fleet.node(&na).await;
    let b = fleet.node(&nb).await;
    let site = fixtures::group("site-1");
    ready(&*cloud, &*a, quiet).await;
    ready(&*cloud, &*b, quiet).await;
    subscribe(&*cloud, &*a, &site, quiet).await;
    assert_quiet(&*b, quiet, "node-b is in no group").await;

    send(
        &*cloud,
        vec![
            out(Destination::Node(na.clone()), command(1), false),
            out(Destination::Group(site.clone()), command(2), false),
            out(Destination::Fleet, command(3), false),
            out(Destination::Node(fixtures::node_name("node-absent")), command(4), false),
        ],
    )
    .await;
    let to_a = ids(&receive(&*a, 3, "node-a's three messages").await);
    assert_eq!(sorted(to_a), [1, 2, 3], "node-a gets its own, its group's and the fleet's message");
    assert_quiet(&*a, quiet, "node-a got more than its three messages").await;
    assert_eq!(ids(&receive(&*b, 1, "node-b's fleet message").await), [3], "node-b gets only the fleet's message");
    assert_quiet(&*b, quiet, "node-b got another node's or a group's message").await;

    // Unsubscribing may take effect a little later; it must within the bound.
    bounded(ARRIVAL_LIMIT, "unsubscribe", a.unsubscribe(&site)).await.expect("unsubscribe");
    let mut stopped = false;
    for probe in 0..50 {
        send(&*cloud, vec![out(Destination::Group(site.clone()), command(PROBE + 500 + probe), false)]).await;
        if drain(&*a, quiet).await.is_empty() {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "node-a still receives group site-1 after unsubscribing");
    close_all(&*cloud, &[a, b]);
}

/// Check 3: retained specs for later nodes; non-retained messages are not kept; deletion.
pub async fn retained_specs_reach_later_nodes(fleet: &dyn TransportFleet) {
    let quiet = fleet.quiet();
    let cloud = fleet.cloud().await;
    let site = fixtures::group("site-1");
    let w = WorkloadId::new("default/app").expect("workload id");
    let spec = Destination::WorkloadSpec(w.clone());
    let group_spec = Destination::GroupWorkloadSpec(site.clone(), w);
    let early = fleet.node(&fixtures::node_name("node-early")).await;
    ready(&*cloud, &*early, quiet).await;

    send(
        &*cloud,
        vec![
            out(spec.clone(), command(10), true),
            out(group_spec.clone(), command(11), true),
            out(Destination::Fleet, command(12), false),
        ],
    )
    .await;
    // Once the connected node has both, the transport holds the retained spec.
    let now = receive(&*early, 2, "the spec and the fleet message at the connected node").await;
    assert_eq!(sorted(ids(&now)), [10, 12], "a connected node gets the spec and the fleet message");
    assert!(now.iter().all(|d| !d.retained), "messages published while subscribed are not flagged retained");
    assert_quiet(&*early, quiet, "node-early is not in group site-1").await;

    let late = fleet.node(&fixtures::node_name("node-late")).await;
    let replayed = receive(&*late, 1, "the retained spec at a node that connected later").await;
    assert_eq!((ids(&replayed), &replayed[0].from), (vec![10], &spec), "a later node gets the retained spec");
    assert!(replayed[0].retained, "a replayed spec is flagged retained");
    assert_quiet(&*late, quiet, "a later node gets neither the non-retained fleet message nor group specs").await;
    bounded(ARRIVAL_LIMIT, "subscribe", late.subscribe(&site)).await.expect("subscribe");
    let replayed = receive(&*late, 1, "the retained group spec after subscribing").await;
    assert_eq!((ids(&replayed), &replayed[0].from), (vec![11], &group_spec), "subscribing replays the group spec");
    assert!(replayed[0].retained, "a replayed group spec is flagged retained");

    // An empty retained payload deletes the spec: the current subscribers see the deletion…
    send(&*cloud, vec![out(spec.clone(), Vec::new(), true)]).await;
    for node in [&early, &late] {
        let got = receive(&**node, 1, "the spec's deletion at a connected node").await;
        assert_eq!((&got[0].from, got[0].payload.len()), (&spec, 0), "the deletion reaches connected nodes");
    }
    // …and a node connecting afterwards gets nothing for it.
    let later = fleet.node(&fixtures::node_name("node-later")).await;
    let probes = ready(&*cloud, &*later, quiet).await;
    assert!(
        probes.iter().all(|d| d.from == Destination::Node(later.node().clone())),
        "a deleted spec is not replayed: {probes:?}"
    );
    assert_quiet(&*later, quiet, "a deleted spec is not replayed").await;
    close_all(&*cloud, &[early, late, later]);
}

/// Check 4: an oversize payload refuses a node's whole batch; the cloud drops it alone.
pub async fn oversize_payloads_are_refused_whole(fleet: &dyn TransportFleet) {
    let quiet = fleet.quiet();
    let big = fleet.oversize_payload();
    let cloud = fleet.cloud().await;
    let a = fleet.node(&fixtures::node_name("node-a")).await;
    ready(&*cloud, &*a, quiet).await;

    let batch = vec![
        NodePublish { kind: UplinkKind::Heartbeat, payload: heartbeat(1, 1) },
        NodePublish { kind: UplinkKind::Status, payload: vec![0; big] },
    ];
    match bounded(ARRIVAL_LIMIT, "publish an oversize payload", a.publish(batch)).await {
        Err(TransportError::PayloadTooLarge { len, max }) => {
            assert_eq!(len, big, "the error names the oversize payload's length");
            assert!(max < big, "the limit {max} is below the refused length {big}");
        }
        other => panic!("a node publishing {big} bytes must get PayloadTooLarge, got {other:?}"),
    }
    let leaked = bounded_quiet(quiet, cloud.recv(16)).await;
    assert!(leaked.is_none(), "nothing of a refused uplink batch may arrive: {leaked:?}");

    let batch =
        vec![out(Destination::Node(a.node().clone()), command(1), false), out(Destination::Fleet, vec![0; big], false)];
    match bounded(ARRIVAL_LIMIT, "send an oversize payload", cloud.send(batch)).await {
        Err(TransportError::OversizeDropped { dropped, largest, max, .. }) => {
            assert_eq!((dropped, largest), (1, big), "the error names the count and the length");
            assert!(max < big, "the limit {max} is below the dropped length {big}");
        }
        other => panic!("the cloud sending {big} bytes must get OversizeDropped, got {other:?}"),
    }
    let got = receive(&*a, 1, "the rest of a batch with an oversize message").await;
    assert_eq!(ids(&got), [1], "the node's command in the same batch arrives");
    assert_quiet(&*a, quiet, "the oversize message must not arrive").await;
    close_all(&*cloud, &[a]);
}

/// Check 5: closed endpoints.
pub async fn closed_endpoints_refuse_every_call(fleet: &dyn TransportFleet) {
    let cloud = fleet.cloud().await;
    let a = fleet.node(&fixtures::node_name("node-a")).await;
    let site = fixtures::group("site-1");

    let waiter = tokio::spawn({
        let a = a.clone();
        async move { a.recv(1).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.close();
    let woke = bounded(ARRIVAL_LIMIT, "a node's pending recv after close", waiter).await.expect("recv task");
    assert!(matches!(woke, Err(TransportError::Closed)), "close wakes a pending recv with Closed: {woke:?}");
    assert!(a.is_closed());
    a.close(); // idempotent
    assert!(a.is_closed());
    let hb = NodePublish { kind: UplinkKind::Heartbeat, payload: heartbeat(1, 1) };
    assert_closed(bounded(ARRIVAL_LIMIT, "publish", a.publish(vec![hb])).await, "node publish");
    assert_closed(bounded(ARRIVAL_LIMIT, "recv", a.recv(1)).await, "node recv");
    assert_closed(bounded(ARRIVAL_LIMIT, "subscribe", a.subscribe(&site)).await, "node subscribe");
    assert_closed(bounded(ARRIVAL_LIMIT, "unsubscribe", a.unsubscribe(&site)).await, "node unsubscribe");

    let waiter = tokio::spawn({
        let cloud = cloud.clone();
        async move { cloud.recv(1).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    cloud.close();
    let woke = bounded(ARRIVAL_LIMIT, "the cloud's pending recv after close", waiter).await.expect("recv task");
    assert!(matches!(woke, Err(TransportError::Closed)), "close wakes a pending recv with Closed: {woke:?}");
    assert!(cloud.is_closed());
    cloud.close();
    let msg = out(Destination::Fleet, command(1), false);
    assert_closed(bounded(ARRIVAL_LIMIT, "send", cloud.send(vec![msg])).await, "cloud send");
    assert_closed(bounded(ARRIVAL_LIMIT, "recv", cloud.recv(1)).await, "cloud recv");
}

fn assert_closed<T: std::fmt::Debug>(r: Result<T, TransportError>, what: &str) {
    assert!(matches!(r, Err(TransportError::Closed)), "{what} on a closed endpoint must fail with Closed: {r:?}");
}

fn heartbeat(boot_id: u32, seq: u32) -> Vec<u8> {
    protocol::encode(&Message::Heartbeat(Heartbeat {
        seq,
        boot_id,
        applied: DesiredDigest::EMPTY,
        health: NodeHealth::OK,
    }))
}

fn command(id: u64) -> Vec<u8> {
    protocol::encode(&Message::Command(Command { id, kind: CommandKind::Ping }))
}

fn out(to: Destination, payload: Vec<u8>, retain: bool) -> Outbound {
    Outbound { to, payload, retain }
}

async fn send(cloud: &dyn CloudTransport, batch: Vec<Outbound>) {
    bounded(ARRIVAL_LIMIT, "cloud send", cloud.send(batch)).await.unwrap_or_else(|e| panic!("cloud send: {e}"));
}

async fn publish(node: &dyn NodeTransport, batch: Vec<NodePublish>) {
    bounded(ARRIVAL_LIMIT, "node publish", node.publish(batch)).await.unwrap_or_else(|e| panic!("publish: {e}"));
}

/// Command ids of deliveries (panics on anything else, e.g. an empty payload).
fn ids(deliveries: &[NodeDelivery]) -> Vec<u64> {
    deliveries
        .iter()
        .map(|d| match d.decode(&DecodeLimits::default()) {
            Ok(Message::Command(c)) => c.id,
            other => panic!(
                "expected a command from {:?} (retained: {}), got {other:?} from payload {:?}",
                d.from, d.retained, d.payload
            ),
        })
        .collect()
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// Exactly `n` deliveries (fewer within the bound fails), leaving any further ones queued.
async fn receive(node: &dyn NodeTransport, n: usize, what: &str) -> Vec<NodeDelivery> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = bounded(ARRIVAL_LIMIT, what, node.recv(n - got.len())).await;
        got.extend(batch.unwrap_or_else(|e| panic!("{what}: recv failed: {e}")));
    }
    got
}

/// `Some(result)` if `f` completes within `quiet`, else `None`.
async fn bounded_quiet<T>(quiet: Duration, f: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(quiet, f).await.ok()
}

/// Everything that arrives until `node` has been quiet for `quiet`.
async fn drain(node: &dyn NodeTransport, quiet: Duration) -> Vec<NodeDelivery> {
    let mut got = Vec::new();
    while let Some(batch) = bounded_quiet(quiet, node.recv(64)).await {
        got.extend(batch.unwrap_or_else(|e| panic!("recv while draining failed: {e}")));
        assert!(got.len() < 10_000, "a node keeps receiving: {:?}", got.last());
    }
    got
}

async fn assert_quiet(node: &dyn NodeTransport, quiet: Duration, what: &str) {
    let extra = bounded_quiet(quiet, node.recv(64)).await;
    assert!(extra.is_none(), "{what}: {extra:?}");
}

/// Waits until deliveries to `dest` reach `node`, sending probes; returns what was drained after.
async fn probe(
    cloud: &dyn CloudTransport,
    node: &dyn NodeTransport,
    dest: Destination,
    quiet: Duration,
) -> Vec<NodeDelivery> {
    for n in 0..100 {
        send(cloud, vec![out(dest.clone(), command(PROBE + n), false)]).await;
        if let Some(batch) = bounded_quiet(quiet, node.recv(64)).await {
            let mut got = batch.unwrap_or_else(|e| panic!("recv while probing {dest:?} failed: {e}"));
            if got.iter().any(|d| d.from == dest) {
                got.extend(drain(node, quiet).await);
                return got;
            }
        }
    }
    panic!("{} never received a probe to {dest:?}", node.node())
}

/// Waits until `node` receives its own topic (its connect-time subscriptions are in place).
async fn ready(cloud: &dyn CloudTransport, node: &dyn NodeTransport, quiet: Duration) -> Vec<NodeDelivery> {
    probe(cloud, node, Destination::Node(node.node().clone()), quiet).await
}

/// Subscribes `node` to `group` and waits until the group's messages reach it.
async fn subscribe(cloud: &dyn CloudTransport, node: &dyn NodeTransport, group: &GroupName, quiet: Duration) {
    bounded(ARRIVAL_LIMIT, "subscribe", node.subscribe(group)).await.unwrap_or_else(|e| panic!("subscribe: {e}"));
    probe(cloud, node, Destination::Group(group.clone()), quiet).await;
}

fn close_all(cloud: &dyn CloudTransport, nodes: &[Arc<dyn NodeTransport>]) {
    for n in nodes {
        n.close();
    }
    cloud.close();
}
