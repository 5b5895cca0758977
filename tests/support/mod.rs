//! Support shared by the privileged end-to-end tests. Each test file includes it with
//! `mod support;`. Most of the machinery lives in `weir::testing` and `weir::netns` so
//! that the benchmarks can use it too; this module adds test-only conveniences.
#![allow(dead_code, reason = "each test file uses a different subset")]

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
