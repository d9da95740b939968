//! `edge.kole.dev/v1alpha1` `edgenodes`: the fleet in `kubectl`, served from the cache, with no
//! object per node.
//!
//! An aggregated API (as metrics-server serves `metrics.k8s.io`): the kube-apiserver proxies
//! `/apis/edge.kole.dev/…` to this server through an `APIService`, and this server answers from the
//! controller's in-memory cache:
//!
//! - **list** with label selectors (Kubernetes syntax, kole's selector code), field selectors on
//!   `metadata.name`, `status.phase`, `status.arch`, `status.os` and `status.agentVersion`, and
//!   `limit`/`continue` pages in slot order, so a node present for the whole listing is returned
//!   exactly once however the fleet churns;
//! - **get** of one node;
//! - **watch** of phase, label and workload-state changes (not of `lastSeen`, which moves on every
//!   heartbeat), with bookmarks; see [`watch`] for `resourceVersion` semantics;
//! - **Table** output for `kubectl get`, discovery and an OpenAPI v2 document for `kubectl explain`.
//!
//! Security is the aggregation layer's: TLS, the aggregator's front-proxy client certificate
//! verified against the cluster's `requestheader` CA (from the `extension-apiserver-authentication`
//! ConfigMap), the user and groups taken from its request headers, and every resource request
//! authorized by the apiserver through a `SubjectAccessReview` (see [`auth`]).

pub mod auth;
mod http;
mod object;
mod openapi;
mod request;
mod source;
pub mod watch;

use std::net::SocketAddr;
use std::time::Duration;

pub use auth::{Authorizer, Decision, FrontProxyConfig, RequestAttributes, SubjectAccessReviewer, UserInfo};
pub use http::{EdgeNodeServer, ServingCert};
pub use source::{NodeSource, SnapshotView, Staleness};
pub use watch::WatchHub;

/// The API group.
pub const GROUP: &str = "edge.kole.dev";
/// The only version.
pub const VERSION: &str = "v1alpha1";
/// The resource (plural).
pub const RESOURCE: &str = "edgenodes";
/// The kind.
pub const KIND: &str = "EdgeNode";

/// How the edgenodes server runs.
#[derive(Clone, Debug)]
pub struct EdgeNodeApiConfig {
    /// Where to listen (the `Service`'s target port). The aggregator dials the endpoint address.
    pub listen: SocketAddr,
    /// How often the watch looks for changes (a pass over the slots: milliseconds at 1M nodes).
    pub watch_interval: Duration,
    /// Change events kept for watches that resume from a `resourceVersion`.
    pub watch_history: usize,
    /// A pass that finds more changes than this (a broker outage taking the fleet offline) emits
    /// none: every watch ends with `410 Gone` and clients list again, as after a compaction.
    pub max_changes_per_pass: usize,
    /// Bookmark period for watches that ask for bookmarks.
    pub bookmark_interval: Duration,
    /// Open watches at most; more get `429 TooManyRequests`.
    pub max_watches: usize,
    /// How long an authorization decision is reused (both allow and deny), as kube's delegating
    /// authorizer does.
    pub authz_cache_ttl: Duration,
}

impl Default for EdgeNodeApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 6443)),
            watch_interval: Duration::from_secs(1),
            watch_history: 10_000,
            max_changes_per_pass: 100_000,
            bookmark_interval: Duration::from_secs(10),
            max_watches: 1_000,
            authz_cache_ttl: Duration::from_secs(10),
        }
    }
}
