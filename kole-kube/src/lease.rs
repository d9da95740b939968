//! Leader election on a `coordination.k8s.io/v1` Lease: one active controller per fleet.
//!
//! The algorithm is client-go's: the holder renews `renewTime` every
//! [`LeaseConfig::renew_interval`]; a candidate takes the lease over when the record it observed
//! has not changed for [`LeaseConfig::lease_duration`] *by its own clock* (so clock skew between
//! replicas does not matter). Every write carries the `resourceVersion` it read, so two candidates
//! cannot both win: the loser gets 409 Conflict.
//!
//! **Patience and deadlines.** Every apiserver call is bounded by [`LeaseConfig::call_timeout`].
//! A leader keeps leading through transient failures (timeouts, 5xx, throttling, connection
//! resets) and retries every [`LeaseConfig::retry_interval`], until its *renew deadline* passes:
//! [`LeaseConfig::renew_deadline`] after the start of its last successful renewal (client-go's
//! `RenewDeadline`). Then it steps down, before the lease can expire for a standby
//! (`renew_deadline < lease_duration`). A leader that sees another holder (on a read, or as the
//! 409 Conflict of its renewal) has lost at once. Standbys that see errors just retry.
//!
//! **Fencing.** Each leadership term has a [fencing token](LeaderElector::fencing_token): the
//! Lease's `leaseTransitions` as this replica acquired it. It grows with every change of holder,
//! and this elector also counts a new term of the same holder (a restarted replica with the same
//! identity, or one that stepped down and took its own lease back) as a transition, so no two
//! terms share a token. Snapshot writes carry it (`SnapshotOptions::fencing_token`) and the
//! shared snapshot store refuses writes under an older token than it holds. The
//! `resourceVersion` was the alternative; it changes on every renewal, not per term, and the API
//! calls it opaque, so it cannot be compared for "newer".
//!
//! A leader that shuts down [releases](LeaderElector::release) the lease: it clears the holder
//! and shortens the duration to a second, so a standby (which polls every
//! [`LeaseConfig::retry_interval`]) takes over within about a second instead of waiting for expiry.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
// tokio's clock, so the deadlines run on paused time in tests.
use tokio::time::Instant;

use crate::{Error, Result};

/// Settings of a [`LeaderElector`]. A plain struct: change fields of [`LeaseConfig::new`].
///
/// They must keep `call_timeout < renew_deadline < lease_duration`
/// ([`validate`](Self::validate) checks): a leader steps down at its renew deadline, before a
/// standby can take the expired lease over.
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
    /// How long a leader keeps leading without a successful renewal (through timeouts and
    /// apiserver errors) before it steps down; below `lease_duration`. Default 10 s.
    pub renew_deadline: Duration,
    /// How often the holder renews. Default 2 s.
    pub renew_interval: Duration,
    /// How often a candidate (a standby) looks at the lease again, and how soon a leader retries
    /// a failed renewal. Default 500 ms: a released lease is taken over within this, at the price
    /// of one GET per interval per standby.
    pub retry_interval: Duration,
    /// Limit on each apiserver call; well under `renew_deadline`, so a hung call leaves time to
    /// retry. Default 3 s.
    pub call_timeout: Duration,
}

impl LeaseConfig {
    /// Defaults for the Lease `namespace/name`, held as `identity`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
            retry_interval: Duration::from_millis(500),
            call_timeout: Duration::from_secs(3),
        }
    }

    /// Checks `call_timeout < renew_deadline < lease_duration` and `renew_interval <
    /// renew_deadline`; the error says which setting to change.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Controller(format!("Lease settings: {m}")));
        if self.renew_deadline >= self.lease_duration {
            return bad(format!(
                "renew_deadline ({:?}) must be below lease_duration ({:?}), or a standby may take over \
                 while the old leader still leads",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.call_timeout >= self.renew_deadline || self.renew_interval >= self.renew_deadline {
            return bad(format!(
                "call_timeout ({:?}) and renew_interval ({:?}) must be below renew_deadline ({:?}), or one slow \
                 call makes the leader step down",
                self.call_timeout, self.renew_interval, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// Campaigns for and holds a Lease. See the module documentation.
pub struct LeaderElector {
    cfg: LeaseConfig,
    api: Api<Lease>,
    observed: Option<(String, Instant)>,
    leading: bool,
    token: watch::Sender<Option<u64>>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("cfg", &self.cfg)
            .field("leading", &self.leading)
            .field("fencing_token", &*self.token.borrow())
            .finish_non_exhaustive()
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

fn holder_of(l: &Lease) -> Option<&str> {
    l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty())
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    /// An elector over `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        let api = Api::namespaced(client, &cfg.namespace);
        Self { cfg, api, observed: None, leading: false, token: watch::channel(None).0 }
    }

    /// Whether the last step found this replica holding the lease.
    pub fn is_leader(&self) -> bool {
        self.leading
    }

    /// The fencing token of the current term (the Lease's `leaseTransitions` as this replica
    /// acquired it), `None` while not leading. It is the same for the whole term and larger in
    /// every later term, whoever holds it.
    pub fn fencing_token(&self) -> Option<u64> {
        *self.token.borrow()
    }

    /// Follows [`fencing_token`](Self::fencing_token); subscribe before moving the elector into
    /// [`run`](Self::run). The token of a term is published before the term's `leading = true`.
    pub fn subscribe_fencing_token(&self) -> watch::Receiver<Option<u64>> {
        self.token.subscribe()
    }

    fn op(&self, what: &str) -> String {
        format!("{what} Lease {}/{}", self.cfg.namespace, self.cfg.name)
    }

    /// One apiserver call, bounded by `call_timeout`.
    async fn call<T>(
        &self,
        what: &str,
        f: impl Future<Output = std::result::Result<T, kube::Error>>,
    ) -> Result<std::result::Result<T, kube::Error>> {
        tokio::time::timeout(self.cfg.call_timeout, f)
            .await
            .map_err(|_| Error::Timeout { op: self.op(what), after: self.cfg.call_timeout })
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

    fn won(&mut self, transitions: i32) -> bool {
        self.leading = true;
        let token = u64::try_from(transitions).unwrap_or(0);
        self.token.send_if_modified(|t| t.replace(token) != Some(token));
        true
    }

    fn lost(&mut self) -> bool {
        self.leading = false;
        self.token.send_if_modified(|t| t.take().is_some());
        false
    }

    /// One round: create, renew or take over the lease when allowed. Returns whether this replica
    /// leads afterwards. A lost race (409) is not an error: it returns `false`; so does a lease
    /// held by another replica, which ends this replica's term at once.
    ///
    /// An error (a timeout, an apiserver or transport error, a 409 on renewal that still shows
    /// this replica as the holder) leaves [`is_leader`](Self::is_leader) as it was: the caller
    /// decides, by the renew deadline, when a leader that cannot renew steps down (as
    /// [`run`](Self::run) does).
    pub async fn step(&mut self) -> Result<bool> {
        let pp = PostParams::default();
        let current = self.call("get", self.api.get_opt(&self.cfg.name)).await?;
        let current = current.map_err(|source| Error::Kube { op: self.op("get"), source })?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.cfg.name.clone()), ..Default::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.call("create", self.api.create(&pp, &lease)).await? {
                Ok(_) => Ok(self.won(0)),
                Err(e) if is_conflict(&e) => Ok(self.lost()),
                Err(source) => Err(Error::Kube { op: self.op("create"), source }),
            };
        };
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
        let holder = holder_of(&lease).map(str::to_owned);
        if holder.as_deref() == Some(self.cfg.identity.as_str()) {
            // Renewal within a term keeps its token; taking our own record back (a restart with
            // the same identity, or after stepping down) is a new term, so it counts a transition.
            let (t, acquired) = if self.leading {
                (transitions, lease.spec.as_ref().and_then(|s| s.acquire_time.clone()))
            } else {
                (transitions.saturating_add(1), None)
            };
            lease.spec = Some(self.spec(t, acquired));
            match self.call("renew", self.api.replace(&self.cfg.name, &pp, &lease)).await? {
                Ok(_) => Ok(self.won(t)),
                Err(e) if is_conflict(&e) => self.after_conflict(e).await,
                Err(source) => Err(Error::Kube { op: self.op("renew"), source }),
            }
        } else if holder.is_none() || expired {
            let t = transitions.saturating_add(1);
            lease.spec = Some(self.spec(t, None));
            match self.call("take over", self.api.replace(&self.cfg.name, &pp, &lease)).await? {
                Ok(_) => Ok(self.won(t)),
                Err(e) if is_conflict(&e) => Ok(self.lost()),
                Err(source) => Err(Error::Kube { op: self.op("take over"), source }),
            }
        } else {
            if self.leading {
                tracing::warn!(holder = ?holder, "the Lease has another holder: this term is over");
            }
            Ok(self.lost())
        }
    }

    /// Our renewal got 409: lost when the lease now shows another holder, else (our own earlier
    /// write, or a writer that left us as holder) an error to retry.
    async fn after_conflict(&mut self, conflict: kube::Error) -> Result<bool> {
        let current = self.call("get", self.api.get_opt(&self.cfg.name)).await?;
        let current = current.map_err(|source| Error::Kube { op: self.op("get"), source })?;
        match current.as_ref().and_then(holder_of) {
            Some(h) if h == self.cfg.identity => Err(Error::Kube { op: self.op("renew"), source: conflict }),
            holder => {
                if self.leading {
                    tracing::warn!(holder = ?holder, "renewing the Lease conflicted with another holder: this term is over");
                }
                Ok(self.lost())
            }
        }
    }

    /// Gives the lease up when held: clears the holder and sets a one-second duration, so a standby
    /// takes it over at its next look instead of waiting for the lease to expire.
    pub async fn release(&mut self) -> Result<()> {
        if !self.leading {
            return Ok(());
        }
        self.lost();
        let op = self.op("release");
        let Some(mut lease) = self
            .call("release", self.api.get_opt(&self.cfg.name))
            .await?
            .map_err(|source| Error::Kube { op: op.clone(), source })?
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
            self.call("release", self.api.replace(&self.cfg.name, &PostParams::default(), &lease))
                .await?
                .map_err(|source| Error::Kube { op, source })?;
        }
        Ok(())
    }

    /// Campaigns until `shutdown` turns true, publishing leadership on `leading`; a leader that
    /// cannot renew within [`LeaseConfig::renew_deadline`] steps down. Releases the lease on
    /// shutdown.
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
        // Never beyond the lease duration, whatever the settings say.
        let deadline_after = self.cfg.renew_deadline.min(self.cfg.lease_duration.mul_f32(0.9));
        let mut last_renew = Instant::now();
        loop {
            let started = Instant::now();
            let result = if self.leading {
                // The renew deadline bounds the whole round, whatever the calls' own timeouts.
                let deadline = last_renew + deadline_after;
                tokio::time::timeout_at(deadline, self.step())
                    .await
                    .unwrap_or_else(|_| Err(Error::Timeout { op: self.op("renew"), after: deadline_after }))
            } else {
                self.step().await
            };
            let ok = match result {
                Ok(true) => {
                    // From the start of the round: the lease's renewTime was taken before the call.
                    last_renew = started;
                    true
                }
                Ok(false) => true,
                Err(e) => {
                    if self.leading {
                        tracing::warn!(error = %e, "renewing the Lease failed; retrying until the renew deadline");
                    } else {
                        tracing::warn!(error = %e, "leader election step failed");
                    }
                    false
                }
            };
            if self.leading && last_renew.elapsed() >= deadline_after {
                tracing::warn!(
                    renew_deadline = ?deadline_after,
                    "could not renew the Lease within the renew deadline: stepping down"
                );
                self.lost();
            }
            reachable.send_if_modified(|r| std::mem::replace(r, ok) != ok);
            let lead = self.leading;
            leading.send_if_modified(|l| std::mem::replace(l, lead) != lead);
            let wait = if !lead {
                self.cfg.retry_interval
            } else {
                let interval = if ok { self.cfg.renew_interval } else { self.cfg.retry_interval };
                // Wake up in time to step down at the deadline, not an interval later.
                interval.min((last_renew + deadline_after).saturating_duration_since(Instant::now()))
            };
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

/// Mock tier, for error injection only: a Lease store behind kube's `tower-test` mock that can be
/// told to hang, fail or hand the lease to another holder. Time is tokio's paused clock, so the
/// deadlines are checked exactly and instantly.
#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Mode {
        /// Answers like an apiserver.
        Serve,
        /// Never answers.
        Hang,
        /// Answers 503.
        Fail,
        /// The next write by anyone is answered 409 after `other` took the lease.
        Steal,
    }

    struct Fake {
        mode: Mode,
        lease: Option<Value>,
        rv: u64,
        /// When the last successful write by the elector landed.
        last_write: Option<Instant>,
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("mock {code}"), "reason": reason, "code": code})
    }

    fn respond(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: &Value) {
        let resp = Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        send.send_response(resp);
    }

    /// An elector over a fake Lease store; `existing` is the Lease's spec at the start, if any.
    fn elector(existing: Option<Value>) -> (LeaderElector, Arc<Mutex<Fake>>) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let fake = Arc::new(Mutex::new(Fake {
            mode: Mode::Serve,
            lease: existing.map(|spec| {
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "fleet", "namespace": "ns", "resourceVersion": "1"}, "spec": spec})
            }),
            rv: 1,
            last_write: None,
        }));
        let state = fake.clone();
        tokio::spawn(async move {
            let mut hung = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().clone();
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let mut f = state.lock().unwrap();
                match f.mode {
                    Mode::Hang => {
                        hung.push(send);
                        continue;
                    }
                    Mode::Fail => {
                        respond(send, 503, &status(503, "ServiceUnavailable"));
                        continue;
                    }
                    Mode::Steal if method != Method::GET => {
                        let lease = f.lease.as_mut().unwrap();
                        lease["spec"]["holderIdentity"] = json!("other");
                        lease["spec"]["leaseTransitions"] =
                            json!(lease["spec"]["leaseTransitions"].as_i64().unwrap_or(0) + 1);
                        f.mode = Mode::Serve;
                        respond(send, 409, &status(409, "Conflict"));
                        continue;
                    }
                    _ => {}
                }
                match method {
                    Method::GET => match &f.lease {
                        Some(l) => respond(send, 200, l),
                        None => respond(send, 404, &status(404, "NotFound")),
                    },
                    _ => {
                        let mut sent: Value = serde_json::from_slice(&bytes).unwrap();
                        let current = f.lease.as_ref().map(|l| l["metadata"]["resourceVersion"].clone());
                        let fresh = match (&current, method == Method::POST) {
                            (None, true) => true,
                            (Some(rv), false) => sent["metadata"]["resourceVersion"] == *rv,
                            _ => false,
                        };
                        if !fresh {
                            respond(send, 409, &status(409, "Conflict"));
                            continue;
                        }
                        f.rv += 1;
                        sent["metadata"]["resourceVersion"] = json!(f.rv.to_string());
                        f.lease = Some(sent.clone());
                        f.last_write = Some(Instant::now());
                        respond(send, 200, &sent);
                    }
                }
            }
        });
        let cfg = LeaseConfig {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_interval: Duration::from_secs(2),
            retry_interval: Duration::from_millis(500),
            call_timeout: Duration::from_secs(3),
            ..LeaseConfig::new("ns", "fleet", "me")
        };
        cfg.validate().unwrap();
        (LeaderElector::new(client, cfg), fake)
    }

    /// Runs `e`, returning the leadership watch and every change of it with its time.
    type Changes = Arc<Mutex<Vec<(Instant, bool)>>>;

    fn run(e: LeaderElector) -> (Changes, watch::Receiver<bool>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (l, mut changes) = (log.clone(), rx.clone());
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let v = *changes.borrow_and_update();
                l.lock().unwrap().push((Instant::now(), v));
            }
        });
        tokio::spawn(e.run(tx, stop_rx));
        (log, rx, stop_tx)
    }

    /// Fails a test that hangs (on paused time, this fires even when nothing else would wake).
    async fn bounded(f: impl Future<Output = ()>) {
        tokio::time::timeout(Duration::from_secs(600), f).await.expect("test hung");
    }

    async fn wait_for(rx: &mut watch::Receiver<bool>, want: bool, within: Duration) {
        tokio::time::timeout(within, rx.wait_for(|l| *l == want))
            .await
            .unwrap_or_else(|_| panic!("leading did not turn {want} within {within:?}"))
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_apiserver_makes_the_leader_step_down_at_the_renew_deadline() {
        bounded(async {
            let (e, fake) = elector(None);
            let (_log, mut leading, _stop) = run(e);
            wait_for(&mut leading, true, Duration::from_secs(1)).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            fake.lock().unwrap().mode = Mode::Hang;
            // Without call timeouts the renewal hangs forever and the leader keeps believing it leads.
            wait_for(&mut leading, false, Duration::from_secs(30)).await;
            let stepped_down = Instant::now();
            let last = fake.lock().unwrap().last_write.unwrap();
            let since = stepped_down - last;
            assert!(
                since <= Duration::from_secs(10),
                "stepped down {since:?} after the last renewal, past the deadline"
            );
            assert!(since >= Duration::from_millis(9_900), "stepped down {since:?} after the last renewal, too early");
            assert!(since < Duration::from_secs(15), "a standby could have taken over while it led");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_do_not_end_a_term_before_the_renew_deadline() {
        bounded(async {
            let (e, fake) = elector(None);
            let token = e.subscribe_fencing_token();
            let (log, mut leading, _stop) = run(e);
            wait_for(&mut leading, true, Duration::from_secs(1)).await;
            assert_eq!(*token.borrow(), Some(0), "a new Lease starts at leaseTransitions 0");
            // 8 s of 503s, then the apiserver is back: the term goes on, with the same token.
            fake.lock().unwrap().mode = Mode::Fail;
            tokio::time::sleep(Duration::from_secs(8)).await;
            fake.lock().unwrap().mode = Mode::Serve;
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(*leading.borrow());
            assert_eq!(log.lock().unwrap().len(), 1, "leadership flapped: {:?}", log.lock().unwrap());
            assert_eq!(*token.borrow(), Some(0));
            // Errors past the deadline do end it.
            let last = fake.lock().unwrap().last_write.unwrap();
            fake.lock().unwrap().mode = Mode::Fail;
            wait_for(&mut leading, false, Duration::from_secs(30)).await;
            let since = Instant::now() - last;
            assert!((Duration::from_millis(9_900)..=Duration::from_secs(10)).contains(&since), "{since:?}");
            assert_eq!(*token.borrow(), None, "no token outside a term");
            // Once the apiserver answers again, it takes its own lease back as a new term.
            fake.lock().unwrap().mode = Mode::Serve;
            wait_for(&mut leading, true, Duration::from_secs(5)).await;
            assert_eq!(*token.borrow(), Some(1), "a new term of the same holder has a new token");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflict_showing_another_holder_ends_the_term_at_once() {
        bounded(async {
            let (e, fake) = elector(None);
            let (_log, mut leading, _stop) = run(e);
            wait_for(&mut leading, true, Duration::from_secs(1)).await;
            let stolen = Instant::now();
            fake.lock().unwrap().mode = Mode::Steal;
            wait_for(&mut leading, false, Duration::from_secs(30)).await;
            // At the next renewal (2 s), not at the renew deadline.
            assert!(Instant::now() - stolen <= Duration::from_secs(2), "{:?}", Instant::now() - stolen);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn standbys_retry_through_errors_and_tokens_count_terms() {
        bounded(async {
            // Held by another replica, not expired: a standby stands by through errors.
            let held = json!({"holderIdentity": "other", "leaseDurationSeconds": 15, "leaseTransitions": 4,
                              "renewTime": "2024-01-01T00:00:00.000000Z"});
            let (mut e, fake) = elector(Some(held));
            assert!(!e.step().await.unwrap());
            fake.lock().unwrap().mode = Mode::Fail;
            assert!(e.step().await.is_err());
            assert!(!e.is_leader());
            fake.lock().unwrap().mode = Mode::Serve;
            // The record has not changed for the lease duration by our clock: take over, token 5.
            tokio::time::sleep(Duration::from_secs(15)).await;
            assert!(e.step().await.unwrap());
            assert_eq!(e.fencing_token(), Some(5));
            assert!(e.step().await.unwrap(), "renewal");
            assert_eq!(e.fencing_token(), Some(5), "renewals keep the term's token");

            // A replica restarted with the same identity finds its own record: a new term, token 8.
            let mine = json!({"holderIdentity": "me", "leaseDurationSeconds": 15, "leaseTransitions": 7});
            let (mut e, _fake) = elector(Some(mine));
            assert!(e.step().await.unwrap());
            assert_eq!(e.fencing_token(), Some(8));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_call_is_an_error_naming_the_lease() {
        bounded(async {
            let (mut e, fake) = elector(None);
            fake.lock().unwrap().mode = Mode::Hang;
            let err = e.step().await.unwrap_err().to_string();
            assert_eq!(err, "get Lease ns/fleet timed out after 3s");
        })
        .await;
    }

    #[test]
    fn settings_are_checked() {
        let ok = LeaseConfig::new("ns", "fleet", "me");
        ok.validate().unwrap();
        let bad = LeaseConfig { renew_deadline: Duration::from_secs(15), ..ok.clone() };
        assert!(bad.validate().unwrap_err().to_string().contains("renew_deadline"));
        let bad = LeaseConfig { call_timeout: Duration::from_secs(10), ..ok };
        assert!(bad.validate().unwrap_err().to_string().contains("call_timeout"));
    }
}
