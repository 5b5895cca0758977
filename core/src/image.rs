//! [`MapImage`]: the exact keys and values the maps should hold (or do hold, when read
//! back from a running datapath). Ordered maps so that dumps and diffs are stable.

use std::collections::BTreeMap;

use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
    lb::{AffinitySetKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRangeKey},
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
    pub affinity_sets: BTreeMap<AffinitySetKey, u32>,
    pub config: Option<NodeConfig>,
    /// The NetworkPolicy maps (compiled as a whole, see `policy::compile`).
    pub policy: crate::policy::PolicyImage,
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
        self.affinity_sets
            .extend(other.affinity_sets.iter().map(|(k, v)| (*k, *v)));
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
            (AFFINITY_SETS, self.affinity_sets.len()),
            (IPCACHE, self.policy.ipcache.len()),
            (ENDPOINTS, self.policy.endpoints.len()),
            (POLICY, self.policy.policy.len()),
            (POLICY_RULES, self.policy.rules.len()),
        ])
    }
}

fn proto_name(p: u8) -> String {
    match p {
        0 => "any".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => format!("proto{n}"),
    }
}

fn frontend_name(addr: &Addr, port_be: u16, proto: u8) -> String {
    let a = if *addr == Addr::V4_ANY {
        "<node v4>".to_string()
    } else if *addr == Addr::V6_ANY {
        "<node v6>".to_string()
    } else if addr.is_v4() {
        addr.to_string()
    } else {
        format!("[{addr}]")
    };
    format!("{a}:{}/{}", u16::from_be(port_be), proto_name(proto))
}

fn flag_names(flags: u32) -> String {
    use weir_common::lb::*;
    let names = [
        (SVC_F_EXTERNAL, "external"),
        (SVC_F_LOCAL, "local-policy"),
        (SVC_F_NODEPORT, "nodeport"),
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_MAGLEV, "maglev"),
        (SVC_F_HAS_ENDPOINTS, "has-endpoints"),
        (SVC_F_VIP_MARKER, "clusterip-marker"),
        (SVC_F_MASQ, "masquerade"),
        (SVC_F_SRC_RANGES, "source-ranges"),
        (SVC_F_LOADBALANCER, "loadbalancer"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

impl MapImage {
    fn backend_name(&self, id: u32) -> String {
        use weir_common::lb::{BE_F_LOCAL, BE_F_SERVING, BE_F_TERMINATING};
        let Some(b) = self.backends.get(&id) else {
            return "<missing>".into();
        };
        let mut s = frontend_name(&b.addr, b.port_be, b.proto);
        for (flag, set, name) in [
            (BE_F_LOCAL, true, " local"),
            (BE_F_SERVING, false, " not-serving"),
            (BE_F_TERMINATING, true, " terminating"),
        ] {
            if (b.flags & flag != 0) == set {
                s.push_str(name);
            }
        }
        s
    }

    /// A readable, deterministic dump of every entry, with ids resolved: used by golden
    /// tests (YAML in, this out) and by people reading the maps.
    pub fn dump(&self) -> String {
        use std::fmt::Write as _;
        use weir_common::lb::{SCOPE_CLUSTER, SVC_F_VIP_MARKER};
        let mut o = String::new();
        let _ = writeln!(o, "frontends:");
        for (k, v) in self
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_CLUSTER)
        {
            if v.flags & SVC_F_VIP_MARKER != 0 {
                let _ = writeln!(o, "  {} any other port: reject", k.addr);
                continue;
            }
            let _ = writeln!(
                o,
                "  {} rev_nat={} svc_port={} flags={}{}",
                frontend_name(&k.addr, k.port_be, k.proto),
                v.rev_nat_id,
                v.svc_port_id,
                flag_names(v.flags),
                if v.affinity_timeout_s != 0 {
                    format!(" affinity={}s", v.affinity_timeout_s)
                } else {
                    String::new()
                },
            );
            for (scope, n, name) in [(0u8, v.count, "cluster"), (1u8, v.local_count, "local")] {
                let members: Vec<String> = (1..=n)
                    .map(|slot| {
                        let sk = ServiceKey { scope, slot, ..*k };
                        match self.services.get(&sk) {
                            Some(s) => {
                                format!("{}={}", s.backend_id, self.backend_name(s.backend_id))
                            }
                            None => "<missing slot>".into(),
                        }
                    })
                    .collect();
                let _ = writeln!(o, "    {name}: [{}]", members.join(", "));
            }
        }
        // Slots beyond a master's count (must not exist) would show up here.
        for (k, _) in self.services.iter().filter(|(k, _)| k.slot != 0) {
            let m = ServiceKey {
                scope: 0,
                slot: 0,
                ..*k
            };
            let count = self
                .services
                .get(&m)
                .map(|v| if k.scope == 0 { v.count } else { v.local_count })
                .unwrap_or(0);
            if k.slot > count {
                let _ = writeln!(o, "  stray slot {:?}", k);
            }
        }
        if !self.source_ranges.is_empty() {
            let _ = writeln!(o, "source ranges:");
            for (plen, k) in self.source_ranges.keys() {
                let addr_plen = plen - 32 - if k.addr.is_v4() { 96 } else { 0 };
                let fe = self
                    .rev_nat
                    .get(&k.rev_nat_id)
                    .map(|r| frontend_name(&r.addr, r.port_be, r.proto))
                    .unwrap_or_default();
                let _ = writeln!(o, "  {fe} <- {}/{addr_plen}", k.addr);
            }
        }
        if !self.affinity_sets.is_empty() {
            let _ = writeln!(o, "affinity sets:");
            for k in self.affinity_sets.keys() {
                let _ = writeln!(
                    o,
                    "  svc_port={} {} {}",
                    k.svc_port_id,
                    if k.scope == 0 { "cluster" } else { "local" },
                    self.backend_name(k.backend_id)
                );
            }
        }
        if !self.maglev.is_empty() {
            let _ = writeln!(o, "maglev tables:");
            let mut per: BTreeMap<(u32, u8), BTreeMap<u32, usize>> = BTreeMap::new();
            for (k, id) in &self.maglev {
                *per.entry((k.rev_nat_id, k.scope))
                    .or_default()
                    .entry(*id)
                    .or_default() += 1;
            }
            for ((rev, scope), counts) in per {
                let fe = self
                    .rev_nat
                    .get(&rev)
                    .map(|r| frontend_name(&r.addr, r.port_be, r.proto))
                    .unwrap_or_default();
                let parts: Vec<String> = counts
                    .iter()
                    .map(|(id, n)| format!("{} x{n}", self.backend_name(*id)))
                    .collect();
                let _ = writeln!(
                    o,
                    "  {fe} {}: {}",
                    if scope == 0 { "cluster" } else { "local" },
                    parts.join(", ")
                );
            }
        }
        let _ = writeln!(o, "backends:");
        for id in self.backends.keys() {
            let _ = writeln!(o, "  {id} = {}", self.backend_name(*id));
        }
        let _ = writeln!(o, "rev_nat:");
        for (id, r) in &self.rev_nat {
            let _ = writeln!(o, "  {id} = {}", frontend_name(&r.addr, r.port_be, r.proto));
        }
        let addrs: Vec<String> = self.node_addrs.keys().map(|a| a.to_string()).collect();
        let _ = writeln!(o, "node addresses: [{}]", addrs.join(", "));
        if let Some(c) = &self.config {
            let _ = writeln!(
                o,
                "node config: masq v4={} v6={}; cluster cidr {}/{} {}/{}; service cidr {}/{} {}/{}; snat ports {}-{}; maglev table {}",
                c.masq_v4,
                c.masq_v6,
                c.cluster_v4,
                c.cluster_v4_plen,
                c.cluster_v6,
                c.cluster_v6_plen,
                c.service_v4,
                c.service_v4_plen,
                c.service_v6,
                c.service_v6_plen,
                c.snat_port_min,
                c.snat_port_max,
                c.maglev_table_size
            );
        }
        o
    }
}
