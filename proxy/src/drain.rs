//! Graceful shutdown: one signal that every listener and connection watches.

use tokio::sync::watch;

/// Triggers the drain. Dropping it does not drain.
#[derive(Debug)]
pub struct DrainTrigger(watch::Sender<bool>);

/// Watched by listeners (stop accepting) and connections (finish in-flight requests, then close).
#[derive(Debug, Clone)]
pub struct Drain(watch::Receiver<bool>);

pub fn channel() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), Drain(rx))
}

impl DrainTrigger {
    pub fn drain(&self) {
        self.0.send_replace(true);
    }
}

impl Drain {
    /// Resolves once the drain has started.
    pub async fn signaled(mut self) {
        // An error means the trigger is gone without draining: then never resolve.
        if self.0.wait_for(|d| *d).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}
