//! NetworkPolicy maps: identities as equivalence classes of remote addresses, policy keys
//! as equivalence classes of local endpoints, and one LPM map of allow/deny entries.
//!
//! # The idea
//! Two remote addresses that match exactly the same NetworkPolicy peers (pod/namespace
//! selectors, ipBlocks with their excepts) and declare the same numbers for the named
//! ports that egress rules use can never be told apart by any policy, so they share one
//! numeric *identity*. Two local pods selected by the same policies (and, for ingress,
//! resolving the named ports of those policies to the same numbers) share a *policy key*
//! per direction. The `POLICY` map then holds, per policy key and direction, which
//! identities may talk on which protocol and port: it is as small as the policies
//! themselves, not the product of pods and pods. The agent (weir-core `policy`) computes
//! all of it; the datapath only does the lookups below.
//!
//! # Maps
//! | map | type | key -> value |
//! |---|---|---|
//! | `IPCACHE` | LPM trie | [`Addr`] prefix -> [`IpcacheValue`] (identity, local-node flag) |
//! | `ENDPOINTS` | hash | local pod [`Addr`] -> [`EndpointValue`] (policy key and isolation per direction) |
//! | `POLICY` | LPM trie | [`PolicyKey`] -> [`PolicyValue`] (verdict, reason, rule id) |
//! | `POLICY_RULES` | hash | rule id -> [`RuleInfo`] (which policy and rule; userspace only) |
//! | `POLICY_COUNTERS` | per-CPU array | rule id -> [`Counter`] (packets, bytes) |
//!
//! `IPCACHE` always holds the two family roots (`::ffff:0.0.0.0/96` for IPv4, `::/0` for
//! IPv6), so every lookup hits. IPv4 addresses are v4-mapped ([`Addr`]); since the IPv4
//! root is longer than any IPv6 prefix that could contain it, an IPv6 ipBlock such as
//! `::/0` never matches IPv4 traffic. Pod addresses are /32 (/128) entries, but only for
//! pods whose identity differs from that of the ipBlock region around them.
//!
//! # The lookups the datapath does, in order
//! Policy is evaluated on the packet as it reaches the pod or leaves it *after* Service
//! translation (egress rules see the backend pod's address and target port, as the
//! upstream suite requires), per direction, on the node of the pod of that direction:
//! egress at `tc_from_pod` of the source pod's node, ingress at `tc_to_pod` of the
//! destination pod's node.
//!
//! 1. Conntrack first (NetworkPolicy filters connections, not packets): a packet of a
//!    tracked flow in the reply direction, or in the forward direction of a flow whose
//!    entry already records this direction's verdict (`CT_F_EGRESS_OK` /
//!    `CT_F_INGRESS_OK`), passes without any policy lookup. ICMP errors are matched to
//!    the flow they quote and pass with it. Everything below is for the first packet of
//!    a connection (or a packet conntrack does not know, e.g. a TCP ACK without SYN to an
//!    isolated pod: it is looked up like a new connection and dropped if not allowed).
//! 2. `ep = ENDPOINTS[local]` where `local` is the source address for egress and the
//!    destination for ingress. No entry, or the direction's `EP_F_*_ISOLATED` flag clear:
//!    allowed (a pod is isolated for a direction only once a policy selects it for that
//!    direction).
//! 3. `src == dst` (a pod talking to itself, e.g. through its own Service): allowed.
//! 4. `ic = IPCACHE[remote/128]` (longest prefix match; `remote` is the destination for
//!    egress, the source for ingress). Ingress only: `ic.flags & IC_F_LOCAL_NODE` (the
//!    pod's own node) is allowed, as the API reference says for ingress. A miss (a map
//!    not yet programmed) uses [`ID_UNKNOWN`].
//! 5. `POLICY[{key, ic.identity, dir, proto, dport}/96]`: a hit is always an allow
//!    entry: allowed, count it on the entry's rule id.
//! 6. `POLICY[{key, ID_ANY, dir, proto, dport}/96]`: rules that name no peer, and the
//!    key's catch-all, which always exists for an isolated key: the entry's verdict
//!    decides (`VERDICT_ALLOW`, or `VERDICT_DENY` with its reason
//!    `REASON_POLICY_ISOLATED` (the key has no rule for this direction at all) or
//!    `REASON_POLICY_DENIED` (it has rules, none allows this)). A miss is a deny with
//!    `REASON_POLICY_DENIED` (fail closed).
//! 7. Count: `POLICY_COUNTERS[rule_id]` for the entry that decided; `METRICS` by reason
//!    and direction for drops; a drop emits a [`PolicyEvent`] on the event ring buffer.
//!    A connection passes only if the source's egress and the destination's ingress both
//!    allow it; each node checks its own side, and a flow between two pods of one node
//!    is checked at both hooks of that node.
//!
//! For other IP protocols (ICMP echo, ...) the lookups use `proto` and port 0: only
//! rules without ports (any protocol) allow them.
//!
//! # Why [`PolicyKey`]'s fields are in this order
//! An LPM trie matches a prefix of the key's bytes, in memory order. `policy_key`,
//! `identity` and `direction` are always matched in full (the first 72 bits), so their
//! relative order does not matter; what matters is that everything after them can be
//! wildcarded from the right: `proto` (a prefix of 72 bits is "any protocol, any
//! port"), then `port_be` (80 bits is "this protocol, any port"; 80 + k bits is a port
//! range cut into aligned blocks, which is why the port is big-endian: the most
//! significant bits come first in memory). The identity cannot be wildcarded the same
//! way (it sits before the port), hence the second lookup with [`ID_ANY`] (step 6), the
//! same split Cilium makes between L3-dependent and L4-only policy entries.

use crate::{Addr, metrics::Counter};

/// `POLICY` identity of entries that match every remote (rules without peers, and each
/// isolated key's catch-all). Never stored in `IPCACHE`.
pub const ID_ANY: u32 = 0;
/// Identity the datapath uses when `IPCACHE` has no entry (never when it is programmed,
/// since the family roots always exist): only [`ID_ANY`] entries match it.
pub const ID_UNKNOWN: u32 = 1;
/// Identities and policy keys the agent allocates start here (below: reserved).
pub const ID_FIRST_DYNAMIC: u32 = 256;

/// `IPCACHE` value.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    /// `IC_F_*`.
    pub flags: u32,
}
crate::assert_layout!(IpcacheValue, size = 8, flags = 4);

/// An address of the node this datapath runs on: ingress from it is always allowed
/// (API reference, NetworkPolicySpec.ingress: "OR if the traffic source is the pod's
/// local node"). Egress to it is subject to egress policy like any non-pod address.
pub const IC_F_LOCAL_NODE: u32 = 1 << 0;

/// `ENDPOINTS` value: a pod of this node.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct EndpointValue {
    /// Policy key for traffic into the pod (0 when not isolated for ingress).
    pub ingress_key: u32,
    /// Policy key for traffic out of the pod (0 when not isolated for egress).
    pub egress_key: u32,
    /// `EP_F_*`.
    pub flags: u32,
    /// Host-side interface of the pod's veth; 0 when not known (the pure compiler does
    /// not know interfaces; the agent fills it when it learns the link).
    pub ifindex: u32,
}
crate::assert_layout!(
    EndpointValue,
    size = 16,
    egress_key = 4,
    flags = 8,
    ifindex = 12
);

pub const EP_F_INGRESS_ISOLATED: u32 = 1 << 0;
pub const EP_F_EGRESS_ISOLATED: u32 = 1 << 1;

/// `POLICY` key (the LPM data after the trie's u32 prefix length). See the module doc
/// for why the fields are in this order.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct PolicyKey {
    /// The local endpoint's policy key for `direction` (host order; always matched in full).
    pub policy_key: u32,
    /// Remote identity, or [`ID_ANY`] (host order; always matched in full).
    pub identity: u32,
    /// `metrics::DIR_INGRESS` / `DIR_EGRESS`.
    pub direction: u8,
    /// IP protocol; 0 in entries whose prefix stops before it.
    pub proto: u8,
    /// Destination port, network order so that a prefix takes its high bits first; 0 in
    /// entries whose prefix stops before it.
    pub port_be: u16,
}
crate::assert_layout!(
    PolicyKey,
    size = 12,
    identity = 4,
    direction = 8,
    proto = 9,
    port_be = 10
);

/// Prefix lengths of [`PolicyKey`] entries (bits of the key data that must match).
pub const POLICY_PLEN_ANY_PROTO: u32 = 72;
pub const POLICY_PLEN_ANY_PORT: u32 = 80;
pub const POLICY_PLEN_FULL: u32 = 96;

/// `POLICY` value.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct PolicyValue {
    /// `VERDICT_*`.
    pub verdict: u8,
    /// For denies: `metrics::REASON_POLICY_ISOLATED` or `REASON_POLICY_DENIED`; 0 for allows.
    pub reason: u8,
    pub pad: [u8; 2],
    /// Index into `POLICY_COUNTERS` and key of `POLICY_RULES`: the rule that allowed, or
    /// the default-deny pseudo-rule of the policy a deny is counted against.
    pub rule_id: u32,
}
crate::assert_layout!(PolicyValue, size = 8, reason = 1, rule_id = 4);

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Longest `namespace/name` a [`RuleInfo`] holds (namespace <= 63, name <= 253 bytes).
pub const RULE_NAME_MAX: usize = 320;

/// `POLICY_RULES` value: what a rule id stands for, so that the CLI can name the policy
/// behind a counter or a drop, and a restarted agent keeps its rule ids (and so the
/// counters). The datapath never reads it.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RuleInfo {
    /// `RULE_KIND_*`.
    pub kind: u8,
    /// `metrics::DIR_*`.
    pub direction: u8,
    /// Bytes of `name` used.
    pub name_len: u16,
    /// Index of the rule in the policy's `ingress` or `egress` list (allow rules).
    pub index: u32,
    /// `namespace/name` of the NetworkPolicy, UTF-8, zero-padded.
    pub name: [u8; RULE_NAME_MAX],
}
crate::assert_layout!(RuleInfo, size = 8 + RULE_NAME_MAX, index = 4, name = 8);

impl Default for RuleInfo {
    fn default() -> Self {
        RuleInfo {
            kind: 0,
            direction: 0,
            name_len: 0,
            index: 0,
            name: [0; RULE_NAME_MAX],
        }
    }
}

impl RuleInfo {
    /// The policy's `namespace/name` (empty if not valid UTF-8).
    pub fn name(&self) -> &str {
        let n = (self.name_len as usize).min(RULE_NAME_MAX);
        core::str::from_utf8(&self.name[..n]).unwrap_or("")
    }
}

/// An allow rule: `ingress[index]` / `egress[index]` of the policy.
pub const RULE_KIND_ALLOW: u8 = 1;
/// The policy's default deny for a direction: packets dropped at pods it isolates.
/// A pod isolated by several policies counts its drops against the first of them
/// (by namespace/name).
pub const RULE_KIND_DEFAULT_DENY: u8 = 2;

/// Per-rule counters (`POLICY_COUNTERS`, per-CPU array indexed by rule id): the per-policy
/// allow count is the sum over its allow rules, the deny count its default-deny rule.
pub type RuleCounter = Counter;

/// Ring-buffer event kinds (first byte after the timestamp).
pub const EVENT_POLICY_DROP: u8 = 1;

/// A policy drop on the event ring buffer. Names the flow (addresses and ports as the
/// policy saw them: after Service translation, plus the original destination), the
/// decision (direction, reason, policy key, remote identity, rule id) and where.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct PolicyEvent {
    /// `bpf_ktime_get_ns()`.
    pub ts_ns: u64,
    /// [`EVENT_POLICY_DROP`].
    pub kind: u8,
    /// `metrics::DIR_*`: whose policy dropped it (source's egress / destination's ingress).
    pub direction: u8,
    /// `metrics::REASON_POLICY_DENIED` or `REASON_POLICY_ISOLATED`.
    pub reason: u8,
    pub proto: u8,
    /// Interface the packet was seen on.
    pub ifindex: u32,
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    /// Policy key of the local endpoint for `direction`.
    pub policy_key: u32,
    /// Identity of the remote end (`IPCACHE`).
    pub remote_identity: u32,
    /// Rule id of the deciding `POLICY` entry (0 on a miss).
    pub rule_id: u32,
    /// Packet length.
    pub len: u32,
    /// Destination before Service translation (equal to `dst`/`dport_be` when none).
    pub orig_dport_be: u16,
    pub pad: u16,
    pub orig_dst: Addr,
}
crate::assert_layout!(
    PolicyEvent,
    size = 88,
    kind = 8,
    ifindex = 12,
    src = 16,
    dst = 32,
    sport_be = 48,
    policy_key = 52,
    remote_identity = 56,
    rule_id = 60,
    len = 64,
    orig_dport_be = 68,
    orig_dst = 72
);

/// `FRAGS` key: one IP datagram being fragmented, as seen at one hook. Later fragments
/// carry no transport header, so the verdict the first fragment got (and its ports) is
/// kept here and applied to the rest of the datagram (Cilium's IPV4_FRAG_DATAGRAMS_MAP
/// idea). Keyed by the addresses, protocol and IP identification as the packet arrived
/// at the hook (before any translation), and the hook's direction, since one datagram
/// can meet the source's egress and the destination's ingress on one node.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4 identification (16 bits, host order) or IPv6 fragment header identification
    /// (32 bits, host order).
    pub id: u32,
    pub proto: u8,
    /// `metrics::DIR_*` of the hook.
    pub direction: u8,
    pub pad: [u8; 2],
}
crate::assert_layout!(
    FragKey,
    size = 40,
    dst = 16,
    id = 32,
    proto = 36,
    direction = 37
);

/// `FRAGS` value: what the first fragment got.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
    /// [`FRAG_ALLOWED`] or [`FRAG_DROPPED`].
    pub verdict: u8,
    /// For drops: the `metrics::REASON_*` the first fragment was dropped for.
    pub reason: u8,
    pub pad: [u8; 2],
}
crate::assert_layout!(FragValue, size = 8, verdict = 4, reason = 5);

pub const FRAG_ALLOWED: u8 = 1;
pub const FRAG_DROPPED: u8 = 2;

crate::impl_pod!(
    FragKey,
    FragValue,
    IpcacheValue,
    EndpointValue,
    PolicyKey,
    PolicyValue,
    RuleInfo,
    PolicyEvent
);
