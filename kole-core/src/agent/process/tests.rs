use std::time::{Duration, Instant};

use super::*;
use crate::model::Selector;

fn workload(id: &str, version: u64, spec: &RunSpec) -> Arc<Workload> {
    workload_bytes(id, version, spec.encode().unwrap())
}

fn workload_bytes(id: &str, version: u64, spec: Vec<u8>) -> Arc<Workload> {
    Arc::new(Workload {
        id: WorkloadId::new(id).unwrap(),
        version,
        spec,
        selector: Selector::everything(),
        delivery: Default::default(),
        rollout: Default::default(),
    })
}

/// `sh -c SCRIPT`, with `f` applied.
fn sh(script: &str, f: impl FnOnce(&mut RunSpec)) -> RunSpec {
    let mut spec = RunSpec::process(["sh", "-c", script]);
    f(&mut spec);
    spec
}

/// A directory of its own for a test, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("kole-process-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    Scratch(dir)
}

fn config(dir: &Path) -> ProcessRuntimeConfig {
    ProcessRuntimeConfig {
        dir: dir.to_owned(),
        restart_backoff: Backoff::new(10, 40, 2.0),
        seed: 1,
        ..ProcessRuntimeConfig::default()
    }
}

/// A runtime over a scratch directory (keep the directory until the runtime is done).
fn runtime(tag: &str) -> (ProcessRuntime, Scratch) {
    let dir = scratch(tag);
    (ProcessRuntime::new(config(&dir)), dir)
}

fn node() -> NodeName {
    NodeName::new("edge-1").unwrap()
}

/// Milliseconds on the real clock, for `now`.
fn clock() -> Timestamp {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    Timestamp::from_millis(START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1)
}

fn poll(rt: &mut ProcessRuntime) -> Vec<(WorkloadId, WorkloadPhase)> {
    let mut changes = Vec::new();
    rt.poll(&node(), clock(), &mut changes);
    changes
}

/// Polls until `done`, for at most 10 s.
fn poll_until(rt: &mut ProcessRuntime, what: &str, mut done: impl FnMut(&ProcessRuntime) -> bool) {
    let start = Instant::now();
    while !done(rt) {
        assert!(start.elapsed() < Duration::from_secs(10), "stuck waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
        poll(rt);
    }
}

/// Polls until `id` reaches `phase`; returns the phases reported on the way.
fn poll_phase(rt: &mut ProcessRuntime, id: &WorkloadId, phase: WorkloadPhase) -> Vec<WorkloadPhase> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while rt.phase(id) != Some(phase) {
        assert!(start.elapsed() < Duration::from_secs(10), "stuck; saw {seen:?}");
        std::thread::sleep(Duration::from_millis(5));
        seen.extend(poll(rt).into_iter().map(|(_, p)| p));
    }
    seen
}

/// Waits until `path` holds `needle` (the reader threads copy output asynchronously).
fn wait_for_text(path: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{} never held {needle:?}: {text:?}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether `pid` runs (a zombie has stopped running).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| !s.zombie)
}

fn wait_gone(pid: u32) {
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < Duration::from_secs(10), "process {pid} still runs");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stdout_of(rt: &ProcessRuntime, id: &WorkloadId) -> PathBuf {
    rt.workload_dir(id).join("stdout.log")
}

#[test]
fn unusable_specs_fail_with_a_reason() {
    let (mut rt, _dir) = runtime("unusable");
    let w = workload_bytes("old-text", 1, b"sleep 30\nrestart=never".to_vec());
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Failed);
    let reason = rt.failure_reason(&node(), &w.id).unwrap();
    assert!(reason.starts_with("invalid runtime spec: not a kole runtime spec"), "{reason}");

    let w = workload("image-only", 1, &RunSpec::container("registry.example/cdn-cache:1.4"));
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Failed);
    assert_eq!(
        rt.failure_reason(&node(), &w.id).unwrap(),
        "the process runtime runs `command`; image registry.example/cdn-cache:1.4 needs a container runtime \
         (kole-agent --runtime podman)"
    );
    // A restart does not make it startable.
    assert_eq!(rt.restart(&node(), &w.id, clock()), Some(WorkloadPhase::Failed));
    assert!(rt.failure_reason(&node(), &w.id).is_some());
}

#[test]
fn a_missing_program_fails_with_the_exec_error() {
    let (mut rt, _dir) = runtime("missing");
    let mut spec = RunSpec::process(["/nonexistent/kole-test-binary"]);
    spec.restart = RestartPolicy::Never;
    let w = workload("missing", 1, &spec);
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Failed);
    assert_eq!(
        rt.failure_reason(&node(), &w.id).unwrap(),
        "exec /nonexistent/kole-test-binary: No such file or directory (os error 2)"
    );
    let spec = RunSpec { working_dir: Some("/nonexistent-dir".into()), ..RunSpec::process(["true"]) };
    let w = workload("no-dir", 1, &RunSpec { restart: RestartPolicy::Never, ..spec });
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Failed);
    assert_eq!(rt.failure_reason(&node(), &w.id).unwrap(), "working directory /nonexistent-dir does not exist");
}

#[test]
fn a_crashing_process_is_restarted_then_failed_with_its_status() {
    let (mut rt, _dir) = runtime("crash");
    let w = workload(
        "crash",
        1,
        &sh("exit 3", |s| {
            s.restart = RestartPolicy::OnFailure;
            s.max_restarts = 2;
        }),
    );
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Running);
    assert_eq!(rt.failure_reason(&node(), &w.id), None, "not failed (yet)");
    let seen = poll_phase(&mut rt, &w.id, WorkloadPhase::Failed);
    assert_eq!(rt.restarts(&w.id), Some(2));
    assert!(seen.contains(&WorkloadPhase::Pending), "{seen:?}");
    assert_eq!(rt.failure_reason(&node(), &w.id).unwrap(), "exited with status 3 after 2 restarts");

    let w = workload("killed", 1, &sh("kill -9 $$", |s| s.restart = RestartPolicy::Never));
    rt.apply(&node(), &w, clock());
    poll_phase(&mut rt, &w.id, WorkloadPhase::Failed);
    assert_eq!(rt.failure_reason(&node(), &w.id).unwrap(), "killed by signal 9");
}

#[test]
fn successful_exits_follow_the_policy() {
    let (mut rt, _dir) = runtime("success");
    let w = workload("once", 1, &RunSpec { restart: RestartPolicy::OnFailure, ..RunSpec::process(["true"]) });
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Running);
    assert_eq!(poll_phase(&mut rt, &w.id, WorkloadPhase::Stopped), [WorkloadPhase::Stopped]);
    assert_eq!((rt.restarts(&w.id), rt.failure_reason(&node(), &w.id)), (Some(0), None));
    // `always` restarts even successful exits, up to its bound.
    let w = workload("loop", 1, &RunSpec { max_restarts: 2, ..RunSpec::process(["true"]) });
    rt.apply(&node(), &w, clock());
    poll_phase(&mut rt, &w.id, WorkloadPhase::Stopped);
    assert_eq!(rt.restarts(&w.id), Some(2));
}

#[test]
fn a_long_healthy_run_resets_the_restart_count() {
    let dir = scratch("healthy");
    let mut rt = ProcessRuntime::new(ProcessRuntimeConfig { healthy_run_ms: 50, ..config(&dir) });
    // Each run lasts longer than `healthy_run_ms`: it may restart forever, though only one
    // restart in a row is allowed.
    let w = workload(
        "flaky",
        1,
        &sh("sleep 0.1; exit 1", |s| {
            s.restart = RestartPolicy::OnFailure;
            s.max_restarts = 1;
        }),
    );
    rt.apply(&node(), &w, clock());
    let mut pids = vec![rt.pid(&w.id).unwrap()];
    poll_until(&mut rt, "four runs", |rt| {
        assert_ne!(rt.phase(&w.id), Some(WorkloadPhase::Failed));
        if let Some(pid) = rt.pid(&w.id)
            && pids.last() != Some(&pid)
        {
            pids.push(pid);
        }
        pids.len() >= 4
    });
    assert!(rt.restarts(&w.id).unwrap() <= 1);
    // With the kubelet's 10 minutes, the same workload fails after its one restart.
    let (mut rt, _unhealthy) = runtime("unhealthy");
    rt.apply(&node(), &w, clock());
    poll_phase(&mut rt, &w.id, WorkloadPhase::Failed);
    assert_eq!(rt.failure_reason(&node(), &w.id).unwrap(), "exited with status 1 after 1 restart");
}

/// A group whose leader and grandchild ignore SIGTERM; prints the grandchild's pid.
fn stubborn(grace_ms: u32) -> RunSpec {
    sh("trap '' TERM; sleep 100 & echo $!; wait", |s| s.stop_grace_ms = grace_ms)
}

#[test]
fn stop_terms_the_group_then_kills_it_after_the_grace_without_blocking() {
    let (mut rt, _dir) = runtime("stop");
    let w = workload("stubborn", 1, &stubborn(500));
    assert_eq!(rt.apply(&node(), &w, clock()), WorkloadPhase::Running);
    let leader = rt.pid(&w.id).unwrap();
    let grandchild: u32 = wait_for_text(&stdout_of(&rt, &w.id), "\n").trim().parse().unwrap();
    assert!(alive(grandchild));
    rt.remove(&node(), &w.id, clock());
    // `remove` returned, and the group is still in its grace period: SIGTERM is ignored.
    assert!(alive(leader) && alive(grandchild), "killed before the grace period ended");
    assert_eq!(rt.phase(&w.id), None);
    // Then SIGKILL takes the leader and the grandchild.
    wait_gone(leader);
    wait_gone(grandchild);
    assert!(poll(&mut rt).is_empty());
    // The workload's directory goes with it.
    let start = Instant::now();
    while rt.workload_dir(&w.id).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "directory left behind");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_group_that_honours_sigterm_stops_with_it_and_leaves_nothing() {
    let (mut rt, _dir) = runtime("term");
    // The leader exits on SIGTERM, its background child would not: it goes with the group.
    let w = workload("polite", 1, &sh("sleep 100 & echo $!; wait", |s| s.stop_grace_ms = 60_000));
    rt.apply(&node(), &w, clock());
    let leader = rt.pid(&w.id).unwrap();
    let grandchild: u32 = wait_for_text(&stdout_of(&rt, &w.id), "\n").trim().parse().unwrap();
    rt.remove(&node(), &w.id, clock());
    // Far sooner than the 60 s grace (the bound of `wait_gone` is 10 s).
    wait_gone(leader);
    wait_gone(grandchild);
}

#[test]
fn many_removals_take_one_grace_period_not_one_each() {
    let (mut rt, _dir) = runtime("many");
    let grace = Duration::from_millis(1_000);
    let mut pids = Vec::new();
    for i in 0..4 {
        let w = workload(&format!("stubborn-{i}"), 1, &stubborn(grace.as_millis() as u32));
        rt.apply(&node(), &w, clock());
        pids.push((w.id.clone(), rt.pid(&w.id).unwrap()));
        wait_for_text(&stdout_of(&rt, &w.id), "\n");
    }
    let start = Instant::now();
    for (id, _) in &pids {
        rt.remove(&node(), id, clock());
    }
    for (_, pid) in &pids {
        wait_gone(*pid);
    }
    // Side by side: about one grace period, and well under the four a sequential stop takes.
    let took = start.elapsed();
    assert!(took >= grace, "stopped before the grace period: {took:?}");
    assert!(took < grace * 3, "the stops ran one after the other: {took:?}");
}

#[test]
fn a_new_version_starts_only_once_the_old_one_is_gone() {
    let (mut rt, _dir) = runtime("replace");
    let v1 = workload("web", 1, &stubborn(300));
    rt.apply(&node(), &v1, clock());
    let old = rt.pid(&v1.id).unwrap();
    wait_for_text(&stdout_of(&rt, &v1.id), "\n");
    let v2 = workload("web", 2, &sh("echo v2; sleep 100", |_| {}));
    assert_eq!(rt.apply(&node(), &v2, clock()), WorkloadPhase::Pending, "v1 is still in its grace period");
    assert!(alive(old));
    poll_until(&mut rt, "v2 to run", |rt| {
        // Never both at once.
        if rt.pid(&v2.id).is_some() {
            assert!(!alive(old), "v2 started while v1 ran");
            return true;
        }
        false
    });
    assert_eq!(rt.phase(&v2.id), Some(WorkloadPhase::Running));
    // Both versions wrote to the same log, in order.
    let text = wait_for_text(&stdout_of(&rt, &v2.id), "v2\n");
    assert!(text.lines().next().unwrap().parse::<u32>().is_ok(), "{text:?}");
}

#[test]
fn the_environment_is_the_spec_plus_identity_and_config() {
    let dir = scratch("env");
    let mut rt = ProcessRuntime::new(config(&dir));
    let mut spec = sh("env; echo ---; cat \"$KOLE_CONFIG_FILE\"", |s| {
        s.restart = RestartPolicy::Never;
        s.config = Some("answer: 42\n".into());
        s.working_dir = Some("/tmp".into());
    });
    spec.env.insert("GREETING".into(), "hello world".into());
    let w = workload("team/env", 7, &spec);
    rt.apply(&node(), &w, clock());
    poll_phase(&mut rt, &w.id, WorkloadPhase::Stopped);
    let text = wait_for_text(&stdout_of(&rt, &w.id), "---\nanswer: 42\n");
    let env: Vec<&str> = text.split("---").next().unwrap().lines().collect();
    let config_file = rt.workload_dir(&w.id).join("config");
    let mut expected = vec![
        "GREETING=hello world".to_owned(),
        "KOLE_NODE=edge-1".to_owned(),
        "KOLE_WORKLOAD=team/env".to_owned(),
        "KOLE_WORKLOAD_VERSION=7".to_owned(),
        format!("KOLE_CONFIG_FILE={}", config_file.display()),
        format!("PATH={DEFAULT_PATH}"),
    ];
    // What the shell itself adds.
    let shell_own = ["PWD=", "SHLVL=", "_=", "OLDPWD="];
    let mut got: Vec<String> =
        env.iter().filter(|l| !shell_own.iter().any(|p| l.starts_with(p))).map(|l| (*l).to_owned()).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert!(env.contains(&"PWD=/tmp"), "{env:?}");
    assert_eq!(fs::metadata(&config_file).unwrap().permissions().mode() & 0o777, 0o600);
    // Nothing of this process's own environment leaked (but a PATH equal to the default).
    for (name, value) in std::env::vars() {
        let line = format!("{name}={value}");
        assert!(!env.contains(&line.as_str()) || line == format!("PATH={DEFAULT_PATH}"), "{name} leaked");
    }
}

#[test]
fn a_spec_path_replaces_the_default() {
    let (mut rt, _dir) = runtime("path");
    let mut spec = sh("echo \"$PATH\"", |s| s.restart = RestartPolicy::Never);
    spec.env.insert("PATH".into(), "/bin".into());
    let w = workload("path", 1, &spec);
    rt.apply(&node(), &w, clock());
    assert_eq!(wait_for_text(&stdout_of(&rt, &w.id), "\n"), "/bin\n");
}

/// Run by [`the_agents_secrets_never_reach_a_workload`] in a child test process whose environment
/// holds a secret, as an agent's would.
#[test]
#[ignore = "run by the_agents_secrets_never_reach_a_workload"]
fn secret_probe() {
    let Ok(secret) = std::env::var("KOLE_TEST_AGENT_SECRET") else {
        return;
    };
    let (mut rt, _dir) = runtime("secret");
    let w = workload("probe", 1, &sh("env; echo done", |s| s.restart = RestartPolicy::Never));
    rt.apply(&node(), &w, clock());
    let text = wait_for_text(&stdout_of(&rt, &w.id), "done\n");
    assert!(!text.contains(&secret), "the agent's secret reached the workload: {text}");
    assert!(!text.contains("KOLE_TEST_AGENT_SECRET"), "{text}");
    println!("probe ran the workload, no secret in its environment");
}

#[test]
fn the_agents_secrets_never_reach_a_workload() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["agent::process::tests::secret_probe", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("KOLE_TEST_AGENT_SECRET", "mqtt-password-hunter2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("no secret in its environment") && stdout.contains("1 passed"), "{stdout}");
}

#[test]
fn output_goes_to_capped_rotated_logs_keeping_the_newest_lines() {
    let dir = scratch("logs");
    let cap = 64 * 1024;
    let mut rt = ProcessRuntime::new(ProcessRuntimeConfig { log_max_bytes: cap, log_keep: 2, ..config(&dir) });
    // About 590 KB on stdout, nine times the cap, and one line on stderr.
    let w = workload("chatty", 1, &sh("seq 1 100000; echo oops >&2", |s| s.restart = RestartPolicy::Never));
    rt.apply(&node(), &w, clock());
    poll_phase(&mut rt, &w.id, WorkloadPhase::Stopped);
    let dir = rt.workload_dir(&w.id);
    let newest = wait_for_text(&dir.join("stdout.log"), "\n100000\n");
    assert!(newest.ends_with("\n100000\n"));
    assert_eq!(wait_for_text(&dir.join("stderr.log"), "oops"), "oops\n");
    let mut total = 0;
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name.starts_with("stdout.log") {
            let len = entry.metadata().unwrap().len();
            assert!(len <= cap, "{name} is {len} bytes");
            total += len;
            files.push(name);
        }
    }
    files.sort();
    assert_eq!(files, ["stdout.log", "stdout.log.1", "stdout.log.2"]);
    assert!(total <= cap * 3, "{total} bytes on disk");
    // The files hold consecutive whole lines, newest last.
    let older = fs::read_to_string(dir.join("stdout.log.1")).unwrap();
    let last_older: u32 = older.lines().last().unwrap().parse().unwrap();
    let first_newest: u32 = newest.lines().next().unwrap().parse().unwrap();
    assert_eq!(last_older + 1, first_newest);
}

#[test]
fn workloads_run_as_the_configured_user() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let dir = scratch("user");
    let mut rt = ProcessRuntime::new(ProcessRuntimeConfig { user: Some((65534, 65534)), ..config(&dir) });
    let w = workload(
        "as-nobody",
        1,
        &sh("id -u; id -g; id -G; cat \"$KOLE_CONFIG_FILE\"", |s| {
            s.restart = RestartPolicy::Never;
            s.config = Some("secret-for-nobody".into());
        }),
    );
    rt.apply(&node(), &w, clock());
    poll_phase(&mut rt, &w.id, WorkloadPhase::Stopped);
    let text = wait_for_text(&stdout_of(&rt, &w.id), "secret-for-nobody");
    assert_eq!(text, "65534\n65534\n65534\nsecret-for-nobody", "no supplementary groups of the agent");
}

#[test]
fn a_restarted_agent_replaces_what_its_predecessor_left_running_once() {
    let dir = scratch("adopt");
    let w = workload("svc", 3, &sh("sleep 100 & echo $!; wait", |s| s.stop_grace_ms = 5_000));
    let mut first = ProcessRuntime::new(config(&dir));
    first.apply(&node(), &w, clock());
    let old = first.pid(&w.id).unwrap();
    let old_grandchild: u32 = wait_for_text(&stdout_of(&first, &w.id), "\n").trim().parse().unwrap();
    // The agent dies: nothing stops its workloads (their groups are their own).
    std::mem::forget(first);
    assert!(alive(old) && alive(old_grandchild));

    let mut second = ProcessRuntime::new(config(&dir));
    assert_eq!(second.leftovers(), [LeftoverWorkload { id: "svc".into(), version: 3, pid: old }]);
    // The agent re-applies its saved desired state: it runs once the leftover is gone.
    let phase = second.apply(&node(), &w, clock());
    assert!(matches!(phase, WorkloadPhase::Pending | WorkloadPhase::Running), "{phase:?}");
    poll_until(&mut second, "the new instance", |rt| {
        if rt.pid(&w.id).is_some() {
            assert!(!alive(old), "the new instance started while the old one ran");
            return true;
        }
        false
    });
    assert_ne!(second.pid(&w.id), Some(old));
    wait_gone(old_grandchild);
    drop(second);
    // A third runtime finds nothing: the second one stopped its workload when dropped.
    assert!(ProcessRuntime::new(config(&dir)).leftovers().is_empty());
}

#[test]
fn a_record_whose_pid_was_reused_is_left_alone() {
    let dir = scratch("reused");
    let wdir = dir.join("svc");
    fs::create_dir_all(&wdir).unwrap();
    // This very process, with another start time: a reused pid, not our workload.
    let me = std::process::id();
    let start = proc_stat(me).unwrap().start + 1;
    PidRecord { id: "svc".into(), version: 1, pid: me, start, grace_ms: 0 }.write(&wdir).unwrap();
    let rt = ProcessRuntime::new(config(&dir));
    assert!(rt.leftovers().is_empty());
    drop(rt);
    assert!(!wdir.join("pid").exists(), "the stale record is dropped");
}

/// The worked example of `docs/protocol.md` §8, byte for byte.
#[test]
fn the_documented_spec_example_matches_the_encoding() {
    let bytes = RunSpec::process(["sleep", "60"]).encode().unwrap();
    let expected: Vec<u8> = [
        &[0x4b, 0x52, 0x53, 0x01, 0x00, 0x02, 0x05][..],
        b"sleep",
        &[0x02],
        b"60",
        &[0x00, 0x00, 0x00, 0x00, 0x05, 0x90, 0x4e, 0x00],
    ]
    .concat();
    assert_eq!(bytes, expected);
    assert_eq!(bytes.len(), 23);
}

#[test]
fn a_workload_applied_again_while_its_removal_stops_it_starts_afterwards_afresh() {
    let (mut rt, _dir) = runtime("reapply");
    let w = workload("web", 1, &stubborn(300));
    rt.apply(&node(), &w, clock());
    let old = rt.pid(&w.id).unwrap();
    wait_for_text(&stdout_of(&rt, &w.id), "\n");
    rt.remove(&node(), &w.id, clock());
    let again = workload("web", 2, &sh("echo fresh; sleep 100", |_| {}));
    assert_eq!(rt.apply(&node(), &again, clock()), WorkloadPhase::Pending);
    poll_until(&mut rt, "the new instance", |rt| {
        if rt.pid(&again.id).is_some() {
            assert!(!alive(old), "started while the removed instance ran");
            return true;
        }
        false
    });
    // The removal deleted the old log before the new instance started one.
    assert_eq!(wait_for_text(&stdout_of(&rt, &again.id), "fresh"), "fresh\n");
}
