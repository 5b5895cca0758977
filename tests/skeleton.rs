//! The walking skeleton end to end, with real packets: the agent (a real process) loads
//! the programs, attaches them to the host side of pod veths inside a node namespace,
//! programs one ClusterIP Service with two backends from a YAML directory, and real TCP
//! connections from a client pod to the VIP reach both backends with replies from the
//! VIP. Maps and links are pinned under a per-instance bpffs directory while the agent
//! runs and removed when it shuts down.

mod support;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use weir::demo::{Mini, VIP};

#[test]
fn cluster_ip_balances_real_connections_and_pins_are_removed_on_shutdown() {
    support::require_root();
    let mut m = Mini::build(std::path::Path::new(env!("CARGO_BIN_EXE_weir"))).expect("topology");
    m.start_agent().expect("agent starts");
    m.wait_programmed(1, Duration::from_secs(30))
        .expect("agent programs the Service");

    // While the agent runs, its maps and links are pinned under its instance directory.
    for map in ["SERVICES", "BACKENDS", "CT", "METRICS"] {
        assert!(
            m.pin_dir.join("maps").join(map).exists(),
            "map {map} pinned"
        );
    }
    let links = std::fs::read_dir(m.pin_dir.join("links")).unwrap().count();
    assert_eq!(
        links,
        2 * m.pods.len(),
        "one ingress and one egress link per pod veth"
    );

    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let client_ip = m.pod("client").ip;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..40 {
        let (reply, peer) = m
            .connect("client", vip)
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        // The client's socket is connected to the VIP: replies came from the VIP.
        assert_eq!(peer, vip);
        // Pod-to-ClusterIP keeps the client's source address (no masquerade).
        assert!(
            reply.client.starts_with(&format!("{client_ip}:")),
            "backend saw {}",
            reply.client
        );
        *per_backend.entry(reply.server).or_default() += 1;
    }
    assert_eq!(
        per_backend.keys().cloned().collect::<Vec<_>>(),
        ["demo/backend-1", "demo/backend-2"],
        "both backends answer: {per_backend:?}"
    );

    assert_eq!(m.attached_programs("client").unwrap(), 2);
    m.stop_agent();
    assert!(!m.pin_dir.exists(), "pins removed on shutdown");
    // The kernel releases the links once the last reference (pin or fd) is gone; that
    // happens asynchronously after the agent exits, so wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m.attached_programs("client").unwrap() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "programs still attached after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // With the datapath gone, the VIP is no longer served.
    assert!(m.connect("client", vip).is_err());
}

#[test]
fn guards_remove_what_they_created_even_when_the_test_panics() {
    support::require_root();
    let prefix = weir::netns::unique_prefix('g');
    let ns = format!("{prefix}-guard");
    let cg = format!("{prefix}-guard");
    let cg_path = weir::netns::cgroup2_root().unwrap().join(&cg);
    let (ns2, cg2) = (ns.clone(), cg.clone());
    let r = std::panic::catch_unwind(move || {
        let _n = weir::netns::NetnsGuard::create(&ns2).unwrap();
        let _c = weir::netns::CgroupGuard::create(&cg2).unwrap();
        panic!("test failure inside the guards' scope");
    });
    assert!(r.is_err());
    assert!(
        !weir::netns::list_by_prefix(&prefix).contains(&ns),
        "namespace removed"
    );
    assert!(!cg_path.exists(), "cgroup removed");
}
