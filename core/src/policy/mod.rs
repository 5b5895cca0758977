//! NetworkPolicy: the specification, the compiler to maps, and the model of the lookups.
//!
//! # Layout
//! - [`eval`]: a direct evaluator of the Kubernetes rules (the specification).
//! - [`compile`]: cluster -> [`PolicyImage`] for one node: identities as equivalence
//!   classes of remote addresses, policy keys as classes of local endpoints, LPM entries
//!   (port ranges as prefixes), stable numbers.
//! - [`image`]: [`PolicyImage`] and longest-prefix matching with the kernel's semantics.
//! - [`lookup`]: the datapath's lookup sequence over any [`lookup::PolicyMaps`].
//! - [`plan`]: the policy map operations and their make-before-break order.
//! - [`dump`]: readable dumps for golden tests and inspection.
//! - [`ids`]: stable hashing, probing, dense rule ids, port ranges to prefixes.
//!
//! The map ABI and the lookup sequence the datapath implements are documented in
//! `weir_common::policy`.

pub mod compile;
pub mod dump;
pub mod eval;
pub mod ids;
pub mod image;
pub mod lookup;
pub mod plan;
#[cfg(test)]
mod tests;

pub use compile::{Compiled, PolicyCompiler, PolicyError, PolicyOptions};
pub use eval::Direction;
pub use image::PolicyImage;
