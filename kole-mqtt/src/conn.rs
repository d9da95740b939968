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
        .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
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
