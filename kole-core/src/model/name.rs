//! Node identity.

use std::fmt;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::ValidationError;

/// Longest accepted node name, in bytes.
///
/// Node names become MQTT client ids, user names and topic segments, and Kubernetes label values
/// in query results; 128 bytes keeps every broker we target happy.
pub const MAX_NODE_NAME_LEN: usize = 128;

/// The validated, fleet-unique name of an edge node.
///
/// A name is 1 to [`MAX_NODE_NAME_LEN`] bytes of ASCII letters, digits, `-`, `_` and `.`, and starts
/// and ends with a letter or digit. That excludes everything MQTT gives a meaning to (`/`, `+`, `#`,
/// `$`, NUL) so a name is always safe as one topic segment, client id or ACL `%u` substitution.
///
/// The text is shared (`Arc<str>`): a name is cloned into every message, topic and delivery that
/// concerns its node, and a clone is a reference-count increment, not an allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(Arc<str>);

impl NodeName {
    /// Validates `name` and wraps it: one allocation, for the shared text (a controller makes
    /// one for every uplink message, from its topic).
    pub fn new(name: impl AsRef<str>) -> Result<Self, ValidationError> {
        let name = name.as_ref();
        validate_node_name(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an owned string.
    pub fn into_string(self) -> String {
        self.0.to_string()
    }
}

/// Checks `name` against the rules documented on [`NodeName`].
pub fn validate_node_name(name: &str) -> Result<(), ValidationError> {
    let invalid = |reason: &'static str| ValidationError::NodeName { name: truncate_for_error(name), reason };
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if bytes.len() > MAX_NODE_NAME_LEN {
        return Err(invalid("longer than 128 bytes"));
    }
    if !bytes.iter().fold(true, |ok, &b| ok & name_byte(b)) {
        return Err(invalid(
            "may contain only ASCII letters, digits, '-', '_' and '.' (MQTT wildcards and '/' are not allowed)",
        ));
    }
    if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return Err(invalid("must start and end with a letter or digit"));
    }
    Ok(())
}

/// Whether `b` may appear in a node or group name: `[A-Za-z0-9._-]`. Branch-free, and folded over a
/// name without short-circuiting, so the compiler may check many bytes at a time: every uplink message
/// over MQTT validates the name in its topic, and the byte-by-byte loop with a branch per byte
/// was 8% of the controller's CPU per heartbeat.
#[inline]
fn name_byte(b: u8) -> bool {
    let lower = b | 0x20;
    (b.is_ascii_digit()) | (lower.wrapping_sub(b'a') < 26) | (b == b'-') | (b == b'_') | (b == b'.')
}

/// Keeps error messages bounded when the offending input is huge: the first 80 bytes (cut at a
/// character boundary) and an ellipsis. Every crate of kole quotes bad input through it.
pub fn truncate_for_error(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for NodeName {
    type Error = ValidationError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl Serialize for NodeName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_realistic_names() {
        for n in ["cn-hangzhou-s0042-7k2m9q4x", "a", "node_1.edge", "A9"] {
            assert!(NodeName::new(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn rejects_mqtt_specials_and_bad_edges() {
        for n in ["", "a/b", "a+b", "a#", "$sys", "-a", "a-", "a b", "é", &"x".repeat(129)] {
            assert!(NodeName::new(n).is_err(), "{n:?} should be rejected");
        }
        assert!(NodeName::new("x".repeat(128)).is_ok());
    }

    proptest::proptest! {
        /// The branch-free byte class is exactly `[A-Za-z0-9._-]`, for every byte.
        #[test]
        fn name_byte_matches_the_rule(b in 0u8..=255) {
            proptest::prop_assert_eq!(
                name_byte(b),
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
            );
        }

        /// Validation agrees with the rules written out one by one, on names drawn mostly from
        /// the allowed bytes (so both outcomes are common) and on arbitrary strings.
        #[test]
        fn validation_matches_the_rules(
            name in proptest::prop_oneof!["[a-zA-Z0-9._/+# -]{0,140}", ".{0,40}"]
        ) {
            let b = name.as_bytes();
            let want = !b.is_empty()
                && b.len() <= MAX_NODE_NAME_LEN
                && b.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric();
            proptest::prop_assert_eq!(validate_node_name(&name).is_ok(), want);
        }
    }
}
