//! Connection settings: broker addresses, credentials, limits and backoff, each with a documented
//! default.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use kole_core::backoff::Backoff;
use rumqttc::QoS;

use crate::Error;

/// Where a broker listens: `mqtt://host:port`, `mqtts://host:port` (TLS, feature `tls`) or plain
/// `host:port` (= `mqtt://`). The port defaults to 1883 (8883 for `mqtts`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BrokerAddr {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to speak TLS to it.
    pub tls: bool,
}

impl BrokerAddr {
    /// A plain-TCP broker address.
    pub fn tcp(host: impl Into<String>, port: u16) -> Self {
        Self { host: host.into(), port, tls: false }
    }
}

impl FromStr for BrokerAddr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &'static str| Error::BrokerAddr { addr: s.chars().take(200).collect(), reason };
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("mqtt://").or_else(|| s.strip_prefix("tcp://")) {
            (false, r)
        } else if s.contains("://") {
            return Err(bad("unknown scheme (use mqtt:// or mqtts://)"));
        } else {
            (false, s)
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if tls { 8883 } else { 1883 };
        // `[v6]:port`, `host:port` or `host`.
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '[' in an IPv6 address"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse().map_err(|_| bad("invalid port"))?),
                None if after.is_empty() => (h, default_port),
                None => return Err(bad("garbage after the IPv6 address")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("invalid port"))?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("missing or invalid host"));
        }
        Ok(Self { host: host.to_owned(), port, tls })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// MQTT user name and password (or token). For a node the user name is its node name (the ACL
/// templates rely on it); [`crate::MqttConnector`] fills it in.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The MQTT user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// TLS settings (feature `tls`): a rustls client configuration. kole-mqtt picks no crypto provider
/// (see the crate docs, "TLS: pick a crypto provider"); build the
/// [`rustls::ClientConfig`](tokio_rustls::rustls::ClientConfig) with your provider and roots (and client
/// certificate, if the broker asks for one).
#[cfg(feature = "tls")]
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// The rustls client configuration used for every `mqtts://` broker.
    pub client_config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
}

/// Settings shared by every MQTT connection kole opens.
#[derive(Clone, Debug)]
pub struct ConnectionConfig {
    /// MQTT keep-alive. Default 30 s (the broker drops a silent client after 1.5×).
    pub keep_alive: Duration,
    /// Timeout of the TCP/TLS connect and the CONNACK. Default 10 s.
    pub connect_timeout: Duration,
    /// Largest MQTT packet sent or accepted. Default 256 KiB; keep it at or above the protocol's
    /// `max_message_bytes` (64 KiB) plus topic overhead, and at or below the broker's limit.
    pub max_packet_bytes: usize,
    /// Outgoing QoS 1 publishes awaiting their PUBACK per connection. Default 256.
    pub inflight: u16,
    /// Capacity of rumqttc's request channel per connection. Default 1024.
    pub request_channel: usize,
    /// TLS for `mqtts://` brokers (feature `tls`).
    #[cfg(feature = "tls")]
    pub tls: Option<TlsSettings>,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_packet_bytes: 256 * 1024,
            inflight: 256,
            request_channel: 1024,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// Settings of the controller's side, [`crate::MqttCloud`].
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// The brokers of the fleet (at least one). Each node is assigned to one by
    /// [`broker_for`](crate::broker_for); fan-out is published to all of them.
    pub brokers: Vec<BrokerAddr>,
    /// The controller's credentials (the same on every broker), or none for an open broker.
    pub credentials: Option<Credentials>,
    /// Client id prefix of the controller's connections: connection `c` to broker `b` is
    /// `{client_id}-{tag}-{b}-{c}`, where `tag` is 16 random hex digits drawn from the OS RNG once
    /// per [`MqttCloud`](crate::MqttCloud), so no node can guess the ids and take the connections
    /// over (see `docs/mqtt.md`). Follows the node name rules and must not be a node's name.
    /// Default `kole-controller`.
    pub client_id: String,
    /// Connections per broker (at least 1). Per-node messages are spread over them by node hash
    /// (so one node's messages keep their order); connection 0 also carries fan-out. Default 2.
    pub connections_per_broker: usize,
    /// Read heartbeats on their own connection (the last one of each broker) when there are at least
    /// two, so a registration storm cannot delay them. Default true.
    pub split_heartbeats: bool,
    /// How long the heartbeat connection (see `split_heartbeats`) waits before reading again after
    /// a read that brought fewer than [`COALESCE_BELOW`](crate::COALESCE_BELOW) heartbeats. The
    /// heartbeats that arrive meanwhile are then taken in one read: fewer system calls and wakeups
    /// per heartbeat when a fleet beats at tens of thousands per second, at the price of up to
    /// this much delay on a heartbeat's way in (the engine needs it within the interval, seconds).
    /// Only that connection waits: it carries QoS 0 heartbeats, which no broker in-flight window
    /// paces, and the downlink it also carries is delayed at most as long. Zero reads at once.
    /// Default 1 ms.
    pub heartbeat_read_coalesce: Duration,
    /// QoS of the controller's uplink subscriptions (a message arrives at the lower of its
    /// publish QoS and this). Default QoS 1. With clean sessions, QoS 1 from the broker to the
    /// controller adds flow control (the broker's in-flight window, Mosquitto's
    /// `max_inflight_messages`) and one PUBACK per status report, but no durability: what is in
    /// flight when the connection drops is discarded either way, and a lost status report is
    /// repaired by the next heartbeat's digest. QoS 0 saves the broker a packet per status report
    /// and removes its in-flight limit, at the price of the broker dropping, not queueing, when the
    /// controller falls behind.
    pub uplink_subscription_qos: QoS,
    /// Uplink messages waiting for [`recv`](kole_core::transport::CloudTransport::recv). When full,
    /// further uplink messages are dropped and counted (as a broker drops for a slow subscriber;
    /// agents repeat what matters). Default 262,144.
    pub inbox_capacity: usize,
    /// Payload bytes of the uplink messages waiting for `recv`, at most: a message that would pass
    /// it is dropped (the newest: a connection's event loop must not wait, and agents repeat what
    /// matters) and counted with the full inbox's drops. Bounds the controller's memory when nodes
    /// send large payloads faster than it drains them, which the count alone does not (262,144
    /// messages of 256 KiB would be 64 GiB). Default 64 MiB, over 2 million heartbeats.
    pub inbox_max_bytes: usize,
    /// Downlink messages accepted by `send` but not yet handed to a connection, per connection.
    /// Default 65,536.
    pub outbox_capacity: usize,
    /// How long `send` waits for room in the outboxes before it returns
    /// [`TransportError::Full`](kole_core::transport::TransportError::Full). Default 5 s.
    pub send_timeout: Duration,
    /// Reconnect backoff of each connection (jittered into `[d/2, d]`). Default 100 ms doubling to
    /// 2 s: the controller has only a few connections per broker, and while they are down the
    /// broker drops the uplink of every node that reconnected before them (clean sessions), so
    /// they come back first.
    pub reconnect: Backoff,
    /// Per-connection MQTT settings. Default: [`ConnectionConfig::default`] with 4,096 QoS 1
    /// publishes in flight.
    pub connection: ConnectionConfig,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            brokers: vec![BrokerAddr::tcp("127.0.0.1", 1883)],
            credentials: None,
            client_id: "kole-controller".into(),
            connections_per_broker: 2,
            split_heartbeats: true,
            heartbeat_read_coalesce: Duration::from_millis(1),
            uplink_subscription_qos: QoS::AtLeastOnce,
            inbox_capacity: 262_144,
            inbox_max_bytes: 64 * 1024 * 1024,
            outbox_capacity: 65_536,
            send_timeout: Duration::from_secs(5),
            reconnect: Backoff::new(100, 2_000, 2.0),
            // Thousands of acks and catch-ups in flight: a busy broker's PUBACK latency must not
            // cap the controller's publish rate (256 in flight held it to a fraction of it).
            connection: ConnectionConfig { inflight: 4_096, ..ConnectionConfig::default() },
        }
    }
}

/// Settings of a node's side, [`crate::MqttNode`].
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The brokers of the fleet, in the same order as the controller's; the node uses
    /// `brokers[broker_for(node, brokers.len())]`.
    pub brokers: Vec<BrokerAddr>,
    /// The node's password or token (user name = node name), or none for an open broker.
    pub password: Option<String>,
    /// Downlink messages waiting for `recv`; when full, further deliveries are dropped and counted
    /// (the digest in the next heartbeat repairs the loss). Default 1024.
    pub inbox_capacity: usize,
    /// Per-connection MQTT settings.
    pub connection: ConnectionConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            brokers: vec![BrokerAddr::tcp("127.0.0.1", 1883)],
            password: None,
            inbox_capacity: 1024,
            connection: ConnectionConfig::default(),
        }
    }
}

/// The broker (index into the fleet's broker list) a node is assigned to: a stable hash of its name,
/// so the controller and the node agree without coordination. Changing the number of brokers moves
/// nodes; grow by adding a new fleet of brokers or by rehashing at a maintenance window.
pub fn broker_for(node: &str, brokers: usize) -> usize {
    if brokers <= 1 {
        return 0;
    }
    let h = kole_core::model::stable_hash(0x6b6f_6c65_2d62_726b, node.as_bytes());
    (h % brokers as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_addresses() {
        let a: BrokerAddr = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!(a, BrokerAddr::tcp("127.0.0.1", 1884));
        let a: BrokerAddr = "broker.example".parse().unwrap();
        assert_eq!((a.port, a.tls), (1883, false));
        let a: BrokerAddr = "mqtts://[::1]".parse().unwrap();
        assert_eq!((a.host.as_str(), a.port, a.tls), ("::1", 8883, true));
        assert_eq!(a.to_string(), "mqtts://[::1]:8883");
        for bad in ["http://x:1", "mqtt://:1", "x:notaport", "[::1", "mqtt://a/b:1"] {
            assert!(bad.parse::<BrokerAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn broker_assignment_is_stable_and_spread() {
        assert_eq!(broker_for("edge-1", 1), 0);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let name = format!("edge-{i}");
            let b = broker_for(&name, 4);
            assert_eq!(b, broker_for(&name, 4));
            counts[b] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
