//! Datapath counters: a per-CPU array indexed by `reason << 1 | direction`.
//!
//! Reasons are stable numbers (they are ABI and metric label values): add, never renumber.

pub const DIR_INGRESS: u8 = 0; // towards a pod / into the node
pub const DIR_EGRESS: u8 = 1; // from a pod / out of the node

pub const REASON_FORWARDED: u8 = 0;
pub const REASON_TRANSLATED: u8 = 1;
pub const REASON_REV_TRANSLATED: u8 = 2;
pub const REASON_NO_BACKEND_REJECT: u8 = 3;
pub const REASON_NO_LOCAL_BACKEND_DROP: u8 = 4;
pub const REASON_POLICY_DENIED: u8 = 5;
pub const REASON_SOURCE_RANGE_DENIED: u8 = 6;
pub const REASON_CT_FULL: u8 = 7;
pub const REASON_PARSE_ERROR: u8 = 8;
pub const REASON_UNSUPPORTED: u8 = 9;
pub const REASON_NAT_FAILED: u8 = 10;
pub const REASON_FRAGMENT: u8 = 11;
pub const REASON_SNAT_PORTS_EXHAUSTED: u8 = 12;
pub const REASON_POLICY_ISOLATED: u8 = 13;
pub const REASON_UNKNOWN_PORT_REJECT: u8 = 14;
/// A destination in the service CIDR that is no Service's ClusterIP (nftables drops it).
pub const REASON_UNALLOCATED_SERVICE_IP: u8 = 15;
/// A packet of an established TCP connection whose backend was removed: reset.
pub const REASON_BACKEND_GONE_RESET: u8 = 16;

/// Number of reason codes reserved (array size is `REASON_MAX * 2`).
pub const REASON_MAX: u32 = 64;

/// Human and metric names, indexed by reason code.
pub const REASON_NAMES: [&str; 17] = [
    "forwarded",
    "translated",
    "reverse_translated",
    "no_backend_reject",
    "no_local_backend_drop",
    "policy_denied",
    "source_range_denied",
    "conntrack_full",
    "parse_error",
    "unsupported",
    "nat_failed",
    "fragment",
    "snat_ports_exhausted",
    "policy_isolated",
    "unknown_port_reject",
    "unallocated_service_ip",
    "backend_gone_reset",
];

#[inline(always)]
pub const fn index(reason: u8, dir: u8) -> u32 {
    ((reason as u32) << 1) | (dir as u32 & 1)
}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
crate::assert_layout!(Counter, size = 16, bytes = 8);

crate::impl_pod!(Counter);
