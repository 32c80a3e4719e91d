//! The Strait control plane: turns the cluster's (or a directory's) services and endpoints into
//! discovery answers streamed to proxies.
//!
//! ```text
//! config dir (YAML) --scan--> LocalSource ---+
//!                                             +--resources--> MeshIndex --watch--> DiscoveryService --gRPC--> proxies
//! API server --watch--> kubernetes::run ------+
//! ```

pub mod admin;
pub mod control_tls;
pub mod discovery;
pub mod fanout;
pub mod identity;
pub mod index;
pub mod kubernetes;
pub mod limits;
pub mod local;
pub mod resources;
pub mod route_filters;
pub mod routes;
pub mod tokens;
