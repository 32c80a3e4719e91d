//! One service's part of the index: its endpoints per port (from its EndpointSlices and the
//! Pods they name) and its answers (under its cluster IPs, DNS names and endpoint addresses,
//! and per namespace with consumer routes).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use strait_api::discovery::{
    destination_update::Update, Destination, DestinationUpdate, Endpoint, ProtocolHint,
};

use super::cache::{Keyed, PortEndpoints, PortMap, ServiceAnswers, ServiceEndpoints};
use super::{parse_port_list, MeshIndex, Naming, SidecarEvidence};
use crate::resources::{
    annotations, EndpointSlice, IntOrString, Pod, Resource, Service, ServicePort, SliceEndpoint,
};
use crate::routes::{routes_for, RouteSources};

/// Gives back the previous index's answer for a key when a recomputed one equals it.
pub(super) struct Reuse<'a>(pub(super) Option<&'a MeshIndex>);

impl Reuse<'_> {
    fn answer(&self, key: &str, fresh: Arc<DestinationUpdate>) -> Arc<DestinationUpdate> {
        match self.0.and_then(|p| p.answers.get(key)) {
            Some(old) if **old == *fresh => old.clone(),
            _ => fresh,
        }
    }

    fn consumer_answer(
        &self,
        key: &(String, String),
        fresh: Arc<DestinationUpdate>,
    ) -> Arc<DestinationUpdate> {
        match self.0.and_then(|p| p.consumer_answers.get(key)) {
            Some(old) if **old == *fresh => old.clone(),
            _ => fresh,
        }
    }
}

/// The Pod an EndpointSlice endpoint names, if it names one: `(namespace, name)`.
fn pod_ref<'a>(ep: &'a SliceEndpoint, ns: &'a str) -> Option<(&'a str, &'a str)> {
    let r = ep.target_ref.as_ref()?;
    if r.kind.as_deref().is_some_and(|k| k != "Pod") {
        return None;
    }
    Some((r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?))
}

/// A service's endpoints, per port, and the objects they were computed from.
pub(super) fn service_endpoints(
    arc: &Arc<Resource>,
    svc: &Service,
    slices: &[&Arc<Resource>],
    pods: &HashMap<(&str, &str), &Arc<Resource>>,
    naming: &Naming,
) -> ServiceEndpoints {
    let ns = svc.metadata.namespace.as_str();
    let name = svc.metadata.name.as_str();
    let slice_objects: Vec<&EndpointSlice> = slices
        .iter()
        .filter_map(|r| match &***r {
            Resource::EndpointSlice(s) => Some(s),
            _ => None,
        })
        .collect();
    let pod_refs = slice_objects
        .iter()
        .flat_map(|s| s.endpoints.as_deref().unwrap_or(&[]))
        .filter_map(|ep| pod_ref(ep, ns))
        .map(|(pod_ns, pod)| {
            (
                (pod_ns.to_string(), pod.to_string()),
                pods.get(&(pod_ns, pod)).map(|p| (*p).clone()),
            )
        })
        .collect();
    let ports = svc
        .spec
        .ports
        .iter()
        .map(|port| PortEndpoints {
            port: port.port,
            authority: format!("{name}.{ns}.svc.{}:{}", naming.cluster_domain, port.port),
            endpoints: Arc::new(endpoints_for(svc, port, &slice_objects, pods, naming)),
        })
        .collect();
    ServiceEndpoints {
        service: arc.clone(),
        slices: slices.iter().map(|s| (*s).clone()).collect(),
        pods: pod_refs,
        ports,
    }
}

/// A service's answers: under its cluster IPs and DNS names, under each endpoint's address,
/// and per namespace with consumer routes; with the backend endpoint lists its routes read.
pub(super) fn service_answers(
    svc: &Service,
    endpoints: &Arc<ServiceEndpoints>,
    route_sources: &RouteSources<'_>,
    port_endpoints: &PortMap,
    naming: &Naming,
    reuse: &Reuse<'_>,
) -> ServiceAnswers {
    let ns = svc.metadata.namespace.as_str();
    let name = svc.metadata.name.as_str();
    let deps = std::cell::RefCell::new(Vec::new());
    let resolve = |ns: &str, name: &str, port: u16| {
        let key = (ns.to_string(), name.to_string(), port);
        let found = port_endpoints.get(&key);
        deps.borrow_mut()
            .push((key, found.map(|(_, endpoints)| endpoints.clone())));
        found.map(|(authority, endpoints)| (authority.clone(), (**endpoints).clone()))
    };
    let opaque_ports = parse_port_list(
        svc.metadata
            .annotations
            .get(annotations::OPAQUE_PORTS)
            .map(String::as_str)
            .unwrap_or(""),
    );
    let mut answers = Vec::new();
    let mut consumer = Vec::new();
    let mut opaque = Vec::new();
    for (port, own) in svc.spec.ports.iter().zip(&endpoints.ports) {
        let authority = &own.authority;
        let endpoints = &own.endpoints;
        let protocol = protocol_hint(port, opaque_ports.contains(&port.port));
        if protocol == ProtocolHint::Opaque {
            // The serving workloads' proxies skip detection on that port too.
            for ep in endpoints.iter() {
                if let Ok(id) = ep.identity.parse::<strait_identity::SpiffeId>() {
                    opaque.push((
                        (id.namespace().to_string(), id.service_account().to_string()),
                        ep.port,
                    ));
                }
            }
        }
        let view = |client_ns: Option<&str>| {
            let (routes, unmatched_to_service) = routes_for(
                route_sources,
                ns,
                name,
                port.port,
                &naming.cluster_domain,
                &resolve,
                client_ns,
            );
            Arc::new(DestinationUpdate {
                update: Some(Update::Destination(Destination {
                    service: authority.clone(),
                    protocol: protocol as i32,
                    endpoints: (**endpoints).clone(),
                    routes,
                    unmatched_to_service,
                })),
            })
        };
        // A direct call to one endpoint (a pod IP) still goes through the mesh, with no
        // routes.
        for ep in endpoints.iter() {
            if let Ok(ip) = ep.ip.parse::<IpAddr>() {
                let key = SocketAddr::new(ip, ep.port as u16).to_string();
                let answer = Arc::new(DestinationUpdate {
                    update: Some(Update::Destination(Destination {
                        service: authority.clone(),
                        protocol: protocol as i32,
                        endpoints: vec![ep.clone()],
                        routes: Vec::new(),
                        unmatched_to_service: true,
                    })),
                });
                answers.push(Keyed {
                    answer: reuse.answer(&key, answer),
                    key: key.into(),
                    replaces: false,
                });
            }
        }
        let keys: Vec<String> = cluster_ips(svc)
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port.port).to_string())
            .chain(
                [
                    format!("{name}.{ns}.svc.{}", naming.cluster_domain),
                    format!("{name}.{ns}.svc"),
                    format!("{name}.{ns}"),
                ]
                .into_iter()
                .map(|host| format!("{host}:{}", port.port)),
            )
            .collect();
        let answer = view(None);
        for key in keys.iter() {
            answers.push(Keyed {
                answer: reuse.answer(key, answer.clone()),
                key: key.as_str().into(),
                replaces: true,
            });
        }
        for client_ns in route_sources.consumer_namespaces(ns, name, port.port) {
            let answer = view(Some(&client_ns));
            for key in &keys {
                let key = (client_ns.clone(), key.clone());
                consumer.push((key.clone(), reuse.consumer_answer(&key, answer.clone())));
            }
        }
    }
    ServiceAnswers {
        endpoints: endpoints.clone(),
        deps: deps.into_inner(),
        answers,
        consumer,
        opaque,
    }
}

fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for raw in svc
        .spec
        .cluster_ip
        .iter()
        .chain(svc.spec.cluster_ips.iter())
    {
        if raw.is_empty() || raw == "None" {
            continue;
        }
        match raw.parse() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => tracing::warn!(
                service = %svc.metadata.name,
                namespace = %svc.metadata.namespace,
                cluster_ip = %raw,
                "clusterIP is not an IP address; the service is reachable by name only"
            ),
        }
    }
    ips
}

fn endpoints_for(
    svc: &Service,
    port: &ServicePort,
    slices: &[&EndpointSlice],
    pods: &HashMap<(&str, &str), &Arc<Resource>>,
    naming: &Naming,
) -> Vec<Endpoint> {
    let ns = svc.metadata.namespace.as_str();
    let mut out = Vec::new();
    for slice in slices {
        let slice_ports = slice.ports.as_deref().unwrap_or(&[]);
        // EndpointSlice ports carry the service port's name ("" when the service has one port).
        let target_port = slice_ports
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == port.name)
            .and_then(|p| p.port)
            .or(match (&port.target_port, slice_ports.is_empty()) {
                (Some(IntOrString::Int(p)), true) => Some(*p),
                (None, true) => Some(port.port),
                _ => None,
            });
        let Some(target_port) = target_port else {
            continue;
        };
        let slice_sa = slice.metadata.annotations.get(annotations::SERVICE_ACCOUNT);
        let slice_meshed = !is_off(slice.metadata.annotations.get(annotations::MESHED));
        for ep in slice.endpoints.as_deref().unwrap_or(&[]) {
            if !ep.conditions.is_ready() {
                continue;
            }
            let pod = pod_ref(ep, ns)
                .and_then(|key| pods.get(&key))
                .and_then(|r| match &***r {
                    Resource::Pod(p) => Some(p),
                    _ => None,
                });
            let sa = pod
                .and_then(|p| p.spec.service_account_name.as_deref())
                .or(slice_sa.map(String::as_str))
                .unwrap_or("default");
            let pod_ok = |p: &Pod| {
                !p.spec.host_network
                    && !is_off(p.metadata.annotations.get(annotations::MESHED))
                    && !is_off(p.metadata.annotations.get(annotations::INJECT))
            };
            let meshed = slice_meshed
                && match naming.sidecars {
                    SidecarEvidence::UnlessOptedOut => pod.is_none_or(pod_ok),
                    SidecarEvidence::InjectedPodsOnly => pod.is_some_and(|p| {
                        pod_ok(p)
                            && p.metadata
                                .annotations
                                .get(annotations::INJECTED)
                                .map(String::as_str)
                                == Some("true")
                    }),
                };
            let mut labels = BTreeMap::new();
            if let Some(name) = ep.target_ref.as_ref().and_then(|r| r.name.clone()) {
                labels.insert("pod".to_string(), name);
            }
            if let Some(zone) = &ep.zone {
                labels.insert("zone".to_string(), zone.clone());
            }
            if let Some(node) = &ep.node_name {
                labels.insert("node".to_string(), node.clone());
            }
            for address in &ep.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    tracing::warn!(slice = %slice.metadata.name, %address, "endpoint address is not an IP; skipped");
                    continue;
                };
                out.push(Endpoint {
                    ip: ip.to_string(),
                    port: u32::from(target_port),
                    weight: 1,
                    // An endpoint without a sidecar has no identity to check.
                    identity: if meshed {
                        format!("spiffe://{}/ns/{ns}/sa/{sa}", naming.trust_domain)
                    } else {
                        String::new()
                    },
                    meshed,
                    labels: labels.clone().into_iter().collect(),
                });
            }
        }
    }
    out.sort_by(|a, b| (&a.ip, a.port).cmp(&(&b.ip, b.port)));
    out.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
    out
}

fn is_off(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("false" | "disabled"))
}

fn protocol_hint(port: &ServicePort, annotated_opaque: bool) -> ProtocolHint {
    if annotated_opaque {
        return ProtocolHint::Opaque;
    }
    match port.app_protocol.as_deref() {
        Some("kubernetes.io/h2c" | "h2c" | "http2" | "grpc") => ProtocolHint::Http2,
        Some("http" | "kubernetes.io/http") => ProtocolHint::Http1,
        Some("tcp" | "opaque") => ProtocolHint::Opaque,
        _ => ProtocolHint::Unknown,
    }
}
