//! Uplink handling: what nodes send up (registrations, heartbeats, status reports) and how the
//! engine applies it to the node cache.

use crate::cache::HeartbeatUpdate;
use crate::protocol::Heartbeat;

// The wire format knows nothing of the cache; the engine, which feeds heartbeats to the cache,
// owns the conversion.
impl From<&Heartbeat> for HeartbeatUpdate {
    fn from(hb: &Heartbeat) -> Self {
        HeartbeatUpdate { boot_id: hb.boot_id, seq: hb.seq, applied: hb.applied }
    }
}

impl From<Heartbeat> for HeartbeatUpdate {
    fn from(hb: Heartbeat) -> Self {
        Self::from(&hb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredDigest;
    use crate::protocol::NodeHealth;

    #[test]
    fn heartbeat_update_is_derived_field_by_field() {
        let hb = Heartbeat { seq: 7, boot_id: 0xdead_beef, applied: DesiredDigest(42), health: NodeHealth::DEGRADED };
        assert_eq!(
            HeartbeatUpdate::from(&hb),
            HeartbeatUpdate { boot_id: 0xdead_beef, seq: 7, applied: DesiredDigest(42) }
        );
    }
}
