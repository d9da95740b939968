//! # kole-sim
//!
//! The simulator and benchmark of kole: the seeded [`dataset::ReferenceFleet`] every published
//! figure is measured on, and the `kole-sim` binary (`kole-sim bench`, `kole-sim snapshot …`) that
//! reproduces the KOLE paper's experiments. [`net::SimNetwork`] is the deterministic, virtual-time
//! network that plays the broker for simulated fleets; [`sim::Simulation`] runs an engine and its
//! agents over it.
//!
//! ```
//! use kole_core::cache::{NodeCache, StateCache};
//! use kole_sim::dataset::ReferenceFleet;
//!
//! let fleet = ReferenceFleet::new(1_000, 42);
//! let mut cache = NodeCache::new();
//! fleet.load_into(&mut cache)?;
//! assert_eq!(cache.len(), 1_000);
//! # Ok::<(), kole_core::cache::CacheError>(())
//! ```

pub mod bench;
pub mod dataset;
pub mod demo;
pub mod fuzz;
pub mod mqtt_bench;
pub mod net;
pub mod per_node;
pub mod plot;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod sim;
