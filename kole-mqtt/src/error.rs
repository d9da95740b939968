//! The crate's error type.

use kole_core::transport::TransportError;

/// What went wrong setting up an MQTT transport or the embedded broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A broker address could not be parsed.
    #[error("invalid broker address {addr:?}: {reason}")]
    BrokerAddr {
        /// The address given.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A configuration value is out of range or inconsistent.
    #[error("invalid MQTT configuration: {0}")]
    Config(String),
    /// A client id or user name would not be safe in MQTT (wildcards, `/`, `$`, empty, too long).
    #[error("{what} {name:?} is not a valid MQTT client id / user name: {reason}")]
    InvalidClientId {
        /// Which name.
        what: &'static str,
        /// The name (truncated).
        name: String,
        /// The rule it breaks.
        reason: String,
    },
    /// The broker refused or dropped the connection, or could not be reached.
    #[error("cannot connect to MQTT broker {broker}: {reason}")]
    Connect {
        /// The broker.
        broker: String,
        /// Why.
        reason: String,
    },
    /// `mqtts://` was asked for but no TLS settings were given (or the `tls` feature is off).
    #[error("broker {0} needs TLS: enable the `tls` feature and set `ConnectionConfig::tls`")]
    TlsUnavailable(String),
    /// The embedded broker failed.
    #[error("embedded broker: {0}")]
    Broker(String),
    /// An I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for TransportError {
    fn from(e: Error) -> Self {
        TransportError::Other { context: e.to_string(), source: Box::new(e) }
    }
}
