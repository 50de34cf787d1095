//! gRPC's standard services, written as ordinary gorpc services: mounted on a [`Router`],
//! they answer over the binary protocol and over gRPC alike.
//!
//! [`Router`]: crate::Router

pub mod health;
