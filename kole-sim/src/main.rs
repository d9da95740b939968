//! The `kole-sim` command: benchmark, demo and snapshot tools on the reference fleet.

use std::path::PathBuf;
use std::process::ExitCode;

use kole_core::snapshot::{Codec, DirSnapshotStore, RestoreLimits, SnapshotOptions, SnapshotStore};
use kole_sim::bench::{self, BenchConfig};
use kole_sim::cli::{Args, UsageError};
use kole_sim::dataset::ReferenceFleet;
use kole_sim::report::thousands;

const USAGE: &str = "\
kole-sim: simulator and benchmark of kole on the reference fleet

USAGE:
  kole-sim demo [--nodes N] [--mqtt-nodes M] [--seed S] [--dir D]
      The quickstart. Part 1: M agents (default 10,000; 0 skips it) and one controller over MQTT
      through the embedded broker: registration, a heartbeat from every node, one workload. Part 2:
      a simulated fleet (default 100,000 nodes) registers with one controller over the in-process
      network, a workload rolls out in waves, a new version starts, the controller crashes
      mid-rollout and restarts from the directory snapshot store (a temporary directory unless
      --dir), and the fleet converges. Prints a summary table.
  kole-sim bench [--nodes N] [--codec gzip|lz4] [--seed S] [--batch B] [--max-chunk-bytes B] [--cache-only] [--json]
      Measures cache memory per node, heartbeat decode+apply rate, snapshot write time, size and
      chunk count, and restore time; then runs the engine with one agent per node over the in-process
      network: registration, one heartbeat round, one workload delivered to every node, and a
      controller restart from a snapshot (--cache-only skips this). Default 1,000,000 nodes.
      With --json the last line is one JSON object.
  kole-sim bench --transport mqtt [--broker mqtt://HOST:PORT] [--broker-pid PID] [--connections C]
                 [--controller-connections K] [--wildcard-downlink] [--register-window W]
                 [--controller-qos0] [--nodes N] [--seed S] [--json]
      The engine behind the MQTT transport and the simulated nodes multiplexed over C connections
      (default 8) to a real broker (the embedded one without --broker): registration, one heartbeat
      from every node, one workload to every node; the controller's CPU time; the broker's peak RSS
      when --broker-pid names a local broker process. Agents connect while fewer than W (default
      50,000) registrations await their ack; --controller-qos0 subscribes the controller to the
      uplink at QoS 0. Default 100,000 nodes. The broker must let
      the bench's user publish on every node's uplink (no kole ACL).
  kole-sim bench --transport mqtt --per-node [--nodes N] [--brokers K] [--workers W] [--connect-rate R]
                 [--heartbeat-interval-ms MS] [--storm] [--mosquitto-dir DIR] [--json]
      One real MQTT session per node (user name = node name, its own password): starts K Mosquitto
      processes on loopback (password file, kole ACL) and W simulator processes of this binary,
      the controller over the broker set; registration, every node's next heartbeat, one workload
      to every node; with --storm, broker 0 is killed and restarted and the reconnect storm is
      measured. Default 50,000 nodes, one broker per 12,500 and one simulator per 16,000 nodes.
  kole-sim snapshot write --dir D [--nodes N] [--codec gzip|lz4] [--seed S] [--keep K]
      Writes the reference fleet as the next snapshot generation in directory D.
  kole-sim snapshot verify --dir D
      Checks every chunk of every complete generation; exits non-zero on any fault.
  kole-sim snapshot restore --dir D
      Restores the newest good generation (falling back on faults) and prints what it used.
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(argv) {
        Ok(code) => code,
        Err(e) => {
            if e.downcast_ref::<UsageError>().is_some() {
                eprintln!("error: {e}\n\n{USAGE}");
                ExitCode::from(2)
            } else {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run(argv: Vec<String>) -> AnyResult<ExitCode> {
    let args = Args::parse(
        argv,
        &["json", "help", "cache-only", "wildcard-downlink", "per-node", "storm", "controller-qos0"],
    )?;
    if args.flag("help") || args.words.is_empty() {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    }
    let words: Vec<&str> = args.words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["bench"] => cmd_bench(&args, 1_000_000),
        ["demo"] => cmd_demo(&args),
        ["agents"] => cmd_agents(&args),
        ["snapshot", "write"] => cmd_snapshot_write(&args),
        ["snapshot", "verify"] => cmd_snapshot_verify(&args),
        ["snapshot", "restore"] => cmd_snapshot_restore(&args),
        _ => Err(UsageError(format!("unknown command {:?}", args.words.join(" "))).into()),
    }
}

fn codec_arg(args: &Args) -> AnyResult<Codec> {
    let name: String = args.get("codec", "gzip".to_owned())?;
    match name.as_str() {
        "gzip" => Ok(Codec::Gzip),
        "lz4" => Ok(Codec::Lz4),
        _ => Err(UsageError(format!("--codec {name}: expected gzip or lz4")).into()),
    }
}

fn cmd_bench(args: &Args, default_nodes: usize) -> AnyResult<ExitCode> {
    match args.get_opt::<String>("transport")?.as_deref() {
        None | Some("memory") => {}
        Some("mqtt") => return cmd_bench_mqtt(args),
        Some(t) => return Err(UsageError(format!("--transport {t}: expected memory or mqtt")).into()),
    }
    let defaults = BenchConfig::default();
    let cfg = BenchConfig {
        nodes: args.get("nodes", default_nodes)?,
        seed: args.get("seed", defaults.seed)?,
        codec: codec_arg(args)?,
        batch: args.get("batch", defaults.batch)?,
        max_chunk_bytes: args.get("max-chunk-bytes", defaults.max_chunk_bytes)?,
        engine: !args.flag("cache-only"),
    };
    let json = args.flag("json");
    args.reject_unknown()?;
    let started = std::time::Instant::now();
    let figures = bench::run(&cfg, &mut |step| eprintln!("[{:>6.2} s] {step}", started.elapsed().as_secs_f64()))?;
    println!("{}", bench::table(&figures));
    if json {
        println!("{}", figures.to_json());
    }
    Ok(ExitCode::SUCCESS)
}

/// `bench --transport mqtt`: see [`kole_sim::mqtt_bench`].
fn cmd_bench_mqtt(args: &Args) -> AnyResult<ExitCode> {
    use kole_sim::mqtt_bench::{self, MqttBenchConfig};
    if args.flag("per-node") {
        return cmd_bench_per_node(args);
    }
    let d = MqttBenchConfig::default();
    let cfg = MqttBenchConfig {
        nodes: args.get("nodes", d.nodes)?,
        seed: args.get("seed", d.seed)?,
        broker: args.get_opt::<kole_mqtt::BrokerAddr>("broker")?,
        broker_pid: args.get_opt("broker-pid")?,
        connections: args.get("connections", d.connections)?,
        controller_connections: args.get("controller-connections", d.controller_connections)?,
        per_node_subscriptions: !args.flag("wildcard-downlink"),
        inflight: args.get("inflight", d.inflight)?,
        phase_timeout: std::time::Duration::from_secs(args.get("phase-timeout", d.phase_timeout.as_secs())?),
        register_window: args.get("register-window", d.register_window)?,
        controller_qos0: args.flag("controller-qos0"),
    };
    let json = args.flag("json");
    args.reject_unknown()?;
    let started = std::time::Instant::now();
    let figures = mqtt_bench::run(&cfg, &mut |step| eprintln!("[{:>6.2} s] {step}", started.elapsed().as_secs_f64()))?;
    println!("{}", mqtt_bench::table(&figures));
    if json {
        println!("{}", figures.to_json());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_bench_per_node(args: &Args) -> AnyResult<ExitCode> {
    use kole_sim::per_node::{self, PerNodeConfig};
    let nodes = args.get("nodes", 50_000usize)?;
    let d = PerNodeConfig::for_nodes(nodes);
    let cfg = PerNodeConfig {
        nodes,
        seed: args.get("seed", d.seed)?,
        brokers: args.get("brokers", d.brokers)?,
        workers: args.get("workers", d.workers)?,
        connect_rate: args.get("connect-rate", d.connect_rate)?,
        heartbeat_interval_ms: args.get("heartbeat-interval-ms", d.heartbeat_interval_ms)?,
        storm: args.flag("storm"),
        phase_timeout: std::time::Duration::from_secs(args.get("phase-timeout", d.phase_timeout.as_secs())?),
        mosquitto_dir: args.get_opt::<PathBuf>("mosquitto-dir")?,
    };
    let json = args.flag("json");
    args.reject_unknown()?;
    let started = std::time::Instant::now();
    let figures = per_node::run(&cfg, &mut |step| eprintln!("[{:>6.2} s] {step}", started.elapsed().as_secs_f64()))?;
    println!("{}", per_node::table(&figures));
    if json {
        println!("{}", figures.to_json());
    }
    Ok(ExitCode::SUCCESS)
}

/// The worker process of `bench --per-node` (not for direct use).
fn cmd_agents(args: &Args) -> AnyResult<ExitCode> {
    use kole_sim::per_node::{self, WorkerConfig};
    let slice: String = args.get("slice", "0/1".to_owned())?;
    let (i, k) = slice.split_once('/').ok_or_else(|| UsageError(format!("--slice {slice}: expected I/K")))?;
    let brokers: String = args.get("brokers", String::new())?;
    let cfg = WorkerConfig {
        fleet: args.get("fleet", String::new())?,
        brokers: brokers.split(',').map(str::parse).collect::<Result<_, _>>()?,
        nodes: args.get("nodes", 0usize)?,
        seed: args.get("seed", 42u64)?,
        slice: i.parse()?,
        slices: k.parse()?,
        secret: args.get("secret", 0u64)?,
        rate: args.get("rate", 1_000u32)?,
    };
    args.reject_unknown()?;
    per_node::worker(&cfg)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_demo(args: &Args) -> AnyResult<ExitCode> {
    let defaults = kole_sim::demo::DemoConfig::default();
    let cfg = kole_sim::demo::DemoConfig {
        nodes: args.get("nodes", defaults.nodes)?,
        seed: args.get("seed", defaults.seed)?,
        dir: args.get_opt::<PathBuf>("dir")?,
        mqtt_nodes: args.get("mqtt-nodes", defaults.mqtt_nodes)?,
    };
    args.reject_unknown()?;
    kole_sim::demo::run(&cfg)?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> AnyResult<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn dir_arg(args: &Args) -> AnyResult<PathBuf> {
    args.get_opt::<PathBuf>("dir")?.ok_or_else(|| UsageError("--dir is required".into()).into())
}

fn cmd_snapshot_write(args: &Args) -> AnyResult<ExitCode> {
    let dir = dir_arg(args)?;
    let nodes: usize = args.get("nodes", 100_000)?;
    let seed: u64 = args.get("seed", 42)?;
    let codec = codec_arg(args)?;
    let keep: usize = args.get("keep", 2)?;
    args.reject_unknown()?;
    let fleet = ReferenceFleet::new(nodes, seed);
    let mut cache = kole_core::cache::NodeCache::with_capacity(nodes, 28);
    fleet.load_into(&mut cache)?;
    let store = DirSnapshotStore::open(&dir)?;
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

fn cmd_snapshot_verify(args: &Args) -> AnyResult<ExitCode> {
    let dir = dir_arg(args)?;
    args.reject_unknown()?;
    let store = DirSnapshotStore::open(&dir)?;
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

fn cmd_snapshot_restore(args: &Args) -> AnyResult<ExitCode> {
    let dir = dir_arg(args)?;
    args.reject_unknown()?;
    let store = DirSnapshotStore::open(&dir)?;
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
