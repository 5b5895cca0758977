//! Service semantics in the datapath through BPF_PROG_TEST_RUN, one upstream situation
//! per test (docs/upstream-services.md: verdicts §3, masquerade matrix §4, affinity and
//! source ranges §5). Node "node-a" (192.168.100.1) is the node under test; "node-b" is
//! remote. Pods are in 10.244.0.0/16 (the local detector), Services in 10.96.0.0/16.

mod support;

use std::{collections::BTreeSet, net::SocketAddr};

use support::*;
use weir::{
    datapath::Hook,
    testing::{
        packet::{self, ACK, RST, SYN, sock},
        prog::{ProgHarness, RunResult, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    },
};
use weir_common::metrics::*;
use weir_core::model::{Cluster, Protocol::*};

fn cluster(svcs: Vec<Svc>) -> Cluster {
    let mut c = Cluster::default();
    add_nodes(&mut c);
    for s in svcs {
        s.add(&mut c);
    }
    c
}

fn harness(c: &Cluster) -> ProgHarness {
    require_root();
    let mut h = ProgHarness::new().expect("load datapath");
    h.program(&image_of(c)).expect("program maps");
    h
}

fn syn(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    packet::tcp(from, to, SYN, b"")
}

fn count(h: &ProgHarness, reason: u8, dir: u8) -> u64 {
    h.counters()
        .unwrap()
        .get(&(reason, dir))
        .copied()
        .unwrap_or(0)
}

fn assert_fwd(
    r: &RunResult,
    src: &str,
    sport: Option<u16>,
    dst: &str,
    dport: u16,
) -> packet::Parsed {
    assert_eq!(r.verdict, TC_ACT_OK, "forwarded");
    let p = r.parsed();
    assert_eq!(p.src.to_string(), src, "source of {p:?}");
    if let Some(sp) = sport {
        assert_eq!(p.sport, sp, "source port");
    }
    assert_eq!(
        (p.dst.to_string(), p.dport),
        (dst.to_string(), dport),
        "destination"
    );
    assert!(p.ip_csum_ok && p.l4_csum_ok, "checksums: {p:?}");
    p
}

const CLIENT: &str = "203.0.113.2";
const POD: &str = "10.244.1.5";

#[test]
fn a_clusterip_port_the_service_lacks_is_rejected() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.1.3", NODE),
    ]));
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.10", 81)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(r.parsed().tcp_flags, RST | ACK);
    assert_eq!(count(&h, REASON_UNKNOWN_PORT_REJECT, DIR_EGRESS), 1);
}

#[test]
fn an_unallocated_service_cidr_address_is_dropped() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.1.3", NODE),
    ]));
    let r = h
        .run(Hook::FromPod, &syn(sock(POD, 40000), sock("10.96.7.7", 80)))
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(count(&h, REASON_UNALLOCATED_SERVICE_IP, DIR_EGRESS), 1);
}

#[test]
fn udp_to_a_service_without_endpoints_gets_icmp_port_unreachable_v4_and_v6() {
    let c = cluster(vec![
        Svc::new("dns", &["10.96.0.53", "fd00:96::53"]).port("dns", 53, 5353, UDP),
    ]);
    let h = harness(&c);
    for (client, vip) in [(POD, "10.96.0.53"), ("fd00:244:1::5", "fd00:96::53")] {
        let q = packet::udp(sock(client, 5000), sock(vip, 53), b"query");
        let r = h.run(Hook::FromPod, &q).unwrap();
        assert_eq!(r.verdict, TC_ACT_REDIRECT, "{vip}");
        let p = r.parsed();
        assert_eq!(
            (p.src.to_string(), p.dst.to_string()),
            (vip.to_string(), client.to_string())
        );
        let (ty, code) = if client.contains(':') { (1, 4) } else { (3, 3) };
        assert_eq!(
            (p.icmp_type, p.icmp_code),
            (Some(ty), Some(code)),
            "port unreachable"
        );
        assert!(p.ip_csum_ok && p.l4_csum_ok, "ICMP checksum");
        let inner = p.inner.expect("quotes the offending datagram");
        assert_eq!(
            (inner.src.to_string(), inner.sport),
            (client.to_string(), 5000)
        );
        assert_eq!((inner.dst.to_string(), inner.dport), (vip.to_string(), 53));
    }
}

#[test]
fn tcp_to_an_ipv6_service_without_endpoints_gets_a_reset() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["fd00:96::10"]).port("http", 80, 8080, TCP),
    ]));
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock("fd00:244:1::5", 40000), sock("fd00:96::10", 80)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let p = r.parsed();
    assert_eq!(p.tcp_flags, RST | ACK);
    assert_eq!(p.src.to_string(), "fd00:96::10");
    assert!(p.l4_csum_ok);
}

/// Masquerade matrix row 9: external -> NodePort, eTP Cluster: both endpoints, masq.
#[test]
fn external_to_nodeport_is_masqueraded_and_the_reply_restored() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .node_port(30080)
            .ep("10.244.2.7", REMOTE),
    ]));
    let r = h
        .run(
            Hook::UplinkIn,
            &syn(sock(CLIENT, 5555), sock(NODE_IP, 30080)),
        )
        .unwrap();
    let p = assert_fwd(&r, NODE_IP, None, "10.244.2.7", 8080);
    assert!(
        (61000..=65535).contains(&p.sport),
        "SNAT port {} from the SNAT range",
        p.sport
    );
    // The backend's reply comes back through the uplink to the node address.
    let reply = packet::tcp(
        sock("10.244.2.7", 8080),
        sock(NODE_IP, p.sport),
        SYN | ACK,
        b"",
    );
    let r = h.run(Hook::UplinkIn, &reply).unwrap();
    assert_fwd(&r, NODE_IP, Some(30080), CLIENT, 5555);
}

/// Row 19/20: external -> NodePort/LB with eTP Local: only the local endpoint, no masq.
#[test]
fn external_to_etp_local_uses_the_local_endpoint_and_keeps_the_source() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.42"])
            .port("http", 80, 8080, TCP)
            .node_port(30042)
            .lb("198.51.100.42")
            .etp_local()
            .ep("10.244.1.2", NODE)
            .ep("10.244.2.2", REMOTE),
    ]));
    for dst in [sock(NODE_IP, 30042), sock("198.51.100.42", 80)] {
        for sport in 5000..5020 {
            let r = h
                .run(Hook::UplinkIn, &syn(sock(CLIENT, sport), dst))
                .unwrap();
            assert_fwd(&r, CLIENT, Some(sport), "10.244.1.2", 8080);
        }
    }
    // The local backend's reply leaves through its pod interface with the frontend as source.
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock("10.244.1.2", 8080), sock(CLIENT, 5000), SYN | ACK, b""),
        )
        .unwrap();
    assert_fwd(&r, NODE_IP, Some(30042), CLIENT, 5000);
}

/// §3.1: eTP Local, endpoints only elsewhere, traffic not short-circuited: DROP.
#[test]
fn external_to_etp_local_without_local_endpoints_is_dropped_not_rejected() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.42"])
            .port("http", 80, 8080, TCP)
            .node_port(30042)
            .etp_local()
            .ep("10.244.2.2", REMOTE),
    ]));
    let r = h
        .run(
            Hook::UplinkIn,
            &syn(sock(CLIENT, 5000), sock(NODE_IP, 30042)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(count(&h, REASON_NO_LOCAL_BACKEND_DROP, DIR_INGRESS), 1);
}

/// Rows 12/13: pod -> NodePort/LB with eTP Local: short-circuited to both endpoints, no masq.
#[test]
fn pod_to_etp_local_external_address_is_short_circuited_without_masquerade() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.42"])
            .port("http", 80, 8080, TCP)
            .node_port(30042)
            .lb("198.51.100.42")
            .etp_local()
            .ep("10.244.2.2", REMOTE),
    ]));
    for dst in [sock(NODE_IP, 30042), sock("198.51.100.42", 80)] {
        let r = h.run(Hook::FromPod, &syn(sock(POD, 40000), dst)).unwrap();
        assert_fwd(&r, POD, Some(40000), "10.244.2.2", 8080);
    }
}

/// Rows 2/3: pod -> NodePort/LB with eTP Cluster: masqueraded.
#[test]
fn pod_to_etp_cluster_external_address_is_masqueraded() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.41"])
            .port("http", 80, 8080, TCP)
            .node_port(30041)
            .lb("198.51.100.41")
            .ep("10.244.2.1", REMOTE),
    ]));
    for dst in [sock(NODE_IP, 30041), sock("198.51.100.41", 80)] {
        let r = h.run(Hook::FromPod, &syn(sock(POD, 40000), dst)).unwrap();
        assert_fwd(&r, NODE_IP, None, "10.244.2.1", 8080);
    }
}

/// Rows 1 and 8: pod -> ClusterIP keeps the source; external -> ClusterIP is masqueraded.
#[test]
fn clusterip_masquerades_only_sources_outside_the_cluster_cidr() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.41"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.2.1", REMOTE),
    ]));
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.41", 80)),
        )
        .unwrap();
    assert_fwd(&r, POD, Some(40000), "10.244.2.1", 8080);
    let r = h
        .run(
            Hook::UplinkIn,
            &syn(sock(CLIENT, 40000), sock("10.96.0.41", 80)),
        )
        .unwrap();
    assert_fwd(&r, NODE_IP, None, "10.244.2.1", 8080);
}

/// Row 21: pod -> ClusterIP with iTP Local: only the local endpoint.
#[test]
fn itp_local_clusterip_uses_only_local_endpoints_and_drops_without_them() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.43"])
            .port("http", 80, 8080, TCP)
            .itp_local()
            .ep("10.244.1.3", NODE)
            .ep("10.244.2.3", REMOTE),
        Svc::new("far", &["10.96.0.44"])
            .port("http", 80, 8080, TCP)
            .itp_local()
            .ep("10.244.2.4", REMOTE),
    ]));
    for sport in 40000..40020 {
        let r = h
            .run(
                Hook::FromPod,
                &syn(sock(POD, sport), sock("10.96.0.43", 80)),
            )
            .unwrap();
        assert_fwd(&r, POD, Some(sport), "10.244.1.3", 8080);
    }
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.44", 80)),
        )
        .unwrap();
    assert_eq!(
        r.verdict, TC_ACT_SHOT,
        "endpoints exist elsewhere: drop, not reject"
    );
}

/// §5.5 hairpin: a pod reaching itself through its Service is masqueraded to the node.
#[test]
fn hairpin_is_masqueraded_and_its_reply_restored() {
    let me = "10.244.1.3";
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep(me, NODE),
    ]));
    let r = h
        .run(Hook::FromPod, &syn(sock(me, 40000), sock("10.96.0.10", 80)))
        .unwrap();
    let p = assert_fwd(&r, NODE_IP, None, me, 8080);
    let reply = packet::tcp(sock(me, 8080), sock(NODE_IP, p.sport), SYN | ACK, b"");
    let r = h.run(Hook::FromPod, &reply).unwrap();
    assert_fwd(&r, "10.96.0.10", Some(80), me, 40000);
}

/// §5.2: source ranges apply to LB VIPs only, before DNAT.
#[test]
fn load_balancer_source_ranges_filter_the_lb_ip_only() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.41"])
            .port("http", 80, 8080, TCP)
            .node_port(30041)
            .lb("198.51.100.41")
            .source_range("203.0.113.0/24")
            .ep("10.244.2.1", REMOTE),
    ]));
    let r = h
        .run(
            Hook::UplinkIn,
            &syn(sock(CLIENT, 5000), sock("198.51.100.41", 80)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK, "in range");
    let r = h
        .run(
            Hook::UplinkIn,
            &syn(sock("198.18.0.9", 5000), sock("198.51.100.41", 80)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT, "out of range");
    assert_eq!(count(&h, REASON_SOURCE_RANGE_DENIED, DIR_INGRESS), 1);
    // A pod outside the ranges is dropped too (checked before the eTP short-circuit).
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 5000), sock("198.51.100.41", 80)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    // NodePort bypasses the ranges.
    let r = h
        .run(
            Hook::UplinkIn,
            &syn(sock("198.18.0.9", 5000), sock(NODE_IP, 30041)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
}

/// §2.3: an ingress IP with ipMode Proxy is not captured; §1.1: headless is not proxied.
#[test]
fn proxy_mode_lb_ips_and_headless_services_are_not_captured() {
    let mut c = cluster(vec![
        Svc::new("web", &["10.96.0.41"])
            .port("http", 80, 8080, TCP)
            .lb_proxy_mode("198.51.100.77")
            .ep("10.244.2.1", REMOTE),
    ]);
    let mut headless = Svc::new("db", &[])
        .port("pg", 5432, 5432, TCP)
        .ep("10.244.2.9", REMOTE);
    headless.svc.headless = true;
    headless.add(&mut c);
    let h = harness(&c);
    let f = syn(sock(POD, 5000), sock("198.51.100.77", 80));
    let r = h.run(Hook::FromPod, &f).unwrap();
    assert_eq!((r.verdict, r.out.clone()), (TC_ACT_OK, f));
}

/// §5.1: ClientIP affinity pins a client to one backend for new connections, across
/// frontends of the same Service port; a backend that leaves the Service is a miss.
#[test]
fn client_ip_affinity_pins_and_a_vanished_backend_is_a_miss() {
    let svc = |eps: &[&str]| {
        let mut s = Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .node_port(30080)
            .affinity(10800);
        for e in eps {
            s = s.ep(e, REMOTE);
        }
        cluster(vec![s])
    };
    let mut h = harness(&svc(&["10.244.2.1", "10.244.2.2", "10.244.2.3"]));
    let first = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.10", 80)),
        )
        .unwrap()
        .parsed()
        .dst;
    for sport in 40001..40040 {
        let d = h
            .run(
                Hook::FromPod,
                &syn(sock(POD, sport), sock("10.96.0.10", 80)),
            )
            .unwrap()
            .parsed()
            .dst;
        assert_eq!(d, first, "pinned");
    }
    // Same client through the NodePort (another frontend of the same Service port).
    let r = h
        .run(Hook::FromPod, &syn(sock(POD, 41000), sock(NODE_IP, 30080)))
        .unwrap();
    assert_eq!(r.parsed().dst, first, "affinity is per Service port");
    // Other clients spread.
    let mut others = BTreeSet::new();
    for i in 2..60 {
        let c = format!("10.244.1.{i}");
        others.insert(
            h.run(Hook::FromPod, &syn(sock(&c, 40000), sock("10.96.0.10", 80)))
                .unwrap()
                .parsed()
                .dst,
        );
    }
    assert!(others.len() > 1);
    // The pinned backend leaves the Service (it may still exist for other Services).
    let remaining: Vec<String> = ["10.244.2.1", "10.244.2.2", "10.244.2.3"]
        .iter()
        .filter(|e| e.parse::<std::net::IpAddr>().unwrap() != first)
        .map(|e| e.to_string())
        .collect();
    h.program(&image_of(&svc(&remaining
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>())))
        .unwrap();
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 42000), sock("10.96.0.10", 80)),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK, "a miss, not a drop");
    let now = r.parsed().dst;
    assert_ne!(now, first);
    for sport in 42001..42010 {
        let d = h
            .run(
                Hook::FromPod,
                &syn(sock(POD, sport), sock("10.96.0.10", 80)),
            )
            .unwrap()
            .parsed()
            .dst;
        assert_eq!(d, now, "re-pinned to the new choice");
    }
}

/// Maglev: two nodes with the same Service pick the same backend for the same flow.
#[test]
fn maglev_picks_the_same_backend_on_every_node() {
    let c = cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .maglev()
            .ep("10.244.2.1", REMOTE)
            .ep("10.244.2.2", REMOTE)
            .ep("10.244.2.3", REMOTE)
            .ep("10.244.2.4", REMOTE),
    ]);
    let a = harness(&c);
    let b = harness(&c);
    let mut used = BTreeSet::new();
    for i in 0..200u16 {
        let f = syn(
            sock(&format!("10.244.1.{}", 2 + i % 200), 30000 + i),
            sock("10.96.0.10", 80),
        );
        let da = a.run(Hook::FromPod, &f).unwrap().parsed().dst;
        let db = b.run(Hook::FromPod, &f).unwrap().parsed().dst;
        assert_eq!(da, db, "flow {i}");
        used.insert(da);
    }
    assert_eq!(used.len(), 4, "all backends used: {used:?}");
}

/// Established TCP whose backend was removed: reset; a new SYN is re-balanced.
#[test]
fn tcp_to_a_removed_backend_is_reset_and_new_connections_rebalanced() {
    let with = |ep: &str| {
        cluster(vec![
            Svc::new("web", &["10.96.0.10"])
                .port("http", 80, 8080, TCP)
                .ep(ep, REMOTE),
        ])
    };
    require_root();
    let mut st = Stepper::new();
    let mut h = ProgHarness::new().unwrap();
    h.program(&st.image(&with("10.244.2.1"))).unwrap();
    let c = sock(POD, 40000);
    let v = sock("10.96.0.10", 80);
    h.run(Hook::FromPod, &syn(c, v)).unwrap();
    h.program(&st.image(&with("10.244.2.2"))).unwrap();
    let ack = packet::tcp_with(&Default::default(), c, v, ACK, 1001, 5000, b"more");
    let r = h.run(Hook::FromPod, &ack).unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    let p = r.parsed();
    assert_eq!(p.tcp_flags, RST, "RST without ACK: the segment had ACK");
    assert_eq!(
        (p.src.to_string(), p.sport),
        ("10.96.0.10".into(), 80),
        "from the VIP the client knows"
    );
    assert_eq!(count(&h, REASON_BACKEND_GONE_RESET, DIR_EGRESS), 1);
    let r = h.run(Hook::FromPod, &syn(sock(POD, 40001), v)).unwrap();
    assert_fwd(&r, POD, Some(40001), "10.244.2.2", 8080);
}

/// The same when the removed backend's id is reused by a new backend right away (ids
/// are freed and reused): the connection must not silently move to the new backend.
#[test]
fn a_reused_backend_id_does_not_inherit_old_connections() {
    let with = |ep: &str| {
        cluster(vec![
            Svc::new("web", &["10.96.0.10"])
                .port("http", 80, 8080, TCP)
                .ep(ep, REMOTE),
        ])
    };
    let mut h = harness(&with("10.244.2.1"));
    let (c, v) = (sock(POD, 40000), sock("10.96.0.10", 80));
    h.run(Hook::FromPod, &syn(c, v)).unwrap();
    // A fresh pipeline allocates id 1 again, now for 10.244.2.2.
    h.program(&image_of(&with("10.244.2.2"))).unwrap();
    let r = h
        .run(Hook::FromPod, &packet::tcp(c, v, ACK, b"more"))
        .unwrap();
    assert_eq!(
        r.verdict, TC_ACT_REDIRECT,
        "reset, not forwarded to a backend that never saw the handshake"
    );
}

/// UDP whose backend was removed: the next datagram goes to a live backend.
#[test]
fn udp_to_a_removed_backend_is_rebalanced_at_once() {
    let with = |ep: &str| {
        cluster(vec![
            Svc::new("dns", &["10.96.0.53"])
                .port("dns", 53, 53, UDP)
                .ep(ep, REMOTE),
        ])
    };
    let mut h = harness(&with("10.244.2.1"));
    let q = packet::udp(sock(POD, 5000), sock("10.96.0.53", 53), b"q");
    assert_eq!(
        h.run(Hook::FromPod, &q).unwrap().parsed().dst.to_string(),
        "10.244.2.1"
    );
    h.program(&image_of(&with("10.244.2.2"))).unwrap();
    assert_eq!(
        h.run(Hook::FromPod, &q).unwrap().parsed().dst.to_string(),
        "10.244.2.2"
    );
}

/// §1.3: terminating endpoints are used only when no ready endpoint exists.
#[test]
fn serving_terminating_endpoints_are_a_fallback_only() {
    let c = |ready: bool| {
        let mut s = Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .ep_cond("10.244.2.1", REMOTE, Some(false), Some(true), Some(true));
        if ready {
            s = s.ep("10.244.2.2", REMOTE);
        }
        cluster(vec![s])
    };
    let h = harness(&c(true));
    for sport in 40000..40030 {
        let r = h
            .run(
                Hook::FromPod,
                &syn(sock(POD, sport), sock("10.96.0.10", 80)),
            )
            .unwrap();
        assert_fwd(&r, POD, Some(sport), "10.244.2.2", 8080);
    }
    let h = harness(&c(false));
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.10", 80)),
        )
        .unwrap();
    assert_fwd(&r, POD, Some(40000), "10.244.2.1", 8080);
}

/// Dual stack: each family's frontend uses that family's endpoints.
#[test]
fn dual_stack_services_translate_each_family_to_its_own_endpoints() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.10", "fd00:96::10"])
            .port("http", 80, 8080, TCP)
            .ep("10.244.2.1", REMOTE)
            .ep("fd00:244:2::1", REMOTE),
    ]));
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.10", 80)),
        )
        .unwrap();
    assert_fwd(&r, POD, Some(40000), "10.244.2.1", 8080);
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock("fd00:244:1::5", 40000), sock("fd00:96::10", 80)),
        )
        .unwrap();
    assert_fwd(&r, "fd00:244:1::5", Some(40000), "fd00:244:2::1", 8080);
}

/// The same port number on TCP and UDP are two frontends.
#[test]
fn the_same_port_on_tcp_and_udp_are_separate_frontends() {
    let h = harness(&cluster(vec![
        Svc::new("dns", &["10.96.0.53"])
            .port("dns-tcp", 53, 5353, TCP)
            .port("dns-udp", 53, 5354, UDP)
            .ep("10.244.2.1", REMOTE),
    ]));
    let r = h
        .run(
            Hook::FromPod,
            &syn(sock(POD, 40000), sock("10.96.0.53", 53)),
        )
        .unwrap();
    assert_fwd(&r, POD, Some(40000), "10.244.2.1", 5353);
    let r = h
        .run(
            Hook::FromPod,
            &packet::udp(sock(POD, 40000), sock("10.96.0.53", 53), b"q"),
        )
        .unwrap();
    assert_fwd(&r, POD, Some(40000), "10.244.2.1", 5354);
}

/// SCTP is parsed and translated; the address change keeps the CRC32c valid (it does not
/// cover a pseudo-header).
#[test]
fn sctp_is_translated() {
    let h = harness(&cluster(vec![
        Svc::new("diam", &["10.96.0.38"])
            .port("diameter", 3868, 3868, SCTP)
            .ep("10.244.2.1", REMOTE),
    ]));
    let r = h
        .run(
            Hook::FromPod,
            &packet::sctp(sock(POD, 3868), sock("10.96.0.38", 3868)),
        )
        .unwrap();
    let p = assert_fwd(&r, POD, Some(3868), "10.244.2.1", 3868);
    assert_eq!(p.proto, packet::SCTP);
}

/// The quoted IPv4 header of an ICMP error still has a valid checksum.
fn inner_v4_header_ok(frame: &[u8]) -> bool {
    let inner = &frame[14 + 20 + 8..];
    let ihl = (inner[0] & 0xf) as usize * 4;
    packet::inet_checksum(&inner[..ihl]) == 0
}

/// ICMP port unreachable from a backend about a translated UDP flow reaches the client
/// as if the VIP had sent it (Linux NAT's ICMP reply translation).
#[test]
fn icmp_errors_about_translated_flows_are_translated_back_v4() {
    let h = harness(&cluster(vec![
        Svc::new("dns", &["10.96.0.53"])
            .port("dns", 53, 5353, UDP)
            .ep("10.244.2.1", REMOTE),
    ]));
    let q = packet::udp(sock(POD, 5000), sock("10.96.0.53", 53), b"query");
    let sent = h.run(Hook::FromPod, &q).unwrap().out;
    assert_eq!(packet::parse(&sent).unwrap().dst.to_string(), "10.244.2.1");
    let err = packet::icmp_unreachable(
        "10.244.2.1".parse().unwrap(),
        POD.parse().unwrap(),
        3,
        &sent,
    );
    let r = h.run(Hook::UplinkIn, &err).unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = r.parsed();
    assert_eq!(
        (p.src.to_string(), p.dst.to_string()),
        ("10.96.0.53".into(), POD.into())
    );
    assert!(p.ip_csum_ok, "outer IPv4 checksum");
    assert!(p.l4_csum_ok, "ICMP checksum");
    let i = p.inner.unwrap();
    assert_eq!((i.src.to_string(), i.sport), (POD.into(), 5000));
    assert_eq!((i.dst.to_string(), i.dport), ("10.96.0.53".into(), 53));
    assert!(inner_v4_header_ok(&r.out), "quoted IPv4 header checksum");
    assert_eq!(count(&h, REASON_REV_TRANSLATED, DIR_INGRESS), 1);
}

/// IPv6, with the whole datagram quoted so the quoted UDP checksum can be verified too.
#[test]
fn icmp_errors_about_translated_flows_are_translated_back_v6() {
    let client = "fd00:244:1::5";
    let h = harness(&cluster(vec![
        Svc::new("dns", &["fd00:96::53"])
            .port("dns", 53, 5353, UDP)
            .ep("fd00:244:2::1", REMOTE),
    ]));
    let sent = h
        .run(
            Hook::FromPod,
            &packet::udp(sock(client, 5000), sock("fd00:96::53", 53), b"query"),
        )
        .unwrap()
        .out;
    let err = packet::icmp_unreachable(
        "fd00:244:2::1".parse().unwrap(),
        client.parse().unwrap(),
        4,
        &sent,
    );
    let r = h.run(Hook::UplinkIn, &err).unwrap();
    let p = r.parsed();
    assert_eq!(
        (p.src.to_string(), p.dst.to_string()),
        ("fd00:96::53".into(), client.into())
    );
    assert!(
        p.l4_csum_ok,
        "ICMPv6 checksum (covers the outer addresses and the quote)"
    );
    let i = p.inner.unwrap();
    assert_eq!((i.dst.to_string(), i.dport), ("fd00:96::53".into(), 53));
    // The quote is the whole datagram: its UDP checksum must verify against the quoted
    // (translated) addresses.
    let quoted = &r.out[14 + 40 + 8..];
    let udp = &quoted[40..];
    let (s, d): (std::net::IpAddr, std::net::IpAddr) = (i.src, i.dst);
    let mut z = udp.to_vec();
    let c = u16::from_be_bytes([z[6], z[7]]);
    z[6] = 0;
    z[7] = 0;
    assert_eq!(
        packet::l4_checksum(s, d, packet::UDP, &z),
        c,
        "quoted UDP checksum"
    );
}

/// PMTU discovery through a masqueraded NodePort: "fragmentation needed" from the backend
/// about the masqueraded segment reaches the external client about its own segment.
#[test]
fn icmp_errors_through_a_masqueraded_nodeport_reach_the_client() {
    let h = harness(&cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("http", 80, 8080, TCP)
            .node_port(30080)
            .ep("10.244.2.7", REMOTE),
    ]));
    let sent = h
        .run(
            Hook::UplinkIn,
            &packet::tcp(sock(CLIENT, 5555), sock(NODE_IP, 30080), ACK, &[0; 100]),
        )
        .unwrap()
        .out;
    let s = packet::parse(&sent).unwrap();
    assert_eq!(s.src.to_string(), NODE_IP);
    let err = packet::icmp_unreachable(
        "10.244.2.7".parse().unwrap(),
        NODE_IP.parse().unwrap(),
        4,
        &sent,
    );
    let r = h.run(Hook::UplinkIn, &err).unwrap();
    let p = r.parsed();
    assert_eq!(
        (p.src.to_string(), p.dst.to_string()),
        (NODE_IP.into(), CLIENT.into())
    );
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    let i = p.inner.unwrap();
    assert_eq!((i.src.to_string(), i.sport), (CLIENT.into(), 5555));
    assert_eq!((i.dst.to_string(), i.dport), (NODE_IP.into(), 30080));
    assert!(inner_v4_header_ok(&r.out));
}

/// An ICMP error about a flow nobody translated passes untouched.
#[test]
fn unrelated_icmp_errors_pass_untouched() {
    let h = harness(&cluster(vec![]));
    let inner = packet::udp(sock(POD, 5000), sock("10.244.2.1", 53), b"q");
    let err = packet::icmp_unreachable(
        "10.244.2.1".parse().unwrap(),
        POD.parse().unwrap(),
        3,
        &inner,
    );
    let r = h.run(Hook::UplinkIn, &err).unwrap();
    assert_eq!((r.verdict, r.out), (TC_ACT_OK, err));
}

/// SCTP port translation (Service port 3868 -> targetPort 3869) keeps CRC32c valid, in
/// both directions, v4 and v6.
#[test]
fn sctp_port_translation_keeps_the_crc_valid() {
    let h = harness(&cluster(vec![
        Svc::new("diam", &["10.96.0.38", "fd00:96::38"])
            .port("diameter", 3868, 3869, SCTP)
            .ep("10.244.2.1", REMOTE)
            .ep("fd00:244:2::1", REMOTE),
    ]));
    for (client, vip, be) in [
        (POD, "10.96.0.38", "10.244.2.1"),
        ("fd00:244:1::5", "fd00:96::38", "fd00:244:2::1"),
    ] {
        let r = h
            .run(
                Hook::FromPod,
                &packet::sctp(sock(client, 40000), sock(vip, 3868)),
            )
            .unwrap();
        assert_fwd(&r, client, Some(40000), be, 3869);
        let r = h
            .run(
                Hook::UplinkIn,
                &packet::sctp(sock(be, 3869), sock(client, 40000)),
            )
            .unwrap();
        assert_fwd(&r, vip, Some(3868), client, 40000);
    }
}

/// Graceful termination: an established TCP connection to an endpoint that turns
/// terminating (still in the slice) keeps flowing; new connections avoid it. Upstream
/// never cleans TCP conntrack.
#[test]
fn established_tcp_to_a_terminating_endpoint_drains() {
    require_root();
    let c = |terminating: bool| {
        let s = Svc::new("web", &["10.96.0.10"]).port("http", 80, 8080, TCP);
        let s = if terminating {
            s.ep_cond("10.244.2.1", REMOTE, Some(false), Some(true), Some(true))
        } else {
            s.ep("10.244.2.1", REMOTE)
        };
        cluster(vec![s.ep("10.244.2.2", REMOTE)])
    };
    let mut st = Stepper::new();
    let mut h = ProgHarness::new().unwrap();
    h.program(&st.image(&c(false))).unwrap();
    // Find a connection that went to 10.244.2.1.
    let v = sock("10.96.0.10", 80);
    let port = (40000..40100)
        .find(|p| {
            h.run(Hook::FromPod, &syn(sock(POD, *p), v))
                .unwrap()
                .parsed()
                .dst
                .to_string()
                == "10.244.2.1"
        })
        .expect("some connection lands on 10.244.2.1");
    h.program(&st.image(&c(true))).unwrap();
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock(POD, port), v, ACK, b"more"),
        )
        .unwrap();
    assert_fwd(&r, POD, Some(port), "10.244.2.1", 8080);
    for p in 41000..41020 {
        let r = h.run(Hook::FromPod, &syn(sock(POD, p), v)).unwrap();
        assert_fwd(&r, POD, Some(p), "10.244.2.2", 8080);
    }
}

/// kube-proxy's UDP conntrack cleanup: a UDP flow stays with a serving endpoint, even a
/// terminating one, and moves once its endpoint stops serving.
#[test]
fn udp_flows_follow_the_serving_condition() {
    require_root();
    let c = |ready: bool, serving: bool| {
        cluster(vec![
            Svc::new("dns", &["10.96.0.53"])
                .port("dns", 53, 53, UDP)
                .ep_cond(
                    "10.244.2.1",
                    REMOTE,
                    Some(ready),
                    Some(serving),
                    Some(!ready),
                )
                .ep("10.244.2.2", REMOTE),
        ])
    };
    let mut st = Stepper::new();
    let mut h = ProgHarness::new().unwrap();
    h.program(&st.image(&c(true, true))).unwrap();
    let v = sock("10.96.0.53", 53);
    let port = (5000..5100)
        .find(|p| {
            h.run(Hook::FromPod, &packet::udp(sock(POD, *p), v, b"q"))
                .unwrap()
                .parsed()
                .dst
                .to_string()
                == "10.244.2.1"
        })
        .expect("some flow lands on 10.244.2.1");
    let q = packet::udp(sock(POD, port), v, b"q");
    h.program(&st.image(&c(false, true))).unwrap();
    assert_eq!(
        h.run(Hook::FromPod, &q).unwrap().parsed().dst.to_string(),
        "10.244.2.1",
        "terminating but serving: kept"
    );
    h.program(&st.image(&c(false, false))).unwrap();
    assert_eq!(
        h.run(Hook::FromPod, &q).unwrap().parsed().dst.to_string(),
        "10.244.2.2",
        "not serving: moved"
    );
}

/// The agent's conntrack sweep on entries the datapath made: nothing is deleted while a
/// flow is within its idle timeout (UDP and TCP-SYN-only: 60 s), everything once past
/// it, and the flow's next packet is simply tracked again.
#[test]
fn conntrack_sweep_deletes_idle_flows_made_by_the_datapath() {
    use weir::datapath::{gc, maps::open_pinned};
    require_root();
    let c = cluster(vec![
        Svc::new("web", &["10.96.0.10"])
            .port("dns", 53, 53, UDP)
            .port("http", 80, 8080, TCP)
            .ep("10.244.2.1", REMOTE),
    ]);
    let h = harness(&c);
    let q = packet::udp(sock(POD, 5353), sock("10.96.0.10", 53), b"q");
    assert_fwd(
        &h.run(Hook::FromPod, &q).unwrap(),
        POD,
        Some(5353),
        "10.244.2.1",
        53,
    );
    let s = syn(sock(POD, 40000), sock("10.96.0.10", 80));
    assert_fwd(
        &h.run(Hook::FromPod, &s).unwrap(),
        POD,
        Some(40000),
        "10.244.2.1",
        8080,
    );
    let before = h.ct().unwrap();
    assert_eq!(
        before.len(),
        4,
        "service + flow entry per connection: {before:?}"
    );

    let mut ct: aya::maps::HashMap<aya::maps::MapData, _, _> =
        open_pinned(&h.pin_dir, weir_common::maps::CT)
            .unwrap()
            .try_into()
            .unwrap();
    let now = gc::monotonic_ns();
    let s30 = gc::sweep_conntrack(&mut ct, now + 30_000_000_000);
    assert_eq!((s30.scanned, s30.deleted), (4, 0), "{s30:?}");
    assert_eq!(h.ct().unwrap(), before);
    let s61 = gc::sweep_conntrack(&mut ct, now + 61_000_000_000);
    assert_eq!((s61.scanned, s61.deleted), (4, 4), "{s61:?}");
    assert!(h.ct().unwrap().is_empty());

    assert_fwd(
        &h.run(Hook::FromPod, &q).unwrap(),
        POD,
        Some(5353),
        "10.244.2.1",
        53,
    );
    assert_eq!(h.ct().unwrap().len(), 2, "tracked again");
}
