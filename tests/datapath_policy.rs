//! NetworkPolicy in the datapath through BPF_PROG_TEST_RUN: the real programs on crafted
//! packets over maps the agent's pipeline compiled, one situation per test, plus every
//! case of tests/data/policy compared packet by packet with the evaluator.
//!
//! The cluster is the upstream x/y/z model of tests/data/policy/model.yaml; the node under
//! test is node-1 (x/a, x/c dual-stack; y/a, y/c, z/a, z/c), node-2 holds the b pods.
//! `tc_from_pod` runs the source pod's egress, `tc_to_pod` the destination pod's ingress
//! (weir_common::policy documents the sequence).

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use support::{Svc, policy as pol, require_root};
use weir::{
    datapath::Hook,
    source::{dir, yaml},
    testing::{
        packet::{self, ACK, Frame, SYN, sock},
        prog::{ProgHarness, TC_ACT_OK, TC_ACT_SHOT},
    },
};
use weir_common::{
    Addr,
    ct::{CT_F_EGRESS_OK, CT_F_INGRESS_OK, CT_KIND_FLOW},
    metrics::*,
    policy::{EVENT_POLICY_DROP, PolicyEvent, RULE_KIND_ALLOW, RULE_KIND_DEFAULT_DENY},
};
use weir_core::{
    model::{Cluster, Protocol},
    pipeline::{NodeSettings, Pipeline},
    policy::{
        Direction,
        eval::{self, Decision, end_for},
        lookup::{self, Outcome},
    },
};

const NODE1: &str = "node-1";
const XA: &str = "10.244.0.10";
const XA6: &str = "fd00:244::10";
const XB: &str = "10.244.0.11";
const XC: &str = "10.244.0.12";
const XC6: &str = "fd00:244::12";
const YA: &str = "10.244.1.10";
const YC: &str = "10.244.1.12";
const ZA: &str = "10.244.2.10";
const ZC: &str = "10.244.2.12";
const NODE1_IP: &str = "192.168.100.1";
const NODE2_IP: &str = "192.168.100.2";

/// The model plus `extra` YAML (objects of the same name replace the model's).
fn cluster(extra: &str) -> Cluster {
    let model = std::fs::read_to_string(format!("{}/model.yaml", pol::DATA)).unwrap();
    let (mut objs, errs) = yaml::parse_documents(&model, "model.yaml");
    assert!(errs.is_empty(), "{errs:?}");
    let (more, errs) = yaml::parse_documents(extra, "test");
    assert!(errs.is_empty(), "{errs:?}");
    objs.extend(more);
    let (c, errs) = dir::to_cluster(&objs);
    assert!(errs.is_empty(), "{errs:?}");
    c
}

fn settings() -> NodeSettings {
    NodeSettings {
        node_name: NODE1.into(),
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

/// The datapath of node-1 with everything the agent would program for `c`, and the
/// pipeline that compiled it (kept so that later steps keep their ids, as the agent does).
struct Node {
    h: ProgHarness,
    pipeline: Pipeline,
    generation: u64,
    /// The CPU this test runs on (pinned: the decision record is per CPU).
    cpu: usize,
}

/// Pins the calling thread to the CPU it is on, so that every BPF_PROG_TEST_RUN of the
/// test runs there and leaves its decision record in that CPU's `WORK` slot.
fn pin_to_this_cpu() -> usize {
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
        cpu as usize
    }
}

impl Node {
    fn new(c: &Cluster) -> Node {
        require_root();
        let mut n = Node {
            h: ProgHarness::new().expect("load datapath"),
            pipeline: Pipeline::new(settings()),
            generation: 0,
            cpu: pin_to_this_cpu(),
        };
        n.program(c);
        n
    }

    fn program(&mut self, c: &Cluster) {
        self.generation += 1;
        let (img, errs) = self.pipeline.desired(c, self.generation);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(self.pipeline.policy_errors().is_empty());
        self.h.program(&img).expect("program maps");
    }

    fn run(&self, hook: Hook, frame: &[u8]) -> i32 {
        self.h.run(hook, frame).unwrap().verdict
    }

    /// Runs `frame` through the source pod's hook and then, with what came out, through
    /// the destination pod's hook (both pods on this node): the two verdicts.
    fn both(&self, frame: &[u8]) -> (i32, i32) {
        let r = self.h.run(Hook::FromPod, frame).unwrap();
        if r.verdict != TC_ACT_OK {
            return (r.verdict, TC_ACT_SHOT);
        }
        (r.verdict, self.run(Hook::ToPod, &r.out))
    }

    fn count(&self, reason: u8, dir: u8) -> u64 {
        self.h
            .counters()
            .unwrap()
            .get(&(reason, dir))
            .copied()
            .unwrap_or(0)
    }

    /// The decision record of the last packet run.
    fn last(&self) -> PolicyEvent {
        self.h.decisions().unwrap()[self.cpu]
    }

    /// The last packet was dropped by policy, from `src` to `dst` as policy saw them.
    fn dropped(&self, src: &str, dst: &str) -> PolicyEvent {
        let e = self.last();
        assert_eq!(
            e.kind, EVENT_POLICY_DROP,
            "the last packet was no policy drop: {e:?}"
        );
        assert_eq!((e.src, e.dst), (addr(src), addr(dst)), "{e:?}");
        e
    }

    /// Per-rule packet counts, by `namespace/name` and rule kind/index.
    fn rule_counts(&self) -> BTreeMap<String, u64> {
        let rules = self.pipeline.policy.current().rules.clone();
        self.h
            .dp
            .policy_counters()
            .unwrap()
            .into_iter()
            .filter(|(_, c)| c.packets > 0)
            .map(|(id, c)| {
                let r = &rules[&id];
                let what = match r.kind {
                    RULE_KIND_ALLOW => format!("#{}", r.index),
                    RULE_KIND_DEFAULT_DENY => "default-deny".into(),
                    _ => "?".into(),
                };
                let dir = if r.direction == DIR_EGRESS {
                    "egress"
                } else {
                    "ingress"
                };
                (format!("{} {dir} {what}", r.name()), c.packets)
            })
            .collect()
    }
}

fn addr(ip: &str) -> Addr {
    Addr::from_ip(ip.parse::<IpAddr>().unwrap())
}

fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
    packet::tcp(src, dst, flags, b"")
}

/// Policies used by several tests, in the spirit of T27/T28 (docs/upstream-netpol.md):
/// - x/a: egress only to x/c and y/a on port 80 (TCP, UDP); ingress from nobody;
/// - x/c and y/a: ingress only from x/a on port 80 (TCP, UDP); egress to nobody.
///
/// So x/a -> x/c and x/a -> y/a on 80 are allowed by both ends, and everything else that
/// involves these pods is denied, replies excepted.
const PAIR: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-out, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress: []
  egress:
  - to:
    - podSelector: {matchLabels: {pod: c}}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}
      podSelector: {matchLabels: {pod: a}}
    ports: [{port: 80}, {port: 80, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-in, namespace: x}
spec:
  podSelector: {matchLabels: {pod: c}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: a}}
    ports: [{port: 80}, {port: 80, protocol: UDP}]
  egress: []
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-in, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}
      podSelector: {matchLabels: {pod: a}}
    ports: [{port: 80}, {port: 80, protocol: UDP}]
  egress: []
"#;

#[test]
fn pods_no_policy_selects_pass_and_nothing_is_tracked() {
    let n = Node::new(&cluster(""));
    for (s, d) in [(XA, YA), (XA6, XC6), (YC, ZA)] {
        let (e, i) = n.both(&tcp(sock(s, 40000), sock(d, 80), SYN));
        assert_eq!((e, i), (TC_ACT_OK, TC_ACT_OK), "{s} -> {d}");
        let u = packet::udp(sock(s, 40000), sock(d, 53), b"q");
        assert_eq!(n.both(&u), (TC_ACT_OK, TC_ACT_OK));
    }
    // Not isolated: one ENDPOINTS lookup, no conntrack state for policy's sake.
    assert!(n.h.ct().unwrap().is_empty(), "{:?}", n.h.ct().unwrap());
    assert_eq!(n.count(REASON_FORWARDED, DIR_EGRESS), 6);
    assert_eq!(n.count(REASON_FORWARDED, DIR_INGRESS), 6);
}

/// Drop reasons: isolated without any rule for the direction (`policy_isolated`), and
/// isolated with rules none of which matches (`policy_denied`); counted per reason and
/// direction, per rule, and recorded in the per-packet decision record.
#[test]
fn denied_connections_are_dropped_with_their_reason_counted_and_recorded() {
    let n = Node::new(&cluster(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-ingress, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress], ingress: []}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-b, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 80}]
"#,
    ));
    // x/a: isolated, no rules.
    let (e, i) = n.both(&tcp(sock(ZA, 40000), sock(XA, 80), SYN));
    assert_eq!((e, i), (TC_ACT_OK, TC_ACT_SHOT));
    let ev = n.dropped(ZA, XA);
    assert_eq!(
        (ev.direction, ev.reason, u16::from_be(ev.dport_be), ev.proto),
        (DIR_INGRESS, REASON_POLICY_ISOLATED, 80, packet::TCP)
    );
    assert_ne!(ev.rule_id, 0, "the default-deny rule of x/deny-ingress");
    assert_ne!(ev.policy_key, 0);
    // The same for IPv6 (x/c's second address).
    let (_, i) = n.both(&tcp(sock(XA6, 40000), sock(XC6, 80), SYN));
    assert_eq!(i, TC_ACT_SHOT);
    assert_eq!(n.dropped(XA6, XC6).reason, REASON_POLICY_ISOLATED);
    // y/a: isolated with a rule; from y/b (node-2) it matches, from z/a not.
    let (_, i) = n.both(&tcp(sock(ZA, 40001), sock(YA, 80), SYN));
    assert_eq!(i, TC_ACT_SHOT);
    assert_eq!(n.dropped(ZA, YA).reason, REASON_POLICY_DENIED);
    let from_yb = tcp(sock("10.244.1.11", 40002), sock(YA, 80), SYN);
    assert_eq!(n.run(Hook::ToPod, &from_yb), TC_ACT_OK);
    // Port 81 from y/b: no rule.
    let from_yb = tcp(sock("10.244.1.11", 40003), sock(YA, 81), SYN);
    assert_eq!(n.run(Hook::ToPod, &from_yb), TC_ACT_SHOT);

    assert_eq!(n.count(REASON_POLICY_ISOLATED, DIR_INGRESS), 2);
    assert_eq!(n.count(REASON_POLICY_DENIED, DIR_INGRESS), 2);
    assert_eq!(n.count(REASON_POLICY_DENIED, DIR_EGRESS), 0);
    assert_eq!(
        n.rule_counts(),
        BTreeMap::from([
            ("x/deny-ingress ingress default-deny".to_string(), 2),
            ("y/from-b ingress #0".to_string(), 1),
            ("y/from-b ingress default-deny".to_string(), 2),
        ])
    );
    // An allowed packet leaves no drop record behind.
    let again = tcp(sock("10.244.1.11", 40004), sock(YA, 80), SYN);
    assert_eq!(n.run(Hook::ToPod, &again), TC_ACT_OK);
    assert_eq!(n.last().kind, 0, "a drop recorded for an allowed packet");
}

#[test]
fn egress_is_decided_at_the_source_pod_v4_and_v6() {
    let n = Node::new(&cluster(PAIR));
    // Allowed: x/a -> x/c:80 (both families), x/a -> y/a:80.
    for (s, d) in [(XA, XC), (XA6, XC6), (XA, YA)] {
        assert_eq!(
            n.run(Hook::FromPod, &tcp(sock(s, 40000), sock(d, 80), SYN)),
            TC_ACT_OK,
            "{s} -> {d}:80"
        );
    }
    // Denied: another port, another pod, a node-2 pod, the outside world.
    for (s, d, port) in [
        (XA, XC, 81),
        (XA6, XC6, 81),
        (XA, ZA, 80),
        (XA, XB, 80),
        (XA, "8.8.8.8", 80),
        (XA6, "2001:db8::1", 80),
    ] {
        let f = tcp(sock(s, 40000), sock(d, port), SYN);
        assert_eq!(n.run(Hook::FromPod, &f), TC_ACT_SHOT, "{s} -> {d}:{port}");
        let ev = n.dropped(s, d);
        assert_eq!(
            (ev.direction, ev.reason),
            (DIR_EGRESS, REASON_POLICY_DENIED)
        );
    }
    // x/c may send nothing (egress: []), y/c is not isolated at all.
    let f = tcp(sock(XC, 40000), sock(YC, 80), SYN);
    assert_eq!(n.run(Hook::FromPod, &f), TC_ACT_SHOT);
    assert_eq!(n.dropped(XC, YC).reason, REASON_POLICY_ISOLATED);
    let f = tcp(sock(YC, 40000), sock(ZC, 80), SYN);
    assert_eq!(n.run(Hook::FromPod, &f), TC_ACT_OK);
    assert_eq!(n.count(REASON_POLICY_DENIED, DIR_EGRESS), 6);
    assert_eq!(n.count(REASON_POLICY_ISOLATED, DIR_EGRESS), 1);
}

#[test]
fn sctp_udp_and_tcp_are_told_apart() {
    let n = Node::new(&cluster(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sctp-only, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - ports: [{port: 80, protocol: SCTP}]
"#,
    ));
    let sctp = packet::sctp(sock(ZA, 3868), sock(YA, 80));
    let r = n.h.run(Hook::ToPod, &sctp).unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    assert!(r.parsed().l4_csum_ok, "the CRC32c is left intact");
    assert_eq!(r.out, sctp);
    // Another SCTP port, and TCP/UDP on port 80.
    let sctp81 = packet::sctp(sock(ZA, 3868), sock(YA, 81));
    assert_eq!(n.run(Hook::ToPod, &sctp81), TC_ACT_SHOT);
    assert_eq!(n.dropped(ZA, YA).proto, packet::SCTP);
    assert_eq!(
        n.run(Hook::ToPod, &tcp(sock(ZA, 3868), sock(YA, 80), SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        n.run(
            Hook::ToPod,
            &packet::udp(sock(ZA, 3868), sock(YA, 80), b"x")
        ),
        TC_ACT_SHOT
    );
    // The SCTP association's later packets and replies pass through conntrack.
    assert_eq!(n.run(Hook::ToPod, &sctp), TC_ACT_OK);
    let reply = packet::sctp(sock(YA, 80), sock(ZA, 3868));
    assert_eq!(n.run(Hook::FromPod, &reply), TC_ACT_OK);
}

/// R6: replies of an allowed connection pass in both directions, although the server may
/// send nothing (egress: []) and the client accept nothing (ingress: []); the same
/// packets are denied when they are not replies.
#[test]
fn replies_of_an_allowed_connection_pass_both_ways() {
    let n = Node::new(&cluster(PAIR));
    for (client, server) in [(XA, YA), (XA6, XC6)] {
        let c = sock(client, 40000);
        let s = sock(server, 80);
        assert_eq!(n.both(&tcp(c, s, SYN)), (TC_ACT_OK, TC_ACT_OK), "SYN");
        assert_eq!(
            n.both(&tcp(s, c, SYN | ACK)),
            (TC_ACT_OK, TC_ACT_OK),
            "SYN-ACK"
        );
        assert_eq!(n.both(&tcp(c, s, ACK)), (TC_ACT_OK, TC_ACT_OK), "ACK");
        assert_eq!(n.both(&tcp(s, c, ACK)), (TC_ACT_OK, TC_ACT_OK), "data");
        let uc = sock(client, 40001);
        assert_eq!(n.both(&packet::udp(uc, s, b"q")), (TC_ACT_OK, TC_ACT_OK));
        assert_eq!(n.both(&packet::udp(s, uc, b"a")), (TC_ACT_OK, TC_ACT_OK));
        // The flow entry records both ends' verdicts.
        let ct = n.h.ct().unwrap();
        let e = ct
            .iter()
            .find(|(k, _)| {
                k.kind == CT_KIND_FLOW && k.src == addr(client) && k.dport_be == 80u16.to_be()
            })
            .expect("a flow entry");
        assert_eq!(
            e.1.flags & (CT_F_EGRESS_OK | CT_F_INGRESS_OK),
            CT_F_EGRESS_OK | CT_F_INGRESS_OK
        );

        // Not replies: the server opening a connection to the client, on any port,
        // even from the port it serves on.
        let (e, _) = n.both(&tcp(sock(server, 40002), sock(client, 80), SYN));
        assert_eq!(e, TC_ACT_SHOT, "{server} may not connect out");
        let (e, _) = n.both(&tcp(s, sock(client, 40009), SYN | ACK));
        assert_eq!(e, TC_ACT_SHOT, "an answer to nothing");
        // What the client's ingress says to the same packet arriving from elsewhere.
        assert_eq!(
            n.run(Hook::ToPod, &tcp(s, sock(client, 40009), SYN | ACK)),
            TC_ACT_SHOT
        );
    }
}

/// A flow one end refused has no replies: the entry the other end's hook made does not
/// make the refusing pod's packets answers.
#[test]
fn a_connection_one_end_refused_has_no_replies() {
    // x/a may send anywhere; y/a accepts nothing and sends nothing.
    let n = Node::new(&cluster(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out-all, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress: []
  egress: [{}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: closed, namespace: y}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress, Egress], ingress: [], egress: []}
"#,
    ));
    let c = sock(XA, 40000);
    let s = sock(YA, 80);
    assert_eq!(n.both(&tcp(c, s, SYN)), (TC_ACT_OK, TC_ACT_SHOT));
    // x/a's hook tracked the connection; y/a's refused it: y/a cannot answer it.
    assert_eq!(n.run(Hook::FromPod, &tcp(s, c, SYN | ACK)), TC_ACT_SHOT);
    assert_eq!(n.dropped(YA, XA).direction, DIR_EGRESS);

    // The other way round: a packet from x/a that y/a admitted without x/a's hook
    // having seen it (x/a isolated for egress) does not open x/a to y/a's answers.
    let n = Node::new(&cluster(PAIR));
    let c = sock(XA, 41000);
    assert_eq!(
        n.run(Hook::ToPod, &tcp(c, s, SYN)),
        TC_ACT_OK,
        "y/a admits x/a"
    );
    assert_eq!(n.run(Hook::FromPod, &tcp(s, c, SYN | ACK)), TC_ACT_OK);
    assert_eq!(n.run(Hook::ToPod, &tcp(s, c, SYN | ACK)), TC_ACT_SHOT);
    assert_eq!(n.dropped(YA, XA).direction, DIR_INGRESS);
}

/// A TCP segment without SYN is no reply unless conntrack knows its connection: to an
/// isolated pod it is looked up like a new connection and dropped when policy does not
/// allow it (a stateful firewall that accepts mid-stream ACKs would let it in).
#[test]
fn tcp_without_syn_and_without_state_is_a_new_connection() {
    let n = Node::new(&cluster(PAIR));
    // Looks like y/a answering x/a, but x/a never connected: x/a accepts nothing.
    let fake = tcp(sock(YA, 80), sock(XA, 40000), ACK);
    assert_eq!(n.run(Hook::ToPod, &fake), TC_ACT_SHOT);
    assert_eq!(n.dropped(YA, XA).reason, REASON_POLICY_ISOLATED);
    // From a pod y/a does not accept on a port it does not accept.
    let ack = tcp(sock(ZA, 5555), sock(YA, 80), ACK | packet::PSH);
    assert_eq!(n.run(Hook::ToPod, &ack), TC_ACT_SHOT);
    assert_eq!(n.dropped(ZA, YA).reason, REASON_POLICY_DENIED);
    // From a source its policy allows, the segment is a connection like any other.
    let ack = tcp(sock(XA, 5555), sock(YA, 80), ACK);
    assert_eq!(n.run(Hook::ToPod, &ack), TC_ACT_OK);
    // Once a connection is tracked, its segments pass.
    let c = sock(XA, 40000);
    let s = sock(YA, 80);
    n.both(&tcp(c, s, SYN));
    assert_eq!(n.run(Hook::ToPod, &tcp(s, c, ACK)), TC_ACT_OK);
}

/// ICMP errors about an allowed connection pass with it (the quoted tuple has a flow
/// entry): errors the server sends about the client's datagrams, errors a router sends
/// the client; unrelated errors are policy's like any packet (port 0 of ICMP).
#[test]
fn icmp_errors_of_an_allowed_connection_pass() {
    let n = Node::new(&cluster(PAIR));
    for (client, server, router) in [(XA, YA, NODE2_IP), (XA6, XC6, "fd00:100::2")] {
        let q = packet::udp(sock(client, 40000), sock(server, 80), b"q");
        assert_eq!(n.both(&q), (TC_ACT_OK, TC_ACT_OK));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The server's port unreachable about the datagram: out of the server (egress
        // deny-all) and into the client (ingress deny-all).
        let err = packet::icmp_unreachable(ip(server), ip(client), 3, &q);
        assert_eq!(n.both(&err), (TC_ACT_OK, TC_ACT_OK), "{server}'s error");
        // A router's error about it, into the client.
        let err = packet::icmp_unreachable(ip(router), ip(client), 0, &q);
        assert_eq!(n.run(Hook::ToPod, &err), TC_ACT_OK, "a router's error");
        // An error quoting a datagram that was never sent.
        let never = packet::udp(sock(client, 47000), sock(server, 80), b"q");
        let err = packet::icmp_unreachable(ip(server), ip(client), 3, &never);
        assert_eq!(n.run(Hook::FromPod, &err), TC_ACT_SHOT);
        assert_eq!(n.run(Hook::ToPod, &err), TC_ACT_SHOT);
        // ICMP echo is a protocol without ports: rules with ports do not allow it.
        let echo = packet::icmp_echo(ip(client), ip(server), 7, 1);
        assert_eq!(n.run(Hook::FromPod, &echo), TC_ACT_SHOT);
    }
}

fn fragment(src: SocketAddr, dst: SocketAddr, id: u16, first: bool, v6: bool) -> Vec<u8> {
    let f = Frame {
        ip_id: id,
        frag_offset: if first { 0 } else { 3 },
        more_fragments: first,
        v6_fragment: v6,
        ..Default::default()
    };
    if first {
        // A UDP header (ports) and the start of the payload.
        packet::udp_with(&f, src, dst, &[7u8; 16], false)
    } else {
        packet::ip_frame(&f, src.ip(), dst.ip(), packet::UDP, &[8u8; 24])
    }
}

/// Later fragments carry no ports: they get what the first fragment of their datagram
/// got (tracked by addresses, protocol and IP identification); a later fragment whose
/// first was not seen has no decision and is dropped where policy applies.
#[test]
fn fragments_follow_their_first_fragment_v4_and_v6() {
    let n = Node::new(&cluster(PAIR));
    for (v6, client, server, other) in [(false, XA, YA, ZA), (true, XA6, XC6, "fd00:244::99")] {
        let base: u16 = if v6 { 1000 } else { 100 };
        let c = sock(client, 40000);
        let s = sock(server, 80);
        // Allowed datagram: first and later fragments pass both hooks.
        assert_eq!(
            n.both(&fragment(c, s, base, true, v6)),
            (TC_ACT_OK, TC_ACT_OK)
        );
        assert_eq!(
            n.both(&fragment(c, s, base, false, v6)),
            (TC_ACT_OK, TC_ACT_OK)
        );
        // Denied datagram (the client may not send to port 81): the later fragment
        // is dropped for the same reason.
        let s81 = sock(server, 81);
        let before = n.count(REASON_POLICY_DENIED, DIR_EGRESS);
        assert_eq!(
            n.run(Hook::FromPod, &fragment(c, s81, base + 1, true, v6)),
            TC_ACT_SHOT
        );
        assert_eq!(
            n.run(Hook::FromPod, &fragment(c, s81, base + 1, false, v6)),
            TC_ACT_SHOT
        );
        assert_eq!(n.count(REASON_POLICY_DENIED, DIR_EGRESS), before + 2);
        let ev = n.dropped(client, server);
        assert_eq!(
            u16::from_be(ev.dport_be),
            81,
            "the later fragment names the port"
        );
        // Into the server from a source it does not accept.
        let o = sock(other, 5000);
        assert_eq!(
            n.run(Hook::ToPod, &fragment(o, s, base + 2, true, v6)),
            TC_ACT_SHOT
        );
        assert_eq!(
            n.run(Hook::ToPod, &fragment(o, s, base + 2, false, v6)),
            TC_ACT_SHOT
        );
        // Same addresses, another datagram (another id) whose first was never seen.
        let before = n.count(REASON_FRAGMENT, DIR_INGRESS);
        assert_eq!(
            n.run(Hook::ToPod, &fragment(c, s, base + 3, false, v6)),
            TC_ACT_SHOT
        );
        assert_eq!(n.count(REASON_FRAGMENT, DIR_INGRESS), before + 1);
    }
    // Where no policy applies, later fragments pass as before.
    let later = fragment(sock(YC, 1), sock(ZC, 2), 4242, false, false);
    assert_eq!(n.both(&later), (TC_ACT_OK, TC_ACT_OK));
}

/// Egress rules name the backend pod and its target port: a connection to a Service
/// VIP is allowed when its backend is, and dropped when not; the reply, translated back
/// to the VIP, is admitted into the client through the client's SVC entry.
#[test]
fn egress_through_a_service_vip_is_decided_on_the_backend() {
    let mut c = cluster(PAIR);
    Svc::new("to-ya", &["10.96.0.20"])
        .port("http", 8080, 80, Protocol::TCP)
        .ep(YA, NODE1)
        .add(&mut c);
    Svc::new("to-za", &["10.96.0.21"])
        .port("http", 8080, 80, Protocol::TCP)
        .ep(ZA, NODE1)
        .add(&mut c);
    let n = Node::new(&c);
    let client = sock(XA, 40000);
    let r =
        n.h.run(Hook::FromPod, &tcp(client, sock("10.96.0.20", 8080), SYN))
            .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = r.parsed();
    assert_eq!(
        (p.dst.to_string(), p.dport),
        (YA.to_string(), 80),
        "translated"
    );
    assert!(p.ip_csum_ok && p.l4_csum_ok);
    assert_eq!(n.run(Hook::ToPod, &r.out), TC_ACT_OK, "y/a admits x/a");
    // The reply: translated back at the server's hook, admitted at the client's.
    let r =
        n.h.run(Hook::FromPod, &tcp(sock(YA, 80), client, SYN | ACK))
            .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    assert_eq!(r.parsed().src.to_string(), "10.96.0.20");
    assert_eq!(r.parsed().sport, 8080);
    assert_eq!(
        n.run(Hook::ToPod, &r.out),
        TC_ACT_OK,
        "reply through the SVC entry"
    );

    // The other Service's backend is not allowed: dropped before translation.
    let f = tcp(sock(XA, 40001), sock("10.96.0.21", 8080), SYN);
    assert_eq!(n.run(Hook::FromPod, &f), TC_ACT_SHOT);
    let ev = n.dropped(XA, ZA);
    assert_eq!(ev.orig_dst, addr("10.96.0.21"));
    assert_eq!(
        (u16::from_be(ev.dport_be), u16::from_be(ev.orig_dport_be)),
        (80, 8080)
    );
    assert_eq!(ev.reason, REASON_POLICY_DENIED);
    // Nothing was tracked for the denied connection.
    assert!(
        n.h.ct()
            .unwrap()
            .keys()
            .all(|k| k.sport_be != 40001u16.to_be())
    );
}

/// NodePort traffic from outside to an isolated backend: translated at the uplink,
/// decided at the backend's veth on the original client address.
#[test]
fn nodeport_traffic_is_decided_at_the_backend() {
    let mut c = cluster(&format!(
        "{PAIR}---\n{}",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-outside, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]
"#
    ));
    Svc::new("np", &["10.96.0.30"])
        .port("http", 80, 80, Protocol::TCP)
        .node_port(30080)
        .etp_local()
        .ep(YA, NODE1)
        .add(&mut c);
    let n = Node::new(&c);
    for (client, ok) in [("203.0.113.2", true), ("203.0.113.200", false)] {
        let cl = sock(client, 5555);
        let r =
            n.h.run(Hook::UplinkIn, &tcp(cl, sock(NODE1_IP, 30080), SYN))
                .unwrap();
        assert_eq!(r.verdict, TC_ACT_OK, "translated at the uplink");
        assert_eq!(r.parsed().dst.to_string(), YA);
        let v = n.run(Hook::ToPod, &r.out);
        if ok {
            assert_eq!(v, TC_ACT_OK, "{client} is in the ipBlock");
            let r =
                n.h.run(Hook::FromPod, &tcp(sock(YA, 80), cl, SYN | ACK))
                    .unwrap();
            assert_eq!(r.verdict, TC_ACT_OK, "the reply leaves y/a (egress: [])");
            assert_eq!(r.parsed().src.to_string(), NODE1_IP);
        } else {
            assert_eq!(v, TC_ACT_SHOT, "{client} is in the except");
        }
    }
}

/// Changes apply to new connections at once; connections already admitted keep going.
#[test]
fn policy_changes_apply_to_new_connections_at_once() {
    let allow = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress: [{ports: [{port: 80}]}]
"#;
    let mut n = Node::new(&cluster(allow));
    let old = (sock(ZA, 40000), sock(YA, 80));
    assert_eq!(n.both(&tcp(old.0, old.1, SYN)), (TC_ACT_OK, TC_ACT_OK));
    // The policy now allows port 81 only.
    n.program(&cluster(&allow.replace("port: 80", "port: 81")));
    let new = tcp(sock(ZA, 40001), sock(YA, 80), SYN);
    assert_eq!(n.both(&new), (TC_ACT_OK, TC_ACT_SHOT), "new connection");
    assert_eq!(
        n.both(&tcp(old.0, old.1, ACK)),
        (TC_ACT_OK, TC_ACT_OK),
        "old one"
    );
    assert_eq!(
        n.both(&tcp(sock(ZA, 40002), sock(YA, 81), SYN)),
        (TC_ACT_OK, TC_ACT_OK)
    );
    // A label change that takes y/a out of the policy's selector un-isolates it.
    let relabelled = cluster(&format!(
        "{}---\n{}",
        allow.replace("port: 80", "port: 81"),
        r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: y, labels: {pod: a-prime}}
spec:
  nodeName: node-1
  containers: [{name: server}]
status: {phase: Running, podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}]}
"#
    ));
    n.program(&relabelled);
    assert_eq!(
        n.both(&tcp(sock(ZA, 40003), sock(YA, 80), SYN)),
        (TC_ACT_OK, TC_ACT_OK)
    );
    // Deleting every policy: nothing is isolated.
    n.program(&cluster(""));
    assert_eq!(
        n.both(&tcp(sock(ZA, 40004), sock(YA, 80), SYN)),
        (TC_ACT_OK, TC_ACT_OK)
    );
}

/// Every case of tests/data/policy on both nodes: for every pair of addresses of the
/// scenario, protocol and port, a new connection's first packet through `tc_from_pod`
/// and `tc_to_pod` gets the evaluator's verdict for the source's egress and the
/// destination's ingress; drops are counted under the evaluator's reason, and every rule
/// counter holds what the lookup model says.
#[test]
fn every_policy_case_agrees_with_the_evaluator_packet_by_packet() {
    require_root();
    let mut h = ProgHarness::new().expect("load datapath");
    let mut checked = 0u64;
    for case in pol::cases() {
        let c = pol::cluster(&case);
        let u = pol::universe(&c);
        for (node, compiled) in pol::compile(&c) {
            let img = weir_core::image::MapImage {
                policy: compiled.image.clone(),
                ..Default::default()
            };
            h.program(&img).expect("program");
            h.clear_ct().unwrap();
            let counters_before = h.counters().unwrap();
            let rules_before = h.dp.policy_counters().unwrap();
            let mut want_reasons: BTreeMap<(u8, u8), u64> = BTreeMap::new();
            let mut want_rules: BTreeMap<u32, u64> = BTreeMap::new();
            let mut sport = 1024u16;
            for src in &u {
                for dst in &u {
                    if src.is_ipv4() != dst.is_ipv4() || src == dst {
                        continue;
                    }
                    let (s, d) = (end_for(&c, *src), end_for(&c, *dst));
                    for proto in pol::PROTOS {
                        for port in pol::PORTS {
                            sport += 1;
                            let v = eval::evaluate(&c, &s, &d, proto, port);
                            let (ss, ds) =
                                (SocketAddr::new(*src, sport), SocketAddr::new(*dst, port));
                            let f = match proto {
                                Protocol::TCP => tcp(ss, ds, SYN),
                                Protocol::UDP => packet::udp(ss, ds, b"x"),
                                Protocol::SCTP => packet::sctp(ss, ds),
                            };
                            let here = |e: &eval::End| {
                                e.pod()
                                    .is_some_and(|p| p.node_name.as_deref() == Some(node))
                            };
                            for (hook, dir, decision, local) in [
                                (Hook::FromPod, Direction::Egress, v.egress, here(&s)),
                                (Hook::ToPod, Direction::Ingress, v.ingress, here(&d)),
                            ] {
                                let want = !local || decision.allows();
                                let got = h.run(hook, &f).unwrap().verdict;
                                assert_eq!(
                                    got == TC_ACT_OK,
                                    want,
                                    "{}: {node}: {dir:?} {src} -> {dst} {proto}/{port}: evaluator {decision:?}, datapath verdict {got}",
                                    case.display()
                                );
                                checked += 1;
                                if let (true, Decision::Denied { no_rules }) = (local, decision) {
                                    let reason = if no_rules {
                                        REASON_POLICY_ISOLATED
                                    } else {
                                        REASON_POLICY_DENIED
                                    };
                                    *want_reasons.entry((reason, dir.abi())).or_default() += 1;
                                }
                                let o = lookup::decide(
                                    &compiled.image,
                                    dir,
                                    Addr::from_ip(*src),
                                    Addr::from_ip(*dst),
                                    proto.number(),
                                    port,
                                );
                                if let Outcome::Allowed { rule_id }
                                | Outcome::Denied { rule_id, .. } = o
                                    && rule_id != 0
                                {
                                    *want_rules.entry(rule_id).or_default() += 1;
                                }
                            }
                        }
                    }
                }
            }
            let after = h.counters().unwrap();
            for reason in [REASON_POLICY_DENIED, REASON_POLICY_ISOLATED] {
                for dir in [DIR_INGRESS, DIR_EGRESS] {
                    let got = after.get(&(reason, dir)).copied().unwrap_or(0)
                        - counters_before.get(&(reason, dir)).copied().unwrap_or(0);
                    assert_eq!(
                        got,
                        want_reasons.get(&(reason, dir)).copied().unwrap_or(0),
                        "{}: {node}: drops of reason {reason} dir {dir}",
                        case.display()
                    );
                }
            }
            let rules: BTreeMap<u32, u64> =
                h.dp.policy_counters()
                    .unwrap()
                    .into_iter()
                    .map(|(id, c)| {
                        let before = rules_before.get(&id).map(|c| c.packets).unwrap_or(0);
                        (id, c.packets - before)
                    })
                    .filter(|(_, n)| *n > 0)
                    .collect();
            assert_eq!(
                rules,
                want_rules,
                "{}: {node}: rule counters",
                case.display()
            );
        }
    }
    assert!(checked > 100_000, "only {checked} packets checked");
}
