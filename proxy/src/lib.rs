//! The Strait sidecar proxy.
//!
//! A connection's path, one module per step:
//! [`listen`] (accept, original destination) -> [`detect`] -> [`outbound`] / [`inbound`] ->
//! [`discovery`] + [`balance`] (outbound) -> [`http`] (forwarding, pools, errors) or [`tcp`].
//! Beside it: [`admin`] (health, metrics, shutdown), [`metrics`], [`drain`], [`init`] (iptables).

pub mod admin;
pub mod app_probe;
pub mod await_ready;
pub mod balance;
pub mod coalesce;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod first_bytes;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod io;
pub mod listen;
pub mod memory;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod ratelimit;
pub mod retry;
pub mod router;
pub mod stack;
pub mod tcp;
pub mod telemetry;
pub mod transport_header;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::discovery::Discovery;
use crate::drain::Drain;
use crate::http::forward::Clients;
use crate::metrics::Metrics;

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub cfg: ProxyConfig,
    pub metrics: Arc<Metrics>,
    /// The request metrics of outbound requests passed through (not in the mesh).
    pub passthrough_metrics: metrics::HttpMetrics,
    pub discovery: Option<Discovery>,
    /// Connection pools and what requests leaving the proxy share.
    pub egress: Arc<stack::Egress>,
    pub drain: Drain,
    /// This proxy's identity, when mTLS is on.
    pub identity: Option<Arc<identity::Identity>>,
    /// Inbound authorization (refuses every client until the first policy arrives).
    pub authz: Arc<policy::Authorizer>,
    /// Tracing and the access log.
    pub telemetry: telemetry::Telemetry,
    /// Who speaks first, per destination: learned by speculative connections.
    pub protocols: Arc<first_bytes::Protocols>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {setting} {addr}: {source}")]
    Bind {
        setting: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Discovery(#[from] discovery::AddrError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
}

/// Binds `addr`. For the IPv4 wildcard (`0.0.0.0:p`) it also binds `[::]:p` (IPv6 only), when
/// the host has IPv6, so that ip6tables-redirected connections are served too.
async fn bind(
    setting: &'static str,
    addr: std::net::SocketAddr,
) -> Result<Vec<TcpListener>, StartError> {
    let err = |source| StartError::Bind {
        setting,
        addr,
        source,
    };
    let backlog = strait_admin::listen::backlog()
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut listeners = vec![strait_admin::listen::bind(addr, backlog, false).map_err(err)?];
    if addr.ip() == std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
        match strait_admin::listen::bind(v6, backlog, true) {
            Ok(l) => listeners.push(l),
            Err(e) => tracing::debug!(%v6, error = %e, "no IPv6 listener (IPv6 unavailable?)"),
        }
    }
    Ok(listeners)
}

/// Raises the open-files soft limit to the hard limit: every proxied connection is two
/// descriptors, and a soft limit of 1024 would cap the proxy at ~500 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Runs the proxy until SIGTERM, SIGINT or `POST /shutdown`, then drains.
pub async fn run(cfg: ProxyConfig) -> Result<(), StartError> {
    raise_fd_limit();
    let outbound = bind("--outbound-addr (STRAIT_OUTBOUND_ADDR)", cfg.outbound_addr).await?;
    let inbound = bind("--inbound-addr (STRAIT_INBOUND_ADDR)", cfg.inbound_addr).await?;
    let admin_listener = bind("--admin-addr (STRAIT_ADMIN_ADDR)", cfg.admin_addr).await?;

    let metrics = Arc::new(Metrics::new());
    let anchors = match (&cfg.trust_anchors, &cfg.trust_anchors_pem) {
        (Some(path), _) => Some(identity::AnchorSource::File(path.clone())),
        (None, Some(pem)) => Some(identity::AnchorSource::Inline(pem.clone())),
        (None, None) => None,
    };
    let identity = match (
        &cfg.identity_addr,
        &cfg.identity,
        anchors,
        &cfg.identity_token_file,
    ) {
        (Some(addr), Some(id), Some(anchors), Some(token)) => {
            let mut identity = identity::Identity::new(
                id.clone(),
                addr.clone(),
                cfg.identity_server_name.clone(),
                anchors,
                token.clone(),
            )?;
            identity.max_connection_age = cfg.max_connection_age;
            identity.mesh_port = cfg.inbound_addr.port();
            Some(Arc::new(identity))
        }
        (Some(_), ..) => {
            return Err(identity::IdentityError::Local(
                "--identity-addr needs --identity, --trust-anchors (or --trust-anchors-pem) and --identity-token-file"
                    .into(),
            )
            .into())
        }
        _ => {
            tracing::warn!("no identity configured: connections between proxies are plaintext");
            None
        }
    };
    if let Some(identity) = &identity {
        metrics.set_local_id(&identity.id.to_string());
    }
    let workload = cfg.service_name();
    metrics.set_workload(&workload);
    let egress = Arc::new(stack::Egress {
        clients: Clients::new(cfg.connect_timeout, cfg.http1_pool_idle_timeout),
        workload: ::http::HeaderValue::from_str(&workload).ok(),
        mirrors: Arc::new(stack::mirror::Mirrors::new(metrics.clone())),
    });
    let discovery = match &cfg.control_plane_addr {
        Some(addr) => Some(Discovery::new(
            addr,
            &cfg,
            metrics.clone(),
            identity.clone(),
            egress.clone(),
        )?),
        None => {
            tracing::warn!("no control plane configured: every destination is passed through");
            None
        }
    };
    let telemetry = telemetry::Telemetry::new(&cfg, &metrics)?;
    let (trigger, drain) = drain::channel();
    let trigger = Arc::new(trigger);
    let discovery_configured = discovery.is_some();
    let cfg_default_policy = cfg.default_inbound_policy;
    let ctx = Arc::new(Context {
        telemetry,
        egress,
        protocols: Arc::new(first_bytes::Protocols::new(cfg.protocol_memory)),
        cfg,
        passthrough_metrics: metrics.http(metrics::Direction::Outbound, "passthrough", None),
        metrics: metrics.clone(),
        discovery,
        drain: drain.clone(),
        identity: identity.clone(),
        authz: Arc::new(match (&identity, &discovery_configured) {
            (Some(id), true) => {
                policy::Authorizer::pending(id.id.trust_domain(), cfg_default_policy)
            }
            _ => {
                tracing::info!("no identity or no control plane: no inbound policy to enforce; every client is allowed");
                policy::Authorizer::allow_all()
            }
        }),
    });

    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(admin::Admin {
        metrics,
        ready: ready.clone(),
        trigger: trigger.clone(),
        drain: drain.clone(),
        probes: app_probe::AppProbes::new(ctx.cfg.app_probes.clone(), ctx.cfg.pod_ip.0),
        protocols: ctx.protocols.clone(),
    });
    for listener in admin_listener {
        tokio::spawn(admin.clone().serve(listener));
    }
    tokio::spawn(memory::release_periodically());

    if let Some(identity) = &identity {
        let (first_tx, mut first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(identity.clone().maintain(ctx.metrics.clone(), first_tx));
        tokio::spawn(identity.clone().watch_anchors());
        if let Some(discovery) = &ctx.discovery {
            tokio::spawn(
                identity
                    .clone()
                    .follow_control_plane_anchors(discovery.client(), ctx.cfg.workload.clone()),
            );
        }
        // Not ready, and not accepting, until there is a certificate to prove who we are.
        loop {
            tokio::select! {
                _ = &mut first_rx => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                    tracing::warn!(id = %identity.id, "still waiting for a certificate from the identity API");
                }
                _ = strait_admin::shutdown_signal() => return Ok(()),
            }
        }
    }

    if let (Some(identity), Some(discovery)) = (&identity, &ctx.discovery) {
        // Wait briefly for the workload's policy; until it comes, inbound is refused.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(ctx.authz.clone().watch(
            discovery.client(),
            identity.id.clone(),
            ctx.cfg.workload.clone(),
            first_tx,
        ));
        if tokio::time::timeout(ctx.cfg.discovery_timeout, first_rx)
            .await
            .is_err()
        {
            tracing::warn!(
                "no inbound policy yet: inbound connections are refused until it arrives"
            );
        }
    }

    let tracker = TaskTracker::new();
    let mut loops = Vec::new();
    for listener in outbound {
        let ctx = ctx.clone();
        loops.push(tokio::spawn(listen::accept_loop(
            "outbound",
            listener,
            listen::ToItself::Refuse,
            drain.clone(),
            tracker.clone(),
            move |s, dst| outbound::serve_connection(ctx.clone(), s, dst),
        )));
    }
    for listener in inbound {
        let ctx = ctx.clone();
        loops.push(tokio::spawn(listen::accept_loop(
            "inbound",
            listener,
            listen::ToItself::Handle,
            drain.clone(),
            tracker.clone(),
            move |s, dst| inbound::serve_connection(ctx.clone(), s, dst),
        )));
    }
    ready.store(true, Ordering::Release);
    tracing::info!(
        outbound = %ctx.cfg.outbound_addr,
        inbound = %ctx.cfg.inbound_addr,
        admin = %ctx.cfg.admin_addr,
        "proxy ready"
    );

    tokio::select! {
        _ = strait_admin::shutdown_signal() => trigger.drain(),
        _ = drain.clone().signaled() => {}
    }
    tracing::info!(grace = ?ctx.cfg.shutdown_grace_period, "draining: no new connections; in-flight requests may finish");
    for l in loops {
        let _ = l.await;
    }
    tracker.close();
    if tokio::time::timeout(ctx.cfg.shutdown_grace_period, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "grace period over; closing the remaining connections"
        );
    }
    ctx.telemetry.flush(std::time::Duration::from_secs(2)).await;
    Ok(())
}
