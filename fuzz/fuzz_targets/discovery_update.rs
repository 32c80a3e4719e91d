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
use strait_proxy::router::Router;

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
    let mut backends = HashMap::new();
    let router = Router::compile(
        &d.routes,
        d.unmatched_to_service,
        Some((d.service.as_str(), &balancer)),
        &mut backends,
        &|| Balancer::new(Duration::from_secs(1), None),
        &endpoint_specs,
    );
    let req = http::Request::builder()
        .uri("http://web/a")
        .header("x-canary", "1")
        .body(())
        .expect("request");
    if let Some(route) = router.route(&req) {
        let _ = route.pick_backend();
    }
    let _ = Arc::new(router);
});
