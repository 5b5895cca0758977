//! Kubernetes API objects (k8s-openapi) -> weir-core's plain model.
//!
//! Defaults are the API's: Service type ClusterIP, port protocol TCP, traffic policies
//! Cluster, sessionAffinity timeout 10800 s; EndpointSlice conditions stay `None` when
//! unset (translation applies the kube-proxy defaults); NetworkPolicy `policyTypes` and
//! port protocols are defaulted as the API server does, and namespaces get their
//! `kubernetes.io/metadata.name` label. Invalid input is an error that
//! names the object and the field; the caller skips that object and counts it.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
};
use weir_core::{model::*, services::DEFAULT_AFFINITY_TIMEOUT_S};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{kind} {object}: {reason}")]
pub struct ConvertError {
    pub kind: &'static str,
    pub object: String,
    pub reason: String,
}

impl ConvertError {
    pub fn metric_label(&self) -> &'static str {
        "invalid_object"
    }
}

fn objref(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjRef {
    ObjRef::new(
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn protocol(kind: &'static str, obj: &ObjRef, p: Option<&str>) -> Result<Protocol, ConvertError> {
    let p = p.unwrap_or("TCP");
    Protocol::parse(p).ok_or_else(|| ConvertError {
        kind,
        object: obj.to_string(),
        reason: format!("unknown protocol {p:?} (expected TCP, UDP or SCTP)"),
    })
}

fn port_u16(kind: &'static str, obj: &ObjRef, what: &str, p: i32) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| ConvertError {
        kind,
        object: obj.to_string(),
        reason: format!("{what} {p} is not a valid port (0-65535)"),
    })
}

fn parse_ip(kind: &'static str, obj: &ObjRef, what: &str, s: &str) -> Result<IpAddr, ConvertError> {
    s.trim().parse().map_err(|_| ConvertError {
        kind,
        object: obj.to_string(),
        reason: format!("{what} {s:?} is not an IP address"),
    })
}

pub fn service(s: &core::Service) -> Result<Service, ConvertError> {
    const K: &str = "Service";
    let id = objref(&s.metadata);
    if id.name.is_empty() {
        return Err(ConvertError {
            kind: K,
            object: id.to_string(),
            reason: "metadata.name is empty".into(),
        });
    }
    let spec = s.spec.clone().unwrap_or_default();
    let type_ = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => {
            return Err(ConvertError {
                kind: K,
                object: id.to_string(),
                reason: format!("unknown spec.type {other:?}"),
            });
        }
    };
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        ips.push(ip.clone());
    }
    let headless = ips.iter().any(|i| i == "None");
    let cluster_ips = if headless {
        Vec::new()
    } else {
        ips.iter()
            .filter(|i| !i.is_empty())
            .map(|i| parse_ip(K, &id, "spec.clusterIPs entry", i))
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(K, &id, p.protocol.as_deref())?,
            port: port_u16(K, &id, "spec.ports[].port", p.port)?,
            node_port: port_u16(K, &id, "spec.ports[].nodePort", p.node_port.unwrap_or(0))?,
        });
    }
    let external_ips = spec
        .external_ips
        .iter()
        .flatten()
        .map(|i| parse_ip(K, &id, "spec.externalIPs entry", i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut lb_ingress = Vec::new();
    for ing in s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(ip) = ing.ip.as_deref().filter(|i| !i.is_empty()) else {
            continue;
        };
        lb_ingress.push(LbIngress {
            ip: parse_ip(K, &id, "status.loadBalancer.ingress[].ip", ip)?,
            ip_mode: match ing.ip_mode.as_deref() {
                Some("Proxy") => LbIpMode::Proxy,
                _ => LbIpMode::VIP,
            },
        });
    }
    // serviceport.go trims whitespace and skips ranges that do not parse.
    let lb_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .filter_map(|r| r.trim().parse::<ipnet::IpNet>().ok())
        .collect();
    let policy = |p: Option<&String>| match p.map(|s| s.as_str()) {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    let session_affinity_timeout_s = if spec.session_affinity.as_deref() == Some("ClientIP") {
        Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| t.clamp(1, 86400) as u32)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S),
        )
    } else {
        None
    };
    Ok(Service {
        id,
        type_,
        cluster_ips,
        headless,
        ports,
        external_ips,
        lb_ingress,
        lb_source_ranges,
        external_traffic_policy: policy(spec.external_traffic_policy.as_ref()),
        internal_traffic_policy: policy(spec.internal_traffic_policy.as_ref()),
        session_affinity_timeout_s,
        health_check_node_port: spec.health_check_node_port.unwrap_or(0).clamp(0, 65535) as u16,
        traffic_distribution: spec.traffic_distribution.clone(),
        annotations: s.metadata.annotations.clone().unwrap_or_default(),
        labels: s.metadata.labels.clone().unwrap_or_default(),
    })
}

/// discovery.k8s.io/v1 LabelServiceName.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Set by the EndpointSlice controller to the time of the change that triggered this
/// version (RFC 3339); kube-proxy's network programming latency starts there.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

pub fn endpoint_slice(s: &discovery::EndpointSlice) -> Result<EndpointSlice, ConvertError> {
    const K: &str = "EndpointSlice";
    let id = objref(&s.metadata);
    let address_type = match s.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => AddressType::FQDN,
        other => {
            return Err(ConvertError {
                kind: K,
                object: id.to_string(),
                reason: format!("unknown addressType {other:?}"),
            });
        }
    };
    let mut ports = Vec::new();
    for p in s.ports.iter().flatten() {
        // endpointslicecache.go ignores ports with a nil name or a nil/zero port.
        let (Some(name), Some(port)) = (&p.name, p.port) else {
            continue;
        };
        ports.push(EndpointPort {
            name: name.clone(),
            protocol: protocol(K, &id, p.protocol.as_deref())?,
            port: port_u16(K, &id, "ports[].port", port)?,
        });
    }
    let mut endpoints = Vec::new();
    for e in s.endpoints.iter().flatten() {
        let addresses = e
            .addresses
            .iter()
            .map(|a| parse_ip(K, &id, "endpoints[].addresses entry", a))
            .collect::<Result<Vec<_>, _>>()?;
        let c = e.conditions.clone().unwrap_or_default();
        endpoints.push(Endpoint {
            addresses,
            ready: c.ready,
            serving: c.serving,
            terminating: c.terminating,
            node_name: e.node_name.clone(),
            zone: e.zone.clone(),
            hint_zones: e
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect()),
            hint_nodes: e
                .hints
                .as_ref()
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect()),
            target_pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .map(|r| {
                    ObjRef::new(
                        r.namespace.clone().unwrap_or_else(|| id.namespace.clone()),
                        r.name.clone().unwrap_or_default(),
                    )
                }),
        });
    }
    Ok(EndpointSlice {
        service: s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|n| !n.is_empty())
            .cloned(),
        // An unparsable annotation only loses the latency observation, not the slice.
        trigger_time_unix_ns: s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .and_then(|t| i64::try_from(t.as_nanosecond()).ok()),
        id,
        address_type,
        ports,
        endpoints,
    })
}

pub fn node(n: &core::Node) -> Result<Node, ConvertError> {
    const K: &str = "Node";
    let name = n.metadata.name.clone().unwrap_or_default();
    let obj = ObjRef::new("", name.clone());
    let mut internal_ips = Vec::new();
    let mut external_ips = Vec::new();
    for a in n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
    {
        match a.type_.as_str() {
            "InternalIP" => internal_ips.push(parse_ip(
                K,
                &obj,
                "status.addresses InternalIP",
                &a.address,
            )?),
            "ExternalIP" => external_ips.push(parse_ip(
                K,
                &obj,
                "status.addresses ExternalIP",
                &a.address,
            )?),
            _ => {}
        }
    }
    let spec = n.spec.clone().unwrap_or_default();
    let mut cidrs: Vec<String> = spec.pod_cidrs.unwrap_or_default();
    if cidrs.is_empty()
        && let Some(c) = spec.pod_cidr
    {
        cidrs.push(c);
    }
    let pod_cidrs = cidrs
        .iter()
        .map(|c| {
            c.parse().map_err(|_| ConvertError {
                kind: K,
                object: name.clone(),
                reason: format!("spec.podCIDRs entry {c:?} is not a CIDR"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // kube-proxy's NodeEligible (pkg/proxy/healthcheck/proxy_health.go).
    let being_deleted = n.metadata.deletion_timestamp.is_some()
        || n.spec.as_ref().is_some_and(|s| {
            s.taints
                .iter()
                .flatten()
                .any(|t| t.key == crate::health::TO_BE_DELETED_TAINT)
        });
    Ok(Node {
        labels: n.metadata.labels.clone().unwrap_or_default(),
        name,
        internal_ips,
        external_ips,
        pod_cidrs,
        being_deleted,
    })
}

/// Labels as a model map (None -> empty).
pub fn labels(l: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    l.clone().unwrap_or_default()
}

/// The IANA service name rules a named port follows (apimachinery validation
/// IsValidPortName): 1-15 characters of [a-z0-9-], at least one letter, no leading,
/// trailing or doubled hyphen.
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

pub fn pod(p: &core::Pod) -> Result<Pod, ConvertError> {
    const K: &str = "Pod";
    let id = objref(&p.metadata);
    let err = |reason: String| ConvertError {
        kind: K,
        object: id.to_string(),
        reason,
    };
    if id.name.is_empty() {
        return Err(err("metadata.name is empty".into()));
    }
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let mut ips: Vec<IpAddr> = Vec::new();
    let listed: Vec<String> = match &status.pod_ips {
        Some(v) if !v.is_empty() => v.iter().map(|i| i.ip.clone()).collect(),
        _ => status.pod_ip.iter().cloned().collect(),
    };
    for s in listed.iter().filter(|s| !s.is_empty()) {
        // IPv4-mapped IPv6 is IPv4 to the datapath.
        let ip = parse_ip(K, &id, "status.podIPs entry", s)?.to_canonical();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut ports = Vec::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        for (pi, cp) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            let port = u16::try_from(cp.container_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    err(format!(
                        "{field}.containerPort {} is not a valid port (1-65535)",
                        cp.container_port
                    ))
                })?;
            ports.push(ContainerPort {
                name: cp.name.clone().unwrap_or_default(),
                port,
                protocol: protocol(K, &id, cp.protocol.as_deref())?,
            });
        }
    }
    let phase = match status.phase.as_deref() {
        Some("Pending") => PodPhase::Pending,
        Some("Succeeded") => PodPhase::Succeeded,
        Some("Failed") => PodPhase::Failed,
        Some("Unknown") => PodPhase::Unknown,
        _ => PodPhase::Running,
    };
    Ok(Pod {
        labels: labels(&p.metadata.labels),
        node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
        ips,
        ports,
        host_network: spec.host_network.unwrap_or(false),
        phase,
        id,
    })
}

pub fn namespace(n: &core::Namespace) -> Result<Namespace, ConvertError> {
    let name = n.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(ConvertError {
            kind: "Namespace",
            object: String::new(),
            reason: "metadata.name is empty".into(),
        });
    }
    let mut labels = labels(&n.metadata.labels);
    // The API server sets (and keeps) this label on every namespace.
    labels.insert(LABEL_NAMESPACE_NAME.into(), name.clone());
    Ok(Namespace { name, labels })
}

fn selector(
    s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    field: &str,
) -> Result<LabelSelector, String> {
    let mut out = LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let operator = match e.operator.as_str() {
            "In" => SelectorOp::In,
            "NotIn" => SelectorOp::NotIn,
            "Exists" => SelectorOp::Exists,
            "DoesNotExist" => SelectorOp::DoesNotExist,
            other => {
                return Err(format!(
                    "{f}.operator {other:?} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        };
        let values = e.values.clone().unwrap_or_default();
        match operator {
            SelectorOp::In | SelectorOp::NotIn if values.is_empty() => {
                return Err(format!("{f}.values must be non-empty for {}", e.operator));
            }
            SelectorOp::Exists | SelectorOp::DoesNotExist if !values.is_empty() => {
                return Err(format!("{f}.values must be empty for {}", e.operator));
            }
            _ => {}
        }
        out.match_expressions.push(LabelSelectorRequirement {
            key: e.key.clone(),
            operator,
            values,
        });
    }
    Ok(out)
}

fn cidr(s: &str, field: &str) -> Result<ipnet::IpNet, String> {
    let n: ipnet::IpNet = s
        .trim()
        .parse()
        .map_err(|_| format!("{field} {s:?} is not a CIDR"))?;
    // Host bits are allowed by the API ("10.244.0.5/4" in the upstream suite): mask them.
    Ok(weir_core::policy::compile::canonical_net(&n))
}

fn peer(p: &networking::NetworkPolicyPeer, field: &str) -> Result<PolicyPeer, String> {
    match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
        (Some(b), None, None) => {
            let c = cidr(&b.cidr, &format!("{field}.ipBlock.cidr"))?;
            let mut except = Vec::new();
            for (i, e) in b.except.iter().flatten().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let e = cidr(e, &f)?;
                // validation.go ValidateIPBlock: a strict subset of the CIDR.
                if !(c.contains(&e) && e.prefix_len() > c.prefix_len()) {
                    return Err(format!("{f} {e} must be a strict subset of {c}"));
                }
                except.push(e);
            }
            Ok(PolicyPeer::IpBlock(IpBlock { cidr: c, except }))
        }
        (Some(_), _, _) => Err(format!(
            "{field}: ipBlock may not be combined with podSelector or namespaceSelector"
        )),
        (None, None, None) => Err(format!(
            "{field}: must specify podSelector, namespaceSelector or ipBlock"
        )),
        (None, ns, pod) => Ok(PolicyPeer::Selector {
            namespace: ns
                .as_ref()
                .map(|s| selector(s, &format!("{field}.namespaceSelector")))
                .transpose()?,
            pod: pod
                .as_ref()
                .map(|s| selector(s, &format!("{field}.podSelector")))
                .transpose()?,
        }),
    }
}

fn policy_port(p: &networking::NetworkPolicyPort, field: &str) -> Result<PolicyPort, String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let proto = p.protocol.as_deref().unwrap_or("TCP");
    let protocol = Protocol::parse(proto)
        .ok_or_else(|| format!("{field}.protocol {proto:?} is not TCP, UDP or SCTP"))?;
    let num = |n: i32, what: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("{field}.{what} {n} is not a valid port (1-65535)"))
    };
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err(format!("{field}.endPort requires a numeric port")),
        (Some(IntOrString::Int(n)), end) => {
            let lo = num(*n, "port")?;
            let hi = match end {
                None => lo,
                Some(e) => num(e, "endPort")?,
            };
            if hi < lo {
                return Err(format!(
                    "{field}.endPort {hi} must be greater than or equal to port {lo}"
                ));
            }
            PortMatch::Range(lo, hi)
        }
        (Some(IntOrString::String(s)), None) => {
            if !valid_port_name(s) {
                return Err(format!("{field}.port {s:?} is not a valid port name"));
            }
            PortMatch::Named(s.clone())
        }
        (Some(IntOrString::String(_)), Some(_)) => {
            return Err(format!("{field}.endPort may not be used with a named port"));
        }
    };
    Ok(PolicyPort { protocol, port })
}

fn rules<'a>(
    list: impl Iterator<
        Item = (
            Option<&'a Vec<networking::NetworkPolicyPeer>>,
            Option<&'a Vec<networking::NetworkPolicyPort>>,
        ),
    >,
    field: &str,
    peers_name: &str,
) -> Result<Vec<PolicyRule>, String> {
    let mut out = Vec::new();
    for (i, (peers, ports)) in list.enumerate() {
        let f = format!("{field}[{i}]");
        out.push(PolicyRule {
            peers: peers
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(j, p)| peer(p, &format!("{f}.{peers_name}[{j}]")))
                .collect::<Result<_, _>>()?,
            ports: ports
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(j, p)| policy_port(p, &format!("{f}.ports[{j}]")))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(out)
}

/// networking.k8s.io/v1 NetworkPolicy, with the API server's defaulting and validation
/// (pkg/apis/networking/v1/defaults.go, pkg/apis/networking/validation/validation.go):
/// port protocol TCP; `policyTypes` `[Ingress]` plus `Egress` when `egress` is non-empty.
pub fn network_policy(n: &networking::NetworkPolicy) -> Result<NetworkPolicy, ConvertError> {
    const K: &str = "NetworkPolicy";
    let id = objref(&n.metadata);
    let err = |reason: String| ConvertError {
        kind: K,
        object: id.to_string(),
        reason,
    };
    if id.name.is_empty() {
        return Err(err("metadata.name is empty".into()));
    }
    let spec = n.spec.clone().unwrap_or_default();
    let pod_selector = match &spec.pod_selector {
        None => LabelSelector::everything(),
        Some(s) => selector(s, "spec.podSelector").map_err(err)?,
    };
    let ingress = rules(
        spec.ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref())),
        "spec.ingress",
        "from",
    )
    .map_err(err)?;
    let egress = rules(
        spec.egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref())),
        "spec.egress",
        "to",
    )
    .map_err(err)?;
    let policy_types = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut t = PolicyTypes::default();
            for (i, ty) in types.iter().enumerate() {
                match ty.as_str() {
                    "Ingress" => t.ingress = true,
                    "Egress" => t.egress = true,
                    other => {
                        return Err(err(format!(
                            "spec.policyTypes[{i}] {other:?} is not Ingress or Egress"
                        )));
                    }
                }
            }
            t
        }
        _ => PolicyTypes {
            ingress: true,
            egress: !egress.is_empty(),
        },
    };
    Ok(NetworkPolicy {
        id,
        pod_selector,
        policy_types,
        ingress,
        egress,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc_yaml(y: &str) -> core::Service {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn service_defaults() {
        let s = service(&svc_yaml(
            "metadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n",
        ))
        .unwrap();
        assert_eq!(s.type_, ServiceType::ClusterIP);
        assert_eq!(s.ports[0].protocol, Protocol::TCP);
        assert_eq!(s.ports[0].name, "");
        assert_eq!(s.session_affinity_timeout_s, Some(10800));
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(s.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn bad_input_names_object_and_field() {
        let e = service(&svc_yaml(
            "metadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 70000}]\n",
        ))
        .unwrap_err();
        assert_eq!(e.object, "shop/web");
        assert!(e.reason.contains("70000"), "{e}");
        let e = service(&svc_yaml(
            "metadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: 80, protocol: ICMP}]\n",
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("Service default/web: unknown protocol"),
            "{e}"
        );
    }

    #[test]
    fn headless() {
        let s = service(&svc_yaml("metadata: {name: db}\nspec: {clusterIP: None}\n")).unwrap();
        assert!(s.headless);
        assert!(s.cluster_ips.is_empty());
    }

    #[test]
    fn slice_ports_without_name_are_ignored_like_kube_proxy() {
        let s: discovery::EndpointSlice = serde_yaml::from_str(
            "metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}, {name: '', port: 8081}]\nendpoints: [{addresses: [10.0.0.5], conditions: {ready: true}}]\n",
        )
        .unwrap();
        let s = endpoint_slice(&s).unwrap();
        assert_eq!(s.service.as_deref(), Some("web"));
        assert_eq!(s.ports.len(), 1);
        assert_eq!(s.ports[0].port, 8081);
        assert_eq!(s.endpoints[0].ready, Some(true));
        assert_eq!(s.endpoints[0].serving, None);
        assert_eq!(s.trigger_time_unix_ns, None);
    }

    #[test]
    fn the_trigger_time_annotation_is_read_and_a_bad_one_ignored() {
        let slice = |ann: &str| {
            let y = format!(
                "metadata: {{name: web-1, namespace: default, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{ann}'}}}}\naddressType: IPv4\nendpoints: []\n"
            );
            endpoint_slice(&serde_yaml::from_str(&y).unwrap()).unwrap()
        };
        // The controller writes RFC 3339 with nanoseconds (time.RFC3339Nano).
        assert_eq!(
            slice("2026-11-22T10:00:01.5Z").trigger_time_unix_ns,
            Some(1_795_341_601_500_000_000)
        );
        assert_eq!(
            slice("2026-11-22T10:00:01Z").trigger_time_unix_ns,
            Some(1_795_341_601_000_000_000)
        );
        assert_eq!(slice("yesterday").trigger_time_unix_ns, None);
    }
    fn np(y: &str) -> Result<NetworkPolicy, ConvertError> {
        network_policy(&serde_yaml::from_str(y).unwrap())
    }

    /// R3: policyTypes defaulting, every row of the table in docs/upstream-netpol.md.
    #[test]
    fn policy_types_default_as_the_api_server_does() {
        let t = |y: &str| np(y).unwrap().policy_types;
        let (i, ie) = (
            PolicyTypes {
                ingress: true,
                egress: false,
            },
            PolicyTypes {
                ingress: true,
                egress: true,
            },
        );
        assert_eq!(
            t("metadata: {name: p, namespace: x}\nspec: {podSelector: {}}"),
            i
        );
        assert_eq!(t("metadata: {name: p}\nspec: {ingress: [{}]}"), i);
        assert_eq!(
            t("metadata: {name: p}\nspec: {egress: [{ports: [{port: 53}]}]}"),
            ie
        );
        assert_eq!(t("metadata: {name: p}\nspec: {egress: []}"), i);
        let p = np("metadata: {name: p}\nspec: {policyTypes: [Egress], ingress: [{}]}").unwrap();
        assert_eq!(
            p.policy_types,
            PolicyTypes {
                ingress: false,
                egress: true
            }
        );
        // Kept, but inert (the evaluator and compiler ignore rules of other directions).
        assert_eq!(p.ingress.len(), 1);
    }

    #[test]
    fn peers_ports_and_selectors_convert_with_api_defaults() {
        let p = np(r#"
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from:
    - namespaceSelector: {matchExpressions: [{key: team, operator: NotIn, values: [a]}]}
      podSelector: {}
    - ipBlock: {cidr: 10.244.0.5/4, except: [10.1.0.0/16]}
    ports:
    - port: http
    - {port: 8000, endPort: 8080, protocol: UDP}
    - protocol: SCTP
"#)
        .unwrap();
        assert_eq!(p.id, ObjRef::new("shop", "web"));
        let r = &p.ingress[0];
        assert!(
            matches!(&r.peers[0], PolicyPeer::Selector { namespace: Some(n), pod: Some(s) }
            if n.match_expressions[0].operator == SelectorOp::NotIn && s.is_empty())
        );
        // Host bits of the CIDR are masked (the upstream suite sends such a value).
        assert_eq!(
            r.peers[1],
            PolicyPeer::IpBlock(IpBlock {
                cidr: "0.0.0.0/4".parse().unwrap(),
                except: vec!["10.1.0.0/16".parse().unwrap()],
            })
        );
        assert_eq!(
            r.ports,
            vec![
                PolicyPort {
                    protocol: Protocol::TCP,
                    port: PortMatch::Named("http".into())
                },
                PolicyPort {
                    protocol: Protocol::UDP,
                    port: PortMatch::Range(8000, 8080)
                },
                PolicyPort {
                    protocol: Protocol::SCTP,
                    port: PortMatch::Any
                },
            ]
        );
    }

    /// R19 (the upstream endPort API test) and the other validation rules: each error names
    /// the policy and the field, and fails only that policy.
    #[test]
    fn invalid_policies_are_rejected_naming_object_and_field() {
        let bad = |spec: &str, needle: &str| {
            let e = np(&format!(
                "metadata: {{name: p, namespace: x}}\nspec: {spec}"
            ))
            .unwrap_err();
            assert_eq!(e.object, "x/p");
            assert!(e.reason.contains(needle), "{e} (wanted {needle:?})");
        };
        bad(
            "{ingress: [{ports: [{endPort: 20000}]}]}",
            "spec.ingress[0].ports[0].endPort",
        );
        bad(
            "{ingress: [{ports: [{port: serve-80, endPort: 20000}]}]}",
            "named port",
        );
        bad(
            "{ingress: [{ports: [{port: 30000, endPort: 20000}]}]}",
            "greater than or equal",
        );
        bad("{ingress: [{ports: [{port: 0}]}]}", "not a valid port");
        bad(
            "{ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
            "protocol",
        );
        bad(
            "{egress: [{to: [{}]}]}",
            "spec.egress[0].to[0]: must specify",
        );
        bad(
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
            "may not be combined",
        );
        bad(
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}",
            "strict subset",
        );
        bad(
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]}",
            "strict subset",
        );
        bad(
            "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
            "not a CIDR",
        );
        bad(
            "{podSelector: {matchExpressions: [{key: a, operator: In}]}}",
            "spec.podSelector.matchExpressions[0].values",
        );
        bad(
            "{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}",
            "must be empty",
        );
        bad(
            "{podSelector: {matchExpressions: [{key: a, operator: Gt, values: [1]}]}}",
            "operator",
        );
        bad("{policyTypes: [Both]}", "spec.policyTypes[0]");
        bad(
            "{ingress: [{ports: [{port: Http}]}]}",
            "not a valid port name",
        );
        // Accepted edge values (R19).
        assert!(
            np("metadata: {name: p}\nspec: {ingress: [{ports: [{port: 20000, endPort: 20000}]}]}")
                .is_ok()
        );
    }

    #[test]
    fn pods_and_namespaces() {
        let p = pod(&serde_yaml::from_str(
            r#"
metadata: {name: a, namespace: x, labels: {pod: a}}
spec:
  nodeName: n1
  containers:
  - {name: c, ports: [{containerPort: 80, name: serve-80-tcp}, {containerPort: 53, protocol: UDP}]}
status:
  phase: Running
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
"#,
        )
        .unwrap())
        .unwrap();
        assert_eq!(p.ips.len(), 2);
        assert_eq!(p.node_name.as_deref(), Some("n1"));
        assert_eq!(
            p.named_port("serve-80-tcp", Protocol::TCP)
                .collect::<Vec<_>>(),
            [80]
        );
        assert_eq!(
            p.ports[1],
            ContainerPort {
                name: String::new(),
                port: 53,
                protocol: Protocol::UDP
            }
        );
        let e = pod(&serde_yaml::from_str(
            "metadata: {name: a}\nspec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}",
        )
        .unwrap())
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("Pod default/a: spec.containers[0].ports[0].containerPort 70000"),
            "{e}"
        );
        let n = namespace(&serde_yaml::from_str("metadata: {name: y, labels: {team: a}}").unwrap())
            .unwrap();
        assert_eq!(
            n.labels.get(LABEL_NAMESPACE_NAME).map(|s| s.as_str()),
            Some("y")
        );
        assert_eq!(n.labels.get("team").map(|s| s.as_str()), Some("a"));
    }
}
