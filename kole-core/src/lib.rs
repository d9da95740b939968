//! # kole-core
//!
//! The core of kole, a framework for managing millions of far-edge nodes from Kubernetes over MQTT.
//! It knows no MQTT, no Kubernetes and no async runtime: it holds the domain model
//! ([`model`]), the compact cloud state cache ([`cache`]), the wire protocol ([`protocol`]), the
//! snapshot format and stores ([`snapshot`]), and the I/O seams as object-safe traits
//! ([`cache::StateCache`], [`transport::MessageTransport`], [`snapshot::SnapshotStore`]), each with an
//! in-memory implementation.
//!
//! ```
//! use kole_core::cache::{NodeCache, StateCache};
//! use kole_core::model::{Labels, NodeInfo, NodeName, NodeRegistration, Selector, Timestamp};
//!
//! let mut cache = NodeCache::new();
//! let reg = NodeRegistration {
//!     name: NodeName::new("cn-hangzhou-s0042-7k2m9q4x")?,
//!     labels: Labels::from_pairs([("topology.kubernetes.io/region", "cn-hangzhou"), ("tier", "cdn")])?,
//!     info: NodeInfo { arch: "arm64".into(), os: "linux-6.1".into(), agent_version: "1.4.2".into(), addresses: vec![] },
//!     applied: Default::default(),
//!     workloads: vec![],
//! };
//! cache.register(&reg, 0x5eed, Timestamp::from_secs(1_700_000_000))?;
//! let cdn = Selector::parse("tier in (cdn, retail)")?;
//! assert_eq!(cache.counts(&cdn).online, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod agent;
pub mod backoff;
pub mod cache;
pub mod clock;
pub mod engine;
pub mod model;
pub mod protocol;
pub mod rng;
pub mod snapshot;
pub mod transport;
