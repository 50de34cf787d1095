//! gRPC's standard services, written as ordinary gorpc services: mounted on a [`Router`],
//! they answer on every transport that serves it.
//!
//! [`Router`]: crate::Router

pub mod health;
pub mod reflection;
