//! The MQTT topic layout: rendering and parsing topics, subscription filters and broker ACL
//! templates.
//!
//! Every topic is rooted at `{prefix}/{fleet}` (the *base*; the prefix defaults to
//! [`Topics::DEFAULT_PREFIX`]):
//!
//! | topic | direction | carries |
//! |---|---|---|
//! | `{base}/up/{node}/register` | node → cloud | `Register` |
//! | `{base}/up/{node}/hb` | node → cloud | `Heartbeat` |
//! | `{base}/up/{node}/status` | node → cloud | `StatusReport` |
//! | `{base}/down/node/{node}` | cloud → one node | `RegisterAck`, `DesiredState`, `Command`, per-node `WorkloadSpec` |
//! | `{base}/down/group/{group}` | cloud → a group | `Command`, `WorkloadRemoved` |
//! | `{base}/down/group/{group}/spec/{ns}/{name}` | cloud → a group, retained | `WorkloadSpec` |
//! | `{base}/down/all` | cloud → fleet | `Command`, `WorkloadRemoved` |
//! | `{base}/down/spec/{ns}/{name}` | cloud → fleet, retained | `WorkloadSpec` |
//!
//! A workload id `namespace/name` takes the two levels `{ns}/{name}`; an id without a namespace
//! takes `_/{name}`. `_` can never be a namespace (id segments start with a letter or digit), so
//! the mapping is unambiguous and every spec topic has exactly two id levels, which lets nodes
//! subscribe with `…/spec/+/+`.
//!
//! Node names, group names, the fleet name and prefix levels share one character set
//! (`[A-Za-z0-9._-]`, starting and ending alphanumeric), which excludes everything MQTT gives a
//! meaning to (`/`, `+`, `#`, `$`, NUL). A name is therefore always exactly one topic level, and
//! it is safe to substitute for `%u` / `${username}` in an ACL.

use std::fmt::{self, Write as _};

use kole_core::model::{NodeName, ValidationError, WorkloadId, truncate_for_error, validate_node_name};
use kole_core::protocol::{Destination, GroupName, GroupNameError, UplinkKind};

/// A topic, name or ACL input that breaks the layout's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// A fleet, group, prefix level or user name breaks the name rules.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// What the name is for ("fleet name", "group name", "prefix level", "controller user name").
        what: &'static str,
        /// The offending name (truncated).
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// The topic's node level is not a valid node name.
    #[error("topic {topic:?} has an invalid node level")]
    InvalidNode {
        /// The topic (truncated).
        topic: String,
        /// Why the node level is invalid.
        #[source]
        source: ValidationError,
    },
    /// The topic's workload levels are not a valid workload id.
    #[error("topic {topic:?} has invalid workload id levels")]
    InvalidWorkload {
        /// The topic (truncated).
        topic: String,
        /// Why the id is invalid.
        #[source]
        source: ValidationError,
    },
    /// The topic is not under this fleet's base `{prefix}/{fleet}`.
    #[error("topic {topic:?} is not under {base:?}")]
    ForeignTopic {
        /// The topic (truncated).
        topic: String,
        /// The base it should start with.
        base: String,
    },
    /// The topic is under the base but does not follow the layout.
    #[error("malformed topic {topic:?}: {reason}")]
    Malformed {
        /// The topic (truncated).
        topic: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl From<GroupNameError> for TopicError {
    fn from(e: GroupNameError) -> Self {
        TopicError::InvalidName { what: "group name", name: e.name, reason: e.reason }
    }
}

/// Longest accepted prefix, in bytes.
pub const MAX_PREFIX_LEN: usize = 256;

fn check_name(what: &'static str, name: &str) -> Result<(), TopicError> {
    validate_node_name(name).map_err(|e| {
        let reason = match e {
            ValidationError::NodeName { reason, .. } => reason,
            _ => "invalid",
        };
        TopicError::InvalidName { what, name: truncate_for_error(name), reason }
    })
}

/// Renders and parses the topics of one fleet. Cheap to clone; build it once per fleet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Topics {
    /// `{prefix}/{fleet}`.
    base: String,
    /// Length of `{prefix}` in `base`.
    prefix_len: usize,
}

impl Topics {
    /// The default topic prefix. Its `v1` level is the topic layout's version: a layout change
    /// moves to `kole/v2` so old and new agents can share a broker during a migration.
    pub const DEFAULT_PREFIX: &'static str = "kole/v1";

    /// The topics of `fleet` under [`Topics::DEFAULT_PREFIX`].
    pub fn new(fleet: &str) -> Result<Self, TopicError> {
        Self::with_prefix(Self::DEFAULT_PREFIX, fleet)
    }

    /// The topics of `fleet` under `prefix` (one or more `/`-separated levels, each following the
    /// name rules, at most [`MAX_PREFIX_LEN`] bytes in all).
    pub fn with_prefix(prefix: &str, fleet: &str) -> Result<Self, TopicError> {
        if prefix.len() > MAX_PREFIX_LEN {
            return Err(TopicError::InvalidName {
                what: "prefix",
                name: truncate_for_error(prefix),
                reason: "longer than 256 bytes",
            });
        }
        for level in prefix.split('/') {
            check_name("prefix level", level)?;
        }
        check_name("fleet name", fleet)?;
        Ok(Self { base: format!("{prefix}/{fleet}"), prefix_len: prefix.len() })
    }

    /// The prefix, e.g. `kole/v1`.
    pub fn prefix(&self) -> &str {
        &self.base[..self.prefix_len]
    }

    /// The fleet name.
    pub fn fleet(&self) -> &str {
        &self.base[self.prefix_len + 1..]
    }

    /// `{prefix}/{fleet}`, the root of every topic of this fleet.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The topic a node publishes one kind of uplink message on: `{base}/up/{node}/{kind}`.
    pub fn uplink(&self, node: &NodeName, kind: UplinkKind) -> String {
        let mut t = String::with_capacity(self.base.len() + node.as_str().len() + 14);
        let _ = write!(t, "{}/up/{}/{}", self.base, node, kind.topic_segment());
        t
    }

    /// The topic of a downlink destination.
    pub fn downlink(&self, to: &Destination) -> String {
        let mut t = String::with_capacity(self.base.len() + 64);
        t.push_str(&self.base);
        // Writing into a String cannot fail.
        let _ = match to {
            Destination::Node(n) => write!(t, "/down/node/{n}"),
            Destination::Group(g) => write!(t, "/down/group/{g}"),
            Destination::Fleet => write!(t, "/down/all"),
            Destination::WorkloadSpec(id) => write!(t, "/down/spec/{}", SpecLevels(id)),
            Destination::GroupWorkloadSpec(g, id) => {
                write!(t, "/down/group/{g}/spec/{}", SpecLevels(id))
            }
        };
        t
    }

    /// Parses an uplink topic into the publishing node and the message kind.
    ///
    /// The node comes from the topic, which the broker's ACL ties to the client's user name: it is
    /// the message's authenticated identity. Anything else than exactly
    /// `{base}/up/{node}/{register|hb|status}` is an error.
    pub fn parse_uplink(&self, topic: &str) -> Result<(NodeName, UplinkKind), TopicError> {
        let rest = self.strip_base(topic)?;
        let malformed = |reason| TopicError::Malformed { topic: truncate_for_error(topic), reason };
        let rest =
            rest.strip_prefix("up/").ok_or_else(|| malformed("not an uplink topic (expected `up/` after the base)"))?;
        let mut levels = rest.split('/');
        let (Some(node), Some(kind), None) = (levels.next(), levels.next(), levels.next()) else {
            return Err(malformed("an uplink topic has exactly two levels after `up`: node and kind"));
        };
        let node = NodeName::new(node)
            .map_err(|source| TopicError::InvalidNode { topic: truncate_for_error(topic), source })?;
        let kind = UplinkKind::from_topic_segment(kind)
            .ok_or_else(|| malformed("unknown uplink kind (expected register, hb or status)"))?;
        Ok((node, kind))
    }

    /// Parses a downlink topic (as a node receives it) into its destination.
    pub fn parse_downlink(&self, topic: &str) -> Result<Destination, TopicError> {
        let rest = self.strip_base(topic)?;
        let malformed = |reason| TopicError::Malformed { topic: truncate_for_error(topic), reason };
        let rest = rest
            .strip_prefix("down/")
            .ok_or_else(|| malformed("not a downlink topic (expected `down/` after the base)"))?;
        let levels: Vec<&str> = rest.splitn(7, '/').collect();
        let node = |n: &str| {
            NodeName::new(n).map_err(|source| TopicError::InvalidNode { topic: truncate_for_error(topic), source })
        };
        let group = |g: &str| GroupName::new(g).map_err(TopicError::from);
        let spec = |ns: &str, name: &str| {
            let id = if ns == "_" { WorkloadId::new(name) } else { WorkloadId::new(format!("{ns}/{name}")) };
            id.map_err(|source| TopicError::InvalidWorkload { topic: truncate_for_error(topic), source })
        };
        match levels.as_slice() {
            ["all"] => Ok(Destination::Fleet),
            ["node", n] => Ok(Destination::Node(node(n)?)),
            ["group", g] => Ok(Destination::Group(group(g)?)),
            ["spec", ns, name] => Ok(Destination::WorkloadSpec(spec(ns, name)?)),
            ["group", g, "spec", ns, name] => Ok(Destination::GroupWorkloadSpec(group(g)?, spec(ns, name)?)),
            _ => Err(malformed(
                "not a downlink topic of the layout (all, node/N, group/G, spec/NS/NAME, group/G/spec/NS/NAME)",
            )),
        }
    }

    /// The cloud's subscription filter for one uplink kind of every node: `{base}/up/+/{kind}`.
    ///
    /// Subscribing per kind lets a controller read heartbeats on their own connection(s), so a
    /// registration storm cannot delay them.
    pub fn uplink_filter(&self, kind: UplinkKind) -> String {
        format!("{}/up/+/{}", self.base, kind.topic_segment())
    }

    /// The cloud's subscription filter for every uplink message: `{base}/up/+/+`.
    pub fn uplink_filter_all(&self) -> String {
        format!("{}/up/+/+", self.base)
    }

    /// The filters a node subscribes to on connect: its own topic, the fleet topic and the
    /// fleet-wide spec topics. Add [`Topics::group_filter`] for each of its groups.
    pub fn node_filters(&self, node: &NodeName) -> [String; 3] {
        [self.downlink(&Destination::Node(node.clone())), self.downlink(&Destination::Fleet), self.spec_filter()]
    }

    /// The filter matching every fleet-wide spec topic: `{base}/down/spec/+/+`.
    pub fn spec_filter(&self) -> String {
        format!("{}/down/spec/+/+", self.base)
    }

    /// The filter matching every group's spec topics: `{base}/down/group/+/spec/+/+`.
    pub fn group_spec_filter(&self) -> String {
        format!("{}/down/group/+/spec/+/+", self.base)
    }

    /// The filter a node subscribes to for one group: `{base}/down/group/{group}/#`, which covers the
    /// group topic itself and the group's spec topics.
    pub fn group_filter(&self, group: &GroupName) -> String {
        format!("{}/down/group/{group}/#", self.base)
    }

    /// A Mosquitto `acl_file` granting each node exactly the topics of this layout.
    ///
    /// Assumes every node connects with **MQTT user name = node name** (per-node credentials in the
    /// broker's password file or auth plugin); the client id should be the node name too, so a second
    /// connection of a node takes the first one over. A node may publish only on
    /// `{base}/up/{itself}/{kind}` and read only its own node topic, the fleet topic, the spec
    /// topics and the group topics. Group membership is not an access boundary (the broker cannot
    /// know a node's groups): deliver confidential specs per node. `controller_user` may read and
    /// write everything under the base; it must not be the name of a node.
    pub fn mosquitto_acl(&self, controller_user: &str) -> Result<String, TopicError> {
        check_name("controller user name", controller_user)?;
        let b = &self.base;
        Ok(format!(
            "# kole ACL for fleet {fleet:?} (Mosquitto acl_file). Generated by kole-mqtt; see docs/protocol.md.\n\
             # Assumes MQTT user name = node name; pattern lines apply to every client.\n\
             pattern write {b}/up/%u/+\n\
             pattern read {b}/down/node/%u\n\
             pattern read {b}/down/all\n\
             pattern read {b}/down/spec/#\n\
             pattern read {b}/down/group/#\n\
             \n\
             # The controller reads and writes the whole fleet.\n\
             user {controller_user}\n\
             topic readwrite {b}/#\n",
            fleet = self.fleet(),
        ))
    }

    /// An EMQX (5.x) file-based authorization `acl.conf` granting each node exactly the topics of
    /// this layout, with the same rules and the same assumption (user name = node name) as
    /// [`Topics::mosquitto_acl`]. Rules are matched top to bottom; the last one denies the rest.
    pub fn emqx_acl(&self, controller_user: &str) -> Result<String, TopicError> {
        check_name("controller user name", controller_user)?;
        let b = &self.base;
        Ok(format!(
            "%% kole ACL for fleet {fleet:?} (EMQX acl.conf). Generated by kole-mqtt; see docs/protocol.md.\n\
             %% Assumes MQTT user name = node name.\n\
             {{allow, {{username, \"{controller_user}\"}}, all, [\"{b}/#\"]}}.\n\
             {{deny, all, subscribe, [\"$SYS/#\", {{eq, \"#\"}}, {{eq, \"+/#\"}}]}}.\n\
             {{allow, all, publish, [\"{b}/up/${{username}}/+\"]}}.\n\
             {{allow, all, subscribe, [\"{b}/down/node/${{username}}\", \"{b}/down/all\", \"{b}/down/spec/#\", \"{b}/down/group/#\"]}}.\n\
             {{deny, all}}.\n",
            fleet = self.fleet(),
        ))
    }

    fn strip_base<'t>(&self, topic: &'t str) -> Result<&'t str, TopicError> {
        topic
            .strip_prefix(self.base.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| TopicError::ForeignTopic { topic: truncate_for_error(topic), base: self.base.clone() })
    }
}

/// The two topic levels of a workload id: `ns/name`, or `_/name` without a namespace.
struct SpecLevels<'a>(&'a WorkloadId);

impl fmt::Display for SpecLevels<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.0.as_str();
        if id.contains('/') { f.write_str(id) } else { write!(f, "_/{id}") }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    // The valid-by-construction names of kole-core's protocol strategies (test builds only there).
    const NAME: &str = "[A-Za-z0-9]([A-Za-z0-9._-]{0,40}[A-Za-z0-9])?";
    const SEGMENT: &str = "[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?";

    fn node_name() -> impl Strategy<Value = NodeName> {
        prop_oneof![
            9 => NAME.prop_map(|s| NodeName::new(s).unwrap()),
            1 => "[a-z0-9]{128}".prop_map(|s| NodeName::new(s).unwrap()),
        ]
    }

    fn group_name() -> impl Strategy<Value = GroupName> {
        NAME.prop_map(|s| GroupName::new(s).unwrap())
    }

    fn workload_id() -> impl Strategy<Value = WorkloadId> {
        (SEGMENT, proptest::option::of(SEGMENT)).prop_map(|(a, b)| match b {
            Some(b) => WorkloadId::new(format!("{a}/{b}")).unwrap(),
            None => WorkloadId::new(a).unwrap(),
        })
    }

    fn topics() -> Topics {
        Topics::new("prod-eu").unwrap()
    }

    fn node(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    #[test]
    fn renders_the_documented_layout() {
        let t = topics();
        let a = node("edge-a");
        assert_eq!(t.base(), "kole/v1/prod-eu");
        assert_eq!(t.prefix(), "kole/v1");
        assert_eq!(t.fleet(), "prod-eu");
        assert_eq!(t.uplink(&a, UplinkKind::Heartbeat), "kole/v1/prod-eu/up/edge-a/hb");
        assert_eq!(t.uplink(&a, UplinkKind::Register), "kole/v1/prod-eu/up/edge-a/register");
        assert_eq!(t.uplink(&a, UplinkKind::Status), "kole/v1/prod-eu/up/edge-a/status");
        assert_eq!(t.downlink(&Destination::Node(a.clone())), "kole/v1/prod-eu/down/node/edge-a");
        assert_eq!(t.downlink(&Destination::Fleet), "kole/v1/prod-eu/down/all");
        let g = GroupName::new("site-17").unwrap();
        assert_eq!(t.downlink(&Destination::Group(g.clone())), "kole/v1/prod-eu/down/group/site-17");
        let ns = WorkloadId::new("default/cdn").unwrap();
        let bare = WorkloadId::new("logs").unwrap();
        assert_eq!(t.downlink(&Destination::WorkloadSpec(ns.clone())), "kole/v1/prod-eu/down/spec/default/cdn");
        assert_eq!(t.downlink(&Destination::WorkloadSpec(bare)), "kole/v1/prod-eu/down/spec/_/logs");
        assert_eq!(
            t.downlink(&Destination::GroupWorkloadSpec(g.clone(), ns)),
            "kole/v1/prod-eu/down/group/site-17/spec/default/cdn"
        );
        assert_eq!(t.uplink_filter(UplinkKind::Heartbeat), "kole/v1/prod-eu/up/+/hb");
        assert_eq!(t.uplink_filter_all(), "kole/v1/prod-eu/up/+/+");
        assert_eq!(
            t.node_filters(&a),
            ["kole/v1/prod-eu/down/node/edge-a", "kole/v1/prod-eu/down/all", "kole/v1/prod-eu/down/spec/+/+"]
        );
        assert_eq!(t.group_filter(&g), "kole/v1/prod-eu/down/group/site-17/#");
    }

    #[test]
    fn custom_prefix_and_invalid_names() {
        let t = Topics::with_prefix("acme/edge/kole-v1", "f1").unwrap();
        assert_eq!(t.prefix(), "acme/edge/kole-v1");
        assert_eq!(t.fleet(), "f1");
        for (prefix, fleet) in [
            ("", "f"),
            ("kole//v1", "f"),
            ("kole/+", "f"),
            ("kole/v1", "a/b"),
            ("kole/v1", "#"),
            ("$SYS", "f"),
            ("kole/v1", ""),
        ] {
            assert!(Topics::with_prefix(prefix, fleet).is_err(), "{prefix:?} {fleet:?}");
        }
        for g in ["", "a/b", "+", "#", "-x", "a b"] {
            assert!(GroupName::new(g).is_err(), "{g:?}");
        }
    }

    #[test]
    fn uplink_parse_rejects_everything_off_layout() {
        let t = topics();
        assert_eq!(t.parse_uplink("kole/v1/prod-eu/up/edge-a/hb").unwrap(), (node("edge-a"), UplinkKind::Heartbeat));
        let cases = [
            ("kole/v1/prod-us/up/edge-a/hb", "foreign"),
            ("kole/v1/prod-eu", "foreign"),
            ("kole/v1/prod-eux/up/edge-a/hb", "foreign"),
            ("kole/v2/prod-eu/up/edge-a/hb", "foreign"),
            ("kole/v1/prod-eu/down/node/edge-a", "malformed"),
            ("kole/v1/prod-eu/up/edge-a", "malformed"),
            ("kole/v1/prod-eu/up/edge-a/hb/extra", "malformed"),
            ("kole/v1/prod-eu/up/edge-a/heartbeat", "malformed"),
            ("kole/v1/prod-eu/up/edge-a/", "malformed"),
            ("kole/v1/prod-eu/up/+/hb", "node"),
            ("kole/v1/prod-eu/up/#/hb", "node"),
            ("kole/v1/prod-eu/up//hb", "node"),
            ("kole/v1/prod-eu/up/$sys/hb", "node"),
            ("kole/v1/prod-eu/up/-a/hb", "node"),
        ];
        for (topic, want) in cases {
            let got = t.parse_uplink(topic).unwrap_err();
            let ok = matches!(
                (&got, want),
                (TopicError::ForeignTopic { .. }, "foreign")
                    | (TopicError::Malformed { .. }, "malformed")
                    | (TopicError::InvalidNode { .. }, "node")
            );
            assert!(ok, "{topic:?}: {got:?}, wanted {want}");
        }
    }

    #[test]
    fn downlink_parse_rejects_everything_off_layout() {
        let t = topics();
        for bad in [
            "kole/v1/prod-eu/down",
            "kole/v1/prod-eu/down/",
            "kole/v1/prod-eu/down/all/x",
            "kole/v1/prod-eu/down/node",
            "kole/v1/prod-eu/down/node/a/b",
            "kole/v1/prod-eu/down/spec/a",
            "kole/v1/prod-eu/down/spec/a/b/c",
            "kole/v1/prod-eu/down/spec/_/_",
            "kole/v1/prod-eu/down/spec/+/+",
            "kole/v1/prod-eu/down/group/g/x/a/b",
            "kole/v1/prod-eu/down/group/g/spec/a/b/c",
            "kole/v1/prod-eu/down/group/#",
            "kole/v1/prod-eu/up/a/hb",
        ] {
            assert!(t.parse_downlink(bad).is_err(), "{bad:?}");
        }
    }

    /// A minimal MQTT topic-filter matcher (`+` one level, `#` the rest, including the parent).
    fn filter_matches(filter: &str, topic: &str) -> bool {
        let mut f = filter.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Access {
        Read,
        Write,
    }

    /// Interprets a Mosquitto acl_file the way mosquitto does for `pattern`, `user` and `topic` lines.
    fn mosquitto_allows(acl: &str, user: &str, access: Access, topic: &str) -> bool {
        let mut current_user: Option<&str> = None;
        for line in acl.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (perm, filter) = match words.as_slice() {
                ["user", u] => {
                    current_user = Some(u);
                    continue;
                }
                ["pattern", perm, filter] => (*perm, filter.replace("%u", user)),
                ["topic", perm, filter] if current_user == Some(user) => (*perm, (*filter).to_owned()),
                ["topic", ..] => continue,
                other => panic!("unexpected acl line {other:?}"),
            };
            let grants = match perm {
                "read" => access == Access::Read,
                "write" => access == Access::Write,
                "readwrite" => true,
                other => panic!("unexpected permission {other:?}"),
            };
            if grants && filter_matches(&filter, topic) {
                return true;
            }
        }
        false
    }

    #[test]
    fn mosquitto_acl_confines_each_node_to_its_own_topics() {
        let t = topics();
        let acl = t.mosquitto_acl("kole-controller").unwrap();
        let (a, b) = (node("edge-a"), node("edge-b"));
        for kind in UplinkKind::ALL {
            assert!(mosquitto_allows(&acl, "edge-a", Access::Write, &t.uplink(&a, kind)));
            assert!(!mosquitto_allows(&acl, "edge-a", Access::Write, &t.uplink(&b, kind)), "A must not publish as B");
            assert!(!mosquitto_allows(&acl, "edge-a", Access::Read, &t.uplink(&b, kind)), "A must not read B's uplink");
        }
        assert!(mosquitto_allows(&acl, "edge-a", Access::Read, &t.downlink(&Destination::Node(a.clone()))));
        assert!(!mosquitto_allows(&acl, "edge-a", Access::Read, &t.downlink(&Destination::Node(b.clone()))));
        assert!(!mosquitto_allows(&acl, "edge-a", Access::Write, &t.downlink(&Destination::Node(a.clone()))));
        let g = GroupName::new("site-1").unwrap();
        let id = WorkloadId::new("default/app").unwrap();
        for d in [
            Destination::Fleet,
            Destination::Group(g.clone()),
            Destination::WorkloadSpec(id.clone()),
            Destination::GroupWorkloadSpec(g, id),
        ] {
            let topic = t.downlink(&d);
            assert!(mosquitto_allows(&acl, "edge-a", Access::Read, &topic), "{topic}");
            assert!(!mosquitto_allows(&acl, "edge-a", Access::Write, &topic), "{topic}");
            assert!(mosquitto_allows(&acl, "kole-controller", Access::Write, &topic), "{topic}");
        }
        // Nothing outside the fleet, for anyone.
        assert!(!mosquitto_allows(&acl, "edge-a", Access::Write, "kole/v1/other/up/edge-a/hb"));
        assert!(!mosquitto_allows(&acl, "kole-controller", Access::Read, "kole/v1/other/up/edge-a/hb"));
        assert!(mosquitto_allows(&acl, "kole-controller", Access::Read, &t.uplink(&b, UplinkKind::Heartbeat)));
        assert!(t.mosquitto_acl("bad user").is_err());
    }

    #[test]
    fn emqx_acl_has_the_same_rules() {
        let acl = topics().emqx_acl("kole-controller").unwrap();
        assert!(acl.contains(r#"{allow, {username, "kole-controller"}, all, ["kole/v1/prod-eu/#"]}."#), "{acl}");
        assert!(acl.contains(r#"{allow, all, publish, ["kole/v1/prod-eu/up/${username}/+"]}."#), "{acl}");
        assert!(acl.contains(r#""kole/v1/prod-eu/down/node/${username}""#), "{acl}");
        assert!(acl.trim_end().ends_with("{deny, all}."), "{acl}");
        assert!(topics().emqx_acl("\"}").is_err());
    }

    fn destination() -> impl Strategy<Value = Destination> {
        prop_oneof![
            node_name().prop_map(Destination::Node),
            group_name().prop_map(Destination::Group),
            Just(Destination::Fleet),
            workload_id().prop_map(Destination::WorkloadSpec),
            (group_name(), workload_id()).prop_map(|(g, id)| Destination::GroupWorkloadSpec(g, id)),
        ]
    }

    proptest! {
        #[test]
        fn uplink_topics_round_trip(node in node_name(), kind in prop::sample::select(UplinkKind::ALL.to_vec())) {
            let t = topics();
            let topic = t.uplink(&node, kind);
            prop_assert_eq!(t.parse_uplink(&topic).unwrap(), (node, kind));
            prop_assert!(t.parse_downlink(&topic).is_err());
        }

        #[test]
        fn downlink_topics_round_trip(d in destination()) {
            let t = topics();
            let topic = t.downlink(&d);
            prop_assert_eq!(t.parse_downlink(&topic).unwrap(), d);
            prop_assert!(t.parse_uplink(&topic).is_err());
        }

        #[test]
        fn parsing_arbitrary_strings_never_panics(s in ".{0,200}") {
            let t = topics();
            let _ = t.parse_uplink(&s);
            let _ = t.parse_downlink(&s);
            let under = format!("kole/v1/prod-eu/{s}");
            let _ = t.parse_uplink(&under);
            let _ = t.parse_downlink(&under);
        }

        #[test]
        fn parsing_level_soup_never_panics(levels in prop::collection::vec(
            prop_oneof![Just("up"), Just("down"), Just("node"), Just("group"), Just("spec"), Just("all"), Just("_"),
                        Just("hb"), Just("+"), Just("#"), Just(""), Just("a"), Just("$x")], 0..8)) {
            let t = topics();
            let topic = format!("kole/v1/prod-eu/{}", levels.join("/"));
            if let Ok((node, kind)) = t.parse_uplink(&topic) {
                prop_assert_eq!(t.uplink(&node, kind), topic.clone());
            }
            if let Ok(d) = t.parse_downlink(&topic) {
                prop_assert_eq!(t.downlink(&d), topic);
            }
        }
    }
}
