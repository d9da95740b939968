//! The whole-system simulator: one engine and N agents in one process, over the deterministic
//! [`SimNetwork`], in virtual time.
//!
//! Everything is a state machine driven by this loop, so a run is reproducible from its seed:
//! the same fleet, fault plan and calls give the same messages in the same order. Time only moves
//! when nothing is due at the current instant, and then jumps to the next due event (a message,
//! an agent timer, or the engine's tick), so idle virtual minutes cost nothing.
//!
//! ```
//! use kole_sim::sim::{SimConfig, Simulation};
//!
//! let mut sim = Simulation::new(SimConfig { nodes: 200, ..SimConfig::default() });
//! sim.connect_all();
//! assert!(sim.run_until_registered(60_000));
//! assert_eq!(sim.engine().stats().registered_new, 200);
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::net::{NodeId, SimNetwork};
use kole_core::agent::{
    Agent, AgentConfig, AgentEvent, AgentIdentity, AgentInput, AgentOutputs, GroupChange, LinkState, PersistedState,
    RecordingRuntime, SpecCache,
};
use kole_core::cache::NodeCache;
use kole_core::engine::{Engine, EngineConfig, EngineEvent, Input, Outputs, WorkloadCommand};
use kole_core::model::{DesiredDigest, Labels, NodeInfo, Timestamp};
use kole_core::transport::fault::FaultPlan;
use kole_core::transport::{Destination, Inbound, NodeDelivery, Outbound};

use crate::dataset::ReferenceFleet;

/// Simulation settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Fleet size (nodes of the reference data set).
    pub nodes: usize,
    /// Seed of the fleet, the agents' boot ids and (unless set there) the fault plan.
    pub seed: u64,
    /// Network faults.
    pub plan: FaultPlan,
    /// The engine's settings.
    pub engine: EngineConfig,
    /// The agents' settings (shared by all). Default: [`simulated_agent_config`].
    pub agent: AgentConfig,
    /// Virtual time between engine ticks, in milliseconds. Default 1,000.
    pub engine_tick_ms: u64,
    /// Most uplink messages handed to the engine per batch. Default 16,384.
    pub uplink_batch: usize,
    /// Most downlink deliveries handed to agents per round. Default 65,536.
    pub downlink_batch: usize,
    /// Keep each agent's last persisted state, so agents can be restarted with it (costs memory).
    pub keep_agent_state: bool,
    /// Wake-ups due in one virtual millisecond from which the engine takes their uplink on a
    /// thread of its own while the agents are still making it (see [`SimStats::engine_streamed_rounds`]).
    /// The engine then handles the same messages in the same order and its replies are routed at
    /// the same point, after every wake-up of that millisecond, as without it: only the size of
    /// the engine's calls differs. Default 256; `usize::MAX` never.
    pub stream_min: usize,
    /// Virtual start time, in milliseconds since the epoch.
    pub start_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            nodes: 1_000,
            seed: 42,
            plan: FaultPlan::default(),
            engine: EngineConfig::default(),
            agent: simulated_agent_config(),
            engine_tick_ms: 1_000,
            uplink_batch: 16_384,
            downlink_batch: 65_536,
            keep_agent_state: false,
            stream_min: 256,
            start_ms: crate::dataset::REFERENCE_NOW_SECS * 1000,
        }
    }
}

/// The agents' settings in every simulator of this crate: the defaults, except that the agents
/// do not poll their runtime on a timer (`runtime_poll_ms` 0; they still poll when they wake for a
/// heartbeat).
///
/// The simulated runtime is a [`RecordingRuntime::instant`] that nothing outside the agent can
/// change: a workload's phase is decided when it is applied and never moves by itself, so a poll
/// can find nothing and sends nothing. On a real node the once-a-second poll is the node's own
/// work; in a simulator it is a million timer wake-ups a second, run one after another on the
/// simulator's cores, slowing the load the system under test receives (measured: the MQTT
/// bench's fleet spent most of its distribution phase in them). Set a poll interval here to
/// simulate that cost anyway.
pub fn simulated_agent_config() -> AgentConfig {
    AgentConfig { runtime_poll_ms: 0, ..AgentConfig::default() }
}

/// Counters of the simulation loop.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Agents registered (acks accepted), over the run.
    pub agent_registrations: u64,
    /// Uplink messages handed to the engine.
    pub uplink: u64,
    /// Downlink deliveries handed to agents.
    pub downlink: u64,
    /// Agent timer wake-ups.
    pub wakeups: u64,
    /// Engine ticks.
    pub engine_ticks: u64,
    /// Messages the engine asked to send.
    pub engine_messages: u64,
    /// Wall-clock nanoseconds spent inside the engine.
    pub engine_wall_ns: u64,
    /// Steps in which the engine ran on a thread of its own beside the agents: those that handed
    /// it 4,096 uplink messages or more.
    pub engine_overlapped_steps: u64,
    /// Rounds of wake-ups (one virtual millisecond's, [`SimConfig::stream_min`] or more, stale
    /// calendar entries left out) whose uplink the engine took on its own thread, [`STREAM_PART`]
    /// wake-ups' worth at a time, while the agents went on; a round that sent nothing is not
    /// counted.
    pub engine_streamed_rounds: u64,
}

/// One engine, N agents and the network between them.
///
/// The engine and the rest of the world (agents, network, calendar) are kept apart so that, where
/// a step has enough work on both sides, the engine handles a batch of uplink messages on a thread
/// of its own while the agents run.
pub struct Simulation {
    /// The engine; `None` only inside a step, while [`EngineThread`] has it.
    engine: Option<Box<Engine>>,
    /// The thread that runs the engine beside the agents, started by the first step that needs it.
    thread: Option<EngineThread>,
    out: Outputs,
    events: Vec<EngineEvent>,
    /// The uplink batch handed to the engine, reused from batch to batch.
    up_batch: Vec<Inbound>,
    w: World,
}

/// Everything of a [`Simulation`] but the engine: what the agents' side of a step touches.
struct World {
    cfg: SimConfig,
    fleet: ReferenceFleet,
    net: SimNetwork,
    agents: Vec<Agent>,
    persisted: Vec<Option<PersistedState>>,
    runtime: RecordingRuntime,
    /// Agent wake-ups by virtual millisecond (see [`Calendar`]).
    wakes: Calendar,
    now_ms: u64,
    next_tick_ms: u64,
    aout: AgentOutputs,
    specs: SpecCache,
    stats: SimStats,
    /// The downlink round handed to the agents, reused from round to round.
    down_batch: Vec<(NodeId, NodeDelivery)>,
    /// Messages the engine sent and the network has not been handed yet.
    pending: Vec<Outbound>,
}

/// Wake-ups warmed together by [`Simulation::warm`]: enough independent misses to keep the
/// memory system busy, few enough that their lines are still cached when each agent runs.
const WARM_GROUP: usize = 16;

/// Milliseconds the calendar's ring covers ahead of its earliest bucket (a power of two).
const RING_MS: u64 = 1 << 16;

/// Wake-ups the calendar stages before it files them: enough to overlap many misses, few enough
/// to stay in a core's cache (64 KiB). A workload reaching ten million agents in one instant
/// files ten million wake-ups before the calendar is read again; staged whole, they took 160 MB.
const STAGED_MAX: usize = 4096;

/// Agent wake-ups by virtual millisecond: a calendar, not a heap, because a million timers spread
/// over an interval share milliseconds and a heap's sift is a cache miss per level. The next
/// [`RING_MS`] milliseconds are a ring of per-millisecond buckets (a bitmap finds the next
/// non-empty one, and a drained bucket's memory is reused), so the common case, a heartbeat or a
/// retry due within a minute, costs a push; later times go to a B-tree.
///
/// A push only appends to a staging list; the list is filed into the buckets when the calendar is
/// next read or holds [`STAGED_MAX`] wake-ups. An agent files its wake-up in the middle of its own
/// work, where the random bucket's cache miss stalls it; filed together in one tight loop, those
/// misses overlap.
struct Calendar {
    /// No wake-up is due before this; the ring holds times in `[cursor, cursor + RING_MS)`.
    cursor: u64,
    ring: Vec<Vec<u32>>,
    /// One bit per ring bucket: whether it holds anything.
    bits: Vec<u64>,
    far: BTreeMap<u64, Vec<u32>>,
    spare: Vec<Vec<u32>>,
    /// Pushed since the calendar was last read, in push order.
    staged: Vec<(u64, u32)>,
}

impl Calendar {
    /// A calendar whose ring starts at `start` (the simulation's first instant): a ring left at 0
    /// would file every wake-up of the first minute under the B-tree.
    fn new(start: u64) -> Self {
        Self {
            cursor: start,
            ring: (0..RING_MS).map(|_| Vec::new()).collect(),
            bits: vec![0; (RING_MS / 64) as usize],
            far: BTreeMap::new(),
            spare: Vec::new(),
            staged: Vec::new(),
        }
    }

    /// Files `id` under `at` (or, when `at` is before every bucket still open, under the earliest,
    /// which is due now), once the calendar is next read.
    fn push(&mut self, at: u64, id: u32) {
        self.staged.push((at, id));
        if self.staged.len() >= STAGED_MAX {
            self.file_staged();
        }
    }

    /// Files the staged wake-ups, in push order (a bucket's order is its wake-ups' order).
    fn file_staged(&mut self) {
        let mut staged = std::mem::take(&mut self.staged);
        for &(at, id) in &staged {
            self.file(at, id);
        }
        staged.clear();
        self.staged = staged;
    }

    fn file(&mut self, at: u64, id: u32) {
        let at = at.max(self.cursor);
        if at - self.cursor < RING_MS {
            let i = (at % RING_MS) as usize;
            if self.ring[i].is_empty() {
                if let Some(v) = self.spare.pop() {
                    self.ring[i] = v;
                }
                self.bits[i / 64] |= 1 << (i % 64);
            }
            self.ring[i].push(id);
        } else {
            self.far.entry(at).or_default().push(id);
        }
    }

    /// The earliest time with a wake-up filed.
    fn first(&mut self) -> Option<u64> {
        self.file_staged();
        let ring = self.ring_first();
        let far = self.far.first_key_value().map(|(&t, _)| t);
        match (ring, far) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn ring_first(&self) -> Option<u64> {
        let words = self.bits.len();
        let start = (self.cursor % RING_MS) as usize;
        let (w0, b0) = (start / 64, start % 64);
        // The first word from the cursor's bit on, then whole words around the ring, then the
        // first word's bits before the cursor's (the ring's far end).
        let first = self.bits[w0] & (!0u64 << b0);
        let found = if first != 0 {
            Some(w0 * 64 + first.trailing_zeros() as usize)
        } else {
            (1..words).find_map(|k| {
                let w = (w0 + k) % words;
                (self.bits[w] != 0).then(|| w * 64 + self.bits[w].trailing_zeros() as usize)
            })
        };
        let found = found.or_else(|| {
            let low = self.bits[w0] & !(!0u64 << b0);
            (low != 0).then(|| w0 * 64 + low.trailing_zeros() as usize)
        })?;
        let offset = (found + RING_MS as usize - start) % RING_MS as usize;
        Some(self.cursor + offset as u64)
    }

    /// The earliest time with wake-ups, if it is at most `now`, and its wake-ups (hand the list
    /// back with [`Calendar::recycle`]).
    fn pop_due(&mut self, now: u64) -> Option<(u64, Vec<u32>)> {
        let t = self.first().filter(|&t| t <= now)?;
        self.cursor = t;
        let i = (t % RING_MS) as usize;
        let mut due = if self.bits[i / 64] & (1 << (i % 64)) != 0 {
            self.bits[i / 64] &= !(1 << (i % 64));
            std::mem::take(&mut self.ring[i])
        } else {
            Vec::new()
        };
        if self.far.first_key_value().is_some_and(|(&f, _)| f == t)
            && let Some(mut more) = self.far.remove(&t)
        {
            due.append(&mut more);
        }
        Some((t, due))
    }

    /// Returns a drained list's memory for reuse.
    fn recycle(&mut self, mut v: Vec<u32>) {
        // Keep enough lists for every bucket a busy second refills; drop the rest.
        if self.spare.len() < 4096 && v.capacity() > 0 {
            v.clear();
            self.spare.push(v);
        }
    }
}

/// Whether a delivery carries a workload spec, which its agent matches against its labels.
fn is_spec(from: &Destination) -> bool {
    matches!(from, Destination::WorkloadSpec(_) | Destination::GroupWorkloadSpec(..))
}

/// One agent per node of `fleet`, in node order, sharing label sets and platforms (a million nodes
/// carry a few thousand label sets and a few hundred platforms). Addresses are per node; the
/// simulated agents report none, so their facts stay shared.
pub fn reference_agents(fleet: &ReferenceFleet, config: Arc<AgentConfig>) -> Vec<Agent> {
    let mut agents = Vec::with_capacity(fleet.len());
    let mut label_pool: std::collections::HashMap<Labels, Arc<Labels>> = std::collections::HashMap::new();
    let mut info_pool: std::collections::HashMap<(String, String, String), Arc<NodeInfo>> =
        std::collections::HashMap::new();
    for i in 0..fleet.len() {
        let node = fleet.node(i);
        let reg = node.registration;
        let labels = Arc::clone(label_pool.entry(reg.labels.clone()).or_insert_with(|| Arc::new(reg.labels)));
        let key = (reg.info.arch.clone(), reg.info.os.clone(), reg.info.agent_version.clone());
        let info = Arc::clone(
            info_pool.entry(key).or_insert_with(|| Arc::new(NodeInfo { addresses: Vec::new(), ..reg.info.clone() })),
        );
        let identity = AgentIdentity { name: reg.name, labels, info };
        agents.push(Agent::new(Arc::clone(&config), identity, node.boot_id, None));
    }
    agents
}

/// Uplink messages a step must hand the engine before it runs the engine on a thread of its own,
/// beside the agents' side of the step: below it, handing the engine to its thread and back would
/// cost more than the overlap gains, so a small step runs on the caller's thread. Decided by the
/// step's size alone, so a run stays reproducible from its seed.
const OVERLAP_MIN: usize = 4096;

/// Why the engine is always there outside a step: a step that hands it to its thread waits for it.
const HOME: &str = "the engine is back from its thread at the end of every step";

/// Hands `batch` to the engine in parts of `chunk` messages; returns the wall-clock nanoseconds.
fn handle_uplink(engine: &mut Engine, batch: &[Inbound], chunk: usize, now: Timestamp, out: &mut Outputs) -> u64 {
    let t = std::time::Instant::now();
    for part in batch.chunks(chunk.max(1)) {
        engine.handle(Input::Uplink(part), now, out);
    }
    t.elapsed().as_nanos() as u64
}

/// One step for the engine's thread: the engine itself travels with it, so the simulation's
/// side cannot touch it until it is back.
struct EngineJob {
    engine: Box<Engine>,
    batch: Vec<Inbound>,
    out: Outputs,
    now: Timestamp,
    chunk: usize,
    /// After `batch`, the engine takes [`ToEngine::Part`]s until [`ToEngine::End`].
    stream: bool,
}

/// What the simulation hands the engine's thread.
enum ToEngine {
    /// A step: the engine and its first batch.
    Step(Box<EngineJob>),
    /// More uplink for a streaming step, in order; its emptied buffer comes back as a spare.
    Part(Vec<Inbound>),
    /// The streaming step has all its uplink.
    End,
}

/// Wake-ups a streaming round runs between two handoffs of their uplink to the engine: enough
/// to keep the channel's cost small against the engine's work on them, few enough that the
/// engine starts early and ends soon after the agents.
const STREAM_PART: usize = 64;

/// A step done: the job back with the engine's wall-clock nanoseconds, or the engine's panic.
type EngineDone = std::thread::Result<(Box<EngineJob>, u64)>;

/// The thread that runs the engine's big steps beside the agents, for the simulation's life (one
/// thread rather than one per step: a registration of ten million nodes takes 600 steps).
///
/// A step's two sides end within a few microseconds of each other when they are balanced, and a
/// wave of connects follows the last at once; so each side spins a short while ([`SPIN`]) for the
/// other's message before it sleeps, instead of paying a sleeping thread's wake-up every step.
struct EngineThread {
    jobs: Option<std::sync::mpsc::Sender<ToEngine>>,
    done: std::sync::mpsc::Receiver<EngineDone>,
    /// Emptied [`ToEngine::Part`] buffers, to be filled again.
    spare: std::sync::mpsc::Receiver<Vec<Inbound>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a side of the engine's thread spins for a message before it blocks.
const SPIN: std::time::Duration = std::time::Duration::from_micros(200);

/// `rx.recv()`, spinning for up to [`SPIN`] first.
fn recv_spinning<T>(rx: &std::sync::mpsc::Receiver<T>) -> Option<T> {
    use std::sync::mpsc::TryRecvError;
    let start = std::time::Instant::now();
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if start.elapsed() < SPIN => std::hint::spin_loop(),
            Err(TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

impl EngineThread {
    fn start() -> Self {
        let (jobs, job_rx) = std::sync::mpsc::channel::<ToEngine>();
        let (done_tx, done) = std::sync::mpsc::channel::<EngineDone>();
        let (spare_tx, spare) = std::sync::mpsc::channel::<Vec<Inbound>>();
        let thread = std::thread::Builder::new()
            .name("kole-sim-engine".into())
            .spawn(move || {
                while let Some(msg) = recv_spinning(&job_rx) {
                    // A part or an end outside a step is what is left of a step whose engine
                    // panicked: the caller has the panic by now.
                    let ToEngine::Step(mut job) = msg else { continue };
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let EngineJob { engine, batch, out, now, chunk, stream } = &mut *job;
                        let mut ns = handle_uplink(engine, batch, *chunk, *now, out);
                        if *stream {
                            loop {
                                match recv_spinning(&job_rx) {
                                    Some(ToEngine::Part(mut part)) => {
                                        ns += handle_uplink(engine, &part, *chunk, *now, out);
                                        part.clear();
                                        let _ = spare_tx.send(part);
                                    }
                                    Some(ToEngine::End) | None => break,
                                    Some(ToEngine::Step(_)) => {
                                        panic!("a step sent to the engine's thread inside a stream")
                                    }
                                }
                            }
                        }
                        ns
                    }));
                    if done_tx.send(run.map(|ns| (job, ns))).is_err() {
                        break;
                    }
                }
            })
            .expect("starting the simulation's engine thread");
        Self { jobs: Some(jobs), done, spare, thread: Some(thread) }
    }

    fn send(&self, msg: ToEngine) {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(msg));
        assert!(matches!(sent, Some(Ok(()))), "the simulation's engine thread has stopped");
    }

    /// The step sent last, done; the engine's panic, if it panicked, goes on here.
    fn wait(&mut self) -> (Box<EngineJob>, u64) {
        match recv_spinning(&self.done) {
            Some(Ok(done)) => done,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => panic!("the simulation's engine thread has stopped"),
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        // Closing the job channel ends the thread's loop.
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Simulation {
    /// A simulation of `cfg.nodes` reference nodes, all disconnected, and an empty engine.
    pub fn new(cfg: SimConfig) -> Self {
        let fleet = ReferenceFleet::new(cfg.nodes, cfg.seed);
        let mut net = SimNetwork::with_capacity(cfg.plan, cfg.nodes);
        // Agents whose state is not kept need not build it on every change.
        let agent_cfg = AgentConfig { persist: cfg.agent.persist && cfg.keep_agent_state, ..cfg.agent.clone() };
        let agents = reference_agents(&fleet, Arc::new(agent_cfg));
        for a in &agents {
            // Names are unique by construction, so adding cannot fail.
            let _ = net.add_node(a.name().clone());
        }
        let now_ms = cfg.start_ms;
        let engine =
            Engine::new(cfg.engine.clone(), NodeCache::with_capacity(cfg.nodes, 28), Timestamp::from_millis(now_ms));
        let specs = SpecCache::new(cfg.agent.decode_limits.clone());
        Self {
            engine: Some(Box::new(engine)),
            thread: None,
            out: Outputs::default(),
            events: Vec::new(),
            up_batch: Vec::new(),
            w: World {
                persisted: if cfg.keep_agent_state { vec![None; cfg.nodes] } else { Vec::new() },
                next_tick_ms: now_ms + cfg.engine_tick_ms,
                cfg,
                fleet,
                net,
                agents,
                runtime: RecordingRuntime::instant(),
                wakes: Calendar::new(now_ms),
                now_ms,
                aout: AgentOutputs::default(),
                specs,
                stats: SimStats::default(),
                down_batch: Vec::new(),
                pending: Vec::new(),
            },
        }
    }

    /// The reference fleet the nodes come from.
    pub fn fleet(&self) -> &ReferenceFleet {
        &self.w.fleet
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        self.engine.as_deref().expect(HOME)
    }

    /// The engine, mutably (for queries that compute).
    pub fn engine_mut(&mut self) -> &mut Engine {
        self.engine.as_deref_mut().expect(HOME)
    }

    /// The network (to inject faults).
    pub fn net(&mut self) -> &mut SimNetwork {
        &mut self.w.net
    }

    /// The shared runtime (to make workloads fail).
    pub fn runtime(&mut self) -> &mut RecordingRuntime {
        &mut self.w.runtime
    }

    /// The agents, by node id.
    pub fn agents(&self) -> &[Agent] {
        &self.w.agents
    }

    /// Loop counters.
    pub fn stats(&self) -> &SimStats {
        &self.w.stats
    }

    /// Engine events so far (drained by the caller).
    pub fn take_events(&mut self) -> Vec<EngineEvent> {
        std::mem::take(&mut self.events)
    }

    /// Current virtual time.
    pub fn now(&self) -> Timestamp {
        self.w.now()
    }

    /// Connects every node's transport (each agent then registers), in waves of
    /// [`SimConfig::uplink_batch`] nodes. Each wave connects while the engine handles the
    /// registrations of the wave before and the agents of the wave before that take their acks,
    /// as a broker hands the controller the first registrations
    /// while later nodes are still connecting; then everything due at the current instant is
    /// processed. Virtual time does not move.
    ///
    /// Waves keep a fleet's registrations and acks from all waiting in the queues at once: a
    /// million of each is a gigabyte of fresh memory, whose page faults were a quarter of a 1M
    /// registration here, and messages read long after they were written miss the cache.
    pub fn connect_all(&mut self) {
        let n = self.w.agents.len();
        let wave = self.w.cfg.uplink_batch.max(1);
        for start in (0..n).step_by(wave) {
            self.exchange(|w| {
                for i in start..(start + wave).min(n) {
                    w.connect(NodeId(i as u32));
                }
                w.deliver_round();
                true
            });
        }
        self.pump();
    }

    /// Connects one node.
    pub fn connect(&mut self, node: NodeId) {
        self.w.connect(node);
    }

    /// Disconnects one node (its agent keeps running its workloads).
    pub fn disconnect(&mut self, node: NodeId) {
        let _ = self.w.net.disconnect(node);
        self.w.agent_input(node, AgentInput::Disconnected);
    }

    /// Restarts one agent process with a new boot id: from its persisted state when
    /// [`SimConfig::keep_agent_state`] is on (edge autonomy), else from nothing. It comes back
    /// disconnected; call [`Simulation::connect`] to let it reach the cloud.
    pub fn restart_agent(&mut self, node: NodeId, new_boot: u32) {
        let w = &mut self.w;
        let i = node.index();
        let _ = w.net.disconnect(node);
        let old = &w.agents[i];
        let identity =
            AgentIdentity { name: old.name().clone(), labels: Arc::clone(old.labels()), info: Arc::clone(old.info()) };
        let persisted = w.persisted.get(i).cloned().flatten();
        w.agents[i] = Agent::new(Arc::new(w.cfg.agent.clone()), identity, new_boot, persisted);
        // Whatever the calendar holds for the old process is checked against the new one's timers.
        w.run_agent(node, AgentInput::Tick, None);
    }

    /// Hands a workload command to the engine.
    pub fn command(&mut self, cmd: &WorkloadCommand) {
        let now = self.now();
        self.engine_call(|e, out| e.handle(Input::Workload(cmd), now, out));
    }

    /// Replaces the engine (a controller restart), e.g. with one restored from a snapshot.
    /// Messages in flight to the old engine are lost, as with a real restart.
    pub fn replace_engine(&mut self, engine: Engine) -> Engine {
        self.w.route_pending();
        self.w.net.restart_cloud();
        std::mem::replace(self.engine_mut(), engine)
    }

    fn engine_call(&mut self, f: impl FnOnce(&mut Engine, &mut Outputs)) {
        self.w.route_pending();
        let t = std::time::Instant::now();
        let engine = self.engine.as_deref_mut().expect(HOME);
        f(engine, &mut self.out);
        self.w.stats.engine_wall_ns += t.elapsed().as_nanos() as u64;
        self.take_engine_outputs();
        self.w.route_pending();
    }

    /// Moves what the engine sent into [`World::pending`] (to be routed) and its events into
    /// [`Simulation::take_events`]'s list.
    fn take_engine_outputs(&mut self) {
        if self.w.pending.is_empty() {
            std::mem::swap(&mut self.out.messages, &mut self.w.pending);
        } else {
            self.w.pending.append(&mut self.out.messages);
        }
        self.events.append(&mut self.out.events);
        self.out.clear();
    }

    /// One step of the exchange between the engine and the agents: the engine takes every uplink
    /// message due now, in batches of [`SimConfig::uplink_batch`], while the world routes what
    /// the engine sent in the step before and `agents` runs the agents' side of this one (a round
    /// of deliveries, a wave of connects). Returns whether there was anything to do.
    ///
    /// The two sides share nothing during the step: the engine reads only its batch and writes
    /// only its outputs, which are routed in the next step (or before the engine's next call of
    /// any kind). So where the engine has [`OVERLAP_MIN`] messages or more, it runs on a thread of
    /// its own and the step takes as long as its longer side: the machine's second core runs what
    /// in a real fleet runs on the nodes and the broker, and the engine keeps one thread, as a
    /// controller does. A smaller step runs both sides here, the engine first and its replies
    /// routed before the agents run.
    fn exchange(&mut self, agents: impl FnOnce(&mut World) -> bool) -> bool {
        let now = self.now();
        let routed = !self.w.pending.is_empty();
        let mut batch = std::mem::take(&mut self.up_batch);
        self.w.net.take_uplink_into(now, usize::MAX, &mut batch);
        self.w.stats.uplink += batch.len() as u64;
        let took = !batch.is_empty();
        if batch.len() >= OVERLAP_MIN {
            self.w.stats.engine_overlapped_steps += 1;
            self.send_engine(batch, now, false);
            self.w.route_pending();
            agents(&mut self.w);
            self.engine_back();
            return true;
        }
        if took {
            let chunk = self.w.cfg.uplink_batch;
            self.engine_call(|e, out| {
                handle_uplink(e, &batch, chunk, now, out);
            });
        } else {
            self.w.route_pending();
        }
        self.up_batch = batch;
        let worked = agents(&mut self.w);
        routed || took || worked
    }

    /// Hands the engine and `batch` to the engine's thread (started on first use); with `stream`,
    /// the step goes on with the parts [`Simulation::stream_wakeups`] sends.
    fn send_engine(&mut self, batch: Vec<Inbound>, now: Timestamp, stream: bool) {
        let engine = self.engine.take().expect("one step at a time on the engine's thread");
        let job = Box::new(EngineJob {
            engine,
            batch,
            out: std::mem::take(&mut self.out),
            now,
            chunk: self.w.cfg.uplink_batch,
            stream,
        });
        self.thread.get_or_insert_with(EngineThread::start).send(ToEngine::Step(job));
    }

    /// Runs the agent wake-ups of one instant, `due` (filed for `at`), while the engine takes their
    /// uplink on its thread, [`STREAM_PART`] wake-ups' worth at a time.
    ///
    /// The engine handles what a step after the wake-ups would have handed it (every uplink
    /// message due now, in the network's order: taken part by part, each part's messages come
    /// after the last's), and what it sends is routed where it would have been, after every
    /// wake-up, so the agents see the same world; the engine's calls are smaller, and end soon
    /// after the agents' last wake-up instead of starting there.
    fn stream_wakeups(&mut self, at: u64, due: &[u32]) -> bool {
        let now = self.now();
        let first = std::mem::take(&mut self.up_batch);
        self.send_engine(first, now, true);
        let thread = self.thread.as_mut().expect("send_engine starts the engine's thread");
        let (mut ran, mut streamed) = (false, false);
        // Filled part by part; a part that sent nothing (its agents had nothing due to send)
        // leaves it empty for the next one.
        let mut batch = Vec::new();
        for part in due.chunks(STREAM_PART) {
            ran |= self.w.run_due(at, part);
            if batch.capacity() == 0 {
                batch = thread.spare.try_recv().unwrap_or_default();
            }
            self.w.net.take_uplink_into(now, usize::MAX, &mut batch);
            if !batch.is_empty() {
                streamed = true;
                self.w.stats.uplink += batch.len() as u64;
                thread.send(ToEngine::Part(std::mem::take(&mut batch)));
            }
        }
        thread.send(ToEngine::End);
        // A round whose wake-ups sent nothing hands the engine nothing.
        self.w.stats.engine_streamed_rounds += u64::from(streamed);
        self.engine_back();
        ran
    }

    /// Waits for the engine's thread to finish the step [`Simulation::send_engine`] gave it, and
    /// takes the engine, its outputs (to be routed) and the batch's buffer back.
    fn engine_back(&mut self) {
        let thread = self.thread.as_mut().expect("a step was sent to the engine's thread");
        let (job, ns) = thread.wait();
        let job = *job;
        self.engine = Some(job.engine);
        self.out = job.out;
        let mut batch = job.batch;
        batch.clear();
        self.up_batch = batch;
        self.w.stats.engine_wall_ns += ns;
        self.take_engine_outputs();
    }

    /// Runs every agent wake-up due at the current instant; returns whether any ran. A round of
    /// [`SimConfig::stream_min`] wake-ups or more, stale calendar entries left out
    /// ([`World::retain_due`]), streams its uplink to the engine
    /// ([`Simulation::stream_wakeups`]).
    fn run_wakeups(&mut self) -> bool {
        let mut ran = false;
        while let Some((at, mut due)) = self.w.wakes.pop_due(self.w.now_ms) {
            self.w.retain_due(at, &mut due);
            ran |= if due.len() >= self.w.cfg.stream_min {
                self.stream_wakeups(at, &due)
            } else {
                self.w.run_due(at, &due)
            };
            self.w.wakes.recycle(due);
        }
        ran
    }

    /// Processes everything due at the current instant, until nothing is.
    fn pump(&mut self) {
        loop {
            let mut progress = self.run_wakeups();
            // The engine takes every uplink message due, then the agents one round of deliveries,
            // and again: what one side sends is handled before the next round adds more, so a
            // fleet's acks or status reports do not pile up in the queues by the million (fresh
            // memory, and messages read long after they were written, out of the cache).
            while self.exchange(World::deliver_round) {
                progress = true;
            }
            if self.w.now_ms >= self.w.next_tick_ms {
                self.w.next_tick_ms = self.w.now_ms + self.w.cfg.engine_tick_ms;
                self.w.stats.engine_ticks += 1;
                let now = self.now();
                self.engine_call(|e, out| e.handle(Input::Tick, now, out));
                progress = true;
            }
            if !progress {
                break;
            }
        }
    }

    /// Runs until `done` holds (checked whenever the current instant is fully processed) or
    /// virtual time passes `now + max_ms`; returns whether `done` held.
    pub fn run_until(&mut self, max_ms: u64, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let deadline = self.w.now_ms.saturating_add(max_ms);
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            let next = self.next_instant();
            if next > deadline {
                self.w.now_ms = deadline;
                self.pump();
                return done(self);
            }
            self.w.now_ms = next.max(self.w.now_ms);
        }
    }

    /// The next instant anything is due: a message, an agent's wake-up or the engine's tick.
    fn next_instant(&mut self) -> u64 {
        let mut next = self.w.next_tick_ms;
        if let Some(t) = self.w.net.next_due() {
            next = next.min(t.as_millis());
        }
        if let Some(t) = self.w.wakes.first() {
            next = next.min(t);
        }
        next
    }

    /// Advances virtual time by `ms`, processing everything on the way.
    pub fn run_for(&mut self, ms: u64) {
        self.run_until(ms, |_| false);
    }

    /// Runs until every agent is registered (or `max_ms` of virtual time passes).
    pub fn run_until_registered(&mut self, max_ms: u64) -> bool {
        self.run_until(max_ms, |s| s.w.agents.iter().all(|a| a.link() == LinkState::Registered))
    }

    /// Nodes whose agent's applied digest differs from the engine's desired digest.
    pub fn unconverged(&mut self) -> Vec<NodeId> {
        let mut bad = Vec::new();
        let engine = self.engine.as_deref_mut().expect(HOME);
        for (i, a) in self.w.agents.iter().enumerate() {
            let want = engine.desired_digest(a.name().as_str()).unwrap_or(DesiredDigest::EMPTY);
            if a.applied() != want {
                bad.push(NodeId(i as u32));
            }
        }
        bad
    }

    /// Runs until the workload's rollout is complete and every targeted node reports its current
    /// version running (checked at most once per virtual second).
    pub fn run_until_rolled_out(&mut self, id: &kole_core::model::WorkloadId, max_ms: u64) -> bool {
        let mut last_check = None;
        self.run_until(max_ms, |s| {
            if last_check.is_some_and(|t| s.w.now_ms < t + 1_000) {
                return false;
            }
            last_check = Some(s.w.now_ms);
            s.engine_mut()
                .workload_status(id)
                .is_some_and(|st| st.phase == kole_core::engine::RolloutPhase::Complete && st.ready == st.targeted)
        })
    }

    /// Runs until every node's applied digest equals its desired digest.
    pub fn run_until_converged(&mut self, max_ms: u64) -> bool {
        // Checking a million digests is not free: check at most once per virtual second.
        let mut last_check = 0u64;
        self.run_until(max_ms, |s| {
            if s.w.now_ms < last_check + 1_000 && last_check != 0 {
                return false;
            }
            last_check = s.w.now_ms;
            s.unconverged().is_empty()
        })
    }
}

impl World {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.now_ms)
    }

    /// Hands the network what the engine sent.
    fn route_pending(&mut self) {
        if !self.pending.is_empty() {
            self.stats.engine_messages += self.pending.len() as u64;
            let now = self.now();
            self.net.cloud_send_drain(&mut self.pending, now);
        }
    }

    fn connect(&mut self, node: NodeId) {
        let now = self.now();
        if self.net.connect(node, now).is_ok() {
            self.agent_input(node, AgentInput::Connected);
        }
    }

    fn agent_input(&mut self, node: NodeId, input: AgentInput<'_>) {
        let filed = self.agents[node.index()].next_wake();
        self.run_agent(node, input, filed);
    }

    /// Hands the agent one input and files its next wake-up in the calendar unless it is `filed`,
    /// the wake-up that already has an entry there.
    ///
    /// The calendar keeps no per-agent record of its entries: an entry is checked when it comes due
    /// against the agent's own timers (see [`Simulation::pump`]), so a wake-up moved earlier or
    /// later leaves a stale entry that is skipped, and an unchanged one is not filed twice. (A
    /// per-agent array of filed times was one more cache miss per agent event, in random order.)
    fn run_agent(&mut self, node: NodeId, input: AgentInput<'_>, filed: Option<Timestamp>) {
        let i = node.index();
        let now = self.now();
        self.aout.clear();
        self.agents[i].handle(input, now, &mut self.runtime, &mut self.aout);
        for p in self.aout.publish.drain(..) {
            let _ = self.net.node_publish(node, p, now);
        }
        for g in self.aout.groups.drain(..) {
            let _ = match g {
                GroupChange::Subscribe(g) => self.net.subscribe(node, &g, now),
                GroupChange::Unsubscribe(g) => self.net.unsubscribe(node, &g),
            };
        }
        if let Some(state) = self.aout.persist.take()
            && self.cfg.keep_agent_state
        {
            self.persisted[i] = Some(state);
        }
        for e in &self.aout.events {
            if matches!(e, AgentEvent::Registered { .. }) {
                self.stats.agent_registrations += 1;
            }
        }
        if let Some(at) = self.aout.next_wake
            && Some(at) != filed
        {
            self.wakes.push(at.as_millis(), node.0);
        }
    }

    fn deliver(&mut self, node: NodeId, d: &NodeDelivery) {
        // Decode a fan-out's shared payload once and hand every agent the same `Arc`.
        if is_spec(&d.from)
            && !d.payload.is_empty()
            && let Some((w, t)) = self.specs.get(&d.payload)
        {
            self.agent_input(node, AgentInput::SharedSpec { workload: &w, wave_threshold: t, from: &d.from });
            return;
        }
        self.agent_input(node, AgentInput::Delivery(d));
    }

    /// Touches what running each of `ids` reads first (its agent, the agent's name,
    /// the node's session state) in one pass of independent loads. Wake-ups and deliveries come in
    /// random node order, so each of those is a cache miss; issued together, the CPU overlaps them
    /// instead of paying them one after another inside each agent's work (the engine's
    /// `NodeCache::resolve_batch` does the same for its index).
    ///
    /// The agent's label set is touched too where it is about to be read: by an agent that is not
    /// registered (its next wake-up sends a registration, which carries the labels) and where the
    /// id comes with `true` (a workload spec, whose selector the agent matches against them).
    ///
    /// Two passes: the first reads the agents' own state (independent loads), the second what it
    /// points to (the name's text, the labels), which can only be loaded once the first arrived.
    fn warm(&self, ids: impl Iterator<Item = (u32, bool)> + Clone) {
        let mut touch = 0u64;
        for (id, _) in ids.clone() {
            let i = id as usize;
            touch ^= self.agents.get(i).map_or(0, Agent::touch);
            touch ^= self.net.touch(NodeId(id));
        }
        for (id, reads_labels) in ids {
            if let Some(a) = self.agents.get(id as usize) {
                touch ^= u64::from(a.name().as_str().as_bytes().first().copied().unwrap_or(0));
                if reads_labels || a.link() != LinkState::Registered {
                    touch ^= u64::from(a.labels().wire().first().copied().unwrap_or(0));
                }
            }
        }
        std::hint::black_box(touch);
    }

    /// Hands the agents up to [`SimConfig::downlink_batch`] downlink deliveries due now; returns
    /// whether there was any.
    fn deliver_round(&mut self) -> bool {
        let mut deliveries = std::mem::take(&mut self.down_batch);
        deliveries.clear();
        self.net.take_downlink(self.now(), self.cfg.downlink_batch, |n, d| deliveries.push((n, d)));
        let any = !deliveries.is_empty();
        self.stats.downlink += deliveries.len() as u64;
        for group in deliveries.chunks(WARM_GROUP) {
            self.warm(group.iter().map(|(n, d)| (n.0, is_spec(&d.from))));
            for (n, d) in group {
                self.deliver(*n, d);
            }
        }
        deliveries.clear();
        self.down_batch = deliveries;
        any
    }

    /// Drops from `due` (filed for `at`) the stale entries: wake-ups that moved since they were
    /// filed, such as a fleet's registration retries once it registered, which come due by the
    /// hundred per millisecond beside a heartbeat round's few dozen live ones. Each is found from
    /// its agent alone (the agents are touched a group at a time, so those misses overlap), so
    /// [`World::run_due`] warms the session and the name only of wake-ups that run, and a round is
    /// streamed to the engine's thread by the count of those.
    fn retain_due(&self, at: u64, due: &mut Vec<u32>) {
        let mut kept = 0;
        for start in (0..due.len()).step_by(WARM_GROUP) {
            let end = (start + WARM_GROUP).min(due.len());
            let mut touch = 0u64;
            for &id in &due[start..end] {
                touch ^= self.agents.get(id as usize).map_or(0, Agent::touch);
            }
            std::hint::black_box(touch);
            for k in start..end {
                let id = due[k];
                if self.is_due(id, at) {
                    due[kept] = id;
                    kept += 1;
                }
            }
        }
        due.truncate(kept);
    }

    /// Whether agent `id`'s wake-up is due at `at` (false for a stale calendar entry).
    fn is_due(&self, id: u32, at: u64) -> bool {
        self.agents.get(id as usize).and_then(Agent::next_wake).is_some_and(|t| t.as_millis() <= at)
    }

    /// Runs the wake-ups of `due` (filed for `at`) that are still due; returns whether any ran.
    fn run_due(&mut self, at: u64, due: &[u32]) -> bool {
        let mut ran = false;
        for group in due.chunks(WARM_GROUP) {
            self.warm(group.iter().map(|&id| (id, false)));
            for &id in group {
                // An agent listed twice for one instant (filed again after a wake-up moved) runs
                // once: its next wake-up is filed afresh, and the second entry finds it not due.
                if self.is_due(id, at) {
                    self.stats.wakeups += 1;
                    self.run_agent(NodeId(id), AgentInput::Tick, None);
                    ran = true;
                }
            }
        }
        ran
    }
}

/// Broker restarts and spread reconnects, for whole-system fault tests.
impl Simulation {
    /// Restarts the broker: everything in flight is lost and every session ends. Every agent that
    /// had a session is told it was disconnected (its workloads keep running); the nodes are
    /// returned, in id order, for [`Simulation::reconnect_spread`]. Retained specs survive.
    pub fn restart_broker(&mut self) -> Vec<NodeId> {
        let had_session: Vec<NodeId> =
            (0..self.w.agents.len() as u32).map(NodeId).filter(|&n| self.w.net.is_connected(n)).collect();
        self.w.net.restart_broker();
        for &n in &had_session {
            self.w.agent_input(n, AgentInput::Disconnected);
        }
        had_session
    }

    /// Reconnects `nodes` one by one over the next `spread_ms` of virtual time, each at a jittered
    /// instant drawn from `seed` (reproducible, and spread rather than synchronized, as agents'
    /// reconnect backoff spreads a real reconnect storm), running the simulation in between. Returns
    /// with virtual time advanced by `spread_ms`.
    pub fn reconnect_spread(&mut self, nodes: &[NodeId], spread_ms: u64, seed: u64) {
        let start = self.w.now_ms;
        let mut jitter = kole_core::rng::SplitMix64::new(seed);
        let mut at: Vec<(u64, NodeId)> = nodes.iter().map(|&n| (start + jitter.below(spread_ms.max(1)), n)).collect();
        at.sort_unstable();
        for (t, n) in at {
            if t > self.w.now_ms {
                self.run_for(t - self.w.now_ms);
            }
            self.connect(n);
        }
        let end = start + spread_ms;
        if end > self.w.now_ms {
            self.run_for(end - self.w.now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kole_core::model::{RolloutStrategy, Selector, Workload, WorkloadId};

    fn workload(version: u64, waves: &[u8]) -> Workload {
        Workload {
            id: WorkloadId::new("edge-system/cdn-cache").unwrap(),
            version,
            spec: b"image: cdn-cache".to_vec(),
            selector: Selector::parse("kole.dev/site-type in (cdn,retail)").unwrap(),
            delivery: Default::default(),
            rollout: RolloutStrategy { waves: waves.to_vec(), ..Default::default() },
        }
    }

    #[test]
    fn a_small_fleet_registers_and_converges() {
        let mut sim = Simulation::new(SimConfig { nodes: 2_000, ..SimConfig::default() });
        sim.connect_all();
        assert!(sim.run_until_registered(120_000));
        assert_eq!(sim.engine().stats().registered_new, 2_000);
        let w = workload(1, &[10, 50, 100]);
        sim.command(&WorkloadCommand::Apply { workload: w.clone(), progress: None });
        assert!(sim.run_until_rolled_out(&w.id, 600_000), "{:?}", sim.engine_mut().workload_status(&w.id));
        assert!(sim.unconverged().is_empty());
        let st = sim.engine_mut().workload_status(&w.id).unwrap();
        assert_eq!(st.ready, st.targeted);
        assert!(st.targeted > 500);
    }

    /// A fleet whose steps are big enough for the engine to run beside the agents registers,
    /// heartbeats and converges, and two runs from one seed send the same messages and raise the
    /// same events: which steps go to the engine's thread is decided by their size, never by the
    /// threads' timing.
    #[test]
    fn overlapped_steps_are_reproducible() {
        let run = || {
            let engine = EngineConfig { heartbeat_interval_ms: 1_000, ..EngineConfig::default() };
            let mut sim =
                Simulation::new(SimConfig { nodes: 12_000, uplink_batch: 4_096, engine, ..SimConfig::default() });
            sim.connect_all();
            assert!(sim.run_until_registered(120_000));
            assert!(sim.stats().engine_overlapped_steps >= 2, "{:?}", sim.stats());
            let beats = sim.engine().stats().heartbeats;
            sim.run_for(1_000);
            assert!(sim.engine().stats().heartbeats - beats >= 12_000, "{:?}", sim.engine().stats());
            let w = workload(1, &[50, 100]);
            sim.command(&WorkloadCommand::Apply { workload: w.clone(), progress: None });
            assert!(sim.run_until_rolled_out(&w.id, 600_000));
            assert!(sim.unconverged().is_empty());
            assert_eq!(sim.engine().stats().registered_new, 12_000);
            let mut stats = sim.stats().clone();
            stats.engine_wall_ns = 0;
            let events: Vec<String> = sim.take_events().iter().map(|e| format!("{e:?}")).collect();
            (stats, events, sim.net().stats(), sim.engine_mut().workload_status(&w.id))
        };
        let (a, b) = (run(), run());
        assert_eq!(a.0, b.0);
        assert_eq!(a.1, b.1);
        assert_eq!(a.2, b.2);
        assert_eq!(a.3, b.3);
    }

    /// Streaming a round's uplink to the engine while the agents run changes nothing the
    /// simulation does: with and without it, a fleet that registers, heartbeats, takes a rollout
    /// in waves and heartbeats again raises the same events, sends the same messages and leaves
    /// every agent with the same digest. Only the engine's calls are smaller.
    #[test]
    fn streaming_wakeups_to_the_engine_changes_no_outcome() {
        let run = |stream_min: usize| {
            let engine = EngineConfig { heartbeat_interval_ms: 1_000, ..EngineConfig::default() };
            let mut sim = Simulation::new(SimConfig { nodes: 20_000, stream_min, engine, ..SimConfig::default() });
            sim.connect_all();
            assert!(sim.run_until_registered(120_000));
            sim.run_for(2_000);
            let w = workload(1, &[30, 100]);
            sim.command(&WorkloadCommand::Apply { workload: w.clone(), progress: None });
            assert!(sim.run_until_rolled_out(&w.id, 600_000));
            sim.run_for(2_000);
            assert!(sim.unconverged().is_empty());
            let mut stats = sim.stats().clone();
            let streamed = std::mem::take(&mut stats.engine_streamed_rounds);
            // How the engine's work was split is all that may differ.
            stats.engine_wall_ns = 0;
            stats.engine_overlapped_steps = 0;
            let events: Vec<String> = sim.take_events().iter().map(|e| format!("{e:?}")).collect();
            let digests: Vec<DesiredDigest> = sim.agents().iter().map(Agent::applied).collect();
            let beats = sim.engine().stats().heartbeats;
            (streamed, (stats, events, sim.net().stats(), sim.engine_mut().workload_status(&w.id), digests, beats))
        };
        // 20,000 nodes heartbeating every second: 20 wake-ups a millisecond.
        let (streamed, with) = run(8);
        let (none, without) = run(usize::MAX);
        assert!(streamed >= 1_000, "{streamed} rounds streamed");
        assert_eq!(none, 0);
        assert!(with.5 >= 60_000, "{} heartbeats", with.5);
        assert_eq!(with.0, without.0);
        assert_eq!(with.1, without.1);
        assert_eq!(with.2, without.2);
        assert_eq!(with.3, without.3);
        assert_eq!(with.4, without.4);
        assert_eq!(with.5, without.5);
    }
}
