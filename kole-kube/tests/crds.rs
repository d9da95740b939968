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
