//! The Strait sidecar injector.
//!
//! ```text
//! API server --AdmissionReview (HTTPS)--> server::handle --> review::review --> inject::plan
//!                                                                                  |
//!            <--------- allowed: true + base64 JSON Patch (or a warning) ----------+
//! strait inject (offline) ------------------------------------------------------> inject::plan
//! ```
//!
//! [`inject::plan`] is the one place that decides and builds the patch; the webhook and the
//! offline `strait inject` both call it, so GitOps manifests get exactly what the webhook does.

pub mod config;
pub mod inject;
pub mod manifest;
pub mod probes;
pub mod review;
pub mod server;
