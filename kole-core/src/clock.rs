//! The wall clock, read in one place.
//!
//! The engine and the agent never read a clock: time is a parameter of every call. Their drivers
//! read it here, so tests and simulations can hand them any other [`Clock`].

use std::sync::Arc;

use crate::model::Timestamp;

/// A source of wall-clock time, as drivers take it.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The operating system's wall clock now, in milliseconds since the Unix epoch (0 before the
/// epoch, saturating far in the future).
pub fn wall_clock_now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp::from_millis(ms)
}

/// The system clock ([`wall_clock_now`]) as a [`Clock`].
pub fn system_clock() -> Clock {
    Arc::new(wall_clock_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_is_past_2020() {
        assert!(system_clock()().as_millis() > 1_577_836_800_000);
    }
}
