//! The whole pipeline for one node: cluster snapshot -> desired [`MapImage`].
//!
//! Work is split per Service (translate + compile depend only on one Service, its slices
//! and this node), and [`Pipeline`] caches each Service's compiled image keyed by its
//! inputs, so a sync after one EndpointSlice change recompiles one Service.
//!
//! NetworkPolicy is compiled as a whole per node (identities depend on every pod and
//! policy), and only when its inputs (pods, namespaces, policies, this node) changed. A
//! policy image that fails to compile is reported and the previous one kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
};

use crate::{
    compile::{CompileError, CompileOptions, IdAllocator, compile_frontends},
    image::MapImage,
    model::{Cluster, EndpointSlice, Namespace, NetworkPolicy, Node, ObjRef, Pod, Service},
    policy::{PolicyCompiler, PolicyError},
    services::{NodeContext, translate_service},
};

/// Node-level settings of the datapath that do not come from cluster objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub node_name: String,
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CFG_F_*` flags.
    pub flags: u32,
    /// The cluster's pod CIDRs (kube-proxy's --cluster-cidr), at most one per family.
    pub cluster_cidrs: Vec<ipnet::IpNet>,
    /// The service CIDRs (--service-cluster-ip-range), at most one per family.
    pub service_cidrs: Vec<ipnet::IpNet>,
    /// kube-proxy's --nodeport-addresses: empty means "primary" (the nftables default: the
    /// node's first InternalIP of each family); otherwise the node's addresses inside
    /// these CIDRs (Node addresses and `local_addrs`), loopback never.
    pub nodeport_cidrs: Vec<ipnet::IpNet>,
    /// Addresses configured on this node's interfaces (the agent reads them).
    pub local_addrs: Vec<IpAddr>,
    /// The node's host network namespace cookie (SO_NETNS_COOKIE of the agent's
    /// namespace): socket hooks recognise node-originated sockets by it.
    pub host_netns_cookie: u64,
    pub compile: CompileOptions,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            // Above the default ip_local_port_range (32768-60999) so masqueraded flows do
            // not collide with the node's own connections.
            snat_port_min: 61000,
            snat_port_max: 65535,
            flags: 0,
            cluster_cidrs: Vec::new(),
            service_cidrs: Vec::new(),
            nodeport_cidrs: Vec::new(),
            local_addrs: Vec::new(),
            host_netns_cookie: 0,
            compile: CompileOptions::default(),
        }
    }
}

/// A Service that could not be programmed; its previous state (if any) is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Service {service}: {error}")]
pub struct ServiceError {
    pub service: ObjRef,
    pub error: CompileError,
}

#[derive(Default)]
struct Cached {
    inputs: Option<(Service, Vec<EndpointSlice>, NodeContext, BTreeSet<IpAddr>)>,
    image: MapImage,
}

type PolicyInputs = (
    BTreeMap<ObjRef, Pod>,
    BTreeMap<String, Namespace>,
    BTreeMap<ObjRef, NetworkPolicy>,
    Option<Node>,
);

#[derive(Default)]
pub struct Pipeline {
    pub settings: NodeSettings,
    pub ids: IdAllocator,
    /// The NetworkPolicy compiler of this node (seed it from the pinned maps on restart).
    pub policy: PolicyCompiler,
    cache: BTreeMap<ObjRef, Cached>,
    policy_inputs: Option<PolicyInputs>,
    policy_errors: Vec<PolicyError>,
}

impl Pipeline {
    pub fn new(settings: NodeSettings) -> Self {
        Self {
            settings,
            ..Default::default()
        }
    }

    /// The node's primary address per family (kube-proxy's node IPs): its first
    /// InternalIP of each family, else its first ExternalIP. They are the NodePort
    /// addresses by default and the masquerade source.
    pub fn primaries(&self, cluster: &Cluster) -> Vec<IpAddr> {
        let Some(n) = cluster.nodes.get(&self.settings.node_name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for v4 in [true, false] {
            if let Some(a) = n
                .internal_ips
                .iter()
                .chain(n.external_ips.iter())
                .find(|a| a.is_ipv4() == v4)
            {
                out.push(*a);
            }
        }
        out
    }

    /// Errors of the last policy compilation (the previous policy image was kept).
    pub fn policy_errors(&self) -> &[PolicyError] {
        &self.policy_errors
    }

    /// The policy maps for `cluster` on this node: recompiled only when their inputs
    /// changed; on error the previous image is kept and the error remembered.
    fn policy_image(&mut self, cluster: &Cluster) -> crate::policy::PolicyImage {
        let inputs = (
            cluster.pods.clone(),
            cluster.namespaces.clone(),
            cluster.policies.clone(),
            cluster.nodes.get(&self.settings.node_name).cloned(),
        );
        if self.policy_inputs.as_ref() != Some(&inputs) {
            match self.policy.compile(cluster, &self.settings.node_name) {
                Ok(_) => {
                    self.policy_errors.clear();
                    self.policy_inputs = Some(inputs);
                }
                Err(e) => self.policy_errors = vec![e],
            }
        }
        self.policy.current().clone()
    }

    /// The desired image for `cluster`, and the Services that could not be compiled.
    pub fn desired(&mut self, cluster: &Cluster, generation: u64) -> (MapImage, Vec<ServiceError>) {
        // Compilation depends on the node's addresses (source-range rule): a change there
        // invalidates every cached Service image.
        let node_ips = self.primaries(cluster);
        if self.settings.compile.node_ips != node_ips {
            self.settings.compile.node_ips = node_ips;
            self.cache.clear();
        }
        let node = cluster
            .nodes
            .get(&self.settings.node_name)
            .map(NodeContext::from_node)
            .unwrap_or_else(|| NodeContext {
                name: self.settings.node_name.clone(),
                zone: None,
            });

        let mut by_service: BTreeMap<ObjRef, Vec<&EndpointSlice>> = BTreeMap::new();
        let mut local_ips: BTreeSet<IpAddr> = BTreeSet::new();
        for s in cluster.slices.values() {
            for e in &s.endpoints {
                if e.node_name.as_deref() == Some(node.name.as_str()) {
                    local_ips.extend(e.addresses.iter().copied());
                }
            }
            if let Some(svc) = &s.service {
                by_service
                    .entry(ObjRef::new(&s.id.namespace, svc))
                    .or_default()
                    .push(s);
            }
        }

        let mut img = MapImage::default();
        let mut errors = Vec::new();
        self.cache.retain(|k, _| cluster.services.contains_key(k));
        for (id, svc) in &cluster.services {
            let slices: Vec<&EndpointSlice> = by_service.get(id).cloned().unwrap_or_default();
            let locals: BTreeSet<IpAddr> = slices
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .flat_map(|e| e.addresses.iter())
                .filter(|a| local_ips.contains(a))
                .copied()
                .collect();
            let inputs = (
                svc.clone(),
                slices.iter().map(|s| (*s).clone()).collect::<Vec<_>>(),
                node.clone(),
                locals,
            );
            let entry = self.cache.entry(id.clone()).or_default();
            if entry.inputs.as_ref() != Some(&inputs) {
                let fes = translate_service(svc, &slices, &node);
                match compile_frontends(&fes, &mut self.ids, &inputs.3, &self.settings.compile) {
                    Ok(i) => {
                        entry.image = i;
                        entry.inputs = Some(inputs);
                    }
                    Err(error) => {
                        // Keep what was compiled before for this Service.
                        errors.push(ServiceError {
                            service: id.clone(),
                            error,
                        });
                    }
                }
            }
            img.merge(&entry.image);
        }

        let primaries = self.primaries(cluster);
        let node_addrs: Vec<IpAddr> = if self.settings.nodeport_cidrs.is_empty() {
            primaries.clone()
        } else {
            let mut v: Vec<IpAddr> = cluster
                .nodes
                .get(&self.settings.node_name)
                .map(|n| {
                    n.internal_ips
                        .iter()
                        .chain(n.external_ips.iter())
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            v.extend(self.settings.local_addrs.iter().copied());
            v.retain(|a| {
                !a.is_loopback() && self.settings.nodeport_cidrs.iter().any(|n| n.contains(a))
            });
            v
        };
        for a in &node_addrs {
            img.node_addrs
                .insert(Addr::from_ip(*a), NodeAddrValue { flags: 0 });
        }
        let masq = |v4: bool| {
            primaries
                .iter()
                .find(|a| a.is_ipv4() == v4)
                .map(|a| Addr::from_ip(*a))
                .unwrap_or_default()
        };
        let cidr = |nets: &[ipnet::IpNet], v4: bool| {
            nets.iter()
                .find(|n| n.addr().is_ipv4() == v4)
                .map(|n| (Addr::from_ip(n.network()), n.prefix_len()))
                .unwrap_or((Addr::ZERO, 0))
        };
        let (cluster_v4, cluster_v4_plen) = cidr(&self.settings.cluster_cidrs, true);
        let (cluster_v6, cluster_v6_plen) = cidr(&self.settings.cluster_cidrs, false);
        let (service_v4, service_v4_plen) = cidr(&self.settings.service_cidrs, true);
        let (service_v6, service_v6_plen) = cidr(&self.settings.service_cidrs, false);
        img.config = Some(NodeConfig {
            masq_v4: masq(true),
            masq_v6: masq(false),
            cluster_v4,
            cluster_v6,
            cluster_v4_plen,
            cluster_v6_plen,
            service_v4_plen,
            service_v6_plen,
            service_v4,
            service_v6,
            flags: self.settings.flags,
            snat_port_min: self.settings.snat_port_min,
            snat_port_max: self.settings.snat_port_max,
            maglev_table_size: self.settings.compile.maglev_table_size,
            generation,
            host_netns_cookie: self.settings.host_netns_cookie,
        });

        img.policy = self.policy_image(cluster);

        // Free the ids of backends and frontends nothing refers to any more.
        self.ids.retain(&img);
        (img, errors)
    }
}
