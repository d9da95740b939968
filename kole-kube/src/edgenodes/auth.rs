//! Authentication and authorization as the aggregation layer expects.
//!
//! - **Authentication**: the kube-apiserver's aggregator connects with its front-proxy client
//!   certificate, signed by the `requestheader` CA, and names the user in request headers. This
//!   server trusts those headers only on a connection whose client certificate verifies against
//!   that CA and whose common name is in `requestheader-allowed-names` (when the list is not
//!   empty), all read from the `kube-system/extension-apiserver-authentication` ConfigMap, which
//!   the apiserver publishes. Any other connection is answered `401` (health endpoints aside).
//! - **Authorization**: every resource request is put to the apiserver as a
//!   `SubjectAccessReview`, so RBAC on `edgenodes.edge.kole.dev` works as on any resource.
//!   Decisions are reused for `authz_cache_ttl` (allowed and denied alike), as kube's delegating
//!   authorizer does. Discovery and the OpenAPI document need only the verified front proxy: they
//!   say what exists, not what is in it (the apiserver lets every authenticated user read them).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::{Api, Client};

use crate::{Error, Result};

/// Who the aggregator says is asking.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes (`X-Remote-Extra-<key>`), keys lowercased.
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a request does, in SubjectAccessReview terms.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestAttributes {
    /// `get`, `list` or `watch`.
    pub verb: String,
    /// The node's name for `get` (and a watch of one node).
    pub name: Option<String>,
}

/// An authorization answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Denied, with the authorizer's reason (may be empty).
    Deny(String),
}

/// Decides whether a user may do something to `edgenodes`.
#[async_trait]
pub trait Authorizer: Send + Sync {
    /// The decision; an error means no decision could be had (answered `500`, not `403`).
    async fn authorize(&self, user: &UserInfo, attrs: &RequestAttributes) -> Result<Decision>;
}

/// The aggregator's request-header authentication settings.
#[derive(Clone, Debug)]
pub struct FrontProxyConfig {
    /// PEM of the CA that signs the front proxy's client certificate.
    pub client_ca_pem: String,
    /// Common names the front proxy's certificate may have (empty: any the CA signed).
    pub allowed_names: Vec<String>,
    /// Headers naming the user (first present wins), e.g. `X-Remote-User`.
    pub username_headers: Vec<String>,
    /// Headers naming groups (every value of each), e.g. `X-Remote-Group`.
    pub group_headers: Vec<String>,
    /// Prefixes of extra-attribute headers, e.g. `X-Remote-Extra-`.
    pub extra_headers_prefix: Vec<String>,
}

/// Where the apiserver publishes its request-header settings.
pub const AUTHENTICATION_CONFIGMAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");

impl FrontProxyConfig {
    /// Reads the settings the apiserver publishes in `kube-system/extension-apiserver-authentication`
    /// (RBAC: the `extension-apiserver-authentication-reader` Role there).
    pub async fn from_cluster(client: &Client) -> Result<Self> {
        let (ns, name) = AUTHENTICATION_CONFIGMAP;
        let op = format!("read ConfigMap {ns}/{name}");
        let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .map_err(|source| Error::Kube { op: op.clone(), source })?;
        let data = cm.data.unwrap_or_default();
        let list = |key: &str| -> Result<Vec<String>> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(s) if s.trim().is_empty() => Ok(Vec::new()),
                Some(s) => {
                    serde_json::from_str(s).map_err(|source| Error::Json { what: format!("{op}: {key}"), source })
                }
            }
        };
        let client_ca_pem = data.get("requestheader-client-ca-file").cloned().unwrap_or_default();
        if client_ca_pem.trim().is_empty() {
            return Err(Error::Controller(format!(
                "{op}: no requestheader-client-ca-file: the apiserver runs without --requestheader-client-ca-file, so it \
                 cannot proxy to aggregated APIs; start it with the front-proxy flags (see docs/kubectl.md)"
            )));
        }
        Ok(Self {
            client_ca_pem,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_headers_prefix: list("requestheader-extra-headers-prefix")?,
        })
    }

    /// The user the headers name; `None` when no username header is present.
    pub fn user(&self, headers: &http::HeaderMap) -> Option<UserInfo> {
        let name = self
            .username_headers
            .iter()
            .find_map(|h| headers.get(h.as_str()).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()))?
            .to_owned();
        let groups = self
            .group_headers
            .iter()
            .flat_map(|h| headers.get_all(h.as_str()).iter().filter_map(|v| v.to_str().ok()).map(str::to_owned))
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // Header names arrive lower-cased.
        let prefixes: Vec<String> = self.extra_headers_prefix.iter().map(|p| p.to_ascii_lowercase()).collect();
        for (k, v) in headers {
            let key = k.as_str();
            for p in &prefixes {
                if let Some(rest) = key.strip_prefix(p.as_str())
                    && let Ok(v) = v.to_str()
                {
                    // Keys are percent-encoded by the front proxy (RFC 3986 unreserved kept).
                    let rest = percent_decode(rest);
                    extra.entry(rest.to_ascii_lowercase()).or_default().push(v.to_owned());
                }
            }
        }
        Some(UserInfo { name, groups, extra })
    }

    /// Whether a verified client certificate's common name may act as the front proxy.
    pub fn allows(&self, common_name: Option<&str>) -> bool {
        self.allowed_names.is_empty() || common_name.is_some_and(|cn| self.allowed_names.iter().any(|n| n == cn))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        if b[i] == b'%'
            && let Some(Ok(v)) = hex.map(|h| u8::from_str_radix(h, 16))
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

type CacheKey = (UserInfo, RequestAttributes);

/// Authorization by `SubjectAccessReview` against the apiserver (RBAC: `create` on
/// `subjectaccessreviews.authorization.k8s.io`, which the `system:auth-delegator` ClusterRole
/// grants), with decisions cached for `ttl`.
pub struct SubjectAccessReviewer {
    client: Client,
    ttl: Duration,
    cache: Mutex<HashMap<CacheKey, (Decision, Instant)>>,
    timeout: Duration,
}

impl std::fmt::Debug for SubjectAccessReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectAccessReviewer").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// Cached decisions at most (then the cache is cleared: a flood of distinct users costs reviews,
/// not memory).
const MAX_CACHED_DECISIONS: usize = 10_000;

impl SubjectAccessReviewer {
    /// Reviews through `client`, caching decisions for `ttl`.
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self { client, ttl, cache: Mutex::new(HashMap::new()), timeout: Duration::from_secs(10) }
    }
}

#[async_trait]
impl Authorizer for SubjectAccessReviewer {
    async fn authorize(&self, user: &UserInfo, attrs: &RequestAttributes) -> Result<Decision> {
        let key = (user.clone(), attrs.clone());
        if let Some((d, at)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(d.clone());
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(super::GROUP.to_owned()),
                    version: Some(super::VERSION.to_owned()),
                    resource: Some(super::RESOURCE.to_owned()),
                    verb: Some(attrs.verb.clone()),
                    name: attrs.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let op = format!("SubjectAccessReview for {} {} edgenodes", user.name, attrs.verb);
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = tokio::time::timeout(self.timeout, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| Error::Timeout { op: op.clone(), after: self.timeout })?
            .map_err(|source| Error::Kube { op, source })?;
        let status = answer.status.unwrap_or_default();
        let d = if status.allowed { Decision::Allow } else { Decision::Deny(status.reason.unwrap_or_default()) };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_DECISIONS {
            cache.clear();
        }
        cache.insert(key, (d.clone(), Instant::now()));
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FrontProxyConfig {
        FrontProxyConfig {
            client_ca_pem: String::new(),
            allowed_names: vec!["front-proxy-client".into()],
            username_headers: vec!["X-Remote-User".into()],
            group_headers: vec!["X-Remote-Group".into()],
            extra_headers_prefix: vec!["X-Remote-Extra-".into()],
        }
    }

    #[test]
    fn the_user_comes_from_the_configured_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "ops".parse().unwrap());
        h.append("x-remote-group", "system:authenticated".parse().unwrap());
        h.insert("x-remote-extra-scopes%2fone", "a".parse().unwrap());
        let u = cfg().user(&h).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, vec!["ops", "system:authenticated"]);
        assert_eq!(u.extra.get("scopes/one"), Some(&vec!["a".to_owned()]));
        assert!(cfg().user(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn only_allowed_names_act_as_the_front_proxy() {
        assert!(cfg().allows(Some("front-proxy-client")));
        assert!(!cfg().allows(Some("node-a")));
        assert!(!cfg().allows(None));
        let any = FrontProxyConfig { allowed_names: vec![], ..cfg() };
        assert!(any.allows(Some("whoever-the-ca-signed")));
    }
}
