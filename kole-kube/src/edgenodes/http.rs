//! The HTTPS server: TLS with the front proxy's client certificate, routing, list, get and watch.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kole_core::model::{NodeRecord, Timestamp};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::auth::{Authorizer, Decision, FrontProxyConfig, RequestAttributes};
use super::object::{self, deleted_stub, edge_node, row, status, table};
use super::request::{ContinueToken, LabelLookupDyn, ListOptions, list_page};
use super::source::{NodeSource, Staleness};
use super::watch::{Change, ChangeKind, HubMsg, StartError, WatchHub};
use super::{EdgeNodeApiConfig, GROUP, RESOURCE, VERSION, openapi};
use crate::convert::rfc3339;
use crate::{Error, Result};

type Body = BoxBody<Bytes, Infallible>;

/// The serving certificate.
#[derive(Clone, Debug)]
pub enum ServingCert {
    /// A certificate chain and its key, PEM (e.g. from a Secret mounted as files).
    Pem {
        /// Certificate chain, leaf first.
        cert_chain: String,
        /// The leaf's private key.
        key: String,
    },
    /// A self-signed certificate made at start for these DNS names (the `APIService` then needs
    /// `insecureSkipTLSVerify: true`, as metrics-server's default does, or the `caBundle` the
    /// server logs).
    SelfSigned {
        /// Subject alternative names, e.g. `kole-edgenodes.kole-system.svc`.
        names: Vec<String>,
    },
}

impl ServingCert {
    /// Reads a PEM certificate chain and key.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| Error::Controller(format!("read the edgenodes serving certificate {}: {e}", p.display())))
        };
        Ok(Self::Pem { cert_chain: read(cert)?, key: read(key)? })
    }

    /// The chain, the key, and the certificate's PEM when self-signed.
    fn materialize(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, Option<String>)> {
        let bad = |what: &str, e: &dyn std::fmt::Display| Error::Controller(format!("edgenodes serving {what}: {e}"));
        match self {
            Self::Pem { cert_chain, key } => {
                let chain = CertificateDer::pem_slice_iter(cert_chain.as_bytes())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| bad("certificate", &e))?;
                if chain.is_empty() {
                    return Err(bad("certificate", &"no CERTIFICATE block in the PEM"));
                }
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| bad("key", &e))?;
                Ok((chain, key, None))
            }
            Self::SelfSigned { names } => {
                let ck = rcgen::generate_simple_self_signed(names.clone())
                    .map_err(|e| bad("self-signed certificate", &e))?;
                let pem = ck.cert.pem();
                let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).map_err(|e| bad("key", &e))?;
                Ok((vec![ck.cert.der().clone()], key, Some(pem)))
            }
        }
    }
}

/// The edgenodes API server, bound and ready to run.
pub struct EdgeNodeServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    self_signed_pem: Option<String>,
}

impl std::fmt::Debug for EdgeNodeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeNodeServer").field("listen", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    cfg: EdgeNodeApiConfig,
    source: NodeSource,
    hub: Arc<WatchHub>,
    front_proxy: FrontProxyConfig,
    authorizer: Arc<dyn Authorizer>,
    watches: AtomicUsize,
}

impl EdgeNodeServer {
    /// Binds `cfg.listen` with TLS: the serving certificate, and client certificates verified
    /// against the front proxy's CA (optional at the TLS layer: a connection without one is
    /// answered `401`, health endpoints aside). Needs a process-wide rustls crypto provider.
    pub async fn bind(
        cfg: EdgeNodeApiConfig,
        cert: ServingCert,
        front_proxy: FrontProxyConfig,
        source: NodeSource,
        authorizer: Arc<dyn Authorizer>,
    ) -> Result<Self> {
        let provider = rustls::crypto::CryptoProvider::get_default().cloned().ok_or_else(|| {
            Error::Controller(
                "no rustls crypto provider is installed: call rustls::crypto::ring::default_provider().install_default() \
                 (or aws_lc_rs) before starting the edgenodes server"
                    .into(),
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(front_proxy.client_ca_pem.as_bytes()) {
            let c = c.map_err(|e| Error::Controller(format!("requestheader client CA: {e}")))?;
            roots.add(c).map_err(|e| Error::Controller(format!("requestheader client CA: {e}")))?;
        }
        if roots.is_empty() {
            return Err(Error::Controller("requestheader client CA: no certificate in the PEM".into()));
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Controller(format!("requestheader client CA: {e}")))?;
        let (chain, key, self_signed_pem) = cert.materialize()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Controller(format!("TLS: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| Error::Controller(format!("edgenodes serving certificate: {e}")))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| Error::Controller(format!("edgenodes API: listen on {}: {e}", cfg.listen)))?;
        let hub = Arc::new(WatchHub::new(cfg.watch_history, cfg.max_changes_per_pass));
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            shared: Arc::new(Shared { cfg, source, hub, front_proxy, authorizer, watches: AtomicUsize::new(0) }),
            self_signed_pem,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.shared.cfg.listen)
    }

    /// The self-signed certificate's PEM (for an `APIService`'s `caBundle`), when self-signed.
    pub fn self_signed_pem(&self) -> Option<&str> {
        self.self_signed_pem.as_deref()
    }

    /// The watch hub (its version and counters).
    pub fn hub(&self) -> Arc<WatchHub> {
        Arc::clone(&self.shared.hub)
    }

    /// Serves until `shutdown` completes: accepts connections and runs the watch passes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let shared = Arc::clone(&self.shared);
        let passes = tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.cfg.watch_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let s = Arc::clone(&shared);
                // A pass holds the cache's read lock for milliseconds: off the async workers.
                if tokio::task::spawn_blocking(move || s.hub.pass(&s.source)).await.is_err() {
                    tracing::error!("edgenodes watch pass panicked");
                }
            }
        });
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = self.listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "edgenodes API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "edgenodes API: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let cn = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| common_name(c));
                let front_proxy = match &cn {
                    Some(cn) => shared.front_proxy.allows(cn.as_deref()),
                    None => false,
                };
                if cn.is_some() && !front_proxy {
                    tracing::warn!(%peer, cn = ?cn.as_ref().and_then(|c| c.as_deref()), "edgenodes API: a client certificate not in requestheader-allowed-names");
                }
                let svc = service_fn(move |req| handle(Arc::clone(&shared), front_proxy, req));
                if let Err(e) =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await
                {
                    tracing::debug!(%peer, error = %e, "edgenodes API: connection ended");
                }
            });
        }
        passes.abort();
    }
}

fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, v: &Value, content_type: &str) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_vec(v).unwrap_or_default()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/json")),
    );
    r
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code.as_u16(), reason, message), "application/json")
}

fn now() -> Timestamp {
    Timestamp::from_millis(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

fn warn_stale(resp: &mut Response<Body>, staleness: Option<Staleness>) {
    if let Some(s) = staleness {
        let age = now().as_millis().saturating_sub(s.taken_at.as_millis()) / 1000;
        let text = format!(
            "299 - \"served by a standby kole-controller from snapshot generation {} taken at {} ({} ago); the leader's view may be newer\"",
            s.generation,
            rfc3339(s.taken_at),
            object::human_duration(age)
        );
        if let Ok(v) = HeaderValue::from_str(&text) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
}

/// Whether the client asked for a `meta.k8s.io` `Table` (what `kubectl get` asks for).
fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| media.contains("as=Table") && media.contains("g=meta.k8s.io"))
}

const TABLE_CONTENT_TYPE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io";

async fn handle(
    shared: Arc<Shared>,
    front_proxy: bool,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, Infallible> {
    let path = req.uri().path().trim_end_matches('/').to_owned();
    // Health needs no identity: the kubelet probes it.
    if matches!(path.as_str(), "/healthz" | "/livez" | "/readyz") {
        return Ok(Response::new(full("ok")));
    }
    if !front_proxy {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this API is served through the kube-apiserver's aggregation layer: connect with its front-proxy client \
             certificate (kubectl get edgenodes goes through the apiserver)",
        ));
    }
    if req.method() != Method::GET {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{} is not supported: edgenodes are read-only (get, list, watch)", req.method()),
        ));
    }
    let base = format!("/apis/{GROUP}/{VERSION}");
    match path.as_str() {
        "/apis" => return Ok(json_response(StatusCode::OK, &openapi::group_list(), "application/json")),
        p if p == format!("/apis/{GROUP}") => {
            return Ok(json_response(StatusCode::OK, &openapi::group(), "application/json"));
        }
        p if p == base => return Ok(json_response(StatusCode::OK, &openapi::resource_list(), "application/json")),
        "/openapi/v2" => return Ok(json_response(StatusCode::OK, &openapi::openapi_v2(), "application/json")),
        _ => {}
    }
    let Some(rest) = path.strip_prefix(&base) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource: {path}"),
        ));
    };
    let (watch_path, rest) = match rest.strip_prefix("/watch") {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let name = match rest.strip_prefix(&format!("/{RESOURCE}")) {
        Some("") => None,
        Some(n) if n.starts_with('/') && !n[1..].contains('/') => Some(n[1..].to_owned()),
        _ => {
            return Ok(error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource: {path}"),
            ));
        }
    };
    let Some(user) = shared.front_proxy.user(req.headers()) else {
        return Ok(error(StatusCode::UNAUTHORIZED, "Unauthorized", "the front proxy named no user"));
    };
    let mut opts = match ListOptions::parse(req.uri().query().unwrap_or("")) {
        Ok(o) => o,
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "BadRequest", &e)),
    };
    let watch = watch_path || opts.watch;
    if let (true, Some(n)) = (watch, &name) {
        // A watch of one node is a watch with a name selector.
        let sel = format!("metadata.name={n}");
        match super::request::FieldSelector::parse(&sel) {
            Ok(f) => opts.fields = f,
            Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "BadRequest", &e)),
        }
    }
    let verb = if watch {
        "watch"
    } else if name.is_some() {
        "get"
    } else {
        "list"
    };
    let attrs = RequestAttributes { verb: verb.to_owned(), name: name.clone() };
    match shared.authorizer.authorize(&user, &attrs).await {
        Ok(Decision::Allow) => {}
        Ok(Decision::Deny(reason)) => {
            let mut msg = format!(
                "{RESOURCE}.{GROUP}{} is forbidden: User \"{}\" cannot {verb} resource \"{RESOURCE}\" in API group \"{GROUP}\" at the cluster scope",
                name.as_ref().map(|n| format!(" \"{n}\"")).unwrap_or_default(),
                user.name
            );
            if !reason.is_empty() {
                msg.push_str(": ");
                msg.push_str(&reason);
            }
            return Ok(error(StatusCode::FORBIDDEN, "Forbidden", &msg));
        }
        Err(e) => {
            tracing::warn!(error = %e, "edgenodes API: authorization failed");
            return Ok(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &format!("authorization failed: {e}"),
            ));
        }
    }
    let as_table = wants_table(&req);
    Ok(if watch {
        watch_response(shared, opts, as_table)
    } else if let Some(name) = name {
        get(&shared, &name, as_table)
    } else {
        list(&shared, &opts, as_table)
    })
}

fn unavailable(why: &str) -> Response<Body> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        &format!("edgenodes are not available from this replica: {why}"),
    )
}

fn get(shared: &Shared, name: &str, as_table: bool) -> Response<Body> {
    use kole_core::cache::StateCache as _;
    let read = match shared.source.read(|c| c.get(name)) {
        Ok(r) => r,
        Err(why) => return unavailable(&why),
    };
    let rv = shared.hub.resource_version();
    let mut resp = match read.value {
        None => error(StatusCode::NOT_FOUND, "NotFound", &format!("{RESOURCE}.{GROUP} \"{name}\" not found")),
        Some(r) if as_table => {
            json_response(StatusCode::OK, &table(vec![row(&r, rv, now())], rv, None, true), TABLE_CONTENT_TYPE)
        }
        Some(r) => json_response(StatusCode::OK, &edge_node(&r, rv), "application/json"),
    };
    warn_stale(&mut resp, read.staleness);
    resp
}

fn list(shared: &Shared, opts: &ListOptions, as_table: bool) -> Response<Body> {
    if opts.continue_.is_none() {
        // A first page brings the change history up to date, so a watch from the list's version
        // misses nothing and repeats little (changes after this pass and before the read).
        shared.hub.pass(&shared.source);
    }
    let rv_now = shared.hub.resource_version();
    let read = match shared.source.read(|c| list_page(c, opts)) {
        Ok(r) => r,
        Err(why) => return unavailable(&why),
    };
    if let Some(t) = opts.continue_
        && t.e != read.epoch
    {
        return error(
            StatusCode::GONE,
            "Expired",
            "the continue token is for a cache this replica no longer serves (a standby reloaded its snapshot, or the \
             leader changed); list again without continue",
        );
    }
    let rv = opts.continue_.map_or(rv_now, |t| t.rv);
    let (items, after) = read.value;
    let token = after.map(|slot| ContinueToken::new(read.epoch, slot, rv).encode());
    let at = now();
    // Written item by item: a million-node list never exists as one JSON tree.
    let mut out = Vec::with_capacity(items.len() * 512 + 256);
    let content_type = if as_table {
        let head = table(Vec::new(), rv, token.as_deref(), opts.continue_.is_none());
        write_with_array(&mut out, head, "rows", items.iter().map(|r| row(r, rv, at)));
        TABLE_CONTENT_TYPE
    } else {
        let head = object::list(Vec::new(), rv, token.as_deref());
        write_with_array(&mut out, head, "items", items.iter().map(|r| edge_node(r, rv)));
        "application/json"
    };
    let mut resp = Response::new(full(out));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    warn_stale(&mut resp, read.staleness);
    resp
}

/// Writes `head` (an object whose `field` is an empty array) with the array's elements streamed in.
fn write_with_array(out: &mut Vec<u8>, mut head: Value, field: &str, elems: impl Iterator<Item = Value>) {
    if let Some(m) = head.as_object_mut() {
        m.remove(field);
    }
    let head = serde_json::to_vec(&head).unwrap_or_else(|_| b"{}".to_vec());
    // `{...}` without its closing brace, then `,"field":[`.
    out.extend_from_slice(&head[..head.len() - 1]);
    if head.len() > 2 {
        out.push(b',');
    }
    out.extend_from_slice(format!("\"{field}\":[").as_bytes());
    for (i, e) in elems.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, &e);
    }
    out.extend_from_slice(b"]}");
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({ "type": kind, "object": object })).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// How one change looks to one watch: the event type and the object, or nothing.
fn classify<'c>(opts: &ListOptions, c: &'c Change) -> Option<(&'static str, Option<&'c NodeRecord>)> {
    let new_match = c.record.as_ref().map(|r| opts.matches(r));
    let old_match = c.old.as_ref().map(|o| {
        let labels = o.labels.as_ref().map(|l| l as &dyn LabelLookupDyn);
        opts.matches_old(&c.name, o.phase, labels, c.record.as_ref())
    });
    match (c.kind, old_match, new_match) {
        (ChangeKind::Added, _, Some(true)) => Some(("ADDED", c.record.as_ref())),
        (ChangeKind::Modified, Some(true), Some(true)) => Some(("MODIFIED", c.record.as_ref())),
        (ChangeKind::Modified, Some(false), Some(true)) => Some(("ADDED", c.record.as_ref())),
        (ChangeKind::Modified, Some(true), Some(false)) => Some(("DELETED", c.record.as_ref())),
        (ChangeKind::Deleted, Some(true), _) => Some(("DELETED", None)),
        _ => None,
    }
}

/// Where a watch starts: changes to replay, or nodes to send as `ADDED`, then the live feed.
struct WatchStart {
    backlog: Vec<Arc<Change>>,
    initial: Vec<NodeRecord>,
    rv: u64,
    rx: broadcast::Receiver<HubMsg>,
}

struct WatchGuard(Arc<Shared>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.watches.fetch_sub(1, Ordering::AcqRel);
    }
}

fn watch_response(shared: Arc<Shared>, opts: ListOptions, as_table: bool) -> Response<Body> {
    if shared.watches.fetch_add(1, Ordering::AcqRel) >= shared.cfg.max_watches {
        shared.watches.fetch_sub(1, Ordering::AcqRel);
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            &format!("{} watches are open, the most this replica serves; retry later", shared.cfg.max_watches),
        );
    }
    let guard = WatchGuard(Arc::clone(&shared));
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let mut first_table = true;
    let mut render = move |kind: &str, r: Option<&NodeRecord>, name: &str, rv: u64| -> Bytes {
        let obj = match (r, as_table) {
            (Some(r), true) => {
                let t = table(vec![row(r, rv, now())], rv, None, first_table);
                first_table = false;
                t
            }
            (Some(r), false) => edge_node(r, rv),
            (None, _) => deleted_stub(name, rv),
        };
        event_line(kind, obj)
    };
    let staleness;
    let start: std::result::Result<WatchStart, String> = match opts.resource_version.as_deref() {
        None | Some("0") => {
            let opts_all = ListOptions { limit: None, continue_: None, ..opts.clone() };
            match shared.hub.start(&shared.source, |c| list_page(c, &opts_all).0) {
                Ok(st) => {
                    staleness = st.staleness;
                    Ok(WatchStart { backlog: Vec::new(), initial: st.value, rv: st.rv, rx: st.rx })
                }
                Err(why) => return unavailable(&why),
            }
        }
        Some(v) => {
            staleness = shared.source.read(|_| ()).ok().and_then(|r| r.staleness);
            match v.parse::<u64>() {
                Ok(from) => match shared.hub.resume(from) {
                    Ok((backlog, rx)) => Ok(WatchStart { backlog, initial: Vec::new(), rv: from, rx }),
                    Err(StartError::Expired(m)) => Err(m),
                },
                Err(_) => Err(format!("resourceVersion {v:?} is not one this server issued; list again")),
            }
        }
    };
    let timeout = opts.timeout.unwrap_or(Duration::from_secs(1800));
    let bookmarks = opts.bookmarks.then_some(shared.cfg.bookmark_interval);
    tokio::spawn(async move {
        let _guard = guard;
        let WatchStart { backlog, initial, rv: mut last_rv, rx: mut hub_rx } = match start {
            Ok(s) => s,
            Err(message) => {
                let _ = tx.send(event_line("ERROR", status(410, "Expired", &message))).await;
                return;
            }
        };
        for r in &initial {
            if tx.send(render("ADDED", Some(r), r.name.as_str(), last_rv)).await.is_err() {
                return;
            }
        }
        drop(initial);
        for c in backlog {
            last_rv = last_rv.max(c.rv);
            if let Some((kind, r)) = classify(&opts, &c)
                && tx.send(render(kind, r, &c.name, c.rv)).await.is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(bookmarks.unwrap_or(Duration::from_secs(3600)));
        bookmark.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = bookmark.tick(), if bookmarks.is_some() => {
                    let obj = json!({ "kind": super::KIND, "apiVersion": object::api_version(), "metadata": { "resourceVersion": last_rv.to_string() } });
                    if tx.send(event_line("BOOKMARK", obj)).await.is_err() { return; }
                }
                m = hub_rx.recv() => match m {
                    Ok(HubMsg::Change(c)) => {
                        if c.rv <= last_rv { continue; }
                        last_rv = c.rv;
                        if let Some((kind, r)) = classify(&opts, &c)
                            && tx.send(render(kind, r, &c.name, c.rv)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(HubMsg::Progress(rv)) => last_rv = last_rv.max(rv),
                    Ok(HubMsg::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        let msg = "the watch fell behind the change history (a mass change, a slow reader, or the served \
                                   cache was replaced); list again";
                        let _ = tx.send(event_line("ERROR", status(410, "Expired", msg))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tx.closed() => return,
            }
        }
    });
    let stream =
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b)))));
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    let ct = if as_table { TABLE_CONTENT_TYPE } else { "application/json" };
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    warn_stale(&mut resp, staleness);
    resp
}
