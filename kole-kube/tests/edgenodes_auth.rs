//! The edgenodes server trusts request headers only from the aggregator's front proxy: a client
//! certificate signed by the requestheader CA with an allowed common name. Runs without an
//! apiserver (certificates made here with rcgen); the real aggregator and SubjectAccessReviews are
//! exercised in `tests/edgenodes.rs`.

#![allow(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use kole_core::cache::{NodeCache, StateCache, shared};
use kole_core::model::{DesiredDigest, Labels, NodeInfo, NodeName, NodeRegistration, Timestamp};
use kole_kube::edgenodes::{
    Authorizer, Decision, EdgeNodeApiConfig, EdgeNodeServer, FrontProxyConfig, NodeSource, RequestAttributes,
    ServingCert, UserInfo,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// Allows `alice`, denies everyone else (the apiserver's RBAC stands here; the real
/// SubjectAccessReview path runs in the apiserver tier).
struct AliceOnly;

#[async_trait]
impl Authorizer for AliceOnly {
    async fn authorize(&self, user: &UserInfo, _: &RequestAttributes) -> kole_kube::Result<Decision> {
        Ok(if user.name == "alice" { Decision::Allow } else { Decision::Deny("not alice".into()) })
    }
}

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(cn: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(p, key) }
}

/// A client certificate with common name `cn` signed by `ca`: (chain, key).
fn client_cert(ca: &Ca, cn: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (vec![cert.der().clone()], PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap())
}

async fn start(front_proxy_ca: &Ca) -> (SocketAddr, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (w, r) = shared(NodeCache::new());
    w.write()
        .register(
            &NodeRegistration {
                name: NodeName::new("edge-1").unwrap(),
                labels: Labels::from_pairs([("tier", "cdn")]).unwrap(),
                info: NodeInfo::default(),
                applied: DesiredDigest(0),
                workloads: vec![],
            },
            1,
            Timestamp::from_secs(1_700_000_000),
        )
        .unwrap();
    std::mem::forget(w);
    let source = NodeSource::new();
    source.set_live(r);
    let front_proxy = FrontProxyConfig {
        client_ca_pem: front_proxy_ca.pem.clone(),
        allowed_names: vec!["front-proxy-client".into()],
        username_headers: vec!["X-Remote-User".into()],
        group_headers: vec!["X-Remote-Group".into()],
        extra_headers_prefix: vec!["X-Remote-Extra-".into()],
    };
    let cfg = EdgeNodeApiConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..Default::default() };
    let cert = ServingCert::SelfSigned { names: vec!["kole-edgenodes.test.svc".into()] };
    let server = EdgeNodeServer::bind(cfg, cert, front_proxy, source, Arc::new(AliceOnly)).await.unwrap();
    let (addr, pem) = (server.local_addr(), server.self_signed_pem().unwrap().to_owned());
    tokio::spawn(server.run(std::future::pending()));
    (addr, pem)
}

/// One request; the response's status code, or the TLS error.
async fn status(
    addr: SocketAddr,
    server_pem: &str,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    path: &str,
    user: Option<&str>,
) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_pem.as_bytes()).unwrap()).unwrap();
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let cfg = match client {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("kole-edgenodes.test.svc").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    let user =
        user.map(|u| format!("X-Remote-User: {u}\r\nX-Remote-Group: system:authenticated\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: kole-edgenodes.test.svc\r\n{user}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("no status line in {text:?}"))
}

const LIST: &str = "/apis/edge.kole.dev/v1alpha1/edgenodes";

#[tokio::test]
async fn only_the_front_proxy_certificate_makes_request_headers_count() {
    let fp = ca("front-proxy-ca");
    let (addr, pem) = start(&fp).await;
    let proxy = || Some(client_cert(&fp, "front-proxy-client"));

    // The aggregator's certificate and a user RBAC allows: the list.
    assert_eq!(status(addr, &pem, proxy(), LIST, Some("alice")).await, Ok(200));
    // No client certificate: headers are not believed, whoever they name.
    assert_eq!(status(addr, &pem, None, LIST, Some("alice")).await, Ok(401));
    // Health needs no identity (the kubelet's probes).
    assert_eq!(status(addr, &pem, None, "/healthz", None).await, Ok(200));
    // Signed by the right CA, but not a name in requestheader-allowed-names.
    assert_eq!(status(addr, &pem, Some(client_cert(&fp, "node-a")), LIST, Some("alice")).await, Ok(401));
    // The front proxy names no user.
    assert_eq!(status(addr, &pem, proxy(), LIST, None).await, Ok(401));
    // A user the authorizer denies.
    assert_eq!(status(addr, &pem, proxy(), LIST, Some("mallory")).await, Ok(403));
    // A path the API does not have.
    assert_eq!(status(addr, &pem, proxy(), "/apis/edge.kole.dev/v1alpha1/nope", Some("alice")).await, Ok(404));
    // A certificate from another CA with the allowed name: the handshake fails.
    let other = ca("someone-else");
    let refused = status(addr, &pem, Some(client_cert(&other, "front-proxy-client")), LIST, Some("alice")).await;
    assert!(refused.is_err(), "{refused:?}");
}
