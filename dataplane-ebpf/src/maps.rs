//! Every map of the datapath. Names are the symbols userspace looks up (see
//! `weir_common::maps`); capacities here are defaults the agent overrides at load time.
//! All maps are pinned by name under the agent's per-instance bpffs directory.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
    ct::{CtEntry, CtKey},
    lb::{AffinityKey, AffinityValue, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue},
    maps::*,
    metrics::{Counter, REASON_MAX},
};

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
pub static MAGLEV: HashMap<MaglevKey, u32> = HashMap::pinned(DEFAULT_MAGLEV_MAX, 0);
#[map]
pub static CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(DEFAULT_CT_MAX, 0);
#[map]
pub static METRICS: PerCpuArray<Counter> = PerCpuArray::pinned(REASON_MAX * 2, 0);
#[map]
pub static CONFIG: Array<NodeConfig> = Array::pinned(1, 0);
/// Per-CPU scratch space for values too large for the 512-byte BPF stack (a program runs
/// to completion on one CPU, so one slot per CPU is enough).
#[repr(C)]
pub struct Scratch {
    pub ct: CtEntry,
}

#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static NODE_ADDRS: HashMap<Addr, NodeAddrValue> = HashMap::pinned(DEFAULT_NODE_ADDRS_MAX, 0);
