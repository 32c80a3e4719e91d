//! A discovery answer from arbitrary bytes (as a hostile or broken control plane could send),
//! applied to a balancer and a router: never a panic, picks stay within the endpoints given.
#![no_main]
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strait_api::discovery::destination_update::Update;
use strait_api::discovery::DestinationUpdate;
use strait_proxy::balance::Balancer;
use strait_proxy::discovery::endpoint_specs;
use strait_proxy::http::forward::Clients;
use strait_proxy::metrics::{Direction, Metrics};
use strait_proxy::retry::{BudgetSettings, RetryBudget};
use strait_proxy::router::Router;
use strait_proxy::stack::mirror::Mirrors;
use strait_proxy::stack::{Build, Egress};

fuzz_target!(|data: &[u8]| {
    let Ok(update) = DestinationUpdate::decode(data) else {
        return;
    };
    let Some(Update::Destination(d)) = update.update else {
        return;
    };
    let balancer = std::sync::Arc::new(Balancer::new(Duration::from_secs(1), None));
    let specs = endpoint_specs(&d.endpoints);
    let n = specs.len();
    balancer.update(specs);
    assert_eq!(balancer.len(), n);
    for _ in 0..4 {
        if let Some(e) = balancer.pick() {
            assert!(d
                .endpoints
                .iter()
                .any(|x| x.port == u32::from(e.addr().port())));
        }
    }
    // Every route's stack is built: its filters (header names, redirects, rewrites, faults)
    // compiled from what the control plane sent.
    let metrics = Arc::new(Metrics::new());
    let egress = Arc::new(Egress {
        clients: Clients::new(Duration::from_secs(1), Duration::from_secs(3)),
        workload: None,
        mirrors: Arc::new(Mirrors::new(metrics.clone())),
    });
    let budget = Arc::new(RetryBudget::new(&BudgetSettings {
        ratio: 0.2,
        min_per_second: 10,
        window: Duration::from_secs(10),
    }));
    let http_metrics = Arc::new(metrics.http(Direction::Outbound, "web", None));
    let shared = strait_proxy::stack::backends::SharedBalancers::default();
    let mut build = Build {
        egress: &egress,
        budget: &budget,
        metrics: &http_metrics,
        own: Some((d.service.as_str(), &balancer)),
        shared: &shared,
        used: HashMap::new(),
        new_balancer: &|| Balancer::new(Duration::from_secs(1), None),
        to_specs: &endpoint_specs,
    };
    let router = Router::compile(&d.routes, d.unmatched_to_service, &mut build);
    let req = http::Request::builder()
        .uri("http://web/a")
        .header("x-canary", "1")
        .body(())
        .expect("request");
    if let Some(route) = router.route(&req) {
        let _ = route.stack.clone();
    }
    let _ = Arc::new(router);
});
