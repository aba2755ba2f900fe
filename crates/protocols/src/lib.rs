//! Protocol definitions of vmfactory: Kata's `cache.proto` (the VMCache service, wire
//! compatible with Kata Containers) and `agent.proto` (the guest agent API), compiled with
//! `protox` and `tonic-build` at build time, plus the [`contract`] constants both ends of
//! the agent connection share and its transport, [`mux`].

pub mod contract;
pub mod mux;

/// Kata's VMCache protocol (`package cache`).
pub mod cache {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("cache");
}

/// The sandbox supervisor's local API (`package vmfactory.sandbox`).
pub mod sandbox {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("vmfactory.sandbox");
}

/// The guest agent protocol (`package vmfactory.agent`).
pub mod agent {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("vmfactory.agent");
}
