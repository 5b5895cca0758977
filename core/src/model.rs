//! Plain mirrors of the Kubernetes objects weir consumes. Field meanings and defaults
//! follow the core/v1, discovery/v1 and networking/v1 API; conversion from the API types
//! lives in the agent (`agent/src/source/convert.rs`) so that this crate stays free of
//! kube types. API defaulting (NetworkPolicy `policyTypes`, port `protocol`, the
//! namespace name label) is applied by the conversion, so these types hold what the API
//! server would have stored.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ObjRef {
    pub namespace: String,
    pub name: String,
}

impl ObjRef {
    pub fn new(ns: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: ns.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum Protocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::TCP => weir_common::proto::TCP,
            Protocol::UDP => weir_common::proto::UDP,
            Protocol::SCTP => weir_common::proto::SCTP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            weir_common::proto::TCP => Some(Protocol::TCP),
            weir_common::proto::UDP => Some(Protocol::UDP),
            weir_common::proto::SCTP => Some(Protocol::SCTP),
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::TCP),
            "UDP" => Some(Protocol::UDP),
            "SCTP" => Some(Protocol::SCTP),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::TCP => "TCP",
            Protocol::UDP => "UDP",
            Protocol::SCTP => "SCTP",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// 0 when none was allocated.
    pub node_port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LbIpMode {
    /// The node captures the load balancer IP (the default).
    #[default]
    VIP,
    /// The load balancer proxies: the node must not capture the IP.
    Proxy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbIngress {
    pub ip: IpAddr,
    pub ip_mode: LbIpMode,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Service {
    pub id: ObjRef,
    pub type_: ServiceType,
    /// spec.clusterIPs; empty or "None" (headless) means no ClusterIP.
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePort>,
    pub external_ips: Vec<IpAddr>,
    pub lb_ingress: Vec<LbIngress>,
    pub lb_source_ranges: Vec<ipnet::IpNet>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// sessionAffinity ClientIP: the timeout in seconds.
    pub session_affinity_timeout_s: Option<u32>,
    pub health_check_node_port: u16,
    /// spec.trafficDistribution (e.g. "PreferClose").
    pub traffic_distribution: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// conditions.ready/serving/terminating as given (None = not set; see
    /// `services::conditions` for the defaults).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// hints.forZones; None when the endpoint carries no hints.
    pub hint_zones: Option<Vec<String>>,
    /// hints.forNodes.
    pub hint_nodes: Option<Vec<String>>,
    pub target_pod: Option<ObjRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AddressType {
    #[default]
    IPv4,
    IPv6,
    FQDN,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct EndpointSlice {
    pub id: ObjRef,
    /// The kubernetes.io/service-name label.
    pub service: Option<String>,
    pub address_type: AddressType,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation as Unix time in
    /// nanoseconds: when the change behind this version of the slice happened (a Pod or
    /// Service update), as the EndpointSlice controller recorded it. kube-proxy measures
    /// its network programming latency from it (pkg/proxy/endpointslicecache.go).
    #[serde(default)]
    pub trigger_time_unix_ns: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub internal_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// The node has a deletion timestamp or the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint: kube-proxy's node health (`/healthz` on
    /// 10256) reports it not eligible.
    #[serde(default)]
    pub being_deleted: bool,
}

/// The label the control plane puts on every namespace, with the namespace's name as
/// value (immutable; the only way to select a namespace by name).
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

pub type Labels = BTreeMap<String, String>;

/// A metav1.LabelSelector. `matchLabels` and every `matchExpressions` entry are ANDed;
/// the empty selector matches everything.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SelectorOp {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: SelectorOp,
    /// A set: non-empty for In/NotIn, empty for Exists/DoesNotExist (validated on
    /// conversion).
    pub values: Vec<String>,
}

impl LabelSelectorRequirement {
    /// The metav1 rules (apimachinery labels.Requirement.Matches): `NotIn` and
    /// `DoesNotExist` also match objects that lack the key.
    pub fn matches(&self, labels: &Labels) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            SelectorOp::In => v.is_some_and(|v| self.values.contains(v)),
            SelectorOp::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            SelectorOp::Exists => v.is_some(),
            SelectorOp::DoesNotExist => v.is_none(),
        }
    }
}

impl LabelSelector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// A named or unnamed container port of a pod (spec.containers[].ports[]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContainerPort {
    /// Empty when the port has no name.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub enum PodPhase {
    Pending,
    #[default]
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Pod {
    pub id: ObjRef,
    pub labels: Labels,
    /// spec.nodeName (None while unscheduled).
    pub node_name: Option<String>,
    /// status.podIPs (status.podIP when podIPs is absent), at most one per family.
    pub ips: Vec<IpAddr>,
    /// Ports of spec.containers, in spec order.
    pub ports: Vec<ContainerPort>,
    /// spec.hostNetwork: such a pod shares its node's addresses; weir treats its traffic
    /// as the node's (NetworkPolicy concepts page, "NetworkPolicy and hostNetwork pods",
    /// option 2): it is not a policy endpoint and no selector matches it.
    pub host_network: bool,
    /// status.phase (Running when absent).
    pub phase: PodPhase,
}

impl Pod {
    /// Whether NetworkPolicy treats this pod as a pod: not host-network, and not finished
    /// (a Succeeded or Failed pod has released its IP, which another pod may now hold).
    pub fn is_policy_endpoint(&self) -> bool {
        !self.host_network && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }

    /// Numbers of the container ports with this name and protocol (API validation makes
    /// names unique in a pod, so at most one in practice).
    pub fn named_port(&self, name: &str, protocol: Protocol) -> impl Iterator<Item = u16> + '_ {
        let name = name.to_string();
        self.ports
            .iter()
            .filter(move |p| !p.name.is_empty() && p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Namespace {
    pub name: String,
    /// Includes `kubernetes.io/metadata.name` (conversion adds it as the API server does).
    pub labels: Labels,
}

/// The directions a policy applies to (spec.policyTypes after defaulting: `Ingress`
/// always, plus `Egress` when spec.egress is non-empty; pkg/apis/networking/v1/defaults.go).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

/// A port of a NetworkPolicy rule (NetworkPolicyPort), after defaulting (protocol TCP).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyPort {
    pub protocol: Protocol,
    pub port: PortMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PortMatch {
    /// `port` absent: every port of the protocol.
    Any,
    /// `port` (and `endPort`): the inclusive range; a single port is `Range(p, p)`.
    Range(u16, u16),
    /// A named port: the container port of that name and protocol on the pod at the
    /// policy's end: the selected pod for ingress, the destination pod for egress.
    Named(String),
}

/// An ipBlock peer: addresses in `cidr` and in none of `except` (host bits cleared).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IpBlock {
    pub cidr: ipnet::IpNet,
    pub except: Vec<ipnet::IpNet>,
}

impl IpBlock {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// A NetworkPolicyPeer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyPeer {
    /// podSelector and/or namespaceSelector (at least one is Some). `namespace: None`
    /// means the policy's own namespace; `pod: None` means every pod.
    Selector {
        namespace: Option<LabelSelector>,
        pod: Option<LabelSelector>,
    },
    IpBlock(IpBlock),
}

/// One ingress rule (`from` as `peers`) or egress rule (`to` as `peers`). Empty `peers`
/// matches every address, empty `ports` every port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct PolicyRule {
    pub peers: Vec<PolicyPeer>,
    pub ports: Vec<PolicyPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkPolicy {
    pub id: ObjRef,
    /// spec.podSelector (`{}` selects every pod of the namespace).
    pub pod_selector: LabelSelector,
    pub policy_types: PolicyTypes,
    pub ingress: Vec<PolicyRule>,
    pub egress: Vec<PolicyRule>,
}

/// Everything the pipeline reads, as one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub services: BTreeMap<ObjRef, Service>,
    pub slices: BTreeMap<ObjRef, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<ObjRef, Pod>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub policies: BTreeMap<ObjRef, NetworkPolicy>,
}

impl Cluster {
    /// The labels of namespace `ns`. A namespace missing from the snapshot (possible with
    /// a directory source) has just the name label the API server would give it.
    pub fn namespace_labels(&self, ns: &str) -> std::borrow::Cow<'_, Labels> {
        match self.namespaces.get(ns) {
            Some(n) => std::borrow::Cow::Borrowed(&n.labels),
            None => std::borrow::Cow::Owned(Labels::from([(
                LABEL_NAMESPACE_NAME.to_string(),
                ns.to_string(),
            )])),
        }
    }
}
