//! [`KernelCounters`] over the real pinned maps, the periodic conntrack scan, and the
//! deletion of counters of Service port ids the agent released.

use std::{collections::BTreeMap, path::Path, sync::Mutex};

use anyhow::Result;
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use weir_common::{
    ct::{CtEntry, CtKey},
    events::SvcCounter,
    lb::{AffinityKey, AffinityValue},
    maps as names,
    metrics::Counter,
    sock::{SockRevKey, SockRevValue},
};

use super::{CtCounts, KernelCounters};
use crate::datapath::maps::open_pinned;

/// The counter maps of a running datapath, opened from its pin directory (their own
/// file descriptors: scrapes read them from the HTTP server's tasks).
pub struct AyaKernelCounters {
    metrics: Mutex<PerCpuArray<MapData, Counter>>,
    services: Mutex<PerCpuHashMap<MapData, u32, SvcCounter>>,
    stats: Mutex<PerCpuArray<MapData, u64>>,
}

impl AyaKernelCounters {
    pub fn open(pin_dir: &Path) -> Result<AyaKernelCounters> {
        Ok(AyaKernelCounters {
            metrics: Mutex::new(open_pinned(pin_dir, names::METRICS)?.try_into()?),
            services: Mutex::new(open_pinned(pin_dir, names::SVC_COUNTERS)?.try_into()?),
            stats: Mutex::new(open_pinned(pin_dir, names::EVENT_STATS)?.try_into()?),
        })
    }

    /// Deletes the counters of these Service port ids.
    pub fn forget_services(&self, ids: &[u32]) {
        let mut m = self.services.lock().expect("lock");
        for id in ids {
            let _ = m.remove(id);
        }
    }

    /// Deletes the counters of every id `keep` rejects (after a restart: ids of Services
    /// deleted while no agent ran).
    pub fn retain_services(&self, keep: impl Fn(u32) -> bool) -> usize {
        let mut m = self.services.lock().expect("lock");
        let stale: Vec<u32> = m.keys().flatten().filter(|id| !keep(*id)).collect();
        for id in &stale {
            let _ = m.remove(id);
        }
        stale.len()
    }
}

impl KernelCounters for AyaKernelCounters {
    fn datapath(&self) -> Result<BTreeMap<u32, Counter>> {
        let m = self.metrics.lock().expect("lock");
        let mut out = BTreeMap::new();
        for i in 0..m.len() {
            let mut sum = Counter::default();
            for v in m.get(&i, 0)?.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            if sum.packets != 0 {
                out.insert(i, sum);
            }
        }
        Ok(out)
    }

    fn services(&self) -> Result<BTreeMap<u32, SvcCounter>> {
        let m = self.services.lock().expect("lock");
        let mut out = BTreeMap::new();
        for r in m.iter() {
            let (id, vals) = r?;
            let mut sum = SvcCounter::default();
            for v in vals.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
                sum.new_conns += v.new_conns;
            }
            out.insert(id, sum);
        }
        Ok(out)
    }

    fn event_stats(&self) -> Result<BTreeMap<u32, u64>> {
        let m = self.stats.lock().expect("lock");
        let mut out = BTreeMap::new();
        for i in 0..m.len() {
            out.insert(i, m.get(&i, 0)?.iter().sum());
        }
        Ok(out)
    }
}

/// Counts the entries of the kernel-written maps (CT by protocol and kind, AFFINITY,
/// SOCK_REV). Iterates keys only (one syscall per entry).
pub fn scan_ct(pin_dir: &Path) -> Result<CtCounts> {
    let mut c = CtCounts {
        scanned: true,
        ..Default::default()
    };
    let ct: HashMap<MapData, CtKey, CtEntry> = open_pinned(pin_dir, names::CT)?.try_into()?;
    let mut total = 0;
    for k in ct.keys() {
        let Ok(k) = k else { break };
        *c.by_proto.entry((k.proto, k.kind)).or_default() += 1;
        total += 1;
    }
    c.maps.insert(names::CT, total);
    let aff: HashMap<MapData, AffinityKey, AffinityValue> =
        open_pinned(pin_dir, names::AFFINITY)?.try_into()?;
    c.maps
        .insert(names::AFFINITY, aff.keys().flatten().count() as u64);
    let sr: HashMap<MapData, SockRevKey, SockRevValue> =
        open_pinned(pin_dir, names::SOCK_REV)?.try_into()?;
    c.maps
        .insert(names::SOCK_REV, sr.keys().flatten().count() as u64);
    Ok(c)
}
