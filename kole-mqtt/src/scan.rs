//! Listing the retained specs on every broker, for
//! [`CloudTransport::retained_specs`](kole_core::transport::CloudTransport::retained_specs).
//!
//! MQTT has no "list retained messages" request; subscribing replays them. So a short-lived
//! connection per broker subscribes to both spec filters and to a marker topic of its own, waits
//! for the SUBACK, then publishes one message on the marker topic. The broker queues a
//! subscription's retained messages while it handles the SUBSCRIBE, before it can handle the
//! PUBLISH sent after the SUBACK, and delivers one client's queue in order: once the marker comes
//! back, every retained spec has arrived. No timing guess is involved.

use std::collections::BTreeSet;
use std::time::Duration;

use kole_core::transport::{Destination, TransportError};
use rumqttc::{Event, Packet, QoS, SubscribeFilter};

use crate::config::{BrokerAddr, CloudConfig};
use crate::conn;
use crate::topics::Topics;

/// How long one broker's scan may take, connecting included.
pub(crate) const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// The spec destinations holding a retained spec on any broker of `cfg`.
pub(crate) async fn retained_specs(topics: &Topics, cfg: &CloudConfig) -> Result<Vec<Destination>, TransportError> {
    let mut found = BTreeSet::new();
    for (b, broker) in cfg.brokers.iter().enumerate() {
        let scan = scan_broker(topics, cfg, b, broker);
        match tokio::time::timeout(SCAN_TIMEOUT, scan).await {
            Ok(r) => found.extend(r?),
            Err(_) => {
                return Err(TransportError::Other {
                    context: format!("listing the retained specs on {broker} did not finish within {SCAN_TIMEOUT:?}"),
                    source: "timed out".into(),
                });
            }
        }
    }
    Ok(found.into_iter().collect())
}

async fn scan_broker(
    topics: &Topics,
    cfg: &CloudConfig,
    b: usize,
    broker: &BrokerAddr,
) -> Result<Vec<Destination>, TransportError> {
    let id = format!("{}-{}-{b}-scan", cfg.client_id, conn::client_id_nonce()?);
    let creds = cfg.credentials.as_ref().map(|c| (c.username.as_str(), c.password.as_str()));
    let opts = conn::options(broker, &id, creds, &cfg.connection)?;
    let (client, mut eventloop) = conn::client(opts, &cfg.connection);
    let marker = format!("{}/ctl/scan/{id}", topics.base());
    let filters = vec![
        SubscribeFilter::new(topics.spec_filter(), QoS::AtLeastOnce),
        SubscribeFilter::new(topics.group_spec_filter(), QoS::AtLeastOnce),
        SubscribeFilter::new(marker.clone(), QoS::AtLeastOnce),
    ];
    let fail = |what: &str, e: &dyn std::fmt::Display| TransportError::Other {
        context: format!("listing the retained specs on {broker}: {what}"),
        source: e.to_string().into(),
    };
    let mut found = Vec::new();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.try_subscribe_many(filters.clone()).map_err(|e| fail("subscribing", &e))?;
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    return Err(fail("the broker refused the subscription", &"check the controller's ACL"));
                }
                client
                    .try_publish(marker.clone(), QoS::AtLeastOnce, false, b"end".to_vec())
                    .map_err(|e| fail("publishing the marker", &e))?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == marker {
                    break;
                }
                // An empty payload is a deletion in flight, not a retained spec.
                if p.retain
                    && !p.payload.is_empty()
                    && let Ok(d @ (Destination::WorkloadSpec(_) | Destination::GroupWorkloadSpec(..))) =
                        topics.parse_downlink(&p.topic)
                {
                    found.push(d);
                }
            }
            Ok(_) => {}
            Err(e) => return Err(fail("connection failed", &e)),
        }
    }
    // Best effort: the broker drops the clean session either way.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    Ok(found)
}
