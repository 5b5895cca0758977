//! Services and EndpointSlices -> frontends and backend sets, by kube-proxy's rules.
//!
//! Upstream sources this implements (kubernetes/kubernetes):
//! - pkg/proxy/endpointslicecache.go: condition defaults (ready/serving true when unset,
//!   terminating false), slice ports matched to service ports by (name, protocol), only
//!   the first address of an endpoint used, endpoints of the other IP family ignored,
//!   duplicates across slices merged by "ip:port" (a local copy wins).
//! - pkg/proxy/serviceport.go: which frontends exist, `UsesClusterEndpoints` /
//!   `UsesLocalEndpoints`, LB ingress IPs only in VIP mode, per-family filtering.
//! - pkg/proxy/topology.go: `CategorizeEndpoints` (Ready first, else
//!   Serving-and-Terminating, separately for the cluster and local sets; topology hints
//!   only when every ready endpoint has one and one matches this node/zone).
//!
//! Translation is per Service: `translate_service` depends only on that Service, its
//! slices and this node, so the sync loop can redo only what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::Serialize;

use crate::model::*;

/// The node the pipeline programs, as translation needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    /// topology.kubernetes.io/zone of the node, if labelled.
    pub zone: Option<String>,
}

/// Label of a node's zone (k8s.io/api/core/v1 LabelTopologyZone).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Annotation selecting Maglev backend selection for one Service.
pub const ANNOTATION_LB_ALGORITHM: &str = "weir.dev/lb-algorithm";

impl NodeContext {
    pub fn from_node(node: &Node) -> NodeContext {
        NodeContext {
            name: node.name.clone(),
            zone: node.labels.get(LABEL_ZONE).cloned(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl FrontendKind {
    pub fn is_external(self) -> bool {
        !matches!(self, FrontendKind::ClusterIP)
    }
}

/// Where a frontend listens. NodePorts listen on every node address of their family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendAddr {
    Ip(IpAddr),
    AnyNodeV4,
    AnyNodeV6,
}

/// One endpoint address and port as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointInfo {
    pub backend: BackendAddr,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub local: bool,
    pub zone_hints: Option<BTreeSet<String>>,
    pub node_hints: Option<BTreeSet<String>>,
}

impl EndpointInfo {
    fn has_zone_hint(&self, zone: &str) -> bool {
        self.zone_hints.as_ref().is_some_and(|z| z.contains(zone))
    }
    fn has_node_hint(&self, node: &str) -> bool {
        self.node_hints.as_ref().is_some_and(|n| n.contains(node))
    }
}

/// A frontend and the backend sets it may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frontend {
    pub service: ObjRef,
    pub port_name: String,
    pub kind: FrontendKind,
    pub addr: FrontendAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The traffic policy for this frontend's kind is Local (iTP for ClusterIP, eTP for
    /// the external kinds): use `local`, except for short-circuited traffic.
    pub policy_local: bool,
    /// Upstream `clusterEndpoints`, sorted.
    pub cluster: Vec<BackendAddr>,
    /// Upstream `localEndpoints`, sorted.
    pub local: Vec<BackendAddr>,
    /// Upstream `hasAnyEndpoints`: an empty usable set means drop, not reject.
    pub has_endpoints: bool,
    /// Every endpoint of this port and family, usable or not, with its serving and
    /// terminating conditions: existing connections to them are kept (see BE_F_SERVING).
    pub known: Vec<(BackendAddr, bool, bool)>,
    pub affinity_timeout_s: Option<u32>,
    pub maglev: bool,
    /// Masquerade external traffic (external kinds under eTP=Cluster).
    pub masquerade: bool,
    /// loadBalancerSourceRanges of this family (LoadBalancer frontends only).
    pub source_ranges: Vec<ipnet::IpNet>,
}

/// Default sessionAffinityConfig.clientIP.timeoutSeconds (core/v1 DefaultClientIPServiceAffinitySeconds).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10800;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// Whether the service is proxied at all: ExternalName and headless Services are not.
pub fn is_proxied(svc: &Service) -> bool {
    svc.type_ != ServiceType::ExternalName && !svc.headless && !svc.cluster_ips.is_empty()
}

/// apiservice.ExternallyAccessible (pkg/api/v1/service/util.go): LoadBalancer and
/// NodePort Services, and ClusterIP Services with externalIPs.
fn externally_accessible_type(svc: &Service) -> bool {
    matches!(svc.type_, ServiceType::LoadBalancer | ServiceType::NodePort)
        || (svc.type_ == ServiceType::ClusterIP && !svc.external_ips.is_empty())
}

/// The per-port endpoint list, merged across slices as the EndpointSliceCache does.
pub fn endpoints_for_port(
    port: &ServicePort,
    family: Family,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Vec<EndpointInfo> {
    let mut set: BTreeMap<(IpAddr, u16), EndpointInfo> = BTreeMap::new();
    for slice in slices {
        let slice_family = match slice.address_type {
            AddressType::IPv4 => Family::V4,
            AddressType::IPv6 => Family::V6,
            AddressType::FQDN => continue,
        };
        if slice_family != family {
            continue;
        }
        for sp in &slice.ports {
            if sp.name != port.name || sp.protocol != port.protocol || sp.port == 0 {
                continue;
            }
            for ep in &slice.endpoints {
                let Some(addr) = ep.addresses.first() else {
                    continue;
                };
                if Family::of(addr) != family {
                    continue;
                }
                let local = ep
                    .node_name
                    .as_deref()
                    .is_some_and(|n| !node.name.is_empty() && n == node.name);
                let ready = ep.ready.unwrap_or(true);
                let info = EndpointInfo {
                    backend: BackendAddr {
                        addr: *addr,
                        port: sp.port,
                        protocol: port.protocol,
                    },
                    node_name: ep.node_name.clone(),
                    zone: ep.zone.clone(),
                    ready,
                    serving: ep.serving.unwrap_or(true),
                    terminating: ep.terminating.unwrap_or(false),
                    local,
                    zone_hints: ep
                        .hint_zones
                        .as_ref()
                        .filter(|z| !z.is_empty())
                        .map(|z| z.iter().cloned().collect()),
                    node_hints: ep
                        .hint_nodes
                        .as_ref()
                        .filter(|n| !n.is_empty())
                        .map(|n| n.iter().cloned().collect()),
                };
                let key = (*addr, sp.port);
                if !set.contains_key(&key) || local {
                    set.insert(key, info);
                }
            }
        }
    }
    set.into_values().collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameZone,
    PreferSameNode,
}

/// topologyModeFromHints (pkg/proxy/topology.go), with PreferSameTrafficDistribution on.
fn topology_mode(endpoints: &[EndpointInfo], node: &NodeContext) -> TopologyMode {
    let zone = node.zone.as_deref().unwrap_or("");
    let mut has_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.iter().filter(|e| e.ready) {
        has_ready = true;
        match &ep.node_hints {
            None => all_node_hints = false,
            Some(_) if ep.has_node_hint(&node.name) => for_node = true,
            Some(_) => {}
        }
        match &ep.zone_hints {
            None => all_zone_hints = false,
            Some(_) if ep.has_zone_hint(zone) => for_zone = true,
            Some(_) => {}
        }
    }
    if !has_ready {
        return TopologyMode::None;
    }
    if all_node_hints && for_node {
        return TopologyMode::PreferSameNode;
    }
    if all_zone_hints && for_zone {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

fn available_for_topology(ep: &EndpointInfo, mode: TopologyMode, node: &NodeContext) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => ep.has_node_hint(&node.name),
        TopologyMode::PreferSameZone => ep.has_zone_hint(node.zone.as_deref().unwrap_or("")),
    }
}

/// The result of `CategorizeEndpoints`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    pub cluster: Vec<BackendAddr>,
    pub local: Vec<BackendAddr>,
    pub has_any: bool,
}

/// CategorizeEndpoints (pkg/proxy/topology.go).
pub fn categorize(
    endpoints: &[EndpointInfo],
    uses_cluster: bool,
    uses_local: bool,
    node: &NodeContext,
) -> Categorized {
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    let pick = |f: &dyn Fn(&EndpointInfo) -> bool| -> Vec<BackendAddr> {
        let mut v: Vec<BackendAddr> = endpoints
            .iter()
            .filter(|e| f(e))
            .map(|e| e.backend.clone())
            .collect();
        v.sort();
        v
    };
    if uses_cluster {
        let mode = topology_mode(endpoints, node);
        out.cluster = pick(&|e| e.ready && available_for_topology(e, mode, node));
        if out.cluster.is_empty() {
            out.cluster = pick(&|e| e.serving && e.terminating);
        }
        if !out.cluster.is_empty() {
            out.has_any = true;
        }
    }
    if !uses_local {
        return out;
    }
    let (mut local_ready, mut local_st) = (false, false);
    for e in endpoints {
        if e.ready {
            out.has_any = true;
            local_ready |= e.local;
        } else if e.serving && e.terminating {
            out.has_any = true;
            local_st |= e.local;
        }
    }
    if local_ready {
        out.local = pick(&|e| e.local && e.ready);
    } else if local_st {
        out.local = pick(&|e| e.local && e.serving && e.terminating);
    }
    out
}

/// All frontends of one Service on this node. `slices` are the Service's EndpointSlices.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Vec<Frontend> {
    let mut out = Vec::new();
    if !is_proxied(svc) {
        return out;
    }
    let ext_type = externally_accessible_type(svc);
    let itp_local = svc.internal_traffic_policy == TrafficPolicy::Local;
    let maglev = svc
        .annotations
        .get(ANNOTATION_LB_ALGORITHM)
        .is_some_and(|v| v.eq_ignore_ascii_case("maglev"));

    // One pass per IP family the Service has a ClusterIP in (dual-stack Services get both).
    let mut families: Vec<(Family, IpAddr)> = Vec::new();
    for ip in &svc.cluster_ips {
        let f = Family::of(ip);
        if !families.iter().any(|(g, _)| *g == f) {
            families.push((f, *ip));
        }
    }

    for (family, cluster_ip) in families {
        let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            let mut v: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| Family::of(ip) == family)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let external_ips = of_family(&svc.external_ips);
        let lb_vips: Vec<IpAddr> = if svc.type_ == ServiceType::LoadBalancer {
            of_family(
                &svc.lb_ingress
                    .iter()
                    .filter(|i| i.ip_mode == LbIpMode::VIP)
                    .map(|i| i.ip)
                    .collect::<Vec<_>>(),
            )
        } else {
            Vec::new()
        };
        let source_ranges: Vec<ipnet::IpNet> = svc
            .lb_source_ranges
            .iter()
            .copied()
            .filter(|n| Family::of(&n.addr()) == family)
            .collect();

        for port in &svc.ports {
            let node_port =
                if matches!(svc.type_, ServiceType::NodePort | ServiceType::LoadBalancer) {
                    port.node_port
                } else {
                    0
                };
            // serviceport.go: ExternallyAccessible per port and family.
            let accessible = node_port != 0 || !lb_vips.is_empty() || !external_ips.is_empty();
            let etp_local = ext_type && svc.external_traffic_policy == TrafficPolicy::Local;
            let uses_cluster = !itp_local || accessible;
            let uses_local = itp_local || (etp_local && accessible);
            let eps = endpoints_for_port(port, family, slices, node);
            let cat = categorize(&eps, uses_cluster, uses_local, node);
            let known: Vec<(BackendAddr, bool, bool)> = eps
                .iter()
                .map(|e| (e.backend.clone(), e.serving, e.terminating))
                .collect();

            let mk = |kind: FrontendKind, addr: FrontendAddr, fport: u16| {
                let policy_local = if kind.is_external() {
                    etp_local
                } else {
                    itp_local
                };
                Frontend {
                    service: svc.id.clone(),
                    port_name: port.name.clone(),
                    kind,
                    addr,
                    port: fport,
                    protocol: port.protocol,
                    policy_local,
                    cluster: cat.cluster.clone(),
                    local: cat.local.clone(),
                    has_endpoints: cat.has_any,
                    known: known.clone(),
                    affinity_timeout_s: svc.session_affinity_timeout_s,
                    maglev,
                    masquerade: kind.is_external() && !etp_local,
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                }
            };
            out.push(mk(
                FrontendKind::ClusterIP,
                FrontendAddr::Ip(cluster_ip),
                port.port,
            ));
            for ip in &external_ips {
                out.push(mk(
                    FrontendKind::ExternalIP,
                    FrontendAddr::Ip(*ip),
                    port.port,
                ));
            }
            for ip in &lb_vips {
                out.push(mk(
                    FrontendKind::LoadBalancer,
                    FrontendAddr::Ip(*ip),
                    port.port,
                ));
            }
            if node_port != 0 {
                let any = match family {
                    Family::V4 => FrontendAddr::AnyNodeV4,
                    Family::V6 => FrontendAddr::AnyNodeV6,
                };
                out.push(mk(FrontendKind::NodePort, any, node_port));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(
        addr: &str,
        node: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        term: Option<bool>,
    ) -> Endpoint {
        Endpoint {
            addresses: vec![ip(addr)],
            ready,
            serving,
            terminating: term,
            node_name: Some(node.into()),
            ..Default::default()
        }
    }

    fn svc(name: &str) -> Service {
        Service {
            id: ObjRef::new("default", name),
            cluster_ips: vec![ip("10.96.0.10")],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::TCP,
                port: 80,
                node_port: 0,
            }],
            ..Default::default()
        }
    }

    fn slice(name: &str, eps: Vec<Endpoint>) -> EndpointSlice {
        EndpointSlice {
            id: ObjRef::new("default", format!("{name}-abc")),
            trigger_time_unix_ns: None,
            service: Some(name.into()),
            address_type: AddressType::IPv4,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::TCP,
                port: 8080,
            }],
            endpoints: eps,
        }
    }

    fn node(name: &str) -> NodeContext {
        NodeContext {
            name: name.into(),
            zone: None,
        }
    }

    fn addrs(v: &[BackendAddr]) -> Vec<String> {
        v.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect()
    }

    #[test]
    fn unset_conditions_mean_ready_serving_not_terminating() {
        let s = svc("web");
        let sl = slice("web", vec![ep("10.0.1.5", "n1", None, None, None)]);
        let fes = translate_service(&s, &[&sl], &node("n1"));
        assert_eq!(fes.len(), 1);
        assert_eq!(addrs(&fes[0].cluster), vec!["10.0.1.5:8080"]);
        assert!(fes[0].has_endpoints);
    }

    #[test]
    fn ready_first_then_serving_terminating() {
        let s = svc("web");
        let sl = slice(
            "web",
            vec![
                ep("10.0.1.5", "n1", Some(false), Some(true), Some(true)),
                ep("10.0.1.6", "n1", Some(true), None, None),
            ],
        );
        let fe = &translate_service(&s, &[&sl], &node("n1"))[0];
        assert_eq!(addrs(&fe.cluster), vec!["10.0.1.6:8080"]);
        // Once no ready endpoint is left, serving+terminating ones are used.
        let sl = slice(
            "web",
            vec![
                ep("10.0.1.5", "n1", Some(false), Some(true), Some(true)),
                ep("10.0.1.6", "n1", Some(false), Some(false), Some(true)),
                ep("10.0.1.7", "n1", Some(false), Some(true), Some(false)),
            ],
        );
        let fe = &translate_service(&s, &[&sl], &node("n1"))[0];
        assert_eq!(addrs(&fe.cluster), vec!["10.0.1.5:8080"]);
        assert!(fe.has_endpoints);
    }

    #[test]
    fn no_usable_endpoints_means_reject() {
        let s = svc("web");
        let sl = slice(
            "web",
            vec![ep("10.0.1.5", "n1", Some(false), Some(false), Some(false))],
        );
        let fe = &translate_service(&s, &[&sl], &node("n1"))[0];
        assert!(fe.cluster.is_empty());
        assert!(!fe.has_endpoints);
    }

    #[test]
    fn headless_and_external_name_are_not_proxied() {
        let mut s = svc("web");
        s.headless = true;
        assert!(translate_service(&s, &[], &node("n1")).is_empty());
        let mut s = svc("web");
        s.type_ = ServiceType::ExternalName;
        assert!(translate_service(&s, &[], &node("n1")).is_empty());
    }
}
