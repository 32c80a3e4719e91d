//! Inbound authorization: which clients may reach this workload, per port, as the control plane
//! pushes it (AuthorizationPolicy documents).
//!
//! A port no policy selects allows every client. A selected port allows only clients that
//! some rule of some selecting policy allows; a plaintext client has no identity and is denied.
//! The last policy received keeps being enforced while the control plane is away.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use strait_api::discovery::allowed_client::Client;
use strait_api::discovery::discovery_client::DiscoveryClient;
use strait_api::discovery::{InboundPolicy, InboundRequest};
use strait_identity::SpiffeId;
use tonic::transport::Channel;

/// The policy in force.
#[derive(Debug, Default)]
pub struct Authorizer {
    current: ArcSwap<InboundPolicy>,
}

/// Why a client was refused: the policies that select the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub String);

impl Authorizer {
    /// Whether `client` may reach `port`.
    pub fn authorize(&self, port: u16, client: Option<&SpiffeId>) -> Result<(), Denied> {
        let policy = self.current.load();
        let mut selecting = Vec::new();
        for entry in &policy.ports {
            if entry.port != 0 && entry.port != u32::from(port) {
                continue;
            }
            if let Some(client) = client {
                if entry
                    .allow
                    .iter()
                    .any(|a| allows(a.client.as_ref(), client))
                {
                    return Ok(());
                }
            }
            selecting.push(entry.policy.as_str());
        }
        if selecting.is_empty() {
            Ok(())
        } else {
            Err(Denied(selecting.join(", ")))
        }
    }

    pub fn replace(&self, policy: InboundPolicy) {
        self.current.store(Arc::new(policy));
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
                    tracing::info!(ports = policy.ports.len(), "inbound policy updated");
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

fn allows(rule: Option<&Client>, client: &SpiffeId) -> bool {
    match rule {
        Some(Client::Identity(id)) => id.parse::<SpiffeId>().is_ok_and(|id| &id == client),
        Some(Client::Namespace(ns)) => client.namespace() == ns,
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
        }
    }

    #[test]
    fn unselected_ports_allow_everyone_selected_ports_only_what_rules_allow() {
        let a = Authorizer::default();
        assert_eq!(a.authorize(8080, None), Ok(()), "no policy: open");
        a.replace(InboundPolicy {
            ports: vec![entry(8080, vec![Client::Namespace("a".into())])],
        });
        assert_eq!(a.authorize(8080, Some(&id("a", "client"))), Ok(()));
        assert_eq!(
            a.authorize(8080, Some(&id("b", "client"))),
            Err(Denied("default/p8080".into()))
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
        let a = Authorizer::default();
        a.replace(InboundPolicy {
            ports: vec![
                entry(
                    0,
                    vec![Client::Identity(
                        "spiffe://cluster.local/ns/x/sa/admin".into(),
                    )],
                ),
                entry(7000, vec![Client::Authenticated(true)]),
            ],
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
        });
        assert!(
            a.authorize(8080, Some(&id("x", "admin"))).is_err(),
            "an empty allow list denies all"
        );
    }
}
