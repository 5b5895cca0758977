//! Kubernetes API objects (k8s-openapi) -> weir-core's plain model.
//!
//! Defaults are the API's: Service type ClusterIP, port protocol TCP, traffic policies
//! Cluster, sessionAffinity timeout 10800 s; EndpointSlice conditions stay `None` when
//! unset (translation applies the kube-proxy defaults). Invalid input is an error that
//! names the object and the field; the caller skips that object and counts it.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
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
    Ok(Node {
        labels: n.metadata.labels.clone().unwrap_or_default(),
        name,
        internal_ips,
        external_ips,
        pod_cidrs,
    })
}

/// Labels as a model map (None -> empty).
pub fn labels(l: &Option<BTreeMap<String, String>>) -> BTreeMap<String, String> {
    l.clone().unwrap_or_default()
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
    }
}
