//! Kubernetes mode: the mesh state comes from the API server.
//!
//! One kube-rs watcher per kind (list, then watch; relists after a 410 or a dropped stream,
//! with backoff on errors). Every object is turned into a [`Resource`] by the same parser local
//! mode uses for YAML files, so both modes build one [`MeshIndex`] from the same shapes. The
//! last known state keeps being served through API outages: a failing watcher changes nothing
//! until it has a fresh, complete list.
//!
//! Nothing here is per-replica state: several control planes can watch and serve at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};

mod pods;
pub use pods::WatchedPod;

use crate::index::{MeshIndex, Naming};
use crate::local::parse::{parse_object, ParseError};
use crate::resources::Resource;

/// A kind the control plane watches.
#[derive(Debug, Clone, Copy)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// Core kinds gate readiness; CRDs that may not be installed (SMI, Gateway API) do not.
    pub required: bool,
}

impl Kind {
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }

    /// `apiVersion` as objects carry it.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// Everything watched. The issuer Secret is not among them: it is mounted into the control
/// plane's pod (the kubelet keeps the files current), so the control plane needs no right to
/// read Secrets.
pub const KINDS: [Kind; 12] = [
    Kind {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        required: true,
    },
    Kind {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        required: true,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        required: true,
    },
    Kind {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        // Only annotations are read (the default inbound policy): readiness does not wait.
        required: false,
    },
    Kind {
        group: "split.smi-spec.io",
        version: "v1alpha4",
        kind: "TrafficSplit",
        plural: "trafficsplits",
        required: false,
    },
    Kind {
        group: "specs.smi-spec.io",
        version: "v1alpha4",
        kind: "HTTPRouteGroup",
        plural: "httproutegroups",
        required: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        required: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        required: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        version: "v1beta1",
        kind: "ReferenceGrant",
        plural: "referencegrants",
        required: false,
    },
    Kind {
        group: "policy.strait.io",
        version: "v1alpha1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        required: false,
    },
    Kind {
        group: "policy.strait.io",
        version: "v1alpha1",
        kind: "HTTPLocalRateLimitPolicy",
        plural: "httplocalratelimitpolicies",
        required: false,
    },
    Kind {
        group: "policy.strait.io",
        version: "v1alpha1",
        kind: "HTTPFault",
        plural: "httpfaults",
        required: false,
    },
];

/// An API object as the resources Strait uses. Objects from lists and watches carry no `kind`
/// (the list has it), so it is set from the watched kind.
pub fn to_resources(
    kind: &Kind,
    mut object: serde_json::Value,
) -> Result<Vec<Resource>, ParseError> {
    if let Some(map) = object.as_object_mut() {
        map.insert("kind".into(), kind.kind.into());
        map.entry("apiVersion")
            .or_insert_with(|| kind.api_version().into());
    }
    let value = serde_yaml_ng::to_value(&object).map_err(|e| ParseError::Invalid {
        doc: 1,
        message: e.to_string(),
    })?;
    parse_object(value)
}

type Key = (String, String);

/// What a watcher reports to the aggregator.
#[derive(Debug)]
enum Change {
    /// A relist started: objects until `Listed` replace the kind's state.
    Relist(usize),
    Apply(usize, Key, Vec<Resource>),
    Delete(usize, Key),
    Listed(usize),
}

/// The objects of every kind, and the relist in progress of each.
#[derive(Debug, Default)]
pub struct Store {
    current: Vec<BTreeMap<Key, Vec<Arc<Resource>>>>,
    relisting: HashMap<usize, BTreeMap<Key, Vec<Resource>>>,
    listed: Vec<bool>,
}

impl Store {
    pub fn new() -> Self {
        Self {
            current: vec![BTreeMap::new(); KINDS.len()],
            relisting: HashMap::new(),
            listed: vec![false; KINDS.len()],
        }
    }

    /// Applies one change; returns whether the served state changed.
    fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Relist(k) => {
                self.relisting.insert(k, BTreeMap::new());
                false
            }
            Change::Apply(k, key, resources) => {
                if let Some(buffer) = self.relisting.get_mut(&k) {
                    buffer.insert(key, resources);
                    return false;
                }
                let old = self.current[k].get(&key).map(Vec::as_slice).unwrap_or(&[]);
                let (shared, changed) = crate::resources::share(old, resources);
                if changed {
                    self.current[k].insert(key, shared);
                }
                changed
            }
            Change::Delete(k, key) => {
                if let Some(buffer) = self.relisting.get_mut(&k) {
                    buffer.remove(&key);
                    return false;
                }
                self.current[k].remove(&key).is_some()
            }
            Change::Listed(k) => {
                let fresh = self.relisting.remove(&k).unwrap_or_default();
                self.listed[k] = true;
                let current = &self.current[k];
                // Another set of keys, or any key whose objects differ.
                let mut changed = current.len() != fresh.len();
                let shared = fresh
                    .into_iter()
                    .map(|(key, objects)| {
                        let old = current.get(&key);
                        changed |= old.is_none();
                        let (shared, differs) =
                            crate::resources::share(old.map_or(&[][..], Vec::as_slice), objects);
                        changed |= differs;
                        (key, shared)
                    })
                    .collect();
                self.current[k] = shared;
                changed
            }
        }
    }

    /// Whether every required kind has been listed once.
    pub fn synced(&self) -> bool {
        KINDS
            .iter()
            .enumerate()
            .all(|(i, k)| !k.required || self.listed[i])
    }

    pub fn resources(&self) -> Vec<Arc<Resource>> {
        self.current
            .iter()
            .flat_map(|objects| objects.values().flatten().cloned())
            .collect()
    }
}

/// Watches one kind until the process ends, reporting changes. Pods are read into
/// [`WatchedPod`] directly; the other kinds go through the local-mode parser.
async fn watch_kind(client: kube::Client, index: usize, tx: mpsc::Sender<Change>) {
    let kind = KINDS[index];
    if kind.kind == "Pod" {
        let api: Api<WatchedPod> = Api::all(client);
        let convert = |_: &Key, p: WatchedPod| vec![Resource::Pod(p.pod)];
        watch_objects(api, kind, index, tx, convert, WatchedPod::key).await;
        return;
    }
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let convert = |key: &Key, object: DynamicObject| -> Vec<Resource> {
        let value = serde_json::to_value(object).unwrap_or_default();
        to_resources(&kind, value).unwrap_or_else(|error| {
            tracing::warn!(kind = kind.kind, namespace = %key.0, name = %key.1, %error, "ignoring an object Strait cannot use");
            Vec::new()
        })
    };
    let key = |object: &DynamicObject| {
        (
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        )
    };
    watch_objects(api, kind, index, tx, convert, key).await;
}

/// The watch loop of one kind: list, watch, relist on 410, retry with [`WatchBackoff`].
async fn watch_objects<K>(
    api: Api<K>,
    kind: Kind,
    index: usize,
    tx: mpsc::Sender<Change>,
    convert: impl Fn(&Key, K) -> Vec<Resource>,
    key: impl Fn(&K) -> Key,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    // Retried here rather than by kube-runtime's StreamBackoff, which would also wait after a
    // 410: an expired resourceVersion is a relist to do at once, not an outage.
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    let mut backoff = WatchBackoff::default();
    // Since when this kind's watch has been failing (one warning per outage).
    let mut failing: Option<std::time::Instant> = None;
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Some(Change::Relist(index)),
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                let key = key(&o);
                let resources = convert(&key, o);
                Some(Change::Apply(index, key, resources))
            }
            Ok(watcher::Event::Delete(o)) => Some(Change::Delete(index, key(&o))),
            Ok(watcher::Event::InitDone) => {
                if let Some(since) = failing.take() {
                    tracing::info!(kind = kind.kind, outage = ?since.elapsed(), "watching again");
                }
                Some(Change::Listed(index))
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::debug!(kind = kind.kind, "watch expired (410); relisting");
                None
            }
            Err(error) => {
                // Retried within WatchBackoff's cap; logged once per outage.
                tokio::time::sleep(backoff.next().unwrap_or(WatchBackoff::CAP)).await;
                if failing.is_none() {
                    failing = Some(std::time::Instant::now());
                    tracing::warn!(
                        kind = kind.kind,
                        %error,
                        cause = watch_failure_cause(&error, kind.required),
                        "watch failed; serving the last known state and retrying"
                    );
                }
                None
            }
        };
        if let Some(change) = change {
            kube::runtime::utils::Backoff::reset(&mut backoff);
            if tx.send(change).await.is_err() {
                return;
            }
        }
    }
}

/// The Kubernetes client the control plane uses: kube-client's own retry of 429/503/504
/// answers is off, because it hides an outage from the watchers and grows without bound (5 ms
/// doubling, 15 times: over a minute between the last tries). The watchers retry themselves
/// ([`WatchBackoff`], capped at 3 s) and TokenReview calls fail fast (the proxy retries its CSR).
pub fn client(mut config: kube::Config) -> Result<kube::Client, kube::Error> {
    config.default_retry = false;
    kube::Client::try_from(config)
}

/// Delays between retries of a failing watch: 250 ms doubling to a cap of 3 s, each between
/// half and all of that (jitter), back to the start after an event. A watch therefore resumes
/// within about 3 s of the API server's return, however long the outage (kube-runtime's
/// default grows to 30 s).
#[derive(Debug, Default)]
pub struct WatchBackoff {
    attempt: u32,
}

impl WatchBackoff {
    pub const CAP: Duration = Duration::from_secs(3);
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = Duration::from_millis(250)
            .saturating_mul(1 << self.attempt.min(4))
            .min(Self::CAP);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        Some(half + half.mul_f64(fastrand::f64()))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What most likely broke a watch, in words an operator can act on.
fn watch_failure_cause(error: &watcher::Error, required: bool) -> &'static str {
    let api = match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => Some(status.code),
            _ => None,
        },
        watcher::Error::WatchError(status) => Some(status.code),
        watcher::Error::NoResourceVersion => return "the API server sent no resourceVersion",
    };
    match api {
        Some(404) if !required => "the CRD is not installed (this kind is optional)",
        Some(404) => "the API server does not serve this kind",
        Some(401) => "the API server refused the control plane's credentials",
        Some(403) => "RBAC: the control plane's ClusterRole lacks list/watch on this kind",
        Some(410) => "the watch expired; relisting",
        Some(code) if code >= 500 => "the API server (or etcd) is failing",
        Some(_) => "the API server refused the request",
        None => "the API server is unreachable",
    }
}

/// Watches every kind and keeps `tx` up to date; `ready` turns true once the required kinds
/// are listed. Changes that arrive together are published as one update.
pub async fn run(
    client: kube::Client,
    naming: Naming,
    tx: watch::Sender<Arc<MeshIndex>>,
    ready: watch::Sender<bool>,
) {
    let (changes_tx, mut changes) = mpsc::channel(1024);
    for index in 0..KINDS.len() {
        tokio::spawn(watch_kind(client.clone(), index, changes_tx.clone()));
    }
    drop(changes_tx);
    let mut store = Store::new();
    while let Some(change) = changes.recv().await {
        let mut changed = store.apply(change);
        // Take what else is already queued, and what follows within 50 ms (a relist).
        let batch_end = tokio::time::Instant::now() + Duration::from_millis(50);
        while let Ok(Some(change)) = tokio::time::timeout_at(batch_end, changes.recv()).await {
            changed |= store.apply(change);
        }
        if store.synced() {
            if changed || !*ready.borrow() {
                let _span = tracing::info_span!("watch batch").entered();
                let index = MeshIndex::update(&store.resources(), &naming, Some(&tx.borrow()));
                tracing::info!(services = index.service_count(), "mesh state updated");
                let previous = tx.borrow().route_statuses().to_vec();
                crate::routes::log_status_changes(&previous, index.route_statuses());
                let changed: Vec<_> = index
                    .route_statuses()
                    .iter()
                    .filter(|s| !previous.contains(s))
                    .cloned()
                    .collect();
                if !changed.is_empty() {
                    tokio::spawn(write_route_statuses(client.clone(), changed));
                }
                tx.send_replace(Arc::new(index));
            }
            ready.send_if_modified(|r| !std::mem::replace(r, true));
        }
    }
}

/// Writes routes' conditions to their `status` subresource (RBAC: `httproutes/status` and
/// `grpcroutes/status` only). A failure is logged; the next change writes again.
pub async fn write_route_statuses(client: kube::Client, statuses: Vec<crate::routes::RouteStatus>) {
    let resource = |kind: &str| {
        KINDS
            .iter()
            .find(|k| k.kind == kind)
            .map(Kind::api_resource)
    };
    let (Some(http), Some(grpc)) = (resource("HTTPRoute"), resource("GRPCRoute")) else {
        return;
    };
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    for status in statuses {
        let resource = if status.grpc { &grpc } else { &http };
        let api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &status.namespace, resource);
        let body = crate::routes::status_json(&status, &now);
        let patch = kube::api::Patch::Merge(&body);
        if let Err(e) = api
            .patch_status(&status.name, &kube::api::PatchParams::default(), &patch)
            .await
        {
            strait_admin::log_limited!(tracing::Level::WARN, "route status", "patch", route = %format!("{}/{}", status.namespace, status.name), error = %e, "cannot write the route's status (RBAC: patch on httproutes/status, grpcroutes/status)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, ip: &str) -> Vec<Resource> {
        let object = serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip]}],
            "ports": [{"port": 8080}],
        });
        to_resources(&KINDS[1], object).expect("a slice")
    }

    #[test]
    fn watch_retries_are_capped_at_3s_and_restart_after_a_success() {
        use kube::runtime::utils::Backoff as _;
        let mut b = WatchBackoff::default();
        let first = b.next().expect("a delay");
        assert!(first >= Duration::from_millis(125) && first <= Duration::from_millis(250));
        let mut total = first;
        for _ in 0..50 {
            let d = b.next().expect("never gives up");
            assert!(d <= WatchBackoff::CAP, "{d:?}");
            total += d;
        }
        assert!(b.next().expect("a delay") >= WatchBackoff::CAP / 2);
        assert!(total > Duration::from_secs(60), "it keeps trying");
        b.reset();
        assert!(b.next().expect("a delay") <= Duration::from_millis(250));
    }

    #[test]
    fn watch_failures_name_their_cause() {
        let api = |code: u16| {
            watcher::Error::InitialListFailed(kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            ))
        };
        assert!(watch_failure_cause(&api(404), false).contains("CRD is not installed"));
        assert!(!watch_failure_cause(&api(404), true).contains("CRD"));
        assert!(watch_failure_cause(&api(403), true).contains("RBAC"));
        assert!(watch_failure_cause(&api(503), false).contains("etcd"));
        assert!(!watch_failure_cause(&api(503), false).contains("CRD"));
    }

    #[test]
    fn objects_without_a_kind_get_the_watched_one() {
        let r = slice("web-1", "10.0.0.1");
        assert!(matches!(&r[0], Resource::EndpointSlice(s) if s.service_name() == Some("web")));
    }

    #[test]
    fn a_relist_replaces_the_kind_atomically_and_readiness_needs_core_kinds() {
        let mut store = Store::new();
        let key = |n: &str| ("shop".to_string(), n.to_string());
        assert!(!store.apply(Change::Relist(1)));
        assert!(!store.apply(Change::Apply(1, key("a"), slice("a", "10.0.0.1"))));
        assert!(
            store.resources().is_empty(),
            "nothing served before the list is complete"
        );
        assert!(store.apply(Change::Listed(1)));
        assert_eq!(store.resources().len(), 1);
        assert!(!store.synced());
        for k in [0, 2] {
            store.apply(Change::Relist(k));
            store.apply(Change::Listed(k));
        }
        assert!(store.synced(), "CRD kinds do not gate readiness");
        // A relist after a 410 without `a` but with `b`: `a` goes, `b` comes, at once.
        store.apply(Change::Relist(1));
        store.apply(Change::Apply(1, key("b"), slice("b", "10.0.0.2")));
        assert_eq!(store.resources().len(), 1);
        assert!(store.apply(Change::Listed(1)));
        let names: Vec<_> = store
            .resources()
            .iter()
            .map(|r| match &**r {
                Resource::EndpointSlice(s) => s.metadata.name.clone(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(names, ["b"]);
        assert!(store.apply(Change::Delete(1, key("b"))));
        assert!(!store.apply(Change::Delete(1, key("b"))));
    }
}
