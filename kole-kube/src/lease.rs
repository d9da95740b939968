//! Leader election on a `coordination.k8s.io/v1` Lease: one active controller per fleet.
//!
//! The algorithm is client-go's: the holder renews `renewTime` every
//! [`LeaseConfig::renew_interval`]; a candidate takes the lease over when the record it observed
//! has not changed for [`LeaseConfig::lease_duration`] *by its own clock* (so clock skew between
//! replicas does not matter). Every write carries the `resourceVersion` it read, so two candidates
//! cannot both win: the loser gets 409 Conflict.
//!
//! A leader that shuts down [releases](LeaderElector::release) the lease: it clears the holder
//! and shortens the duration to a second, so a standby (which polls every
//! [`LeaseConfig::retry_interval`]) takes over within about a second instead of waiting for expiry.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::{Error, Result};

/// Settings of a [`LeaderElector`]. A plain struct: change fields of [`LeaseConfig::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease (one per fleet or shard).
    pub name: String,
    /// This replica's identity (e.g. the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal. Default 15 s.
    pub lease_duration: Duration,
    /// How often the holder renews. Default 2 s.
    pub renew_interval: Duration,
    /// How often a candidate (a standby) looks at the lease again. Default 500 ms: a released lease
    /// is taken over within this, at the price of one GET per interval per standby.
    pub retry_interval: Duration,
}

impl LeaseConfig {
    /// Defaults for the Lease `namespace/name`, held as `identity`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(2),
            retry_interval: Duration::from_millis(500),
        }
    }
}

/// Campaigns for and holds a Lease. See the module documentation.
pub struct LeaderElector {
    cfg: LeaseConfig,
    api: Api<Lease>,
    observed: Option<(String, Instant)>,
    leading: bool,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector").field("cfg", &self.cfg).field("leading", &self.leading).finish_non_exhaustive()
    }
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn record_key(l: &Lease) -> String {
    let s = l.spec.as_ref();
    format!(
        "{:?}/{:?}/{:?}",
        s.and_then(|s| s.holder_identity.clone()),
        s.and_then(|s| s.renew_time.as_ref().map(|t| t.0.to_string())),
        s.and_then(|s| s.lease_transitions)
    )
}

impl LeaderElector {
    /// An elector over `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Self { cfg, api, observed: None, leading: false }
    }

    /// Whether the last step found this replica holding the lease.
    pub fn is_leader(&self) -> bool {
        self.leading
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX).max(1)),
            acquire_time: Some(acquired.unwrap_or_else(micro_now)),
            renew_time: Some(micro_now()),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: create, renew or take over the lease when allowed. Returns whether this replica
    /// leads afterwards. A lost race (409) is not an error: it returns `false`.
    pub async fn step(&mut self) -> Result<bool> {
        let op = |what: &str| format!("{what} Lease {}/{}", self.cfg.namespace, self.cfg.name);
        let pp = PostParams::default();
        let current = self.api.get_opt(&self.cfg.name).await.map_err(|source| Error::Kube { op: op("get"), source })?;
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                    spec: Some(self.spec(0, None)),
                };
                self.api.create(&pp, &lease).await.map(|_| true)
            }
            Some(mut lease) => {
                let holder = lease.spec.as_ref().and_then(|s| s.holder_identity.clone());
                let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions).unwrap_or(0);
                let key = record_key(&lease);
                let now = Instant::now();
                let expired = match &self.observed {
                    Some((k, at)) if *k == key => now.duration_since(*at) >= self.cfg.lease_duration,
                    _ => {
                        self.observed = Some((key, now));
                        false
                    }
                };
                let vacant = holder.as_deref().is_none_or(str::is_empty);
                if holder.as_deref() == Some(self.cfg.identity.as_str()) {
                    let acquired = lease.spec.as_ref().and_then(|s| s.acquire_time.clone());
                    lease.spec = Some(self.spec(transitions, acquired));
                    self.api.replace(&self.cfg.name, &pp, &lease).await.map(|_| true)
                } else if vacant || expired {
                    lease.spec = Some(self.spec(transitions.saturating_add(1), None));
                    self.api.replace(&self.cfg.name, &pp, &lease).await.map(|_| true)
                } else {
                    Ok(false)
                }
            }
        };
        self.leading = match result {
            Ok(l) => l,
            Err(kube::Error::Api(s)) if s.code == 409 => false,
            Err(source) => {
                self.leading = false;
                return Err(Error::Kube { op: op("write"), source });
            }
        };
        Ok(self.leading)
    }

    /// Gives the lease up when held: clears the holder and sets a one-second duration, so a standby
    /// takes it over at its next look instead of waiting for the lease to expire.
    pub async fn release(&mut self) -> Result<()> {
        if !self.leading {
            return Ok(());
        }
        self.leading = false;
        let op = format!("release Lease {}/{}", self.cfg.namespace, self.cfg.name);
        let Some(mut lease) =
            self.api.get_opt(&self.cfg.name).await.map_err(|source| Error::Kube { op: op.clone(), source })?
        else {
            return Ok(());
        };
        if let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str())
        {
            spec.holder_identity = None;
            // For electors that do not treat an empty holder as vacant (client-go does), a short
            // duration makes the record expire soon.
            spec.lease_duration_seconds = Some(1);
            self.api
                .replace(&self.cfg.name, &PostParams::default(), &lease)
                .await
                .map_err(|source| Error::Kube { op, source })?;
        }
        Ok(())
    }

    /// Campaigns until `shutdown` turns true, publishing leadership on `leading`; a leader that
    /// fails to renew within the lease duration steps down. Releases the lease on shutdown.
    pub async fn run(self, leading: watch::Sender<bool>, shutdown: watch::Receiver<bool>) {
        let (reachable, _) = watch::channel(false);
        self.run_reporting(leading, reachable, shutdown).await;
    }

    /// [`run`](Self::run), also publishing on `reachable` whether the last round reached the
    /// apiserver (a standby that cannot reach it could not take over: a readiness signal).
    pub async fn run_reporting(
        mut self,
        leading: watch::Sender<bool>,
        reachable: watch::Sender<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_renew = Instant::now();
        loop {
            let ok = match self.step().await {
                Ok(true) => {
                    last_renew = Instant::now();
                    true
                }
                Ok(false) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election step failed");
                    false
                }
            };
            reachable.send_if_modified(|r| std::mem::replace(r, ok) != ok);
            let lead = self.leading && last_renew.elapsed() < self.cfg.lease_duration;
            leading.send_if_modified(|l| std::mem::replace(l, lead) != lead);
            let wait = if lead { self.cfg.renew_interval } else { self.cfg.retry_interval };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
        }
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "releasing the lease failed");
        }
        leading.send_replace(false);
    }
}
