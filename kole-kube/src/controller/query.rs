//! The node query controller: `NodeQuery` answers from the cache, deleted after their TTL.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kole_core::cache::{CacheQuery, CacheStore, NodeCache, StateCache};
use kole_core::model::{NodeName, NodePhase, Timestamp};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};

use super::{ControllerConfig, api, now};
use crate::convert::{self, node_item, rfc3339};
use crate::crd::{NodeQuery, NodeQueryStatus, QuerySummary};
use crate::{Error, Result};

struct QueryCtx {
    client: Client,
    cache: CacheStore<NodeCache>,
}

/// Answers one query from the cache (pure: no I/O), for the controller and for tests.
pub fn answer_query(cache: &dyn StateCache, spec: &crate::crd::NodeQuerySpec, at: Timestamp) -> NodeQueryStatus {
    let mut status = NodeQueryStatus { answered_at: Some(rfc3339(at)), ..Default::default() };
    let names: std::result::Result<Vec<NodeName>, _> = spec.names.iter().map(|n| NodeName::new(n.clone())).collect();
    let selector = spec.selector.as_ref().map(convert::selector).transpose();
    let continue_after = spec.continue_.as_deref().map(str::parse::<u32>).transpose();
    match (names, selector, continue_after) {
        (Ok(names), Ok(selector), Ok(continue_after)) => {
            let q = CacheQuery {
                names,
                selector: selector.unwrap_or_default(),
                phase: spec.phase.map(convert::node_phase),
                health: spec.health.map(convert::health_filter).unwrap_or_default(),
                limit: spec.limit.clamp(1, 1000) as usize,
                continue_after,
            };
            let page = cache.query(&q);
            status.items = page.items.iter().map(node_item).collect();
            status.returned = u32::try_from(status.items.len()).unwrap_or(u32::MAX);
            status.summary = QuerySummary {
                matched: page.counts.total(),
                online: u64::from(page.counts.get(NodePhase::Online)),
                offline: u64::from(page.counts.get(NodePhase::Offline)),
                registering: u64::from(page.counts.get(NodePhase::Registering)),
            };
            status.continue_ = page.continue_after.map(|c| c.to_string());
        }
        (Err(e), _, _) => status.error = Some(format!("spec.names: {e}")),
        (_, Err(e), _) => status.error = Some(format!("spec.selector: {e}")),
        (_, _, Err(e)) => status.error = Some(format!("spec.continue: {e}")),
    }
    status
}

async fn reconcile_query(obj: Arc<NodeQuery>, ctx: Arc<QueryCtx>) -> Result<Action> {
    let ns = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let api: Api<NodeQuery> = Api::namespaced(ctx.client.clone(), &ns);
    let t = now();
    let created_ms = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(t.as_millis(), |c| u64::try_from(c.0.as_millisecond()).unwrap_or(0));
    let expires_ms = created_ms.saturating_add(u64::from(obj.spec.ttl_seconds) * 1000);
    if t.as_millis() >= expires_ms {
        api.delete(&name, &Default::default())
            .await
            .map_err(|source| Error::Kube { op: format!("delete expired NodeQuery {ns}/{name}"), source })?;
        return Ok(Action::await_change());
    }
    let answered = obj.status.as_ref().is_some_and(|s| {
        s.observed_generation == obj.metadata.generation
            && s.observed_refresh == obj.spec.refresh
            && s.answered_at.is_some()
    });
    if !answered {
        let mut status = {
            let cache = ctx.cache.read();
            answer_query(&*cache, &obj.spec, t)
        };
        status.observed_generation = obj.metadata.generation;
        status.observed_refresh = obj.spec.refresh.clone();
        // Replace the whole status (a merge patch would keep items of a previous, longer page).
        let mut body = (*obj).clone();
        body.status = Some(status);
        body.metadata.managed_fields = None;
        api.replace_status(&name, &Default::default(), &body)
            .await
            .map_err(|source| Error::Kube { op: format!("write status of NodeQuery {ns}/{name}"), source })?;
    }
    let left = Duration::from_millis(expires_ms.saturating_sub(t.as_millis()));
    Ok(Action::requeue(left.max(Duration::from_millis(100))))
}

/// Runs the node query controller until `shutdown` resolves, answering from `cache`.
pub async fn run_query_controller(
    client: Client,
    cfg: ControllerConfig,
    cache: CacheStore<NodeCache>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<NodeQuery> = api(&client, cfg.namespace.as_deref());
    let requeue = cfg.error_requeue;
    let ctx = Arc::new(QueryCtx { client, cache });
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            reconcile_query,
            move |obj, err, _| {
                tracing::warn!(object = %obj.name_any(), error = %err, "NodeQuery reconcile failed");
                Action::requeue(requeue)
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_answer_from_the_cache_with_pages_and_summary() {
        use kole_core::model::{DesiredDigest, Labels, NodeInfo, NodeRegistration};
        let mut cache = NodeCache::new();
        for i in 0..10u32 {
            let reg = NodeRegistration {
                name: NodeName::new(format!("n{i}")).unwrap(),
                labels: Labels::from_pairs([("tier", if i % 2 == 0 { "cdn" } else { "pos" })]).unwrap(),
                info: NodeInfo::default(),
                applied: DesiredDigest::EMPTY,
                workloads: vec![],
            };
            cache.register(&reg, 1, Timestamp::from_secs(100)).unwrap();
        }
        cache.set_phase("n0", NodePhase::Offline).unwrap();
        let spec = crate::crd::NodeQuerySpec {
            names: vec![],
            selector: Some(crate::crd::SelectorSpec {
                match_labels: [("tier".to_owned(), "cdn".to_owned())].into(),
                ..Default::default()
            }),
            phase: None,
            health: None,
            limit: 2,
            continue_: None,
            ttl_seconds: 60,
            refresh: None,
        };
        let a = answer_query(&cache, &spec, Timestamp::from_secs(200));
        assert_eq!(a.summary, QuerySummary { matched: 5, online: 4, offline: 1, registering: 0 });
        assert_eq!(a.returned, 2);
        assert_eq!(a.answered_at.as_deref(), Some("1970-01-01T00:03:20Z"));
        let mut next = spec.clone();
        next.continue_ = a.continue_.clone();
        let b = answer_query(&cache, &next, Timestamp::from_secs(200));
        assert!(b.items.iter().all(|i| !a.items.contains(i)));
        let mut bad = spec;
        bad.selector = Some(crate::crd::SelectorSpec {
            match_labels: [("bad key!".to_owned(), "x".to_owned())].into(),
            ..Default::default()
        });
        assert!(answer_query(&cache, &bad, Timestamp::from_secs(200)).error.unwrap().contains("spec.selector"));

        // Health: the flags of each node's last heartbeat filter the items and show on them.
        use kole_core::cache::HeartbeatUpdate;
        use kole_core::model::NodeHealth;
        let flagged = NodeHealth::WORKLOAD_FAILED.with(NodeHealth::CLOCK_UNSYNCED);
        for (n, health) in [("n2", flagged), ("n4", NodeHealth::OK), ("n3", NodeHealth::DEGRADED)] {
            let hb = HeartbeatUpdate { boot_id: 1, seq: 1, applied: DesiredDigest::EMPTY, health: Some(health) };
            cache.heartbeat(n, &hb, Timestamp::from_secs(150)).unwrap();
        }
        let mut failed = bad;
        failed.selector = None;
        failed.limit = 100;
        failed.health = Some(crate::crd::NodeHealthSpec::WorkloadFailed);
        let a = answer_query(&cache, &failed, Timestamp::from_secs(200));
        assert_eq!(
            a.items.iter().map(|i| (i.name.as_str(), i.health.clone())).collect::<Vec<_>>(),
            [("n2", vec!["WorkloadFailed".to_owned(), "ClockUnsynced".to_owned()])]
        );
        assert_eq!(a.summary.matched, 10, "the summary counts every node the names and selector match");
        failed.health = Some(crate::crd::NodeHealthSpec::Unhealthy);
        let names: Vec<String> =
            answer_query(&cache, &failed, Timestamp::from_secs(200)).items.into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["n2", "n3"]);
        failed.health = Some(crate::crd::NodeHealthSpec::Healthy);
        assert_eq!(answer_query(&cache, &failed, Timestamp::from_secs(200)).returned, 8);
    }
}
