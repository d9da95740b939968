//! Mock tier: the store's exact requests against kube's `tower-test` mock, and its behaviour on
//! 409, 429 and 413.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kole_core::snapshot::SnapshotStore;
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::*;

type Mock = Handle<Request<Body>, Response<Body>>;

const BASE: &str = "/apis/kole.dev/v1alpha1/namespaces/kole-system";

fn store() -> (KubeSnapshotStore, Mock) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let cfg = KubeSnapshotConfig {
        retry: ApiRetry { max_attempts: 5, backoff: Backoff::new(1, 2, 2.0) },
        ..Default::default()
    };
    (KubeSnapshotStore::new(client, cfg), handle)
}

/// One expected request: method, path and query; answers with `status` and `body`.
async fn expect(handle: &mut Mock, method: Method, path_and_query: &str, status: u16, body: Value) -> Value {
    let (req, send) = handle.next_request().await.expect("the store sent no request");
    assert_eq!(req.method(), method, "method of {}", req.uri());
    assert_eq!(req.uri().path_and_query().map(|p| p.as_str()), Some(path_and_query));
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    let resp = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    send.send_response(resp);
    sent
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("mock {code}"), "reason": reason, "code": code})
}

fn chunk_object(name: &str, rv: &str, generation: u64, index: u32, data: &[u8]) -> Value {
    use base64::Engine as _;
    json!({"apiVersion": "kole.dev/v1alpha1", "kind": "SnapshotChunk",
           "metadata": {"name": name, "namespace": "kole-system", "resourceVersion": rv},
           "spec": {"generation": generation, "index": index, "bytes": data.len(),
                    "data": base64::engine::general_purpose::STANDARD.encode(data)}})
}

fn manifest_object(rv: &str, generations: &[u64]) -> Value {
    let fenced: Vec<(u64, u64)> = generations.iter().map(|&g| (g, 0)).collect();
    fenced_manifest_object(rv, &fenced)
}

/// A manifest object recording `(generation, fencing token)` pairs, newest first.
fn fenced_manifest_object(rv: &str, generations: &[(u64, u64)]) -> Value {
    use base64::Engine as _;
    let gens: Vec<Value> = generations
        .iter()
        .map(|&(g, token)| {
            let m = Manifest { fencing_token: token, ..sample_manifest(g) };
            json!({"generation": g, "nodeCount": m.node_count, "chunkCount": m.chunk_count,
                   "totalBytes": m.total_bytes, "createdAtMs": 1000,
                   "manifest": base64::engine::general_purpose::STANDARD.encode(m.to_bytes())})
        })
        .collect();
    json!({"apiVersion": "kole.dev/v1alpha1", "kind": "SnapshotManifest",
           "metadata": {"name": "kole-snapshot", "namespace": "kole-system", "resourceVersion": rv},
           "spec": {"latestGeneration": generations.first().map_or(0, |g| g.0), "generations": gens}})
}

fn sample_manifest(generation: u64) -> Manifest {
    use kole_core::snapshot::{ChunkInfo, Codec, FORMAT_VERSION, SectionKind};
    Manifest {
        format_version: FORMAT_VERSION,
        generation,
        snapshot_id: 7,
        codec: Codec::Gzip,
        created_at: kole_core::model::Timestamp::from_secs(1),
        node_count: 3,
        chunk_count: 2,
        chunks: vec![
            ChunkInfo { section: SectionKind::Dictionary, bytes: 10, raw_len: 20, items: 1, checksum: 1 },
            ChunkInfo { section: SectionKind::Nodes, bytes: 10, raw_len: 20, items: 3, checksum: 2 },
        ],
        total_bytes: 20,
        fencing_token: 0,
    }
}

async fn timed<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("test timed out")
}

#[tokio::test]
async fn put_chunk_creates_a_labelled_object_with_base64_data() {
    timed(async {
        let (store, mut h) = store();
        let task = tokio::spawn(async move { store.put_chunk(3, 7, b"\x00chunk").await });
        let name = "kole-snapshot-g00000000000000000003-c000007";
        let sent = expect(
            &mut h,
            Method::POST,
            &format!("{BASE}/snapshotchunks?"),
            201,
            chunk_object(name, "1", 3, 7, b"\x00chunk"),
        )
        .await;
        assert_eq!(sent["metadata"]["name"], name);
        assert_eq!(sent["metadata"]["labels"][STORE_LABEL], "kole-snapshot");
        assert_eq!(sent["metadata"]["labels"][GENERATION_LABEL], "3");
        assert_eq!(sent["spec"], json!({"generation": 3, "index": 7, "bytes": 6, "data": "AGNodW5r"}));
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn put_chunk_replaces_a_leftover_and_retries_throttling() {
    timed(async {
        let (store, mut h) = store();
        let task = tokio::spawn(async move { store.put_chunk(1, 0, b"new").await });
        let name = "kole-snapshot-g00000000000000000001-c000000";
        expect(&mut h, Method::POST, &format!("{BASE}/snapshotchunks?"), 429, status(429, "TooManyRequests")).await;
        expect(&mut h, Method::POST, &format!("{BASE}/snapshotchunks?"), 409, status(409, "AlreadyExists")).await;
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotchunks/{name}"),
            200,
            chunk_object(name, "41", 1, 0, b"old"),
        )
        .await;
        let sent = expect(
            &mut h,
            Method::PUT,
            &format!("{BASE}/snapshotchunks/{name}?"),
            200,
            chunk_object(name, "42", 1, 0, b"new"),
        )
        .await;
        assert_eq!(sent["metadata"]["resourceVersion"], "41", "replace carries the precondition");
        assert_eq!(sent["spec"]["data"], "bmV3");
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_oversized_chunk_is_a_clear_error_not_a_loop() {
    timed(async {
        for (code, reason, hint) in
            [(413, "RequestEntityTooLarge", "max_chunk_bytes"), (422, "Invalid", "rejected the object as invalid")]
        {
            let (store, mut h) = store();
            let task = tokio::spawn(async move { store.put_chunk(2, 5, &[0u8; 64]).await });
            expect(&mut h, Method::POST, &format!("{BASE}/snapshotchunks?"), code, status(code, reason)).await;
            let err = task.await.unwrap().unwrap_err().to_string();
            assert!(err.contains("kole-snapshot-g00000000000000000002-c000005") && err.contains(hint), "{err}");
            // Exactly one request: the store gave up at once.
            assert!(!matches!(tokio::time::timeout(Duration::from_millis(50), h.next_request()).await, Ok(Some(_))));
        }
    })
    .await;
}

#[tokio::test]
async fn commit_moves_the_manifest_with_a_resource_version_precondition_and_retries_conflicts() {
    timed(async {
        let (store, mut h) = store();
        let m = sample_manifest(5);
        let task = tokio::spawn(async move { store.commit(&m).await });
        let path = format!("{BASE}/snapshotmanifests/kole-snapshot");
        expect(&mut h, Method::GET, &path, 200, manifest_object("10", &[4])).await;
        let sent = expect(&mut h, Method::PUT, &format!("{path}?"), 409, status(409, "Conflict")).await;
        assert_eq!(sent["metadata"]["resourceVersion"], "10");
        // Re-read, re-apply on the fresh version.
        expect(&mut h, Method::GET, &path, 200, manifest_object("11", &[4])).await;
        let sent = expect(&mut h, Method::PUT, &format!("{path}?"), 200, manifest_object("12", &[5, 4])).await;
        assert_eq!(sent["metadata"]["resourceVersion"], "11");
        assert_eq!(sent["spec"]["latestGeneration"], 5);
        let gens: Vec<u64> =
            sent["spec"]["generations"].as_array().unwrap().iter().map(|g| g["generation"].as_u64().unwrap()).collect();
        assert_eq!(gens, vec![5, 4]);
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn first_commit_creates_the_manifest() {
    timed(async {
        let (store, mut h) = store();
        let m = sample_manifest(1);
        let task = tokio::spawn(async move { store.commit(&m).await });
        expect(&mut h, Method::GET, &format!("{BASE}/snapshotmanifests/kole-snapshot"), 404, status(404, "NotFound"))
            .await;
        let sent =
            expect(&mut h, Method::POST, &format!("{BASE}/snapshotmanifests?"), 201, manifest_object("1", &[1])).await;
        assert_eq!(sent["metadata"]["name"], "kole-snapshot");
        assert_eq!(sent["spec"]["latestGeneration"], 1);
        assert_eq!(sent["spec"]["latestChunkCount"], 2);
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn lists_next_generation_from_manifest_and_chunk_labels_with_paging() {
    timed(async {
        let (store, mut h) = store();
        let task = tokio::spawn(async move { store.next_generation().await });
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotmanifests/kole-snapshot"),
            200,
            manifest_object("3", &[4]),
        )
        .await;
        let list = |items: Vec<Value>, cont: &str| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                   "metadata": {"continue": cont, "resourceVersion": "9"}, "items": items})
        };
        let meta = |g: u64, i: u32| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": format!("kole-snapshot-g{g:020}-c{i:06}"),
                                "labels": {STORE_LABEL: "kole-snapshot", GENERATION_LABEL: g.to_string()}}})
        };
        let q = "labelSelector=kole.dev%2Fsnapshot-store%3Dkole-snapshot&limit=500";
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotchunks?&{q}"),
            200,
            list(vec![meta(4, 0), meta(4, 1)], "tok"),
        )
        .await;
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotchunks?&{q}&continue=tok"),
            200,
            list(vec![meta(6, 0)], ""),
        )
        .await;
        // An interrupted write of generation 6 left a chunk: the next write uses 7.
        assert_eq!(task.await.unwrap().unwrap(), 7);
    })
    .await;
}

#[tokio::test]
async fn prune_drops_old_records_first_then_deletes_their_chunks_by_label() {
    timed(async {
        let (store, mut h) = store();
        let task = tokio::spawn(async move { store.prune(1).await });
        let path = format!("{BASE}/snapshotmanifests/kole-snapshot");
        expect(&mut h, Method::GET, &path, 200, manifest_object("20", &[5, 4])).await;
        let sent = expect(&mut h, Method::PUT, &format!("{path}?"), 200, manifest_object("21", &[5])).await;
        assert_eq!(sent["spec"]["generations"].as_array().unwrap().len(), 1);
        let meta = |g: u64| {
            json!({"metadata": {"name": format!("c{g}"), "labels": {STORE_LABEL: "kole-snapshot", GENERATION_LABEL: g.to_string()}}})
        };
        let q = "labelSelector=kole.dev%2Fsnapshot-store%3Dkole-snapshot&limit=500";
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotchunks?&{q}"),
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": [meta(4), meta(5), meta(6)]}),
        )
        .await;
        for g in [4, 6] {
            let q = format!("labelSelector=kole.dev%2Fsnapshot-store%3Dkole-snapshot%2Ckole.dev%2Fgeneration%3D{g}");
            expect(
                &mut h,
                Method::DELETE,
                &format!("{BASE}/snapshotchunks?&{q}"),
                200,
                json!({"apiVersion": "kole.dev/v1alpha1", "kind": "SnapshotChunkList", "metadata": {}, "items": []}),
            )
            .await;
        }
        task.await.unwrap().unwrap();
        // Generation 5, the last complete one, was never deleted.
        assert!(!matches!(tokio::time::timeout(Duration::from_millis(50), h.next_request()).await, Ok(Some(_))));
    })
    .await;
}

#[tokio::test]
async fn list_and_get_read_back_what_was_stored() {
    timed(async {
        let (store, mut h) = store();
        let s2 = store.clone();
        let task = tokio::spawn(async move { s2.list_manifests().await });
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotmanifests/kole-snapshot"),
            200,
            manifest_object("3", &[5, 4]),
        )
        .await;
        let ms = task.await.unwrap().unwrap();
        assert_eq!(ms.iter().map(|m| m.generation).collect::<Vec<_>>(), vec![5, 4]);
        assert_eq!(ms[0], sample_manifest(5));

        let task = tokio::spawn(async move { store.get_chunk(5, 1).await });
        let name = "kole-snapshot-g00000000000000000005-c000001";
        expect(&mut h, Method::GET, &format!("{BASE}/snapshotchunks/{name}"), 503, status(503, "ServiceUnavailable"))
            .await;
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotchunks/{name}"),
            200,
            chunk_object(name, "9", 5, 1, b"bytes"),
        )
        .await;
        assert_eq!(task.await.unwrap().unwrap(), Some(b"bytes".to_vec()));
    })
    .await;
}

/// No request follows within 50 ms.
async fn no_more_requests(h: &mut Mock) {
    assert!(!matches!(tokio::time::timeout(Duration::from_millis(50), h.next_request()).await, Ok(Some(_))));
}

#[tokio::test]
async fn a_commit_under_an_older_fencing_token_is_refused_and_writes_nothing() {
    timed(async {
        let (store, mut h) = store();
        let deposed = Manifest { fencing_token: 3, ..sample_manifest(6) };
        let task = tokio::spawn(async move { store.commit(&deposed).await });
        let path = format!("{BASE}/snapshotmanifests/kole-snapshot");
        // Generation 5 was written in term 4.
        expect(&mut h, Method::GET, &path, 200, fenced_manifest_object("10", &[(5, 4), (4, 3)])).await;
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, SnapshotError::Fenced { token: 3, newer_token: 4, newer_generation: 5, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("commit of generation 6") && msg.contains("another leadership term"), "{msg}");
        no_more_requests(&mut h).await;
    })
    .await;
}

#[tokio::test]
async fn a_commit_that_conflicts_rereads_and_meets_the_newer_term_there() {
    timed(async {
        let (store, mut h) = store();
        let m = Manifest { fencing_token: 3, ..sample_manifest(6) };
        let task = tokio::spawn(async move { store.commit(&m).await });
        let path = format!("{BASE}/snapshotmanifests/kole-snapshot");
        expect(&mut h, Method::GET, &path, 200, fenced_manifest_object("10", &[(5, 3)])).await;
        let sent = expect(&mut h, Method::PUT, &format!("{path}?"), 409, status(409, "Conflict")).await;
        assert_eq!(sent["metadata"]["resourceVersion"], "10", "the write carried its precondition");
        // The manifest changed under it: the new leader (term 4) committed generation 6.
        expect(&mut h, Method::GET, &path, 200, fenced_manifest_object("11", &[(6, 4), (5, 3)])).await;
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, SnapshotError::Fenced { newer_token: 4, newer_generation: 6, .. }), "{err:?}");
        no_more_requests(&mut h).await;
    })
    .await;
}

#[tokio::test]
async fn a_commit_under_the_same_or_a_newer_token_goes_ahead() {
    timed(async {
        let (store, mut h) = store();
        let m = Manifest { fencing_token: 4, ..sample_manifest(7) };
        let task = tokio::spawn(async move { store.commit(&m).await });
        let path = format!("{BASE}/snapshotmanifests/kole-snapshot");
        expect(&mut h, Method::GET, &path, 200, fenced_manifest_object("10", &[(6, 4), (5, 3)])).await;
        let sent = expect(&mut h, Method::PUT, &format!("{path}?"), 200, manifest_object("11", &[7, 6, 5])).await;
        use base64::Engine as _;
        let record = base64::engine::general_purpose::STANDARD
            .decode(sent["spec"]["generations"][0]["manifest"].as_str().unwrap())
            .unwrap();
        assert_eq!(Manifest::from_bytes(&record, 1 << 20).unwrap().fencing_token, 4, "the token is recorded");
        task.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_fenced_prune_is_refused_under_an_older_token_and_spares_writes_in_progress() {
    timed(async {
        let path = format!("{BASE}/snapshotmanifests/kole-snapshot");
        let (deposed, mut h) = store();
        let task = tokio::spawn(async move { deposed.prune_fenced(1, 3).await });
        expect(&mut h, Method::GET, &path, 200, fenced_manifest_object("20", &[(6, 4), (5, 3)])).await;
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, SnapshotError::Fenced { token: 3, newer_token: 4, .. }), "{err:?}");
        no_more_requests(&mut h).await;

        // The current term prunes: generation 5 goes, and so does the leftover 4, but chunks of
        // generation 7 (above the newest complete one: a write in progress) stay.
        let (store, mut h) = store();
        let task = tokio::spawn(async move { store.prune_fenced(1, 4).await });
        expect(&mut h, Method::GET, &path, 200, fenced_manifest_object("20", &[(6, 4), (5, 3)])).await;
        expect(&mut h, Method::PUT, &format!("{path}?"), 200, manifest_object("21", &[6])).await;
        let meta = |g: u64| {
            json!({"metadata": {"name": format!("c{g}"), "labels": {STORE_LABEL: "kole-snapshot", GENERATION_LABEL: g.to_string()}}})
        };
        let q = "labelSelector=kole.dev%2Fsnapshot-store%3Dkole-snapshot&limit=500";
        expect(
            &mut h,
            Method::GET,
            &format!("{BASE}/snapshotchunks?&{q}"),
            200,
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
                   "items": [meta(4), meta(5), meta(6), meta(7)]}),
        )
        .await;
        for g in [4, 5] {
            let q = format!("labelSelector=kole.dev%2Fsnapshot-store%3Dkole-snapshot%2Ckole.dev%2Fgeneration%3D{g}");
            expect(
                &mut h,
                Method::DELETE,
                &format!("{BASE}/snapshotchunks?&{q}"),
                200,
                json!({"apiVersion": "kole.dev/v1alpha1", "kind": "SnapshotChunkList", "metadata": {}, "items": []}),
            )
            .await;
        }
        task.await.unwrap().unwrap();
        no_more_requests(&mut h).await;
    })
    .await;
}
