//! Route backends' balancers, shared by every destination of the proxy: one balancer per
//! backend service, however many routes (of however many destinations) send to it, so its
//! endpoints are held once and its load and connections are seen by all of them.
//!
//! The registry holds them weakly: a balancer lives while a route stack (or a destination's
//! list of its backends) holds it, and is found again by the next update that names its
//! service. It is consulted when discovery sends an update, never per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use crate::balance::Balancer;

#[derive(Debug, Default)]
pub struct SharedBalancers {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    by_service: HashMap<Arc<str>, Weak<Balancer>>,
    /// Dead entries are swept when the map reaches this size.
    sweep_at: usize,
}

impl SharedBalancers {
    /// The live balancer of `service`, or a new one from `make` (then registered).
    pub fn get_or_make(
        &self,
        service: &str,
        make: impl FnOnce() -> Balancer,
    ) -> (Arc<str>, Arc<Balancer>) {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((name, live)) = r
            .by_service
            .get_key_value(service)
            .and_then(|(name, weak)| Some((name.clone(), weak.upgrade()?)))
        {
            return (name, live);
        }
        if r.by_service.len() >= r.sweep_at {
            r.by_service.retain(|_, weak| weak.strong_count() > 0);
            r.sweep_at = (r.by_service.len() * 2).max(64);
        }
        let name: Arc<str> = service.into();
        let balancer = Arc::new(make());
        r.by_service.insert(name.clone(), Arc::downgrade(&balancer));
        (name, balancer)
    }

    /// Services whose balancers are registered and alive.
    pub fn live(&self) -> usize {
        let r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        r.by_service
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn make() -> Balancer {
        Balancer::new(Duration::from_secs(1), None)
    }

    #[test]
    fn one_live_balancer_per_service_and_a_dropped_one_is_made_anew() {
        let shared = SharedBalancers::default();
        let (_, a) = shared.get_or_make("a:80", make);
        let (_, again) = shared.get_or_make("a:80", make);
        assert!(Arc::ptr_eq(&a, &again));
        let (_, b) = shared.get_or_make("b:80", make);
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(shared.live(), 2);
        drop((a, again));
        assert_eq!(shared.live(), 1);
        let (_, fresh) = shared.get_or_make("a:80", make);
        assert_eq!(
            Arc::strong_count(&fresh),
            1,
            "a new balancer, not the dropped one"
        );
    }

    #[test]
    fn dead_entries_are_swept_as_the_registry_grows() {
        let shared = SharedBalancers::default();
        for i in 0..1_000 {
            let _ = shared.get_or_make(&format!("s{i}:80"), make);
        }
        let entries = shared.inner.lock().expect("lock").by_service.len();
        assert!(entries <= 128, "{entries} entries for no live balancer");
    }
}
