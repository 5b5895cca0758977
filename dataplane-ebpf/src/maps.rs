//! Every map of the datapath. Names are the symbols userspace looks up (see
//! `weir_common::maps`); capacities here are defaults the agent overrides at load time.
//! All maps are pinned by name under the agent's per-instance bpffs directory.

use aya_ebpf::{
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key,
    },
};
use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
    ct::{CtEntry, CtKey},
    events::{EVENT_CLASSES, EVENT_STATS_ENTRIES, EVENTS_RING_BYTES, SvcCounter, TokenBucket},
    lb::{
        AffinityKey, AffinitySetKey, AffinityValue, Backend, MaglevKey, RevNat, ServiceKey,
        ServiceValue, SourceRangeKey,
    },
    maps::*,
    metrics::{Counter, REASON_MAX},
    policy::{
        EndpointValue, FragKey, FragValue, IpcacheValue, PolicyEvent, PolicyKey, PolicyValue,
        RuleInfo,
    },
    sock::{SockRevKey, SockRevValue},
};

use crate::parse::Pkt;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_SERVICES_MAX, 0);
#[map]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);
#[map]
pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(DEFAULT_REV_NAT_MAX, 0);
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_AFFINITY_MAX, 0);
#[map]
pub static AFFINITY_SETS: HashMap<AffinitySetKey, u32> = HashMap::pinned(DEFAULT_BACKENDS_MAX, 0);
#[map]
pub static MAGLEV: HashMap<MaglevKey, u32> = HashMap::pinned(DEFAULT_MAGLEV_MAX, 0);
#[map]
pub static CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(DEFAULT_CT_MAX, 0);
#[map]
pub static METRICS: PerCpuArray<Counter> = PerCpuArray::pinned(REASON_MAX * 2, 0);
#[map]
pub static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);
/// Per-packet working state, in a per-CPU array instead of on the stack: the BPF stack
/// is 512 bytes for a whole call chain, and keys and entries here add up to more than
/// that. A TC program runs to completion on its CPU and TC programs do not nest (ingress
/// runs in softirq, egress with bottom halves disabled), so one slot per CPU suffices.
/// Socket-hook programs (process context, interruptible by softirq) must not use it.
/// Every field is written before it is read within one packet.
#[repr(C)]
pub struct Work {
    /// The policy decision of this packet: its input (the connection as policy sees it:
    /// after Service translation, with the original destination) and, when policy
    /// dropped the packet, `kind == EVENT_POLICY_DROP` with direction, reason, policy key,
    /// remote identity and rule id. `kind` is 0 for every packet policy did not drop
    /// (`flow::handle` clears it first). A drop-event emitter copies this, adding the
    /// timestamp, interface and length. First field, so that tests can read it from
    /// userspace at offset 0 (`weir::testing::prog::ProgHarness::decisions`).
    pub event: PolicyEvent,
    pub pkt: Pkt,
    /// Conntrack key being looked up or inserted.
    pub key: CtKey,
    /// Conntrack entry being built.
    pub ct: CtEntry,
    /// The frontend's master key and (copied) value.
    pub fe: ServiceKey,
    pub svc: ServiceValue,
    /// Key for backend-slot lookups.
    pub slot: ServiceKey,
    /// The connection's translation.
    pub be: Backend,
    pub be_id: u32,
    pub snat: u32,
    pub nat_src: Addr,
    pub nat_sport_be: u16,
    pub pad: [u8; 6],
    pub akey: AffinityKey,
    pub aval: AffinityValue,
    pub aset: AffinitySetKey,
    pub mkey: MaglevKey,
    /// SCTP: the packet's ports (first four L4 bytes, raw) as parsed and as rewritten;
    /// the entry point fixes the CRC32c once if they differ.
    pub ports_in: u32,
    pub ports_out: u32,
    /// Set by a stage whose translation left one of the node's addresses as the source:
    /// the entry point forwards the packet itself (`fwd::redirect`).
    pub redirect: u32,
    pub range_key: Key<SourceRangeKey>,
    /// NetworkPolicy (see `policy`): the `EP_F_*` isolation flags of this hook's local
    /// pod (`tc_from_pod`: the source; `tc_to_pod`: the destination), 0 when it is not
    /// isolated or not a pod of this node, and its `ENDPOINTS` value.
    pub iso: u32,
    pub ep: EndpointValue,
    pub ic_key: Key<Addr>,
    pub pol_key: Key<PolicyKey>,
    /// A fragment's `FRAGS` key and what the first fragment carried (built from the
    /// packet as it arrived, before any translation).
    pub fkey: FragKey,
    pub fval: FragValue,
    /// NetworkPolicy: the rule id and reason of the deciding `POLICY` entry, for the drop
    /// event (0: none). Zeroed per packet by `flow::handle`; the policy stages fill them.
    pub verdict_rule: u32,
    pub verdict_reason: u8,
    /// Set by the service stage when this packet opened a new translated connection
    /// (a backend was chosen): `flow::handle` then emits a sampled flow event.
    pub new_conn: u8,
    pub pad2: [u8; 2],
    /// Service port of the frontend this packet was addressed to (0: none), for events.
    pub svc_port_id: u32,
}

#[map]
pub static WORK: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// Per-Service-port counters (weir_common::events).
#[map]
pub static SVC_COUNTERS: PerCpuHashMap<u32, SvcCounter> =
    PerCpuHashMap::pinned(DEFAULT_SVC_COUNTERS_MAX, 0);
/// Flow and drop events. Not pinned: a restarted agent's programs get a fresh ring, and
/// the agent is its only reader.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
/// Event rate limiter, one token bucket per CPU and event class.
#[map]
pub static EVENT_BUCKETS: PerCpuArray<TokenBucket> =
    PerCpuArray::with_max_entries(EVENT_CLASSES, 0);
/// Emitted / suppressed events per class (pinned: monotonic across restarts).
#[map]
pub static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(EVENT_STATS_ENTRIES, 0);

#[map]
pub static NODE_ADDRS: HashMap<Addr, NodeAddrValue> = HashMap::pinned(DEFAULT_NODE_ADDRS_MAX, 0);
#[map]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(DEFAULT_SOCK_REV_MAX, 0);

/// Not pinned: its content is a constant the agent writes at every load.
#[map]
pub static CRC32C_SHIFT: Array<u32> = Array::with_max_entries(CRC32C_SHIFT_ENTRIES, 0);
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::pinned(DEFAULT_SOURCE_RANGES_MAX, 0);

// NetworkPolicy (weir_common::policy documents the lookups the datapath does on these).
#[map]
pub static IPCACHE: LpmTrie<Addr, IpcacheValue> = LpmTrie::pinned(DEFAULT_IPCACHE_MAX, 0);
#[map]
pub static ENDPOINTS: HashMap<Addr, EndpointValue> = HashMap::pinned(DEFAULT_ENDPOINTS_MAX, 0);
#[map]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(DEFAULT_POLICY_MAX, 0);
/// Userspace metadata of rule ids (the CLI names policies from it); never read here.
#[map]
pub static POLICY_RULES: HashMap<u32, RuleInfo> = HashMap::pinned(DEFAULT_POLICY_RULES_MAX, 0);
#[map]
pub static POLICY_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(DEFAULT_POLICY_RULES_MAX, 0);
/// Verdicts of fragmented datagrams (not pinned: short-lived by nature).
#[map]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(FRAGS_MAX, 0);
