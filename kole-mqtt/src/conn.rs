//! Building rumqttc connections: options, client-id checks, TLS.

use rumqttc::{AsyncClient, EventLoop, MqttOptions};

use crate::config::{BrokerAddr, ConnectionConfig};
use crate::{Error, Result};

/// Checks that `name` is safe as an MQTT client id, user name and ACL substitution: the node name
/// rule (1–128 bytes of `[A-Za-z0-9._-]`, alphanumeric at both ends), which excludes the wildcards
/// `+` and `#`, the level separator `/`, `$` and whitespace.
pub fn check_client_id(what: &'static str, name: &str) -> Result<()> {
    kole_core::model::validate_node_name(name).map_err(|e| Error::InvalidClientId {
        what,
        name: name.chars().take(64).collect(),
        reason: e.to_string(),
    })
}

/// A fresh random tag for the controller's client ids, 16 hex digits from the OS RNG. A broker
/// disconnects the older of two clients with one client id ("already connected, closing old
/// connection"), and Mosquitto lets any authenticated client pick any id: a node that knew the
/// controller's ids could keep it off the broker. Random per process, they cannot be guessed.
pub(crate) fn client_id_nonce() -> Result<String> {
    let n = getrandom::u64().map_err(|e| Error::Config(format!("the OS random number generator failed: {e}")))?;
    Ok(format!("{n:016x}"))
}

/// The most a PUBLISH packet adds to its payload beyond the topic: fixed header (1), remaining
/// length (up to 4), topic length (2), packet id (2).
const PUBLISH_HEADER_MAX: usize = 1 + 4 + 2 + 2;

/// Room above the payload for any PUBLISH: the longest topic MQTT can carry (65,535 bytes) and
/// the header.
pub(crate) const MAX_TOPIC_OVERHEAD: usize = u16::MAX as usize + PUBLISH_HEADER_MAX;

/// The size of the MQTT 3.1.1 PUBLISH packet carrying `payload_len` bytes on `topic_len`, as
/// rumqttc counts it against its maximum packet size (the packet id counted, as for QoS 1).
pub(crate) fn publish_packet_size(topic_len: usize, payload_len: usize) -> usize {
    let len = 2 + topic_len + payload_len + 2;
    let len_len = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + len
}

/// The largest payload whose PUBLISH on a topic of `topic_len` bytes fits in `max_packet`.
pub(crate) fn max_payload(topic_len: usize, max_packet: usize) -> usize {
    let mut p = max_packet.saturating_sub(publish_packet_size(topic_len, 0));
    // The remaining length's own size grows with the payload: at most three steps back.
    while p > 0 && publish_packet_size(topic_len, p) > max_packet {
        p -= 1;
    }
    p
}

/// Options for one clean-session connection.
pub(crate) fn options(
    broker: &BrokerAddr,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    cfg: &ConnectionConfig,
) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(client_id, broker.host.clone(), broker.port);
    o.set_keep_alive(cfg.keep_alive.max(std::time::Duration::from_secs(1)))
        // Clean sessions: subscriptions are re-made after every (re)connect by our code, and
        // nothing stays queued on the broker for a node that is gone (no session expiry to manage).
        .set_clean_session(true)
        // Incoming: a broker's limit (Mosquitto's `message_size_limit`) counts the payload only, so
        // a packet it forwards at that limit is larger by its topic and header. Room for the
        // longest topic MQTT allows, so no publish the broker lets through can make this client
        // drop its connection. Outgoing: exactly the limit ([`publish_packet_size`] checks first).
        .set_max_packet_size(cfg.max_packet_bytes.saturating_add(MAX_TOPIC_OVERHEAD), cfg.max_packet_bytes)
        .set_inflight(cfg.inflight.max(1))
        .set_request_channel_capacity(cfg.request_channel.max(1));
    if let Some((user, pass)) = credentials {
        o.set_credentials(user, pass);
    }
    if broker.tls {
        set_tls(&mut o, broker, cfg)?;
    }
    Ok(o)
}

#[cfg(feature = "tls")]
fn set_tls(o: &mut MqttOptions, broker: &BrokerAddr, cfg: &ConnectionConfig) -> Result<()> {
    let tls = cfg.tls.as_ref().ok_or_else(|| Error::TlsUnavailable(broker.to_string()))?;
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.client_config.clone())));
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn set_tls(_: &mut MqttOptions, broker: &BrokerAddr, _: &ConnectionConfig) -> Result<()> {
    Err(Error::TlsUnavailable(broker.to_string()))
}

/// A client and its event loop, with the connect timeout applied.
pub(crate) fn client(o: MqttOptions, cfg: &ConnectionConfig) -> (AsyncClient, EventLoop) {
    let cap = o.request_channel_capacity();
    let (client, mut eventloop) = AsyncClient::new(o, cap);
    eventloop.network_options.set_connection_timeout(cfg.connect_timeout.as_secs().max(1));
    (client, eventloop)
}

#[cfg(test)]
mod tests {
    use super::publish_packet_size;

    #[test]
    fn publish_sizes_match_rumqttc() {
        for (topic, payload) in [(0, 0), (10, 100), (40, 262_100), (100, 16_280), (3, 2_097_140), (65_535, 1)] {
            let mut p = rumqttc::Publish::new("t".repeat(topic), rumqttc::QoS::AtLeastOnce, vec![0u8; payload]);
            p.pkid = 1;
            // What rumqttc compares with its maximum packet size.
            assert_eq!(publish_packet_size(topic, payload), p.size(), "topic {topic}, payload {payload}");
        }
        // The largest payload that fits, across the remaining length's size steps.
        for (topic, max) in [(40, 262_144), (10, 130), (10, 131), (10, 16_400), (0, 6)] {
            let p = super::max_payload(topic, max);
            assert!(publish_packet_size(topic, p) <= max, "topic {topic}, max {max}: {p}");
            assert!(publish_packet_size(topic, p + 1) > max, "topic {topic}, max {max}: {p}");
        }
    }
}
