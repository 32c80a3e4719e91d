//! HTTP proxying shared by the inbound and outbound sides: header rules, the errors the proxy
//! answers itself, and the upstream clients.

pub mod body;
pub mod client;
pub mod error;
pub mod forward;
pub mod headers;
pub mod limits;
pub mod metered;
pub mod replay;
pub mod server;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A response body: the upstream's, streamed, or one the proxy wrote itself.
pub type Body = Either<Incoming, Full<Bytes>>;

pub use body::ReqBody;
