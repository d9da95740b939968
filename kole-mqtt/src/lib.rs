//! # kole-mqtt
//!
//! kole's transport over MQTT ([rumqttc](https://docs.rs/rumqttc), MQTT 3.1.1): both sides of
//! [`kole_core::transport`], the topic layout of `docs/protocol.md` and its broker ACLs ([`Topics`]) and, with the
//! default feature `embedded-broker`, an in-process broker for zero-setup use.
//!
//! Entry points:
//!
//! - [`MqttCloud`] — the controller's side ([`CloudTransport`](kole_core::transport::CloudTransport)):
//!   a pool of connections to every broker of the fleet, per-node routing by [`broker_for`],
//!   fan-out to every broker, reconnect with jittered backoff and re-subscription.
//! - [`MqttNode`] / [`MqttConnector`] — a node's side
//!   ([`NodeTransport`](kole_core::transport::NodeTransport)) and the agent driver's
//!   [`Connector`](kole_core::transport::Connector).
//! - [`CloudConfig`], [`NodeConfig`], [`BrokerAddr`], [`Credentials`] — settings with documented
//!   defaults.
//! - [`EmbeddedBroker`] (feature `embedded-broker`) — a broker on `127.0.0.1:0` for tests and demos.
//!
//! ```no_run
//! use std::sync::Arc;
//! use kole_core::model::NodeName;
//! use kole_core::transport::CloudTransport;
//! use kole_mqtt::{BrokerAddr, CloudConfig, Credentials, MqttCloud, MqttConnector, NodeConfig, Topics};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let topics = Topics::new("prod-eu")?;
//! let brokers: Vec<BrokerAddr> = vec!["mqtt://10.0.0.1:1883".parse()?, "mqtt://10.0.0.2:1883".parse()?];
//! let cloud = MqttCloud::connect(topics.clone(), CloudConfig {
//!     brokers: brokers.clone(),
//!     credentials: Some(Credentials { username: "kole-controller".into(), password: "secret".into() }),
//!     ..CloudConfig::default()
//! }).await?;
//! let cloud: Arc<dyn CloudTransport> = Arc::new(cloud); // hand it to kole_core's EngineDriver
//!
//! // On an edge node: its connector for `run_agent`.
//! let node = NodeName::new("edge-1")?;
//! let connector = MqttConnector::new(topics, node, NodeConfig {
//!     brokers,
//!     password: Some("edge-1-token".into()),
//!     ..NodeConfig::default()
//! })?;
//! # let _ = (cloud, connector); Ok(())
//! # }
//! ```
//!
//! ## TLS: pick a crypto provider
//!
//! `mqtts://` brokers need the `tls` feature and a [`TlsSettings`] holding a rustls `ClientConfig`
//! that the application builds (its roots, and a client certificate if the broker asks for one).
//! kole-mqtt enables no rustls crypto provider, so the application picks one: either through its
//! own rustls dependency (feature `ring` or `aws_lc_rs`, the default), or explicitly:
//!
//! ```text
//! let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
//! let config = rustls::ClientConfig::builder_with_provider(provider)
//!     .with_safe_default_protocol_versions()?
//!     .with_root_certificates(roots)
//!     .with_no_client_auth();
//! let tls = kole_mqtt::TlsSettings { client_config: std::sync::Arc::new(config) };
//! ```
//!
//! `builder_with_provider` never depends on the process default; `ClientConfig::builder()` uses the
//! one installed with `CryptoProvider::install_default` (or the only one compiled in). One caveat:
//! the default feature `embedded-broker` (for tests and demos) links the `mqtt5` broker, which turns
//! on rustls's `ring` feature; a production build uses `default-features = false, features = ["tls"]`,
//! or installs its provider explicitly as above.
//!
//! ## Why MQTT 3.1.1
//!
//! kole uses no MQTT 5 feature: sessions are clean (subscriptions are made again after every
//! connect, so no session expiry has to be managed), messages carry no expiry (specs are retained
//! until replaced or deleted, everything else is repaired by the heartbeat digest), and identity is
//! the user name plus the topic. rumqttc's 3.1.1 client is its most used and tested path, and every
//! broker kole targets (Mosquitto, EMQX, VerneMQ, HiveMQ and the embedded one) speaks it.

#[cfg(feature = "embedded-broker")]
mod broker;
mod cloud;
mod config;
mod conn;
mod error;
mod inbox;
mod node;
mod scan;
pub mod topics;

#[cfg(feature = "embedded-broker")]
pub use broker::{EmbeddedBroker, EmbeddedBrokerConfig};
pub use cloud::{COALESCE_BELOW, CloudStats, MqttCloud, downlink_qos};
#[cfg(feature = "tls")]
pub use config::TlsSettings;
pub use config::{BrokerAddr, CloudConfig, ConnectionConfig, Credentials, NodeConfig, broker_for};
pub use conn::check_client_id;
pub use error::{Error, Result};
pub use node::{MqttConnector, MqttNode, NodeStats, uplink_qos};
pub use rumqttc::QoS;
pub use topics::{MAX_PREFIX_LEN, TopicError, Topics};
