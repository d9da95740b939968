//! The `kole-sim` command: benchmark, demo and snapshot tools on the reference fleet.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use kole_core::snapshot::{Codec, DirSnapshotStore, RestoreLimits, SnapshotOptions, SnapshotStore};
use kole_mqtt::BrokerAddr;
use kole_sim::bench::{self, BenchConfig};
use kole_sim::dataset::ReferenceFleet;
use kole_sim::demo::DemoConfig;
use kole_sim::mqtt_bench::MqttBenchConfig;
use kole_sim::per_node::PerNodeConfig;
use kole_sim::report::thousands;

// The controller's allocator (see kole-controller), so the benchmarks measure what it ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// kole-sim: simulator and benchmark of kole on the reference fleet.
#[derive(Debug, Parser)]
#[command(name = "kole-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The quickstart: MQTT agents through the embedded broker, then a simulated fleet through a
    /// rollout and a controller crash.
    ///
    /// Part 1: `--mqtt-nodes` agents and one controller over MQTT through the embedded broker:
    /// registration, a heartbeat from every node, one workload. Part 2: a simulated fleet registers
    /// with one controller over the in-process network, a workload rolls out in waves, a new
    /// version starts, the controller crashes mid-rollout and restarts from the directory snapshot
    /// store (a temporary directory unless `--dir`), and the fleet converges. Prints a summary
    /// table.
    Demo(DemoArgs),
    /// Measures the cache, heartbeats, snapshots and the engine on the reference fleet; with
    /// `--transport mqtt`, the engine over a real MQTT broker.
    ///
    /// `--transport memory` (the default, 1,000,000 nodes): cache memory per node, heartbeat
    /// decode+apply rate, snapshot write time, size and chunk count, and restore time; then the
    /// engine with one agent per node over the in-process network: registration, one heartbeat
    /// round, one workload delivered to every node, and a controller restart from a snapshot
    /// (`--cache-only` skips this).
    ///
    /// `--transport mqtt` (100,000 nodes): the engine behind the MQTT transport and the simulated
    /// nodes multiplexed over `--connections` connections to a real broker (the embedded one
    /// without `--broker`): registration, one heartbeat from every node, one workload to every
    /// node; the controller's CPU time; the broker's peak RSS when `--broker-pid` names a local
    /// broker process. The broker must let the bench's user publish on every node's uplink (no
    /// kole ACL).
    ///
    /// `--transport mqtt --per-node` (50,000 nodes): one real MQTT session per node (user name =
    /// node name, its own password): starts `--brokers` Mosquitto processes on loopback (password
    /// file, kole ACL) and `--workers` simulator processes of this binary, the controller over the
    /// broker set; registration, every node's next heartbeat, one workload to every node; with
    /// `--storm`, broker 0 is killed and restarted and the reconnect storm is measured.
    ///
    /// With `--json` the last line is one JSON object.
    Bench(BenchArgs),
    /// Snapshot tools on a directory snapshot store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Feeds random and mutated inputs to every decoder that reads outside bytes (uplink,
    /// downlink, signed envelope, snapshot manifest and chunks, runtime spec, agent state) and
    /// reports, per decoder, inputs, accepted and panics (must be 0; exit 1 otherwise).
    Fuzz(FuzzArgs),
    /// Measures the signed downlink on one core: signing and verifying a node's desired set (one
    /// workload, as the catch-up sends it) and a spec, per message and per million.
    Signing(SigningArgs),
    /// The worker process of `bench --transport mqtt --per-node` (not for direct use).
    #[command(hide = true)]
    Agents(AgentsArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Nodes of the simulated fleet (part 2).
    #[arg(long, value_parser = number::<usize>, default_value_t = DemoConfig::default().nodes)]
    nodes: usize,
    /// Agents over MQTT (part 1); 0 skips part 1.
    #[arg(long, value_parser = number::<usize>, default_value_t = DemoConfig::default().mqtt_nodes)]
    mqtt_nodes: usize,
    /// Seed of the reference fleet.
    #[arg(long, value_parser = number::<u64>, default_value_t = DemoConfig::default().seed)]
    seed: u64,
    /// Directory of the snapshot store [default: a fresh temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Which network the bench's engine and nodes talk over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// The in-process network.
    Memory,
    /// A real MQTT broker.
    Mqtt,
}

/// A snapshot codec, by its command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CodecArg {
    /// gzip (smaller).
    Gzip,
    /// LZ4 (faster).
    Lz4,
}

impl From<CodecArg> for Codec {
    fn from(c: CodecArg) -> Self {
        match c {
            CodecArg::Gzip => Codec::Gzip,
            CodecArg::Lz4 => Codec::Lz4,
        }
    }
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The network between the engine and the nodes.
    #[arg(long, value_enum, default_value_t = Transport::Memory)]
    transport: Transport,
    /// Nodes of the reference fleet [default: 1,000,000; 100,000 with `--transport mqtt`; 50,000
    /// with `--per-node`].
    #[arg(long, value_parser = number::<usize>)]
    nodes: Option<usize>,
    /// Seed of the reference fleet [default: 42].
    #[arg(long, value_parser = number::<u64>)]
    seed: Option<u64>,
    /// Print the figures as one JSON object on the last line, too.
    #[arg(long)]
    json: bool,

    // `--transport memory` only.
    /// Snapshot codec.
    #[arg(long, value_enum, default_value_t = CodecArg::Gzip, help_heading = "--transport memory")]
    codec: CodecArg,
    /// Heartbeats handed to the cache per batch, as a transport would deliver them.
    #[arg(long, value_parser = number::<usize>, default_value_t = BenchConfig::default().batch, help_heading = "--transport memory")]
    batch: usize,
    /// Largest snapshot chunk, in bytes.
    #[arg(long, value_parser = number::<usize>, default_value_t = BenchConfig::default().max_chunk_bytes, help_heading = "--transport memory")]
    max_chunk_bytes: usize,
    /// Measure the cache and snapshots only: skip the engine and agents.
    #[arg(long, help_heading = "--transport memory")]
    cache_only: bool,
    /// Run the bench once per fleet size, each in a process of its own (a fresh heap), e.g.
    /// `10000,100000,1000000` (instead of `--nodes`).
    #[arg(long, value_delimiter = ',', value_parser = number::<usize>, conflicts_with = "nodes", help_heading = "--transport memory")]
    sweep: Vec<usize>,
    /// With `--sweep`: write SVG charts of time and memory against nodes into DIR, the KOLE
    /// paper's published points beside kole's.
    #[arg(long, value_name = "DIR", requires = "sweep", help_heading = "--transport memory")]
    plot: Option<std::path::PathBuf>,

    // `--transport mqtt` only.
    /// The broker, `mqtt://HOST:PORT` [default: an embedded broker in this process].
    #[arg(long, help_heading = "--transport mqtt")]
    broker: Option<BrokerAddr>,
    /// Process id of a local external broker, to report its peak RSS.
    #[arg(long, value_parser = number::<u32>, help_heading = "--transport mqtt")]
    broker_pid: Option<u32>,
    /// MQTT connections the simulated nodes share [default: 8, or one per 16,384 nodes with
    /// per-node subscriptions, so Mosquitto's per-client subscription cost stays small].
    #[arg(long, value_parser = number::<usize>, help_heading = "--transport mqtt")]
    connections: Option<usize>,
    /// The controller's connections to the broker.
    #[arg(long, value_parser = number::<usize>, default_value_t = MqttBenchConfig::default().controller_connections, help_heading = "--transport mqtt")]
    controller_connections: usize,
    /// Subscribe the simulated nodes to one `down/node/+` wildcard instead of each node's own
    /// downlink topic.
    #[arg(long, help_heading = "--transport mqtt")]
    wildcard_downlink: bool,
    /// Most in-flight QoS 1 publishes per simulator connection.
    #[arg(long, value_parser = number::<u16>, default_value_t = MqttBenchConfig::default().inflight, help_heading = "--transport mqtt")]
    inflight: u16,
    /// Agents connect while fewer than this many registrations await their ack.
    #[arg(long, value_parser = number::<usize>, default_value_t = MqttBenchConfig::default().register_window, help_heading = "--transport mqtt")]
    register_window: usize,
    /// Subscribe the controller to the uplink at QoS 0 instead of 1.
    #[arg(long, help_heading = "--transport mqtt")]
    controller_qos0: bool,
    /// How long the controller's heartbeat connection lets a short burst of heartbeats gather
    /// before it reads again, in ms (`CloudConfig::heartbeat_read_coalesce`); 0 reads at once
    /// (`--transport mqtt`, with or without `--per-node`).
    #[arg(long, value_parser = number::<u64>, default_value_t = MqttBenchConfig::default().heartbeat_read_coalesce.as_millis() as u64, help_heading = "--transport mqtt")]
    heartbeat_read_coalesce_ms: u64,
    /// Longest a phase may take before the bench gives up, in seconds [default: 600]
    /// (`--transport mqtt`, with or without `--per-node`).
    #[arg(long, value_parser = number::<u64>, help_heading = "--transport mqtt")]
    phase_timeout: Option<u64>,
    /// One real MQTT session per node, over Mosquitto processes this bench starts.
    #[arg(long, help_heading = "--transport mqtt")]
    per_node: bool,

    // `--transport mqtt --per-node` only.
    /// Mosquitto processes to start [default: one per 12,500 nodes].
    #[arg(long, value_parser = number::<usize>, help_heading = "--transport mqtt --per-node")]
    brokers: Option<usize>,
    /// Simulator processes [default: one per 16,000 nodes].
    #[arg(long, value_parser = number::<usize>, help_heading = "--transport mqtt --per-node")]
    workers: Option<usize>,
    /// New sessions per second, over all simulator processes.
    #[arg(long, value_parser = number::<u32>, default_value_t = PerNodeConfig::for_nodes(0).connect_rate, help_heading = "--transport mqtt --per-node")]
    connect_rate: u32,
    /// Heartbeat interval the controller gives the nodes, in milliseconds.
    #[arg(long, value_parser = number::<u32>, default_value_t = PerNodeConfig::for_nodes(0).heartbeat_interval_ms, help_heading = "--transport mqtt --per-node")]
    heartbeat_interval_ms: u32,
    /// Kill and restart broker 0 after the fleet converged, and measure the reconnect storm.
    #[arg(long, help_heading = "--transport mqtt --per-node")]
    storm: bool,
    /// Directory of the `mosquitto` and `mosquitto_passwd` binaries [default: from `PATH`].
    #[arg(long, help_heading = "--transport mqtt --per-node")]
    mosquitto_dir: Option<PathBuf>,
}

/// The three bench modes; each flag applies to some of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BenchMode {
    Memory,
    Mqtt,
    PerNode,
}

/// The flags (argument ids) that apply to some bench modes only; the rest apply to all.
const MODE_FLAGS: &[(&str, &[BenchMode])] = {
    use BenchMode::{Memory, Mqtt, PerNode};
    &[
        ("codec", &[Memory]),
        ("batch", &[Memory]),
        ("max_chunk_bytes", &[Memory]),
        ("cache_only", &[Memory]),
        ("sweep", &[Memory]),
        ("plot", &[Memory]),
        ("broker", &[Mqtt]),
        ("broker_pid", &[Mqtt]),
        ("connections", &[Mqtt]),
        ("controller_connections", &[Mqtt]),
        ("wildcard_downlink", &[Mqtt]),
        ("inflight", &[Mqtt]),
        ("register_window", &[Mqtt]),
        ("controller_qos0", &[Mqtt]),
        ("heartbeat_read_coalesce_ms", &[Mqtt, PerNode]),
        ("phase_timeout", &[Mqtt, PerNode]),
        ("per_node", &[PerNode]),
        ("brokers", &[PerNode]),
        ("workers", &[PerNode]),
        ("connect_rate", &[PerNode]),
        ("heartbeat_interval_ms", &[PerNode]),
        ("storm", &[PerNode]),
        ("mosquitto_dir", &[PerNode]),
    ]
};

impl BenchArgs {
    fn mode(&self) -> BenchMode {
        match (self.transport, self.per_node) {
            (Transport::Memory, _) => BenchMode::Memory,
            (Transport::Mqtt, false) => BenchMode::Mqtt,
            (Transport::Mqtt, true) => BenchMode::PerNode,
        }
    }

    /// The first flag given on the command line that the chosen mode would ignore: refused, so a
    /// typo'd or misplaced flag never silently changes nothing.
    fn misplaced_flag(&self, matches: &ArgMatches) -> Option<String> {
        let mode = self.mode();
        MODE_FLAGS
            .iter()
            .find(|(id, modes)| !modes.contains(&mode) && matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(|(id, _)| {
                let mode = match mode {
                    BenchMode::Memory => "--transport memory",
                    BenchMode::Mqtt => "--transport mqtt",
                    BenchMode::PerNode => "--transport mqtt --per-node",
                };
                format!("--{} does not apply to `bench {mode}`", id.replace('_', "-"))
            })
    }
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Writes the reference fleet as the next snapshot generation in a directory.
    Write(SnapshotWriteArgs),
    /// Checks every chunk of every complete generation; exits non-zero on any fault.
    Verify(SnapshotDirArgs),
    /// Restores the newest good generation (falling back on faults) and prints what it used.
    Restore(SnapshotDirArgs),
}

#[derive(Debug, clap::Args)]
struct SnapshotDirArgs {
    /// Directory of the snapshot store.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Debug, clap::Args)]
struct SnapshotWriteArgs {
    /// Directory of the snapshot store.
    #[arg(long)]
    dir: PathBuf,
    /// Nodes of the reference fleet.
    #[arg(long, value_parser = number::<usize>, default_value_t = 100_000)]
    nodes: usize,
    /// Snapshot codec.
    #[arg(long, value_enum, default_value_t = CodecArg::Gzip)]
    codec: CodecArg,
    /// Seed of the reference fleet.
    #[arg(long, value_parser = number::<u64>, default_value_t = 42)]
    seed: u64,
    /// Generations to keep (at least 1).
    #[arg(long, value_parser = number::<usize>, default_value_t = 2)]
    keep: usize,
}

/// The flags `per_node` passes to each simulator process it spawns.
#[derive(Debug, clap::Args)]
struct AgentsArgs {
    /// The fleet name (topic prefix level).
    #[arg(long, default_value = "")]
    fleet: String,
    /// The broker set, comma-separated, in the controller's order.
    #[arg(long, required = true, value_delimiter = ',')]
    brokers: Vec<BrokerAddr>,
    /// Reference fleet size.
    #[arg(long, value_parser = number::<usize>, default_value_t = 0)]
    nodes: usize,
    /// Seed of the reference fleet.
    #[arg(long, value_parser = number::<u64>, default_value_t = 42)]
    seed: u64,
    /// `I/K`: this process runs the nodes `n` with `n % K == I`.
    #[arg(long, value_parser = slice, default_value = "0/1")]
    slice: (usize, usize),
    /// The run's credential secret.
    #[arg(long, value_parser = number::<u64>, default_value_t = 0)]
    secret: u64,
    /// New sessions per second.
    #[arg(long, value_parser = number::<u32>, default_value_t = 1_000)]
    rate: u32,
}

/// A number, with `_` allowed as a digit separator (`--nodes 1_000_000`).
fn number<T: FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.replace('_', "").parse().map_err(|e| format!("{e}"))
}

/// `I/K`, two numbers.
fn slice(s: &str) -> Result<(usize, usize), String> {
    let (i, k) = s.split_once('/').ok_or("expected I/K")?;
    Ok((number(i)?, number(k)?))
}

/// Parses the command line, refusing bench flags that the chosen bench mode would ignore.
fn parse(argv: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, clap::Error> {
    let mut cmd = Cli::command();
    let matches = cmd.try_get_matches_from_mut(argv)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))?;
    if let (Some(Command::Bench(args)), Some(m)) = (&cli.command, matches.subcommand_matches("bench"))
        && let Some(msg) = args.misplaced_flag(m)
    {
        let mut bench = cmd.find_subcommand_mut("bench").cloned().unwrap_or_default();
        return Err(bench.error(clap::error::ErrorKind::ArgumentConflict, msg));
    }
    Ok(cli)
}

fn main() -> ExitCode {
    let cli = match parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run(cli: Cli) -> AnyResult<ExitCode> {
    match cli.command {
        None => {
            Cli::command().print_help()?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Demo(args)) => cmd_demo(&args),
        Some(Command::Bench(args)) => match args.mode() {
            BenchMode::Memory => cmd_bench(&args),
            BenchMode::Mqtt => cmd_bench_mqtt(&args),
            BenchMode::PerNode => cmd_bench_per_node(&args),
        },
        Some(Command::Agents(args)) => cmd_agents(args),
        Some(Command::Signing(args)) => cmd_signing(&args),
        Some(Command::Fuzz(args)) => cmd_fuzz(&args),
        Some(Command::Snapshot(SnapshotCommand::Write(args))) => cmd_snapshot_write(&args),
        Some(Command::Snapshot(SnapshotCommand::Verify(args))) => cmd_snapshot_verify(&args.dir),
        Some(Command::Snapshot(SnapshotCommand::Restore(args))) => cmd_snapshot_restore(&args.dir),
    }
}

#[derive(Debug, clap::Args)]
struct FuzzArgs {
    /// Inputs in all, split evenly over the decoders.
    #[arg(long, default_value_t = 10_000_000)]
    inputs: u64,
    /// Seed of the input generator (runs are deterministic).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn cmd_fuzz(args: &FuzzArgs) -> AnyResult<ExitCode> {
    let t = std::time::Instant::now();
    let reports = kole_sim::fuzz::run(args.inputs, args.seed)?;
    println!("{:<30} {:>12} {:>12} {:>7}", "decoder", "inputs", "accepted", "panics");
    let mut panics = 0;
    let mut total = 0;
    for r in &reports {
        println!("{:<30} {:>12} {:>12} {:>7}", r.name, thousands(r.inputs), thousands(r.accepted), r.panics);
        if let Some(p) = &r.first_panic {
            println!("  first panicking input: {p}");
        }
        panics += r.panics;
        total += r.inputs;
    }
    println!("{} inputs, {panics} panics, {:.1} s (seed {})", thousands(total), t.elapsed().as_secs_f64(), args.seed);
    Ok(if panics == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[derive(Debug, clap::Args)]
struct SigningArgs {
    /// Messages signed and verified, each to another node.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
}

fn cmd_signing(args: &SigningArgs) -> AnyResult<ExitCode> {
    use kole_core::model::{DesiredDigest, NodeName, Workload, WorkloadId};
    use kole_core::protocol::seal::{DownlinkSigner, TrustedKeys, open};
    use kole_core::protocol::{DecodeLimits, DesiredState, Destination, Message, WorkloadSpec};
    let n = args.messages.max(1);
    let signer = DownlinkSigner::from_seed([7; 32]);
    let mut trust = TrustedKeys::new();
    trust.trust_text(&signer.public_text())?;
    // A realistic workload: a runtime spec of about 200 bytes, a selector, waves.
    let w = Workload {
        id: WorkloadId::new("default/cdn-cache")?,
        version: 7,
        spec: vec![b'x'; 200],
        selector: kole_core::model::Selector::parse("tier=cdn,topology.kubernetes.io/region in (eu-west,eu-central)")?,
        delivery: Default::default(),
        rollout: kole_core::model::RolloutStrategy { waves: vec![1, 10, 50, 100], ..Default::default() },
    };
    let desired =
        Message::DesiredState(DesiredState { digest: DesiredDigest::of_workloads([&w]), workloads: vec![w.clone()] });
    let names: Vec<Destination> =
        (0..n).map(|i| NodeName::new(format!("edge-{i:07}")).map(Destination::Node)).collect::<Result<_, _>>()?;
    let t = std::time::Instant::now();
    let sealed: Vec<Vec<u8>> =
        names.iter().enumerate().map(|(i, to)| signer.seal(&desired, to, 1_790_000_000_000 + i as u64)).collect();
    let sign_s = t.elapsed().as_secs_f64();
    let limits = DecodeLimits::default();
    let t = std::time::Instant::now();
    let ok = sealed.iter().zip(&names).filter(|(b, to)| open(b, to, &trust, &limits).is_ok()).count();
    let verify_s = t.elapsed().as_secs_f64();
    if ok != n {
        return Err(format!("{} of {n} signed messages did not verify", n - ok).into());
    }
    let spec = Message::WorkloadSpec(WorkloadSpec { workload: w.clone(), wave_threshold: 1_000 });
    let t = std::time::Instant::now();
    let mut bytes = 0;
    for i in 0..n {
        bytes = signer.seal(&spec, &Destination::WorkloadSpec(w.id.clone()), i as u64).len();
    }
    let spec_s = t.elapsed().as_secs_f64();
    let us = |s: f64| s * 1e6 / n as f64;
    println!("signed downlink, {} messages, one core", thousands(n as u64));
    println!("  desired set ({} bytes signed, 78 of them the signed header):", sealed[0].len());
    println!("    sign    {:>7.1} µs each  {:>6.1} s per million", us(sign_s), us(sign_s));
    println!("    verify  {:>7.1} µs each  {:>6.1} s per million (decode included)", us(verify_s), us(verify_s));
    println!("  spec ({bytes} bytes): sign {:.1} µs each; one per publish, whatever the fleet size", us(spec_s));
    Ok(ExitCode::SUCCESS)
}

fn cmd_bench(args: &BenchArgs) -> AnyResult<ExitCode> {
    if !args.sweep.is_empty() {
        return cmd_bench_sweep(args);
    }
    let defaults = BenchConfig::default();
    let cfg = BenchConfig {
        nodes: args.nodes.unwrap_or(defaults.nodes),
        seed: args.seed.unwrap_or(defaults.seed),
        codec: args.codec.into(),
        batch: args.batch,
        max_chunk_bytes: args.max_chunk_bytes,
        engine: !args.cache_only,
    };
    run_bench(args.json, |progress| bench::run(&cfg, progress), bench::table)
}

/// Runs one bench with its progress lines on stderr (seconds since it started), then prints its
/// table, and with `--json` its figures as one JSON line.
fn run_bench<E: std::error::Error + 'static>(
    json: bool,
    run: impl FnOnce(&mut dyn FnMut(&str)) -> Result<kole_sim::report::Figures, E>,
    table: fn(&kole_sim::report::Figures) -> String,
) -> AnyResult<ExitCode> {
    let started = std::time::Instant::now();
    let figures = run(&mut |step| eprintln!("[{:>6.2} s] {step}", started.elapsed().as_secs_f64()))?;
    println!("{}", table(&figures));
    if json {
        println!("{}", figures.to_json());
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench --sweep`: each size runs in a process of its own (this program, `bench --nodes N
/// --json` with the same settings), so each starts from a fresh heap. In one process the
/// allocator hands a size the memory the sizes before it freed, and the cache's memory, measured
/// as RSS growth, read 0 B a node at 1M after 10k and 100k.
fn cmd_bench_sweep(args: &BenchArgs) -> AnyResult<ExitCode> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program to run each size: {e}"))?;
    let codec = args.codec.to_possible_value().map(|v| v.get_name().to_owned()).unwrap_or_default();
    let mut runs = Vec::with_capacity(args.sweep.len());
    for &nodes in &args.sweep {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "--nodes", &nodes.to_string(), "--json", "--codec", &codec]).args([
            "--batch",
            &args.batch.to_string(),
            "--max-chunk-bytes",
            &args.max_chunk_bytes.to_string(),
        ]);
        if let Some(seed) = args.seed {
            cmd.args(["--seed", &seed.to_string()]);
        }
        if args.cache_only {
            cmd.arg("--cache-only");
        }
        // Progress goes straight to our stderr; the table and the JSON line come back here.
        let out = cmd.stderr(std::process::Stdio::inherit()).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            print!("{stdout}");
            return Err(format!("the bench of {} nodes failed ({})", thousands(nodes as u64), out.status).into());
        }
        // The child printed its table, then its JSON line last; pass the table on as it was.
        let (table, json) = stdout.trim_end().rsplit_once('\n').unwrap_or(("", stdout.trim_end()));
        let figures = kole_sim::report::Figures::from_json(json)
            .ok_or_else(|| format!("the bench of {} nodes printed no figures", thousands(nodes as u64)))?;
        println!("{table}");
        if args.json {
            println!("{json}");
        }
        runs.push(figures);
    }
    if let Some(dir) = &args.plot {
        for path in kole_sim::plot::write_charts(dir, &runs)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench --transport mqtt`: see [`kole_sim::mqtt_bench`].
fn cmd_bench_mqtt(args: &BenchArgs) -> AnyResult<ExitCode> {
    use kole_sim::mqtt_bench;
    let d = MqttBenchConfig::default();
    let cfg = MqttBenchConfig {
        nodes: args.nodes.unwrap_or(d.nodes),
        seed: args.seed.unwrap_or(d.seed),
        broker: args.broker.clone(),
        broker_pid: args.broker_pid,
        connections: args.connections,
        controller_connections: args.controller_connections,
        per_node_subscriptions: !args.wildcard_downlink,
        inflight: args.inflight,
        phase_timeout: args.phase_timeout.map_or(d.phase_timeout, Duration::from_secs),
        register_window: args.register_window,
        controller_qos0: args.controller_qos0,
        heartbeat_read_coalesce: Duration::from_millis(args.heartbeat_read_coalesce_ms),
    };
    run_bench(args.json, |progress| mqtt_bench::run(&cfg, progress), mqtt_bench::table)
}

fn cmd_bench_per_node(args: &BenchArgs) -> AnyResult<ExitCode> {
    use kole_sim::per_node;
    let nodes = args.nodes.unwrap_or(50_000);
    let d = PerNodeConfig::for_nodes(nodes);
    let cfg = PerNodeConfig {
        nodes,
        seed: args.seed.unwrap_or(d.seed),
        brokers: args.brokers.unwrap_or(d.brokers),
        workers: args.workers.unwrap_or(d.workers),
        connect_rate: args.connect_rate,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        storm: args.storm,
        phase_timeout: args.phase_timeout.map_or(d.phase_timeout, Duration::from_secs),
        mosquitto_dir: args.mosquitto_dir.clone(),
        heartbeat_read_coalesce: Duration::from_millis(args.heartbeat_read_coalesce_ms),
    };
    run_bench(args.json, |progress| per_node::run(&cfg, progress), per_node::table)
}

/// The worker process of `bench --per-node` (not for direct use).
fn cmd_agents(args: AgentsArgs) -> AnyResult<ExitCode> {
    use kole_sim::per_node::{self, WorkerConfig};
    let (slice, slices) = args.slice;
    let cfg = WorkerConfig {
        fleet: args.fleet,
        brokers: args.brokers,
        nodes: args.nodes,
        seed: args.seed,
        slice,
        slices,
        secret: args.secret,
        rate: args.rate,
    };
    per_node::worker(&cfg)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_demo(args: &DemoArgs) -> AnyResult<ExitCode> {
    let cfg = DemoConfig { nodes: args.nodes, seed: args.seed, dir: args.dir.clone(), mqtt_nodes: args.mqtt_nodes };
    kole_sim::demo::run(&cfg)?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> AnyResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn cmd_snapshot_write(args: &SnapshotWriteArgs) -> AnyResult<ExitCode> {
    let SnapshotWriteArgs { dir, nodes, seed, keep, .. } = args;
    let (nodes, seed, keep) = (*nodes, *seed, *keep);
    let codec = Codec::from(args.codec);
    let fleet = ReferenceFleet::new(nodes, seed);
    let mut cache = kole_core::cache::NodeCache::with_capacity(nodes, 28);
    fleet.load_into(&mut cache)?;
    let store = DirSnapshotStore::open(dir)?;
    let opts = SnapshotOptions { codec, keep_generations: keep.max(1), ..SnapshotOptions::default() };
    let manifest = runtime()?.block_on(kole_core::snapshot::write_snapshot(&store, &cache, &opts, fleet.now()))?;
    println!(
        "wrote generation {} to {}: {} nodes, {} chunks, {} bytes ({})",
        manifest.generation,
        dir.display(),
        thousands(manifest.node_count),
        manifest.chunk_count,
        thousands(manifest.total_bytes),
        codec.as_str()
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_snapshot_verify(dir: &std::path::Path) -> AnyResult<ExitCode> {
    let store = DirSnapshotStore::open(dir)?;
    let limits = RestoreLimits::default();
    let rt = runtime()?;
    let manifests = rt.block_on(store.list_manifests())?;
    if manifests.is_empty() {
        println!("no complete generation in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    }
    let mut faulty = false;
    for m in &manifests {
        let checked = rt
            .block_on(kole_core::snapshot::fetch_chunks(&store, m, &limits))
            .and_then(|chunks| kole_core::snapshot::verify(m, &chunks, &limits));
        match checked {
            Ok(v) => println!(
                "generation {}: ok, {} nodes, {} chunks, {} bytes stored ({} raw), codec {}",
                m.generation,
                thousands(v.nodes),
                v.chunks,
                thousands(v.stored_bytes),
                thousands(v.raw_bytes),
                m.codec.as_str()
            ),
            Err(e) => {
                faulty = true;
                println!("generation {}: FAULT: {e}", m.generation);
            }
        }
    }
    Ok(if faulty { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn cmd_snapshot_restore(dir: &std::path::Path) -> AnyResult<ExitCode> {
    let store = DirSnapshotStore::open(dir)?;
    let t = std::time::Instant::now();
    let restored = runtime()?.block_on(kole_core::snapshot::restore_latest(&store, &RestoreLimits::default()))?;
    let Some(r) = restored else {
        println!("no snapshot in {}", dir.display());
        return Ok(ExitCode::FAILURE);
    };
    for f in &r.faults {
        println!("skipped: {f}");
    }
    use kole_core::cache::StateCache;
    println!(
        "restored generation {}: {} nodes in {:.3} s",
        r.manifest.generation,
        thousands(r.cache.len() as u64),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(line: &str) -> Result<Cli, clap::Error> {
        parse(std::iter::once("kole-sim").chain(line.split_whitespace()).map(Into::into))
    }

    fn bench(line: &str) -> BenchArgs {
        match cli(line).unwrap().command {
            Some(Command::Bench(b)) => b,
            other => panic!("{line}: parsed as {other:?}"),
        }
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_numbers_with_separators_switches_and_key_value() {
        let b = bench("bench --nodes 1_000_000 --json --codec=lz4");
        assert_eq!(b.nodes, Some(1_000_000));
        assert_eq!(b.codec, CodecArg::Lz4);
        assert!(b.json);
        assert_eq!(b.mode(), BenchMode::Memory);
    }

    #[test]
    fn refuses_bad_unknown_and_missing_values() {
        assert!(cli("bench --nodes many").is_err());
        assert_eq!(cli("bench --typo 3").unwrap_err().kind(), clap::error::ErrorKind::UnknownArgument);
        assert!(cli("bench --nodes").is_err());
        assert!(cli("snapshot verify").is_err(), "--dir is required");
        assert!(cli("bench --codec zip").is_err());
    }

    #[test]
    fn refuses_flags_the_bench_mode_ignores() {
        let err = |line: &str| cli(line).unwrap_err().kind();
        use clap::error::ErrorKind::ArgumentConflict;
        assert_eq!(err("bench --transport mqtt --cache-only"), ArgumentConflict);
        assert_eq!(err("bench --broker mqtt://h:1"), ArgumentConflict);
        assert_eq!(err("bench --transport mqtt --per-node --broker mqtt://h:1"), ArgumentConflict);
        assert_eq!(err("bench --transport mqtt --storm"), ArgumentConflict);
        assert_eq!(err("bench --per-node"), ArgumentConflict);
        assert_eq!(bench("bench --transport memory --cache-only").mode(), BenchMode::Memory);
    }

    /// Every command line of the README, `docs/` and `.ci/run`.
    #[test]
    fn documented_command_lines_parse() {
        for line in [
            "demo",
            "demo --nodes 20000",
            "bench --nodes 1000000 --json",
            "bench --nodes 20000 --json",
            "bench --sweep 10000,100000,1000000 --plot docs/plots --json",
            "bench --sweep 2000,5000 --plot /tmp/kole-plots",
            "bench --nodes 1000000 --codec lz4 --cache-only --json",
            "bench --transport mqtt --nodes 10000",
            "bench --transport mqtt --broker mqtt://HOST:1883 --nodes 1000000",
            "bench --transport mqtt --broker mqtt://127.0.0.1:18841 --broker-pid 1234 --nodes 1000000 --json",
            "bench --transport mqtt --per-node --nodes 50000 --storm",
            "bench --transport mqtt --per-node --nodes 50000 --storm --json",
            "bench --transport mqtt --per-node --nodes 3000 --brokers 2 --workers 2 --storm --phase-timeout 120 --json",
            "snapshot write --dir /tmp/snap --nodes 1000000",
            "snapshot verify --dir /tmp/snap",
            "snapshot restore --dir /tmp/snap",
        ] {
            if let Err(e) = cli(line) {
                panic!("{line}: {e}");
            }
        }
        let b =
            bench("bench --transport mqtt --per-node --nodes 3000 --brokers 2 --workers 2 --storm --phase-timeout 120");
        assert_eq!(
            (b.mode(), b.nodes, b.brokers, b.workers, b.storm, b.phase_timeout),
            (BenchMode::PerNode, Some(3000), Some(2), Some(2), true, Some(120))
        );
    }

    /// The argv `per_node` builds for each simulator process.
    #[test]
    fn parses_the_worker_command_line() {
        let line = "agents --fleet f --brokers mqtt://127.0.0.1:1,mqtt://127.0.0.1:2 --nodes 3000 --seed 7 \
                    --slice 1/2 --secret 99 --rate 500";
        let Some(Command::Agents(a)) = cli(line).unwrap().command else { panic!("not the worker") };
        assert_eq!((a.fleet.as_str(), a.brokers.len(), a.nodes, a.seed), ("f", 2, 3000, 7));
        assert_eq!((a.slice, a.secret, a.rate), ((1, 2), 99, 500));
        assert!(cli("agents --brokers mqtt://h:1 --slice 3").is_err());
        assert!(!Cli::command().render_help().to_string().contains("\n  agents"), "the worker is hidden");
    }
}
