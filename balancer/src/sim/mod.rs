//! The discrete-event simulator behind `mosvm sim`: virtual time, heterogeneous nodes, seeded
//! workloads, and the very [`crate::Node`] code the node service runs.

pub mod cli;
