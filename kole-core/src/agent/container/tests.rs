//! The container runtime against a fake engine: a shell script that records every invocation
//! (argv and environment) and keeps containers as JSON files, so tests can assert the exact
//! commands, simulate pull failures, failed starts and exits, and inspect what is left.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::engine::{ObservedState, parse_ps};
use super::*;
use crate::backoff::Jitter;
use crate::model::{DeliveryMode, RolloutStrategy, Selector};

/// The fake engine (podman-flavoured: `image exists`, `ps --format json` prints an array).
const FAKE_ENGINE: &str = r#"#!/bin/sh
D="$(dirname "$0")"
# One write per call, so calls made at once (the worker's `ps` beside a `stop`) never interleave.
line=""; for a in "$@"; do line="$line$a	"; done
printf '%s\n' "$line" >> "$D/calls"
env > "$D/last-env"
key() { echo "$1" | tr '/:' '__'; }
case "$1" in
image)
    [ -e "$D/images/$(key "$3")" ] && exit 0
    echo "Error: $3: image not known" >&2; exit 1 ;;
pull)
    f="$D/pull-fail/$(key "$2")"
    if [ -e "$f" ] && [ "$(cat "$f")" -gt 0 ]; then
        echo $(( $(cat "$f") - 1 )) > "$f"
        echo "Trying to pull $2..." >&2
        echo "Error: initializing source docker://$2: connection refused" >&2
        exit 125
    fi
    touch "$D/images/$(key "$2")"; exit 0 ;;
run)
    shift; name=; labels=
    while [ $# -gt 0 ]; do
        case "$1" in
        --name) name=$2; shift 2 ;;
        --label) labels="$labels${labels:+,}\"${2%%=*}\":\"${2#*=}\""; shift 2 ;;
        *) shift ;;
        esac
    done
    if [ -e "$D/run-fail" ]; then
        echo 'Error: runc: exec: "/nonexistent": stat /nonexistent: no such file or directory' >&2
        printf '{"Names":["%s"],"Labels":{%s},"State":"created","ExitCode":0}' "$name" "$labels" > "$D/containers/$name"
        exit 127
    fi
    printf '{"Names":["%s"],"Labels":{%s},"State":"running","ExitCode":0}' "$name" "$labels" > "$D/containers/$name"
    echo "id-$name" ;;
ps)
    printf '['; sep=
    for f in "$D"/containers/*; do c=$(cat "$f" 2>/dev/null) || continue; printf '%s%s' "$sep" "$c"; sep=,; done
    printf ']\n' ;;
stop)
    shift; [ "$1" = -t ] && shift 2
    for n in "$@"; do [ -e "$D/containers/$n" ] && sed -i 's/"State":"running"/"State":"exited"/' "$D/containers/$n"; done
    exit 0 ;;
rm)
    if [ -e "$D/rm-fail" ]; then rm -f "$D/rm-fail"; echo "Error: container state improper" >&2; exit 125; fi
    shift; [ "$1" = -f ] && shift
    for n in "$@"; do rm -f "$D/containers/$n"; done ;;
*)
    echo "Error: unknown command $1" >&2; exit 125 ;;
esac
"#;

struct Fake {
    dir: PathBuf,
}

impl Fake {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kole-container-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["images", "pull-fail", "containers", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let bin = dir.join("podman");
        std::fs::write(&bin, FAKE_ENGINE).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { dir }
    }

    fn config(&self) -> ContainerRuntimeConfig {
        let mut c = ContainerRuntimeConfig::new(
            node(),
            ContainerEngine::Podman,
            self.dir.join("podman"),
            self.dir.join("state"),
        );
        c.pull_backoff = Backoff::new(1_000, 10_000, 2.0).with_jitter(Jitter::None);
        c.pull_attempts = 3;
        c.command_timeout = Duration::from_secs(20);
        c
    }

    fn runtime(&self) -> ContainerRuntime {
        ContainerRuntime::new(self.config()).unwrap()
    }

    fn has_image(&self, image: &str) {
        std::fs::write(self.dir.join("images").join(image.replace(['/', ':'], "_")), "").unwrap();
    }

    fn fail_pulls(&self, image: &str, times: u32) {
        std::fs::write(self.dir.join("pull-fail").join(image.replace(['/', ':'], "_")), times.to_string()).unwrap();
    }

    /// Every invocation so far, as argv.
    fn calls(&self) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default();
        text.lines().map(|l| l.strip_suffix('\t').unwrap_or(l).split('\t').map(str::to_owned).collect()).collect()
    }

    /// Invocations of one subcommand.
    fn calls_of(&self, sub: &str) -> Vec<Vec<String>> {
        self.calls().into_iter().filter(|c| c[0] == sub).collect()
    }

    fn containers(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("containers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn set_container(&self, name: &str, json: &str) {
        std::fs::write(self.dir.join("containers").join(name), json).unwrap();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn node() -> NodeName {
    NodeName::new("edge-7").unwrap()
}

fn wid(s: &str) -> WorkloadId {
    WorkloadId::new(s).unwrap()
}

fn workload(id: &str, version: u64, spec: &RunSpec) -> Arc<Workload> {
    Arc::new(Workload {
        id: wid(id),
        version,
        spec: spec.encode().unwrap(),
        selector: Selector::default(),
        delivery: DeliveryMode::default(),
        rollout: RolloutStrategy::default(),
    })
}

/// Polls at virtual time `now` until every engine command asked so far has finished (real time
/// bounded), and returns the phase changes reported.
fn settle(rt: &mut ContainerRuntime, now: u64) -> Vec<(WorkloadId, WorkloadPhase)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut changes = Vec::new();
    loop {
        rt.poll(&node(), Timestamp::from_millis(now), &mut changes);
        if rt.is_idle() {
            rt.poll(&node(), Timestamp::from_millis(now), &mut changes);
            if rt.is_idle() {
                return changes;
            }
        }
        assert!(Instant::now() < deadline, "the runtime did not settle");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn busybox() -> RunSpec {
    RunSpec::container("localhost/kole-test/busybox:1")
}

#[test]
fn apply_runs_the_spec_with_exactly_these_options() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    let mut rt = fake.runtime();
    let mut spec = busybox();
    spec.command = vec!["/bin/sh".into(), "-c".into()];
    spec.args = vec!["echo hello; sleep 100".into()];
    spec.env.insert("CACHE_SIZE".into(), "2G".into());
    spec.env.insert("GREETING".into(), "hello world".into());
    spec.working_dir = Some("/tmp".into());
    spec.restart = RestartPolicy::OnFailure;
    spec.max_restarts = 3;
    spec.stop_grace_ms = 2_500;
    spec.config = Some("port=8080\n".into());
    let w = workload("default/cdn-cache", 4, &spec);
    assert_eq!(rt.apply(&node(), &w, Timestamp::from_secs(1)), WorkloadPhase::Pending, "the event loop never waits");
    let changes = settle(&mut rt, 1_000);
    assert_eq!(changes, vec![(wid("default/cdn-cache"), WorkloadPhase::Running)]);

    let config = fake.dir.join("state/kole-default_cdn-cache-v4/config");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "port=8080\n");
    let expected: Vec<String> = [
        "run",
        "-d",
        "--name",
        "kole-default_cdn-cache-v4",
        "--label",
        "dev.kole.managed=true",
        "--label",
        "dev.kole.node=edge-7",
        "--label",
        "dev.kole.workload=default/cdn-cache",
        "--label",
        "dev.kole.version=4",
        "--restart=on-failure:3",
        "--stop-timeout",
        "3",
        "--pull=never",
        "--log-opt",
        "max-size=10m",
        "-w",
        "/tmp",
        "-v",
        &format!("{}:/run/kole/config:ro", config.display()),
        "-e",
        "KOLE_NODE=edge-7",
        "-e",
        "KOLE_WORKLOAD=default/cdn-cache",
        "-e",
        "KOLE_WORKLOAD_VERSION=4",
        "-e",
        "KOLE_CONFIG_FILE=/run/kole/config",
        "-e",
        "CACHE_SIZE=2G",
        "-e",
        "GREETING=hello world",
        "--entrypoint",
        "/bin/sh",
        "localhost/kole-test/busybox:1",
        "-c",
        "echo hello; sleep 100",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(fake.calls_of("run"), vec![expected]);
    assert!(fake.calls_of("pull").is_empty(), "an image already present is not pulled");
    assert_eq!(fake.containers(), ["kole-default_cdn-cache-v4"]);

    // The engine CLI gets a cleared environment: nothing of the agent's (cargo's variables stand
    // in for the agent's settings and credentials).
    let env = std::fs::read_to_string(fake.dir.join("last-env")).unwrap();
    for line in env.lines() {
        let name = line.split('=').next().unwrap_or("");
        assert!(
            DEFAULT_PASSTHROUGH_ENV.contains(&name) || ["PWD", "SHLVL", "_", "OLDPWD"].contains(&name),
            "{name} reached the engine CLI"
        );
    }
    assert!(!env.contains("CARGO"), "{env}");

    // Re-applying the same version is a no-op.
    assert_eq!(rt.apply(&node(), &w, Timestamp::from_secs(2)), WorkloadPhase::Running);
    settle(&mut rt, 2_000);
    assert_eq!(fake.calls_of("run").len(), 1);
}

#[test]
fn restart_policies_map_onto_the_engine() {
    let mut spec = busybox();
    for (policy, max, flag) in [
        (RestartPolicy::Always, 5, "--restart=always"),
        (RestartPolicy::OnFailure, 2, "--restart=on-failure:2"),
        (RestartPolicy::OnFailure, 0, "--restart=no"),
        (RestartPolicy::Never, 5, "--restart=no"),
    ] {
        spec.restart = policy;
        spec.max_restarts = max;
        assert_eq!(engine::restart_flag(&spec), flag);
    }
}

#[test]
fn a_missing_image_is_pulled_with_backoff_and_fails_with_the_engines_message() {
    let fake = Fake::new();
    fake.fail_pulls("localhost/nope:1", 100);
    let mut rt = fake.runtime();
    let mut spec = RunSpec::container("localhost/nope:1");
    spec.max_restarts = 1;
    let w = workload("nope", 1, &spec);
    assert_eq!(rt.apply(&node(), &w, Timestamp::from_millis(10_000)), WorkloadPhase::Pending);
    assert!(settle(&mut rt, 10_000).is_empty(), "still Pending while retries remain");
    assert_eq!(fake.calls_of("pull").len(), 1);
    // The first retry waits 1 s (no jitter in this test), the second 2 s.
    settle(&mut rt, 10_999);
    assert_eq!(fake.calls_of("pull").len(), 1, "no retry before the backoff");
    settle(&mut rt, 11_000);
    assert_eq!(fake.calls_of("pull").len(), 2);
    settle(&mut rt, 12_999);
    assert_eq!(fake.calls_of("pull").len(), 2);
    let changes = settle(&mut rt, 13_000);
    assert_eq!(fake.calls_of("pull").len(), 3);
    assert_eq!(changes, vec![(wid("nope"), WorkloadPhase::Failed)], "Failed after pull_attempts (3)");
    assert_eq!(
        rt.failure_reason(&node(), &wid("nope")).as_deref(),
        Some("image pull failed: initializing source docker://localhost/nope:1: connection refused")
    );
    assert!(fake.calls_of("run").is_empty());
    settle(&mut rt, 100_000);
    assert_eq!(fake.calls_of("pull").len(), 3, "no retries once Failed");

    // A restart tries again, and a pull that now works runs the workload.
    fake.fail_pulls("localhost/nope:1", 0);
    assert_eq!(rt.restart(&node(), &wid("nope"), Timestamp::from_secs(101)), Some(WorkloadPhase::Pending));
    let changes = settle(&mut rt, 101_000);
    assert_eq!(changes, vec![(wid("nope"), WorkloadPhase::Running)]);
    assert_eq!(rt.failure_reason(&node(), &wid("nope")), None);
    assert_eq!(fake.containers(), ["kole-nope-v1"]);
}

#[test]
fn exits_map_to_failed_with_the_code_or_stopped() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    let mut rt = fake.runtime();
    let w = workload("job", 1, &busybox());
    rt.apply(&node(), &w, Timestamp::from_secs(1));
    assert_eq!(settle(&mut rt, 1_000), vec![(wid("job"), WorkloadPhase::Running)]);
    let labels = r#""dev.kole.managed":"true","dev.kole.node":"edge-7","dev.kole.workload":"job""#;
    fake.set_container(
        "kole-job-v1",
        &format!(r#"{{"Names":["kole-job-v1"],"Labels":{{{labels}}},"State":"exited","ExitCode":3}}"#),
    );
    // Status is listed every 2 s, not on every poll.
    assert!(settle(&mut rt, 1_500).is_empty());
    assert_eq!(settle(&mut rt, 3_000), vec![(wid("job"), WorkloadPhase::Failed)]);
    assert_eq!(rt.failure_reason(&node(), &wid("job")).as_deref(), Some("container exited with code 3"));
    assert!(rt.health(&node()).is_ok(), "a failed workload does not degrade the node");

    fake.set_container(
        "kole-job-v1",
        &format!(r#"{{"Names":["kole-job-v1"],"Labels":{{{labels}}},"State":"exited","ExitCode":0}}"#),
    );
    assert_eq!(settle(&mut rt, 5_000), vec![(wid("job"), WorkloadPhase::Stopped)]);
    assert_eq!(rt.failure_reason(&node(), &wid("job")), None);

    std::fs::remove_file(fake.dir.join("containers/kole-job-v1")).unwrap();
    assert_eq!(settle(&mut rt, 7_000), vec![(wid("job"), WorkloadPhase::Failed)]);
    assert!(rt.failure_reason(&node(), &wid("job")).unwrap().contains("is gone"));
}

#[test]
fn a_failed_start_is_failed_with_the_engines_message_and_cleaned_up() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    std::fs::write(fake.dir.join("run-fail"), "").unwrap();
    let mut rt = fake.runtime();
    let mut spec = busybox();
    spec.command = vec!["/nonexistent".into()];
    rt.apply(&node(), &workload("bad", 1, &spec), Timestamp::from_secs(1));
    assert_eq!(settle(&mut rt, 1_000), vec![(wid("bad"), WorkloadPhase::Failed)]);
    assert_eq!(
        rt.failure_reason(&node(), &wid("bad")).as_deref(),
        Some(r#"container start failed: runc: exec: "/nonexistent": stat /nonexistent: no such file or directory"#)
    );
    // The failed container is removed after the failed start. (A status poll may come after the
    // removal when the machine is slow, so the removal need not be the last call.)
    let calls = fake.calls();
    let run = calls.iter().rposition(|c| c[0] == "run").expect("a run call");
    assert!(calls[run..].iter().any(|c| c == &["rm", "-f", "kole-bad-v1"]), "{calls:?}");
    assert!(fake.containers().is_empty());
}

#[test]
fn an_update_replaces_the_old_version_and_removal_removes_it() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    let mut rt = fake.runtime();
    let mut spec = busybox();
    spec.stop_grace_ms = 3_000;
    spec.config = Some("v1".into());
    rt.apply(&node(), &workload("web", 1, &spec), Timestamp::from_secs(1));
    settle(&mut rt, 1_000);
    assert_eq!(fake.containers(), ["kole-web-v1"]);

    spec.config = Some("v2".into());
    rt.apply(&node(), &workload("web", 2, &spec), Timestamp::from_secs(2));
    assert_eq!(settle(&mut rt, 2_000), vec![(wid("web"), WorkloadPhase::Running)]);
    assert_eq!(fake.containers(), ["kole-web-v2"], "a workload never runs twice");
    let calls = fake.calls();
    let stop = calls.iter().position(|c| c[..] == ["stop", "kole-web-v1"]).expect("v1 stopped");
    let rm = calls.iter().position(|c| c[..] == ["rm", "-f", "kole-web-v1"]).expect("v1 removed");
    let run_v2 = calls.iter().position(|c| c[0] == "run" && c[3] == "kole-web-v2").expect("v2 run");
    assert!(stop < rm && rm < run_v2, "{calls:?}");

    let before = fake.calls().len();
    rt.remove(&node(), &wid("web"), Timestamp::from_secs(3));
    assert!(settle(&mut rt, 3_000).is_empty());
    let calls = fake.calls()[before..].to_vec();
    let tail: Vec<&Vec<String>> = calls.iter().filter(|c| c[0] != "ps").collect();
    assert_eq!(
        tail,
        [
            &vec!["stop".to_owned(), "-t".into(), "3".into(), "kole-web-v2".into()],
            &vec!["rm".to_owned(), "-f".into(), "kole-web-v2".into()]
        ]
    );
    assert!(fake.containers().is_empty());
    assert!(!fake.dir.join("state/kole-web-v2").exists(), "the config file goes with the container");
    assert_eq!(rt.phase(&wid("web")), None);
}

#[test]
fn a_new_runtime_adopts_running_containers_by_label() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    let w = workload("svc", 7, &busybox());
    {
        let mut rt = fake.runtime();
        rt.apply(&node(), &w, Timestamp::from_secs(1));
        settle(&mut rt, 1_000);
    }
    assert_eq!(fake.containers(), ["kole-svc-v7"], "dropping the runtime leaves containers running");
    let runs = fake.calls_of("run").len();

    // A restarted agent: the new runtime lists the node's containers at start...
    let mut rt = fake.runtime();
    settle(&mut rt, 0);
    assert_eq!(rt.observed_workloads(), [wid("svc")]);
    // ...so re-applying the same version is Running at once, and nothing is started again.
    assert_eq!(rt.apply(&node(), &w, Timestamp::from_secs(2)), WorkloadPhase::Running);
    assert!(settle(&mut rt, 2_000).is_empty());
    assert_eq!(fake.calls_of("run").len(), runs);
    assert!(fake.calls_of("stop").is_empty());
    assert_eq!(fake.containers(), ["kole-svc-v7"]);
}

#[test]
fn an_unreachable_engine_degrades_the_node_and_bad_specs_fail_with_their_reason() {
    let fake = Fake::new();
    let mut config = fake.config();
    config.binary = fake.dir.join("no-such-engine");
    let mut rt = ContainerRuntime::new(config).unwrap();
    settle(&mut rt, 0);
    assert_eq!(rt.health(&node()), NodeHealth::DEGRADED);
    rt.apply(&node(), &workload("svc", 1, &busybox()), Timestamp::from_secs(1));
    settle(&mut rt, 1_000);
    settle(&mut rt, 2_000);
    let changes = settle(&mut rt, 4_000);
    assert_eq!(changes, vec![(wid("svc"), WorkloadPhase::Failed)]);
    let reason = rt.failure_reason(&node(), &wid("svc")).unwrap();
    assert!(reason.starts_with("container engine did not answer: cannot run the engine binary"), "{reason}");

    // Specs the container runtime cannot run fail at once, with the reason.
    let process = RunSpec::process(["/bin/true"]);
    assert_eq!(rt.apply(&node(), &workload("proc", 1, &process), Timestamp::from_secs(5)), WorkloadPhase::Failed);
    assert!(rt.failure_reason(&node(), &wid("proc")).unwrap().contains("needs an image"));
    let mut text = (*workload("text", 1, &busybox())).clone();
    text.spec = b"sleep 100".to_vec();
    assert_eq!(rt.apply(&node(), &Arc::new(text), Timestamp::from_secs(5)), WorkloadPhase::Failed);
    assert!(rt.failure_reason(&node(), &wid("text")).unwrap().contains("not a kole runtime spec"));
}

#[test]
fn container_names_are_valid_and_map_back_to_one_id() {
    let cases = [
        ("default/cdn-cache", 3, "kole-default_cdn-cache-v3"),
        ("a_b", 1, "kole-a__b-v1"),
        ("a/b", 1, "kole-a_b-v1"),
        ("a-v2", 1, "kole-a-v2-v1"),
    ];
    for (id, v, name) in cases {
        assert_eq!(container_name(&wid(id), v), name);
    }
}

#[test]
fn engines_parse_and_detect() {
    assert_eq!("docker".parse::<ContainerEngine>(), Ok(ContainerEngine::Docker));
    assert!("rkt".parse::<ContainerEngine>().unwrap_err().to_string().contains("expected podman, docker or nerdctl"));
    let fake = Fake::new();
    let dir = fake.dir.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fake.dir.join("podman"), dir.join("nerdctl")).unwrap();
    std::fs::write(dir.join("docker"), "not executable").unwrap();
    let path = std::env::join_paths([Path::new("/nonexistent"), &dir]).unwrap();
    assert_eq!(ContainerEngine::detect_in(&path), Some((ContainerEngine::Nerdctl, dir.join("nerdctl"))));
    assert_eq!(ContainerEngine::Docker.find_in(&path), None, "not executable");
    assert_eq!(
        ContainerError::EngineNotFound(ContainerEngine::Podman).to_string(),
        "podman not found in PATH: install it, or name its binary"
    );
}

#[test]
fn ps_output_of_each_engine_decodes() {
    let podman = br#"[{"Names":["kole-a-v1"],"Labels":{"dev.kole.workload":"a"},"State":"exited","ExitCode":3,"Status":"Exited (3) 1 second ago"}]"#;
    let c = &parse_ps(podman).unwrap()[0];
    assert_eq!((c.name.as_str(), &c.state, c.exit_code), ("kole-a-v1", &ObservedState::Exited, Some(3)));
    assert_eq!(c.workload(), Some(wid("a")));
    let docker = b"{\"Names\":\"kole-a-v1\",\"Labels\":\"dev.kole.managed=true,dev.kole.workload=ns/a\",\"State\":\"exited\",\"Status\":\"Exited (137) 5 seconds ago\"}\n{\"Names\":\"kole-b-v2\",\"Labels\":\"\",\"State\":\"running\",\"Status\":\"Up 2 minutes\"}\n";
    let cs = parse_ps(docker).unwrap();
    assert_eq!(cs.len(), 2);
    assert_eq!((cs[0].exit_code, cs[0].workload()), (Some(137), Some(wid("ns/a"))));
    assert_eq!(cs[1].state, ObservedState::Running);
    assert_eq!(parse_ps(b"[]\n").unwrap(), vec![]);
    assert_eq!(parse_ps(b"").unwrap(), vec![]);
    assert!(parse_ps(b"[{\"Labels\":{}}]").unwrap_err().to_string().contains("no Names"));
    assert!(parse_ps(b"Error: cannot connect").is_err());
    let (phase, reason) = phase_of(&cs[0], &busybox());
    assert_eq!(phase, WorkloadPhase::Failed);
    assert_eq!(reason.as_deref(), Some("container exited with code 137 (killed by signal 9)"));
}

#[test]
fn engine_messages_are_the_error_line_bounded() {
    let podman = b"Trying to pull localhost/nope:1...\ntime=\"x\" level=warning msg=\"Failed, retrying\"\nError: initializing source docker://localhost/nope:1: connection refused\n";
    assert_eq!(
        engine::engine_message(podman, Some(125)),
        "initializing source docker://localhost/nope:1: connection refused"
    );
    assert_eq!(
        engine::engine_message(b"Error response from daemon: pull access denied\n", Some(1)),
        "pull access denied"
    );
    assert_eq!(engine::engine_message(b"", Some(2)), "exit status 2, no message");
    let long = format!("Error: {}", "é".repeat(400));
    let m = engine::engine_message(long.as_bytes(), Some(1));
    assert!(m.len() <= 300 + '…'.len_utf8() && m.ends_with('…'));
}

fn arb_container() -> impl Strategy<Value = (String, BTreeMap<String, String>, bool, i64)> {
    (
        "[a-z][a-z0-9_.-]{0,20}",
        proptest::collection::btree_map("[a-z.]{1,12}", "[a-zA-Z0-9/_.-]{0,12}", 0..4),
        any::<bool>(),
        0i64..256,
    )
}

proptest! {
    #[test]
    fn ps_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_ps(&bytes);
    }

    #[test]
    fn ps_output_round_trips_in_both_shapes(cs in proptest::collection::vec(arb_container(), 0..5)) {
        let podman: Vec<serde_json::Value> = cs.iter().map(|(name, labels, running, code)| serde_json::json!({
            "Names": [name], "Labels": labels, "State": if *running { "running" } else { "exited" }, "ExitCode": code,
        })).collect();
        let docker: Vec<String> = cs.iter().map(|(name, labels, running, code)| serde_json::json!({
            "Names": name,
            "Labels": labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
            "State": if *running { "running" } else { "exited" },
            "Status": if *running { "Up 1 second".to_owned() } else { format!("Exited ({code}) 1 second ago") },
        }).to_string()).collect();
        let a = parse_ps(serde_json::Value::Array(podman).to_string().as_bytes()).unwrap();
        let b = parse_ps(docker.join("\n").as_bytes()).unwrap();
        prop_assert_eq!(&a, &b);
        for (c, (name, labels, running, code)) in a.iter().zip(&cs) {
            prop_assert_eq!(&c.name, name);
            prop_assert_eq!(&c.labels, labels);
            prop_assert_eq!(c.state == ObservedState::Running, *running);
            prop_assert_eq!(c.exit_code, (!running).then_some(*code));
        }
    }
}

#[test]
fn dropping_the_runtime_finishes_removals_already_asked_for() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    let mut rt = fake.runtime();
    for id in ["a", "b", "c"] {
        rt.apply(&node(), &workload(id, 1, &busybox()), Timestamp::from_secs(1));
    }
    settle(&mut rt, 1_000);
    assert_eq!(fake.containers(), ["kole-a-v1", "kole-b-v1", "kole-c-v1"]);
    for id in ["a", "b", "c"] {
        rt.remove(&node(), &wid(id), Timestamp::from_secs(2));
    }
    // Two workers: at least one removal is still queued here.
    assert!(!rt.is_idle());
    drop(rt);
    assert!(fake.containers().is_empty());
}

#[test]
fn a_removal_that_fails_is_retried_with_backoff() {
    let fake = Fake::new();
    fake.has_image("localhost/kole-test/busybox:1");
    let mut rt = fake.runtime();
    rt.apply(&node(), &workload("svc", 1, &busybox()), Timestamp::from_secs(1));
    settle(&mut rt, 1_000);
    std::fs::write(fake.dir.join("rm-fail"), "").unwrap();
    rt.remove(&node(), &wid("svc"), Timestamp::from_secs(2));
    settle(&mut rt, 2_000);
    assert_eq!(fake.containers(), ["kole-svc-v1"], "the engine refused once");
    assert_eq!(rt.health(&node()), NodeHealth::DEGRADED);
    settle(&mut rt, 2_999);
    assert_eq!(fake.calls_of("rm").len(), 1, "no retry before the backoff");
    settle(&mut rt, 3_000);
    settle(&mut rt, 3_000);
    assert!(fake.containers().is_empty());
    assert_eq!(fake.calls_of("rm").len(), 2);
    assert!(rt.health(&node()).is_ok());
}
