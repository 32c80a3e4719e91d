//! Workload identity for Strait: SPIFFE IDs, the certificate authority that signs them, and the
//! TLS 1.3 configuration with which proxies prove and check them.

pub mod ca;
pub mod spiffe;
pub mod tls;

pub use spiffe::{SpiffeId, SpiffeIdError};
