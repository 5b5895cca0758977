//! [`MapImage`]: the exact keys and values the maps should hold (or do hold, when read
//! back from a running datapath). Ordered maps so that dumps and diffs are stable.

use std::collections::BTreeMap;

use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
    lb::{Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRangeKey},
};

/// An LPM key as (prefix length in bits, key data).
pub type Lpm<K> = (u32, K);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapImage {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub rev_nat: BTreeMap<u32, RevNat>,
    pub node_addrs: BTreeMap<Addr, NodeAddrValue>,
    pub source_ranges: BTreeMap<Lpm<SourceRangeKey>, u32>,
    pub maglev: BTreeMap<MaglevKey, u32>,
    pub config: Option<NodeConfig>,
}

impl MapImage {
    /// Adds every entry of `other` (entries of `other` win on equal keys).
    pub fn merge(&mut self, other: &MapImage) {
        self.services
            .extend(other.services.iter().map(|(k, v)| (*k, *v)));
        self.backends
            .extend(other.backends.iter().map(|(k, v)| (*k, *v)));
        self.rev_nat
            .extend(other.rev_nat.iter().map(|(k, v)| (*k, *v)));
        self.node_addrs
            .extend(other.node_addrs.iter().map(|(k, v)| (*k, *v)));
        self.source_ranges
            .extend(other.source_ranges.iter().map(|(k, v)| (*k, *v)));
        self.maglev
            .extend(other.maglev.iter().map(|(k, v)| (*k, *v)));
        if other.config.is_some() {
            self.config = other.config;
        }
    }

    /// Entry counts per map, for capacity checks and metrics.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        use weir_common::maps::*;
        BTreeMap::from([
            (SERVICES, self.services.len()),
            (BACKENDS, self.backends.len()),
            (REV_NAT, self.rev_nat.len()),
            (NODE_ADDRS, self.node_addrs.len()),
            (SOURCE_RANGES, self.source_ranges.len()),
            (MAGLEV, self.maglev.len()),
        ])
    }
}
