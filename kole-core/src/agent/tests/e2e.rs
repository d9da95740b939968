//! The real engine, the in-memory hub and a few hundred agents in one process, pumped
//! synchronously with virtual time: registration, a staged rollout to convergence, a rollout
//! halted by failures, and a rollback.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::agent::{
    Agent, AgentConfig, AgentIdentity, AgentInput, AgentOutputs, GroupChange, LinkState, RecordingRuntime, SpecCache,
};
use crate::cache::NodeCache;
use crate::engine::{Engine, EngineConfig, EngineEvent, Input, Outputs, WorkloadCommand};
use crate::model::{
    DeliveryMode, Labels, NodeInfo, NodeName, RolloutStrategy, Selector, Timestamp, Workload, WorkloadId,
    WorkloadPhase, stable_hash,
};
use crate::protocol::{self, MessageKind};
use crate::transport::memory::{MemoryCloud, MemoryConfig, MemoryHub, MemoryNode};
use crate::transport::{CloudTransport, MessageTransport, NodeTransport};

/// Polls a future once: the in-memory hub's futures are ready at once unless a receive finds
/// nothing, which is what "nothing to do" means to the pump.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

const HEARTBEAT_MS: u32 = 5_000;
const STEP_MS: u64 = 500;

struct Fleet {
    engine: Engine,
    _hub: MemoryHub,
    cloud: MemoryCloud,
    agents: Vec<Agent>,
    nodes: Vec<MemoryNode>,
    runtime: RecordingRuntime,
    out: AgentOutputs,
    eout: Outputs,
    events: Vec<EngineEvent>,
    /// Fan-out deliveries share their payload; decode each spec once and share the workload.
    specs: SpecCache,
    now: u64,
}

impl Fleet {
    fn new(n: usize, runtime: RecordingRuntime) -> Self {
        Self::with(n, runtime, false)
    }

    /// With `signed`, the engine signs its downlink and every agent pins its key.
    fn with(n: usize, runtime: RecordingRuntime, signed: bool) -> Self {
        let now = 1_700_000_000_000;
        let signer = crate::protocol::seal::DownlinkSigner::from_seed([3; 32]);
        let engine = Engine::new(
            EngineConfig {
                heartbeat_interval_ms: HEARTBEAT_MS,
                convergence_grace_ms: 10_000,
                ..EngineConfig::default()
            },
            NodeCache::new(),
            Timestamp::from_millis(now),
        );
        let engine = if signed { engine.with_signer(Arc::new(signer.clone())) } else { engine };
        let hub = MemoryHub::new(MemoryConfig::default());
        let cloud = hub.cloud().unwrap();
        let trust = signed.then(|| {
            let mut t = crate::protocol::seal::TrustedKeys::new();
            t.trust_text(&signer.public_text()).unwrap();
            Arc::new(t)
        });
        let config = Arc::new(AgentConfig { runtime_poll_ms: 0, trust, ..AgentConfig::default() });
        let info = Arc::new(NodeInfo {
            arch: "arm64".into(),
            os: "linux-6.1".into(),
            agent_version: "0.1.0".into(),
            addresses: vec![],
        });
        let label_sets: Vec<Arc<Labels>> = (0..6)
            .map(|k| {
                let region = if k % 2 == 0 { "east" } else { "west" };
                let tier = if k < 5 { "cdn" } else { "retail" };
                Arc::new(Labels::from_pairs([("topology.kubernetes.io/region", region), ("tier", tier)]).unwrap())
            })
            .collect();
        let mut agents = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = NodeName::new(format!("cn-{}-s{:03}-{i:05}", i % 7, i / 13)).unwrap();
            let identity = AgentIdentity { name: name.clone(), labels: label_sets[i % 6].clone(), info: info.clone() };
            let boot = (stable_hash(9, name.as_str().as_bytes()) as u32).max(1);
            agents.push(Agent::new(config.clone(), identity, boot, None));
            nodes.push(hub.connect(name).unwrap());
        }
        let mut fleet = Self {
            engine,
            _hub: hub,
            cloud,
            agents,
            nodes,
            runtime,
            out: AgentOutputs::default(),
            eout: Outputs::default(),
            events: Vec::new(),
            specs: SpecCache::default(),
            now,
        };
        for i in 0..n {
            fleet.input(i, AgentInput::Connected);
        }
        fleet
    }

    /// Hands one input to agent `i` and carries its outputs to the hub.
    fn input(&mut self, i: usize, input: AgentInput<'_>) {
        self.out.clear();
        self.agents[i].handle(input, Timestamp::from_millis(self.now), &mut self.runtime, &mut self.out);
        let node = &self.nodes[i];
        for change in self.out.groups.drain(..) {
            match change {
                GroupChange::Subscribe(g) => now_or_never(node.subscribe(&g)).unwrap().unwrap(),
                GroupChange::Unsubscribe(g) => now_or_never(node.unsubscribe(&g)).unwrap().unwrap(),
            }
        }
        if !self.out.publish.is_empty() {
            let batch = std::mem::take(&mut self.out.publish);
            now_or_never(node.publish(batch)).unwrap().unwrap();
        }
    }

    fn engine(&mut self, input: Input<'_>) {
        self.eout.clear();
        self.engine.handle(input, Timestamp::from_millis(self.now), &mut self.eout);
        self.events.append(&mut self.eout.events);
        if !self.eout.messages.is_empty() {
            let batch = std::mem::take(&mut self.eout.messages);
            now_or_never(self.cloud.send(batch)).unwrap().unwrap();
        }
    }

    /// Moves messages until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.agents.len() {
                // A closed (partitioned) endpoint receives nothing.
                let Some(Ok(batch)) = now_or_never(self.nodes[i].recv(256)) else {
                    continue;
                };
                moved = true;
                for d in batch {
                    let is_spec =
                        protocol::peek_kind(&d.payload, &Default::default()).ok() == Some(MessageKind::WorkloadSpec);
                    if is_spec {
                        let Some((w, t)) = self.specs.get(&d.payload) else { panic!("undecodable spec") };
                        self.input(i, AgentInput::SharedSpec { workload: &w, wave_threshold: t, from: &d.from });
                    } else {
                        self.input(i, AgentInput::Delivery(&d));
                    }
                }
            }
            if let Some(batch) = now_or_never(self.cloud.recv(1 << 16)) {
                moved = true;
                let batch = batch.unwrap();
                self.engine(Input::Uplink(&batch));
            }
            if !moved {
                break;
            }
        }
    }

    /// One step of virtual time: agents' timers, the engine's tick, and every message moved.
    fn step(&mut self) {
        self.now += STEP_MS;
        for i in 0..self.agents.len() {
            if self.agents[i].next_wake().is_some_and(|t| t.as_millis() <= self.now) {
                self.input(i, AgentInput::Tick);
            }
        }
        self.settle();
        self.engine(Input::Tick);
        self.settle();
    }

    fn run_until(&mut self, max_steps: usize, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..max_steps {
            if done(self) {
                return;
            }
            self.step();
        }
        panic!("not {what} after {max_steps} steps; events: {:?}", self.events);
    }

    fn converged(&mut self) -> bool {
        (0..self.agents.len()).all(|i| {
            let name = self.agents[i].name().as_str().to_owned();
            self.engine.desired_digest(&name) == Some(self.agents[i].applied())
        })
    }

    fn version_of(&self, i: usize, id: &WorkloadId) -> Option<u64> {
        self.agents[i].workloads().find(|(w, _)| w.id == *id).map(|(w, _)| w.version)
    }

    fn apply(&mut self, workload: Workload) {
        self.engine(Input::Workload(&WorkloadCommand::Apply { workload, progress: None }));
        self.settle();
    }
}

fn app(version: u64) -> Workload {
    Workload {
        id: WorkloadId::new("default/app").unwrap(),
        version,
        spec: format!("app v{version}").into_bytes(),
        selector: Selector::parse("tier=cdn").unwrap(),
        delivery: DeliveryMode::Broadcast,
        rollout: RolloutStrategy { waves: vec![10, 50, 100], ..RolloutStrategy::default() },
    }
}

#[test]
fn fleet_registers_rolls_out_in_waves_halts_on_failures_and_rolls_back() {
    rolls_out_halts_and_rolls_back(false);
}

/// The same life over signed downlink: every ack, spec, desired set and command is signed and
/// verified, and the rollback (a lower version) passes because it is signed after what it undoes.
#[test]
fn the_same_over_signed_downlink() {
    rolls_out_halts_and_rolls_back(true);
}

fn rolls_out_halts_and_rolls_back(signed: bool) {
    const N: usize = 300;
    let mut runtime = RecordingRuntime::instant();
    // Version 3 fails on about a third of the nodes.
    runtime.outcome_with(|node, w| {
        (w.version == 3 && stable_hash(3, node.as_str().as_bytes()).is_multiple_of(3)).then_some(WorkloadPhase::Failed)
    });
    let mut fleet = Fleet::with(N, runtime, signed);
    fleet.run_until(20, "registered", |f| f.agents.iter().all(|a| a.link() == LinkState::Registered));
    assert_eq!(fleet.engine.stats().registered_new, N as u64);
    // Groups came from the ack.
    assert!(fleet.agents.iter().all(|a| a.groups().len() == 1));

    // A broadcast workload in waves [10, 50, 100]: every wave is reached and everyone converges.
    let id = app(1).id.clone();
    fleet.apply(app(1));
    let reached_first: usize = (0..N).filter(|&i| fleet.version_of(i, &id) == Some(1)).count();
    assert!((10..70).contains(&reached_first), "first wave reached {reached_first} of {N}");
    fleet.run_until(200, "rolled out", |f| {
        f.events.iter().any(|e| matches!(e, EngineEvent::RolloutComplete { .. })) && f.converged()
    });
    let waves: Vec<usize> = fleet
        .events
        .iter()
        .filter_map(|e| if let EngineEvent::WaveAdvanced { wave, .. } = e { Some(*wave) } else { None })
        .collect();
    assert_eq!(waves, [1, 2]);
    let cdn = |f: &Fleet, i: usize| f.agents[i].labels().get("tier") == Some("cdn");
    for i in 0..N {
        assert_eq!(fleet.version_of(i, &id), cdn(&fleet, i).then_some(1), "node {i}");
    }

    // Version 2 rolls out fine; nodes outside the reached waves keep version 1 meanwhile.
    fleet.events.clear();
    fleet.apply(app(2));
    let (v1, v2) = (0..N).fold((0, 0), |(a, b), i| match fleet.version_of(i, &id) {
        Some(1) => (a + 1, b),
        Some(2) => (a, b + 1),
        _ => (a, b),
    });
    assert!(v1 > 0 && v2 > 0 && v1 > v2, "v1 {v1}, v2 {v2}");
    fleet.run_until(200, "v2 rolled out", |f| {
        f.events.iter().any(|e| matches!(e, EngineEvent::RolloutComplete { .. })) && f.converged()
    });

    // Version 3 fails on some nodes: the rollout halts in its first wave.
    fleet.events.clear();
    fleet.apply(app(3));
    fleet.run_until(100, "halted", |f| f.events.iter().any(|e| matches!(e, EngineEvent::RolloutHalted { .. })));
    assert!(!fleet.events.iter().any(|e| matches!(e, EngineEvent::WaveAdvanced { .. })), "{:?}", fleet.events);
    let failed = (0..N)
        .filter(|&i| fleet.agents[i].workloads().any(|(w, p)| w.version == 3 && p == WorkloadPhase::Failed))
        .count();
    assert!(failed > 0);
    let on_v3 = (0..N).filter(|&i| fleet.version_of(i, &id) == Some(3)).count();
    assert!(on_v3 < N / 5, "the halt kept v3 to the first wave ({on_v3})");
    // Even halted, the fleet is consistent with the engine's desired state.
    fleet.run_until(100, "converged while halted", Fleet::converged);

    // Rollback: everyone returns to version 2.
    fleet.events.clear();
    fleet.engine(Input::Workload(&WorkloadCommand::Rollback(id.clone())));
    fleet.settle();
    fleet.run_until(100, "rolled back", Fleet::converged);
    for i in 0..N {
        assert_eq!(fleet.version_of(i, &id), cdn(&fleet, i).then_some(2), "node {i}");
    }
    assert!(fleet.agents.iter().all(|a| a.workloads().all(|(_, p)| p == WorkloadPhase::Running)));
}

#[test]
fn group_delivery_and_catch_up_after_a_partition() {
    const N: usize = 120;
    let mut fleet = Fleet::new(N, RecordingRuntime::instant());
    fleet.run_until(20, "registered", |f| f.agents.iter().all(|a| a.link() == LinkState::Registered));
    // A workload for the east region, delivered on the region's group topic.
    let east = Workload {
        id: WorkloadId::new("default/east-only").unwrap(),
        version: 1,
        spec: b"east".to_vec(),
        selector: Selector::parse("topology.kubernetes.io/region=east").unwrap(),
        delivery: DeliveryMode::Group("region.east".into()),
        rollout: RolloutStrategy::default(),
    };
    // Cut one east node off (its deliveries are lost), apply, then let it back.
    let cut = (0..N).find(|&i| fleet.agents[i].labels().get("topology.kubernetes.io/region") == Some("east")).unwrap();
    fleet.input(cut, AgentInput::Disconnected);
    fleet.nodes[cut].close();
    fleet.apply(east.clone());
    // The cut node holds the rollout until the engine sees it offline (3 heartbeat intervals).
    fleet.run_until(100, "complete", |f| f.events.iter().any(|e| matches!(e, EngineEvent::RolloutComplete { .. })));
    assert_eq!(fleet.version_of(cut, &east.id), None, "the partitioned node missed the spec");
    // Back: a new session, re-registration, the group's retained spec (or a catch-up) arrives.
    let name = fleet.agents[cut].name().clone();
    fleet.nodes[cut] = fleet._hub.connect(name).unwrap();
    fleet.input(cut, AgentInput::Connected);
    fleet.run_until(60, "converged", Fleet::converged);
    for i in 0..N {
        let is_east = fleet.agents[i].labels().get("topology.kubernetes.io/region") == Some("east");
        assert_eq!(fleet.version_of(i, &east.id), is_east.then_some(1), "node {i}");
    }
}
