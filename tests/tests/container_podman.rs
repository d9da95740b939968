//! The container runtime against a real podman (Debian's 4.3), the engine a node already has.
//!
//! Ignored by default: it needs podman, its `containers.conf` and the test image, which
//! `.ci/podman.sh prepare` installs, writes and imports (no registry is reachable):
//!
//! ```text
//! eval "$(.ci/podman.sh prepare)"     # sets CONTAINERS_CONF and KOLE_TEST_PODMAN=1
//! cargo test -p kole-tests --test container_podman -- --include-ignored --test-threads=1
//! ```
//!
//! The tests run as root (as CI does) and use workload ids under `kole-podman-test`, removing
//! their containers as they go.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kole_core::agent::{ContainerEngine, ContainerRuntime, ContainerRuntimeConfig, WorkloadRuntime, container_name};
use kole_core::backoff::Backoff;
use kole_core::model::{NodeName, Timestamp, Workload, WorkloadId, WorkloadPhase};
use kole_core::runspec::{RestartPolicy, RunSpec};
use kole_tests::contract::runtime::{self, RuntimeSpecs};
use kole_tests::fixtures;

const IMAGE: &str = "localhost/kole-test/busybox:1";

fn require_podman() {
    assert_eq!(
        std::env::var("KOLE_TEST_PODMAN").as_deref(),
        Ok("1"),
        "run `eval \"$(.ci/podman.sh prepare)\"` first (it sets KOLE_TEST_PODMAN=1 and CONTAINERS_CONF)"
    );
}

fn node() -> NodeName {
    NodeName::new("podman-test-node").unwrap()
}

fn config(tag: &str) -> ContainerRuntimeConfig {
    let (engine, binary) = ContainerEngine::detect().expect("podman in PATH");
    assert_eq!(engine, ContainerEngine::Podman, "podman comes first in detection");
    let mut c = ContainerRuntimeConfig::new(node(), engine, binary, fixtures::scratch_dir(tag));
    c.pull_backoff = Backoff::new(200, 1_000, 2.0);
    c.pull_attempts = 2;
    c.status_interval_ms = 200;
    c
}

fn workload(id: &str, version: u64, spec: &RunSpec) -> Arc<Workload> {
    Arc::new(Workload { spec: spec.encode().unwrap(), ..fixtures::workload(id, version, "", &[100]) })
}

fn sleeper() -> RunSpec {
    let mut spec = RunSpec::container(IMAGE);
    spec.command = vec!["/bin/sh".into(), "-c".into()];
    spec.args = vec!["echo started; exec sleep 1000".into()];
    spec.stop_grace_ms = 1_000;
    spec
}

fn now(start: Instant) -> Timestamp {
    Timestamp::from_millis(start.elapsed().as_millis() as u64 + 1)
}

/// Polls on the real clock until `id` reports `phase` (60 s at most).
fn until(rt: &mut ContainerRuntime, start: Instant, id: &WorkloadId, phase: WorkloadPhase) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut changes = Vec::new();
    loop {
        rt.poll(&node(), now(start), &mut changes);
        if rt.phase(id) == Some(phase) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not reach {phase:?}: {:?} ({:?})",
            rt.phase(id),
            rt.failure_reason(&node(), id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until every engine command asked so far has finished.
fn settle(rt: &mut ContainerRuntime, start: Instant) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut changes = Vec::new();
    while !rt.is_idle() {
        rt.poll(&node(), now(start), &mut changes);
        assert!(Instant::now() < deadline, "the runtime did not settle");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn podman(args: &[&str]) -> String {
    let out = Command::new("podman").args(args).output().expect("podman runs");
    assert!(out.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Names of the containers of workload `id`, running or not.
fn containers_of(id: &str) -> Vec<String> {
    let filter = format!("label=dev.kole.workload={id}");
    let mut names: Vec<String> =
        podman(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]).lines().map(str::to_owned).collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs podman: eval \"$(.ci/podman.sh prepare)\" sets KOLE_TEST_PODMAN=1"]
fn a_workload_runs_updates_fails_is_adopted_and_is_removed_on_podman() {
    require_podman();
    let start = Instant::now();
    let id = "kole-podman-test/web";
    let wid = WorkloadId::new(id).unwrap();
    let mut spec = sleeper();
    spec.env.insert("GREETING".into(), "hello world".into());
    spec.config = Some("answer=42\n".into());
    let mut rt = ContainerRuntime::new(config("podman-web")).unwrap();

    // Apply → Running, with the labels, the env and the config file.
    let phase = rt.apply(&node(), &workload(id, 1, &spec), now(start));
    assert_eq!(phase, WorkloadPhase::Pending);
    until(&mut rt, start, &wid, WorkloadPhase::Running);
    let v1 = container_name(&wid, 1);
    assert_eq!(v1, "kole-kole-podman-test_web-v1");
    assert_eq!(containers_of(id), [v1.as_str()]);
    let labels = podman(&["inspect", "--format", "{{json .Config.Labels}}", &v1]);
    for label in [
        "\"dev.kole.managed\":\"true\"",
        "\"dev.kole.node\":\"podman-test-node\"",
        "\"dev.kole.workload\":\"kole-podman-test/web\"",
        "\"dev.kole.version\":\"1\"",
    ] {
        assert!(labels.contains(label), "{label} in {labels}");
    }
    let env = podman(&["exec", &v1, "env"]);
    for var in [
        "GREETING=hello world",
        "KOLE_NODE=podman-test-node",
        "KOLE_WORKLOAD=kole-podman-test/web",
        "KOLE_WORKLOAD_VERSION=1",
        "KOLE_CONFIG_FILE=/run/kole/config",
    ] {
        assert!(env.lines().any(|l| l == var), "{var} in the container's env:\n{env}");
    }
    assert!(!env.contains("CARGO"), "the agent's environment leaked:\n{env}");
    assert_eq!(podman(&["exec", &v1, "cat", "/run/kole/config"]), "answer=42");
    assert_eq!(podman(&["inspect", "--format", "{{.HostConfig.RestartPolicy.Name}}", &v1]), "always");
    assert_eq!(podman(&["logs", &v1]), "started");

    // An update to v2 replaces v1.
    rt.apply(&node(), &workload(id, 2, &spec), now(start));
    settle(&mut rt, start);
    until(&mut rt, start, &wid, WorkloadPhase::Running);
    let v2 = container_name(&wid, 2);
    assert_eq!(containers_of(id), [v2.as_str()], "v1 is gone once v2 runs");
    let v2_id = podman(&["inspect", "--format", "{{.Id}}", &v2]);

    // A second runtime (a restarted agent) adopts the running container instead of restarting it.
    drop(rt);
    let mut rt = ContainerRuntime::new(config("podman-web")).unwrap();
    settle(&mut rt, start);
    assert!(rt.observed_workloads().contains(&wid));
    assert_eq!(rt.apply(&node(), &workload(id, 2, &spec), now(start)), WorkloadPhase::Running);
    settle(&mut rt, start);
    assert_eq!(podman(&["inspect", "--format", "{{.Id}}", &v2]), v2_id, "the same container, adopted");

    // Removal stops and removes it.
    rt.remove(&node(), &wid, now(start));
    settle(&mut rt, start);
    assert!(containers_of(id).is_empty());
    let _ = std::fs::remove_dir_all(&rt.config().state_dir);
}

#[test]
#[ignore = "needs podman: eval \"$(.ci/podman.sh prepare)\" sets KOLE_TEST_PODMAN=1"]
fn failures_on_podman_carry_the_engines_reason() {
    require_podman();
    let start = Instant::now();
    let mut rt = ContainerRuntime::new(config("podman-fail")).unwrap();

    // No registry: the pull fails, is retried, and the reason says so.
    let nope = WorkloadId::new("kole-podman-test/nope").unwrap();
    rt.apply(&node(), &workload(nope.as_str(), 1, &RunSpec::container("localhost/nope:1")), now(start));
    until(&mut rt, start, &nope, WorkloadPhase::Failed);
    let reason = rt.failure_reason(&node(), &nope).unwrap();
    assert!(reason.starts_with("image pull failed: "), "{reason}");
    assert!(reason.contains("localhost/nope:1"), "{reason}");

    // A missing entry point fails at start.
    let bad = WorkloadId::new("kole-podman-test/bad").unwrap();
    let mut spec = RunSpec::container(IMAGE);
    spec.command = vec!["/nonexistent".into()];
    rt.apply(&node(), &workload(bad.as_str(), 1, &spec), now(start));
    until(&mut rt, start, &bad, WorkloadPhase::Failed);
    let reason = rt.failure_reason(&node(), &bad).unwrap();
    assert!(reason.starts_with("container start failed: ") && reason.contains("/nonexistent"), "{reason}");
    assert!(containers_of(bad.as_str()).is_empty(), "a failed start leaves no container behind");

    // A job that exits non-zero, never restarted, is Failed with its exit code.
    let job = WorkloadId::new("kole-podman-test/job").unwrap();
    let mut spec = RunSpec::container(IMAGE);
    spec.command = vec!["/bin/sh".into(), "-c".into(), "exit 3".into()];
    spec.restart = RestartPolicy::Never;
    rt.apply(&node(), &workload(job.as_str(), 1, &spec), now(start));
    until(&mut rt, start, &job, WorkloadPhase::Failed);
    assert_eq!(rt.failure_reason(&node(), &job).as_deref(), Some("container exited with code 3"));

    for id in [&nope, &bad, &job] {
        rt.remove(&node(), id, now(start));
    }
    settle(&mut rt, start);
    assert!(containers_of(job.as_str()).is_empty());
    let _ = std::fs::remove_dir_all(&rt.config().state_dir);
}

#[test]
#[ignore = "needs podman: eval \"$(.ci/podman.sh prepare)\" sets KOLE_TEST_PODMAN=1"]
fn container_runtime_keeps_the_runtime_contract_on_podman() {
    require_podman();
    let mut broken = RunSpec::container(IMAGE);
    broken.command = vec!["/nonexistent".into()];
    let specs = RuntimeSpecs { runs: sleeper().encode().unwrap(), fails: broken.encode().unwrap() };
    runtime::check(|| ContainerRuntime::new(config("podman-contract")).unwrap(), &specs);
    let _ = std::fs::remove_dir_all(config("podman-contract").state_dir);
}
