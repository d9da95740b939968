//! The JSON a client sees: `EdgeNode`, `EdgeNodeList`, `Table` and `Status`.

use kole_core::model::{NodeRecord, Timestamp, WorkloadPhase};
use serde_json::{Value, json};

use super::{GROUP, KIND, VERSION};
use crate::convert::{node_item, phase_name};

pub(crate) fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

/// Workloads running and reported on the node.
pub(crate) fn workload_counts(r: &NodeRecord) -> (usize, usize) {
    (r.workloads.iter().filter(|w| w.phase == WorkloadPhase::Running).count(), r.workloads.len())
}

/// `arch/os`, the platform column and field.
pub(crate) fn platform(r: &NodeRecord) -> String {
    match (r.info.arch.as_str(), r.info.os.as_str()) {
        ("", "") => "<unknown>".to_owned(),
        (arch, os) => format!("{arch}/{os}"),
    }
}

/// One node as an `EdgeNode` object.
pub(crate) fn edge_node(r: &NodeRecord, rv: u64) -> Value {
    let item = node_item(r);
    let (ready, total) = workload_counts(r);
    json!({
        "apiVersion": api_version(),
        "kind": KIND,
        "metadata": {
            "name": item.name,
            "labels": item.labels,
            "resourceVersion": rv.to_string(),
        },
        "status": {
            "phase": item.phase,
            "lastSeen": item.last_seen,
            "arch": item.arch,
            "os": item.os,
            "agentVersion": item.agent_version,
            "addresses": item.addresses,
            "health": item.health,
            "appliedDigest": format!("{:016x}", r.applied.0),
            "workloadsReady": ready,
            "workloadsTotal": total,
            "workloads": item.workloads,
        },
    })
}

/// A deleted node, when only its name is known.
pub(crate) fn deleted_stub(name: &str, rv: u64) -> Value {
    json!({
        "apiVersion": api_version(),
        "kind": KIND,
        "metadata": { "name": name, "resourceVersion": rv.to_string() },
    })
}

pub(crate) fn list_meta(rv: u64, continue_: Option<&str>) -> Value {
    let mut m = json!({ "resourceVersion": rv.to_string() });
    if let Some(c) = continue_ {
        m["continue"] = Value::String(c.to_owned());
    }
    m
}

pub(crate) fn list(items: Vec<Value>, rv: u64, continue_: Option<&str>) -> Value {
    json!({ "apiVersion": api_version(), "kind": "EdgeNodeList", "metadata": list_meta(rv, continue_), "items": items })
}

/// `kubectl get` columns; priority 1 shows with `-o wide`.
pub(crate) fn column_definitions() -> Value {
    let col = |name: &str, ty: &str, priority: u8, description: &str| json!({ "name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "priority": priority, "description": description });
    json!([
        col("Name", "string", 0, "The node's name (its MQTT identity)."),
        col("Phase", "string", 0, "Registering, Online or Offline."),
        col("Last Seen", "string", 0, "Time since the controller last heard from the node."),
        col("Workloads", "string", 0, "Workloads running / workloads the node reports."),
        col("Platform", "string", 0, "CPU architecture / operating system."),
        col("Agent", "string", 1, "Agent version."),
        col("Addresses", "string", 1, "Addresses the node reported, primary first."),
        col("Health", "string", 1, "Health flags of the last heartbeat; empty when healthy."),
    ])
}

/// One `Table` row, with the object's metadata (`includeObject=Metadata`, the default) so
/// `--show-labels` and `-L` work.
pub(crate) fn row(r: &NodeRecord, rv: u64, now: Timestamp) -> Value {
    let (ready, total) = workload_counts(r);
    let since = now.as_millis().saturating_sub(r.last_seen.as_millis()) / 1000;
    let health = r.health.names().join(",");
    json!({
        "cells": [
            r.name.as_str(),
            phase_name(r.phase),
            format!("{} ago", human_duration(since)),
            format!("{ready}/{total}"),
            platform(r),
            r.info.agent_version,
            r.info.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            if health.is_empty() { "<none>".to_owned() } else { health },
        ],
        "object": {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": {
                "name": r.name.as_str(),
                "labels": r.labels.iter().map(|(k, v)| (k.to_owned(), Value::String(v.to_owned()))).collect::<serde_json::Map<_, _>>(),
                "resourceVersion": rv.to_string(),
            },
        },
    })
}

pub(crate) fn table(rows: Vec<Value>, rv: u64, continue_: Option<&str>, with_columns: bool) -> Value {
    let mut t =
        json!({ "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta(rv, continue_), "rows": rows });
    if with_columns {
        t["columnDefinitions"] = column_definitions();
    }
    t
}

/// A `Status` (the body of every error, as Kubernetes writes it).
pub(crate) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// Kubernetes' short durations (`kubectl`'s AGE style): `42s`, `3m12s`, `5h`, `3d4h`.
pub(crate) fn human_duration(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => {
            if s % 60 == 0 {
                format!("{m}m")
            } else {
                format!("{m}m{}s", s % 60)
            }
        }
        s if s < 3 * 3600 => format!("{m}m"),
        s if s < 8 * 3600 => {
            if m % 60 == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{}m", m % 60)
            }
        }
        s if s < 48 * 3600 => format!("{h}h"),
        s if s < 8 * 86_400 => {
            if h % 24 == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{}h", h % 24)
            }
        }
        s if s < 2 * 365 * 86_400 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(119), "119s");
        assert_eq!(human_duration(192), "3m12s");
        assert_eq!(human_duration(300), "5m");
        assert_eq!(human_duration(3 * 3600 + 5), "3h");
        assert_eq!(human_duration(5 * 3600 + 600), "5h10m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(human_duration(40 * 86_400), "40d");
        assert_eq!(human_duration(3 * 365 * 86_400), "3y");
    }
}
