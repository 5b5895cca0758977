//! # weir-core: the pure pipeline
//!
//! Cluster objects in, ordered map operations out, with no privileges and no aya or kube
//! types, so that all of it can be tested as plain Rust (see ../shared/DESIGN.md):
//!
//! ```text
//! model::Cluster --translate--> DesiredState --compile--> MapImage --diff--> Plan --Datapath::apply-->
//! ```
//!
//! # Layout
//! - [`model`]: plain Rust mirrors of the Kubernetes objects weir reads (the agent's
//!   sources convert kube/k8s-openapi objects into these).
//! - [`services`]: translate Services and EndpointSlices into frontends and backend sets
//!   by the upstream kube-proxy rules.
//! - [`maglev`]: Maglev lookup tables.
//! - [`image`]: [`image::MapImage`], the exact contents the maps should hold.
//! - [`compile`]: desired state -> map image, with stable ids ([`compile::IdAllocator`]).
//! - [`plan`]: diff two images into an ordered, make-before-break [`plan::Plan`].
//! - [`policy`]: NetworkPolicy: the evaluator (specification), the compiler to the policy
//!   maps (identities, policy keys, LPM entries), the model of the datapath's lookups.
//! - [`keys`]: [`keys::ImageKeys`], the keys a change touched (diffs restricted to them).
//! - [`pipeline`]: the incremental per-node pipeline: a [`pipeline::ChangeSet`] in, the
//!   desired image and the touched keys out, work proportional to the change.
//! - [`sync`]: [`sync::Syncer`], one sync step: pipeline, capacity admission, deferred
//!   deletions until every source has listed, apply, id release, counters.
//! - [`datapath`]: the [`datapath::Datapath`] trait every map write goes through, and the
//!   fake implementations tests use.

pub mod compile;
pub mod datapath;
pub mod image;
pub mod keys;
pub mod maglev;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod policy;
pub mod services;
pub mod sync;

pub use weir_common as abi;
