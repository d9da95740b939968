//! The simulated side of the MQTT bench: the reference fleet's agents multiplexed over a few
//! plain rumqttc connections, with their routing and timers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kole_core::agent::{
    Agent, AgentConfig, AgentEvent, AgentInput, AgentOutputs, GroupChange, RecordingRuntime, SpecCache,
};
use kole_core::clock::wall_clock_now;
use kole_core::model::{NodeName, Timestamp};
use kole_core::protocol::GroupName;
use kole_core::transport::{Destination, NodeDelivery};
use kole_mqtt::Topics;
use kole_mqtt::uplink_qos;
use rumqttc::QoS;
use tokio::sync::mpsc;

use super::MqttBenchConfig;
use super::wire::SimClient;
use crate::dataset::ReferenceFleet;

/// The simulated agents and their routing.
pub(super) struct SimFleet {
    topics: Topics,
    pub(super) agents: Vec<Agent>,
    index: HashMap<NodeName, u32>,
    groups: HashMap<GroupName, HashSet<u32>>,
    pub(super) clients: Vec<SimClient>,
    /// Publishes the request channel could not take yet, per connection (bounded by what the
    /// agents emit in one round: a few messages per node).
    backlog: Vec<VecDeque<rumqttc::Publish>>,
    wakes: BTreeMap<u64, Vec<u32>>,
    wake_at: Vec<u64>,
    runtime: RecordingRuntime,
    out: AgentOutputs,
    specs: SpecCache,
    wall_ms: u64,
    start: Instant,
    /// Added to the agents' clock (the heartbeat phase jumps it by one interval).
    pub(super) offset_ms: u64,
    /// Agents acknowledged at least once, and how many.
    acked: Vec<bool>,
    pub(super) registered: u64,
    /// Agents connected so far (in index order), and how many may wait for their ack at once.
    connected: usize,
    pub(super) register_window: usize,
}

const NEVER: u64 = u64::MAX;

impl SimFleet {
    pub(super) fn new(cfg: &MqttBenchConfig, c: usize, topics: Topics) -> Self {
        let fleet = ReferenceFleet::new(cfg.nodes, cfg.seed);
        let agents = crate::sim::reference_agents(&fleet, Arc::new(crate::sim::simulated_agent_config()));
        let index: HashMap<NodeName, u32> =
            agents.iter().enumerate().map(|(i, a)| (a.name().clone(), i as u32)).collect();
        let wall_ms = wall_clock_now().as_millis();
        Self {
            topics,
            wake_at: vec![NEVER; agents.len()],
            agents,
            index,
            groups: HashMap::new(),
            clients: Vec::with_capacity(c),
            backlog: (0..c).map(|_| VecDeque::new()).collect(),
            wakes: BTreeMap::new(),
            runtime: RecordingRuntime::instant(),
            out: AgentOutputs::default(),
            specs: SpecCache::new(AgentConfig::default().decode_limits),
            wall_ms,
            start: Instant::now(),
            offset_ms: 0,
            acked: vec![false; cfg.nodes],
            registered: 0,
            connected: 0,
            register_window: 0,
        }
    }

    fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp::from_millis(self.wall_ms.saturating_add(elapsed).saturating_add(self.offset_ms))
    }

    /// Runs the agents (deliveries and timers) until `done` or `deadline`; whether `done` held.
    pub(super) async fn run_until(
        &mut self,
        down: &mut mpsc::Receiver<rumqttc::Publish>,
        deadline: Instant,
        mut done: impl FnMut(&Self) -> bool,
    ) -> bool {
        let mut batch = Vec::with_capacity(4096);
        loop {
            self.connect_more();
            self.flush_backlog();
            self.wake_due();
            if done(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            let busy = self.backlog.iter().any(|b| !b.is_empty());
            let next = self.wakes.first_key_value().map(|(&t, _)| t).unwrap_or(NEVER);
            let wait_ms = next.saturating_sub(self.now().as_millis()).min(if busy { 1 } else { 20 });
            tokio::select! {
                k = down.recv_many(&mut batch, 4096) => {
                    if k == 0 {
                        return done(self);
                    }
                    for p in batch.drain(..) {
                        self.dispatch(p);
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    /// Connects more agents while fewer than `register_window` wait for their ack: nodes of a
    /// real fleet come up spread by their connect backoff and the broker's accept rate, and an
    /// agent's registration timer must not run while its message waits in this simulator's own
    /// queue (which a real node does not have).
    fn connect_more(&mut self) {
        let outstanding = self.connected - self.registered as usize;
        if self.connected >= self.agents.len() || outstanding >= self.register_window {
            return;
        }
        let end = (self.connected + self.register_window - outstanding).min(self.agents.len());
        for i in self.connected..end {
            self.connected = i + 1;
            self.input(i as u32, AgentInput::Connected);
        }
    }

    fn wake_due(&mut self) {
        let now = self.now().as_millis();
        while let Some(entry) = self.wakes.first_entry() {
            let at = *entry.key();
            if at > now {
                break;
            }
            for id in entry.remove() {
                if self.wake_at[id as usize] == at {
                    self.wake_at[id as usize] = NEVER;
                    self.input(id, AgentInput::Tick);
                }
            }
        }
    }

    fn dispatch(&mut self, p: rumqttc::Publish) {
        let Ok(from) = self.topics.parse_downlink(&p.topic) else { return };
        // The payload is a slice of rumqttc's read buffer, shared by every agent it reaches.
        let d = NodeDelivery { from, payload: p.payload, retained: p.retain };
        let targets: Vec<u32> = match &d.from {
            Destination::Node(name) => self.index.get(name).copied().into_iter().collect(),
            Destination::Fleet | Destination::WorkloadSpec(_) => (0..self.agents.len() as u32).collect(),
            Destination::Group(g) | Destination::GroupWorkloadSpec(g, _) => {
                self.groups.get(g).map(|m| m.iter().copied().collect()).unwrap_or_default()
            }
        };
        let shared = if matches!(d.from, Destination::WorkloadSpec(_) | Destination::GroupWorkloadSpec(..)) {
            self.specs.get(&d.payload)
        } else {
            None
        };
        for i in targets {
            match &shared {
                Some((w, t)) => {
                    self.input(i, AgentInput::SharedSpec { workload: w, wave_threshold: *t, from: &d.from })
                }
                None => self.input(i, AgentInput::Delivery(&d)),
            }
        }
    }

    fn input(&mut self, id: u32, input: AgentInput<'_>) {
        let i = id as usize;
        let now = self.now();
        let c = i % self.clients.len().max(1);
        self.out.clear();
        self.agents[i].handle(input, now, &mut self.runtime, &mut self.out);
        for p in self.out.publish.drain(..) {
            let topic = self.topics.uplink(self.agents[i].name(), p.kind);
            let mut msg = rumqttc::Publish::new(topic, uplink_qos(p.kind), p.payload);
            msg.retain = false;
            if self.backlog[c].is_empty() {
                if let Err(back) = self.clients[c].try_publish(msg) {
                    self.backlog[c].push_back(back);
                }
            } else {
                self.backlog[c].push_back(msg);
            }
        }
        for g in self.out.groups.drain(..) {
            match g {
                GroupChange::Subscribe(g) => {
                    let members = self.groups.entry(g.clone()).or_default();
                    if members.is_empty() {
                        // One subscription per group for the whole simulator (connection 0).
                        self.clients[0].try_subscribe(self.topics.group_filter(&g), QoS::AtLeastOnce);
                    }
                    members.insert(id);
                }
                GroupChange::Unsubscribe(g) => {
                    if let Some(m) = self.groups.get_mut(&g) {
                        m.remove(&id);
                    }
                }
            }
        }
        if !self.acked[i] && self.out.events.iter().any(|e| matches!(e, AgentEvent::Registered { .. })) {
            // Distinct agents: a retried registration is acknowledged more than once.
            self.acked[i] = true;
            self.registered += 1;
        }
        if let Some(at) = self.out.next_wake {
            let at = at.as_millis();
            if at != self.wake_at[i] {
                self.wake_at[i] = at;
                self.wakes.entry(at).or_default().push(id);
            }
        }
    }

    fn flush_backlog(&mut self) {
        for (c, backlog) in self.backlog.iter_mut().enumerate() {
            while let Some(msg) = backlog.pop_front() {
                if let Err(back) = self.clients[c].try_publish(msg) {
                    backlog.push_front(back);
                    break;
                }
            }
        }
    }
}
