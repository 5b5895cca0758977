//! Service load balancing in the datapath, through BPF_PROG_TEST_RUN: crafted packets,
//! maps programmed by the real pipeline, the real programs run, bytes and verdicts and
//! conntrack checked. One scenario per test, fresh maps each.

mod support;

use std::collections::BTreeSet;

use support::*;
use weir::{
    datapath::Hook,
    testing::{
        packet::{self, ACK, FIN, SYN, sock},
        prog::{ProgHarness, TC_ACT_OK, TC_ACT_REDIRECT},
    },
};
use weir_common::{
    ct::{CT_F_DNAT, CT_KIND_FLOW, CT_KIND_SVC},
    metrics::{DIR_EGRESS, REASON_NO_BACKEND_REJECT, REASON_REV_TRANSLATED, REASON_TRANSLATED},
};
use weir_core::model::Protocol;

fn harness(c: &weir_core::model::Cluster) -> ProgHarness {
    require_root();
    let mut h = ProgHarness::new().expect("load datapath");
    h.program(&image(c)).expect("program maps");
    h
}

#[test]
fn tcp_syn_to_cluster_ip_is_translated_to_the_backend_with_valid_checksums() {
    let h = harness(&cluster_ip_service(
        "10.96.0.10",
        80,
        Protocol::TCP,
        &[("10.244.1.3", 8080, NODE)],
    ));
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock("10.244.1.2", 40000), sock("10.96.0.10", 80), SYN, b""),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = r.parsed();
    assert_eq!((p.src, p.sport), ("10.244.1.2".parse().unwrap(), 40000));
    assert_eq!((p.dst, p.dport), ("10.244.1.3".parse().unwrap(), 8080));
    assert!(p.ip_csum_ok, "IPv4 header checksum broken");
    assert!(p.l4_csum_ok, "TCP checksum broken");

    let ct = h.ct().unwrap();
    let svc = ct
        .iter()
        .find(|(k, _)| k.kind == CT_KIND_SVC)
        .expect("SVC entry");
    assert_eq!(svc.0.dst.to_string(), "10.96.0.10");
    assert_eq!(svc.1.nat_dst.to_string(), "10.244.1.3");
    let flow = ct
        .iter()
        .find(|(k, _)| k.kind == CT_KIND_FLOW)
        .expect("FLOW entry");
    assert_eq!(flow.0.dst.to_string(), "10.244.1.3");
    assert_ne!(flow.1.flags & CT_F_DNAT, 0);
    assert_eq!(
        h.counters().unwrap().get(&(REASON_TRANSLATED, DIR_EGRESS)),
        Some(&1)
    );
}

#[test]
fn reply_from_the_backend_is_reverse_translated_to_the_vip() {
    let h = harness(&cluster_ip_service(
        "10.96.0.10",
        80,
        Protocol::TCP,
        &[("10.244.1.3", 8080, NODE)],
    ));
    h.run(
        Hook::FromPod,
        &packet::tcp(sock("10.244.1.2", 40000), sock("10.96.0.10", 80), SYN, b""),
    )
    .unwrap();
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(
                sock("10.244.1.3", 8080),
                sock("10.244.1.2", 40000),
                SYN | ACK,
                b"hello",
            ),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = r.parsed();
    assert_eq!((p.src.to_string(), p.sport), ("10.96.0.10".into(), 80));
    assert_eq!((p.dst.to_string(), p.dport), ("10.244.1.2".into(), 40000));
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    assert_eq!(p.payload, b"hello");
    assert_eq!(
        h.counters()
            .unwrap()
            .get(&(REASON_REV_TRANSLATED, DIR_EGRESS)),
        Some(&1)
    );
}

#[test]
fn ipv6_service_translation_and_reply_keep_checksums_valid() {
    let h = harness(&cluster_ip_service(
        "fd00:96::10",
        80,
        Protocol::TCP,
        &[("fd00:244::3", 8080, NODE)],
    ));
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(
                sock("fd00:244::2", 40000),
                sock("fd00:96::10", 80),
                SYN,
                b"",
            ),
        )
        .unwrap();
    let p = r.parsed();
    assert_eq!((p.dst.to_string(), p.dport), ("fd00:244::3".into(), 8080));
    assert!(p.l4_csum_ok, "TCP/IPv6 checksum broken");
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(
                sock("fd00:244::3", 8080),
                sock("fd00:244::2", 40000),
                SYN | ACK,
                b"",
            ),
        )
        .unwrap();
    let p = r.parsed();
    assert_eq!((p.src.to_string(), p.sport), ("fd00:96::10".into(), 80));
    assert!(p.l4_csum_ok);
}

#[test]
fn udp_checksums_stay_valid_and_a_zero_checksum_stays_zero() {
    let h = harness(&cluster_ip_service(
        "10.96.0.53",
        53,
        Protocol::UDP,
        &[("10.244.1.9", 5353, NODE)],
    ));
    let with = h
        .run(
            Hook::FromPod,
            &packet::udp(sock("10.244.1.2", 5000), sock("10.96.0.53", 53), b"query"),
        )
        .unwrap()
        .parsed();
    assert_eq!(
        (with.dst.to_string(), with.dport),
        ("10.244.1.9".into(), 5353)
    );
    assert!(with.l4_csum_ok);
    let without = h
        .run(
            Hook::FromPod,
            &packet::udp_with(
                &Default::default(),
                sock("10.244.1.2", 5001),
                sock("10.96.0.53", 53),
                b"q",
                false,
            ),
        )
        .unwrap()
        .parsed();
    assert_eq!(without.dport, 5353);
    assert_eq!(
        without.udp_csum,
        Some(0),
        "a UDP datagram without checksum must keep checksum 0"
    );
    assert!(without.ip_csum_ok);
}

#[test]
fn connections_spread_over_backends_and_each_connection_sticks_to_one() {
    let h = harness(&cluster_ip_service(
        "10.96.0.10",
        80,
        Protocol::TCP,
        &[("10.244.1.3", 8080, NODE), ("10.244.1.4", 8080, NODE)],
    ));
    let mut seen = BTreeSet::new();
    for port in 40000..40064 {
        let syn = packet::tcp(sock("10.244.1.2", port), sock("10.96.0.10", 80), SYN, b"");
        let first = h.run(Hook::FromPod, &syn).unwrap().parsed().dst;
        // Later packets of the same connection go where the first went.
        for _ in 0..3 {
            let ack = packet::tcp(sock("10.244.1.2", port), sock("10.96.0.10", 80), ACK, b"x");
            assert_eq!(h.run(Hook::FromPod, &ack).unwrap().parsed().dst, first);
        }
        seen.insert(first);
    }
    // 64 random picks between 2 backends all landing on one has probability 2^-63.
    assert_eq!(seen.len(), 2, "both backends should be chosen: {seen:?}");
}

#[test]
fn a_new_syn_after_the_connection_closed_gets_a_fresh_entry() {
    let h = harness(&cluster_ip_service(
        "10.96.0.10",
        80,
        Protocol::TCP,
        &[("10.244.1.3", 8080, NODE)],
    ));
    let c = sock("10.244.1.2", 40000);
    let v = sock("10.96.0.10", 80);
    h.run(Hook::FromPod, &packet::tcp(c, v, SYN, b"")).unwrap();
    h.run(Hook::FromPod, &packet::tcp(c, v, FIN | ACK, b""))
        .unwrap();
    let before = h.ct().unwrap();
    let created = before.values().map(|e| e.created_ns).max().unwrap();
    h.run(Hook::FromPod, &packet::tcp(c, v, SYN, b"")).unwrap();
    let after = h.ct().unwrap();
    let svc = after.iter().find(|(k, _)| k.kind == CT_KIND_SVC).unwrap().1;
    assert!(
        svc.created_ns > created,
        "the closed connection's entry must be replaced"
    );
    assert_eq!(svc.flags & weir_common::ct::CT_F_FIN_FWD, 0);
}

#[test]
fn a_syn_to_a_service_without_endpoints_is_answered_with_a_reset_from_the_vip() {
    let h = harness(&cluster_ip_service("10.96.0.10", 80, Protocol::TCP, &[]));
    let syn = packet::tcp_with(
        &Default::default(),
        sock("10.244.1.2", 40000),
        sock("10.96.0.10", 80),
        SYN,
        7000,
        0,
        b"",
    );
    let r = h.run(Hook::FromPod, &syn).unwrap();
    assert_eq!(
        r.verdict, TC_ACT_REDIRECT,
        "sent back out of the interface it came in on"
    );
    let p = r.parsed();
    assert_eq!((p.src.to_string(), p.sport), ("10.96.0.10".into(), 80));
    assert_eq!((p.dst.to_string(), p.dport), ("10.244.1.2".into(), 40000));
    assert_eq!(p.tcp_flags, packet::RST | ACK);
    // RFC 9293: no ACK on the offending segment -> seq 0, ack = SEG.SEQ + SEG.LEN (SYN counts 1).
    assert_eq!(tcp_seq_ack(&r.out), (0, 7001));
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    assert_eq!(p.dst_mac, syn[6..12], "addressed back to the sender's MAC");
    assert_eq!(
        h.counters()
            .unwrap()
            .get(&(REASON_NO_BACKEND_REJECT, DIR_EGRESS)),
        Some(&1)
    );
}

fn tcp_seq_ack(frame: &[u8]) -> (u32, u32) {
    let l4 = &frame[14 + ((frame[14] & 0xf) as usize) * 4..];
    (
        u32::from_be_bytes(l4[4..8].try_into().unwrap()),
        u32::from_be_bytes(l4[8..12].try_into().unwrap()),
    )
}

#[test]
fn traffic_to_other_addresses_passes_untouched() {
    let h = harness(&cluster_ip_service(
        "10.96.0.10",
        80,
        Protocol::TCP,
        &[("10.244.1.3", 8080, NODE)],
    ));
    let f = packet::tcp(sock("10.244.1.2", 40000), sock("10.244.1.7", 80), SYN, b"");
    let r = h.run(Hook::FromPod, &f).unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.out, f);
}
