//! The JSON `up`, `apply`, `delete` and `status` print (documented in docs/lab.md; a
//! public interface: add fields, never rename or remove them).

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::{
    spec::{self, Change, PortSpec},
    state::{Proc, WorkloadRt},
    topology::{EXTERNAL_V4, EXTERNAL_V6, Lab},
};

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcView {
    pub pid: u32,
    pub running: bool,
    pub log: String,
}

fn proc_view(p: &Option<Proc>, log: &std::path::Path) -> Option<ProcView> {
    p.as_ref().map(|p| ProcView {
        pid: p.pid,
        running: p.alive(),
        log: log.display().to_string(),
    })
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    #[serde(flatten)]
    pub process: Option<ProcView>,
    /// The generation the agent reports programmed (CONFIG.generation).
    pub programmed_generation: u64,
    pub pin_dir: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    pub netns: String,
    #[serde(rename = "internalIPs")]
    pub internal_ips: Vec<IpAddr>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
    pub cgroup: String,
    pub agent: AgentView,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    pub netns: String,
    /// The identity server (absent when the pod declares no ports).
    pub server: Option<ProcView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointServerView {
    pub address: IpAddr,
    pub node: String,
    pub ports: Vec<PortSpec>,
    pub slices: Vec<String>,
    pub netns: String,
    pub server: Option<ProcView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortView {
    pub name: String,
    pub protocol: String,
    pub port: i32,
    /// A number or a container port name.
    pub target_port: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    pub address: String,
    /// Conditions with the API's defaults applied (unset ready/serving: true; unset
    /// terminating: false).
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `namespace/name` of the pod (targetRef), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub ports: Vec<PortSpec>,
    /// The EndpointSlice it comes from.
    pub slice: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    pub headless: bool,
    pub ports: Vec<ServicePortView>,
    #[serde(rename = "externalIPs")]
    pub external_ips: Vec<IpAddr>,
    #[serde(rename = "loadBalancerIPs")]
    pub load_balancer_ips: Vec<IpAddr>,
    pub external_traffic_policy: String,
    pub internal_traffic_policy: String,
    /// LoadBalancer + externalTrafficPolicy Local: the port of the node's health check
    /// server for this Service (served by every node's agent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
    /// "derived" (from the selector, as the EndpointSlice controller would), "given"
    /// (EndpointSlices in the input), or "none" (no selector and no slices).
    pub endpoint_slices: &'static str,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalView {
    pub netns: Option<String>,
    /// Source addresses used when `--from external` names none.
    pub default_sources: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigView {
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNet>,
    #[serde(rename = "serviceCIDRs")]
    pub service_cidrs: Vec<IpNet>,
    #[serde(rename = "nodeCIDRs")]
    pub node_cidrs: Vec<IpNet>,
    #[serde(rename = "loadBalancerCIDRs")]
    pub load_balancer_cidrs: Vec<IpNet>,
    pub node_port_range: String,
}

/// What `up`, `apply`, `delete` and `status` print (one per lab).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LabView {
    pub lab: String,
    pub state_dir: String,
    /// Generation of the objects last published to the agents.
    pub generation: u64,
    /// Whether every agent runs and reports `generation` programmed.
    pub programmed: bool,
    pub config: ConfigView,
    pub nodes: Vec<NodeView>,
    pub pods: Vec<PodView>,
    pub services: Vec<ServiceView>,
    /// Servers of EndpointSlice addresses that belong to no pod.
    pub endpoint_servers: Vec<EndpointServerView>,
    /// `namespace/name` of every NetworkPolicy (passed to the agents as given).
    pub network_policies: Vec<String>,
    pub external: ExternalView,
    pub warnings: Vec<String>,
    /// `apply` and `delete`: what changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<Vec<Change>>,
}

fn split_key(k: &str) -> (String, String) {
    let (a, b) = k.split_once('/').unwrap_or(("", k));
    (a.to_string(), b.to_string())
}

fn workload_server(w: Option<&WorkloadRt>) -> Option<ProcView> {
    w.and_then(|w| proc_view(&w.server, &w.log))
}

pub fn lab_view(lab: &Lab, changes: Option<Vec<Change>>) -> LabView {
    let st = &lab.state;
    let empty = spec::Resolved::default();
    let r = st.resolved.as_ref().unwrap_or(&empty);
    let nodes: Vec<NodeView> = st
        .nodes
        .iter()
        .map(|(name, n)| NodeView {
            name: name.clone(),
            netns: n.netns.clone(),
            internal_ips: n.ips.clone(),
            pod_cidrs: n.pod_cidrs.clone(),
            labels: r
                .nodes
                .get(name)
                .and_then(|o| o.metadata.labels.clone())
                .unwrap_or_default(),
            cgroup: n.cgroup.display().to_string(),
            agent: AgentView {
                process: proc_view(&n.agent, &n.log),
                programmed_generation: lab.programmed(name),
                pin_dir: n.pin_dir.display().to_string(),
            },
        })
        .collect();
    // Without a dataplane (`dataplane: none`) there is nothing to program: the lab is
    // ready once its topology exists.
    let programmed = !nodes.is_empty()
        && (st.config.dataplane == spec::Dataplane::None
            || nodes.iter().all(|n| {
                n.agent.process.as_ref().is_some_and(|p| p.running)
                    && n.agent.programmed_generation >= st.generation
            }));
    let pods = r
        .pods
        .iter()
        .map(|(k, p)| {
            let (ns, name) = split_key(k);
            let w = st.pods.get(k);
            PodView {
                namespace: ns,
                name,
                node: spec::pod_node(p).unwrap_or_default().to_string(),
                ips: spec::pod_ips(p),
                ready: spec::pod_ready(p),
                labels: p.metadata.labels.clone().unwrap_or_default(),
                ports: spec::pod_ports(p),
                netns: w.map(|w| w.netns.clone()).unwrap_or_default(),
                server: workload_server(w),
            }
        })
        .collect();
    // The slices of each Service, indexed once: a scan of every slice per Service would
    // make the view quadratic (50k Services took minutes).
    let mut slices_of: BTreeMap<(&str, &str), Vec<(&String, &SliceObj)>> = BTreeMap::new();
    for (sk, sl) in &r.slices {
        if let Some(svc) = sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(spec::LABEL_SERVICE_NAME))
        {
            slices_of
                .entry((spec::ns_of(&sl.metadata), svc.as_str()))
                .or_default()
                .push((sk, sl));
        }
    }
    let services = r
        .services
        .iter()
        .map(|(k, s)| {
            let (ns, name) = split_key(k);
            let slices = slices_of
                .get(&(ns.as_str(), name.as_str()))
                .map_or(&[][..], Vec::as_slice);
            service_view(k, s, slices)
        })
        .collect();
    let endpoint_servers = r
        .endpoint_servers
        .values()
        .map(|e| {
            let w = st.endpoints.get(&e.address.to_string());
            EndpointServerView {
                address: e.address,
                node: e.node.clone(),
                ports: e.ports.iter().cloned().collect(),
                slices: e.slices.iter().cloned().collect(),
                netns: w.map(|w| w.netns.clone()).unwrap_or_default(),
                server: workload_server(w),
            }
        })
        .collect();
    let fams = st.config.families();
    LabView {
        lab: st.name.clone(),
        state_dir: lab.dir.display().to_string(),
        generation: st.generation,
        programmed,
        config: ConfigView {
            pod_cidrs: st.config.pod_cidrs.clone(),
            service_cidrs: st.config.service_cidrs.clone(),
            node_cidrs: st.config.node_cidrs.clone(),
            load_balancer_cidrs: st.config.load_balancer_cidrs.clone(),
            node_port_range: format!(
                "{}-{}",
                st.config.node_port_range[0], st.config.node_port_range[1]
            ),
        },
        nodes,
        pods,
        services,
        endpoint_servers,
        network_policies: r.policies.keys().cloned().collect(),
        external: ExternalView {
            netns: st.external.clone(),
            default_sources: fams
                .iter()
                .map(|f| match f {
                    spec::Family::IPv4 => EXTERNAL_V4.to_string(),
                    spec::Family::IPv6 => EXTERNAL_V6.to_string(),
                })
                .collect(),
        },
        warnings: r.warnings.clone(),
        changes,
    }
}

type SliceObj = k8s_openapi::api::discovery::v1::EndpointSlice;

/// One Service with its EndpointSlices (`slices`: those labelled with its name in its
/// namespace).
fn service_view(
    k: &str,
    s: &k8s_openapi::api::core::v1::Service,
    slices: &[(&String, &SliceObj)],
) -> ServiceView {
    let (ns, name) = split_key(k);
    let spec_ = s.spec.clone().unwrap_or_default();
    let headless = spec_.cluster_ip.as_deref() == Some("None");
    let mut derived = false;
    let mut endpoints = Vec::new();
    for (sk, sl) in slices.iter().copied() {
        derived |= sl
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(spec::ANNOTATION_DERIVED));
        let ports: Vec<PortSpec> = sl
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(PortSpec {
                    name: p.name.clone(),
                    port: u16::try_from(p.port?).ok()?,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                })
            })
            .collect();
        for e in sl.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            for a in &e.addresses {
                endpoints.push(EndpointView {
                    address: a.clone(),
                    ready: c.ready.unwrap_or(true),
                    serving: c.serving.unwrap_or(true),
                    terminating: c.terminating.unwrap_or(false),
                    node: e.node_name.clone(),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|t| t.kind.as_deref() == Some("Pod"))
                        .map(|t| {
                            format!(
                                "{}/{}",
                                t.namespace.clone().unwrap_or_else(|| ns.clone()),
                                t.name.clone().unwrap_or_default()
                            )
                        }),
                    ports: ports.clone(),
                    slice: sk.clone(),
                });
            }
        }
    }
    ServiceView {
        namespace: ns.clone(),
        name: name.clone(),
        type_: spec_.type_.clone().unwrap_or_else(|| "ClusterIP".into()),
        cluster_ips: spec::service_ips(s),
        headless,
        ports: spec_
            .ports
            .iter()
            .flatten()
            .map(|p| ServicePortView {
                name: p.name.clone().unwrap_or_default(),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port: p.port,
                target_port: match &p.target_port {
                    Some(IntOrString::Int(n)) => (*n).into(),
                    Some(IntOrString::String(s)) => s.clone().into(),
                    None => p.port.into(),
                },
                node_port: p.node_port,
            })
            .collect(),
        external_ips: spec::service_external_ips(s),
        load_balancer_ips: spec::service_lb_ips(s),
        external_traffic_policy: spec_
            .external_traffic_policy
            .clone()
            .unwrap_or_else(|| "Cluster".into()),
        health_check_node_port: spec_
            .health_check_node_port
            .filter(|p| *p > 0)
            .map(|p| p as u16),
        internal_traffic_policy: spec_
            .internal_traffic_policy
            .clone()
            .unwrap_or_else(|| "Cluster".into()),
        endpoint_slices: if derived {
            "derived"
        } else if has_given(slices) {
            "given"
        } else {
            "none"
        },
        endpoints,
    }
}

/// Whether some of the Service's slices were given (not derived by the lab).
fn has_given(slices: &[(&String, &SliceObj)]) -> bool {
    slices.iter().any(|(_, sl)| {
        !sl.metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(spec::ANNOTATION_DERIVED))
    })
}
