//! Query parameters of list and watch requests: selectors, pages, watch options.

use std::time::Duration;

use base64::Engine as _;
use kole_core::cache::{CacheQuery, NodeCache, StateCache};
use kole_core::model::{LabelLookup, NodePhase, NodeRecord, Selector};
use serde::{Deserialize, Serialize};

use crate::convert::phase_name;

/// A field a field selector may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    Name,
    Phase,
    Arch,
    Os,
    AgentVersion,
}

/// The fields `fieldSelector` supports, as named in errors.
pub(crate) const FIELDS: &str = "metadata.name, status.phase, status.arch, status.os, status.agentVersion";

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldReq {
    field: Field,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`: requirements joined by `,` (all must hold), each `f=v`, `f==v` or
/// `f!=v`, as Kubernetes' field selectors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    reqs: Vec<FieldReq>,
}

impl FieldSelector {
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid field selector {part:?}: expected FIELD=VALUE, FIELD==VALUE or FIELD!=VALUE"
                ));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "status.phase" => Field::Phase,
                "status.arch" => Field::Arch,
                "status.os" => Field::Os,
                "status.agentVersion" => Field::AgentVersion,
                other => return Err(format!("field label not supported: {other} (supported: {FIELDS})")),
            };
            let value = value.trim().to_owned();
            if field == Field::Phase && phase(&value).is_none() {
                return Err(format!("status.phase: unknown phase {value:?} (Registering, Online or Offline)"));
            }
            reqs.push(FieldReq { field, value, equal });
        }
        Ok(Self { reqs })
    }

    /// The single name asked for with `metadata.name=NAME`, if any.
    pub(crate) fn name(&self) -> Option<&str> {
        self.reqs.iter().find(|r| r.field == Field::Name && r.equal).map(|r| r.value.as_str())
    }

    /// The phase asked for with `status.phase=PHASE`, if any (pushed down into the cache's scan).
    pub(crate) fn phase(&self) -> Option<NodePhase> {
        self.reqs.iter().find(|r| r.field == Field::Phase && r.equal).and_then(|r| phase(&r.value))
    }

    pub(crate) fn matches(&self, r: &NodeRecord) -> bool {
        self.matches_with(r.name.as_str(), r.phase, Some(r))
    }

    /// Whether a state matches, where the platform fields may be unknown (then they match).
    pub(crate) fn matches_with(&self, name: &str, node_phase: NodePhase, platform: Option<&NodeRecord>) -> bool {
        self.reqs.iter().all(|q| {
            let actual = match q.field {
                Field::Name => name,
                Field::Phase => phase_name(node_phase),
                Field::Arch => match platform {
                    Some(r) => r.info.arch.as_str(),
                    None => return true,
                },
                Field::Os => match platform {
                    Some(r) => r.info.os.as_str(),
                    None => return true,
                },
                Field::AgentVersion => match platform {
                    Some(r) => r.info.agent_version.as_str(),
                    None => return true,
                },
            };
            (actual == q.value) == q.equal
        })
    }
}

/// A phase from its Kubernetes spelling.
fn phase(s: &str) -> Option<NodePhase> {
    NodePhase::ALL.into_iter().find(|p| phase_name(*p) == s)
}

/// Where a paged list resumes: the served cache (its epoch) and the last slot returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ContinueToken {
    /// Token format.
    v: u8,
    /// The source epoch (a standby's reload or a change of role invalidates the token).
    pub(crate) e: u64,
    /// The last slot returned.
    pub(crate) s: u32,
    /// The list's resourceVersion (kept so pages report the first page's).
    pub(crate) rv: u64,
}

impl ContinueToken {
    pub(crate) fn new(epoch: u64, slot: u32, rv: u64) -> Self {
        Self { v: 1, e: epoch, s: slot, rv }
    }

    pub(crate) fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(self).unwrap_or_default())
    }

    pub(crate) fn decode(s: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(|_| "continue: not a token this server issued".to_owned())?;
        let t: Self =
            serde_json::from_slice(&bytes).map_err(|_| "continue: not a token this server issued".to_owned())?;
        if t.v != 1 {
            return Err(format!("continue: token version {} is not supported", t.v));
        }
        Ok(t)
    }
}

/// What a list or watch request asks for.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListOptions {
    pub(crate) labels: Selector,
    pub(crate) fields: FieldSelector,
    pub(crate) limit: Option<usize>,
    pub(crate) continue_: Option<ContinueToken>,
    pub(crate) watch: bool,
    pub(crate) resource_version: Option<String>,
    pub(crate) bookmarks: bool,
    pub(crate) timeout: Option<Duration>,
}

impl ListOptions {
    /// Parses a query string; an error says which parameter and why.
    pub(crate) fn parse(query: &str) -> Result<Self, String> {
        let mut o = Self::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "labelSelector" => o.labels = Selector::parse(&v).map_err(|e| format!("labelSelector: {e}"))?,
                "fieldSelector" => o.fields = FieldSelector::parse(&v)?,
                "limit" => {
                    let n: i64 = v.parse().map_err(|_| format!("limit: {v:?} is not an integer"))?;
                    o.limit = (n > 0).then_some(n as usize);
                }
                "continue" if !v.is_empty() => o.continue_ = Some(ContinueToken::decode(&v)?),
                "watch" => o.watch = v == "true" || v == "1",
                "resourceVersion" if !v.is_empty() => o.resource_version = Some(v.into_owned()),
                "allowWatchBookmarks" => o.bookmarks = v == "true" || v == "1",
                "timeoutSeconds" => {
                    let n: u64 = v.parse().map_err(|_| format!("timeoutSeconds: {v:?} is not a whole number"))?;
                    o.timeout = Some(Duration::from_secs(n));
                }
                // resourceVersionMatch, includeObject, pretty, sendInitialEvents...: accepted, no effect.
                _ => {}
            }
        }
        Ok(o)
    }

    /// Whether a node passes both selectors.
    pub(crate) fn matches(&self, r: &NodeRecord) -> bool {
        self.labels.matches(&r.labels) && self.fields.matches(r)
    }

    /// Whether labels and fields of a past state pass, where unknown parts match.
    pub(crate) fn matches_old(
        &self,
        name: &str,
        phase: NodePhase,
        labels: Option<&dyn LabelLookupDyn>,
        platform: Option<&NodeRecord>,
    ) -> bool {
        labels.is_none_or(|l| self.labels.matches(&DynLabels(l))) && self.fields.matches_with(name, phase, platform)
    }
}

/// Object-safe label lookup, for old label sets of either representation.
pub(crate) trait LabelLookupDyn {
    fn get(&self, key: &str) -> Option<&str>;
}

impl<T: LabelLookup> LabelLookupDyn for T {
    fn get(&self, key: &str) -> Option<&str> {
        self.label(key)
    }
}

struct DynLabels<'a>(&'a dyn LabelLookupDyn);

impl LabelLookup for DynLabels<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }
}

/// One page of a list: the matching nodes after `opts.continue_`, and the last slot returned when
/// more may follow.
pub(crate) fn list_page(cache: &NodeCache, opts: &ListOptions) -> (Vec<NodeRecord>, Option<u32>) {
    let limit = opts.limit.unwrap_or(usize::MAX);
    if let Some(name) = opts.fields.name() {
        let item = cache.get(name).filter(|r| opts.matches(r));
        return (item.into_iter().collect(), None);
    }
    let mut items = Vec::new();
    let mut after = opts.continue_.map(|c| c.s);
    loop {
        let want = (limit - items.len()).min(10_000);
        let q = CacheQuery {
            selector: opts.labels.clone(),
            phase: opts.fields.phase(),
            limit: want,
            continue_after: after,
            ..CacheQuery::default()
        };
        let page = cache.query(&q);
        items.extend(page.items.into_iter().filter(|r| opts.fields.matches(r)));
        match page.continue_after {
            Some(c) => after = Some(c),
            None => return (items, None),
        }
        if items.len() >= limit {
            return (items, after);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn field_selectors_parse_and_refuse_clearly() {
        let f = FieldSelector::parse("status.phase=Offline,metadata.name!=a").unwrap();
        assert_eq!(f.phase(), Some(NodePhase::Offline));
        assert_eq!(f.name(), None);
        assert!(FieldSelector::parse("spec.x=1").unwrap_err().contains("field label not supported: spec.x"));
        assert!(FieldSelector::parse("status.phase=offline").unwrap_err().contains("unknown phase"));
        assert!(FieldSelector::parse("status.phase").unwrap_err().contains("FIELD=VALUE"));
        assert_eq!(FieldSelector::parse("").unwrap(), FieldSelector::default());
    }

    #[test]
    fn continue_tokens_round_trip_and_refuse_foreign_input() {
        let t = ContinueToken::new(7, 12_345, 99);
        assert_eq!(ContinueToken::decode(&t.encode()).unwrap(), t);
        assert!(ContinueToken::decode("not a token").is_err());
        assert!(ContinueToken::decode("eyJ2IjoyLCJlIjoxLCJzIjoxLCJydiI6MX0").unwrap_err().contains("version 2"));
    }

    proptest! {
        // Every query string decodes to options or a clear error, never a panic.
        #[test]
        fn any_query_string_parses_or_errs(q in ".{0,200}") {
            let _ = ListOptions::parse(&q);
        }

        #[test]
        fn any_continue_token_decodes_or_errs(s in "[A-Za-z0-9_=-]{0,120}") {
            let _ = ContinueToken::decode(&s);
        }

        #[test]
        fn any_field_selector_parses_or_errs(s in "[a-zA-Z.=!, ]{0,80}") {
            let _ = FieldSelector::parse(&s);
        }
    }
}
