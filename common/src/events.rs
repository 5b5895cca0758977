//! Flow and drop events (`EVENTS` ring buffer) and per-Service counters
//! (`SVC_COUNTERS`).
//!
//! The TC programs emit one [`FlowEvent`] for every packet they drop or reject (and, when
//! `CFG_F_FLOW_EVENTS` is set, for a sample of new translated connections) through a
//! per-CPU token bucket per event class: a flood cannot fill the ring faster than the
//! agent drains it, and what the bucket or a full ring suppressed is counted in
//! `EVENT_STATS`. The agent is the only consumer of the ring.
//!
//! `SVC_COUNTERS` (per-CPU hash, keyed by the master entry's `svc_port_id`) counts what
//! the datapath sent to each Service port: packets and bytes translated towards a backend
//! (client to Service direction), and new connections (per-packet path and socket-level
//! connects). The agent deletes the entry of an id it releases, so a reused id starts
//! from zero.

use crate::Addr;

/// [`FlowEvent::kind`]: a packet was dropped.
pub const EV_DROP: u8 = 1;
/// A packet was rejected (TCP RST or ICMP unreachable sent back).
pub const EV_REJECT: u8 = 2;
/// A new connection was translated to a backend (sampled; `CFG_F_FLOW_EVENTS`).
pub const EV_NEW: u8 = 3;

/// [`FlowEvent::hook`] values (which TC program saw the packet).
pub const HOOK_FROM_POD: u8 = 0;
pub const HOOK_TO_POD: u8 = 1;
pub const HOOK_UPLINK_IN: u8 = 2;
pub const HOOK_UPLINK_OUT: u8 = 3;

/// One event on the `EVENTS` ring buffer. Addresses and ports as the packet carried them
/// when the verdict was taken; for [`EV_NEW`] `nat_dst`/`nat_dport_be` name the backend.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// `EV_*`.
    pub kind: u8,
    /// `metrics::DIR_*`.
    pub direction: u8,
    /// `metrics::REASON_*`.
    pub reason: u8,
    pub proto: u8,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    /// NetworkPolicy rule id that decided (`POLICY_RULES`), 0 if none.
    pub rule_id: u32,
    /// Packet length as the hook saw it (skb->len: the link-layer header included).
    pub len: u32,
    /// Service port of the frontend the packet was addressed to, 0 if none.
    pub svc_port_id: u32,
    /// [`EV_NEW`]: the backend chosen; zero otherwise.
    pub nat_dst: Addr,
    pub nat_dport_be: u16,
    /// `HOOK_*`.
    pub hook: u8,
    pub pad: u8,
    /// [`EV_NEW`]: the backend id; 0 otherwise.
    pub backend_id: u32,
}
crate::assert_layout!(
    FlowEvent,
    size = 88,
    kind = 8,
    direction = 9,
    reason = 10,
    proto = 11,
    ifindex = 12,
    src = 16,
    dst = 32,
    sport_be = 48,
    dport_be = 50,
    rule_id = 52,
    len = 56,
    svc_port_id = 60,
    nat_dst = 64,
    nat_dport_be = 80,
    hook = 82,
    backend_id = 84
);

/// Byte size of the `EVENTS` ring (a power of two, a multiple of the page size): about
/// 2900 events of 96 bytes (88 + the ring's 8-byte header).
pub const EVENTS_RING_BYTES: u32 = 1 << 18;

/// Event classes: each has its own token bucket, so new-connection events can never
/// starve drop events. Index into `EVENT_BUCKETS`.
pub const CLASS_DROP: u32 = 0;
pub const CLASS_FLOW: u32 = 1;
pub const EVENT_CLASSES: u32 = 2;

/// `EVENT_BUCKETS` value: a per-CPU token bucket, in nanoseconds of credit. Each event
/// costs `EVENT_COST_NS`; credit grows with time up to `EVENT_BURST_NS` (both set by
/// the agent at load time as read-only globals, so the kernel does no division).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct TokenBucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}
crate::assert_layout!(TokenBucket, size = 16, last_ns = 8);

/// `EVENT_STATS` (per-CPU array of u64) index: `class * STAT_STRIDE + STAT_*`.
pub const STAT_EMITTED: u32 = 0;
/// Suppressed by the token bucket.
pub const STAT_RATE_LIMITED: u32 = 1;
/// Lost because the ring was full (the agent did not keep up).
pub const STAT_RING_FULL: u32 = 2;
/// New connections not sampled (`CFG_F_FLOW_EVENTS` with a sample rate > 1).
pub const STAT_NOT_SAMPLED: u32 = 3;
pub const STAT_STRIDE: u32 = 4;
pub const EVENT_STATS_ENTRIES: u32 = EVENT_CLASSES * STAT_STRIDE;

#[inline(always)]
pub const fn stat_index(class: u32, stat: u32) -> u32 {
    class * STAT_STRIDE + stat
}

/// Names of the load-time globals the agent overrides (`EbpfLoader::override_global`).
pub const GLOBAL_EVENT_COST_NS: &str = "EVENT_COST_NS";
pub const GLOBAL_EVENT_BURST_NS: &str = "EVENT_BURST_NS";
/// Emit one new-connection event in this many (1: every one).
pub const GLOBAL_FLOW_SAMPLE: &str = "FLOW_SAMPLE";
/// Defaults: 1000 events per second per CPU and class, bursts of 1000.
pub const DEFAULT_EVENT_RATE: u64 = 1000;
pub const DEFAULT_EVENT_BURST: u64 = 1000;

/// `SVC_COUNTERS` value (per CPU).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct SvcCounter {
    /// Packets translated towards a backend (client to Service).
    pub packets: u64,
    pub bytes: u64,
    /// New connections (a backend chosen: per-packet path or socket-level connect).
    pub new_conns: u64,
}
crate::assert_layout!(SvcCounter, size = 24, bytes = 8, new_conns = 16);

crate::impl_pod!(FlowEvent, TokenBucket, SvcCounter);
