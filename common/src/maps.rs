//! Map names (the BPF object's symbol names; userspace finds maps by them) and default
//! capacities. The agent may override every capacity at load time.

pub const SERVICES: &str = "SERVICES";
pub const BACKENDS: &str = "BACKENDS";
pub const REV_NAT: &str = "REV_NAT";
pub const AFFINITY: &str = "AFFINITY";
pub const MAGLEV: &str = "MAGLEV";
pub const CT: &str = "CT";
pub const METRICS: &str = "METRICS";
pub const CONFIG: &str = "CONFIG";
pub const NODE_ADDRS: &str = "NODE_ADDRS";
pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
pub const AFFINITY_SETS: &str = "AFFINITY_SETS";
/// Array: entry n = x^(8n) mod the CRC32c polynomial (`crc32c::x8nmodp(n)`), filled once
/// by the agent at load; SCTP port translation needs it per packet length.
pub const CRC32C_SHIFT: &str = "CRC32C_SHIFT";
pub const CRC32C_SHIFT_ENTRIES: u32 = 65536;
pub const SOCK_REV: &str = "SOCK_REV";
pub const DEFAULT_SOCK_REV_MAX: u32 = 262144;
pub const IPCACHE: &str = "IPCACHE";
pub const ENDPOINTS: &str = "ENDPOINTS";
pub const POLICY: &str = "POLICY";
pub const POLICY_RULES: &str = "POLICY_RULES";
pub const POLICY_COUNTERS: &str = "POLICY_COUNTERS";
/// LRU of fragmented datagrams (first fragment's verdict and ports). Not pinned: entries
/// live for the milliseconds a datagram takes to arrive, so a restart may drop them.
pub const FRAGS: &str = "FRAGS";
pub const FRAGS_MAX: u32 = 8192;
/// Per-Service-port counters (per-CPU hash keyed by `svc_port_id`), see `events`.
pub const SVC_COUNTERS: &str = "SVC_COUNTERS";
/// Flow and drop events (ring buffer; not pinned: each agent drains its own).
pub const EVENTS: &str = "EVENTS";
/// Per-CPU token buckets of the event rate limiter (not pinned).
pub const EVENT_BUCKETS: &str = "EVENT_BUCKETS";
/// Per-CPU event statistics: emitted, rate-limited, lost (pinned: monotonic across
/// agent restarts).
pub const EVENT_STATS: &str = "EVENT_STATS";

pub const DEFAULT_SERVICES_MAX: u32 = 65536;
pub const DEFAULT_BACKENDS_MAX: u32 = 65536;
pub const DEFAULT_REV_NAT_MAX: u32 = 65536;
pub const DEFAULT_AFFINITY_MAX: u32 = 65536;
pub const DEFAULT_MAGLEV_MAX: u32 = 65536;
pub const DEFAULT_CT_MAX: u32 = 262144;
pub const DEFAULT_NODE_ADDRS_MAX: u32 = 64;
pub const DEFAULT_SOURCE_RANGES_MAX: u32 = 16384;
/// Pod addresses whose identity differs from their region's, plus ipBlock prefixes
/// (LPM trie: memory is allocated per entry, not up front).
pub const DEFAULT_IPCACHE_MAX: u32 = 131072;
/// Addresses of this node's pods (a node runs ~110 pods, up to two addresses each).
pub const DEFAULT_ENDPOINTS_MAX: u32 = 4096;
/// Policy entries (LPM trie, allocated per entry). See docs/architecture.md for sizes.
pub const DEFAULT_POLICY_MAX: u32 = 262144;
/// Rule ids: `POLICY_RULES` entries and `POLICY_COUNTERS` slots (a per-CPU array, so its
/// memory is this many 16-byte counters per CPU, allocated up front).
pub const DEFAULT_POLICY_RULES_MAX: u32 = 16384;
/// Default Maglev table size per frontend (prime; Cilium's default is 16381).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 1021;
/// Service ports with counters (one per Service port that saw traffic).
pub const DEFAULT_SVC_COUNTERS_MAX: u32 = 65536;

/// Every map the agent pins, with its default capacity (for capacity metrics and flags).
pub const ALL: &[(&str, u32)] = &[
    (SERVICES, DEFAULT_SERVICES_MAX),
    (BACKENDS, DEFAULT_BACKENDS_MAX),
    (REV_NAT, DEFAULT_REV_NAT_MAX),
    (AFFINITY, DEFAULT_AFFINITY_MAX),
    (MAGLEV, DEFAULT_MAGLEV_MAX),
    (CT, DEFAULT_CT_MAX),
    (METRICS, crate::metrics::REASON_MAX * 2),
    (CONFIG, 1),
    (NODE_ADDRS, DEFAULT_NODE_ADDRS_MAX),
    (SOURCE_RANGES, DEFAULT_SOURCE_RANGES_MAX),
    (AFFINITY_SETS, DEFAULT_BACKENDS_MAX),
    (SOCK_REV, DEFAULT_SOCK_REV_MAX),
    (IPCACHE, DEFAULT_IPCACHE_MAX),
    (ENDPOINTS, DEFAULT_ENDPOINTS_MAX),
    (POLICY, DEFAULT_POLICY_MAX),
    (POLICY_RULES, DEFAULT_POLICY_RULES_MAX),
    (POLICY_COUNTERS, DEFAULT_POLICY_RULES_MAX),
    (SVC_COUNTERS, DEFAULT_SVC_COUNTERS_MAX),
    (EVENT_STATS, crate::events::EVENT_STATS_ENTRIES),
];
