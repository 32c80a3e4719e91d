//! The Strait sidecar proxy.
//!
//! A connection's path, one module per step:
//! [`listen`] (accept, original destination) -> [`detect`] -> [`outbound`] / [`inbound`] ->
//! [`discovery`] + [`balance`] (outbound) -> [`http`] (forwarding, pools, errors) or [`tcp`].
//! Beside it: [`admin`] (health, metrics, shutdown), [`metrics`], [`drain`], [`init`] (iptables).

pub mod admin;
pub mod balance;
pub mod config;
pub mod detect;
pub mod discovery;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod init;
pub mod io;
pub mod listen;
pub mod metrics;
pub mod outbound;
pub mod tcp;

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
    pub discovery: Option<Discovery>,
    pub clients: Clients,
    pub drain: Drain,
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
}

async fn bind(
    setting: &'static str,
    addr: std::net::SocketAddr,
) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            setting,
            addr,
            source,
        })
}

/// Runs the proxy until SIGTERM, SIGINT or `POST /shutdown`, then drains.
pub async fn run(cfg: ProxyConfig) -> Result<(), StartError> {
    let outbound = bind("--outbound-addr (STRAIT_OUTBOUND_ADDR)", cfg.outbound_addr).await?;
    let inbound = bind("--inbound-addr (STRAIT_INBOUND_ADDR)", cfg.inbound_addr).await?;
    let admin_listener = bind("--admin-addr (STRAIT_ADMIN_ADDR)", cfg.admin_addr).await?;

    let metrics = Arc::new(Metrics::new());
    let discovery = match &cfg.control_plane_addr {
        Some(addr) => Some(Discovery::new(
            addr,
            cfg.workload.clone(),
            cfg.discovery_timeout,
            cfg.connect_timeout,
            metrics.clone(),
        )?),
        None => {
            tracing::warn!("no control plane configured: every destination is passed through");
            None
        }
    };
    let (trigger, drain) = drain::channel();
    let trigger = Arc::new(trigger);
    let ctx = Arc::new(Context {
        clients: Clients::new(cfg.connect_timeout),
        cfg,
        metrics: metrics.clone(),
        discovery,
        drain: drain.clone(),
    });

    let ready = Arc::new(AtomicBool::new(false));
    let admin = Arc::new(admin::Admin {
        metrics,
        ready: ready.clone(),
        trigger: trigger.clone(),
        drain: drain.clone(),
    });
    tokio::spawn(admin.serve(admin_listener));

    let tracker = TaskTracker::new();
    let out_ctx = ctx.clone();
    let outbound_loop = tokio::spawn(listen::accept_loop(
        "outbound",
        outbound,
        drain.clone(),
        tracker.clone(),
        move |s, dst| outbound::serve_connection(out_ctx.clone(), s, dst),
    ));
    let in_ctx = ctx.clone();
    let inbound_loop = tokio::spawn(listen::accept_loop(
        "inbound",
        inbound,
        drain.clone(),
        tracker.clone(),
        move |s, dst| inbound::serve_connection(in_ctx.clone(), s, dst),
    ));
    ready.store(true, Ordering::Release);
    tracing::info!(
        outbound = %ctx.cfg.outbound_addr,
        inbound = %ctx.cfg.inbound_addr,
        admin = %ctx.cfg.admin_addr,
        "proxy ready"
    );

    tokio::select! {
        _ = termination() => trigger.drain(),
        _ = drain.clone().signaled() => {}
    }
    tracing::info!(grace = ?ctx.cfg.shutdown_grace_period, "draining: no new connections; in-flight requests may finish");
    let _ = tokio::join!(outbound_loop, inbound_loop);
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
    Ok(())
}

async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT drains");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
