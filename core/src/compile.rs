//! Desired state -> [`MapImage`], with stable ids.
//!
//! Ids must not move while traffic flows: conntrack entries name a backend by id and the
//! affinity map names a frontend by its rev-NAT id. [`IdAllocator`] hands out the same
//! id to the same backend (address, port, protocol) and frontend for as long as they
//! exist, and is seeded from the pinned maps when the agent restarts.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use weir_common::{Addr, lb::*};

use crate::{
    image::MapImage,
    model::Protocol,
    services::{BackendAddr, Frontend, FrontendAddr},
};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{what} id space exhausted")]
    IdsExhausted { what: &'static str },
    #[error("frontend {frontend} has {count} backends; at most {max} fit in one frontend")]
    TooManyBackends {
        frontend: String,
        count: usize,
        max: usize,
    },
}

/// Identity of a frontend for rev-NAT id allocation.
pub type FrontendId = (FrontendAddr, u16, Protocol);

#[derive(Debug, Clone)]
struct Ids<K: Ord> {
    by_key: BTreeMap<K, u32>,
    /// The reverse index, so that the incremental pipeline can release an id once its
    /// map entry is gone without scanning every key.
    by_id: BTreeMap<u32, K>,
    next: u32,
}

impl<K: Ord> Default for Ids<K> {
    fn default() -> Self {
        Self {
            by_key: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next: 1,
        }
    }
}

impl<K: Ord + Clone> Ids<K> {
    fn get_or_alloc(&mut self, k: &K, what: &'static str) -> Result<u32, CompileError> {
        if let Some(id) = self.by_key.get(k) {
            return Ok(*id);
        }
        // Ids start at 1 (0 means "none" in the ABI). Search upward from a moving hint,
        // wrapping once, so freed ids are reused without a scan from 1 every time.
        let start = self.next.max(1);
        let mut id = start;
        loop {
            if !self.by_id.contains_key(&id) {
                break;
            }
            id = if id == u32::MAX { 1 } else { id + 1 };
            if id == start {
                return Err(CompileError::IdsExhausted { what });
            }
        }
        self.by_id.insert(id, k.clone());
        self.by_key.insert(k.clone(), id);
        self.next = id.wrapping_add(1);
        Ok(id)
    }

    fn release(&mut self, k: &K) {
        if let Some(id) = self.by_key.remove(k) {
            self.by_id.remove(&id);
        }
    }

    fn release_id(&mut self, id: u32) {
        if let Some(k) = self.by_id.remove(&id) {
            self.by_key.remove(&k);
        }
    }

    fn seed(&mut self, k: K, id: u32) {
        self.by_id.insert(id, k.clone());
        self.by_key.insert(k, id);
        self.next = self.next.max(id.wrapping_add(1));
    }

    fn retain_ids(&mut self, keep: impl Fn(u32) -> bool) {
        let gone: Vec<u32> = self.by_id.keys().copied().filter(|id| !keep(*id)).collect();
        for id in gone {
            self.release_id(id);
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct IdAllocator {
    backends: Ids<BackendAddr>,
    frontends: Ids<FrontendId>,
}

impl IdAllocator {
    /// Seeds the allocator from what the maps already hold (agent restart).
    pub fn seed_from(&mut self, img: &MapImage) {
        for (id, be) in &img.backends {
            if let Some(p) = Protocol::from_number(be.proto) {
                self.backends.seed(
                    BackendAddr {
                        addr: be.addr.to_ip(),
                        port: u16::from_be(be.port_be),
                        protocol: p,
                    },
                    *id,
                );
            }
        }
        for (id, rn) in &img.rev_nat {
            if let Some(p) = Protocol::from_number(rn.proto) {
                self.frontends.seed(
                    (frontend_addr_of(&rn.addr), u16::from_be(rn.port_be), p),
                    *id,
                );
            }
        }
    }

    pub fn backend_id(&mut self, b: &BackendAddr) -> Result<u32, CompileError> {
        self.backends.get_or_alloc(b, "backend")
    }

    pub fn frontend_id(&mut self, f: &FrontendId) -> Result<u32, CompileError> {
        self.frontends.get_or_alloc(f, "frontend")
    }

    pub fn release_backend(&mut self, b: &BackendAddr) {
        self.backends.release(b)
    }

    pub fn release_frontend(&mut self, f: &FrontendId) {
        self.frontends.release(f)
    }

    /// Releases a backend id (its BACKENDS entry is gone).
    pub fn release_backend_id(&mut self, id: u32) {
        self.backends.release_id(id)
    }

    /// Releases a frontend (rev-NAT) id (its REV_NAT entry is gone).
    pub fn release_frontend_id(&mut self, id: u32) {
        self.frontends.release_id(id)
    }

    /// Releases every id that `img` does not use.
    pub fn retain(&mut self, img: &MapImage) {
        self.retain_where(
            |id| img.backends.contains_key(&id),
            |id| img.rev_nat.contains_key(&id),
        );
    }

    /// Releases every backend id for which `backend` and every frontend id for which
    /// `frontend` says false.
    pub fn retain_where(&mut self, backend: impl Fn(u32) -> bool, frontend: impl Fn(u32) -> bool) {
        self.backends.retain_ids(backend);
        self.frontends.retain_ids(frontend);
    }

    /// Number of allocated (backend, frontend) ids.
    pub fn allocated(&self) -> (usize, usize) {
        (self.backends.by_id.len(), self.frontends.by_id.len())
    }

    pub fn known_backend(&self, b: &BackendAddr) -> Option<u32> {
        self.backends.by_key.get(b).copied()
    }
}

/// The map address of a frontend.
pub fn frontend_map_addr(a: &FrontendAddr) -> Addr {
    match a {
        FrontendAddr::Ip(ip) => Addr::from_ip(*ip),
        FrontendAddr::AnyNodeV4 => Addr::V4_ANY,
        FrontendAddr::AnyNodeV6 => Addr::V6_ANY,
    }
}

fn frontend_addr_of(a: &Addr) -> FrontendAddr {
    if *a == Addr::V4_ANY {
        FrontendAddr::AnyNodeV4
    } else if *a == Addr::V6_ANY {
        FrontendAddr::AnyNodeV6
    } else {
        FrontendAddr::Ip(a.to_ip())
    }
}

pub fn backend_value(b: &BackendAddr, local: bool, serving: bool, terminating: bool) -> Backend {
    let mut flags = 0;
    if local {
        flags |= BE_F_LOCAL;
    }
    if serving {
        flags |= BE_F_SERVING;
    }
    if terminating {
        flags |= BE_F_TERMINATING;
    }
    Backend {
        addr: Addr::from_ip(b.addr),
        port_be: b.port.to_be(),
        proto: b.protocol.number(),
        flags,
        pad: 0,
    }
}

/// Slots are numbered 1..=u16::MAX in the ABI.
const MAX_SLOTS: usize = u16::MAX as usize;

/// Options of compilation that come from the node's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileOptions {
    /// Entries of each Maglev table (prime).
    pub maglev_table_size: u32,
    /// Use Maglev for every frontend, not only annotated Services.
    pub maglev_all: bool,
    /// This node's primary addresses (one per family), for the source-range rule above.
    pub node_ips: Vec<IpAddr>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        Self {
            maglev_table_size: weir_common::maps::DEFAULT_MAGLEV_TABLE_SIZE,
            maglev_all: false,
            node_ips: Vec::new(),
        }
    }
}

/// Compiles one Service's frontends into its part of the map image. `local_backends`
/// are the addresses of this node's pods (to mark local backends).
pub fn compile_frontends(
    frontends: &[Frontend],
    ids: &mut IdAllocator,
    local_backends: &BTreeSet<IpAddr>,
    opts: &CompileOptions,
) -> Result<MapImage, CompileError> {
    let mut img = MapImage::default();
    let mut cluster_ips: BTreeSet<Addr> = BTreeSet::new();
    // Every frontend of one Service port shares the rev-NAT id of that port's first
    // ClusterIP frontend as its Service-port id (session affinity is per Service port).
    let mut svc_port_ids: BTreeMap<(&str, Protocol), u32> = BTreeMap::new();
    for fe in frontends {
        if fe.kind == crate::services::FrontendKind::ClusterIP {
            let id = ids.frontend_id(&(fe.addr, fe.port, fe.protocol))?;
            svc_port_ids
                .entry((fe.port_name.as_str(), fe.protocol))
                .or_insert(id);
        }
    }
    for fe in frontends {
        for (set, n) in [(&fe.cluster, fe.cluster.len()), (&fe.local, fe.local.len())] {
            if n > MAX_SLOTS {
                return Err(CompileError::TooManyBackends {
                    frontend: format!("{:?}:{}/{}", fe.addr, fe.port, fe.protocol),
                    count: set.len(),
                    max: MAX_SLOTS,
                });
            }
        }
        let addr = frontend_map_addr(&fe.addr);
        let proto = fe.protocol.number();
        let port_be = fe.port.to_be();
        let rev_nat_id = ids.frontend_id(&(fe.addr, fe.port, fe.protocol))?;
        let svc_port_id = svc_port_ids
            .get(&(fe.port_name.as_str(), fe.protocol))
            .copied()
            .unwrap_or(rev_nat_id);
        if fe.affinity_timeout_s.is_some() {
            for (scope, set) in [(SCOPE_CLUSTER, &fe.cluster), (SCOPE_LOCAL, &fe.local)] {
                for b in set {
                    let backend_id = ids.backend_id(b)?;
                    img.affinity_sets.insert(
                        AffinitySetKey {
                            svc_port_id,
                            backend_id,
                            scope,
                            pad: [0; 3],
                        },
                        1,
                    );
                }
            }
        }
        img.rev_nat.insert(
            rev_nat_id,
            RevNat {
                addr,
                port_be,
                proto,
                pad: [0; 5],
            },
        );
        let key = |scope: u8, slot: u16| ServiceKey {
            addr,
            port_be,
            proto,
            scope,
            slot,
            pad: [0; 2],
        };
        // Every known endpoint has a backend entry (usable or not): connections to it
        // survive until it leaves the slices (TCP) or stops serving (UDP).
        for (b, serving, terminating) in &fe.known {
            let id = ids.backend_id(b)?;
            img.backends.insert(
                id,
                backend_value(b, local_backends.contains(&b.addr), *serving, *terminating),
            );
        }
        for (scope, set) in [(SCOPE_CLUSTER, &fe.cluster), (SCOPE_LOCAL, &fe.local)] {
            for (i, b) in set.iter().enumerate() {
                let id = ids.backend_id(b)?;
                img.services.insert(
                    key(scope, (i + 1) as u16),
                    ServiceValue {
                        backend_id: id,
                        ..Default::default()
                    },
                );
            }
        }
        let maglev = fe.maglev || opts.maglev_all;
        if maglev {
            for (scope, set) in [(SCOPE_CLUSTER, &fe.cluster), (SCOPE_LOCAL, &fe.local)] {
                let names: Vec<String> = set
                    .iter()
                    .map(|b| format!("{}:{}", b.addr, b.port))
                    .collect();
                for (index, i) in crate::maglev::table(&names, opts.maglev_table_size)
                    .into_iter()
                    .enumerate()
                {
                    let id = ids.backend_id(&set[i as usize])?;
                    img.maglev.insert(
                        MaglevKey {
                            rev_nat_id,
                            scope,
                            pad: [0; 3],
                            index: index as u32,
                        },
                        id,
                    );
                }
            }
        }
        // serviceport.go / proxier: if a range covers this node's primary IP, the LB VIP
        // itself is an allowed source too (a node reaching a VIP assigned to itself
        // arrives with the VIP as source).
        let mut ranges = fe.source_ranges.clone();
        if let FrontendAddr::Ip(vip) = fe.addr
            && fe
                .source_ranges
                .iter()
                .any(|n| opts.node_ips.iter().any(|ip| n.contains(ip)))
        {
            ranges.push(ipnet::IpNet::from(vip));
        }
        for net in &ranges {
            let (a, plen) = match net {
                ipnet::IpNet::V4(n) => (IpAddr::V4(n.network()), 96 + n.prefix_len() as u32),
                ipnet::IpNet::V6(n) => (IpAddr::V6(n.network()), n.prefix_len() as u32),
            };
            img.source_ranges.insert(
                (
                    32 + plen,
                    SourceRangeKey {
                        rev_nat_id,
                        addr: Addr::from_ip(a),
                    },
                ),
                0,
            );
        }
        let mut flags = 0;
        if fe.kind.is_external() {
            flags |= SVC_F_EXTERNAL;
        }
        if fe.kind == crate::services::FrontendKind::NodePort {
            flags |= SVC_F_NODEPORT;
        }
        if fe.kind == crate::services::FrontendKind::LoadBalancer {
            flags |= SVC_F_LOADBALANCER;
        }
        if fe.policy_local {
            flags |= SVC_F_LOCAL;
        }
        if fe.affinity_timeout_s.is_some() {
            flags |= SVC_F_AFFINITY;
        }
        if maglev {
            flags |= SVC_F_MAGLEV;
        }
        if fe.has_endpoints {
            flags |= SVC_F_HAS_ENDPOINTS;
        }
        if fe.masquerade {
            flags |= SVC_F_MASQ;
        }
        if !fe.source_ranges.is_empty() {
            flags |= SVC_F_SRC_RANGES;
        }
        img.services.insert(
            key(SCOPE_CLUSTER, 0),
            ServiceValue {
                backend_id: 0,
                count: fe.cluster.len() as u16,
                local_count: fe.local.len() as u16,
                rev_nat_id,
                flags,
                affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
                svc_port_id,
            },
        );
        if fe.kind == crate::services::FrontendKind::ClusterIP {
            cluster_ips.insert(addr);
        }
    }
    // The address-wide marker of each ClusterIP: a port the Service lacks is rejected.
    for addr in cluster_ips {
        img.services.insert(
            ServiceKey {
                addr,
                port_be: 0,
                proto: 0,
                scope: SCOPE_CLUSTER,
                slot: 0,
                pad: [0; 2],
            },
            ServiceValue {
                flags: SVC_F_VIP_MARKER,
                ..Default::default()
            },
        );
    }
    Ok(img)
}
