//! The discrete-event simulator behind `mosvm sim`: virtual time, heterogeneous nodes, seeded
//! workloads, and the very [`crate::Node`] code the node service runs.
//!
//! - [`workload`]: seeded clusters and job lists (Pareto, exponential, hotspot, join, memory).
//! - [`engine`]: the event loop and metrics ([`engine::simulate`]).
//! - [`model`]: the analytic model of information age.
//! - [`report`]: tables and plots.
//! - [`cli`]: `mosvm sim` flags and entry point.

pub mod cli;
pub mod engine;
pub mod model;
pub mod report;
pub mod workload;
