//! The benchmark cluster as ordinary Kubernetes YAML: what weir's lab reads and what the
//! kube-proxy rule generators ([`crate::kubeproxy`]) read, so every dataplane is measured
//! on the same objects.
//!
//! - `pods.yaml`: Namespace `bench`, Node `node-a`, the client pod and a pool of
//!   [`BACKENDS`] backend pods with fixed IPs, each serving TCP 8080 (`weir serve`).
//! - `services-<N>.yaml`: N Services of 10 endpoints each, with their EndpointSlices
//!   given (so no lab derives them). 50k Services x 10 endpoints cannot have a server per
//!   endpoint address: every Service's endpoints are the same real backend pods (the
//!   pool), so every endpoint any Service picks answers. One Service, [`probe_name`], at
//!   the median position in name order, is a NodePort (30080) and is the one probed; one
//!   more, `iperf`, has a single endpoint (iperf3 opens two connections that must reach
//!   the same server).
//!
//! kube-proxy writes Services in Go map order (random): in iptables mode a packet walks
//! KUBE-SERVICES linearly, so the probed Service's position matters. The median is the
//! expected position of a random order.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};

pub const NAMESPACE: &str = "bench";
pub const NODE: &str = "node-a";
pub const NODE_IP: &str = "192.168.100.2";
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const NODE_POD_CIDR: &str = "10.244.0.0/24";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const CLIENT_IP: &str = "10.244.0.2";
pub const BACKENDS: usize = 10;
pub const ENDPOINTS_PER_SERVICE: usize = 10;
pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const NODE_PORT: u16 = 30080;
pub const IPERF_PORT: u16 = 5201;
pub const IPERF_VIP: &str = "10.96.255.250";

pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i as u8)
}

/// ClusterIP of Service `i`: 10.96.0.0/16 from .1.0 on (the iperf Service sits at the
/// top of the range).
pub fn service_ip(i: usize) -> Ipv4Addr {
    let n = 256 + i as u32;
    Ipv4Addr::new(10, 96, (n >> 8) as u8, (n & 0xff) as u8)
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// Index of the probed Service among `n`.
pub fn probe_index(n: usize) -> usize {
    n / 2
}

#[cfg(test)]
pub fn probe_name(n: usize) -> String {
    service_name(probe_index(n))
}

/// The LabConfig document of a lab run (socket LB and dataplane vary per run).
pub fn lab_config(socket_lb: bool, dataplane: &str) -> String {
    format!(
        "apiVersion: weir.dev/v1alpha1\nkind: LabConfig\npodCIDRs: [{POD_CIDR}]\nserviceCIDRs: [{SERVICE_CIDR}]\nsocketLB: {socket_lb}\ndataplane: {dataplane}\nmapSizes: [SERVICES=1048576, REV_NAT=131072]\n"
    )
}

pub fn pods_yaml() -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE}\nspec:\n  podCIDR: {NODE_POD_CIDR}\n\
         status:\n  addresses:\n  - type: InternalIP\n    address: {NODE_IP}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: {NAMESPACE}\n  labels:\n    role: client\n\
         spec:\n  nodeName: {NODE}\n  containers:\n  - name: c\nstatus:\n  podIP: {CLIENT_IP}\n"
    );
    for i in 0..BACKENDS {
        let _ = write!(
            s,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: backend-{i}\n  namespace: {NAMESPACE}\n  labels:\n    app: backend\n\
             spec:\n  nodeName: {NODE}\n  containers:\n  - name: c\n    ports:\n    - name: http\n      containerPort: {TARGET_PORT}\n      protocol: TCP\n\
             status:\n  podIP: {}\n",
            backend_ip(i)
        );
    }
    s
}

fn push_service(
    s: &mut String,
    name: &str,
    ip: Ipv4Addr,
    node_port: bool,
    port: u16,
    target: u16,
    eps: &[Ipv4Addr],
) {
    let ty = if node_port { "NodePort" } else { "ClusterIP" };
    let np = if node_port {
        format!("\n    nodePort: {NODE_PORT}")
    } else {
        String::new()
    };
    let _ = write!(
        s,
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
         spec:\n  type: {ty}\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  - name: http\n    protocol: TCP\n    port: {port}\n    targetPort: {target}{np}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-bench\n  namespace: {NAMESPACE}\n  labels:\n    kubernetes.io/service-name: {name}\n\
         addressType: IPv4\nports:\n- name: http\n  protocol: TCP\n  port: {target}\nendpoints:\n"
    );
    for e in eps {
        let _ = write!(
            s,
            "- addresses: [{e}]\n  conditions: {{ready: true}}\n  nodeName: {NODE}\n"
        );
    }
}

/// N Services of [`ENDPOINTS_PER_SERVICE`] endpoints (the backend pool, rotated so
/// that Services start at different pods) plus the `iperf` Service.
pub fn services_yaml(n: usize) -> String {
    let mut s = String::with_capacity(n * 900);
    let pool: Vec<Ipv4Addr> = (0..BACKENDS).map(backend_ip).collect();
    for i in 0..n {
        let eps: Vec<Ipv4Addr> = (0..ENDPOINTS_PER_SERVICE)
            .map(|j| pool[(i + j) % BACKENDS])
            .collect();
        push_service(
            &mut s,
            &service_name(i),
            service_ip(i),
            i == probe_index(n),
            SERVICE_PORT,
            TARGET_PORT,
            &eps,
        );
    }
    push_service(
        &mut s,
        "iperf",
        IPERF_VIP.parse().expect("ip"),
        false,
        IPERF_PORT,
        IPERF_PORT,
        &[pool[0]],
    );
    s
}

/// Writes `pods.yaml` and `services-<n>.yaml` for every scale into `dir`.
pub fn write_all(dir: &Path, scales: &[usize]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("pods.yaml"), pods_yaml())?;
    for &n in scales {
        let p = services_path(dir, n);
        std::fs::write(&p, services_yaml(n)).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub fn services_path(dir: &Path, n: usize) -> std::path::PathBuf {
    dir.join(format!("services-{n}.yaml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_yaml_parses_into_the_model_weir_reads() {
        let (objs, errs) = weir::source::yaml::parse_documents(&services_yaml(3), "t");
        assert!(errs.is_empty(), "{errs:?}");
        let (c, errs) = weir::source::dir::to_cluster(&objs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(c.services.len(), 4);
        assert_eq!(c.slices.len(), 4);
        let probe = &c.services[&weir_core::model::ObjRef::new(NAMESPACE, probe_name(3))];
        assert_eq!(probe.ports[0].node_port, NODE_PORT);
        let (objs, errs) = weir::source::yaml::parse_documents(&pods_yaml(), "t");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2 + 1 + BACKENDS);
    }

    #[test]
    fn service_ips_stay_in_the_service_cidr_and_never_meet_the_iperf_vip() {
        let cidr: ipnet::Ipv4Net = SERVICE_CIDR.parse().unwrap();
        for i in [0, 1, 49_999, 60_000] {
            assert!(cidr.contains(&service_ip(i)));
            assert_ne!(service_ip(i).to_string(), IPERF_VIP);
        }
    }
}
