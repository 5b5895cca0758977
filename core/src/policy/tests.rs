//! Property tests: on random clusters (namespaces, pods with labels, named ports, two
//! nodes, IPv4 and IPv6, host-network and finished pods) and random policies (selectors
//! with every operator, ipBlocks with excepts, numeric, ranged and named ports, every
//! protocol, both directions), the lookup sequence over the compiled images of the nodes
//! must give exactly the evaluator's verdict, reason included, for every pair of
//! addresses (pods, nodes, outside addresses); changes must plan make-before-break; and
//! numbers must survive restarts.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use proptest::prelude::*;
use weir_common::{Addr, policy::*};

use super::{
    compile::PolicyCompiler,
    eval::{self, Direction},
    image::{PolicyImage, lpm_get},
    lookup::{self, Outcome, PolicyMaps},
    plan,
};
use crate::model::*;

const NODES: [&str; 2] = ["n1", "n2"];
const KEYS: [&str; 4] = ["pod", "app", "team", LABEL_NAMESPACE_NAME];
const VALUES: [&str; 6] = ["a", "b", "c", "x", "y", "z"];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "metrics", "nope"];
const PORTS: [u16; 6] = [53, 80, 81, 8000, 8007, 8080];
const EXTERNAL: [&str; 7] = [
    "8.8.8.8",
    "10.0.9.9",
    "10.0.0.200",
    "192.168.0.77",
    "fd00::99",
    "2001:db8::1",
    "::ffff:10.0.0.201",
];
/// Addresses CIDRs are built around.
const BASES: [&str; 9] = [
    "10.0.0.10",
    "10.0.1.11",
    "10.0.0.12",
    "8.8.8.8",
    "192.168.0.1",
    "0.0.0.0",
    "fd00::10",
    "2001:db8::1",
    "::",
];
const PLENS_V4: [u8; 9] = [0, 1, 4, 8, 16, 24, 28, 31, 32];
const PLENS_V6: [u8; 7] = [0, 8, 64, 100, 120, 127, 128];

fn proto_st() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        3 => Just(Protocol::TCP),
        2 => Just(Protocol::UDP),
        1 => Just(Protocol::SCTP),
    ]
}

fn labels_st(keys: &'static [&'static str]) -> impl Strategy<Value = Labels> {
    prop::collection::btree_map(
        prop::sample::select(keys),
        prop::sample::select(&VALUES[..]),
        0..3,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

fn selector_st() -> impl Strategy<Value = LabelSelector> {
    let op = prop_oneof![
        Just(SelectorOp::In),
        Just(SelectorOp::NotIn),
        Just(SelectorOp::Exists),
        Just(SelectorOp::DoesNotExist),
    ];
    let expr = (
        prop::sample::select(&KEYS[..]),
        op,
        prop::sample::subsequence(&VALUES[..], 1..3),
    )
        .prop_map(|(k, op, vals)| LabelSelectorRequirement {
            key: k.into(),
            operator: op,
            values: if matches!(op, SelectorOp::In | SelectorOp::NotIn) {
                vals.iter().map(|v| v.to_string()).collect()
            } else {
                vec![]
            },
        });
    prop_oneof![
        2 => Just(LabelSelector::everything()),
        3 => (labels_st(&KEYS[..2]), prop::collection::vec(expr, 0..2)).prop_map(|(l, e)| LabelSelector {
            match_labels: l.into_iter().take(1).collect(),
            match_expressions: e,
        }),
    ]
}

fn net(base: &str, plen: u8) -> ipnet::IpNet {
    let ip: IpAddr = base.parse().unwrap();
    let plen = if ip.is_ipv4() {
        plen.min(32)
    } else {
        plen.min(128)
    };
    ipnet::IpNet::new(ip, plen).unwrap().trunc()
}

fn block_st() -> impl Strategy<Value = IpBlock> {
    (
        prop::sample::select(&BASES[..]),
        0..PLENS_V6.len().max(PLENS_V4.len()),
        prop::collection::vec((prop::sample::select(&BASES[..]), 0..9usize), 0..3),
    )
        .prop_map(|(base, pi, excepts)| {
            let v4 = base.parse::<IpAddr>().unwrap().is_ipv4();
            let plen = if v4 {
                PLENS_V4[pi % PLENS_V4.len()]
            } else {
                PLENS_V6[pi % PLENS_V6.len()]
            };
            let cidr = net(base, plen);
            // Excepts must be strict subsets of the CIDR (API validation).
            let except = excepts
                .into_iter()
                .filter_map(|(b, pj)| {
                    let e_plen = if v4 {
                        PLENS_V4[pj % PLENS_V4.len()]
                    } else {
                        PLENS_V6[pj % PLENS_V6.len()]
                    };
                    let ip: IpAddr = b.parse().unwrap();
                    (ip.is_ipv4() == v4 && e_plen > cidr.prefix_len() && cidr.contains(&ip))
                        .then(|| net(b, e_plen))
                })
                .collect();
            IpBlock { cidr, except }
        })
}

fn peer_st() -> impl Strategy<Value = PolicyPeer> {
    prop_oneof![
        3 => (prop::option::of(selector_st()), prop::option::of(selector_st()))
            .prop_map(|(namespace, pod)| match (namespace, pod) {
                (None, None) => PolicyPeer::Selector { namespace: None, pod: Some(LabelSelector::everything()) },
                (namespace, pod) => PolicyPeer::Selector { namespace, pod },
            }),
        2 => block_st().prop_map(PolicyPeer::IpBlock),
    ]
}

fn policy_port_st() -> impl Strategy<Value = PolicyPort> {
    let port = prop_oneof![
        1 => Just(PortMatch::Any),
        3 => (prop::sample::select(&PORTS[..]), prop::sample::select(&[0u16, 0, 1, 7, 100][..]))
            .prop_map(|(lo, len)| PortMatch::Range(lo, lo.saturating_add(len))),
        2 => prop::sample::select(&PORT_NAMES[..]).prop_map(|n| PortMatch::Named(n.into())),
    ];
    (proto_st(), port).prop_map(|(protocol, port)| PolicyPort { protocol, port })
}

fn rule_st() -> impl Strategy<Value = PolicyRule> {
    (
        prop::collection::vec(peer_st(), 0..3),
        prop::collection::vec(policy_port_st(), 0..3),
    )
        .prop_map(|(peers, ports)| PolicyRule { peers, ports })
}

fn policy_st() -> impl Strategy<Value = NetworkPolicy> {
    (
        prop::sample::select(&NAMESPACES[..]),
        selector_st(),
        prop_oneof![Just((true, false)), Just((false, true)), Just((true, true))],
        prop::collection::vec(rule_st(), 0..3),
        prop::collection::vec(rule_st(), 0..3),
    )
        .prop_map(|(ns, sel, (i, e), ingress, egress)| NetworkPolicy {
            id: ObjRef::new(ns, "p"),
            pod_selector: sel,
            policy_types: PolicyTypes {
                ingress: i,
                egress: e,
            },
            ingress,
            egress,
        })
}

#[derive(Clone, Debug)]
struct PodSpec {
    ns: usize,
    labels: Labels,
    node: usize,
    v4: bool,
    v6: bool,
    ports: Vec<ContainerPort>,
    host_network: bool,
    finished: bool,
}

fn pod_st() -> impl Strategy<Value = PodSpec> {
    let cport = (
        prop::sample::select(&["http", "dns", "metrics", ""][..]),
        prop::sample::select(&PORTS[..]),
        proto_st(),
    )
        .prop_map(|(n, port, protocol)| ContainerPort {
            name: n.into(),
            port,
            protocol,
        });
    (
        0..NAMESPACES.len(),
        labels_st(&KEYS[..3]),
        0..NODES.len(),
        prop::bool::weighted(0.9),
        prop::bool::weighted(0.3),
        prop::collection::vec(cport, 0..3),
        prop::bool::weighted(0.08),
        prop::bool::weighted(0.05),
    )
        .prop_map(
            |(ns, labels, node, v4, v6, ports, host_network, finished)| PodSpec {
                ns,
                labels,
                node,
                v4,
                v6: v6 || !v4,
                ports,
                host_network,
                finished,
            },
        )
}

fn node_ips(i: usize) -> Vec<IpAddr> {
    vec![
        format!("192.168.0.{}", i + 1).parse().unwrap(),
        format!("fd00:ffff::{}", i + 1).parse().unwrap(),
    ]
}

fn build(ns_labels: Vec<Labels>, pods: Vec<PodSpec>, policies: Vec<NetworkPolicy>) -> Cluster {
    let mut c = Cluster::default();
    for (i, n) in NODES.iter().enumerate() {
        c.nodes.insert(
            n.to_string(),
            Node {
                name: n.to_string(),
                internal_ips: node_ips(i),
                ..Default::default()
            },
        );
    }
    for (i, mut l) in ns_labels.into_iter().enumerate() {
        let name = NAMESPACES[i].to_string();
        l.insert(LABEL_NAMESPACE_NAME.into(), name.clone());
        c.namespaces
            .insert(name.clone(), Namespace { name, labels: l });
    }
    for (i, p) in pods.into_iter().enumerate() {
        let id = ObjRef::new(NAMESPACES[p.ns], format!("p{i}"));
        let mut ips: Vec<IpAddr> = Vec::new();
        if p.host_network {
            ips.push(node_ips(p.node)[0]);
        } else {
            if p.v4 {
                ips.push(format!("10.0.{}.{}", p.node, i + 10).parse().unwrap());
            }
            if p.v6 {
                ips.push(format!("fd00::{}", i + 10).parse().unwrap());
            }
        }
        c.pods.insert(
            id.clone(),
            Pod {
                id,
                labels: p.labels,
                node_name: Some(NODES[p.node].into()),
                ips,
                ports: p.ports,
                host_network: p.host_network,
                phase: if p.finished {
                    PodPhase::Succeeded
                } else {
                    PodPhase::Running
                },
            },
        );
    }
    for (i, mut p) in policies.into_iter().enumerate() {
        p.id.name = format!("p{i}");
        c.policies.insert(p.id.clone(), p);
    }
    c
}

fn cluster_st() -> impl Strategy<Value = Cluster> {
    (
        prop::collection::vec(labels_st(&KEYS[1..3]), NAMESPACES.len()),
        prop::collection::vec(pod_st(), 0..9),
        prop::collection::vec(policy_st(), 0..5),
    )
        .prop_map(|(n, p, q)| build(n, p, q))
}

/// Faster lookups for tests: only the prefix lengths present are tried.
struct Indexed<'a> {
    img: &'a PolicyImage,
    ip_plens: Vec<u32>,
    pol_plens: Vec<u32>,
}

impl<'a> Indexed<'a> {
    fn new(img: &'a PolicyImage) -> Self {
        let mut ip_plens: Vec<u32> = img
            .ipcache
            .keys()
            .map(|k| k.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        ip_plens.reverse();
        let mut pol_plens: Vec<u32> = img
            .policy
            .keys()
            .map(|k| k.0)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        pol_plens.reverse();
        Self {
            img,
            ip_plens,
            pol_plens,
        }
    }
}

impl PolicyMaps for Indexed<'_> {
    fn endpoint(&self, a: &Addr) -> Option<EndpointValue> {
        self.img.endpoints.get(a).copied()
    }
    fn ipcache(&self, a: &Addr) -> Option<IpcacheValue> {
        use super::image::LpmData;
        self.ip_plens
            .iter()
            .find_map(|p| self.img.ipcache.get(&(*p, a.masked(*p))).copied())
    }
    fn policy(&self, k: &PolicyKey) -> Option<PolicyValue> {
        use super::image::LpmData;
        self.pol_plens
            .iter()
            .find_map(|p| self.img.policy.get(&(*p, k.masked(*p))).copied())
    }
}

/// Every address a flow may use: pod addresses (any pod, any phase), node addresses,
/// outside addresses.
fn universe(c: &Cluster) -> Vec<IpAddr> {
    let mut u: BTreeSet<IpAddr> = BTreeSet::new();
    for p in c.pods.values() {
        u.extend(p.ips.iter().copied());
    }
    for n in c.nodes.values() {
        u.extend(n.internal_ips.iter().copied());
    }
    u.extend(EXTERNAL.iter().map(|e| e.parse::<IpAddr>().unwrap()));
    u.into_iter().collect()
}

/// Checks one flow in one direction against every node's image. Returns a description
/// of the mismatch, if any.
fn check_dir(
    c: &Cluster,
    images: &BTreeMap<&str, Indexed>,
    dir: Direction,
    src: IpAddr,
    dst: IpAddr,
    proto: Protocol,
    port: u16,
) -> Result<(), String> {
    let (s, d) = (eval::end_for(c, src), eval::end_for(c, dst));
    let v = eval::evaluate(c, &s, &d, proto, port);
    let (decision, local) = match dir {
        Direction::Egress => (v.egress, s),
        Direction::Ingress => (v.ingress, d),
    };
    let (sa, da) = (
        Addr::from_ip(src.to_canonical()),
        Addr::from_ip(dst.to_canonical()),
    );
    for (node, img) in images {
        let got = lookup::decide(img, dir, sa, da, proto.number(), port);
        let on_this_node = local
            .pod()
            .is_some_and(|p| p.node_name.as_deref() == Some(*node));
        let ok = if on_this_node {
            got.agrees_with(decision)
        } else {
            got == Outcome::NoEndpoint
        };
        if !ok {
            return Err(format!(
                "{dir:?} {src} -> {dst} {proto}/{port} on {node}: evaluator {decision:?}, maps {got:?}"
            ));
        }
        if let Outcome::Allowed { rule_id } | Outcome::Denied { rule_id, .. } = got
            && !img.img.rules.contains_key(&rule_id)
        {
            return Err(format!("rule id {rule_id} has no POLICY_RULES entry"));
        }
    }
    Ok(())
}

fn compile_all(
    c: &Cluster,
    compilers: &mut BTreeMap<&'static str, PolicyCompiler>,
) -> BTreeMap<&'static str, PolicyImage> {
    NODES
        .iter()
        .map(|n| {
            let comp = compilers.entry(n).or_default();
            (*n, comp.compile(c, n).expect("compiles").image)
        })
        .collect()
}

/// Every same-family pair of the universe on one protocol/port, and `extra` flows.
fn check_cluster(
    c: &Cluster,
    images: &BTreeMap<&'static str, PolicyImage>,
    l4: (Protocol, u16),
    extra: &[(usize, usize, Protocol, u16)],
) -> Result<(), String> {
    let idx: BTreeMap<&str, Indexed> = images.iter().map(|(n, i)| (*n, Indexed::new(i))).collect();
    let u = universe(c);
    let mut flows: Vec<(IpAddr, IpAddr, Protocol, u16)> = Vec::new();
    for a in &u {
        for b in &u {
            if a.to_canonical().is_ipv4() == b.to_canonical().is_ipv4() {
                flows.push((*a, *b, l4.0, l4.1));
            }
        }
    }
    for (i, j, p, port) in extra {
        let (a, b) = (u[i % u.len()], u[j % u.len()]);
        if a.to_canonical().is_ipv4() == b.to_canonical().is_ipv4() {
            flows.push((a, b, *p, *port));
        }
    }
    for (a, b, p, port) in flows {
        for dir in Direction::BOTH {
            check_dir(c, &idx, dir, a, b, p, port)?;
        }
    }
    Ok(())
}

fn flows_st() -> impl Strategy<Value = Vec<(usize, usize, Protocol, u16)>> {
    prop::collection::vec(
        (
            0..64usize,
            0..64usize,
            proto_st(),
            prop_oneof![prop::sample::select(&PORTS[..]), any::<u16>()],
        ),
        0..40,
    )
}

fn l4_st() -> impl Strategy<Value = (Protocol, u16)> {
    (
        proto_st(),
        prop_oneof![
            4 => prop::sample::select(&PORTS[..]),
            1 => prop::sample::select(&[1u16, 79, 82, 8001, 8100, 65535][..])
        ],
    )
}

/// Make-before-break, as the plan promises it: entries are written while every address
/// and endpoint still points where it did; addresses and endpoints switch only while all
/// the new entries and all the old ones are in the map; old entries go only once every
/// address and endpoint points where it should; every rule id named has its metadata.
fn check_make_before_break(old: &PolicyImage, new: &PolicyImage) -> Result<(), String> {
    let ops = plan::diff(old, new);
    let mut state = old.clone();
    for (i, op) in ops.iter().enumerate() {
        match op {
            plan::PolicyOp::PutRule(..) | plan::PolicyOp::PutPolicy(..) => {
                if state.ipcache != old.ipcache || state.endpoints != old.endpoints {
                    return Err(format!("op {i} {op:?} writes entries after a switch"));
                }
            }
            plan::PolicyOp::PutIpcache(..)
            | plan::PolicyOp::PutEndpoint(..)
            | plan::PolicyOp::DelEndpoint(_)
            | plan::PolicyOp::DelIpcache(_) => {
                for (k, v) in &new.policy {
                    if state.policy.get(k) != Some(v) {
                        return Err(format!("op {i} {op:?} switches before {k:?} is written"));
                    }
                }
                for k in old.policy.keys() {
                    if !state.policy.contains_key(k) {
                        return Err(format!("op {i} {op:?} switches after {k:?} is gone"));
                    }
                }
            }
            plan::PolicyOp::DelPolicy(_) | plan::PolicyOp::DelRule(_) => {
                if state.ipcache != new.ipcache || state.endpoints != new.endpoints {
                    return Err(format!("op {i} {op:?} removes entries before the switch"));
                }
            }
        }
        op.apply_to(&mut state);
        for v in state.policy.values() {
            if !state.rules.contains_key(&v.rule_id) {
                return Err(format!("after op {i} rule {} has no metadata", v.rule_id));
            }
        }
    }
    if &state != new {
        return Err("the plan does not produce the new image".into());
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2000, ..ProptestConfig::default() })]

    /// The compiled maps, read through the datapath's lookup sequence, agree with the
    /// evaluator on every flow.
    #[test]
    fn compiled_maps_agree_with_the_evaluator(c in cluster_st(), l4 in l4_st(), extra in flows_st()) {
        let images = compile_all(&c, &mut BTreeMap::new());
        if let Err(e) = check_cluster(&c, &images, l4, &extra) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// After a change (policies, labels, pods), the recompiled maps still agree, the plan
    /// from the old maps to the new is make-before-break and lands exactly on the new
    /// maps, and a compiler restarted from the maps reproduces them without a single op.
    #[test]
    fn changes_plan_make_before_break_and_restarts_change_nothing(
        c1 in cluster_st(),
        c2 in cluster_st(),
        mix in prop::collection::vec(any::<bool>(), 4),
        l4 in l4_st(),
    ) {
        // c2 takes some kinds of objects from c1, so changes are partial.
        let mut c2 = c2;
        if mix[0] { c2.pods = c1.pods.clone(); }
        if mix[1] { c2.policies = c1.policies.clone(); }
        if mix[2] { c2.namespaces = c1.namespaces.clone(); }
        if mix[3] {
            // Relabel only: same pods, c2's labels where the names match.
            let mut pods = c1.pods.clone();
            for (k, p) in pods.iter_mut() {
                if let Some(q) = c2.pods.get(k) { p.labels = q.labels.clone(); }
            }
            c2.pods = pods;
        }
        let mut compilers = BTreeMap::new();
        let old = compile_all(&c1, &mut compilers);
        let new = compile_all(&c2, &mut compilers);
        if let Err(e) = check_cluster(&c2, &new, l4, &[]) {
            return Err(TestCaseError::fail(format!("after the change: {e}")));
        }
        for n in NODES {
            if let Err(e) = check_make_before_break(&old[n], &new[n]) {
                return Err(TestCaseError::fail(format!("node {n}: {e}")));
            }
            let mut restarted = PolicyCompiler::default();
            restarted.seed_from(&new[n]);
            let again = restarted.compile(&c2, n).unwrap().image;
            let ops = plan::diff(&new[n], &again);
            prop_assert!(ops.is_empty(), "node {}: restart changed {} entries: {:?}", n, ops.len(), ops.iter().take(5).collect::<Vec<_>>());
        }
    }
}

// Deterministic tests of specific properties.

fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, node: &str) -> Pod {
    Pod {
        id: ObjRef::new(ns, name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        node_name: Some(node.into()),
        ips: vec![ip.parse().unwrap()],
        ..Default::default()
    }
}

fn small() -> Cluster {
    let mut c = Cluster::default();
    for (i, (ns, name)) in [("x", "a"), ("x", "b"), ("y", "a")].iter().enumerate() {
        let p = pod(
            ns,
            name,
            &[("pod", name)],
            &format!("10.0.0.{}", i + 1),
            "n1",
        );
        c.pods.insert(p.id.clone(), p);
    }
    c
}

fn allow_from_b(ns: &str, name: &str) -> NetworkPolicy {
    NetworkPolicy {
        id: ObjRef::new(ns, name),
        pod_selector: LabelSelector {
            match_labels: [("pod".to_string(), "a".to_string())].into(),
            ..Default::default()
        },
        policy_types: PolicyTypes {
            ingress: true,
            egress: false,
        },
        ingress: vec![PolicyRule {
            peers: vec![PolicyPeer::Selector {
                namespace: None,
                pod: Some(LabelSelector {
                    match_labels: [("pod".to_string(), "b".to_string())].into(),
                    ..Default::default()
                }),
            }],
            ports: vec![],
        }],
        egress: vec![],
    }
}

#[test]
fn no_policy_means_only_the_family_roots() {
    let mut comp = PolicyCompiler::default();
    let img = comp.compile(&small(), "n1").unwrap().image;
    assert_eq!(img.ipcache.len(), 2, "{:?}", img.ipcache);
    assert!(img.policy.is_empty());
    assert!(img.rules.is_empty());
    // Every local pod has an entry, isolated in neither direction.
    assert_eq!(img.endpoints.len(), 3);
    assert!(img.endpoints.values().all(|e| e.flags == 0));
}

#[test]
fn unrelated_changes_keep_numbers_and_touch_nothing() {
    let mut c = small();
    c.policies
        .insert(ObjRef::new("x", "allow-b"), allow_from_b("x", "allow-b"));
    let mut comp = PolicyCompiler::default();
    let before = comp.compile(&c, "n1").unwrap().image;
    // A new pod that matches no peer, on another node; a policy in another namespace
    // that selects no pod of this node.
    let p = pod("z", "q", &[("pod", "q")], "10.0.5.5", "n2");
    c.pods.insert(p.id.clone(), p);
    let mut other = allow_from_b("z", "other");
    other.pod_selector.match_labels = [("pod".to_string(), "nothing".to_string())].into();
    c.policies.insert(other.id.clone(), other);
    let after = comp.compile(&c, "n1").unwrap().image;
    assert_eq!(plan::diff(&before, &after), vec![]);
}

#[test]
fn a_label_change_moves_one_address_and_adds_only_its_entries() {
    let mut c = small();
    let p = pod("x", "c", &[("pod", "c")], "10.0.0.9", "n1");
    c.pods.insert(p.id.clone(), p);
    c.policies
        .insert(ObjRef::new("x", "allow-b"), allow_from_b("x", "allow-b"));
    let mut comp = PolicyCompiler::default();
    let before = comp.compile(&c, "n1").unwrap().image;
    c.pods.get_mut(&ObjRef::new("x", "c")).unwrap().labels =
        [("pod".to_string(), "b".to_string())].into();
    let after = comp.compile(&c, "n1").unwrap().image;
    let ops = plan::diff(&before, &after);
    // x/c now shares x/b's identity: one IPCACHE put, nothing else.
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert!(matches!(ops[0], plan::PolicyOp::PutIpcache((128, _), _)));
    let xb = lpm_get(
        &after.ipcache,
        &Addr::from_ip("10.0.0.2".parse().unwrap()),
        128,
    )
    .unwrap();
    let xc = lpm_get(
        &after.ipcache,
        &Addr::from_ip("10.0.0.9".parse().unwrap()),
        128,
    )
    .unwrap();
    assert_eq!(xb.1.identity, xc.1.identity);
}

#[test]
fn a_changed_policy_gets_a_new_key_before_endpoints_switch() {
    let mut c = small();
    c.policies
        .insert(ObjRef::new("x", "allow-b"), allow_from_b("x", "allow-b"));
    let mut comp = PolicyCompiler::default();
    let before = comp.compile(&c, "n1").unwrap().image;
    c.policies
        .get_mut(&ObjRef::new("x", "allow-b"))
        .unwrap()
        .ingress[0]
        .ports = vec![PolicyPort {
        protocol: Protocol::TCP,
        port: PortMatch::Range(80, 80),
    }];
    let after = comp.compile(&c, "n1").unwrap().image;
    let xa = Addr::from_ip("10.0.0.1".parse().unwrap());
    let (k1, k2) = (
        before.endpoints[&xa].ingress_key,
        after.endpoints[&xa].ingress_key,
    );
    assert_ne!(k1, k2);
    let ops = plan::diff(&before, &after);
    let switch = ops
        .iter()
        .position(|o| matches!(o, plan::PolicyOp::PutEndpoint(a, _) if *a == xa))
        .unwrap();
    let last_new_entry = ops
        .iter()
        .rposition(|o| matches!(o, plan::PolicyOp::PutPolicy((_, k), _) if k.policy_key == k2))
        .unwrap();
    let first_old_removal = ops
        .iter()
        .position(|o| matches!(o, plan::PolicyOp::DelPolicy((_, k)) if k.policy_key == k1))
        .unwrap();
    assert!(
        last_new_entry < switch && switch < first_old_removal,
        "{ops:?}"
    );
}

#[test]
fn ipcache_keeps_ipv6_blocks_away_from_ipv4() {
    let mut c = small();
    let mut p = allow_from_b("x", "v6");
    p.ingress[0].peers = vec![PolicyPeer::IpBlock(IpBlock {
        cidr: "::/0".parse().unwrap(),
        except: vec![],
    })];
    c.policies.insert(p.id.clone(), p);
    let mut comp = PolicyCompiler::default();
    let img = comp.compile(&c, "n1").unwrap().image;
    let id = |ip: &str| {
        lpm_get(&img.ipcache, &Addr::from_ip(ip.parse().unwrap()), 128)
            .unwrap()
            .1
            .identity
    };
    assert_ne!(id("8.8.8.8"), id("2001:db8::1"));
    let xa = Addr::from_ip("10.0.0.1".parse().unwrap());
    let from = |ip: &str| {
        lookup::decide(
            &img,
            Direction::Ingress,
            Addr::from_ip(ip.parse().unwrap()),
            xa,
            6,
            80,
        )
    };
    assert!(!from("8.8.8.8").allows());
    // (The v6 side is exercised by the property tests with dual-stack pods.)
}
