//! What the index computed for each service, and from what: an update recomputes only the
//! services whose inputs changed, and reuses every other service's endpoints and answers as
//! they are (the same `Arc`s, so the fan-out skips them without comparing).
//!
//! Inputs are compared by identity (`Arc::ptr_eq`): the sources keep an object's `Arc` while
//! the object is unchanged (a file that was not rewritten, a watch event that changed nothing),
//! and the cache holds the `Arc`s it compares against, so an address cannot be reused by
//! another object. A changed object that happens to equal the old one only costs a recompute.
//!
//! A service's endpoints depend on its Service, its EndpointSlices and the Pods those name; its
//! answers on its endpoints, the route sources (any change of a route, grant, fault or split
//! recomputes every answer: they are few and rarely change) and the endpoints of the backend
//! services its routes resolved.

use std::collections::HashMap;
use std::sync::Arc;

use strait_api::discovery::{DestinationUpdate, Endpoint};

use super::Naming;
use crate::resources::Resource;

/// Service port -> (authority, endpoints), for the routes' backend resolution.
pub(super) type PortMap = HashMap<(String, String, u16), (String, Arc<Vec<Endpoint>>)>;

/// A service's `(namespace, name)`.
pub(super) type ServiceKey = (String, String);

/// A backend service port the routes read, and the endpoint list they saw (`None`: no such
/// port).
pub(super) type BackendLookup = ((String, String, u16), Option<Arc<Vec<Endpoint>>>);

/// A Pod's `(namespace, name)` and the object found under it, if any.
pub(super) type PodLookup = ((String, String), Option<Arc<Resource>>);

/// What the last index computed, per service.
#[derive(Debug, Default)]
pub(super) struct Cache {
    /// The naming the entries were computed with (a different one recomputes everything).
    pub naming: Option<Naming>,
    /// Every route source, in input order.
    pub routes: Vec<Arc<Resource>>,
    pub endpoints: HashMap<ServiceKey, Arc<ServiceEndpoints>>,
    pub answers: HashMap<ServiceKey, Arc<ServiceAnswers>>,
}

/// A service's endpoints, per port, and what they were computed from.
#[derive(Debug)]
pub(super) struct ServiceEndpoints {
    pub service: Arc<Resource>,
    pub slices: Vec<Arc<Resource>>,
    /// The Pods the slices' endpoints name, as they were found (or not).
    pub pods: Vec<PodLookup>,
    pub ports: Vec<PortEndpoints>,
}

#[derive(Debug)]
pub(super) struct PortEndpoints {
    pub port: u16,
    pub authority: String,
    pub endpoints: Arc<Vec<Endpoint>>,
}

impl ServiceEndpoints {
    /// Whether these were computed from exactly `service`, `slices` and the Pods as they are.
    pub fn computed_from(
        &self,
        service: &Arc<Resource>,
        slices: &[&Arc<Resource>],
        pods: &HashMap<(&str, &str), &Arc<Resource>>,
    ) -> bool {
        Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
            && self.pods.iter().all(|((ns, name), was)| {
                let now = pods.get(&(ns.as_str(), name.as_str()));
                match (was, now) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                }
            })
    }
}

/// One answer of a service: under which key, and whether it replaces an answer already there
/// (names and cluster IPs) or yields to it (an endpoint's own address: the first service in
/// namespace/name order keeps it).
#[derive(Debug)]
pub(super) struct Keyed {
    pub key: Arc<str>,
    pub answer: Arc<DestinationUpdate>,
    pub replaces: bool,
}

/// A service's answers, and what they were computed from.
#[derive(Debug)]
pub(super) struct ServiceAnswers {
    pub endpoints: Arc<ServiceEndpoints>,
    /// The backend endpoint lists the routes read, as they were.
    pub deps: Vec<BackendLookup>,
    /// In insertion order.
    pub answers: Vec<Keyed>,
    /// (client namespace, key) -> the answer of consumer routes.
    pub consumer: Vec<((String, String), Arc<DestinationUpdate>)>,
    /// (namespace, service account) -> a port its workloads serve opaque.
    pub opaque: Vec<((String, String), u32)>,
}

impl ServiceAnswers {
    /// Whether these answers still hold for `endpoints` and the backends as they are now.
    pub fn valid_for(&self, endpoints: &Arc<ServiceEndpoints>, ports: &PortMap) -> bool {
        Arc::ptr_eq(&self.endpoints, endpoints)
            && self
                .deps
                .iter()
                .all(|(key, was)| match (was, ports.get(key)) {
                    (Some(a), Some((_, b))) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                })
    }
}

/// Whether two lists hold the same objects (by identity), in the same order.
pub(super) fn same_objects(a: &[Arc<Resource>], b: &[Arc<Resource>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}
