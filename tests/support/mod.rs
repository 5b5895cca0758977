//! Support shared by the privileged end-to-end tests. Each test file includes it with
//! `mod support;`. Most of the machinery lives in `weir::testing` and `weir::netns` so
//! that the benchmarks can use it too; this module adds test-only conveniences.
#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod lab;
pub mod policy;

use std::net::IpAddr;

use weir_core::{
    image::MapImage,
    model::*,
    pipeline::{NodeSettings, Pipeline},
};

/// Privileged tests need root (CI runs as root); say so plainly otherwise.
pub fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (network namespaces, bpffs, BPF programs); run the suite with ./test.sh as root"
    );
}

pub const NODE: &str = "node-a";

/// A Service with one port and the given backends (all ready), as a cluster snapshot.
pub fn cluster_ip_service(
    vip: &str,
    port: u16,
    proto: Protocol,
    backends: &[(&str, u16, &str)],
) -> Cluster {
    let mut c = Cluster::default();
    add_service(&mut c, "web", vip, port, proto, backends);
    c
}

/// Adds a ClusterIP Service `default/<name>` with ready backends `(ip, port, node)`.
pub fn add_service(
    c: &mut Cluster,
    name: &str,
    vip: &str,
    port: u16,
    proto: Protocol,
    backends: &[(&str, u16, &str)],
) {
    let id = ObjRef::new("default", name);
    let vip: IpAddr = vip.parse().unwrap();
    c.services.insert(
        id.clone(),
        Service {
            id: id.clone(),
            cluster_ips: vec![vip],
            ports: vec![ServicePort {
                name: "p".into(),
                protocol: proto,
                port,
                node_port: 0,
            }],
            ..Default::default()
        },
    );
    let family = if vip.is_ipv4() {
        AddressType::IPv4
    } else {
        AddressType::IPv6
    };
    for (i, (ip, p, node)) in backends.iter().enumerate() {
        let sid = ObjRef::new("default", format!("{name}-{i}"));
        c.slices.insert(
            sid.clone(),
            EndpointSlice {
                id: sid,
                trigger_time_unix_ns: None,
                service: Some(name.into()),
                address_type: family,
                ports: vec![EndpointPort {
                    name: "p".into(),
                    protocol: proto,
                    port: *p,
                }],
                endpoints: vec![Endpoint {
                    addresses: vec![ip.parse().unwrap()],
                    node_name: Some(node.to_string()),
                    ..Default::default()
                }],
            },
        );
    }
}

/// The map image the agent would program on `NODE` for `c`.
pub fn image(c: &Cluster) -> MapImage {
    let mut p = Pipeline::new(NodeSettings {
        node_name: NODE.into(),
        ..Default::default()
    });
    let (img, errs) = p.desired(c, 1);
    assert!(errs.is_empty(), "{errs:?}");
    img
}

/// The node the tests program ("local") and a second node ("remote").
pub const REMOTE: &str = "node-b";
pub const NODE_IP: &str = "192.168.100.1";
pub const NODE_IP6: &str = "fd00:100::1";
pub const REMOTE_IP: &str = "192.168.100.2";

/// Node settings as a cluster would configure the agent: pod CIDRs (the local detector)
/// and service CIDRs per family.
pub fn settings() -> NodeSettings {
    NodeSettings {
        node_name: NODE.into(),
        cluster_cidrs: vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/48".parse().unwrap(),
        ],
        service_cidrs: vec![
            "10.96.0.0/16".parse().unwrap(),
            "fd00:96::/108".parse().unwrap(),
        ],
        ..Default::default()
    }
}

/// Adds the local and the remote Node objects (addresses, zones).
pub fn add_nodes(c: &mut Cluster) {
    for (name, ip, ip6, zone) in [
        (NODE, NODE_IP, NODE_IP6, "zone-a"),
        (REMOTE, REMOTE_IP, "fd00:100::2", "zone-b"),
    ] {
        c.nodes.insert(
            name.into(),
            Node {
                name: name.into(),
                labels: [("topology.kubernetes.io/zone".to_string(), zone.to_string())].into(),
                internal_ips: vec![ip.parse().unwrap(), ip6.parse().unwrap()],
                external_ips: vec![],
                pod_cidrs: vec![],
                being_deleted: false,
            },
        );
    }
}

/// A Service under construction, with its EndpointSlice.
pub struct Svc {
    pub svc: Service,
    pub eps: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

impl Svc {
    /// A ClusterIP Service `default/<name>` (dual-stack if `ips` has both families).
    pub fn new(name: &str, ips: &[&str]) -> Svc {
        Svc {
            svc: Service {
                id: ObjRef::new("default", name),
                cluster_ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
                ..Default::default()
            },
            eps: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// A Service port and the matching endpoint port (`target`).
    pub fn port(mut self, name: &str, port: u16, target: u16, proto: Protocol) -> Svc {
        self.svc.ports.push(ServicePort {
            name: name.into(),
            protocol: proto,
            port,
            node_port: 0,
        });
        self.ports.push(EndpointPort {
            name: name.into(),
            protocol: proto,
            port: target,
        });
        self
    }

    /// Makes the Service a NodePort and gives its last port this node port.
    pub fn node_port(mut self, np: u16) -> Svc {
        if self.svc.type_ == ServiceType::ClusterIP {
            self.svc.type_ = ServiceType::NodePort;
        }
        self.svc.ports.last_mut().expect("a port").node_port = np;
        self
    }

    /// Makes the Service a LoadBalancer with this ingress IP (ipMode VIP).
    pub fn lb(mut self, ip: &str) -> Svc {
        self.svc.type_ = ServiceType::LoadBalancer;
        self.svc.lb_ingress.push(LbIngress {
            ip: ip.parse().unwrap(),
            ip_mode: LbIpMode::VIP,
        });
        self
    }

    pub fn lb_proxy_mode(mut self, ip: &str) -> Svc {
        self.svc.type_ = ServiceType::LoadBalancer;
        self.svc.lb_ingress.push(LbIngress {
            ip: ip.parse().unwrap(),
            ip_mode: LbIpMode::Proxy,
        });
        self
    }

    pub fn external_ip(mut self, ip: &str) -> Svc {
        self.svc.external_ips.push(ip.parse().unwrap());
        self
    }

    pub fn etp_local(mut self) -> Svc {
        self.svc.external_traffic_policy = TrafficPolicy::Local;
        self
    }

    pub fn itp_local(mut self) -> Svc {
        self.svc.internal_traffic_policy = TrafficPolicy::Local;
        self
    }

    pub fn affinity(mut self, timeout_s: u32) -> Svc {
        self.svc.session_affinity_timeout_s = Some(timeout_s);
        self
    }

    pub fn maglev(mut self) -> Svc {
        self.svc.annotations.insert(
            weir_core::services::ANNOTATION_LB_ALGORITHM.into(),
            "maglev".into(),
        );
        self
    }

    pub fn source_range(mut self, cidr: &str) -> Svc {
        self.svc.lb_source_ranges.push(cidr.parse().unwrap());
        self
    }

    /// A ready endpoint.
    pub fn ep(self, ip: &str, node: &str) -> Svc {
        self.ep_cond(ip, node, None, None, None)
    }

    /// An endpoint with explicit conditions (None = unset).
    pub fn ep_cond(
        mut self,
        ip: &str,
        node: &str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
    ) -> Svc {
        self.eps.push(Endpoint {
            addresses: vec![ip.parse().unwrap()],
            ready,
            serving,
            terminating,
            node_name: Some(node.into()),
            ..Default::default()
        });
        self
    }

    /// Adds the Service and one EndpointSlice per address family to `c`.
    pub fn add(self, c: &mut Cluster) {
        let id = self.svc.id.clone();
        for (fam, v4) in [(AddressType::IPv4, true), (AddressType::IPv6, false)] {
            let eps: Vec<Endpoint> = self
                .eps
                .iter()
                .filter(|e| e.addresses[0].is_ipv4() == v4)
                .cloned()
                .collect();
            if eps.is_empty() {
                continue;
            }
            let sid = ObjRef::new(
                &id.namespace,
                format!("{}-{}", id.name, if v4 { "v4" } else { "v6" }),
            );
            c.slices.insert(
                sid.clone(),
                EndpointSlice {
                    id: sid,
                    trigger_time_unix_ns: None,
                    service: Some(id.name.clone()),
                    address_type: fam,
                    ports: self.ports.clone(),
                    endpoints: eps,
                },
            );
        }
        c.services.insert(id, self.svc);
    }
}

/// The image for `c` under `settings()`.
pub fn image_of(c: &Cluster) -> MapImage {
    let mut p = Pipeline::new(settings());
    let (img, errs) = p.desired(c, 1);
    assert!(errs.is_empty(), "{errs:?}");
    img
}

/// A pipeline kept across steps, as the agent keeps one: ids stay stable between images.
pub struct Stepper {
    pub pipeline: Pipeline,
    generation: u64,
}

impl Stepper {
    pub fn new() -> Stepper {
        Stepper {
            pipeline: Pipeline::new(settings()),
            generation: 0,
        }
    }

    pub fn image(&mut self, c: &Cluster) -> MapImage {
        self.generation += 1;
        let (img, errs) = self.pipeline.desired(c, self.generation);
        assert!(errs.is_empty(), "{errs:?}");
        img
    }
}
