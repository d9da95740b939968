//! Kubernetes-style labels.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

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
///
/// The pairs lie in one block, in key order, in the protocol's wire form of a label set: the count,
/// then each key and value as a length and its bytes (lengths as LEB128 varints, as postcard writes
/// them). A lookup reads that one block instead of a tree of separately allocated strings, and a
/// registration copies it whole ([`Labels::wire`]). Equality and hashing are over the block, which
/// is canonical (sorted, unique keys); ordering is pair by pair, as a sorted map orders.
#[derive(Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct Labels {
    /// The wire form; empty (no allocation) for no labels, where the wire form is the single byte 0.
    wire: Box<[u8]>,
}

/// The wire form of an empty label set: a count of zero.
const EMPTY_WIRE: &[u8] = &[0];

impl Labels {
    /// An empty label set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and inserts one label, replacing an earlier value of the same key.
    ///
    /// Rebuilds the set's block, so building a set label by label costs the square of its size;
    /// [`Labels::from_pairs`] builds it in one go.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Result<(), ValidationError> {
        let (key, value) = (key.into(), value.into());
        validate_pair(&key, &value)?;
        let mut map: BTreeMap<&str, &str> = self.iter().collect();
        map.insert(&key, &value);
        self.wire = encode_pairs(map.len(), map.into_iter());
        Ok(())
    }

    /// Builds a label set from pairs, validating each.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self, ValidationError> {
        let mut map = BTreeMap::new();
        for (k, v) in pairs {
            let (k, v): (String, String) = (k.into(), v.into());
            validate_pair(&k, &v)?;
            map.insert(k, v);
        }
        Ok(Self::from_sorted(&map))
    }

    /// The set of a validated sorted map.
    fn from_sorted(map: &BTreeMap<String, String>) -> Self {
        Self { wire: encode_pairs(map.len(), map.iter().map(|(k, v)| (k.as_str(), v.as_str()))) }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.view().get(key)
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        // No labels is always the empty block (see `encode_pairs`).
        self.wire.is_empty()
    }

    /// Labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.view().iter()
    }

    /// The label set as the protocol writes it: the count, then each key and value, length-prefixed
    /// (the postcard form of a sequence of `(key, value)` string pairs, and of a string map).
    pub fn wire(&self) -> &[u8] {
        self.view().wire()
    }

    /// The set borrowed, as a decoded registration holds one.
    pub fn view(&self) -> LabelsView<'_> {
        LabelsView { wire: if self.wire.is_empty() { EMPTY_WIRE } else { &self.wire } }
    }
}

/// A label set borrowed in its wire form (see [`Labels`]): what a registration decoded without
/// copying holds, and what [`Labels::view`] lends.
///
/// Its block is always canonical and valid: the decoder builds one only from a block whose lengths
/// are in their shortest form, whose strings are UTF-8 and follow the label rules, and whose keys
/// are sorted and unique. So two views are equal exactly when their label sets are.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LabelsView<'a> {
    /// The wire form, count included (`[0]` for no labels).
    wire: &'a [u8],
}

impl<'a> LabelsView<'a> {
    /// A view of `wire`, which the caller has checked as [`LabelsView`] says: canonical, valid and
    /// complete (the count and exactly that many pairs).
    pub(crate) fn from_checked_wire(wire: &'a [u8]) -> Self {
        debug_assert!(read_len(wire).is_some());
        Self { wire }
    }

    /// The value of `key`, if present: one walk of the block, stopping at the first larger key.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let mut pairs = self.raw_pairs();
        while let Some((k, v)) = pairs.next_raw() {
            match k.cmp(key.as_bytes()) {
                Ordering::Less => {}
                Ordering::Equal => return Some(as_str(v)),
                Ordering::Greater => return None,
            }
        }
        None
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        read_len(self.wire).map_or(0, |(n, _)| n)
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Labels in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
        let mut pairs = self.raw_pairs();
        std::iter::from_fn(move || pairs.next_raw().map(|(k, v)| (as_str(k), as_str(v))))
    }

    /// The wire form: the count, then each key and value, length-prefixed.
    pub fn wire(&self) -> &'a [u8] {
        self.wire
    }

    /// An owned copy: the block copied, nothing checked again.
    pub fn to_labels(&self) -> Labels {
        Labels { wire: if self.is_empty() { Box::default() } else { self.wire.into() } }
    }

    fn raw_pairs(&self) -> RawPairs<'a> {
        RawPairs::of(self.wire)
    }
}

impl fmt::Debug for LabelsView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl LabelLookup for LabelsView<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

/// Walks the pairs of a wire form: the caller has already read the count.
pub(crate) struct RawPairs<'a> {
    rest: &'a [u8],
}

impl<'a> RawPairs<'a> {
    /// The pairs of a complete wire form (count included), as raw bytes.
    pub(crate) fn of(wire: &'a [u8]) -> Self {
        Self { rest: read_len(wire).map_or(&[], |(_, used)| &wire[used..]) }
    }

    pub(crate) fn next_raw(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let key = self.next_str()?;
        let value = self.next_str()?;
        Some((key, value))
    }

    fn next_str(&mut self) -> Option<&'a [u8]> {
        let (len, used) = read_len(self.rest)?;
        let (s, rest) = self.rest.get(used..)?.split_at_checked(len)?;
        self.rest = rest;
        Some(s)
    }
}

/// Bytes of a checked block (copied from a `&str`, or checked by the decoder): always UTF-8, so the
/// fallback is never taken.
fn as_str(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Writes `n` as a LEB128 varint, as postcard writes lengths.
fn write_len(buf: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        buf.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

/// Why [`take_len`] could not read a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LenError {
    /// The input ends inside the length.
    Truncated,
    /// More than four bytes: a length over 2^28.
    TooLarge,
    /// A longer form than the value needs (a last byte of zero after others).
    NotShortest,
}

impl LenError {
    /// What went wrong, for an error message.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Truncated => "the input ends inside a length",
            Self::TooLarge => "a length over 2^28",
            Self::NotShortest => "a length is not in its shortest form",
        }
    }
}

/// Reads a length as [`write_len`] writes it (LEB128, at most four bytes), refusing any but its
/// shortest form: the value and the bytes it took.
pub(crate) fn take_len(bytes: &[u8]) -> Result<(usize, usize), LenError> {
    let mut n = 0usize;
    for (i, &b) in bytes.iter().enumerate().take(4) {
        n |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return Err(LenError::NotShortest);
            }
            return Ok((n, i + 1));
        }
    }
    Err(if bytes.len() < 4 { LenError::Truncated } else { LenError::TooLarge })
}

/// [`take_len`] on a checked block, whose lengths are always present and in their shortest form.
fn read_len(bytes: &[u8]) -> Option<(usize, usize)> {
    take_len(bytes).ok()
}

/// The wire form of `count` sorted, unique, validated pairs; empty for none.
pub(crate) fn encode_pairs<'a>(count: usize, pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Box<[u8]> {
    if count == 0 {
        return Box::default();
    }
    let mut buf = Vec::with_capacity(1 + count * 24);
    write_len(&mut buf, count);
    for (k, v) in pairs {
        write_len(&mut buf, k.len());
        buf.extend_from_slice(k.as_bytes());
        write_len(&mut buf, v.len());
        buf.extend_from_slice(v.as_bytes());
    }
    buf.into_boxed_slice()
}

impl PartialOrd for Labels {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Pair by pair, key then value, as `BTreeMap<String, String>` orders.
impl Ord for Labels {
    fn cmp(&self, other: &Self) -> Ordering {
        self.iter().cmp(other.iter())
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// As a map from key to value, as `BTreeMap<String, String>` serializes.
impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = ValidationError;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        for (k, v) in &map {
            validate_pair(k, v)?;
        }
        Ok(Self::from_sorted(&map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
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

/// Validates one label: its key, then its value.
fn validate_pair(key: &str, value: &str) -> Result<(), ValidationError> {
    validate_label_key(key)?;
    validate_label_value(value)
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

    mod props {
        use proptest::prelude::*;

        use super::*;

        /// Keys up to about 300 bytes, so lengths take two varint bytes too.
        fn key() -> impl Strategy<Value = String> {
            let prefix = proptest::option::of("[a-z0-9]{1,60}(\\.[a-z0-9]{1,60}){0,3}");
            (prefix, "[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?").prop_map(|(p, n)| match p {
                Some(p) => format!("{p}/{n}"),
                None => n,
            })
        }

        fn map() -> impl Strategy<Value = BTreeMap<String, String>> {
            let value = prop_oneof![1 => Just(String::new()), 4 => "[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?"];
            proptest::collection::btree_map(key(), value, 0..10)
        }

        proptest! {
            /// The one-block form answers every question as the sorted map it replaced did, and its
            /// wire form is postcard's form of that map.
            #[test]
            fn agrees_with_a_sorted_map(a in map(), b in map(), absent in key()) {
                let la = Labels::try_from(a.clone()).unwrap();
                let lb = Labels::from_pairs(b.iter().rev().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
                let mut inserted = Labels::new();
                for (k, v) in a.iter().rev() {
                    inserted.insert(k.as_str(), v.as_str()).unwrap();
                }
                prop_assert_eq!(&inserted, &la);

                prop_assert_eq!(la.len(), a.len());
                prop_assert_eq!(la.is_empty(), a.is_empty());
                prop_assert!(la.iter().eq(a.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
                for (k, v) in &a {
                    prop_assert_eq!(la.get(k), Some(v.as_str()));
                }
                prop_assert_eq!(la.get(&absent), a.get(&absent).map(String::as_str));
                prop_assert_eq!(la.wire(), &postcard::to_allocvec(&a).unwrap()[..]);

                prop_assert_eq!(la.cmp(&lb), a.cmp(&b));
                prop_assert_eq!(la == lb, a == b);
                prop_assert_eq!(BTreeMap::from(la.clone()), a.clone());

                let json = serde_json::to_string(&la).unwrap();
                prop_assert_eq!(&json, &serde_json::to_string(&a).unwrap());
                prop_assert_eq!(serde_json::from_str::<Labels>(&json).unwrap(), la.clone());
                prop_assert_eq!(format!("{la:?}"), format!("{a:?}"));
            }
        }
    }
}
