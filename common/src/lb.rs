//! Service load balancing maps, in the layout Cilium proved (bpf/lib/lb.h):
//!
//! - `SERVICES`: [`ServiceKey`] -> [`ServiceValue`]. Slot 0 of scope [`SCOPE_CLUSTER`] is the
//!   frontend's master entry (backend counts, rev-NAT id, flags). Slots `1..=count` of a
//!   scope name the backends of that scope's set. A frontend is an address, port and
//!   protocol; NodePort frontends use the wildcard address (`Addr::V4_ANY`/`V6_ANY`) and
//!   match any address in `NODE_ADDRS`.
//! - `BACKENDS`: backend id -> [`Backend`].
//! - `REV_NAT`: rev-NAT id -> [`RevNat`], the frontend a reply must appear to come from.
//! - `AFFINITY` (LRU): [`AffinityKey`] -> [`AffinityValue`] for sessionAffinity ClientIP.
//! - `MAGLEV`: [`MaglevKey`] -> backend id, the per-frontend lookup table when the frontend
//!   has [`SVC_F_MAGLEV`].
//!
//! Writers keep the make-before-break order: backends before the slots that name them,
//! slots before the master entry that counts them; on shrink, the master first.

use crate::Addr;

/// The backend set chosen by the cluster-wide rules (upstream `clusterEndpoints`).
pub const SCOPE_CLUSTER: u8 = 0;
/// The node-local set (upstream `localEndpoints`), used under a Local traffic policy.
pub const SCOPE_LOCAL: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct ServiceKey {
    /// Frontend address; the family wildcard for NodePorts.
    pub addr: Addr,
    /// Frontend port, network order. 0 with `proto` 0 is the address-wide entry that
    /// marks a ClusterIP so that a port the Service lacks is rejected, as kube-proxy's
    /// nftables mode does with its cluster-ips set.
    pub port_be: u16,
    pub proto: u8,
    pub scope: u8,
    /// 0: master entry; 1..=count: backend slots.
    pub slot: u16,
    pub pad: [u8; 2],
}
crate::assert_layout!(
    ServiceKey,
    size = 24,
    port_be = 16,
    proto = 18,
    scope = 19,
    slot = 20
);

/// Master-entry flags (slot 0).
pub const SVC_F_EXTERNAL: u32 = 1 << 0; // NodePort, LoadBalancer or externalIP frontend
pub const SVC_F_LOCAL: u32 = 1 << 1; // traffic policy Local for this frontend's kind
pub const SVC_F_NODEPORT: u32 = 1 << 2;
pub const SVC_F_AFFINITY: u32 = 1 << 3; // sessionAffinity ClientIP
pub const SVC_F_MAGLEV: u32 = 1 << 4;
/// Endpoints exist somewhere (upstream `hasAnyEndpoints`): an empty usable set then
/// means drop, not reject.
pub const SVC_F_HAS_ENDPOINTS: u32 = 1 << 5;
/// Address-wide ClusterIP marker (port 0, proto 0): reject unknown ports.
pub const SVC_F_VIP_MARKER: u32 = 1 << 6;
/// Masquerade external traffic (eTP=Cluster external frontends).
pub const SVC_F_MASQ: u32 = 1 << 7;
/// loadBalancerSourceRanges apply (LB-IP frontends); see `SOURCE_RANGES`.
pub const SVC_F_SRC_RANGES: u32 = 1 << 8;
/// LoadBalancer IP frontend.
pub const SVC_F_LOADBALANCER: u32 = 1 << 9;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct ServiceValue {
    /// Backend slots: the backend id. Master: 0.
    pub backend_id: u32,
    /// Master: number of slots in the cluster scope.
    pub count: u16,
    /// Master: number of slots in the local scope.
    pub local_count: u16,
    /// Master: id into `REV_NAT` (also the service-port id used by counters and affinity).
    pub rev_nat_id: u32,
    /// Master: `SVC_F_*`.
    pub flags: u32,
    /// Master: sessionAffinity timeout in seconds (0 when no affinity).
    pub affinity_timeout_s: u32,
    /// Master: the Service port this frontend belongs to (all frontends of one Service
    /// port share it: the rev-NAT id of its ClusterIP frontend). Session affinity is per
    /// Service port, whichever address the client used (upstream records per endpoint).
    pub svc_port_id: u32,
}
crate::assert_layout!(
    ServiceValue,
    size = 24,
    count = 4,
    rev_nat_id = 8,
    flags = 12,
    svc_port_id = 20
);

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Backend {
    pub addr: Addr,
    pub port_be: u16,
    pub proto: u8,
    /// `BE_F_*`.
    pub flags: u8,
    pub pad: u32,
}
crate::assert_layout!(Backend, size = 24, port_be = 16, proto = 18, flags = 19);

/// The backend is a pod on this node.
pub const BE_F_LOCAL: u8 = 1 << 0;
/// The backend is terminating (used only as the serving-terminating fallback).
pub const BE_F_TERMINATING: u8 = 1 << 1;
/// The endpoint is serving. Backends stay in `BACKENDS` while their endpoint exists in
/// any EndpointSlice, usable or not, so established TCP connections drain (upstream never
/// cleans TCP conntrack); UDP flows follow kube-proxy's conntrack cleanup
/// (pkg/proxy/conntrack/cleanup.go): a UDP flow whose endpoint is not serving is
/// re-balanced.
pub const BE_F_SERVING: u8 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct RevNat {
    /// The frontend address (the family wildcard for NodePorts).
    pub addr: Addr,
    pub port_be: u16,
    pub proto: u8,
    pub pad: [u8; 5],
}
crate::assert_layout!(RevNat, size = 24, port_be = 16, proto = 18);

/// `AFFINITY` key: sessionAffinity ClientIP is keyed by the client address alone, per
/// Service port (upstream: one record per endpoint holding source IPs, consulted for the
/// endpoints of the chain in use).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct AffinityKey {
    pub client: Addr,
    pub svc_port_id: u32,
    pub pad: u32,
}
crate::assert_layout!(AffinityKey, size = 24, svc_port_id = 16);

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub pad: u32,
    /// bpf_ktime_get_ns() of the last use (CLOCK_MONOTONIC).
    pub last_used_ns: u64,
}
crate::assert_layout!(AffinityValue, size = 16, last_used_ns = 8);

/// `AFFINITY_SETS` key: "backend B is in scope S of Service port P". An affinity record
/// is honoured only if its backend is still in the set the packet uses, so a backend
/// that left the Service is a miss (even if another Service still uses it), and a record
/// made through one frontend is honoured through another when the backend is in both
/// sets, as upstream does. Written only for Services with affinity.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct AffinitySetKey {
    pub svc_port_id: u32,
    pub backend_id: u32,
    pub scope: u8,
    pub pad: [u8; 3],
}
crate::assert_layout!(AffinitySetKey, size = 12, backend_id = 4, scope = 8);

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct MaglevKey {
    pub rev_nat_id: u32,
    pub scope: u8,
    pub pad: [u8; 3],
    /// Index into the frontend's lookup table, `0..table_size`.
    pub index: u32,
}
crate::assert_layout!(MaglevKey, size = 12, scope = 4, index = 8);

/// `SOURCE_RANGES` (LPM trie) key: a frontend's rev-NAT id followed by a source
/// address. The id's 32 bits are always inside the prefix (prefix length = 32 + the
/// address prefix, v4 ranges counted from bit 96 of the v4-mapped address), so its byte
/// order does not matter; the address is in network order, which LPM matching needs.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct SourceRangeKey {
    pub rev_nat_id: u32,
    pub addr: Addr,
}
crate::assert_layout!(SourceRangeKey, size = 20, addr = 4);

crate::impl_pod!(
    AffinitySetKey,
    SourceRangeKey,
    ServiceKey,
    ServiceValue,
    Backend,
    RevNat,
    AffinityKey,
    AffinityValue,
    MaglevKey
);
