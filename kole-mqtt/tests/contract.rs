//! The transport contract (`kole_tests::contract::transport`) run against `MqttCloud` and
//! `MqttNode` over the embedded broker: each check gets its own fleet (topic prefix) and client
//! ids on one broker.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kole_core::model::NodeName;
use kole_core::transport::{CloudTransport, NodeTransport};
use kole_mqtt::topics::Topics;
use kole_mqtt::{BrokerAddr, CloudConfig, EmbeddedBroker, EmbeddedBrokerConfig, MqttCloud, MqttNode, NodeConfig};
use kole_tests::bounded;
use kole_tests::contract::transport::{self, TransportFleet};

/// One fleet on the embedded broker.
struct MqttFleet {
    broker: BrokerAddr,
    topics: Topics,
    client_id: String,
}

#[async_trait]
impl TransportFleet for MqttFleet {
    async fn cloud(&self) -> Arc<dyn CloudTransport> {
        let cfg = CloudConfig {
            brokers: vec![self.broker.clone()],
            client_id: self.client_id.clone(),
            ..CloudConfig::default()
        };
        Arc::new(MqttCloud::connect(self.topics.clone(), cfg).await.expect("connect the cloud"))
    }

    async fn node(&self, name: &NodeName) -> Arc<dyn NodeTransport> {
        let cfg = NodeConfig { brokers: vec![self.broker.clone()], ..NodeConfig::default() };
        Arc::new(MqttNode::connect(self.topics.clone(), name.clone(), &cfg).await.expect("connect a node"))
    }

    /// Over the default maximum packet size (256 KiB) of both sides.
    fn oversize_payload(&self) -> usize {
        256 * 1024
    }

    fn quiet(&self) -> Duration {
        Duration::from_millis(300)
    }
}

/// This contract found that `mqtt5` 0.46's broker replayed a retained message to a later MQTT 3.1.1
/// subscriber with its MQTT 5 properties prepended to the payload (check 3); fixed by `mqtt5` 0.49,
/// with a focused regression test in `tests/embedded.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_the_embedded_broker_keeps_the_transport_contract() {
    bounded(Duration::from_secs(120), "the transport contract over MQTT", async {
        let broker = EmbeddedBroker::start(EmbeddedBrokerConfig::default()).await.expect("start the broker");
        let addr = broker.broker_addr();
        let mut n = 0;
        let fresh = async || {
            n += 1;
            MqttFleet {
                broker: addr.clone(),
                topics: Topics::new(&format!("contract{n}")).expect("fleet name"),
                client_id: format!("ctl-contract{n}"),
            }
        };
        transport::check(fresh).await;
        broker.shutdown().await;
    })
    .await;
}
