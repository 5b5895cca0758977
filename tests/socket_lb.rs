//! Socket-level load balancing with real sockets: the agent attaches the cgroup hooks to
//! the node's cgroup; client processes in a pod namespace and in that cgroup connect to a
//! ClusterIP and are connected straight to a backend (no per-packet translation: the
//! datapath's translation counter stays at zero), while the socket reports the VIP as its
//! peer. Unconnected and connected UDP likewise; a Service without endpoints refuses at
//! once.

mod support;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use weir::demo::{Mini, VIP};
use weir_common::metrics::{DIR_EGRESS, REASON_TRANSLATED, index};

fn translated_per_packet(m: &Mini) -> u64 {
    weir::datapath::maps::read_counters(&m.pin_dir)
        .unwrap()
        .get(&index(REASON_TRANSLATED, DIR_EGRESS))
        .map(|c| c.packets)
        .unwrap_or(0)
}

fn mini() -> Mini {
    support::require_root();
    let mut m = Mini::build(std::path::Path::new(env!("CARGO_BIN_EXE_weir"))).expect("topology");
    m.with_socket_lb().expect("cgroup");
    m.start_agent().expect("agent");
    m.wait_programmed(1, Duration::from_secs(30))
        .expect("programmed");
    m
}

#[test]
fn tcp_to_a_clusterip_is_balanced_at_connect_and_the_peer_is_the_vip() {
    let m = mini();
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut backends = BTreeSet::new();
    for _ in 0..30 {
        let r = m.probe("client", vip, false, false).unwrap();
        assert_eq!(r.result, "connected", "{r:?}");
        assert_eq!(
            r.peer.as_deref(),
            Some("10.96.0.10:80"),
            "getpeername shows the VIP"
        );
        let reply = r.reply.unwrap();
        assert_eq!(reply.local.split(':').next_back(), Some("8080"));
        backends.insert(reply.server);
    }
    assert_eq!(backends.len(), 2, "both backends: {backends:?}");
    assert_eq!(
        translated_per_packet(&m),
        0,
        "translated by the socket hooks, not per packet"
    );
}

#[test]
fn udp_to_a_clusterip_unconnected_and_connected_sees_the_vip() {
    let m = mini();
    let vip: SocketAddr = format!("{VIP}:53").parse().unwrap();
    for connected in [false, true] {
        let r = m.probe("client", vip, true, connected).unwrap();
        assert_eq!(r.result, "connected", "{r:?}");
        assert_eq!(
            r.peer.as_deref(),
            Some("10.96.0.10:53"),
            "recvfrom/getpeername show the VIP ({connected})"
        );
        assert!(r.reply.unwrap().server.starts_with("demo/backend-"));
    }
    assert_eq!(translated_per_packet(&m), 0);
}

#[test]
fn a_clusterip_without_endpoints_refuses_at_connect() {
    let m = mini();
    let r = m
        .probe("client", "10.96.0.11:80".parse().unwrap(), false, false)
        .unwrap();
    assert_eq!(r.result, "refused", "{r:?}");
}

#[test]
fn without_socket_lb_the_per_packet_path_translates() {
    support::require_root();
    let mut m = Mini::build(std::path::Path::new(env!("CARGO_BIN_EXE_weir"))).expect("topology");
    m.start_agent().unwrap();
    m.wait_programmed(1, Duration::from_secs(30)).unwrap();
    let r = m
        .probe("client", format!("{VIP}:80").parse().unwrap(), false, false)
        .unwrap();
    assert_eq!(r.result, "connected");
    assert_eq!(r.peer.as_deref(), Some("10.96.0.10:80"));
    assert!(
        translated_per_packet(&m) > 0,
        "the TC path did the translation"
    );
    let r = m
        .probe("client", "10.96.0.11:80".parse().unwrap(), false, false)
        .unwrap();
    assert_eq!(r.result, "refused", "per-packet reject (TCP RST): {r:?}");
}
