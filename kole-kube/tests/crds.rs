//! The checked-in CRD YAML in `deploy/crds/` matches what the Rust types generate, and stays
//! installable on old apiservers (no CEL rules, structural schemas).
//! Set `KOLE_REGENERATE_CRDS=1` to rewrite the files instead (or run the `gen-crds` example).

use std::path::PathBuf;

#[test]
fn checked_in_crd_yaml_matches_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let regenerate = std::env::var_os("KOLE_REGENERATE_CRDS").is_some();
    let mut stale = Vec::new();
    for (file, yaml) in kole_kube::crd::rendered_crds() {
        assert!(!yaml.contains("x-kubernetes-validations"), "{file}: CEL rules need apiserver 1.25+");
        let path = dir.join(&file);
        if regenerate {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(on_disk) if on_disk == yaml => {}
            _ => stale.push(file),
        }
    }
    assert!(
        stale.is_empty(),
        "deploy/crds/ is out of date for {stale:?}; run `cargo run -p kole-kube --example gen-crds` \
         (or KOLE_REGENERATE_CRDS=1 cargo test -p kole-kube --test crds) and commit the result"
    );
}

#[test]
fn crds_are_structural_and_named() {
    use kube::core::CustomResourceExt;
    let crd = kole_kube::crd::EdgeWorkload::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("edgeworkloads.kole.dev"));
    assert_eq!(crd.spec.names.short_names, Some(vec!["ew".to_owned()]));
    let v = &crd.spec.versions[0];
    assert!(v.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
    let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
    let text = schema.to_string();
    // Structural: no oneOf/anyOf without types at the top of properties, every property typed.
    assert!(!text.contains("\"$ref\""), "schemas must be inlined");
    let waves = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["rollout"]["properties"]["waves"];
    assert_eq!(waves["minItems"], 1);
    assert_eq!(waves["items"]["maximum"], 100.0);
    let mode = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["delivery"]["properties"]["mode"];
    assert_eq!(mode["enum"], serde_json::json!(["Broadcast", "Group", "PerNode"]));
}

/// Formats the apiserver knows (k8s.io/apiextensions-apiserver's `SupportedFormats`); any other one is
/// warned about by current apiservers (`unrecognized format`) and enforced by none.
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "datetime",
    "duration",
    "password",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "bsonobjectid",
];

/// Walks the schema as installed (`fixed`) next to kube-derive's raw output (`raw`, which still carries
/// schemars' `uint*` formats, so the walk knows which integers are unsigned) and collects what a
/// current apiserver would warn about or fail to enforce.
fn check_schema(path: &str, raw: &serde_json::Value, fixed: &serde_json::Value, problems: &mut Vec<String>) {
    use serde_json::Value;
    let (Value::Object(raw_map), Value::Object(map)) = (raw, fixed) else {
        if let (Value::Array(raw_items), Value::Array(items)) = (raw, fixed) {
            for (i, (r, f)) in raw_items.iter().zip(items).enumerate() {
                check_schema(&format!("{path}[{i}]"), r, f, problems);
            }
        }
        return;
    };
    if let Some(Value::String(format)) = map.get("format")
        && !KNOWN_FORMATS.contains(&format.as_str())
    {
        problems.push(format!("{path}: format {format:?} is unknown to Kubernetes"));
    }
    if map.get("type") == Some(&Value::String("integer".into())) {
        let format = map.get("format").and_then(Value::as_str);
        if !matches!(format, Some("int32" | "int64")) {
            problems.push(format!("{path}: integer with format {format:?}, not int32/int64"));
        }
        let raw_format = raw_map.get("format").and_then(Value::as_str).unwrap_or("");
        let min = map.get("minimum").and_then(Value::as_f64);
        let max = map.get("maximum").and_then(Value::as_f64);
        let type_max = match raw_format {
            "uint8" => Some(255.0),
            "uint16" => Some(65535.0),
            "uint32" => Some(4294967295.0),
            _ => None,
        };
        if raw_format.starts_with("uint") && !min.is_some_and(|m| m >= 0.0) {
            problems.push(format!("{path}: unsigned ({raw_format}) without minimum 0"));
        }
        if let Some(type_max) = type_max
            && !max.is_some_and(|m| m <= type_max)
        {
            problems.push(format!("{path}: {raw_format} without a maximum of at most {type_max}"));
        }
        if format == Some("int32")
            && !(min.is_some_and(|m| m >= f64::from(i32::MIN)) && max.is_some_and(|m| m <= f64::from(i32::MAX)))
        {
            // Only narrow types become int32; a wider value would be refused by the format, not the bounds.
            problems.push(format!("{path}: int32 without bounds inside int32"));
        }
    }
    if let Some(Value::String(d)) = map.get("description") {
        if d.contains("Auto-generated derived type") {
            problems.push(format!("{path}: kube-derive's placeholder description"));
        }
        if d.replace("\n\n", "").contains('\n') {
            problems.push(format!("{path}: description with a hard line break inside a paragraph: {d:?}"));
        }
    } else if path.ends_with("openAPIV3Schema") {
        problems.push(format!("{path}: the kind has no description"));
    }
    for (key, value) in map {
        // `properties` maps names to schemas; a property may itself be called `description` or `format`.
        if key == "description" || key == "format" {
            continue;
        }
        if let Some(r) = raw_map.get(key) {
            check_schema(&format!("{path}.{key}"), r, value, problems);
        }
    }
}

#[test]
fn schemas_use_only_what_current_apiservers_know() {
    use kole_kube::crd::*;
    use kube::core::CustomResourceExt;
    let raw = [EdgeWorkload::crd(), NodeQuery::crd(), SnapshotManifest::crd(), SnapshotChunk::crd()];
    let fixed = all_crds();
    assert_eq!(raw.len(), fixed.len());
    let mut problems = Vec::new();
    for (raw, fixed) in raw.iter().zip(&fixed) {
        let name = fixed.metadata.name.clone().unwrap();
        assert_eq!(raw.metadata.name.as_deref(), Some(name.as_str()));
        for (rv, fv) in raw.spec.versions.iter().zip(&fixed.spec.versions) {
            let r = serde_json::to_value(rv.schema.as_ref().unwrap()).unwrap();
            let f = serde_json::to_value(fv.schema.as_ref().unwrap()).unwrap();
            check_schema(&format!("{name}/{}", fv.name), &r, &f, &mut problems);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The bounds the Rust types imply, spot-checked.
    let chunk = serde_json::to_value(&fixed[3].spec.versions[0].schema).unwrap();
    let index = &chunk["openAPIV3Schema"]["properties"]["spec"]["properties"]["index"];
    assert_eq!(
        (index["format"].as_str(), index["minimum"].as_f64(), index["maximum"].as_f64()),
        (Some("int64"), Some(0.0), Some(4294967295.0))
    );
    let workload = serde_json::to_value(&fixed[0].spec.versions[0].schema).unwrap();
    let percent = &workload["openAPIV3Schema"]["properties"]["spec"]["properties"]["rollout"]["properties"]["failureThreshold"]
        ["properties"]["percent"];
    assert_eq!((percent["format"].as_str(), percent["maximum"].as_f64()), (Some("int32"), Some(100.0)));
}

#[test]
fn the_checker_catches_what_kube_derive_writes() {
    // Without kole's pass, the same walk finds schemars' formats, the placeholder and wrapped docs.
    use kube::core::CustomResourceExt;
    let raw = kole_kube::crd::SnapshotChunk::crd();
    let r = serde_json::to_value(raw.spec.versions[0].schema.as_ref().unwrap()).unwrap();
    let mut problems = Vec::new();
    check_schema("snapshotchunks", &r, &r, &mut problems);
    let text = problems.join("\n");
    assert!(text.contains("format \"uint32\""), "{text}");
    assert!(text.contains("without a maximum"), "{text}");
    assert!(text.contains("placeholder"), "{text}");
    assert!(text.contains("hard line break"), "{text}");
}

/// Every schema under `schema`, by path: `.name` for a property, `[]` for a list's items, `{}` for a
/// map's values.
fn schemas_by_path(schema: &serde_json::Value, path: &str, out: &mut Vec<(String, serde_json::Value)>) {
    out.push((path.to_owned(), schema.clone()));
    if let Some(props) = schema["properties"].as_object() {
        for (name, s) in props {
            schemas_by_path(s, &format!("{path}.{name}"), out);
        }
    }
    if schema["items"].is_object() {
        schemas_by_path(&schema["items"], &format!("{path}[]"), out);
    }
    if schema["additionalProperties"].is_object() {
        schemas_by_path(&schema["additionalProperties"], &format!("{path}{{}}"), out);
    }
}

fn spec_schema(kind: &str) -> Vec<(String, serde_json::Value)> {
    let crd = kole_kube::crd::all_crds().into_iter().find(|c| c.spec.names.kind == kind).unwrap();
    let schema = serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap()).unwrap();
    let mut out = Vec::new();
    schemas_by_path(&schema["openAPIV3Schema"]["properties"]["spec"], "spec", &mut out);
    out
}

/// Issue 12, admission limits: every string, list and map of the specs has a schema limit (a new field
/// without one fails here), and each limit is no looser than what the agents decode, checked against
/// kole-core's constants so the two cannot drift apart.
#[test]
fn every_spec_field_has_a_limit_no_looser_than_the_agents_decode() {
    use kole_core::model::{MAX_LABEL_NAME_LEN, MAX_LABEL_PREFIX_LEN, MAX_NODE_NAME_LEN};
    use kole_core::runspec::{MAX_ARGV, MAX_ENV, MAX_IMAGE_LEN};
    let agents = kole_core::protocol::DecodeLimits::default();
    let label_key = MAX_LABEL_PREFIX_LEN + 1 + MAX_LABEL_NAME_LEN;
    let selector = |p: &str| -> Vec<(String, &'static str, usize)> {
        vec![
            // Each label is a requirement with one value: two of the agents' selector terms.
            (format!("{p}.matchLabels"), "maxProperties", agents.max_selector_terms / 2),
            (format!("{p}.matchLabels{{}}"), "maxLength", MAX_LABEL_NAME_LEN),
            (format!("{p}.matchExpressions"), "maxItems", agents.max_selector_terms),
            (format!("{p}.matchExpressions[].key"), "maxLength", label_key),
            // With its requirement, one term more.
            (format!("{p}.matchExpressions[].values"), "maxItems", agents.max_selector_terms - 1),
            (format!("{p}.matchExpressions[].values[]"), "maxLength", MAX_LABEL_NAME_LEN),
        ]
    };
    let mut edge: Vec<(String, &str, usize)> = vec![
        ("spec.runtime.image".into(), "maxLength", MAX_IMAGE_LEN),
        ("spec.runtime.command".into(), "maxItems", MAX_ARGV),
        ("spec.runtime.command[]".into(), "maxLength", agents.max_spec_bytes),
        ("spec.runtime.args".into(), "maxItems", MAX_ARGV),
        ("spec.runtime.args[]".into(), "maxLength", agents.max_spec_bytes),
        ("spec.runtime.env".into(), "maxItems", MAX_ENV),
        ("spec.runtime.env[].name".into(), "maxLength", agents.max_string_len),
        ("spec.runtime.env[].value".into(), "maxLength", agents.max_spec_bytes),
        ("spec.runtime.workingDir".into(), "maxLength", agents.max_string_len),
        // The whole runtime spec is at most this: no single field can be larger.
        ("spec.runtime.config".into(), "maxLength", agents.max_spec_bytes),
        // Group names follow the node name rule (kole_core::protocol::GroupName).
        ("spec.delivery.group".into(), "maxLength", MAX_NODE_NAME_LEN),
        // kole_core::model::RolloutStrategy::validate: 1 to 100 waves.
        ("spec.rollout.waves".into(), "maxItems", 100),
    ];
    edge.extend(selector("spec.selector"));
    let mut query: Vec<(String, &str, usize)> = vec![
        ("spec.names".into(), "maxItems", 1000),
        ("spec.names[]".into(), "maxLength", MAX_NODE_NAME_LEN),
        // A u32 page position.
        ("spec.continue".into(), "maxLength", u32::MAX.to_string().len()),
        ("spec.refresh".into(), "maxLength", 63),
    ];
    query.extend(selector("spec.selector"));

    for (kind, want) in [("EdgeWorkload", edge), ("NodeQuery", query)] {
        let schemas = spec_schema(kind);
        for (path, key, bound) in &want {
            let s = &schemas.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("{kind}: no {path}")).1;
            let got = s[*key].as_u64().unwrap_or_else(|| panic!("{kind} {path}: no {key}: {s}"));
            assert!(got as usize <= *bound, "{kind} {path}: {key} {got} is looser than the agents' {bound}");
        }
        // Everything else is bounded too (enums are, by their values; map keys cannot be, in a
        // structural schema: the controller checks them).
        for (path, s) in &schemas {
            let bounded = match s["type"].as_str() {
                Some("string") => s["maxLength"].is_u64() || s["enum"].is_array(),
                Some("array") => s["maxItems"].is_u64(),
                Some("object") if s["additionalProperties"].is_object() => s["maxProperties"].is_u64(),
                _ => true,
            };
            assert!(bounded, "{kind} {path} has no limit: {s}");
        }
    }
}
