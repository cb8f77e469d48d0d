//! modelcache: a node-local model cache for Kubernetes GPU nodes.
//!
//! The engine fills a cache directory with a model's files from a [`source::Source`] (Azure Blob
//! Storage or a directory), downloading ranges in parallel ([`fetch`]), hashing every byte as it
//! arrives and checking structure ([`verify`]), and publishing atomically ([`store`]). The
//! command line ([`cli`]) resolves flags into the engine's typed settings ([`config`]).

pub mod agent;
pub mod cli;
pub mod config;
pub mod demo;
pub mod disk;
pub mod dragonfly;
pub mod fetch;
pub mod signal;
pub mod source;
pub mod store;
pub mod verify;
