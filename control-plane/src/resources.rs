//! The Kubernetes-shaped objects the control plane understands, as plain serde structs.
//!
//! Local mode reads them from YAML; the Kubernetes mode (later) gets the same shapes from the API
//! server, so both feed one [`crate::index::MeshIndex`]. Only the fields Strait uses are modelled;
//! everything else in a document is ignored, as `kubectl apply` users expect.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

/// `metadata` of any object.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Bumped by the API server on every spec change (status conditions report it).
    #[serde(default)]
    pub generation: Option<i64>,
}

fn default_namespace() -> String {
    "default".to_string()
}

/// A `v1/Service`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Service {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `None` (the string) for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub app_protocol: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Kubernetes' `IntOrString`, as used by `targetPort`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IntOrString {
    Int(u16),
    String(String),
}

/// A `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<SliceEndpoint>>,
    #[serde(default)]
    pub ports: Option<Vec<SlicePort>>,
}

impl EndpointSlice {
    /// The service this slice belongs to (the `kubernetes.io/service-name` label).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get("kubernetes.io/service-name")
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

/// Kubernetes semantics: a nil `ready` means ready.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

impl EndpointConditions {
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A `v1/Pod`: only what discovery needs (its service account and whether it is meshed).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// A pod on the node's network has no sidecar of its own (never injected, never meshed).
    #[serde(default)]
    pub host_network: bool,
}

/// A `v1/Namespace`: its annotations (the default inbound policy of its workloads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Namespace {
    pub metadata: ObjectMeta,
}

/// A `v1/Secret`: local mode reads ServiceAccount tokens from those of type
/// `kubernetes.io/service-account-token` (annotation `kubernetes.io/service-account.name`,
/// key `token`, in `data` as base64 or in `stringData`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    pub metadata: ObjectMeta,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    #[serde(default)]
    pub string_data: BTreeMap<String, String>,
}

impl Secret {
    /// `(service account, token)` when this is a usable ServiceAccount token Secret.
    pub fn service_account_token(&self) -> Option<(String, String)> {
        if self.type_.as_deref() != Some("kubernetes.io/service-account-token") {
            return None;
        }
        let sa = self
            .metadata
            .annotations
            .get("kubernetes.io/service-account.name")?
            .clone();
        let token = match self.string_data.get("token") {
            Some(t) => t.clone(),
            None => {
                use base64::Engine as _;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(self.data.get("token")?.trim())
                    .ok()?;
                String::from_utf8(raw).ok()?
            }
        };
        (!token.is_empty()).then_some((sa, token))
    }
}

/// A `policy.strait.io/v1alpha1/AuthorizationPolicy`: which clients may reach a workload (its
/// service account, in the policy's namespace), on one port or all.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub target_ref: PolicyTarget,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    /// HTTP requests the policy is about (HTTPRoute match syntax: path, method, headers,
    /// queryParams); empty: every request and connection of the port.
    #[serde(default)]
    pub routes: Vec<HttpRouteMatch>,
}

/// `policy.strait.io/v1alpha1` HTTPLocalRateLimitPolicy: rate limits of a workload's inbound
/// HTTP requests (Linkerd's HTTPLocalRateLimitPolicy, targeting a ServiceAccount).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RateLimitPolicy {
    pub metadata: ObjectMeta,
    pub spec: RateLimitSpec,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    pub target_ref: PolicyTarget,
    #[serde(default)]
    pub port: Option<u16>,
    /// Only requests matching one of these count; empty: every request.
    #[serde(default)]
    pub routes: Vec<HttpRouteMatch>,
    /// Every client together.
    #[serde(default)]
    pub total: Option<Rate>,
    /// Each client identity (clients without one share a bucket).
    #[serde(default)]
    pub identity: Option<Rate>,
    #[serde(default)]
    pub overrides: Vec<RateOverride>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rate {
    pub requests_per_second: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateOverride {
    pub requests_per_second: u32,
    /// The clients: ServiceAccounts (`{kind: ServiceAccount, name, namespace}`).
    pub client_refs: Vec<ClientRef>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientRef {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyTarget {
    /// Only `ServiceAccount` is supported.
    pub kind: String,
    pub name: String,
}

/// One way to be allowed. A rule with several fields allows what any of them allows.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    #[serde(default)]
    pub identities: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub authenticated: bool,
}

/// Every object kind the control plane acts on. Documents of other kinds are skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Namespace(Namespace),
    Secret(Secret),
    AuthorizationPolicy(AuthorizationPolicy),
    TrafficSplit(TrafficSplit),
    HttpRouteGroup(HttpRouteGroup),
    HttpRoute(HttpRoute),
    ReferenceGrant(ReferenceGrant),
    HttpFault(HttpFault),
    GrpcRoute(GrpcRoute),
    RateLimitPolicy(RateLimitPolicy),
}

/// Annotations and labels Strait reads.
pub mod annotations {
    /// On a Service: comma-separated ports (or ranges `a-b`) that carry opaque TCP.
    pub const OPAQUE_PORTS: &str = "strait.io/opaque-ports";
    /// On an EndpointSlice (local mode): the service account of its endpoints when no Pod says.
    pub const SERVICE_ACCOUNT: &str = "strait.io/service-account";
    /// On an EndpointSlice or a Pod: `"false"` / `disabled` marks endpoints without a sidecar.
    pub const MESHED: &str = "strait.io/meshed";
    /// On a Pod: `disabled` opts it out of the mesh.
    pub const INJECT: &str = "strait.io/inject";
    /// On a Pod: set to `"true"` by the injector when it added the sidecar. In Kubernetes mode
    /// only such Pods are meshed.
    pub const INJECTED: &str = "strait.io/injected";
    /// On a Namespace (control plane) or a Pod (injector): what a port no AuthorizationPolicy
    /// selects allows: `all-unauthenticated`, `all-authenticated`, `cluster-authenticated`,
    /// `deny`.
    pub const DEFAULT_INBOUND_POLICY: &str = "strait.io/default-inbound-policy";
}

/// A weight: a number, or a Kubernetes quantity as SMI v1alpha1 wrote them (`500m`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Weight {
    Int(u32),
    Quantity(String),
}

impl Weight {
    /// The weight as a number (`500m` is 500 thousandths; kept in thousandths for all).
    pub fn thousandths(&self) -> Option<u64> {
        match self {
            Weight::Int(n) => Some(u64::from(*n) * 1000),
            Weight::Quantity(q) => match q.strip_suffix('m') {
                Some(milli) => milli.parse().ok(),
                None => q.parse::<u64>().ok().map(|n| n * 1000),
            },
        }
    }
}

/// SMI `split.smi-spec.io` TrafficSplit (v1alpha4; v1alpha2 has the same shape without
/// `matches`; v1alpha1 weights are quantities).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TrafficSplit {
    pub metadata: ObjectMeta,
    pub spec: TrafficSplitSpec,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TrafficSplitSpec {
    /// The root service: `web` or `web.shop.svc.cluster.local`.
    pub service: String,
    #[serde(default)]
    pub backends: Vec<SplitBackend>,
    #[serde(default)]
    pub matches: Vec<TypedRef>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SplitBackend {
    pub service: String,
    pub weight: Weight,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TypedRef {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
}

/// SMI `specs.smi-spec.io` HTTPRouteGroup: named matches a TrafficSplit refers to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HttpRouteGroup {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteGroupSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct HttpRouteGroupSpec {
    #[serde(default)]
    pub matches: Vec<GroupMatch>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupMatch {
    pub name: String,
    #[serde(default)]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    /// v1alpha4: a map; v1alpha3: a list of one-entry maps.
    #[serde(default)]
    pub headers: Option<GroupHeaders>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum GroupHeaders {
    Map(BTreeMap<String, String>),
    List(Vec<BTreeMap<String, String>>),
}

impl GroupHeaders {
    pub fn pairs(&self) -> Vec<(String, String)> {
        match self {
            GroupHeaders::Map(m) => m.clone().into_iter().collect(),
            GroupHeaders::List(l) => l.iter().flat_map(|m| m.clone()).collect(),
        }
    }
}

/// Gateway API `gateway.networking.k8s.io/v1beta1` ReferenceGrant: lives in the namespace of
/// what it lets others refer to; an HTTPRoute's `backendRef` to a Service in another namespace
/// needs one there.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ReferenceGrant {
    pub metadata: ObjectMeta,
    pub spec: ReferenceGrantSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ReferenceGrantSpec {
    #[serde(default)]
    pub from: Vec<GrantFrom>,
    #[serde(default)]
    pub to: Vec<GrantTo>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GrantFrom {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GrantTo {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}

impl ReferenceGrant {
    /// Whether this grant lets routes of `kind` (`HTTPRoute`, `GRPCRoute`) in `route_ns` refer
    /// to the Service `service` in the grant's namespace.
    pub fn allows_route_to_service(&self, kind: &str, route_ns: &str, service: &str) -> bool {
        self.spec.from.iter().any(|f| {
            f.group == "gateway.networking.k8s.io" && f.kind == kind && f.namespace == route_ns
        }) && self.spec.to.iter().any(|t| {
            t.group.is_empty()
                && t.kind == "Service"
                && t.name.as_deref().is_none_or(|n| n == service)
        })
    }
}

/// Gateway API `gateway.networking.k8s.io` HTTPRoute (v1, v1beta1), bound to Services (GAMMA).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HttpRoute {
    pub metadata: ObjectMeta,
    pub spec: HttpRouteSpec,
    /// Set when this route is a GRPCRoute in HTTPRoute terms ([`GrpcRoute::to_http`]).
    #[serde(skip)]
    pub grpc: bool,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRule {
    #[serde(default)]
    pub matches: Vec<HttpRouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default)]
    pub retry: Option<RouteRetry>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteMatch {
    #[serde(default)]
    pub path: Option<TypedValue>,
    #[serde(default)]
    pub headers: Vec<NamedMatch>,
    #[serde(default)]
    pub query_params: Vec<NamedMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TypedValue {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NamedMatch {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// Filters applied only to requests sent to this backend.
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteTimeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RouteRetry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub request_redirect: Option<RedirectSpec>,
    #[serde(default)]
    pub url_rewrite: Option<RewriteSpec>,
    #[serde(default)]
    pub request_mirror: Option<MirrorSpec>,
    #[serde(default)]
    pub extension_ref: Option<LocalObjectRef>,
}

/// `path` of RequestRedirect and URLRewrite.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathModifierSpec {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub status_code: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct RewriteSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorSpec {
    pub backend_ref: BackendRef,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FractionSpec {
    pub numerator: u32,
    #[serde(default)]
    pub denominator: Option<u32>,
}

/// An ExtensionRef: a local object by group, kind and name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LocalObjectRef {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// `policy.strait.io/v1alpha1` HTTPFault: fault injection for an HTTPRoute rule that names it
/// in an ExtensionRef filter (Istio's VirtualService `fault`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HttpFault {
    pub metadata: ObjectMeta,
    pub spec: HttpFaultSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpFaultSpec {
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    /// A duration, `250ms`, `2s`.
    pub fixed_delay: String,
    /// Share of requests delayed, 0-100 (fractions allowed: 0.5).
    pub percentage: f64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// The HTTP status answered (200-599).
    #[serde(default)]
    pub http_status: Option<u32>,
    /// The gRPC status gRPC requests get (1-16); default: the one the HTTP status maps to.
    #[serde(default)]
    pub grpc_status: Option<u32>,
    pub percentage: f64,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<HeaderValueSpec>,
    #[serde(default)]
    pub add: Vec<HeaderValueSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HeaderValueSpec {
    pub name: String,
    pub value: String,
}

impl HttpRoute {
    /// `HTTPRoute`, or `GRPCRoute` for a GRPCRoute in HTTPRoute terms.
    pub fn kind(&self) -> &'static str {
        if self.grpc {
            "GRPCRoute"
        } else {
            "HTTPRoute"
        }
    }
}

/// Gateway API `gateway.networking.k8s.io/v1` GRPCRoute, bound to Services (GAMMA).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GrpcRoute {
    pub metadata: ObjectMeta,
    pub spec: GrpcRouteSpec,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub filters: Vec<RouteFilter>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct GrpcRouteMatch {
    #[serde(default)]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default)]
    pub headers: Vec<NamedMatch>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct GrpcMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

/// GRPCRoute annotations for retries (the GRPCRoute API has no retry field): the gRPC status
/// codes retried (`strait.io/retry-grpc-codes`, e.g. `"14"`), the attempts after the first
/// (`strait.io/retry-attempts`, default 2) and the backoff (`strait.io/retry-backoff`).
pub const RETRY_ATTEMPTS: &str = "strait.io/retry-attempts";
pub const RETRY_BACKOFF: &str = "strait.io/retry-backoff";

/// The filters a GRPCRoute may have.
const GRPC_FILTERS: [&str; 4] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
];

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl GrpcRoute {
    /// The same route in HTTPRoute terms: a method match is a path match (`/service/method`:
    /// exact, a `/service` prefix, or a regular expression), every match also requires a gRPC
    /// content type, and retries come from the annotations. Everything else (GAMMA producer and
    /// consumer routes, ReferenceGrants, filters, weights, status) is then shared.
    pub fn to_http(&self) -> HttpRoute {
        let grpc_content = NamedMatch {
            type_: Some("RegularExpression".into()),
            name: "content-type".into(),
            value: "application/grpc(\\+.*)?".into(),
        };
        let path_of = |m: &GrpcMethodMatch| -> TypedValue {
            let regex = m.type_.as_deref() == Some("RegularExpression");
            let (service, method) = (m.service.as_deref(), m.method.as_deref());
            let (type_, value) = match (regex, service, method) {
                (false, Some(s), Some(me)) => ("Exact", format!("/{s}/{me}")),
                (false, Some(s), None) => ("PathPrefix", format!("/{s}")),
                (false, None, Some(me)) => {
                    ("RegularExpression", format!("/[^/]+/{}", regex_escape(me)))
                }
                (false, None, None) => ("PathPrefix", "/".into()),
                (true, s, me) => (
                    "RegularExpression",
                    format!("/{}/{}", s.unwrap_or("[^/]+"), me.unwrap_or("[^/]+")),
                ),
            };
            TypedValue {
                type_: Some(type_.into()),
                value: Some(value),
            }
        };
        let annotations = &self.metadata.annotations;
        let retry = annotations
            .get(crate::routes::RETRY_GRPC_CODES)
            .map(|_| RouteRetry {
                codes: Vec::new(),
                attempts: Some(
                    annotations
                        .get(RETRY_ATTEMPTS)
                        .and_then(|a| a.trim().parse().ok())
                        .unwrap_or(2),
                ),
                backoff: annotations.get(RETRY_BACKOFF).cloned(),
            });
        let rules = self
            .spec
            .rules
            .iter()
            .map(|r| {
                let matches = if r.matches.is_empty() {
                    vec![GrpcRouteMatch::default()]
                } else {
                    r.matches.clone()
                };
                let filters = r
                    .filters
                    .iter()
                    .map(|f| {
                        let mut f = f.clone();
                        if !GRPC_FILTERS.contains(&f.type_.as_str()) {
                            f.type_ = format!("{} (not a GRPCRoute filter)", f.type_);
                        }
                        f
                    })
                    .collect();
                HttpRouteRule {
                    matches: matches
                        .iter()
                        .map(|m| HttpRouteMatch {
                            path: Some(path_of(
                                m.method.as_ref().unwrap_or(&GrpcMethodMatch::default()),
                            )),
                            headers: m
                                .headers
                                .iter()
                                .cloned()
                                .chain([grpc_content.clone()])
                                .collect(),
                            query_params: Vec::new(),
                            method: Some("POST".into()),
                        })
                        .collect(),
                    backend_refs: r.backend_refs.clone(),
                    timeouts: None,
                    retry: retry.clone(),
                    filters,
                }
            })
            .collect();
        HttpRoute {
            metadata: self.metadata.clone(),
            spec: HttpRouteSpec {
                parent_refs: self.spec.parent_refs.clone(),
                rules,
            },
            grpc: true,
        }
    }
}

/// `fresh` as shared objects, keeping `old`'s `Arc` wherever the object at the same place is
/// unchanged, so that the index sees an unchanged object as the same one (it compares by
/// identity: see `index::cache`); and whether anything differs from `old`.
pub fn share(old: &[Arc<Resource>], fresh: Vec<Resource>) -> (Vec<Arc<Resource>>, bool) {
    let mut changed = old.len() != fresh.len();
    let shared = fresh
        .into_iter()
        .enumerate()
        .map(|(i, r)| match old.get(i) {
            Some(o) if **o == r => o.clone(),
            _ => {
                changed = true;
                Arc::new(r)
            }
        })
        .collect();
    (shared, changed)
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn unchanged_objects_keep_their_arc_and_changed_ones_get_a_new_one() {
        let ns = |name: &str| {
            Resource::Namespace(Namespace {
                metadata: ObjectMeta {
                    name: name.into(),
                    ..Default::default()
                },
            })
        };
        let (old, changed) = share(&[], vec![ns("a"), ns("b")]);
        assert!(changed);
        let (same, changed) = share(&old, vec![ns("a"), ns("b")]);
        assert!(!changed);
        assert!(Arc::ptr_eq(&old[1], &same[1]));
        let (new, changed) = share(&old, vec![ns("a"), ns("c"), ns("d")]);
        assert!(changed);
        assert!(Arc::ptr_eq(&old[0], &new[0]));
        assert!(!Arc::ptr_eq(&old[1], &new[1]));
        assert_eq!(*new[1], ns("c"));
        assert_eq!(new.len(), 3);
    }
}
