//! # weir: the node agent and CLI
//!
//! weir replaces kube-proxy and enforces NetworkPolicy with eBPF programs; this crate is
//! the userspace side: it loads the programs, keeps the maps equal to what the cluster
//! says, and lets people look inside.
//!
//! # Layout
//! - [`agent`]: the node daemon's loop (sources -> store -> incremental sync -> datapath).
//! - [`config`]: `weir agent` options (flags and the YAML config file).
//! - [`datapath`]: loading, pinning and attaching the eBPF object; [`datapath::AyaDatapath`]
//!   implements `weir_core::datapath::Datapath` over the real maps.
//! - [`source`]: cluster state from a directory of Kubernetes YAML or the API server
//!   (kube-rs watchers), as events into one store of `weir_core::model` objects.
//! - [`inspect`]: `weir services`, `endpoints`, `conntrack`, `explain` over the live
//!   pinned maps (pure views, golden-tested).
//! - [`netns`]: namespaces, links and child processes for the demo, lab and tests.
//! - [`probe`]: one probe from inside a namespace and cgroup, as JSON.
//! - [`serve`]: the identity server lab pods run.
//! - [`demo`]: the walking-skeleton demo (one node, one ClusterIP, two backends).
//! - [`lab`]: `weir lab`, a mini-cluster of network namespaces from Kubernetes YAML with
//!   real servers, one agent per node, and probes (the end-to-end test bed).
//! - [`logging`]: tracing setup (text or JSON).
//! - [`metrics`]: Prometheus metrics of the agent and the datapath; [`health`]: kube-proxy's
//!   node health and per-Service health check ports, readiness; [`flows`]: flow and drop
//!   events from the datapath's ring buffer; [`observe`]: their servers and the sync-loop
//!   hook that keeps them current; [`http`]: the small HTTP layer they share.
//! - [`testing`]: packet builder/parser and the BPF_PROG_TEST_RUN harness (tests, bench).
//!
//! The pure pipeline (translate, compile, diff) lives in the `weir-core` crate; the map
//! ABI in `weir-common`.

pub mod agent;
pub mod config;
pub mod datapath;
pub mod demo;
pub mod flows;
pub mod health;
pub mod http;
pub mod inspect;
pub mod lab;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod observe;
pub mod probe;
pub mod serve;
pub mod source;
pub mod testing;
