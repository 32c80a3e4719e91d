//! Inbound authorization: which clients may reach this workload, per port, as the control plane
//! pushes it (AuthorizationPolicy documents), failing closed.
//!
//! - Until the first policy arrives, every inbound connection is refused ("no inbound policy
//!   yet"); waiting never turns into allow-all. A proxy without a policy source (no control
//!   plane, or no identity to check clients by) has nothing to enforce and allows everyone,
//!   as it says at start.
//! - A selected port allows only clients that some rule of some selecting policy allows; a
//!   plaintext client has no identity and is denied.
//! - A port no policy selects follows the default policy: the pod's own setting, else the one
//!   the control plane sends (the namespace's annotation, else the cluster-wide flag).
//! - `namespace` rules match the namespace in this trust domain only.
//! - Policies about routes (path, method, headers) decide the HTTP requests they match, over
//!   the port's other policies; a request none matches is decided by the port's policies
//!   without routes, and refused when the port has only route policies (TCP connections too).
//! - Every change is announced ([`Authorizer::revoked`]): open TCP connections re-check and
//!   close when they are no longer allowed.
//! - The last policy received keeps being enforced while the control plane is away.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::Request;
use strait_api::discovery::allowed_client::Client;
use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{DefaultPolicy, InboundPolicy, InboundRequest};
use strait_identity::SpiffeId;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::ratelimit::{Limited, Limits};
use crate::router::{compile_match, CompiledMatch};

/// The policy in force, with what is compiled from it.
#[derive(Debug)]
struct Compiled {
    policy: InboundPolicy,
    /// Per entry of `policy.ports`: its route matches (empty: the whole port).
    routes: Vec<Vec<CompiledMatch>>,
    limits: Limits,
}

impl Compiled {
    fn new(policy: InboundPolicy) -> Self {
        Self {
            routes: policy
                .ports
                .iter()
                .map(|e| {
                    e.routes
                        .iter()
                        .map(|m| compile_match(m, &e.policy))
                        .collect()
                })
                .collect(),
            limits: Limits::compile(&policy.rate_limits),
            policy,
        }
    }
}

/// The policy in force.
#[derive(Debug)]
pub struct Authorizer {
    /// None until the first policy arrives.
    current: ArcSwapOption<Compiled>,
    /// The pod's own default policy, which wins over the control plane's.
    pod_default: Option<DefaultPolicy>,
    /// This workload's trust domain (for `namespace` rules and `cluster-authenticated`).
    trust_domain: String,
    /// Bumped on every change.
    version: watch::Sender<u64>,
}

/// Why a client was refused, for logs and metrics. Callers get a generic answer: policy names
/// stay in the proxy's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No policy has arrived yet.
    Pending,
    /// The policies that select the port allow none of the client's identities.
    Policies(String),
    /// No policy selects the port, and the default policy refuses the client.
    Default(DefaultPolicy),
    /// Policies about the request's route (path, method) allow none of the client's
    /// identities.
    Route(String),
    /// The port's policies are all about routes, and none is about this request (or this is
    /// a TCP connection).
    NoRoute(String),
}

impl Denied {
    /// A bounded label for the `refused` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Denied::Pending => "policy pending",
            Denied::Policies(_) => "unauthorized",
            Denied::Default(_) => "default policy",
            Denied::Route(_) => "route unauthorized",
            Denied::NoRoute(_) => "no authorized route",
        }
    }
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::Pending => f.write_str("no inbound policy yet"),
            Denied::Policies(p) => write!(f, "policies {p}"),
            Denied::Default(d) => write!(f, "default policy {}", default_name(*d)),
            Denied::Route(p) => write!(f, "route policies {p}"),
            Denied::NoRoute(p) => write!(f, "no route of policies {p} is this request's"),
        }
    }
}

pub use strait_api::default_policy::{name as default_name, parse as parse_default};

impl Authorizer {
    /// An authorizer that waits for the control plane's policy (refusing until it comes).
    pub fn pending(trust_domain: &str, pod_default: Option<DefaultPolicy>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            pod_default,
            trust_domain: trust_domain.to_string(),
            version: watch::Sender::new(0),
        }
    }

    /// An authorizer with no policy source: every client is allowed on every port.
    pub fn allow_all() -> Self {
        let a = Self::pending("", None);
        a.current
            .store(Some(Arc::new(Compiled::new(InboundPolicy::default()))));
        a
    }

    /// Whether `client` may reach `port` (a TCP connection: route policies do not allow it).
    pub fn authorize(&self, port: u16, client: Option<&SpiffeId>) -> Result<(), Denied> {
        self.check(port, client, None::<&Request<()>>)
    }

    /// Whether `client` may send `req` to `port`: policies about the request's route decide
    /// it when there are some, else the port's.
    pub fn authorize_request<B>(
        &self,
        port: u16,
        client: Option<&SpiffeId>,
        req: &Request<B>,
    ) -> Result<(), Denied> {
        self.check(port, client, Some(req))
    }

    /// Takes `req`'s tokens from the rate limits that count it.
    pub fn rate_limit<B>(
        &self,
        port: u16,
        client: Option<&SpiffeId>,
        req: &Request<B>,
    ) -> Result<(), Limited> {
        match self.current.load().as_deref() {
            Some(c) if !c.limits.is_empty() => c.limits.check(port, client, req),
            _ => Ok(()),
        }
    }

    fn check<B>(
        &self,
        port: u16,
        client: Option<&SpiffeId>,
        req: Option<&Request<B>>,
    ) -> Result<(), Denied> {
        let guard = self.current.load();
        let Some(compiled) = guard.as_deref() else {
            return Err(Denied::Pending);
        };
        let policy = &compiled.policy;
        let allowed = |entry: &strait_api::discovery::PortAuthorization| {
            client.is_some_and(|client| {
                entry
                    .allow
                    .iter()
                    .any(|a| allows(a.client.as_ref(), client, &self.trust_domain))
            })
        };
        // One pass without allocating decides; the names are gathered only for a refusal.
        let applies = |entry: &strait_api::discovery::PortAuthorization| {
            entry.port == 0 || entry.port == u32::from(port)
        };
        let about_request = |routes: &[CompiledMatch]| {
            !routes.is_empty() && req.is_some_and(|req| routes.iter().any(|m| m.matches(req)))
        };
        let (mut route_matched, mut port_selected, mut port_allowed, mut route_only) =
            (false, false, false, false);
        for (entry, routes) in policy.ports.iter().zip(&compiled.routes) {
            if !applies(entry) {
                continue;
            }
            if routes.is_empty() {
                port_selected = true;
                port_allowed |= allowed(entry);
            } else if about_request(routes) {
                if allowed(entry) {
                    return Ok(());
                }
                route_matched = true;
            } else {
                route_only = true;
            }
        }
        let names = |pick: &dyn Fn(&[CompiledMatch]) -> bool| {
            policy
                .ports
                .iter()
                .zip(&compiled.routes)
                .filter(|(e, r)| applies(e) && pick(r))
                .map(|(e, _)| e.policy.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        // Policies about this request's route decide it, over the port's.
        if route_matched {
            return Err(Denied::Route(names(&|r| about_request(r))));
        }
        if port_allowed {
            return Ok(());
        }
        if port_selected {
            return Err(Denied::Policies(names(&|r| r.is_empty())));
        }
        if route_only {
            return Err(Denied::NoRoute(names(&|r| !r.is_empty())));
        }
        let default = self.pod_default.unwrap_or(compiled.policy.default_policy());
        let allowed = match default {
            DefaultPolicy::AllUnauthenticated => true,
            DefaultPolicy::AllAuthenticated => client.is_some(),
            DefaultPolicy::ClusterAuthenticated => {
                client.is_some_and(|c| c.trust_domain() == self.trust_domain)
            }
            DefaultPolicy::Deny => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied::Default(default))
        }
    }

    /// Whether a Service declares this workload's `port` opaque (the control plane says).
    pub fn is_opaque(&self, port: u16) -> bool {
        self.current
            .load()
            .as_deref()
            .is_some_and(|p| p.policy.opaque_ports.contains(&u32::from(port)))
    }

    pub fn replace(&self, policy: InboundPolicy) {
        self.current.store(Some(Arc::new(Compiled::new(policy))));
        self.version.send_modify(|v| *v += 1);
    }

    /// Resolves once a change of policy no longer allows `client` on `port` (never, while it
    /// does): what an open TCP connection waits on.
    pub async fn revoked(&self, port: u16, client: Option<&SpiffeId>) -> Denied {
        let mut changes = self.version.subscribe();
        loop {
            if changes.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Err(denied) = self.authorize(port, client) {
                return denied;
            }
        }
    }

    /// Keeps the policy of `identity` current, reconnecting with backoff. `first` is told when
    /// the first answer is in.
    pub async fn watch(
        self: Arc<Self>,
        mut client: DiscoveryClient<Channel>,
        identity: SpiffeId,
        proxy: String,
        first: tokio::sync::oneshot::Sender<()>,
    ) {
        let mut first = Some(first);
        let mut failures: u32 = 0;
        loop {
            let request = InboundRequest {
                identity: identity.to_string(),
                proxy: proxy.clone(),
            };
            let result = async {
                let mut stream = client.watch_inbound(request).await?.into_inner();
                while let Some(policy) = stream.message().await? {
                    tracing::info!(
                        ports = policy.ports.len(),
                        default = default_name(self.pod_default.unwrap_or(policy.default_policy())),
                        "inbound policy updated"
                    );
                    self.replace(policy);
                    failures = 0;
                    if let Some(tx) = first.take() {
                        let _ = tx.send(());
                    }
                }
                Ok::<_, tonic::Status>(())
            }
            .await;
            if let Err(status) = result {
                tracing::warn!(code = ?status.code(), message = status.message(), "inbound policy stream failed; enforcing the last policy");
            }
            failures += 1;
            let delay = Duration::from_millis(100)
                .saturating_mul(1 << failures.min(6))
                .min(Duration::from_secs(5));
            tokio::time::sleep(delay).await;
        }
    }
}

fn allows(rule: Option<&Client>, client: &SpiffeId, trust_domain: &str) -> bool {
    match rule {
        Some(Client::Identity(id)) => id.parse::<SpiffeId>().is_ok_and(|id| &id == client),
        Some(Client::Namespace(ns)) => {
            client.namespace() == ns && client.trust_domain() == trust_domain
        }
        Some(Client::Authenticated(true)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_api::discovery::{AllowedClient, PortAuthorization};

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).expect("id")
    }

    fn entry(port: u32, allow: Vec<Client>) -> PortAuthorization {
        PortAuthorization {
            port,
            policy: format!("default/p{port}"),
            allow: allow
                .into_iter()
                .map(|c| AllowedClient { client: Some(c) })
                .collect(),
            routes: Vec::new(),
        }
    }

    #[test]
    fn route_policies_decide_their_requests_over_the_port() {
        use strait_api::discovery::{path_match, PathMatch, RouteMatch};
        let admin = |method: &str| RouteMatch {
            path: Some(PathMatch {
                kind: path_match::Kind::Prefix as i32,
                value: "/admin".into(),
            }),
            method: method.into(),
            ..Default::default()
        };
        let a = Authorizer::pending("cluster.local", None);
        let mut only_ops = entry(8080, vec![Client::Identity(id("ops", "admin").to_string())]);
        only_ops.routes = vec![admin("")];
        only_ops.policy = "default/admin".into();
        a.replace(InboundPolicy {
            ports: vec![
                only_ops.clone(),
                entry(8080, vec![Client::Namespace("web".into())]),
            ],
            ..Default::default()
        });
        let req = |path: &str| Request::get(path).body(()).expect("request");
        let web = id("web", "frontend");
        assert_eq!(a.authorize_request(8080, Some(&web), &req("/home")), Ok(()));
        assert_eq!(
            a.authorize_request(8080, Some(&web), &req("/admin/users")),
            Err(Denied::Route("default/admin".into())),
            "the route's policy decides, though the port's allows web"
        );
        assert_eq!(
            a.authorize_request(8080, Some(&id("ops", "admin")), &req("/admin/users")),
            Ok(())
        );
        // Only route policies on a port: other requests and TCP are refused.
        a.replace(InboundPolicy {
            ports: vec![only_ops],
            ..Default::default()
        });
        assert_eq!(
            a.authorize_request(8080, Some(&web), &req("/home")),
            Err(Denied::NoRoute("default/admin".into()))
        );
        assert!(a.authorize(8080, Some(&id("ops", "admin"))).is_err(), "TCP");
        assert!(
            a.authorize(9090, Some(&web)).is_ok(),
            "another port: default"
        );
    }

    #[test]
    fn unselected_ports_allow_everyone_selected_ports_only_what_rules_allow() {
        let a = Authorizer::pending("cluster.local", None);
        assert_eq!(
            a.authorize(8080, Some(&id("a", "client"))),
            Err(Denied::Pending),
            "no policy yet: refused, never allow-all"
        );
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![Client::Namespace("a".into())])],
            ..Default::default()
        });
        assert_eq!(a.authorize(8080, Some(&id("a", "client"))), Ok(()));
        assert_eq!(
            a.authorize(8080, Some(&id("b", "client"))),
            Err(Denied::Policies("default/p8080".into()))
        );
        assert!(
            a.authorize(8080, None).is_err(),
            "plaintext has no identity"
        );
        assert_eq!(
            a.authorize(9090, Some(&id("b", "client"))),
            Ok(()),
            "another port is not selected"
        );
    }

    #[test]
    fn exact_ids_authenticated_and_all_port_entries() {
        let a = Authorizer::pending("cluster.local", None);
        a.replace(InboundPolicy {
            default_policy: DefaultPolicy::AllUnauthenticated as i32,
            ports: vec![
                entry(
                    0,
                    vec![Client::Identity(
                        "spiffe://cluster.local/ns/x/sa/admin".into(),
                    )],
                ),
                entry(7000, vec![Client::Authenticated(true)]),
            ],
            ..Default::default()
        });
        assert!(a.authorize(8080, Some(&id("x", "admin"))).is_ok());
        assert!(a.authorize(8080, Some(&id("x", "other"))).is_err());
        assert!(
            a.authorize(7000, Some(&id("x", "other"))).is_ok(),
            "any mesh identity on 7000"
        );
        assert!(a.authorize(7000, None).is_err());
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![])],
            ..Default::default()
        });
        assert!(
            a.authorize(8080, Some(&id("x", "admin"))).is_err(),
            "an empty allow list denies all"
        );
    }

    #[test]
    fn each_default_policy_decides_unselected_ports() {
        let ours = id("a", "client");
        let foreign = SpiffeId::new("other.example", "a", "client").expect("id");
        let cases = [
            (DefaultPolicy::AllUnauthenticated, [true, true, true]),
            (DefaultPolicy::AllAuthenticated, [false, true, true]),
            (DefaultPolicy::ClusterAuthenticated, [false, true, false]),
            (DefaultPolicy::Deny, [false, false, false]),
        ];
        for (default, [plain, same, other]) in cases {
            // From the control plane...
            let a = Authorizer::pending("cluster.local", None);
            a.replace(InboundPolicy {
                default_policy: default as i32,
                ..Default::default()
            });
            assert_eq!(
                a.authorize(8080, None).is_ok(),
                plain,
                "{default:?} plaintext"
            );
            assert_eq!(
                a.authorize(8080, Some(&ours)).is_ok(),
                same,
                "{default:?} same domain"
            );
            assert_eq!(
                a.authorize(8080, Some(&foreign)).is_ok(),
                other,
                "{default:?} other domain"
            );
            // ... or the pod's own, which wins.
            let a = Authorizer::pending("cluster.local", Some(default));
            a.replace(InboundPolicy {
                default_policy: DefaultPolicy::Deny as i32,
                ..Default::default()
            });
            assert_eq!(
                a.authorize(8080, Some(&ours)).is_ok(),
                same,
                "pod {default:?}"
            );
        }
        assert_eq!(
            parse_default("cluster-authenticated"),
            Ok(DefaultPolicy::ClusterAuthenticated)
        );
        assert!(parse_default("allow").is_err());
    }

    #[test]
    fn namespace_rules_match_this_trust_domain_only() {
        let a = Authorizer::pending("cluster.local", None);
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![Client::Namespace("a".into())])],
            ..Default::default()
        });
        let foreign = SpiffeId::new("evil.example", "a", "client").expect("id");
        assert!(a.authorize(8080, Some(&foreign)).is_err());
        assert!(a.authorize(8080, Some(&id("a", "client"))).is_ok());
    }

    #[tokio::test]
    async fn a_policy_change_that_denies_a_client_is_announced() {
        let a = Arc::new(Authorizer::pending("cluster.local", None));
        let client = id("a", "client");
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![Client::Namespace("a".into())])],
            ..Default::default()
        });
        let watcher = {
            let (a, client) = (a.clone(), client.clone());
            tokio::spawn(async move { a.revoked(8080, Some(&client)).await })
        };
        tokio::task::yield_now().await;
        // A change that still allows it: nothing happens.
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![Client::Authenticated(true)])],
            ..Default::default()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!watcher.is_finished());
        // One that does not: announced at once.
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![Client::Namespace("b".into())])],
            ..Default::default()
        });
        let denied = tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("announced")
            .expect("task");
        assert_eq!(denied, Denied::Policies("default/p8080".into()));
    }

    #[test]
    fn allow_all_is_for_proxies_without_a_policy_source() {
        assert!(Authorizer::allow_all().authorize(1, None).is_ok());
    }
}
