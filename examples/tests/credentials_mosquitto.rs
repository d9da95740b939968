//! `kole-controller credentials` against Debian's real Mosquitto: the password files and ACL it
//! writes are loaded by `mosquitto` on the two listeners of deploy/mqtt/mosquitto.conf, which then
//! accepts the controller and each node with the passwords written for them, each on its own
//! listener only, and refuses a wrong one. Skipped, with the reason printed, when
//! `mosquitto` is not installed (CI installs it: `.ci/mosquitto.sh`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kole_core::model::NodeName;
use kole_mqtt::{BrokerAddr, CloudConfig, Credentials, MqttCloud, MqttNode, NodeConfig, Topics};

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto_installed() -> bool {
    Command::new("mosquitto").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Mosquitto with the written files on two listeners, as deploy/mqtt/mosquitto.conf sets them up
/// (without its TLS, tested in kole-mqtt's Mosquitto tier): the nodes' and the controller's.
fn start_mosquitto(dir: &Path) -> (Broker, u16, u16) {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (nodes, controller) = (free(), free());
    let conf = dir.join("mosquitto.conf");
    // `user root`: Mosquitto run as root otherwise drops to a `mosquitto` user that cannot read
    // the 0600 files written here.
    let user = if is_root() { "user root\n" } else { "" };
    let acl = dir.join("mosquitto.acl");
    std::fs::write(
        &conf,
        format!(
            "{user}per_listener_settings true\npersistence false\n\
             listener {nodes} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\nuse_username_as_clientid true\n\
             listener {controller} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
            dir.join("nodes.passwd").display(),
            acl.display(),
            dir.join("controller.passwd").display(),
            acl.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("mosquitto.log")).unwrap();
    let child = Command::new("mosquitto").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(log).spawn().unwrap();
    let broker = Broker(child);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", nodes)).is_err()
        || std::net::TcpStream::connect(("127.0.0.1", controller)).is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "mosquitto did not start: {:?}",
            std::fs::read_to_string(dir.join("mosquitto.log"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (broker, nodes, controller)
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_accepts_the_written_credentials_and_refuses_others() {
    if !mosquitto_installed() {
        println!("skipped: `mosquitto` is not installed (apt-get install mosquitto, or .ci/mosquitto.sh start)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("kole-credentials-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("nodes.txt"), "# two boxes\nedge-1\nedge-2\n").unwrap();
    let out = dir.join("creds");
    let run = Command::new(env!("CARGO_BIN_EXE_kole-controller"))
        .args(["credentials", "--nodes-file"])
        .arg(dir.join("nodes.txt"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("2 node(s)") && stdout.contains("nodes.passwd"), "{stdout}");

    use std::os::unix::fs::PermissionsExt as _;
    for f in [
        "nodes.passwd",
        "controller.passwd",
        "mosquitto.acl",
        "kole-controller.password",
        "nodes/edge-1.password",
        "signing.key",
    ] {
        let mode = std::fs::metadata(out.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // The downlink key pair: the agents' trusted-keys file holds the secret key's public half.
    let secret = std::fs::read_to_string(out.join("signing.key")).unwrap();
    let signer = kole_core::protocol::seal::DownlinkSigner::from_text(&secret).unwrap();
    let trusted = std::fs::read_to_string(out.join("trusted-keys")).unwrap();
    let keys = kole_core::protocol::seal::TrustedKeys::from_text(&trusted).unwrap();
    assert_eq!(keys.key_ids(), [signer.key_id()]);
    assert!(stdout.contains(&format!("key id {}", signer.key_id())), "{stdout}");
    // Each password file holds only its listener's users.
    let users = |f: &str| -> Vec<String> {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        text.lines().map(|l| l.split(':').next().unwrap().to_owned()).collect()
    };
    assert_eq!(users("nodes.passwd"), ["edge-1", "edge-2"]);
    assert_eq!(users("controller.passwd"), ["kole-controller"]);
    let (_broker, nodes_port, controller_port) = start_mosquitto(&out);
    let broker = BrokerAddr::tcp("127.0.0.1", nodes_port);
    let controller_broker = BrokerAddr::tcp("127.0.0.1", controller_port);
    let topics = Topics::new("default").unwrap();
    let password = |p: &str| kole_examples::read_password_file(&out.join(p)).unwrap();
    let cloud = |pw: String| CloudConfig {
        brokers: vec![controller_broker.clone()],
        credentials: Some(Credentials { username: "kole-controller".into(), password: pw }),
        connections_per_broker: 1,
        connection: kole_mqtt::ConnectionConfig { connect_timeout: Duration::from_secs(3), ..Default::default() },
        ..CloudConfig::default()
    };
    let node = |pw: String| NodeConfig {
        brokers: vec![broker.clone()],
        password: Some(pw),
        connection: kole_mqtt::ConnectionConfig { connect_timeout: Duration::from_secs(3), ..Default::default() },
        ..NodeConfig::default()
    };
    let limit = Duration::from_secs(30);

    let ctl =
        tokio::time::timeout(limit, MqttCloud::connect(topics.clone(), cloud(password("kole-controller.password"))))
            .await
            .unwrap();
    assert!(ctl.is_ok(), "the controller's written password: {ctl:?}");
    for n in ["edge-1", "edge-2"] {
        let name = NodeName::new(n).unwrap();
        let pw = password(&format!("nodes/{n}.password"));
        let r = tokio::time::timeout(limit, MqttNode::connect(topics.clone(), name, &node(pw))).await.unwrap();
        assert!(r.is_ok(), "{n}'s written password: {r:?}");
    }
    // edge-2's password is not edge-1's; nor is a guess the controller's.
    let wrong = password("nodes/edge-2.password");
    let r =
        tokio::time::timeout(limit, MqttNode::connect(topics.clone(), NodeName::new("edge-1").unwrap(), &node(wrong)))
            .await
            .unwrap();
    assert!(r.is_err(), "edge-1 with edge-2's password was accepted");
    let r = tokio::time::timeout(limit, MqttCloud::connect(topics.clone(), cloud("guess".into()))).await.unwrap();
    assert!(r.is_err(), "a wrong controller password was accepted");
    // Neither listener takes the other's users: the controller on the nodes' listener, a node on
    // the controller's.
    let on_nodes = CloudConfig { brokers: vec![broker.clone()], ..cloud(password("kole-controller.password")) };
    let r = tokio::time::timeout(limit, MqttCloud::connect(topics.clone(), on_nodes)).await.unwrap();
    assert!(r.is_err(), "the controller logged in on the nodes' listener");
    let on_controller =
        NodeConfig { brokers: vec![controller_broker.clone()], ..node(password("nodes/edge-1.password")) };
    let r = tokio::time::timeout(limit, MqttNode::connect(topics, NodeName::new("edge-1").unwrap(), &on_controller))
        .await
        .unwrap();
    assert!(r.is_err(), "edge-1 logged in on the controller's listener");
    std::fs::remove_dir_all(&dir).unwrap();
}
