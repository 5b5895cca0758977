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

        let mut addrs: Vec<IpAddr> = Vec::new();
        if let Some(n) = cluster.nodes.get(&self.settings.node_name) {
            addrs.extend(n.internal_ips.iter().chain(n.external_ips.iter()).copied());
        }
        for a in &addrs {
            img.node_addrs
                .insert(Addr::from_ip(*a), NodeAddrValue { flags: 0 });
        }
        let masq = |v4: bool| {
            addrs
                .iter()
                .find(|a| a.is_ipv4() == v4)
                .map(|a| Addr::from_ip(*a))
                .unwrap_or_default()
        };
        let cidr = |v4: bool| {
            self.settings
                .cluster_cidrs
                .iter()
                .find(|n| n.addr().is_ipv4() == v4)
                .map(|n| (Addr::from_ip(n.network()), n.prefix_len()))
                .unwrap_or((Addr::ZERO, 0))
        };
        let (cluster_v4, cluster_v4_plen) = cidr(true);
        let (cluster_v6, cluster_v6_plen) = cidr(false);
        img.config = Some(NodeConfig {
            masq_v4: masq(true),
            masq_v6: masq(false),
            cluster_v4,
            cluster_v6,
            cluster_v4_plen,
            cluster_v6_plen,
            pad: [0; 2],
            flags: self.settings.flags,
            snat_port_min: self.settings.snat_port_min,
            snat_port_max: self.settings.snat_port_max,
            maglev_table_size: self.settings.compile.maglev_table_size,
            generation,
        });

        img.policy = self.policy_image(cluster);

        // Free the ids of backends and frontends nothing refers to any more.
        self.ids.retain(&img);
        (img, errors)
    }
}
