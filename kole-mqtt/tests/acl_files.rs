//! The ACL templates shipped in `deploy/mqtt/` are exactly what `Topics` generates. Regenerate
//! them with `KOLE_BLESS=1 cargo test -p kole-mqtt --test acl_files`.

use kole_mqtt::Topics;

const FLEET: &str = "default";
const CONTROLLER: &str = "kole-controller";

fn check(file: &str, generated: String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mqtt").join(file);
    if std::env::var_os("KOLE_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(shipped, generated, "{} differs from Topics' output; rerun with KOLE_BLESS=1", path.display());
}

#[test]
fn shipped_mosquitto_acl_is_generated() {
    check("mosquitto.acl", Topics::new(FLEET).unwrap().mosquitto_acl(CONTROLLER).unwrap());
}

#[test]
fn shipped_emqx_acl_is_generated() {
    check("emqx-acl.conf", Topics::new(FLEET).unwrap().emqx_acl(CONTROLLER).unwrap());
}
