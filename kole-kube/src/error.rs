//! kole-kube's error type.

/// What went wrong in kole-kube.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An `EdgeWorkload` the schema accepted breaks a rule of kole's model.
    #[error("EdgeWorkload {object} is invalid: {reason}")]
    InvalidWorkload {
        /// `namespace/name` of the object.
        object: String,
        /// The rule it breaks, with the field.
        reason: String,
    },
    /// A call to the apiserver failed (after retries, where it was retryable).
    #[error("{op} failed: {source}")]
    Kube {
        /// What was being done, e.g. "create SnapshotChunk kole-g0000000000000000003-c000007".
        op: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A call to the apiserver did not answer in time (a hung connection or apiserver).
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// What was being done, e.g. "renew Lease kole-system/kole-fleet".
        op: String,
        /// The limit it ran into.
        after: std::time::Duration,
    },
    /// A serialization failed.
    #[error("{what} does not serialize: {source}")]
    Json {
        /// What.
        what: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The controller could not be set up or was stopped.
    #[error("controller: {0}")]
    Controller(String),
}

/// kole-kube's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
