//! The control plane's admin server: `/live`, `/ready` (the state is loaded: the directory was
//! read, or the API's core kinds were listed) and `/metrics` (Prometheus).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::index::MeshIndex;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `destination` or `inbound`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    /// `signed` or `refused`.
    pub result: &'static str,
    /// Why a CSR was refused: `token`, `token_review`, `identity`, `csr`; empty when signed.
    pub reason: &'static str,
}

/// The control plane's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    services: Gauge,
    ready: Gauge,
    unmatched_policy_ports: Gauge,
    /// Open discovery streams, by kind.
    pub streams: Family<KindLabels, Gauge>,
    /// Answers pushed to proxies, by kind.
    pub pushes: Family<KindLabels, Counter>,
    /// Proxies with at least one open stream.
    pub connected: Gauge,
    /// CSRs answered, by result.
    pub certificates: Family<CertLabels, Counter>,
    proxies: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl Default for Metrics {
    fn default() -> Self {
        // `process_*` at the root (standard names), everything else under the prefix.
        let mut root = Registry::default();
        strait_admin::process::register(&mut root, "strait", "control-plane");
        let registry = root.sub_registry_with_prefix("strait_control_plane");
        strait_admin::otel::counters().register(registry);
        let services = Gauge::default();
        let ready = Gauge::default();
        let unmatched_policy_ports = Gauge::default();
        let streams = Family::<KindLabels, Gauge>::default();
        let pushes = Family::<KindLabels, Counter>::default();
        let connected = Gauge::default();
        let certificates = Family::<CertLabels, Counter>::default();
        registry.register("streams", "Open discovery streams", streams.clone());
        registry.register(
            "pushes",
            "Discovery answers sent to proxies",
            pushes.clone(),
        );
        registry.register(
            "connected_proxies",
            "Proxies with at least one open discovery stream",
            connected.clone(),
        );
        registry.register(
            "certificates",
            "Certificate signing requests answered, by result",
            certificates.clone(),
        );
        registry.register(
            "services",
            "Services in the served mesh state",
            services.clone(),
        );
        registry.register("ready", "1 once the mesh state is loaded", ready.clone());
        registry.register(
            "policy_unmatched_ports",
            "AuthorizationPolicies whose port no endpoint of their workload serves (they select nothing; see the log)",
            unmatched_policy_ports.clone(),
        );
        Self {
            registry: root,
            services,
            ready,
            unmatched_policy_ports,
            streams,
            pushes,
            connected,
            certificates,
            proxies: Default::default(),
        }
    }
}

/// Counts an open stream of one proxy until dropped.
#[derive(Debug)]
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    kind: &'static str,
    proxy: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics
            .streams
            .get_or_create(&KindLabels { kind: self.kind })
            .dec();
        let mut proxies = self
            .metrics
            .proxies
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = proxies.get_mut(&self.proxy) {
            *n -= 1;
            if *n == 0 {
                proxies.remove(&self.proxy);
            }
        }
        self.metrics.connected.set(proxies.len() as i64);
    }
}

impl Metrics {
    /// A stream of `kind` opened by `proxy` (its workload name).
    pub fn stream_opened(self: &Arc<Self>, kind: &'static str, proxy: &str) -> StreamGuard {
        self.streams.get_or_create(&KindLabels { kind }).inc();
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        *proxies.entry(proxy.to_string()).or_default() += 1;
        self.connected.set(proxies.len() as i64);
        StreamGuard {
            metrics: self.clone(),
            kind,
            proxy: proxy.to_string(),
        }
    }

    pub fn pushed(&self, kind: &'static str) {
        self.pushes.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn certificate(&self, result: &'static str, reason: &'static str) {
        self.certificates
            .get_or_create(&CertLabels { result, reason })
            .inc();
    }

    pub fn encode(&self, index: &MeshIndex, ready: bool) -> String {
        self.services.set(index.service_count() as i64);
        self.ready.set(i64::from(ready));
        self.unmatched_policy_ports
            .set(index.unmatched_policy_ports() as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The control plane's state, as its admin port reports it.
struct Health {
    metrics: Arc<Metrics>,
    index: watch::Receiver<Arc<MeshIndex>>,
    ready: watch::Receiver<bool>,
    /// True once the process is shutting down.
    stopping: watch::Receiver<bool>,
}

impl strait_admin::Health for Health {
    fn ready(&self) -> Result<(), &'static str> {
        if *self.stopping.borrow() {
            Err("shutting down")
        } else if *self.ready.borrow() {
            Ok(())
        } else {
            Err("mesh state not loaded yet")
        }
    }

    fn metrics(&self) -> String {
        self.metrics
            .encode(&self.index.borrow(), *self.ready.borrow())
    }
}

/// Serves `/live`, `/ready` and `/metrics` until the process ends; not ready once `stopping`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    index: watch::Receiver<Arc<MeshIndex>>,
    (ready, stopping): (watch::Receiver<bool>, watch::Receiver<bool>),
) {
    let health = Health {
        metrics,
        index,
        ready,
        stopping,
    };
    strait_admin::serve(listener, Arc::new(health)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_and_proxies_are_counted_until_their_guards_drop() {
        let metrics = Arc::new(Metrics::default());
        let a1 = metrics.stream_opened("destination", "default/a");
        let a2 = metrics.stream_opened("inbound", "default/a");
        let b = metrics.stream_opened("destination", "default/b");
        metrics.pushed("destination");
        let text = metrics.encode(&MeshIndex::default(), true);
        for needle in [
            "strait_control_plane_connected_proxies 2",
            "strait_control_plane_streams{kind=\"destination\"} 2",
            "strait_control_plane_streams{kind=\"inbound\"} 1",
            "strait_control_plane_pushes_total{kind=\"destination\"} 1",
            "strait_control_plane_ready 1",
        ] {
            assert!(text.contains(needle), "{needle} in {text}");
        }
        drop(a1);
        drop(b);
        let text = metrics.encode(&MeshIndex::default(), true);
        assert!(
            text.contains("strait_control_plane_connected_proxies 1"),
            "{text}"
        );
        drop(a2);
        let text = metrics.encode(&MeshIndex::default(), false);
        assert!(
            text.contains("strait_control_plane_connected_proxies 0"),
            "{text}"
        );
        assert!(
            text.contains("strait_control_plane_streams{kind=\"inbound\"} 0"),
            "{text}"
        );
        assert!(text.contains("strait_control_plane_ready 0"), "{text}");
    }
}
