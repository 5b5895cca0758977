//! Plain mirrors of the Kubernetes objects weir consumes. Field meanings and defaults
//! follow the core/v1 and discovery/v1 API; conversion from the API types lives in the
//! agent (`agent/src/source/convert.rs`) so that this crate stays free of kube types.

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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub internal_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

/// Everything the pipeline reads, as one consistent snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub services: BTreeMap<ObjRef, Service>,
    pub slices: BTreeMap<ObjRef, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
}
