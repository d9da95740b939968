//! Discovery documents and the OpenAPI v2 document (`kubectl get`, `kubectl explain`).

use serde_json::{Value, json};

use super::{GROUP, KIND, RESOURCE, VERSION};

pub(crate) fn group() -> Value {
    let gv = json!({ "groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION });
    json!({ "kind": "APIGroup", "apiVersion": "v1", "name": GROUP, "versions": [gv.clone()], "preferredVersion": gv })
}

pub(crate) fn group_list() -> Value {
    json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": [group()] })
}

pub(crate) fn resource_list() -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{GROUP}/{VERSION}"),
        "resources": [{
            "name": RESOURCE,
            "singularName": "edgenode",
            "namespaced": false,
            "kind": KIND,
            "verbs": ["get", "list", "watch"],
            "shortNames": ["en"],
            "categories": ["kole"],
        }],
    })
}

const DEF: &str = "dev.kole.edge.v1alpha1.EdgeNode";
const LIST_DEF: &str = "dev.kole.edge.v1alpha1.EdgeNodeList";

fn s(description: &str) -> Value {
    json!({ "type": "string", "description": description })
}

fn gvk(kind: &str) -> Value {
    json!([{ "group": GROUP, "version": VERSION, "kind": kind }])
}

/// The schema of an `EdgeNode` (kept equal to what `object::edge_node` writes: a test checks).
pub(crate) fn edge_node_schema() -> Value {
    json!({
        "description": "An edge node, served from the kole controller's cache (no object is stored per node).",
        "type": "object",
        "x-kubernetes-group-version-kind": gvk(KIND),
        "properties": {
            "apiVersion": s("APIVersion: edge.kole.dev/v1alpha1."),
            "kind": s("Kind: EdgeNode."),
            "metadata": {
                "description": "The node's name and labels (from its registration).",
                "type": "object",
                "properties": {
                    "name": s("The node's name, its MQTT identity."),
                    "labels": { "type": "object", "additionalProperties": { "type": "string" }, "description": "Labels the node registered with." },
                    "resourceVersion": s("The serving controller's change counter when this state was read (see docs/kubectl.md)."),
                },
            },
            "status": {
                "description": "What the controller knows of the node.",
                "type": "object",
                "properties": {
                    "phase": s("Registering, Online or Offline."),
                    "lastSeen": s("When the controller last heard from the node (RFC 3339)."),
                    "arch": s("CPU architecture (GOARCH spelling)."),
                    "os": s("Operating system and version."),
                    "agentVersion": s("Version of the kole agent."),
                    "addresses": { "type": "array", "items": { "type": "string" }, "description": "Addresses the node reported, primary first." },
                    "health": { "type": "array", "items": { "type": "string" }, "description": "Health flags of the last heartbeat; empty when healthy." },
                    "appliedDigest": s("Digest of the desired state the node reports applied (hex)."),
                    "workloadsReady": { "type": "integer", "description": "Workloads Running on the node." },
                    "workloadsTotal": { "type": "integer", "description": "Workloads the node reports." },
                    "workloads": {
                        "type": "array",
                        "description": "Each workload's state on the node.",
                        "items": {
                            "type": "object",
                            "properties": {
                                "workload": s("namespace/name of the EdgeWorkload."),
                                "version": { "type": "integer", "description": "The spec version the node runs." },
                                "phase": s("Pending, Running, Failed or Stopped."),
                            },
                        },
                    },
                },
            },
        },
    })
}

pub(crate) fn openapi_v2() -> Value {
    let list_params = json!([
        { "name": "labelSelector", "in": "query", "type": "string", "uniqueItems": true, "description": "Label selector (Kubernetes syntax)." },
        { "name": "fieldSelector", "in": "query", "type": "string", "uniqueItems": true, "description": "metadata.name, status.phase, status.arch, status.os, status.agentVersion with =, == or !=." },
        { "name": "limit", "in": "query", "type": "integer", "uniqueItems": true, "description": "Page size." },
        { "name": "continue", "in": "query", "type": "string", "uniqueItems": true, "description": "Token of the next page." },
        { "name": "watch", "in": "query", "type": "boolean", "uniqueItems": true, "description": "Watch for changes." },
        { "name": "resourceVersion", "in": "query", "type": "string", "uniqueItems": true, "description": "Watch from this version." },
        { "name": "allowWatchBookmarks", "in": "query", "type": "boolean", "uniqueItems": true, "description": "Send BOOKMARK events." },
        { "name": "timeoutSeconds", "in": "query", "type": "integer", "uniqueItems": true, "description": "End the watch after this long." },
    ]);
    let gvk_ext = json!({ "group": GROUP, "version": VERSION, "kind": KIND });
    json!({
        "swagger": "2.0",
        "info": { "title": "kole edgenodes", "version": VERSION },
        "paths": {
            format!("/apis/{GROUP}/{VERSION}/{RESOURCE}"): {
                "get": {
                    "description": "list or watch EdgeNodes",
                    "operationId": "listEdgeKoleDevV1alpha1EdgeNode",
                    "produces": ["application/json", "application/json;stream=watch"],
                    "schemes": ["https"],
                    "tags": ["edgeKoleDev_v1alpha1"],
                    "parameters": list_params,
                    "responses": { "200": { "description": "OK", "schema": { "$ref": format!("#/definitions/{LIST_DEF}") } } },
                    "x-kubernetes-action": "list",
                    "x-kubernetes-group-version-kind": gvk_ext,
                },
            },
            format!("/apis/{GROUP}/{VERSION}/{RESOURCE}/{{name}}"): {
                "get": {
                    "description": "read the specified EdgeNode",
                    "operationId": "readEdgeKoleDevV1alpha1EdgeNode",
                    "produces": ["application/json"],
                    "schemes": ["https"],
                    "tags": ["edgeKoleDev_v1alpha1"],
                    "responses": { "200": { "description": "OK", "schema": { "$ref": format!("#/definitions/{DEF}") } } },
                    "x-kubernetes-action": "get",
                    "x-kubernetes-group-version-kind": gvk_ext,
                },
                "parameters": [{ "name": "name", "in": "path", "required": true, "type": "string", "uniqueItems": true, "description": "name of the EdgeNode" }],
            },
        },
        "definitions": {
            DEF: edge_node_schema(),
            LIST_DEF: {
                "description": "A list of EdgeNodes.",
                "type": "object",
                "required": ["items"],
                "x-kubernetes-group-version-kind": gvk("EdgeNodeList"),
                "properties": {
                    "apiVersion": s("APIVersion: edge.kole.dev/v1alpha1."),
                    "kind": s("Kind: EdgeNodeList."),
                    "metadata": {
                        "type": "object",
                        "description": "resourceVersion and continue.",
                        "properties": { "resourceVersion": s("The list's version."), "continue": s("Token of the next page.") },
                    },
                    "items": { "type": "array", "items": { "$ref": format!("#/definitions/{DEF}") } },
                },
            },
        },
    })
}
