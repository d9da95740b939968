//! The embedded broker (feature `embedded-broker`): an MQTT 5 / 3.1.1 broker in this process, for
//! zero-setup use (tests, the demo, examples). It is the `mqtt5` crate's broker with in-memory
//! storage (no files), chosen over `rumqttd` by the measurements in `docs/benchmarks.md` and
//! because it binds `127.0.0.1:0`, reports its port and shuts down cleanly. Production fleets use
//! an external broker (`docs/mqtt.md`).

use std::net::SocketAddr;
use std::time::Duration;

use mqtt5::broker::config::{BrokerConfig, StorageBackend, StorageConfig};
use mqtt5::broker::{BrokerShutdownHandle, MqttBroker};

use crate::config::BrokerAddr;
use crate::{Error, Result};

/// Settings of an [`EmbeddedBroker`].
#[derive(Clone, Debug)]
pub struct EmbeddedBrokerConfig {
    /// Where to listen. Default `127.0.0.1:0` (a free port; see [`EmbeddedBroker::addr`]).
    pub bind: SocketAddr,
    /// Most clients connected at once. Default 100,000 (the process's open-file limit applies).
    pub max_clients: usize,
    /// Largest packet accepted. Default 256 KiB, as [`ConnectionConfig`](crate::ConnectionConfig).
    pub max_packet_bytes: usize,
    /// Messages queued per client before the broker drops for a slow client. Default 100,000 (the
    /// controller's connections receive a whole fleet's heartbeats).
    pub max_queued_per_client: usize,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_clients: 100_000,
            max_packet_bytes: 256 * 1024,
            max_queued_per_client: 100_000,
        }
    }
}

/// An MQTT broker running on the current tokio runtime. It allows anonymous clients and has no
/// ACL: it is for tests and demos on loopback, not for a fleet (see `docs/mqtt.md`).
///
/// ```no_run
/// # async fn demo() -> Result<(), kole_mqtt::Error> {
/// let broker = kole_mqtt::EmbeddedBroker::start(Default::default()).await?;
/// println!("MQTT broker on {}", broker.broker_addr());
/// broker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct EmbeddedBroker {
    addr: SocketAddr,
    shutdown: BrokerShutdownHandle,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("addr", &self.addr).finish()
    }
}

impl EmbeddedBroker {
    /// Binds and starts the broker; it serves until [`EmbeddedBroker::shutdown`] or drop.
    pub async fn start(cfg: EmbeddedBrokerConfig) -> Result<Self> {
        let config = BrokerConfig::default()
            .with_bind_address(cfg.bind)
            .with_max_clients(cfg.max_clients)
            .with_max_packet_size(cfg.max_packet_bytes)
            .with_storage(StorageConfig {
                backend: StorageBackend::Memory,
                enable_persistence: false,
                max_queued_messages_per_client: cfg.max_queued_per_client,
                ..StorageConfig::default()
            });
        let mut broker = MqttBroker::with_config(config).await.map_err(|e| Error::Broker(e.to_string()))?;
        let addr = broker.local_addr().ok_or_else(|| Error::Broker("the broker reported no local address".into()))?;
        let shutdown = broker.shutdown_handle();
        let task = tokio::spawn(async move {
            let _ = broker.run().await;
        });
        Ok(Self { addr, shutdown, task: Some(task) })
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address as a [`BrokerAddr`] for the client configurations.
    pub fn broker_addr(&self) -> BrokerAddr {
        BrokerAddr::tcp(self.addr.ip().to_string(), self.addr.port())
    }

    /// Stops the broker: closes every client connection and the listener, and waits (up to 5 s)
    /// until it is done, so the port can be bound again.
    pub async fn shutdown(mut self) {
        self.shutdown.shutdown();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
