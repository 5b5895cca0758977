//! Prometheus metrics of the agent and the datapath (docs/metrics.md lists them all).
//!
//! ```text
//!  per-CPU maps (METRICS, SVC_COUNTERS, EVENT_STATS) ──read and summed at scrape──┐
//!  CT / AFFINITY / SOCK_REV ── scanned every few seconds (ct_scan), cached ────────┤
//!  sync loop ── Snapshot after every sync (counters, map entries, objects, labels) ┼─> Collector ─> /metrics
//!  sync loop ── histograms observed (programming latency, sync duration) ──────────┘
//! ```
//!
//! Everything a scrape needs lives in [`Shared`]: the sync loop writes a [`Snapshot`]
//! after each sync (cheap: counters and counts it already has, plus the Service labels
//! of the Services that changed), the kernel counters are read behind the
//! [`KernelCounters`] trait (the real maps, or a fake in tests), and the registry's
//! [`collect::WeirCollector`] encodes it all. Kernel counters live in pinned maps, so
//! they are monotonic across agent restarts.

pub mod collect;
pub mod format;
pub mod kernel;
pub mod labels;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    metrics::{
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use weir_common::{
    events::SvcCounter,
    metrics::{Counter, REASON_NAMES},
};

pub use self::labels::{ServiceLabels, SvcLabel};

/// Reads the datapath's counters (summed over CPUs).
pub trait KernelCounters: Send + Sync {
    /// `METRICS`, by index (`reason << 1 | direction`).
    fn datapath(&self) -> anyhow::Result<BTreeMap<u32, Counter>>;
    /// `SVC_COUNTERS`, by Service port id.
    fn services(&self) -> anyhow::Result<BTreeMap<u32, SvcCounter>>;
    /// `EVENT_STATS`, by index (`class * STAT_STRIDE + stat`).
    fn event_stats(&self) -> anyhow::Result<BTreeMap<u32, u64>>;
}

impl<T: KernelCounters + ?Sized> KernelCounters for Arc<T> {
    fn datapath(&self) -> anyhow::Result<BTreeMap<u32, Counter>> {
        (**self).datapath()
    }
    fn services(&self) -> anyhow::Result<BTreeMap<u32, SvcCounter>> {
        (**self).services()
    }
    fn event_stats(&self) -> anyhow::Result<BTreeMap<u32, u64>> {
        (**self).event_stats()
    }
}

/// Conntrack and other kernel-written maps, counted by a periodic scan (iterating a map
/// of 262144 entries costs two syscalls per entry: too slow for every scrape).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtCounts {
    /// Entries by (protocol number, `CT_KIND_*`).
    pub by_proto: BTreeMap<(u8, u8), u64>,
    /// Entries of the other kernel-written maps (AFFINITY, SOCK_REV, CT), by map.
    pub maps: BTreeMap<&'static str, u64>,
    /// Whether a scan completed.
    pub scanned: bool,
}

/// Agent-side state as of the last sync (and the sources' counters).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub sync: weir_core::sync::Counters,
    pub store: crate::source::store::StoreCounters,
    /// Objects known, by kind.
    pub objects: BTreeMap<&'static str, usize>,
    /// Objects whose latest version is invalid, by kind.
    pub invalid: BTreeMap<&'static str, usize>,
    /// Entries the agent wrote, by map (the syncer's view of the maps).
    pub map_entries: BTreeMap<&'static str, usize>,
    /// Capacity of every map.
    pub capacities: BTreeMap<&'static str, u32>,
    /// Unix time of the last sync that applied without error.
    pub last_sync_unix: Option<f64>,
    /// Compile errors by reason of the last sync are in `sync.compile_errors`; this is
    /// the number of syncs that failed to apply, by `ApplyError::metric_label`.
    pub ready: bool,
}

/// Agent-side counts of the flow events read from the ring, by `EV_*` kind.
#[derive(Debug, Default)]
pub struct EventCounts {
    pub received: Mutex<BTreeMap<u8, u64>>,
}

/// One latency histogram per object kind.
pub type KindHistograms = Family<[(&'static str, &'static str); 1], Histogram, fn() -> Histogram>;

/// Histograms the sync loop observes.
#[derive(Clone)]
pub struct Histograms {
    /// From the moment the Store saw an object change to the end of the map write that
    /// programmed it, by kind (kube-proxy's `network_programming_duration_seconds`).
    pub programming: KindHistograms,
    /// From an EndpointSlice's last-change-trigger-time annotation to the end of the map
    /// write that programmed that version: kube-proxy's definition of
    /// `network_programming_duration_seconds`, API server and watch delays included.
    pub trigger: Histogram,
    /// Duration of one sync (kube-proxy's `sync_proxy_rules_duration_seconds`).
    pub sync: Histogram,
}

/// Buckets from 100 µs to ~13 s (factor 2): kube-proxy's sync buckets start at 1 ms,
/// weir's syncs take tens of microseconds, so the first buckets matter here.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            programming: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            trigger: latency_histogram(),
            sync: latency_histogram(),
        }
    }
}

/// Everything a scrape reads.
pub struct Shared {
    pub snapshot: Mutex<Snapshot>,
    pub services: Mutex<ServiceLabels>,
    pub kernel: Option<Box<dyn KernelCounters>>,
    pub ct: Mutex<CtCounts>,
    pub kube: Arc<crate::source::kube::KubeCounters>,
    pub events: EventCounts,
    pub health: crate::health::HealthCounters,
    /// The housekeeping thread's totals (conntrack sweeps, destroyed sockets).
    pub gc: Arc<crate::datapath::gc::GcCounters>,
    /// `weir_build_info` labels.
    pub build: Vec<(&'static str, String)>,
}

impl Shared {
    pub fn new(
        kernel: Option<Box<dyn KernelCounters>>,
        kube: Arc<crate::source::kube::KubeCounters>,
        service_limit: usize,
    ) -> Shared {
        Shared {
            snapshot: Mutex::new(Snapshot::default()),
            services: Mutex::new(ServiceLabels::new(service_limit)),
            kernel,
            ct: Mutex::new(CtCounts::default()),
            kube,
            events: EventCounts::default(),
            health: Default::default(),
            gc: Default::default(),
            build: build_info(),
        }
    }
}

/// Version of this build and a digest of the embedded eBPF object (which datapath the
/// node runs).
pub fn build_info() -> Vec<(&'static str, String)> {
    vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("datapath", crate::datapath::object_digest()),
    ]
}

/// The registry and what it reads.
pub struct Metrics {
    pub registry: Registry,
    pub shared: Arc<Shared>,
    pub hist: Histograms,
}

impl Metrics {
    pub fn new(shared: Arc<Shared>) -> Metrics {
        let hist = Histograms::default();
        let mut registry = Registry::default();
        registry.register_with_unit(
            "weir_network_programming_duration",
            "Time from the moment the agent saw an object change (its Store received the watch or file event) to the end of the map write that programmed it, by object kind (compare kube-proxy's network_programming_duration_seconds)",
            Unit::Seconds,
            hist.programming.clone(),
        );
        registry.register_with_unit(
            "weir_endpoint_programming_from_trigger_duration",
            "Time from an EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time annotation (the Pod or Service change behind it, as the EndpointSlice controller recorded it) to the end of the map write that programmed it: kube-proxy's definition of network_programming_duration_seconds",
            Unit::Seconds,
            hist.trigger.clone(),
        );
        registry.register_with_unit(
            "weir_sync_proxy_rules_duration",
            "Duration of one sync: translate the changed Services, diff, write the maps (compare kube-proxy's sync_proxy_rules_duration_seconds)",
            Unit::Seconds,
            hist.sync.clone(),
        );
        registry.register_collector(Box::new(collect::WeirCollector {
            shared: shared.clone(),
        }));
        Metrics {
            registry,
            shared,
            hist,
        }
    }

    /// The exposition in the format `accept` asks for: (content type, body).
    pub fn render(&self, accept: Option<&str>) -> (String, String) {
        format::render(&self.registry, accept)
    }
}

/// Whether a reason is a drop, a reject or forwarding (the `verdict` label).
pub fn verdict_of(reason: u8) -> &'static str {
    use weir_common::metrics::*;
    match reason {
        REASON_FORWARDED | REASON_TRANSLATED | REASON_REV_TRANSLATED => "forward",
        REASON_NO_BACKEND_REJECT | REASON_UNKNOWN_PORT_REJECT | REASON_BACKEND_GONE_RESET => {
            "reject"
        }
        _ => "drop",
    }
}

/// The metric label of a reason code (`reason_<n>` for codes this build does not know).
pub fn reason_name(reason: u8) -> String {
    REASON_NAMES
        .get(reason as usize)
        .map(|s| s.to_string())
        .unwrap_or_else(|| format!("reason_{reason}"))
}

#[cfg(test)]
mod tests;
