//! [`AyaDatapath`]: the map writer over the real BPF maps, and typed readers used by the
//! inspection CLI on the pinned maps of a running node.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
    ct::{CtEntry, CtKey},
    lb::{AffinitySetKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRangeKey},
    maps as names,
    metrics::Counter,
    policy::{EndpointValue, IpcacheValue, PolicyKey, PolicyValue, RuleInfo},
};
use weir_core::{
    datapath::{ApplyError, ApplyOutcome, Datapath},
    image::MapImage,
    plan::{Op, Plan},
    policy::plan::PolicyOp,
};

/// (key size, value size) of each map, for the pin compatibility check.
pub fn expected_layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match name {
        names::SERVICES => s(size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        names::BACKENDS => s(4, size_of::<Backend>()),
        names::REV_NAT => s(4, size_of::<RevNat>()),
        names::AFFINITY => s(
            size_of::<weir_common::lb::AffinityKey>(),
            size_of::<weir_common::lb::AffinityValue>(),
        ),
        names::MAGLEV => s(size_of::<weir_common::lb::MaglevKey>(), 4),
        names::CT => s(size_of::<CtKey>(), size_of::<CtEntry>()),
        names::METRICS => s(4, size_of::<Counter>()),
        names::CONFIG => s(4, size_of::<NodeConfig>()),
        names::NODE_ADDRS => s(size_of::<Addr>(), size_of::<NodeAddrValue>()),
        names::SOURCE_RANGES => s(4 + size_of::<SourceRangeKey>(), 4),
        names::AFFINITY_SETS => s(size_of::<AffinitySetKey>(), 4),
        names::IPCACHE => s(4 + size_of::<Addr>(), size_of::<IpcacheValue>()),
        names::ENDPOINTS => s(size_of::<Addr>(), size_of::<EndpointValue>()),
        names::POLICY => s(4 + size_of::<PolicyKey>(), size_of::<PolicyValue>()),
        names::POLICY_RULES => s(4, size_of::<RuleInfo>()),
        names::POLICY_COUNTERS => s(4, size_of::<Counter>()),
        names::SVC_COUNTERS => s(4, size_of::<weir_common::events::SvcCounter>()),
        names::EVENT_STATS => s(4, 8),
        _ => None,
    }
}

/// Handles to the maps the control plane writes.
pub struct AyaDatapath {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    rev_nat: HashMap<MapData, u32, RevNat>,
    node_addrs: HashMap<MapData, Addr, NodeAddrValue>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    maglev: HashMap<MapData, MaglevKey, u32>,
    affinity_sets: HashMap<MapData, AffinitySetKey, u32>,
    config: Array<MapData, NodeConfig>,
    ipcache: LpmTrie<MapData, Addr, IpcacheValue>,
    endpoints: HashMap<MapData, Addr, EndpointValue>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    policy_rules: HashMap<MapData, u32, RuleInfo>,
    policy_counters: PerCpuArray<MapData, Counter>,
    /// Possible CPUs (length of a per-CPU value).
    ncpus: usize,
    capacities: BTreeMap<&'static str, u32>,
}

fn ncpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow!("reading {what}: {e}"))
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Opens a pinned map of a running node.
pub fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is a weir agent running with this pin directory?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

impl AyaDatapath {
    pub(super) fn take(ebpf: &mut Ebpf, capacities: BTreeMap<&'static str, u32>) -> Result<Self> {
        Ok(Self {
            services: take(ebpf, names::SERVICES)?.try_into()?,
            backends: take(ebpf, names::BACKENDS)?.try_into()?,
            rev_nat: take(ebpf, names::REV_NAT)?.try_into()?,
            node_addrs: take(ebpf, names::NODE_ADDRS)?.try_into()?,
            source_ranges: take(ebpf, names::SOURCE_RANGES)?.try_into()?,
            maglev: take(ebpf, names::MAGLEV)?.try_into()?,
            affinity_sets: take(ebpf, names::AFFINITY_SETS)?.try_into()?,
            config: take(ebpf, names::CONFIG)?.try_into()?,
            ipcache: take(ebpf, names::IPCACHE)?.try_into()?,
            endpoints: take(ebpf, names::ENDPOINTS)?.try_into()?,
            policy: take(ebpf, names::POLICY)?.try_into()?,
            policy_rules: take(ebpf, names::POLICY_RULES)?.try_into()?,
            policy_counters: take(ebpf, names::POLICY_COUNTERS)?.try_into()?,
            ncpus: ncpus()?,
            capacities,
        })
    }

    /// Opens the maps of a running node from its pin directory (read-mostly: the CLI).
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let mut capacities = BTreeMap::new();
        for (name, _) in names::ALL {
            if let Ok(m) = open_pinned(pin_dir, name)
                && let Ok(info) = map_info(&m)
            {
                capacities.insert(*name, info);
            }
        }
        Ok(Self {
            services: open_pinned(pin_dir, names::SERVICES)?.try_into()?,
            backends: open_pinned(pin_dir, names::BACKENDS)?.try_into()?,
            rev_nat: open_pinned(pin_dir, names::REV_NAT)?.try_into()?,
            node_addrs: open_pinned(pin_dir, names::NODE_ADDRS)?.try_into()?,
            source_ranges: open_pinned(pin_dir, names::SOURCE_RANGES)?.try_into()?,
            maglev: open_pinned(pin_dir, names::MAGLEV)?.try_into()?,
            affinity_sets: open_pinned(pin_dir, names::AFFINITY_SETS)?.try_into()?,
            config: open_pinned(pin_dir, names::CONFIG)?.try_into()?,
            ipcache: open_pinned(pin_dir, names::IPCACHE)?.try_into()?,
            endpoints: open_pinned(pin_dir, names::ENDPOINTS)?.try_into()?,
            policy: open_pinned(pin_dir, names::POLICY)?.try_into()?,
            policy_rules: open_pinned(pin_dir, names::POLICY_RULES)?.try_into()?,
            policy_counters: open_pinned(pin_dir, names::POLICY_COUNTERS)?.try_into()?,
            ncpus: ncpus()?,
            capacities,
        })
    }

    /// Longest-prefix lookup in `IPCACHE` (the kernel does the matching).
    pub fn ipcache_lookup(&self, a: &Addr) -> Result<Option<IpcacheValue>, MapError> {
        ignore_absent(self.ipcache.get(&LpmKey::new(128, *a), 0))
    }

    /// Exact lookup in `ENDPOINTS`.
    pub fn endpoint_lookup(&self, a: &Addr) -> Result<Option<EndpointValue>, MapError> {
        ignore_absent(self.endpoints.get(a, 0))
    }

    /// Longest-prefix lookup in `POLICY` with a full-length key (the kernel does the
    /// matching, exactly as the datapath's lookup will).
    pub fn policy_lookup(&self, k: &PolicyKey) -> Result<Option<PolicyValue>, MapError> {
        ignore_absent(
            self.policy
                .get(&LpmKey::new(weir_common::policy::POLICY_PLEN_FULL, *k), 0),
        )
    }

    /// Per-rule counters, summed over CPUs (rule ids with traffic only).
    pub fn policy_counters(&self) -> Result<BTreeMap<u32, Counter>, MapError> {
        let mut out = BTreeMap::new();
        for i in 0..self.policy_counters.len() {
            let mut sum = Counter::default();
            for v in self.policy_counters.get(&i, 0)?.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            if sum.packets != 0 {
                out.insert(i, sum);
            }
        }
        Ok(out)
    }

    fn write_policy(&mut self, op: &PolicyOp) -> Result<(), MapError> {
        match op {
            PolicyOp::PutRule(id, info) => {
                // A rule id that is (re)assigned starts counting from zero.
                let zeros =
                    aya::maps::PerCpuValues::try_from(vec![Counter::default(); self.ncpus])?;
                self.policy_counters.set(*id, zeros, 0)?;
                self.policy_rules.insert(id, **info, 0)
            }
            PolicyOp::DelRule(id) => ignore_missing(self.policy_rules.remove(id)),
            PolicyOp::PutPolicy((plen, k), v) => self.policy.insert(&LpmKey::new(*plen, *k), v, 0),
            PolicyOp::DelPolicy((plen, k)) => {
                ignore_missing(self.policy.remove(&LpmKey::new(*plen, *k)))
            }
            PolicyOp::PutIpcache((plen, k), v) => {
                self.ipcache.insert(&LpmKey::new(*plen, *k), v, 0)
            }
            PolicyOp::DelIpcache((plen, k)) => {
                ignore_missing(self.ipcache.remove(&LpmKey::new(*plen, *k)))
            }
            PolicyOp::PutEndpoint(k, v) => self.endpoints.insert(k, v, 0),
            PolicyOp::DelEndpoint(k) => ignore_missing(self.endpoints.remove(k)),
        }
    }

    /// The node config as the datapath holds it.
    pub fn config(&self) -> Result<NodeConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    fn write(&mut self, op: &Op) -> Result<(), MapError> {
        match op {
            Op::PutConfig(c) => self.config.set(0, c, 0),
            Op::PutNodeAddr(k, v) => self.node_addrs.insert(k, v, 0),
            Op::PutBackend(k, v) => self.backends.insert(k, v, 0),
            Op::PutRevNat(k, v) => self.rev_nat.insert(k, v, 0),
            Op::PutService(k, v) => self.services.insert(k, v, 0),
            Op::DelService(k) => ignore_missing(self.services.remove(k)),
            Op::DelRevNat(k) => ignore_missing(self.rev_nat.remove(k)),
            Op::DelBackend(k) => ignore_missing(self.backends.remove(k)),
            Op::DelNodeAddr(k) => ignore_missing(self.node_addrs.remove(k)),
            Op::PutSourceRange((plen, k), v) => {
                self.source_ranges.insert(&LpmKey::new(*plen, *k), v, 0)
            }
            Op::DelSourceRange((plen, k)) => {
                ignore_missing(self.source_ranges.remove(&LpmKey::new(*plen, *k)))
            }
            Op::PutMaglev(k, v) => self.maglev.insert(k, v, 0),
            Op::DelMaglev(k) => ignore_missing(self.maglev.remove(k)),
            Op::PutAffinitySet(k, v) => self.affinity_sets.insert(k, v, 0),
            Op::DelAffinitySet(k) => ignore_missing(self.affinity_sets.remove(k)),
            Op::Policy(p) => self.write_policy(p),
        }
    }
}

fn map_info(m: &Map) -> Result<u32> {
    let fd = match m {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::LpmTrie(d) => d,
        _ => return Err(anyhow!("unexpected map type")),
    };
    Ok(fd.info()?.max_entries())
}

/// A lookup miss is `None`, not an error.
fn ignore_absent<V>(r: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Deleting a key that is already gone is success (plans are idempotent).
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)))
}

impl Datapath for AyaDatapath {
    fn apply(&mut self, plan: &Plan) -> ApplyOutcome {
        for (i, op) in plan.ops.iter().enumerate() {
            if let Err(e) = self.write(op) {
                let map = op.map_name();
                let error = if is_full(&e) {
                    ApplyError::MapFull {
                        map,
                        capacity: self.capacities.get(map).copied().unwrap_or(0),
                        op: Box::new(op.clone()),
                    }
                } else {
                    ApplyError::Write {
                        map,
                        op: Box::new(op.clone()),
                        reason: e.to_string(),
                    }
                };
                return ApplyOutcome {
                    applied: i,
                    error: Some(error),
                };
            }
        }
        ApplyOutcome {
            applied: plan.ops.len(),
            error: None,
        }
    }

    fn read_image(&self) -> Result<MapImage, String> {
        let e = |e: MapError| e.to_string();
        let mut img = MapImage::default();
        for r in self.services.iter() {
            let (k, v) = r.map_err(e)?;
            img.services.insert(k, v);
        }
        for r in self.backends.iter() {
            let (k, v) = r.map_err(e)?;
            img.backends.insert(k, v);
        }
        for r in self.rev_nat.iter() {
            let (k, v) = r.map_err(e)?;
            img.rev_nat.insert(k, v);
        }
        for r in self.node_addrs.iter() {
            let (k, v) = r.map_err(e)?;
            img.node_addrs.insert(k, v);
        }
        for r in self.source_ranges.iter() {
            let (k, v) = r.map_err(e)?;
            img.source_ranges.insert((k.prefix_len(), k.data()), v);
        }
        for r in self.maglev.iter() {
            let (k, v) = r.map_err(e)?;
            img.maglev.insert(k, v);
        }
        for r in self.affinity_sets.iter() {
            let (k, v) = r.map_err(e)?;
            img.affinity_sets.insert(k, v);
        }
        for r in self.ipcache.iter() {
            let (k, v) = r.map_err(e)?;
            img.policy.ipcache.insert((k.prefix_len(), k.data()), v);
        }
        for r in self.endpoints.iter() {
            let (k, v) = r.map_err(e)?;
            img.policy.endpoints.insert(k, v);
        }
        for r in self.policy.iter() {
            let (k, v) = r.map_err(e)?;
            img.policy.policy.insert((k.prefix_len(), k.data()), v);
        }
        for r in self.policy_rules.iter() {
            let (k, v) = r.map_err(e)?;
            img.policy.rules.insert(k, v);
        }
        let c = self.config.get(&0, 0).map_err(e)?;

        if c != NodeConfig::default() {
            img.config = Some(c);
        }
        Ok(img)
    }

    fn capacities(&self) -> BTreeMap<&'static str, u32> {
        self.capacities.clone()
    }
}

/// Sums a per-CPU counter array (the METRICS map) by index.
pub fn read_counters(pin_dir: &Path) -> Result<BTreeMap<u32, Counter>> {
    let m: PerCpuArray<MapData, Counter> = open_pinned(pin_dir, names::METRICS)?.try_into()?;
    let mut out = BTreeMap::new();
    for i in 0..m.len() {
        let vals = m.get(&i, 0)?;
        let mut sum = Counter::default();
        for v in vals.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
        }
        if sum.packets != 0 {
            out.insert(i, sum);
        }
    }
    Ok(out)
}
