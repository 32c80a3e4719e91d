//! The control-plane <-> proxy protocol, generated from `proto/` at build time.
//!
//! Discovery (`strait.discovery.v1`): one stream per destination, snapshot first and whole
//! replacements after, with an explicit "not in the mesh" answer.

#![allow(missing_docs, clippy::all)] // generated code

pub mod discovery {
    tonic::include_proto!("strait.discovery.v1");
}
