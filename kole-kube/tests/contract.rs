//! The snapshot store contract (`kole_tests::contract::snapshot_store`) run against
//! `KubeSnapshotStore` on a real apiserver. Start one with `.ci/kube.sh start`, export the
//! kubeconfig path it prints as `KOLE_TEST_KUBECONFIG`, and run
//! `cargo test -p kole-kube --test contract -- --include-ignored`.

mod common;

use std::time::Duration;

use common::{NEEDS_APISERVER, client, install_crds, namespace};
use kole_kube::snapshot::{KubeSnapshotConfig, KubeSnapshotStore};
use kole_tests::bounded;
use kole_tests::contract::snapshot_store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kube-apiserver: KOLE_TEST_KUBECONFIG=$(.ci/kube.sh start)"]
async fn kube_snapshot_store_keeps_the_contract() {
    if std::env::var_os("KOLE_TEST_KUBECONFIG").is_none() {
        eprintln!("skipped: {NEEDS_APISERVER}");
        return;
    }
    bounded(Duration::from_secs(240), "the snapshot store contract on the apiserver", async {
        let client = client().await;
        install_crds(&client).await;
        let ns = namespace(&client, "kole-contract").await;
        // Each check gets its own store (manifest object and chunk prefix) in the namespace.
        let mut n = 0;
        let fresh = async || {
            n += 1;
            let cfg = KubeSnapshotConfig { namespace: ns.clone(), name: format!("contract-{n}"), ..Default::default() };
            KubeSnapshotStore::new(client.clone(), cfg)
        };
        snapshot_store::check(fresh).await;
    })
    .await;
}
