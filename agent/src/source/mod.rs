//! Sources of cluster state, behind one abstraction.
//!
//! Every source turns what it reads into [`Event`]s per kind, with the semantics of
//! kube-rs' `watcher::Event`: `Init` starts a full listing of a kind, `InitApply` carries
//! its objects, `InitDone` ends it (what the source delivered before and did not list
//! again is deleted), `Apply` and `Delete` are single changes. The [`store::Store`]
//! applies them, converts objects into `weir_core::model` (through [`convert`]) and
//! collects a [`weir_core::pipeline::ChangeSet`] of what really changed, which drives the
//! incremental pipeline.
//!
//! - [`dir`]: a directory of multi-document Kubernetes YAML, re-read on change; one
//!   changed file yields events for only the objects that changed.
//! - [`kube`]: the API server, through kube-rs watchers for the six kinds weir reads
//!   (list and watch only).
//! - [`store`]: the typed object store, readiness (every source listed every kind) and
//!   change sets.
//! - [`yaml`], [`convert`]: parsing YAML into k8s-openapi objects, and those into the
//!   model.

pub mod convert;
pub mod dir;
pub mod kube;
pub mod store;
pub mod yaml;

pub use yaml::Object;

/// The kinds of object weir reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Pod,
    Namespace,
    NetworkPolicy,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Pod,
        Kind::Namespace,
        Kind::NetworkPolicy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One change from a source (kube-rs `watcher::Event` semantics, per kind).
#[derive(Clone, Debug)]
pub enum Event {
    /// A full listing of the kind starts; the objects until `InitDone` replace what this
    /// source delivered of the kind before.
    Init(Kind),
    InitApply(Object),
    /// The listing is complete: objects this source delivered before and did not list
    /// now are deleted.
    InitDone(Kind),
    /// An object was added or changed.
    Apply(Object),
    /// An object was deleted.
    Delete(Object),
    /// The source's input generation, sent after the events it covers (the directory
    /// source reads it from `.weir-generation`; the agent writes it to CONFIG once it
    /// has programmed them, so that `weir lab` can wait for it).
    Generation(u64),
}

/// Identifies a source registered with the store.
pub type SourceId = usize;

/// An event and the source it came from.
#[derive(Clone, Debug)]
pub struct SourceEvent {
    pub source: SourceId,
    pub event: Event,
}
