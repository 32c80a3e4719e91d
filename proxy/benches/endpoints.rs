//! What a large service costs a proxy: `cargo bench -p strait-proxy --bench endpoints`.
//!
//! Builds the balancer of a 5,000-endpoint meshed service (one ServiceAccount, as a Deployment's
//! pods share one; then 5,000 distinct ones, the worst case) the way a discovery answer does,
//! and prints the memory it holds and the CPU time of an update in which one endpoint changes.
//! Nothing asserts: the figures go to docs/performance.md.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strait_proxy::balance::{Balancer, EndpointSpec};
use strait_proxy::identity::{AnchorSource, Identity};

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

fn specs(n: u32, identities: u32, weight: u32) -> Vec<EndpointSpec> {
    (0..n)
        .map(|i| EndpointSpec {
            addr: SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + i), 8080)),
            weight,
            identity: format!(
                "spiffe://cluster.local/ns/shop/sa/checkout-{}",
                i % identities
            )
            .into(),
            meshed: true,
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn run(identity: &Arc<Identity>, n: u32, identities: u32) {
    let before = rss_kb();
    let balancer = Balancer::new(Duration::from_secs(1), Some(identity.clone()));
    let start = Instant::now();
    balancer.update(specs(n, identities, 1));
    let first_ms = start.elapsed().as_secs_f64() * 1e3;
    let held_mb = rss_kb().saturating_sub(before) as f64 / 1024.0;
    // Updates in which one endpoint changes (its weight), the common push.
    let mut times = Vec::new();
    for round in 0..50u32 {
        let mut next = specs(n, identities, 1);
        next[(round % n) as usize].weight = 2 + round;
        let start = Instant::now();
        balancer.update(next);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let one_change_ms = median(times);
    assert_eq!(balancer.len(), n as usize);
    let key = format!("endpoints_{n}_identities_{identities}");
    println!("{key}_rss_mb {held_mb:.1}");
    println!("{key}_first_update_ms {first_ms:.2}");
    println!("{key}_one_change_update_ms {one_change_ms:.2}");
}

fn main() {
    let ca = strait_identity::ca::generate(
        "cluster.local",
        Duration::from_secs(86_400),
        Duration::from_secs(86_400),
    )
    .expect("a CA");
    let identity = Arc::new(
        Identity::new(
            "spiffe://cluster.local/ns/shop/sa/frontend"
                .parse()
                .expect("an ID"),
            "127.0.0.1:1".into(),
            "identity.strait-system.serviceaccount.identity.strait.cluster.local".into(),
            AnchorSource::Inline(ca.anchor_cert_pem),
            "/nonexistent-token".into(),
        )
        .expect("an identity"),
    );
    run(&identity, 5_000, 1);
    run(&identity, 5_000, 5_000);
}
