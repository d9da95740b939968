//! `kole-controller` as a process against a real kube-apiserver: two replicas on one Lease, the
//! leader gets SIGTERM, and the standby leads and has restored within 2 s; a broker that is down
//! at start is retried, never fatal.
//!
//! Start an apiserver with `.ci/kube.sh start`, export the kubeconfig path it prints as
//! `KOLE_TEST_KUBECONFIG`, and run
//! `cargo test -p kole-examples --test controller_process -- --include-ignored --test-threads 1`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

fn kubeconfig() -> String {
    std::env::var("KOLE_TEST_KUBECONFIG")
        .expect("KOLE_TEST_KUBECONFIG is not set: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)")
}

async fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(kubeconfig()).expect("read kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("kubeconfig");
    Client::try_from(cfg).expect("client")
}

/// Installs kole's CRDs (the snapshot store needs them) and a fresh namespace.
async fn setup(client: &Client, prefix: &str) -> String {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kole_kube::crd::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &PatchParams::apply("kole-test").force(), &Patch::Apply(&crd)).await.expect("apply CRD");
    }
    for crd in kole_kube::crd::all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        let mut established = false;
        for _ in 0..100 {
            let c = crds.get(&name).await.unwrap();
            let conds = c.status.and_then(|s| s.conditions).unwrap_or_default();
            if conds.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                established = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(established, "CRD {name} not established");
    }
    let name = format!("{prefix}-{}-{:x}", std::process::id(), kole_core::clock::wall_clock_now().as_millis());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.clone());
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    name
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `kole-controller` process, its `--listen` port and its log file.
struct Controller {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Controller {
    fn start(ns: &str, identity: &str, extra: &[&str]) -> Self {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("kole-controller-{ns}-{identity}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kole-controller"))
            .args(["--kubeconfig", &kubeconfig(), "--namespace-snapshots", ns, "--watch-namespace", ns])
            .args(["--identity", identity, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--heartbeat-ms", "1000", "--log-level", "info,kole_kube=debug"])
            .args(extra)
            .env_remove("KOLE_MQTT_BROKERS")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start kole-controller");
        Self { child, port, log }
    }

    /// `GET path`: the status code and the body (none while the server is not up).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let code = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((code, body))
    }

    /// The value of an unlabelled metric, or the sum of a labelled family.
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        let values: Vec<f64> = body
            .lines()
            .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    fn sigterm(&self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < limit, "kole-controller did not exit within {limit:?}; log:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `f` every 20 ms for at most `limit`.
    fn eventually(&self, limit: Duration, what: &str, f: impl Fn(&Self) -> bool) {
        let t = Instant::now();
        while !f(self) {
            assert!(t.elapsed() < limit, "{what}: not within {limit:?}; log:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn sigterm_hands_over_to_the_standby_which_leads_and_restores_within_2s() {
    let client = client().await;
    let ns = setup(&client, "kole-takeover").await;
    let mut a = Controller::start(&ns, "a", &["--simulate-nodes", "20"]);
    let nodes = 20.0;
    a.eventually(Duration::from_secs(60), "a leads with its 20 nodes", |a| {
        a.metric("kole_leader") == Some(1.0) && a.metric("kole_nodes") == Some(nodes)
    });
    let mut b = Controller::start(&ns, "b", &[]);
    b.eventually(Duration::from_secs(30), "b stands by, ready", |b| {
        b.get("/readyz").is_some_and(|(code, body)| code == 200 && body.contains("standing by"))
    });
    assert_eq!(b.metric("kole_leader"), Some(0.0));
    assert_eq!(a.get("/healthz").map(|r| r.0), Some(200));

    let t = Instant::now();
    a.sigterm();
    b.eventually(Duration::from_secs(10), "b leads and has restored a's 20 nodes", |b| {
        b.metric("kole_leader") == Some(1.0) && b.metric("kole_restored_nodes") == Some(nodes)
    });
    let took = t.elapsed();
    println!("b led and had restored a's {nodes} nodes {took:?} after a's SIGTERM");
    let status = a.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "a exited with {status}; log:\n{}", a.logs());
    assert!(took < Duration::from_secs(2), "b took {took:?} to lead and restore after a's SIGTERM");
    let a_logs = a.logs();
    assert!(a_logs.contains("final snapshot") && a_logs.contains("Lease released"), "{a_logs}");

    let lease = Api::<Lease>::namespaced(client.clone(), &ns).get("kole-fleet").await.unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("b"));
    b.sigterm();
    let status = b.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "b exited with {status}; log:\n{}", b.logs());
    let lease = Api::<Lease>::namespaced(client, &ns).get("kole-fleet").await.unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), None, "b released the Lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn a_broker_down_at_start_is_retried_not_fatal() {
    let client = client().await;
    let ns = setup(&client, "kole-nobroker").await;
    let dead = format!("mqtt://127.0.0.1:{}", free_port());
    let mut c = Controller::start(&ns, "a", &["--broker", &dead]);
    c.eventually(Duration::from_secs(30), "two failed connection attempts", |c| {
        c.metric("kole_broker_connect_failures_total").is_some_and(|n| n >= 2.0)
    });
    assert!(c.child.try_wait().unwrap().is_none(), "still running");
    assert_eq!(c.get("/healthz").map(|r| r.0), Some(200), "healthy: waiting for a broker is no failure");
    let (code, body) = c.get("/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(c.logs().contains("plain MQTT without TLS"), "plain mqtt:// is warned about");
    c.sigterm();
    let status = c.wait_exit(Duration::from_secs(25));
    assert!(status.success(), "exited with {status}; log:\n{}", c.logs());
}
