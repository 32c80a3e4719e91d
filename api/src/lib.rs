//! The control-plane <-> proxy protocol, generated from `proto/` at build time.
//!
//! Discovery (`strait.discovery.v1`): one stream per destination, snapshot first and whole
//! replacements after, with an explicit "not in the mesh" answer.
//! Identity (`strait.identity.v1`): a CSR and a token in, a certificate out.

#![allow(missing_docs, clippy::all)] // generated code

pub mod discovery {
    tonic::include_proto!("strait.discovery.v1");
}

pub mod identity {
    tonic::include_proto!("strait.identity.v1");
}
