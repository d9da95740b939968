//! Writes the YAML of every kole CRD into `deploy/crds/` (run from anywhere in the workspace):
//!
//! ```text
//! cargo run -p kole-kube --example gen-crds
//! ```

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in kole_kube::crd::rendered_crds() {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
