//! The lab's input and how it is filled in, as a cluster would fill it in (pure: no
//! privileges, no I/O except [`load_paths`]).
//!
//! - [`Input`]: the objects the user declared (Nodes, Namespaces, Pods, Services,
//!   EndpointSlices, NetworkPolicies), keyed `namespace/name`, replaced whole by `apply`.
//! - [`LabConfig`]: cluster pod/service CIDRs and pools (flags or a `kind: LabConfig`
//!   document), fixed at `up`.
//! - [`resolve`]: input + the previous resolution -> [`Resolved`]: every object filled in
//!   (node addresses and pod CIDRs, pod IPs, clusterIPs, nodePorts, load balancer IPs,
//!   readiness) plus the EndpointSlices the EndpointSlice controller would write.
//!   Earlier allocations are kept (a re-applied Pod keeps its IP, a Service its
//!   clusterIP and nodePorts) and given values are honoured exactly.
//!
//! Upstream behaviour reproduced here (kubernetes/kubernetes):
//! - EndpointSlice derivation: `staging/src/k8s.io/endpointslice/utils.go`
//!   (`podToEndpoint`, `getEndpointPorts`, `getAddressTypesForService`) and
//!   `pkg/api/v1/pod/util.go#FindPort`, `endpointslice/util#ShouldPodBeInEndpoints`:
//!   serving = pod Ready, terminating = deletionTimestamp set, ready = serving and not
//!   terminating (or publishNotReadyAddresses); named targetPorts resolve per pod against
//!   container ports of the same name and protocol (a pod without it is left out of that
//!   port); one slice per address family of the Service.
//! - The API server's defaults: Service type ClusterIP, port protocol TCP, targetPort =
//!   port, clusterIP allocated from the service CIDR of each family the Service's
//!   ipFamilyPolicy asks for, nodePorts for NodePort and LoadBalancer Services (unless
//!   allocateLoadBalancerNodePorts is false), healthCheckNodePort for LoadBalancer with
//!   externalTrafficPolicy Local, the `kubernetes.io/metadata.name` namespace label.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::{Deserialize, Serialize};

use crate::source::yaml::{self, Object};

/// discovery.k8s.io/v1 LabelServiceName.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// discovery.k8s.io/v1 LabelManagedBy, and the value the EndpointSlice controller uses.
pub const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// Marks EndpointSlices the lab derived (so that they are re-derived, never kept).
pub const ANNOTATION_DERIVED: &str = "weir.dev/lab-derived";
/// The namespace label the API server sets on every namespace.
pub const LABEL_NS_NAME: &str = "kubernetes.io/metadata.name";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Kind of the lab's own configuration document.
pub const CONFIG_KIND: &str = "LabConfig";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Read(String),
    #[error("{origin}: {reason}")]
    Document { origin: String, reason: String },
    #[error("{kind} {object}: {reason}")]
    Invalid {
        kind: &'static str,
        object: String,
        reason: String,
    },
    #[error("{0}")]
    Exhausted(String),
    #[error("lab configuration: {0}")]
    Config(String),
}

fn invalid(kind: &'static str, object: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        kind,
        object: object.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Configuration

/// Cluster-wide addressing of a lab. Masquerade decisions depend on the pod CIDRs, so
/// they are settable; everything else has a default that rarely needs changing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabConfig {
    /// Cluster pod CIDRs, one per IP family (both for dual stack).
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    /// Service CIDRs (clusterIP pools), one per family.
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Vec<IpNet>,
    /// Where node InternalIPs are allocated, one per family.
    #[serde(rename = "nodeCIDRs")]
    pub node_cidrs: Vec<IpNet>,
    /// Prefix length of each node's pod CIDR (kube-controller-manager's
    /// --node-cidr-mask-size-ipv4 / -ipv6).
    pub node_cidr_mask_size_v4: u8,
    pub node_cidr_mask_size_v6: u8,
    /// Where LoadBalancer ingress IPs are allocated (what a LB controller would do).
    #[serde(rename = "loadBalancerCIDRs")]
    pub load_balancer_cidrs: Vec<IpNet>,
    /// NodePort range, inclusive.
    pub node_port_range: [u16; 2],
    /// Socket-level load balancing on every node (the agents attach their cgroup hooks to
    /// the node's cgroup). On by default, as in a cluster; off sends all Service traffic
    /// through the per-packet path.
    #[serde(rename = "socketLB", default = "yes")]
    pub socket_lb: bool,
    /// What programs the nodes' Service and policy datapath: `weir` (one agent per node,
    /// the default) or `none` (no agents: the nodes are plain routers, for baselines such
    /// as kube-proxy's rules loaded into the node namespaces by the benchmarks).
    #[serde(default)]
    pub dataplane: Dataplane,
    /// Map capacities every agent gets (`--map-size NAME=ENTRIES`), for labs with more
    /// Services than the default maps hold (the benchmarks at 10k-50k Services).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map_sizes: Vec<String>,
}

/// Who programs a lab's nodes (`LabConfig.dataplane`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// One `weir agent` per node.
    #[default]
    Weir,
    /// No agent: nothing translates Services; pods and routes only.
    None,
}

fn yes() -> bool {
    true
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            pod_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
            service_cidrs: vec!["10.96.0.0/16".parse().expect("cidr")],
            node_cidrs: vec!["192.168.100.0/24".parse().expect("cidr")],
            node_cidr_mask_size_v4: 24,
            node_cidr_mask_size_v6: 64,
            load_balancer_cidrs: vec!["198.51.100.0/24".parse().expect("cidr")],
            node_port_range: [30000, 32767],
            socket_lb: true,
            dataplane: Dataplane::Weir,
            map_sizes: Vec::new(),
        }
    }
}

/// Defaults for the IPv6 family when a lab's pod CIDRs include one.
pub const DEFAULT_V6_SERVICE_CIDR: &str = "fd00:10:96::/112";
pub const DEFAULT_V6_NODE_CIDR: &str = "fd00:100::/64";
pub const DEFAULT_V6_LB_CIDR: &str = "fd00:198:51:100::/64";

/// A `kind: LabConfig` document: every field optional, merged over the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabConfigDoc {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_yaml::Value>,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Option<Vec<IpNet>>,
    #[serde(rename = "serviceCIDRs", default)]
    pub service_cidrs: Option<Vec<IpNet>>,
    #[serde(rename = "nodeCIDRs", default)]
    pub node_cidrs: Option<Vec<IpNet>>,
    #[serde(default)]
    pub node_cidr_mask_size_v4: Option<u8>,
    #[serde(default)]
    pub node_cidr_mask_size_v6: Option<u8>,
    #[serde(rename = "loadBalancerCIDRs", default)]
    pub load_balancer_cidrs: Option<Vec<IpNet>>,
    #[serde(default)]
    pub node_port_range: Option<String>,
    #[serde(rename = "socketLB", default)]
    pub socket_lb: Option<bool>,
    #[serde(default)]
    pub dataplane: Option<Dataplane>,
    #[serde(default)]
    pub map_sizes: Option<Vec<String>>,
}

fn family_of(n: &IpNet) -> Family {
    Family::of(&n.addr())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    IPv4,
    IPv6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::IPv4
        } else {
            Family::IPv6
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        match s {
            "IPv4" => Some(Family::IPv4),
            "IPv6" => Some(Family::IPv6),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::IPv4 => "IPv4",
            Family::IPv6 => "IPv6",
        }
    }
}

impl LabConfig {
    /// Builds the configuration from an optional document and flag overrides, filling
    /// in per-family defaults, and checks it.
    pub fn build(
        doc: Option<&LabConfigDoc>,
        pod_cidrs: &[IpNet],
        service_cidrs: &[IpNet],
    ) -> Result<LabConfig, SpecError> {
        let mut c = LabConfig::default();
        let mut explicit_service = false;
        let mut explicit_node = false;
        let mut explicit_lb = false;
        if let Some(d) = doc {
            if let Some(v) = &d.pod_cidrs {
                c.pod_cidrs = v.clone();
            }
            if let Some(v) = &d.service_cidrs {
                c.service_cidrs = v.clone();
                explicit_service = true;
            }
            if let Some(v) = &d.node_cidrs {
                c.node_cidrs = v.clone();
                explicit_node = true;
            }
            if let Some(v) = &d.load_balancer_cidrs {
                c.load_balancer_cidrs = v.clone();
                explicit_lb = true;
            }
            if let Some(v) = d.node_cidr_mask_size_v4 {
                c.node_cidr_mask_size_v4 = v;
            }
            if let Some(v) = d.node_cidr_mask_size_v6 {
                c.node_cidr_mask_size_v6 = v;
            }
            if let Some(r) = &d.node_port_range {
                c.node_port_range = parse_port_range(r)?;
            }
            if let Some(v) = d.socket_lb {
                c.socket_lb = v;
            }
            if let Some(v) = d.dataplane {
                c.dataplane = v;
            }
            if let Some(v) = &d.map_sizes {
                for m in v {
                    let ok = m.split_once('=').is_some_and(|(k, n)| {
                        !k.is_empty() && n.parse::<u32>().is_ok_and(|n| n > 0)
                    });
                    if !ok {
                        return Err(SpecError::Config(format!(
                            "mapSizes entry {m:?}: use NAME=ENTRIES (e.g. SERVICES=1048576)"
                        )));
                    }
                }
                c.map_sizes = v.clone();
            }
        }
        if !pod_cidrs.is_empty() {
            c.pod_cidrs = pod_cidrs.to_vec();
        }
        if !service_cidrs.is_empty() {
            c.service_cidrs = service_cidrs.to_vec();
            explicit_service = true;
        }
        let families: Vec<Family> = c.pod_cidrs.iter().map(family_of).collect();
        // A family of pods needs a service, node and LB pool of that family: add the
        // defaults for the families not given (a v6-only lab gets v6 pools only).
        let fill = |list: &mut Vec<IpNet>, explicit: bool, v4: &str, v6: &str| {
            if !explicit {
                list.clear();
            }
            for f in &families {
                if !list.iter().any(|n| family_of(n) == *f) {
                    list.push(
                        match f {
                            Family::IPv4 => v4,
                            Family::IPv6 => v6,
                        }
                        .parse()
                        .expect("default cidr"),
                    );
                }
            }
        };
        fill(
            &mut c.service_cidrs,
            explicit_service,
            "10.96.0.0/16",
            DEFAULT_V6_SERVICE_CIDR,
        );
        fill(
            &mut c.node_cidrs,
            explicit_node,
            "192.168.100.0/24",
            DEFAULT_V6_NODE_CIDR,
        );
        fill(
            &mut c.load_balancer_cidrs,
            explicit_lb,
            "198.51.100.0/24",
            DEFAULT_V6_LB_CIDR,
        );
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), SpecError> {
        let err = |m: String| Err(SpecError::Config(m));
        if self.pod_cidrs.is_empty() || self.pod_cidrs.len() > 2 {
            return err("podCIDRs needs one CIDR per IP family (one or two)".into());
        }
        for (what, list) in [
            ("podCIDRs", &self.pod_cidrs),
            ("serviceCIDRs", &self.service_cidrs),
            ("nodeCIDRs", &self.node_cidrs),
            ("loadBalancerCIDRs", &self.load_balancer_cidrs),
        ] {
            let fams: BTreeSet<Family> = list.iter().map(family_of).collect();
            if fams.len() != list.len() {
                return err(format!("{what} has two CIDRs of one family"));
            }
        }
        if self.pod_cidrs.len() == 2
            && family_of(&self.pod_cidrs[0]) == family_of(&self.pod_cidrs[1])
        {
            return err("dual-stack podCIDRs must be one IPv4 and one IPv6 CIDR".into());
        }
        for p in &self.pod_cidrs {
            let mask = match family_of(p) {
                Family::IPv4 => self.node_cidr_mask_size_v4,
                Family::IPv6 => self.node_cidr_mask_size_v6,
            };
            if mask < p.prefix_len() || mask > p.max_prefix_len() - 2 {
                return err(format!(
                    "node CIDR mask size /{mask} does not fit inside pod CIDR {p}"
                ));
            }
        }
        let all: Vec<(&str, &IpNet)> = self
            .pod_cidrs
            .iter()
            .map(|n| ("podCIDRs", n))
            .chain(self.service_cidrs.iter().map(|n| ("serviceCIDRs", n)))
            .chain(self.node_cidrs.iter().map(|n| ("nodeCIDRs", n)))
            .chain(
                self.load_balancer_cidrs
                    .iter()
                    .map(|n| ("loadBalancerCIDRs", n)),
            )
            .collect();
        for (i, (wa, a)) in all.iter().enumerate() {
            for (wb, b) in &all[i + 1..] {
                if overlaps(a, b) {
                    return err(format!("{wa} {a} overlaps {wb} {b}"));
                }
            }
        }
        let [lo, hi] = self.node_port_range;
        if lo == 0 || lo > hi {
            return err(format!("nodePortRange {lo}-{hi} is empty"));
        }
        Ok(())
    }

    pub fn families(&self) -> Vec<Family> {
        self.pod_cidrs.iter().map(family_of).collect()
    }

    fn pool(list: &[IpNet], f: Family) -> Option<&IpNet> {
        list.iter().find(|n| family_of(n) == f)
    }
}

pub fn parse_port_range(s: &str) -> Result<[u16; 2], SpecError> {
    let bad = || SpecError::Config(format!("nodePortRange {s:?} is not LOW-HIGH"));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    Ok([
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ])
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

// ---------------------------------------------------------------------------------------
// Input

/// `namespace/name` (cluster-scoped objects: `name`).
pub fn key(meta: &ObjectMeta) -> String {
    format!("{}/{}", ns_of(meta), meta.name.as_deref().unwrap_or(""))
}

pub fn ns_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

/// What the user declared, by kind and key. `apply` replaces objects whole.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub nodes: BTreeMap<String, core::Node>,
    pub namespaces: BTreeMap<String, core::Namespace>,
    pub pods: BTreeMap<String, core::Pod>,
    pub services: BTreeMap<String, core::Service>,
    pub slices: BTreeMap<String, discovery::EndpointSlice>,
    pub policies: BTreeMap<String, networking::NetworkPolicy>,
}

/// One object change `apply` or `delete` made, for the JSON report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: &'static str,
    pub key: String,
    /// "created", "configured" (replaced with a different object), "unchanged",
    /// "deleted".
    pub action: &'static str,
}

fn set_ns(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".into());
    }
}

/// RFC 1123 label (namespace names): what the API server accepts.
pub fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain (names of pods, nodes and most objects).
pub fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// The object's name, checked as the API server would (lab names of namespaces, cgroups
/// and pin directories are built from them, so they must not collide or contain `/`).
fn check_name(kind: &'static str, meta: &ObjectMeta) -> Result<String, SpecError> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(invalid(kind, "<unnamed>", "metadata.name is empty"));
    }
    let ok = if kind == "Namespace" {
        dns_label(&name)
    } else {
        dns_subdomain(&name)
    };
    if !ok {
        return Err(invalid(
            kind,
            name,
            "metadata.name must be lowercase letters, digits, '-' (and '.' except for namespaces), as Kubernetes requires",
        ));
    }
    if let Some(ns) = meta.namespace.as_deref().filter(|n| !n.is_empty())
        && !dns_label(ns)
    {
        return Err(invalid(
            kind,
            format!("{ns}/{name}"),
            "metadata.namespace is not a valid namespace name",
        ));
    }
    Ok(name)
}

fn upsert<T: PartialEq>(
    map: &mut BTreeMap<String, T>,
    kind: &'static str,
    k: String,
    v: T,
    changes: &mut Vec<Change>,
) {
    let action = match map.get(&k) {
        None => "created",
        Some(old) if *old == v => "unchanged",
        Some(_) => "configured",
    };
    map.insert(k.clone(), v);
    changes.push(Change {
        kind,
        key: k,
        action,
    });
}

impl Input {
    /// Adds or replaces objects (namespaced objects without a namespace go to
    /// `default`, as kubectl does).
    pub fn apply(&mut self, objs: Vec<Object>) -> Result<Vec<Change>, SpecError> {
        let mut changes = Vec::new();
        for o in objs {
            match o {
                Object::Node(mut n) => {
                    let name = check_name("Node", &n.metadata)?;
                    n.metadata.namespace = None;
                    upsert(&mut self.nodes, "Node", name, *n, &mut changes);
                }
                Object::Namespace(mut n) => {
                    let name = check_name("Namespace", &n.metadata)?;
                    n.metadata.namespace = None;
                    upsert(&mut self.namespaces, "Namespace", name, *n, &mut changes);
                }
                Object::Pod(mut p) => {
                    check_name("Pod", &p.metadata)?;
                    set_ns(&mut p.metadata);
                    upsert(&mut self.pods, "Pod", key(&p.metadata), *p, &mut changes);
                }
                Object::Service(mut s) => {
                    check_name("Service", &s.metadata)?;
                    set_ns(&mut s.metadata);
                    upsert(
                        &mut self.services,
                        "Service",
                        key(&s.metadata),
                        *s,
                        &mut changes,
                    );
                }
                Object::EndpointSlice(mut s) => {
                    check_name("EndpointSlice", &s.metadata)?;
                    set_ns(&mut s.metadata);
                    if s.metadata
                        .annotations
                        .as_ref()
                        .is_some_and(|a| a.contains_key(ANNOTATION_DERIVED))
                    {
                        // A slice copied from the lab's own output: the lab derives
                        // these itself; treating it as given would freeze it.
                        continue;
                    }
                    upsert(
                        &mut self.slices,
                        "EndpointSlice",
                        key(&s.metadata),
                        *s,
                        &mut changes,
                    );
                }
                Object::NetworkPolicy(mut p) => {
                    check_name("NetworkPolicy", &p.metadata)?;
                    set_ns(&mut p.metadata);
                    upsert(
                        &mut self.policies,
                        "NetworkPolicy",
                        key(&p.metadata),
                        *p,
                        &mut changes,
                    );
                }
            }
        }
        Ok(changes)
    }

    /// Deletes one object by `KIND/NAMESPACE/NAME` (cluster-scoped kinds: `KIND/NAME`).
    /// Deleting a Namespace deletes everything in it, as the API server does.
    pub fn delete(&mut self, spec: &str) -> Result<Vec<Change>, SpecError> {
        let bad = |r: &str| SpecError::Read(format!("cannot delete {spec:?}: {r}"));
        let mut parts = spec.splitn(3, '/');
        let kind = parts.next().unwrap_or("");
        let rest: Vec<&str> = parts.collect();
        let kind = canonical_kind(kind).ok_or_else(|| {
            bad("unknown kind (Node, Namespace, Pod, Service, EndpointSlice, NetworkPolicy)")
        })?;
        let cluster_scoped = matches!(kind, "Node" | "Namespace");
        let k = match (cluster_scoped, rest.as_slice()) {
            (true, [name]) | (true, ["", name]) => name.to_string(),
            (false, [ns, name]) => format!("{ns}/{name}"),
            (true, _) => return Err(bad("expected KIND/NAME for a cluster-scoped kind")),
            (false, _) => return Err(bad("expected KIND/NAMESPACE/NAME")),
        };
        let mut changes = Vec::new();
        let mut gone = |kind: &'static str, key: String| {
            changes.push(Change {
                kind,
                key,
                action: "deleted",
            })
        };
        let found = match kind {
            "Node" => self.nodes.remove(&k).is_some(),
            "Namespace" => {
                let prefix = format!("{k}/");
                let had = self.namespaces.remove(&k).is_some();
                let mut any = had;
                macro_rules! sweep {
                    ($map:expr, $kind:expr) => {
                        let keys: Vec<String> = $map
                            .keys()
                            .filter(|x| x.starts_with(&prefix))
                            .cloned()
                            .collect();
                        for x in keys {
                            $map.remove(&x);
                            gone($kind, x);
                            any = true;
                        }
                    };
                }
                sweep!(self.pods, "Pod");
                sweep!(self.services, "Service");
                sweep!(self.slices, "EndpointSlice");
                sweep!(self.policies, "NetworkPolicy");
                any
            }
            "Pod" => self.pods.remove(&k).is_some(),
            "Service" => self.services.remove(&k).is_some(),
            "EndpointSlice" => self.slices.remove(&k).is_some(),
            "NetworkPolicy" => self.policies.remove(&k).is_some(),
            _ => unreachable!("canonical kinds only"),
        };
        if !found {
            let hint = if kind == "EndpointSlice" {
                " (EndpointSlices the lab derives from Services cannot be deleted; change the Service or its pods)"
            } else {
                ""
            };
            return Err(bad(&format!("no such {kind} {k}{hint}")));
        }
        if kind != "Namespace" || !changes.iter().any(|c| c.kind == "Namespace") {
            changes.insert(
                0,
                Change {
                    kind,
                    key: k,
                    action: "deleted",
                },
            );
        }
        Ok(changes)
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
            && self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.services.is_empty()
            && self.slices.is_empty()
            && self.policies.is_empty()
    }
}

/// Kind names as kubectl accepts them (case-insensitive, singular, plural, short).
pub fn canonical_kind(s: &str) -> Option<&'static str> {
    Some(match s.to_ascii_lowercase().as_str() {
        "node" | "nodes" | "no" => "Node",
        "namespace" | "namespaces" | "ns" => "Namespace",
        "pod" | "pods" | "po" => "Pod",
        "service" | "services" | "svc" => "Service",
        "endpointslice" | "endpointslices" | "eps" => "EndpointSlice",
        "networkpolicy" | "networkpolicies" | "netpol" => "NetworkPolicy",
        _ => return None,
    })
}

/// What files and directories hold: the objects (in file order), the configuration
/// document if any, and notes about skipped documents.
#[derive(Debug, Default)]
pub struct Loaded {
    pub objects: Vec<Object>,
    pub config: Option<LabConfigDoc>,
    pub warnings: Vec<String>,
}

/// Reads files and directories (recursively: `*.yaml`, `*.yml`, `*.json`, sorted by
/// path). Any broken document is an error: the lab never runs on half its input.
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded, SpecError> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    if files.is_empty() {
        return Err(SpecError::Read(format!(
            "no YAML or JSON files in {}",
            paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut out = Loaded::default();
    for f in files {
        let text = std::fs::read_to_string(&f)
            .map_err(|e| SpecError::Read(format!("reading {}: {e}", f.display())))?;
        parse_text(&text, &f.display().to_string(), &mut out)?;
    }
    Ok(out)
}

fn collect_files(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), SpecError> {
    let md = std::fs::metadata(p).map_err(|e| SpecError::Read(format!("{}: {e}", p.display())))?;
    if md.is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(p)
        .map_err(|e| SpecError::Read(format!("reading directory {}: {e}", p.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect_files(&e, out)?;
        } else if matches!(
            e.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(e);
        }
    }
    Ok(())
}

/// Parses one file's text into `out`.
pub fn parse_text(text: &str, origin: &str, out: &mut Loaded) -> Result<(), SpecError> {
    let (objs, errs) = yaml::parse_documents(text, origin);
    if let Some(e) = errs.into_iter().next() {
        return Err(SpecError::Document {
            origin: e.origin,
            reason: e.reason,
        });
    }
    out.objects.extend(objs);
    // Second pass for what the object parser skips: the lab's own config document, and
    // kinds the lab does not know (reported, not silently dropped).
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Ok(v) = serde_yaml::Value::deserialize(doc) else {
            break;
        };
        let origin = format!("{origin} (document {})", i + 1);
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        match kind {
            CONFIG_KIND => {
                if out.config.is_some() {
                    return Err(SpecError::Document {
                        origin,
                        reason: "a second LabConfig document".into(),
                    });
                }
                let c: LabConfigDoc =
                    serde_yaml::from_value(v).map_err(|e| SpecError::Document {
                        origin: origin.clone(),
                        reason: format!("LabConfig: {e}"),
                    })?;
                out.config = Some(c);
            }
            "Service" | "EndpointSlice" | "Node" | "Pod" | "Namespace" | "NetworkPolicy" | ""
            | "List" => {}
            k if k.ends_with("List") => {}
            other => out.warnings.push(format!(
                "{origin}: kind {other} is not used by the lab; skipped"
            )),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Resolution

/// A server for an EndpointSlice address that belongs to no pod: its own namespace at
/// that address on the endpoint's node, serving the slice's ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointServer {
    pub address: IpAddr,
    pub node: String,
    pub ports: BTreeSet<PortSpec>,
    /// The slices that name this address (`namespace/name`).
    pub slices: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
}

/// Everything filled in; what the agents read (as YAML) and what the topology is
/// built from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub namespaces: BTreeMap<String, core::Namespace>,
    pub nodes: BTreeMap<String, core::Node>,
    pub pods: BTreeMap<String, core::Pod>,
    pub services: BTreeMap<String, core::Service>,
    pub slices: BTreeMap<String, discovery::EndpointSlice>,
    pub policies: BTreeMap<String, networking::NetworkPolicy>,
    pub endpoint_servers: BTreeMap<IpAddr, EndpointServer>,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// Addresses of a node (InternalIPs), per family order.
pub fn node_ips(n: &core::Node) -> Vec<IpAddr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.trim().parse().ok())
        .collect()
}

pub fn node_pod_cidrs(n: &core::Node) -> Vec<IpNet> {
    let spec = n.spec.clone().unwrap_or_default();
    let mut v: Vec<String> = spec.pod_cidrs.unwrap_or_default();
    if v.is_empty()
        && let Some(c) = spec.pod_cidr
    {
        v.push(c);
    }
    v.iter().filter_map(|c| c.trim().parse().ok()).collect()
}

pub fn pod_ips(p: &core::Pod) -> Vec<IpAddr> {
    let st = p.status.clone().unwrap_or_default();
    let mut v: Vec<IpAddr> = st
        .pod_ips
        .unwrap_or_default()
        .iter()
        .filter_map(|i| i.ip.trim().parse().ok())
        .collect();
    if v.is_empty()
        && let Some(ip) = st.pod_ip.as_deref().and_then(|i| i.trim().parse().ok())
    {
        v.push(ip);
    }
    v
}

pub fn pod_node(p: &core::Pod) -> Option<&str> {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

/// containers[].ports of a pod (protocol defaulted to TCP).
pub fn pod_ports(p: &core::Pod) -> Vec<PortSpec> {
    let mut out = Vec::new();
    for c in p.spec.iter().flat_map(|s| s.containers.iter()) {
        for cp in c.ports.iter().flatten() {
            if let Ok(port) = u16::try_from(cp.container_port)
                && port != 0
            {
                out.push(PortSpec {
                    name: cp.name.clone(),
                    port,
                    protocol: cp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                });
            }
        }
    }
    out
}

/// podutil.IsPodReady: the Ready condition is True.
pub fn pod_ready(p: &core::Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn service_ips(s: &core::Service) -> Vec<IpAddr> {
    let spec = s.spec.clone().unwrap_or_default();
    let mut v: Vec<String> = spec.cluster_ips.unwrap_or_default();
    if v.is_empty()
        && let Some(ip) = spec.cluster_ip
    {
        v.push(ip);
    }
    v.iter().filter_map(|i| i.trim().parse().ok()).collect()
}

pub fn service_lb_ips(s: &core::Service) -> Vec<IpAddr> {
    s.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref().and_then(|ip| ip.trim().parse().ok()))
        .collect()
}

pub fn service_external_ips(s: &core::Service) -> Vec<IpAddr> {
    s.spec
        .as_ref()
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.trim().parse().ok())
        .collect()
}

fn nth_addr(net: &IpNet, i: u128) -> Option<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let base = u32::from(n.network()) as u128;
            let size = 1u128 << (32 - n.prefix_len());
            (i < size).then(|| IpAddr::V4(((base + i) as u32).into()))
        }
        IpNet::V6(n) => {
            let base = u128::from(n.network());
            let bits = 128 - n.prefix_len() as u32;
            let ok = bits == 128 || i < (1u128 << bits);
            ok.then(|| IpAddr::V6((base + i).into()))
        }
    }
}

/// The first address of `net` at host index >= `start` that is not in `used` (the last
/// address of an IPv4 subnet, its broadcast, is skipped).
fn next_free(net: &IpNet, start: u128, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let limit: u128 = match net {
        IpNet::V4(n) => (1u128 << (32 - n.prefix_len())).saturating_sub(1),
        IpNet::V6(n) => {
            let bits = 128 - n.prefix_len() as u32;
            if bits >= 32 { 1 << 32 } else { 1u128 << bits }
        }
    };
    (start..limit)
        .filter_map(|i| nth_addr(net, i))
        .find(|a| !used.contains(a))
}

fn meta_labels(m: &ObjectMeta) -> BTreeMap<String, String> {
    m.labels.clone().unwrap_or_default()
}

/// Label selector (map form, as Service.spec.selector) matches labels.
pub fn selector_matches(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

struct Alloc<'a> {
    cfg: &'a LabConfig,
    prev: Option<&'a Resolved>,
    used_ips: BTreeSet<IpAddr>,
    warnings: Vec<String>,
}

/// Fills in the input. `prev` is the previous resolution (allocations are kept).
pub fn resolve(
    input: &Input,
    cfg: &LabConfig,
    prev: Option<&Resolved>,
) -> Result<Resolved, SpecError> {
    let mut a = Alloc {
        cfg,
        prev,
        used_ips: BTreeSet::new(),
        warnings: Vec::new(),
    };
    let mut r = Resolved::default();

    // --- Nodes: declared, named by pods, named by endpoints.
    let mut node_names: BTreeSet<String> = input.nodes.keys().cloned().collect();
    for p in input.pods.values() {
        if let Some(n) = pod_node(p) {
            if !dns_subdomain(n) {
                return Err(invalid(
                    "Pod",
                    key(&p.metadata),
                    format!("spec.nodeName {n:?} is not a valid node name"),
                ));
            }
            node_names.insert(n.to_string());
        }
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Err(invalid(
                "Pod",
                key(&p.metadata),
                "hostNetwork pods are not supported by the lab",
            ));
        }
    }
    for s in input.slices.values() {
        for e in s.endpoints.iter().flatten() {
            if let Some(n) = e.node_name.as_deref().filter(|n| !n.is_empty()) {
                if !dns_subdomain(n) {
                    return Err(invalid(
                        "EndpointSlice",
                        key(&s.metadata),
                        format!("endpoint nodeName {n:?} is not a valid node name"),
                    ));
                }
                node_names.insert(n.to_string());
            }
        }
    }
    let unscheduled = input.pods.values().any(|p| pod_node(p).is_none());
    if node_names.is_empty() && (unscheduled || !input.slices.is_empty()) {
        node_names.insert("node-1".into());
    }
    // Given node addresses and pod CIDRs are reserved before anything is allocated.
    let mut used_cidrs: Vec<IpNet> = Vec::new();
    for n in input.nodes.values() {
        a.used_ips.extend(node_ips(n));
        used_cidrs.extend(node_pod_cidrs(n));
    }
    for p in input.pods.values() {
        a.used_ips.extend(pod_ips(p));
    }
    for s in input.slices.values() {
        for e in s.endpoints.iter().flatten() {
            a.used_ips
                .extend(e.addresses.iter().filter_map(|x| x.parse::<IpAddr>().ok()));
        }
    }
    for n in &node_names {
        let node = resolve_node(&mut a, input.nodes.get(n), n, &mut used_cidrs)?;
        r.nodes.insert(n.clone(), node);
    }
    check_nodes(&r)?;

    // --- Namespaces: declared and implied, each with its metadata.name label.
    let mut ns_names: BTreeSet<String> = input.namespaces.keys().cloned().collect();
    for k in input
        .pods
        .keys()
        .chain(input.services.keys())
        .chain(input.slices.keys())
        .chain(input.policies.keys())
    {
        ns_names.insert(k.split('/').next().unwrap_or("default").to_string());
    }
    for n in ns_names {
        let mut ns = input
            .namespaces
            .get(&n)
            .cloned()
            .unwrap_or_else(|| core::Namespace {
                metadata: ObjectMeta {
                    name: Some(n.clone()),
                    ..Default::default()
                },
                ..Default::default()
            });
        ns.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(LABEL_NS_NAME.into(), n.clone());
        r.namespaces.insert(n, ns);
    }

    // --- Pods.
    let mut load: BTreeMap<String, usize> = r.nodes.keys().map(|n| (n.clone(), 0)).collect();
    for p in input.pods.values() {
        if let Some(n) = pod_node(p) {
            *load.entry(n.to_string()).or_default() += 1;
        }
    }
    let mut owner_of_ip: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (k, p) in &input.pods {
        let pod = resolve_pod(&mut a, &r, k, p, &mut load)?;
        for ip in pod_ips(&pod) {
            if let Some(other) = owner_of_ip.insert(ip, k.clone()) {
                return Err(invalid(
                    "Pod",
                    k.clone(),
                    format!("IP {ip} is also the IP of pod {other}"),
                ));
            }
            for (nn, n) in &r.nodes {
                if node_ips(n).contains(&ip) {
                    return Err(invalid(
                        "Pod",
                        k.clone(),
                        format!("IP {ip} is node {nn}'s address"),
                    ));
                }
            }
        }
        r.pods.insert(k.clone(), pod);
    }

    // --- Services.
    let mut used_vips: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut used_node_ports: BTreeMap<(u16, String), String> = BTreeMap::new();
    // Reserve every given (or previously allocated) value first, so that allocation never
    // takes a value a later object asks for.
    for (k, s) in &input.services {
        for ip in service_ips(s).into_iter().chain(service_lb_ips(s)) {
            if let Some(o) = used_vips.insert(ip, k.clone())
                && o != *k
            {
                return Err(invalid(
                    "Service",
                    k.clone(),
                    format!("address {ip} is already used by Service {o}"),
                ));
            }
        }
        for p in s.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if let Some(np) = p.node_port.filter(|n| *n != 0) {
                let np = u16::try_from(np).map_err(|_| {
                    invalid("Service", k.clone(), format!("nodePort {np} is not a port"))
                })?;
                let proto = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                if let Some(o) = used_node_ports.insert((np, proto.clone()), k.clone()) {
                    return Err(invalid(
                        "Service",
                        k.clone(),
                        format!("nodePort {np}/{proto} is already used by Service {o}"),
                    ));
                }
            }
        }
        if let Some(hc) = s.spec.as_ref().and_then(|s| s.health_check_node_port)
            && hc != 0
        {
            used_node_ports.insert((hc as u16, "TCP".into()), k.clone());
        }
    }
    if let Some(prev) = prev {
        for (k, s) in &prev.services {
            if !input.services.contains_key(k) {
                continue;
            }
            for ip in service_ips(s).into_iter().chain(service_lb_ips(s)) {
                used_vips.entry(ip).or_insert_with(|| k.clone());
            }
            for p in s.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                if let Some(np) = p.node_port.filter(|n| *n != 0) {
                    used_node_ports
                        .entry((np as u16, p.protocol.clone().unwrap_or_default()))
                        .or_insert_with(|| k.clone());
                }
            }
            if let Some(hc) = s.spec.as_ref().and_then(|s| s.health_check_node_port) {
                used_node_ports
                    .entry((hc as u16, "TCP".into()))
                    .or_insert_with(|| k.clone());
            }
        }
    }
    for (k, s) in &input.services {
        let svc = resolve_service(&mut a, k, s, &mut used_vips, &mut used_node_ports)?;
        r.services.insert(k.clone(), svc);
    }

    // --- EndpointSlices: given ones win for their Service; others are derived.
    let mut given_for: BTreeSet<String> = BTreeSet::new();
    for (k, s) in &input.slices {
        let mut s = s.clone();
        if !matches!(s.address_type.as_str(), "IPv4" | "IPv6" | "FQDN") {
            return Err(invalid(
                "EndpointSlice",
                k.clone(),
                format!("unknown addressType {:?}", s.address_type),
            ));
        }
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
        {
            given_for.insert(format!("{}/{svc}", ns_of(&s.metadata)));
        }
        s.metadata.namespace = Some(ns_of(&s.metadata).to_string());
        r.slices.insert(k.clone(), s);
    }
    for (k, svc) in &r.services {
        if given_for.contains(k) {
            continue;
        }
        for s in derive_slices(svc, &r.pods, &r.nodes) {
            r.slices.insert(key(&s.metadata), s);
        }
    }

    // --- Servers for endpoint addresses that belong to no pod.
    let first_node = r.nodes.keys().next().cloned();
    for (k, s) in &input.slices {
        if s.address_type == "FQDN" {
            continue;
        }
        let ports: Vec<PortSpec> = s
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok().filter(|p| *p != 0)?;
                Some(PortSpec {
                    name: p.name.clone(),
                    port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                })
            })
            .collect();
        for e in s.endpoints.iter().flatten() {
            for addr in &e.addresses {
                let ip: IpAddr = addr.trim().parse().map_err(|_| {
                    invalid(
                        "EndpointSlice",
                        k.clone(),
                        format!("endpoint address {addr:?} is not an IP address"),
                    )
                })?;
                let fam_ok = matches!(
                    (s.address_type.as_str(), Family::of(&ip)),
                    ("IPv4", Family::IPv4) | ("IPv6", Family::IPv6)
                );
                if !fam_ok {
                    return Err(invalid(
                        "EndpointSlice",
                        k.clone(),
                        format!("address {ip} is not of addressType {}", s.address_type),
                    ));
                }
                if owner_of_ip.contains_key(&ip) {
                    continue;
                }
                if r.nodes.values().any(|n| node_ips(n).contains(&ip)) {
                    return Err(invalid(
                        "EndpointSlice",
                        k.clone(),
                        format!(
                            "endpoint {ip} is a node address (host-network endpoints are not supported by the lab)"
                        ),
                    ));
                }
                let node = match e.node_name.as_deref().filter(|n| !n.is_empty()) {
                    Some(n) => n.to_string(),
                    None => {
                        let n = first_node.clone().ok_or_else(|| {
                            invalid("EndpointSlice", k.clone(), "no node to place it on")
                        })?;
                        a.warnings.push(format!(
                            "EndpointSlice {k}: endpoint {ip} has no nodeName; its server runs on node {n}"
                        ));
                        n
                    }
                };
                let es = r
                    .endpoint_servers
                    .entry(ip)
                    .or_insert_with(|| EndpointServer {
                        address: ip,
                        node: node.clone(),
                        ports: BTreeSet::new(),
                        slices: BTreeSet::new(),
                    });
                if es.node != node {
                    return Err(invalid(
                        "EndpointSlice",
                        k.clone(),
                        format!(
                            "endpoint {ip} is on node {node} here but on node {} in {}",
                            es.node,
                            es.slices.iter().next().cloned().unwrap_or_default()
                        ),
                    ));
                }
                es.slices.insert(k.clone());
                for p in &ports {
                    es.ports.insert(PortSpec {
                        name: None,
                        ..p.clone()
                    });
                }
            }
        }
    }

    r.policies = input.policies.clone();
    r.warnings = a.warnings;
    Ok(r)
}

fn resolve_node(
    a: &mut Alloc,
    given: Option<&core::Node>,
    name: &str,
    used_cidrs: &mut Vec<IpNet>,
) -> Result<core::Node, SpecError> {
    let mut n = given.cloned().unwrap_or_else(|| core::Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    });
    let prev = a.prev.and_then(|p| p.nodes.get(name));
    let families = a.cfg.families();

    // InternalIPs: given ones exactly; else the previous allocation; else allocated from
    // the node CIDR of each family (host index 2 on: .1 is the fabric).
    let mut ips = node_ips(&n);
    if ips.is_empty() {
        for f in &families {
            let ip = match prev
                .map(node_ips)
                .and_then(|v| v.into_iter().find(|i| Family::of(i) == *f))
            {
                Some(ip) => ip,
                None => {
                    let pool = LabConfig::pool(&a.cfg.node_cidrs, *f).ok_or_else(|| {
                        SpecError::Config(format!("no nodeCIDR for {}", f.as_str()))
                    })?;
                    next_free(pool, 2, &a.used_ips).ok_or_else(|| {
                        SpecError::Exhausted(format!("node CIDR {pool} has no free address"))
                    })?
                }
            };
            a.used_ips.insert(ip);
            ips.push(ip);
        }
        let st = n.status.get_or_insert_with(Default::default);
        let addrs = st.addresses.get_or_insert_with(Vec::new);
        for ip in &ips {
            addrs.push(core::NodeAddress {
                address: ip.to_string(),
                type_: "InternalIP".into(),
            });
        }
    }
    if !addrs_have_hostname(&n) {
        let st = n.status.get_or_insert_with(Default::default);
        st.addresses
            .get_or_insert_with(Vec::new)
            .push(core::NodeAddress {
                address: name.to_string(),
                type_: "Hostname".into(),
            });
    }

    // Pod CIDRs: given; else previous; else the next free subnet of each cluster pod CIDR.
    let mut cidrs = node_pod_cidrs(&n);
    if cidrs.is_empty() {
        for pool in &a.cfg.pod_cidrs {
            let f = family_of(pool);
            let c = match prev
                .map(node_pod_cidrs)
                .and_then(|v| v.into_iter().find(|c| family_of(c) == f))
            {
                Some(c) => c,
                None => {
                    let mask = match f {
                        Family::IPv4 => a.cfg.node_cidr_mask_size_v4,
                        Family::IPv6 => a.cfg.node_cidr_mask_size_v6,
                    };
                    pool.subnets(mask)
                        .map_err(|e| SpecError::Config(format!("{pool} /{mask}: {e}")))?
                        .find(|s| !used_cidrs.iter().any(|u| overlaps(u, s)))
                        .ok_or_else(|| {
                            SpecError::Exhausted(format!(
                                "pod CIDR {pool} has no free /{mask} for node {name}"
                            ))
                        })?
                }
            };
            used_cidrs.push(c);
            cidrs.push(c);
        }
        let spec = n.spec.get_or_insert_with(Default::default);
        spec.pod_cidr = cidrs.first().map(|c| c.to_string());
        spec.pod_cidrs = Some(cidrs.iter().map(|c| c.to_string()).collect());
    }
    let st = n.status.get_or_insert_with(Default::default);
    if st.conditions.is_none() {
        st.conditions = Some(vec![core::NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }]);
    }
    Ok(n)
}

fn addrs_have_hostname(n: &core::Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .is_some_and(|a| a.iter().any(|a| a.type_ == "Hostname"))
}

fn check_nodes(r: &Resolved) -> Result<(), SpecError> {
    let mut ips: BTreeMap<IpAddr, &str> = BTreeMap::new();
    let mut cidrs: Vec<(IpNet, &str)> = Vec::new();
    for (name, n) in &r.nodes {
        let v = node_ips(n);
        if v.is_empty() {
            return Err(invalid("Node", name.clone(), "no InternalIP address"));
        }
        for ip in v {
            if let Some(o) = ips.insert(ip, name) {
                return Err(invalid(
                    "Node",
                    name.clone(),
                    format!("InternalIP {ip} is also node {o}'s"),
                ));
            }
        }
        for c in node_pod_cidrs(n) {
            if let Some((oc, o)) = cidrs.iter().find(|(x, _)| overlaps(x, &c)) {
                return Err(invalid(
                    "Node",
                    name.clone(),
                    format!("pod CIDR {c} overlaps node {o}'s {oc}"),
                ));
            }
            cidrs.push((c, name));
        }
    }
    Ok(())
}

fn resolve_pod(
    a: &mut Alloc,
    r: &Resolved,
    k: &str,
    given: &core::Pod,
    load: &mut BTreeMap<String, usize>,
) -> Result<core::Pod, SpecError> {
    let mut p = given.clone();
    let prev = a.prev.and_then(|r| r.pods.get(k));
    // Scheduling: the given node, else where it ran before, else the least loaded node.
    let node = match pod_node(&p) {
        Some(n) => n.to_string(),
        None => {
            let n = prev
                .and_then(pod_node)
                .filter(|n| r.nodes.contains_key(*n))
                .map(str::to_string)
                .or_else(|| {
                    load.iter()
                        .min_by_key(|(n, c)| (**c, (*n).clone()))
                        .map(|(n, _)| n.clone())
                })
                .ok_or_else(|| invalid("Pod", k, "no node to schedule it on"))?;
            *load.entry(n.clone()).or_default() += 1;
            n
        }
    };
    let node_obj = r
        .nodes
        .get(&node)
        .ok_or_else(|| invalid("Pod", k, format!("node {node} does not exist")))?;
    p.spec.get_or_insert_with(Default::default).node_name = Some(node.clone());

    let mut ips = pod_ips(&p);
    if ips.is_empty() {
        let cidrs = node_pod_cidrs(node_obj);
        let prev_ips: Vec<IpAddr> = prev
            .filter(|pp| pod_node(pp) == Some(node.as_str()))
            .map(pod_ips)
            .unwrap_or_default();
        for c in &cidrs {
            let f = family_of(c);
            let ip = match prev_ips
                .iter()
                .find(|i| Family::of(i) == f && c.contains(*i))
            {
                Some(ip) => *ip,
                None => next_free(c, 2, &a.used_ips).ok_or_else(|| {
                    SpecError::Exhausted(format!("node {node}'s pod CIDR {c} is full"))
                })?,
            };
            a.used_ips.insert(ip);
            ips.push(ip);
        }
    }
    let st = p.status.get_or_insert_with(Default::default);
    st.pod_ip = ips.first().map(|i| i.to_string());
    st.pod_ips = Some(
        ips.iter()
            .map(|i| core::PodIP { ip: i.to_string() })
            .collect(),
    );
    let hips = node_ips(node_obj);
    st.host_ip = hips.first().map(|i| i.to_string());
    st.host_ips = Some(
        hips.iter()
            .map(|i| core::HostIP { ip: i.to_string() })
            .collect(),
    );
    if st.phase.is_none() {
        st.phase = Some("Running".into());
    }
    // A running pod with its servers up is Ready, unless the input says otherwise.
    if st.conditions.is_none() {
        let running = st.phase.as_deref() == Some("Running");
        let status = if running { "True" } else { "False" };
        st.conditions = Some(
            ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
                .iter()
                .map(|t| core::PodCondition {
                    type_: t.to_string(),
                    status: if *t == "PodScheduled" { "True" } else { status }.into(),
                    ..Default::default()
                })
                .collect(),
        );
    }
    Ok(p)
}

fn resolve_service(
    a: &mut Alloc,
    k: &str,
    given: &core::Service,
    used_vips: &mut BTreeMap<IpAddr, String>,
    used_node_ports: &mut BTreeMap<(u16, String), String>,
) -> Result<core::Service, SpecError> {
    let mut s = given.clone();
    let prev = a.prev.and_then(|r| r.services.get(k));
    let spec = s.spec.get_or_insert_with(Default::default);
    let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if !matches!(
        type_.as_str(),
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err(invalid(
            "Service",
            k,
            format!("unknown spec.type {type_:?}"),
        ));
    }
    spec.type_ = Some(type_.clone());
    for p in spec.ports.iter_mut().flatten() {
        if p.protocol.is_none() {
            p.protocol = Some("TCP".into());
        }
        if !matches!(p.protocol.as_deref(), Some("TCP" | "UDP" | "SCTP")) {
            return Err(invalid(
                "Service",
                k,
                format!("unknown protocol {:?}", p.protocol.as_deref().unwrap_or("")),
            ));
        }
        if !(1..=65535).contains(&p.port) {
            return Err(invalid(
                "Service",
                k,
                format!("port {} is not a valid port (1-65535)", p.port),
            ));
        }
        if p.target_port.is_none() {
            p.target_port = Some(IntOrString::Int(p.port));
        }
    }
    if type_ == "ExternalName" {
        return Ok(s);
    }
    let families_cfg = a.cfg.families();
    let given_ips = service_ips(&s);
    let spec = s.spec.as_mut().expect("set above");
    let headless = spec.cluster_ip.as_deref() == Some("None")
        || spec
            .cluster_ips
            .as_ref()
            .is_some_and(|v| v.iter().any(|i| i == "None"));
    // Families: from the given clusterIPs, else spec.ipFamilies, else per ipFamilyPolicy.
    let requested: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| Family::parse(f))
        .collect();
    let policy = spec
        .ip_family_policy
        .clone()
        .unwrap_or_else(|| "SingleStack".into());
    let families: Vec<Family> = if !given_ips.is_empty() {
        given_ips.iter().map(Family::of).collect()
    } else {
        let mut f = requested.clone();
        if f.is_empty() {
            f.push(families_cfg[0]);
        }
        if matches!(policy.as_str(), "PreferDualStack" | "RequireDualStack") {
            for x in &families_cfg {
                if !f.contains(x) {
                    f.push(*x);
                }
            }
        }
        if policy == "SingleStack" {
            f.truncate(1);
        }
        f
    };
    for f in &families {
        if !families_cfg.contains(f) && given_ips.is_empty() {
            return Err(invalid(
                "Service",
                k,
                format!("asks for {} but the lab has no such pod CIDR", f.as_str()),
            ));
        }
    }
    spec.ip_families = Some(families.iter().map(|f| f.as_str().to_string()).collect());
    spec.ip_family_policy = Some(if families.len() > 1 && policy == "SingleStack" {
        "PreferDualStack".into()
    } else {
        policy
    });
    if !headless {
        let mut ips = given_ips.clone();
        if ips.is_empty() {
            let prev_ips = prev.map(service_ips).unwrap_or_default();
            for f in &families {
                let ip = match prev_ips.iter().find(|i| Family::of(i) == *f) {
                    Some(ip) => *ip,
                    None => {
                        let pool = LabConfig::pool(&a.cfg.service_cidrs, *f).ok_or_else(|| {
                            SpecError::Config(format!("no serviceCIDR for {}", f.as_str()))
                        })?;
                        // kube-apiserver keeps the first address for the `kubernetes`
                        // Service; the lab starts at .10 (where DNS usually lives).
                        let used: BTreeSet<IpAddr> = used_vips.keys().copied().collect();
                        next_free(pool, 10, &used).ok_or_else(|| {
                            SpecError::Exhausted(format!("service CIDR {pool} is full"))
                        })?
                    }
                };
                used_vips.insert(ip, k.to_string());
                ips.push(ip);
            }
        }
        spec.cluster_ip = ips.first().map(|i| i.to_string());
        spec.cluster_ips = Some(ips.iter().map(|i| i.to_string()).collect());
    } else {
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
    }

    // NodePorts.
    let wants_node_ports = type_ == "NodePort"
        || (type_ == "LoadBalancer" && spec.allocate_load_balancer_node_ports != Some(false));
    let [lo, hi] = a.cfg.node_port_range;
    let prev_ports: Vec<core::ServicePort> = prev
        .and_then(|p| p.spec.as_ref())
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut alloc_port = |proto: &str, want: Option<u16>| -> Result<u16, SpecError> {
        if let Some(w) = want
            && used_node_ports
                .get(&(w, proto.to_string()))
                .is_none_or(|o| o == k)
        {
            used_node_ports.insert((w, proto.to_string()), k.to_string());
            return Ok(w);
        }
        let n = (lo..=hi)
            .find(|p| !used_node_ports.contains_key(&(*p, proto.to_string())))
            .ok_or_else(|| SpecError::Exhausted(format!("nodePort range {lo}-{hi} is full")))?;
        used_node_ports.insert((n, proto.to_string()), k.to_string());
        Ok(n)
    };
    if wants_node_ports && !headless {
        for p in spec.ports.iter_mut().flatten() {
            if p.node_port.unwrap_or(0) != 0 {
                continue;
            }
            let proto = p.protocol.clone().unwrap_or_default();
            let before = prev_ports
                .iter()
                .find(|pp| pp.port == p.port && pp.protocol.as_deref() == Some(proto.as_str()))
                .and_then(|pp| pp.node_port)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0);
            p.node_port = Some(alloc_port(&proto, before)? as i32);
        }
    }
    if type_ == "LoadBalancer"
        && spec.external_traffic_policy.as_deref() == Some("Local")
        && spec.health_check_node_port.unwrap_or(0) == 0
    {
        let before = prev
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.health_check_node_port)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0);
        spec.health_check_node_port = Some(alloc_port("TCP", before)? as i32);
    }

    // LoadBalancer ingress: what a load-balancer controller would publish.
    if type_ == "LoadBalancer"
        && spec.load_balancer_class.is_none()
        && service_lb_ips(&s).is_empty()
        && !headless
    {
        let spec = s.spec.as_ref().expect("set");
        let mut ips: Vec<IpAddr> = Vec::new();
        if let Some(ip) = spec
            .load_balancer_ip
            .as_deref()
            .filter(|i| !i.is_empty())
            .and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        } else {
            let prev_lb = prev.map(service_lb_ips).unwrap_or_default();
            for f in &families {
                let ip = match prev_lb.iter().find(|i| Family::of(i) == *f) {
                    Some(ip) => *ip,
                    None => {
                        let Some(pool) = LabConfig::pool(&a.cfg.load_balancer_cidrs, *f) else {
                            continue;
                        };
                        let used: BTreeSet<IpAddr> = used_vips.keys().copied().collect();
                        next_free(pool, 10, &used).ok_or_else(|| {
                            SpecError::Exhausted(format!("load balancer CIDR {pool} is full"))
                        })?
                    }
                };
                used_vips.insert(ip, k.to_string());
                ips.push(ip);
            }
        }
        let st = s.status.get_or_insert_with(Default::default);
        st.load_balancer = Some(core::LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|ip| core::LoadBalancerIngress {
                        ip: Some(ip.to_string()),
                        ip_mode: Some("VIP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        });
    }
    Ok(s)
}

/// podutil.FindPort: the container port a Service port targets on this pod. A named
/// targetPort resolves against container ports of that name and the Service port's
/// protocol; a number is used as is.
pub fn find_port(pod: &core::Pod, sp: &core::ServicePort) -> Option<i32> {
    match sp.target_port.as_ref() {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            let proto = sp.protocol.as_deref().unwrap_or("TCP");
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| {
                    cp.name.as_deref() == Some(name.as_str())
                        && cp.protocol.as_deref().unwrap_or("TCP") == proto
                })
                .map(|cp| cp.container_port)
        }
    }
}

/// endpointslice `ShouldPodBeInEndpoints(pod, includeTerminating=true)`.
fn pod_in_endpoints(p: &core::Pod) -> bool {
    if pod_ips(p).is_empty() {
        return false;
    }
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    match p.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) {
        Some("Never") => !matches!(phase, Some("Failed" | "Succeeded")),
        Some("OnFailure") => phase != Some("Succeeded"),
        _ => true,
    }
}

/// The EndpointSlices the EndpointSlice controller would write for `svc` (none for a
/// Service without a selector or of type ExternalName). Pods are grouped by the port
/// numbers their named targetPorts resolve to, one slice per (family, port set).
pub fn derive_slices(
    svc: &core::Service,
    pods: &BTreeMap<String, core::Pod>,
    nodes: &BTreeMap<String, core::Node>,
) -> Vec<discovery::EndpointSlice> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let Some(sel) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    let ns = ns_of(&svc.metadata).to_string();
    let name = svc.metadata.name.clone().unwrap_or_default();
    // getAddressTypesForService.
    let mut families: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| Family::parse(f))
        .collect();
    if families.is_empty() {
        match spec.cluster_ip.as_deref() {
            Some(ip) if ip != "None" && !ip.is_empty() => families.push(
                ip.parse::<IpAddr>()
                    .map(|i| Family::of(&i))
                    .unwrap_or(Family::IPv4),
            ),
            _ => families = vec![Family::IPv4, Family::IPv6],
        }
    }
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let svc_ports = spec.ports.clone().unwrap_or_default();
    let mut out = Vec::new();
    for fam in families {
        // port set (as a sorted list of (name, proto, port)) -> endpoints
        let mut groups: BTreeMap<Vec<(String, String, i32)>, Vec<discovery::Endpoint>> =
            BTreeMap::new();
        for (pk, p) in pods {
            if !pk.starts_with(&format!("{ns}/")) {
                continue;
            }
            if !selector_matches(sel, &meta_labels(&p.metadata)) || !pod_in_endpoints(p) {
                continue;
            }
            let addrs: Vec<String> = pod_ips(p)
                .iter()
                .filter(|i| Family::of(i) == fam)
                .map(|i| i.to_string())
                .collect();
            if addrs.is_empty() {
                continue;
            }
            let ports: Vec<(String, String, i32)> = svc_ports
                .iter()
                .filter_map(|sp| {
                    find_port(p, sp).map(|n| {
                        (
                            sp.name.clone().unwrap_or_default(),
                            sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                            n,
                        )
                    })
                })
                .collect();
            let serving = pod_ready(p);
            let terminating = p.metadata.deletion_timestamp.is_some();
            let ready = publish_not_ready || (serving && !terminating);
            let node = pod_node(p).map(str::to_string);
            let zone = node
                .as_ref()
                .and_then(|n| nodes.get(n))
                .and_then(|n| n.metadata.labels.as_ref())
                .and_then(|l| l.get(LABEL_ZONE))
                .filter(|z| !z.is_empty())
                .cloned();
            groups.entry(ports).or_default().push(discovery::Endpoint {
                addresses: addrs[..1].to_vec(),
                conditions: Some(discovery::EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                node_name: node,
                zone,
                target_ref: Some(core::ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: Some(ns.clone()),
                    name: p.metadata.name.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        if groups.is_empty() {
            // The controller keeps one empty slice per family: "no endpoints".
            groups.insert(Vec::new(), Vec::new());
        }
        for (i, (ports, eps)) in groups.into_iter().enumerate() {
            let mut labels = svc.metadata.labels.clone().unwrap_or_default();
            labels.insert(LABEL_SERVICE_NAME.into(), name.clone());
            labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY_CONTROLLER.into());
            let fam_tag = match fam {
                Family::IPv4 => "v4",
                Family::IPv6 => "v6",
            };
            out.push(discovery::EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(format!("{name}-lab{fam_tag}-{i}")),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_DERIVED.to_string(),
                        "true".to_string(),
                    )])),
                    ..Default::default()
                },
                address_type: fam.as_str().into(),
                endpoints: Some(eps),
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(n, proto, port)| discovery::EndpointPort {
                            name: Some(n),
                            protocol: Some(proto),
                            port: Some(port),
                            app_protocol: None,
                        })
                        .collect(),
                ),
            });
        }
    }
    out
}

impl Resolved {
    /// The objects as multi-document YAML, as the agents read them.
    pub fn to_yaml(&self) -> Result<String, SpecError> {
        let mut out = String::new();
        let mut push = |v: Result<String, serde_yaml::Error>| -> Result<(), SpecError> {
            let s = v.map_err(|e| SpecError::Read(format!("serialising objects: {e}")))?;
            out.push_str("---\n");
            out.push_str(&s);
            Ok(())
        };
        for o in self.namespaces.values() {
            push(serde_yaml::to_string(o))?;
        }
        for o in self.nodes.values() {
            push(serde_yaml::to_string(o))?;
        }
        for o in self.pods.values() {
            push(serde_yaml::to_string(o))?;
        }
        for o in self.services.values() {
            push(serde_yaml::to_string(o))?;
        }
        for o in self.slices.values() {
            push(serde_yaml::to_string(o))?;
        }
        for o in self.policies.values() {
            push(serde_yaml::to_string(o))?;
        }
        Ok(out)
    }

    /// Pods (and endpoint servers) whose address lies outside their node's pod CIDRs:
    /// the fabric needs a host route for each.
    pub fn stray_addresses(&self) -> Vec<(IpAddr, String)> {
        let mut out = Vec::new();
        let inside = |node: &str, ip: &IpAddr| {
            self.nodes
                .get(node)
                .map(node_pod_cidrs)
                .unwrap_or_default()
                .iter()
                .any(|c| c.contains(ip))
        };
        for p in self.pods.values() {
            let node = pod_node(p).unwrap_or_default();
            for ip in pod_ips(p) {
                if !inside(node, &ip) {
                    out.push((ip, node.to_string()));
                }
            }
        }
        for e in self.endpoint_servers.values() {
            if !inside(&e.node, &e.address) {
                out.push((e.address, e.node.clone()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Input {
        let mut l = Loaded::default();
        parse_text(text, "t.yaml", &mut l).unwrap();
        let mut i = Input::default();
        i.apply(l.objects).unwrap();
        i
    }

    fn res(text: &str) -> Resolved {
        resolve(&load(text), &LabConfig::default(), None).unwrap()
    }

    fn slice_eps(r: &Resolved, svc: &str) -> Vec<(String, bool, bool, bool, Option<String>)> {
        let mut v = Vec::new();
        for s in r.slices.values() {
            if s.metadata
                .labels
                .as_ref()
                .unwrap()
                .get(LABEL_SERVICE_NAME)
                .map(String::as_str)
                != Some(svc)
            {
                continue;
            }
            for e in s.endpoints.iter().flatten() {
                let c = e.conditions.clone().unwrap();
                v.push((
                    e.addresses[0].clone(),
                    c.ready.unwrap(),
                    c.serving.unwrap(),
                    c.terminating.unwrap(),
                    e.node_name.clone(),
                ));
            }
        }
        v.sort();
        v
    }

    const TWO_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{containerPort: 8080, name: http}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: web}}
spec:
  nodeName: n2
  containers: [{name: c, ports: [{containerPort: 9090, name: http}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  selector: {app: web}
  ports: [{name: p, port: 80, targetPort: http}]
"#;

    #[test]
    fn implied_nodes_get_addresses_and_pod_cidrs_and_pods_get_ips() {
        let r = res(TWO_PODS);
        assert_eq!(r.nodes.keys().collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(
            node_ips(&r.nodes["n1"]),
            ["192.168.100.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            node_ips(&r.nodes["n2"]),
            ["192.168.100.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            node_pod_cidrs(&r.nodes["n1"]),
            ["10.244.0.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            node_pod_cidrs(&r.nodes["n2"]),
            ["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            pod_ips(&r.pods["x/a"]),
            ["10.244.0.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            pod_ips(&r.pods["x/b"]),
            ["10.244.1.2".parse::<IpAddr>().unwrap()]
        );
        assert!(pod_ready(&r.pods["x/a"]));
        assert_eq!(
            r.namespaces["x"].metadata.labels.as_ref().unwrap()[LABEL_NS_NAME],
            "x"
        );
        assert_eq!(
            service_ips(&r.services["x/web"]),
            ["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn named_target_ports_resolve_per_pod_into_separate_slices() {
        let r = res(TWO_PODS);
        let derived: Vec<_> = r.slices.values().collect();
        assert_eq!(derived.len(), 2, "one slice per distinct port mapping");
        let mut ports: Vec<i32> = derived
            .iter()
            .map(|s| s.ports.as_ref().unwrap()[0].port.unwrap())
            .collect();
        ports.sort();
        assert_eq!(ports, [8080, 9090]);
        for s in derived {
            assert_eq!(s.ports.as_ref().unwrap()[0].name.as_deref(), Some("p"));
            assert_eq!(
                s.metadata.labels.as_ref().unwrap()[LABEL_SERVICE_NAME],
                "web"
            );
        }
    }

    #[test]
    fn given_values_are_honoured_exactly() {
        let r = res(r#"
kind: Node
apiVersion: v1
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
spec: {podCIDR: 10.244.7.0/24}
status: {addresses: [{type: InternalIP, address: 172.18.0.5}]}
---
kind: Pod
apiVersion: v1
metadata: {name: a, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.9.9.9}
---
kind: Service
apiVersion: v1
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.5.5
  selector: {app: web}
  ports: [{port: 80, nodePort: 31234}, {port: 81, protocol: UDP}]
"#);
        assert_eq!(
            node_ips(&r.nodes["n1"]),
            ["172.18.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            node_pod_cidrs(&r.nodes["n1"]),
            ["10.244.7.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            pod_ips(&r.pods["default/a"]),
            ["10.9.9.9".parse::<IpAddr>().unwrap()]
        );
        let svc = &r.services["default/web"];
        assert_eq!(service_ips(svc), ["10.96.5.5".parse::<IpAddr>().unwrap()]);
        let ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
        assert_eq!(ports[0].node_port, Some(31234));
        assert_eq!(
            ports[1].node_port,
            Some(30000),
            "allocated from the range start"
        );
        // The pod outside its node's CIDR needs a fabric host route.
        assert_eq!(
            r.stray_addresses(),
            [("10.9.9.9".parse().unwrap(), "n1".to_string())]
        );
        // Zone flows into derived endpoints.
        let s = r.slices.values().next().unwrap();
        assert_eq!(s.endpoints.as_ref().unwrap()[0].zone.as_deref(), Some("z1"));
    }

    #[test]
    fn readiness_and_termination_follow_the_endpointslice_controller() {
        let r = res(r#"
kind: Pod
apiVersion: v1
metadata: {name: ready, labels: {app: w}}
spec: {nodeName: n1, containers: [{name: c}]}
---
kind: Pod
apiVersion: v1
metadata: {name: unready, labels: {app: w}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {conditions: [{type: Ready, status: "False"}]}
---
kind: Pod
apiVersion: v1
metadata: {name: terminating, labels: {app: w}, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {nodeName: n1, containers: [{name: c}]}
---
kind: Pod
apiVersion: v1
metadata: {name: done, labels: {app: w}}
spec: {nodeName: n1, restartPolicy: Never, containers: [{name: c}]}
status: {phase: Succeeded}
---
kind: Pod
apiVersion: v1
metadata: {name: other, labels: {app: other}}
spec: {nodeName: n1, containers: [{name: c}]}
---
kind: Service
apiVersion: v1
metadata: {name: w}
spec: {selector: {app: w}, ports: [{port: 80}]}
"#);
        let ip = |n: &str| pod_ips(&r.pods[&format!("default/{n}")])[0].to_string();
        let n1 = Some("n1".to_string());
        assert_eq!(slice_eps(&r, "w"), {
            let mut v = vec![
                (ip("ready"), true, true, false, n1.clone()),
                (ip("unready"), false, false, false, n1.clone()),
                (ip("terminating"), false, true, true, n1.clone()),
            ];
            v.sort();
            v
        });
    }

    #[test]
    fn given_slices_win_and_their_podless_addresses_get_servers() {
        let r = res(r#"
kind: Pod
apiVersion: v1
metadata: {name: a, labels: {app: w}}
spec: {nodeName: n1, containers: [{name: c}]}
---
kind: Service
apiVersion: v1
metadata: {name: w}
spec: {clusterIP: 10.96.0.50, selector: {app: w}, ports: [{name: http, port: 80}]}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: w-1, labels: {kubernetes.io/service-name: w}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [10.0.1.5]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n2
- addresses: [10.244.0.2]
  nodeName: n1
"#);
        assert_eq!(
            r.slices.keys().collect::<Vec<_>>(),
            ["default/w-1"],
            "no derived slice"
        );
        // Given endpoint addresses are reserved before pods are allocated: pod a gets
        // .3, and 10.244.0.2 (no pod) gets a server of its own.
        assert_eq!(
            pod_ips(&r.pods["default/a"]),
            ["10.244.0.3".parse::<IpAddr>().unwrap()]
        );
        let servers: Vec<_> = r.endpoint_servers.values().collect();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].address.to_string(), "10.0.1.5");
        assert_eq!(servers[0].node, "n2");
        assert_eq!(
            servers[0]
                .ports
                .iter()
                .map(|p| (p.port, p.protocol.as_str()))
                .collect::<Vec<_>>(),
            [(53, "UDP"), (8080, "TCP")]
        );
        assert!(
            r.nodes.contains_key("n2"),
            "node named by an endpoint is created"
        );
        assert_eq!(
            r.stray_addresses(),
            [("10.0.1.5".parse().unwrap(), "n2".to_string())]
        );
    }

    #[test]
    fn endpoint_address_of_a_pod_gets_no_extra_server() {
        let r = res(r#"
kind: Pod
apiVersion: v1
metadata: {name: a}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.9}
---
kind: EndpointSlice
apiVersion: discovery.k8s.io/v1
metadata: {name: w-1, labels: {kubernetes.io/service-name: w}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.9], nodeName: n1}]
"#);
        assert!(r.endpoint_servers.is_empty());
    }

    #[test]
    fn allocations_survive_reapply_and_new_objects_do_not_steal_them() {
        let cfg = LabConfig::default();
        let first = resolve(&load(TWO_PODS), &cfg, None).unwrap();
        // Re-apply with a label change and a new pod scheduled by the lab.
        let mut input = load(TWO_PODS);
        input.pods.get_mut("x/a").unwrap().metadata.labels =
            Some(BTreeMap::from([("app".into(), "other".into())]));
        input
            .apply(
                load("kind: Pod\napiVersion: v1\nmetadata: {name: c, namespace: x}\nspec: {containers: [{name: c}]}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: v, namespace: x}\nspec: {ports: [{port: 1}]}\n")
                    .pods
                    .into_values()
                    .map(|p| Object::Pod(Box::new(p)))
                    .collect(),
            )
            .unwrap();
        input.services.insert(
            "x/v".into(),
            serde_yaml::from_str("metadata: {name: v, namespace: x}\nspec: {ports: [{port: 1}]}")
                .unwrap(),
        );
        let second = resolve(&input, &cfg, Some(&first)).unwrap();
        assert_eq!(pod_ips(&second.pods["x/a"]), pod_ips(&first.pods["x/a"]));
        assert_eq!(
            service_ips(&second.services["x/web"]),
            service_ips(&first.services["x/web"])
        );
        assert_eq!(
            service_ips(&second.services["x/v"])[0].to_string(),
            "10.96.0.11"
        );
        // Pod c was scheduled on a least-loaded node and got a fresh address there.
        let c = &second.pods["x/c"];
        assert_eq!(pod_node(c), Some("n1"));
        assert_eq!(pod_ips(c)[0].to_string(), "10.244.0.3");
        // The label change took pod a out of the Service's endpoints.
        let eps: Vec<String> = second
            .slices
            .values()
            .flat_map(|s| s.endpoints.iter().flatten())
            .map(|e| e.addresses[0].clone())
            .collect();
        assert_eq!(eps, ["10.244.1.2"]);
    }

    #[test]
    fn conflicts_are_errors_naming_the_objects() {
        let e = resolve(
            &load(
                "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {nodeName: n, containers: []}\nstatus: {podIP: 10.244.0.5}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: b}\nspec: {nodeName: n, containers: []}\nstatus: {podIP: 10.244.0.5}\n",
            ),
            &LabConfig::default(),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pod default/b: IP 10.244.0.5 is also the IP of pod default/a"
        );
        let e = resolve(
            &load("kind: Service\napiVersion: v1\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 1}]}\n"),
            &LabConfig::default(),
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("already used by Service default/a"),
            "{e}"
        );
    }

    #[test]
    fn load_balancer_and_health_check_ports_are_allocated() {
        let r = res(
            "kind: Service\napiVersion: v1\nmetadata: {name: lb}\nspec: {type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}\n",
        );
        let s = &r.services["default/lb"];
        assert_eq!(service_lb_ips(s)[0].to_string(), "198.51.100.10");
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.ports.as_ref().unwrap()[0].node_port, Some(30000));
        assert_eq!(spec.health_check_node_port, Some(30001));
        assert_eq!(spec.ip_families.as_ref().unwrap(), &["IPv4"]);
    }

    #[test]
    fn dual_stack_config_and_services() {
        let cfg = LabConfig::build(
            None,
            &[
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(cfg.service_cidrs.len(), 2);
        let r = resolve(
            &load(
                "kind: Pod\napiVersion: v1\nmetadata: {name: a, labels: {app: w}}\nspec: {nodeName: n1, containers: []}\n---\nkind: Service\napiVersion: v1\nmetadata: {name: w}\nspec: {ipFamilyPolicy: PreferDualStack, selector: {app: w}, ports: [{port: 80}]}\n",
            ),
            &cfg,
            None,
        )
        .unwrap();
        let ips: Vec<String> = pod_ips(&r.pods["default/a"])
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["10.244.0.2", "fd00:10:244::2"]);
        let n: Vec<String> = node_ips(&r.nodes["n1"])
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(n, ["192.168.100.2", "fd00:100::2"]);
        let v: Vec<String> = service_ips(&r.services["default/w"])
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(v, ["10.96.0.10", "fd00:10:96::a"]);
        let fams: Vec<&str> = r.slices.values().map(|s| s.address_type.as_str()).collect();
        assert_eq!(fams, ["IPv4", "IPv6"]);
    }

    #[test]
    fn config_document_and_checks() {
        let mut l = Loaded::default();
        parse_text(
            "apiVersion: weir.dev/v1alpha1\nkind: LabConfig\npodCIDRs: [10.100.0.0/16]\nserviceCIDRs: [10.200.0.0/16]\nnodePortRange: 31000-31010\n---\nkind: ConfigMap\nmetadata: {name: x}\n",
            "c.yaml",
            &mut l,
        )
        .unwrap();
        let c = LabConfig::build(l.config.as_ref(), &[], &[]).unwrap();
        assert_eq!(c.pod_cidrs[0].to_string(), "10.100.0.0/16");
        assert_eq!(c.service_cidrs[0].to_string(), "10.200.0.0/16");
        assert_eq!(c.node_port_range, [31000, 31010]);
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        let e = LabConfig::build(None, &["10.96.0.0/12".parse().unwrap()], &[]).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn delete_by_kind_namespace_name() {
        let mut i = load(TWO_PODS);
        let c = i.delete("pod/x/a").unwrap();
        assert_eq!(c[0].key, "x/a");
        assert!(!i.pods.contains_key("x/a"));
        assert!(
            i.delete("Pod/x/a")
                .unwrap_err()
                .to_string()
                .contains("no such Pod x/a")
        );
        assert!(
            i.delete("svc/web").is_err(),
            "namespaced kinds need a namespace"
        );
        let c = i.delete("namespace/x").unwrap();
        assert!(i.pods.is_empty() && i.services.is_empty());
        assert!(c.iter().any(|c| c.kind == "Service" && c.key == "x/web"));
    }

    #[test]
    fn names_are_checked_like_the_api_server_does() {
        let mut l = Loaded::default();
        parse_text(
            "kind: Pod\napiVersion: v1\nmetadata: {name: Web_1}\nspec: {containers: []}\n",
            "t",
            &mut l,
        )
        .unwrap();
        let e = Input::default().apply(l.objects).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Pod Web_1: metadata.name must be"),
            "{e}"
        );
        let mut l = Loaded::default();
        parse_text(
            "kind: Pod\napiVersion: v1\nmetadata: {name: a, namespace: x.y}\nspec: {containers: []}\n",
            "t",
            &mut l,
        )
        .unwrap();
        assert!(Input::default().apply(l.objects).is_err());
        assert!(dns_subdomain("node-1.example.com") && !dns_label("a.b") && !dns_label("-a"));
        let e = resolve(
            &load("kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {nodeName: N1, containers: []}\n"),
            &LabConfig::default(),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("not a valid node name"), "{e}");
    }

    #[test]
    fn unscheduled_pods_spread_over_nodes() {
        let r = res(
            "kind: Node\napiVersion: v1\nmetadata: {name: n1}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: n2}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: []}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: b}\nspec: {containers: []}\n",
        );
        let nodes: BTreeSet<&str> = r.pods.values().filter_map(pod_node).collect();
        assert_eq!(nodes.len(), 2);
    }
}
