//! Kubernetes-style labels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ValidationError;
use super::name::truncate_for_error;

/// Longest label name (the part after an optional prefix) and longest label value.
pub const MAX_LABEL_NAME_LEN: usize = 63;
/// Longest label key prefix (a DNS-1123 subdomain).
pub const MAX_LABEL_PREFIX_LEN: usize = 253;

/// A node's labels: a sorted map from validated keys to validated values.
///
/// Keys and values follow Kubernetes' rules exactly: a key is an optional DNS-1123 subdomain prefix
/// and `/`, then a name of at most 63 characters of `[A-Za-z0-9_.-]` that starts and ends with an
/// alphanumeric; a value is empty or follows the name rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>", into = "BTreeMap<String, String>")]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    /// An empty label set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and inserts one label, replacing an earlier value of the same key.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Result<(), ValidationError> {
        let (key, value) = (key.into(), value.into());
        validate_label_key(&key)?;
        validate_label_value(&value)?;
        self.0.insert(key, value);
        Ok(())
    }

    /// Builds a label set from pairs, validating each.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ValidationError> {
        let mut labels = Self::new();
        for (k, v) in pairs {
            labels.insert(k, v)?;
        }
        Ok(labels)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = ValidationError;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        for (k, v) in &map {
            validate_label_key(k)?;
            validate_label_value(v)?;
        }
        Ok(Self(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

/// A lookup of label values by key, so selectors can run on interned label sets too.
pub trait LabelLookup {
    /// The value of `key`, if the set has it.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelLookup for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl LabelLookup for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// The "qualified name" part of a key and the whole of a non-empty value.
fn check_name_part(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("name part must be non-empty");
    }
    if b.len() > MAX_LABEL_NAME_LEN {
        return Err("must be no more than 63 characters");
    }
    if !b.iter().all(|&c| is_name_char(c)) {
        return Err("may contain only alphanumerics, '-', '_' and '.'");
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must start and end with an alphanumeric character");
    }
    Ok(())
}

/// A DNS-1123 subdomain: lower-case labels of `[a-z0-9-]` joined by `.`.
fn check_dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("prefix must be non-empty");
    }
    if s.len() > MAX_LABEL_PREFIX_LEN {
        return Err("prefix must be no more than 253 characters");
    }
    for part in s.split('.') {
        let b = part.as_bytes();
        let ok = !b.is_empty()
            && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Err("prefix must be a lower-case DNS-1123 subdomain");
        }
    }
    Ok(())
}

/// Validates a label key (`[prefix/]name`) by Kubernetes' rules.
pub fn validate_label_key(key: &str) -> Result<(), ValidationError> {
    let result = match key.split_once('/') {
        Some((prefix, name)) => check_dns_subdomain(prefix).and_then(|()| check_name_part(name)),
        None => check_name_part(key),
    };
    result.map_err(|reason| ValidationError::LabelKey { key: truncate_for_error(key), reason })
}

/// Validates a label value by Kubernetes' rules (empty is allowed).
pub fn validate_label_value(value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Ok(());
    }
    check_name_part(value).map_err(|reason| ValidationError::LabelValue { value: truncate_for_error(value), reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_kubernetes_rules() {
        for k in ["app", "kubernetes.io/hostname", "topology.kubernetes.io/region", "a.b_c-d", "x/y"] {
            assert!(validate_label_key(k).is_ok(), "{k}");
        }
        for k in ["", "/a", "a/", "Upper.Case/x", "-a", "a-", "a/b/c", "a b", &"k".repeat(64), "ex_ample.com/a"] {
            assert!(validate_label_key(k).is_err(), "{k:?}");
        }
        assert!(validate_label_key(&"k".repeat(63)).is_ok());
    }

    #[test]
    fn values_follow_kubernetes_rules() {
        for v in ["", "prod", "v1.2.3", "A_b-c.d"] {
            assert!(validate_label_value(v).is_ok(), "{v}");
        }
        for v in ["-x", "x-", "a/b", "a b", &"v".repeat(64)] {
            assert!(validate_label_value(v).is_err(), "{v:?}");
        }
    }
}
