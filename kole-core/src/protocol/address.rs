//! Addressing: where a message goes and which uplink it is, independent of any broker.
//!
//! A transport maps these to its own addresses: `kole-mqtt` renders them as MQTT topics
//! (`kole_mqtt::Topics`), the in-memory transport routes on them directly. Node names, group
//! names and workload ids share one character set (`[A-Za-z0-9._-]`, starting and ending
//! alphanumeric), so every transport can use a name as one address level as it is.

use std::cell::RefCell;
use std::fmt;

use serde::Serialize;

use crate::model::{NodeName, ValidationError, WorkloadId, stable_hash, truncate_for_error, validate_node_name};

/// The uplink message kinds a node publishes, each on its own address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UplinkKind {
    /// `Register` (address level `register`).
    Register,
    /// `Heartbeat` (address level `hb`).
    Heartbeat,
    /// `StatusReport` (address level `status`).
    Status,
}

impl UplinkKind {
    /// Every uplink kind.
    pub const ALL: [UplinkKind; 3] = [UplinkKind::Register, UplinkKind::Heartbeat, UplinkKind::Status];

    /// The address level naming this kind (a transport's topic or route segment).
    pub const fn topic_segment(self) -> &'static str {
        match self {
            UplinkKind::Register => "register",
            UplinkKind::Heartbeat => "hb",
            UplinkKind::Status => "status",
        }
    }

    /// The kind named by an address level.
    pub fn from_topic_segment(segment: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.topic_segment() == segment)
    }
}

impl fmt::Display for UplinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.topic_segment())
    }
}

/// A group name that breaks the name rules of [`GroupName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid group name {name:?}: {reason}")]
pub struct GroupNameError {
    /// The offending name (truncated).
    pub name: String,
    /// The rule it breaks.
    pub reason: &'static str,
}

/// A validated group name: a set of nodes addressed by one destination.
///
/// Same rules as [`NodeName`] (1 to 128 bytes of `[A-Za-z0-9._-]`, starting and ending with a
/// letter or digit), so a group name is always exactly one address level.
///
/// The text is shared (`Arc<str>`): the controller hands the same groups to every node of a label
/// set, so a clone costs a reference count, not an allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupName(std::sync::Arc<str>);

impl Serialize for GroupName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Group names each thread's decoder keeps to share (see [`GroupName::decoded`]).
const RECENT_GROUPS: usize = 64;

impl GroupName {
    /// Validates `name` and wraps it.
    pub fn new(name: impl AsRef<str>) -> Result<Self, GroupNameError> {
        // Borrowed, so a decoder's `&str` becomes the shared text in one allocation.
        let name = name.as_ref();
        validate_node_name(name).map_err(|e| {
            let reason = match e {
                ValidationError::NodeName { reason, .. } => reason,
                _ => "invalid",
            };
            GroupNameError { name: truncate_for_error(name), reason }
        })?;
        Ok(Self(name.into()))
    }

    /// [`GroupName::new`] for a decoder: a name this thread decoded lately (and found valid) is
    /// shared rather than allocated and checked again. Every node of a label set is told the same
    /// groups, so one process that runs many agents (a simulator, a multiplexed bench) would
    /// otherwise hold a copy of each name per agent; a node agent receives the same few names on
    /// every reconnect. The thread keeps at most [`RECENT_GROUPS`] names.
    pub(crate) fn decoded(name: &str) -> Result<Self, GroupNameError> {
        thread_local! {
            static RECENT: RefCell<[Option<GroupName>; RECENT_GROUPS]> = const { RefCell::new([const { None }; RECENT_GROUPS]) };
        }
        let slot = stable_hash(0x6772_6f75_7073, name.as_bytes()) as usize % RECENT_GROUPS;
        RECENT.with(|recent| {
            let mut recent = recent.borrow_mut();
            if let Some(g) = &recent[slot]
                && g.as_str() == name
            {
                return Ok(g.clone());
            }
            let g = Self::new(name)?;
            recent[slot] = Some(g.clone());
            Ok(g)
        })
    }

    /// `groups` as a list shared with an equal one this thread handed out lately (at most
    /// [`RECENT_GROUPS`] lists are kept): every node of a label set is told the same groups, so a
    /// process running many agents holds one list per label set instead of one per agent.
    pub(crate) fn shared_list(groups: &[GroupName]) -> std::sync::Arc<[GroupName]> {
        thread_local! {
            static LISTS: RefCell<[Option<std::sync::Arc<[GroupName]>>; RECENT_GROUPS]> =
                const { RefCell::new([const { None }; RECENT_GROUPS]) };
        }
        let h = groups.iter().fold(0x006c_6973_7473, |h, g| stable_hash(h, g.0.as_bytes()));
        let slot = h as usize % RECENT_GROUPS;
        LISTS.with(|lists| {
            let mut lists = lists.borrow_mut();
            if let Some(l) = &lists[slot]
                && **l == *groups
            {
                return l.clone();
            }
            let l: std::sync::Arc<[GroupName]> = groups.into();
            lists[slot] = Some(l.clone());
            l
        })
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl AsRef<str> for GroupName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for GroupName {
    type Error = GroupNameError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

/// Where a downlink message goes: one node, a group, the fleet, or a retained spec address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    /// One node.
    Node(NodeName),
    /// Every node subscribed to the group.
    Group(GroupName),
    /// Every node of the fleet.
    Fleet,
    /// The fleet-wide spec address of one workload (retained).
    WorkloadSpec(WorkloadId),
    /// A group's spec address of one workload (retained).
    GroupWorkloadSpec(GroupName, WorkloadId),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_group_names_are_shared_checked_and_exact() {
        let a = GroupName::decoded("region.eu-west-1").unwrap();
        let b = GroupName::decoded("region.eu-west-1").unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.0, &b.0), "a name decoded again shares the first one's text");
        assert_eq!(a, GroupName::new("region.eu-west-1").unwrap());
        // More names than the thread keeps: each still decodes to itself.
        let many: Vec<String> = (0..4 * RECENT_GROUPS).map(|i| format!("site-{i}")).collect();
        for _ in 0..2 {
            for n in &many {
                assert_eq!(GroupName::decoded(n).unwrap().as_str(), n);
            }
        }
        // A bad name is refused every time, and never kept.
        for _ in 0..2 {
            assert!(GroupName::decoded("a/b").is_err());
        }
    }

    #[test]
    fn group_lists_are_shared_and_exact() {
        let g = |n: &str| GroupName::new(n).unwrap();
        let a = GroupName::shared_list(&[g("region.eu"), g("site.1")]);
        let b = GroupName::shared_list(&[g("region.eu"), g("site.1")]);
        assert!(std::sync::Arc::ptr_eq(&a, &b), "an equal list is shared");
        assert_eq!(*GroupName::shared_list(&[g("site.1"), g("region.eu")]), [g("site.1"), g("region.eu")]);
        assert!(GroupName::shared_list(&[]).is_empty());
        // More lists than the thread keeps: each is still itself.
        let lists: Vec<Vec<GroupName>> = (0..4 * RECENT_GROUPS).map(|i| vec![g(&format!("site-{i}"))]).collect();
        for _ in 0..2 {
            for l in &lists {
                assert_eq!(*GroupName::shared_list(l), **l);
            }
        }
    }

    #[test]
    fn group_names_follow_the_node_name_rules() {
        for g in ["", "a/b", "+", "#", "-x", "a b"] {
            assert!(GroupName::new(g).is_err(), "{g:?}");
        }
        assert_eq!(GroupName::new("site-17").unwrap().as_str(), "site-17");
    }
}
