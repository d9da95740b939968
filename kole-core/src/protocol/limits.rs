//! The decoder's limits: bounds on untrusted input, each with a documented default.

use std::fmt;

/// Bounds the decoder enforces on untrusted input. Every field has a documented default
/// ([`DecodeLimits::default`]); raise them only together with the broker's maximum packet size.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DecodeLimits {
    /// Largest accepted message, envelope included, checked before any decoding. Default 64 KiB.
    pub max_message_bytes: usize,
    /// Largest runtime spec of one workload, in bytes. Default 60 KiB.
    pub max_spec_bytes: usize,
    /// Most labels in one registration. Default 64.
    pub max_labels: usize,
    /// Most workloads (states or specs) in one message. Default 256.
    pub max_workloads: usize,
    /// Most groups in one registration ack. Default 64.
    pub max_groups: usize,
    /// Longest string of any field, in bytes. Default 512 (label keys and workload ids reach 317).
    pub max_string_len: usize,
    /// Most addresses in one node's info. Default 16.
    pub max_addresses: usize,
    /// Most requirements plus values in one workload's selector. Default 256.
    pub max_selector_terms: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_spec_bytes: 60 * 1024,
            max_labels: 64,
            max_workloads: 256,
            max_groups: 64,
            max_string_len: 512,
            max_addresses: 16,
            max_selector_terms: 256,
        }
    }
}

/// Which [`DecodeLimits`] bound a message exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// [`DecodeLimits::max_spec_bytes`].
    SpecBytes,
    /// [`DecodeLimits::max_labels`].
    Labels,
    /// [`DecodeLimits::max_workloads`].
    Workloads,
    /// [`DecodeLimits::max_groups`].
    Groups,
    /// [`DecodeLimits::max_string_len`].
    StringLen,
    /// [`DecodeLimits::max_addresses`].
    Addresses,
    /// [`DecodeLimits::max_selector_terms`].
    SelectorTerms,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::SpecBytes => "max_spec_bytes",
            Limit::Labels => "max_labels",
            Limit::Workloads => "max_workloads",
            Limit::Groups => "max_groups",
            Limit::StringLen => "max_string_len",
            Limit::Addresses => "max_addresses",
            Limit::SelectorTerms => "max_selector_terms",
        })
    }
}
