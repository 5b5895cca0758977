//! The specification: a direct evaluator of the `networking.k8s.io/v1` NetworkPolicy rules
//! on a cluster snapshot, written to be obviously correct rather than fast. The compiled
//! maps are checked against it (property tests in `policy::tests`).
//!
//! The rules, with the upstream text they implement (docs/upstream-netpol.md, R1-R16; the
//! API reference is kubernetes staging/src/k8s.io/api/networking/v1/types.go):
//! - A policy applies to the pods of its own namespace that its `podSelector` selects (R1),
//!   in the directions of its (defaulted) `policyTypes` (R2, R3).
//! - A pod is isolated for a direction once at least one policy applies to it in that
//!   direction; then a connection in that direction is allowed only if some rule of some
//!   such policy matches it (R2, R4: the union, no order, no deny rules).
//! - A connection needs the source's egress and the destination's ingress (R5); the end
//!   that is not a pod (or a host-network pod, R16 option 2) has no say.
//! - A rule matches when its peer list is empty or one peer matches the remote end, and
//!   its port list is empty or one port matches (R9). Selector peers match pods only
//!   (R10, R11, R12); ipBlocks match any address, pod addresses included (R14).
//! - Ports: the protocol must be equal; no port = every port; `port..endPort` inclusive;
//!   a named port resolves on the pod at the policy's end of the connection: the
//!   destination, for ingress and for egress rules alike (R13). A named port towards a
//!   non-pod address matches nothing (E2).
//! - Ingress from the pod's own node is always allowed (types.go, NetworkPolicySpec.Ingress:
//!   "OR if the traffic source is the pod's local node"); egress to the node is subject to
//!   egress policy, since the egress text has no such exception (E13).
//! - A pod cannot block traffic to itself (R8, E15).
//!
//! IPv4-mapped IPv6 addresses are treated as the IPv4 addresses they map (the datapath
//! stores IPv4 that way and cannot tell them apart).

use std::net::IpAddr;

use crate::model::{
    Cluster, NetworkPolicy, Pod, PolicyPeer, PolicyPort, PolicyRule, PortMatch, Protocol,
};

/// Ingress or egress, from the point of view of the pod whose policy is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The ABI direction (`metrics::DIR_*`).
    pub fn abi(self) -> u8 {
        match self {
            Direction::Ingress => weir_common::metrics::DIR_INGRESS,
            Direction::Egress => weir_common::metrics::DIR_EGRESS,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl NetworkPolicy {
    /// Whether the policy's `policyTypes` include `dir`.
    pub fn applies_to(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.policy_types.ingress,
            Direction::Egress => self.policy_types.egress,
        }
    }

    /// The rules of `dir` (ignored when `policyTypes` lacks `dir`: R2).
    pub fn rules(&self, dir: Direction) -> &[PolicyRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// Whether the policy selects `pod` (R1): same namespace, podSelector matches.
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.is_policy_endpoint()
            && pod.id.namespace == self.id.namespace
            && self.pod_selector.matches(&pod.labels)
    }
}

/// One end of a connection.
#[derive(Clone, Copy, Debug)]
pub enum End<'a> {
    /// A pod and the address it uses. A pod that is not a policy endpoint (host network,
    /// finished) is treated as its bare address.
    Pod(&'a Pod, IpAddr),
    /// Any other address: outside the cluster, a node, a host-network pod.
    Addr(IpAddr),
}

impl<'a> End<'a> {
    pub fn ip(&self) -> IpAddr {
        match self {
            End::Pod(_, ip) | End::Addr(ip) => ip.to_canonical(),
        }
    }

    /// The pod, if this end is a policy endpoint.
    pub fn pod(&self) -> Option<&'a Pod> {
        match self {
            End::Pod(p, _) if p.is_policy_endpoint() => Some(p),
            _ => None,
        }
    }
}

/// The end that uses address `ip`: the policy-endpoint pod holding it, else the bare
/// address (what the datapath sees: it only knows addresses).
pub fn end_for(c: &Cluster, ip: IpAddr) -> End<'_> {
    let canon = ip.to_canonical();
    match c
        .pods
        .values()
        .find(|p| p.is_policy_endpoint() && p.ips.iter().any(|x| x.to_canonical() == canon))
    {
        Some(p) => End::Pod(p, ip),
        None => End::Addr(ip),
    }
}

/// The verdict of one direction's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The end whose policy this is is not a pod: it has no say.
    NotAPod,
    /// The pod is not isolated for this direction.
    NotIsolated,
    /// Traffic of a pod with itself.
    SamePod,
    /// Ingress from the pod's own node.
    LocalNode,
    /// A rule allows it.
    Allowed,
    /// Isolated, and no rule allows it. `no_rules`: the policies that isolate the pod
    /// have no rule at all for this direction (pure default deny).
    Denied { no_rules: bool },
}

impl Decision {
    pub fn allows(self) -> bool {
        !matches!(self, Decision::Denied { .. })
    }
}

/// Both directions' verdicts for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub egress: Decision,
    pub ingress: Decision,
}

impl Verdict {
    pub fn allowed(self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// The policies that apply to `pod` in `dir`.
pub fn policies_for<'c>(
    c: &'c Cluster,
    pod: &Pod,
    dir: Direction,
) -> impl Iterator<Item = &'c NetworkPolicy> {
    let pod = pod.clone();
    c.policies
        .values()
        .filter(move |p| p.applies_to(dir) && p.selects(&pod))
}

/// Whether `peer` of `policy` matches the remote end (R10).
pub fn peer_matches(c: &Cluster, policy: &NetworkPolicy, peer: &PolicyPeer, remote: &End) -> bool {
    match peer {
        PolicyPeer::IpBlock(b) => b.contains(remote.ip()),
        PolicyPeer::Selector { namespace, pod } => {
            let Some(rp) = remote.pod() else {
                return false;
            };
            let ns_ok = match namespace {
                None => rp.id.namespace == policy.id.namespace,
                Some(sel) => sel.matches(&c.namespace_labels(&rp.id.namespace)),
            };
            ns_ok && pod.as_ref().is_none_or(|s| s.matches(&rp.labels))
        }
    }
}

/// Whether `pp` matches `proto`/`port`; named ports resolve on `dst_pod` (R13).
pub fn port_matches(pp: &PolicyPort, proto: Protocol, port: u16, dst_pod: Option<&Pod>) -> bool {
    if pp.protocol != proto {
        return false;
    }
    match &pp.port {
        PortMatch::Any => true,
        PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&port),
        PortMatch::Named(name) => {
            dst_pod.is_some_and(|p| p.named_port(name, proto).any(|n| n == port))
        }
    }
}

/// Whether `rule` of `policy` matches (R9).
pub fn rule_matches(
    c: &Cluster,
    policy: &NetworkPolicy,
    rule: &PolicyRule,
    remote: &End,
    proto: Protocol,
    port: u16,
    dst_pod: Option<&Pod>,
) -> bool {
    (rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|p| peer_matches(c, policy, p, remote)))
        && (rule.ports.is_empty()
            || rule
                .ports
                .iter()
                .any(|pp| port_matches(pp, proto, port, dst_pod)))
}

/// The verdict of `local`'s policy for `dir` on a connection with `remote`
/// (`local` is the source for egress, the destination for ingress).
pub fn decide(
    c: &Cluster,
    dir: Direction,
    local: &End,
    remote: &End,
    proto: Protocol,
    port: u16,
) -> Decision {
    let Some(pod) = local.pod() else {
        return Decision::NotAPod;
    };
    let policies: Vec<&NetworkPolicy> = policies_for(c, pod, dir).collect();
    if policies.is_empty() {
        return Decision::NotIsolated;
    }
    if remote.pod().is_some_and(|r| r.id == pod.id) {
        return Decision::SamePod;
    }
    if dir == Direction::Ingress
        && remote.pod().is_none()
        && is_node_address(c, pod.node_name.as_deref(), remote.ip())
    {
        return Decision::LocalNode;
    }
    let dst_pod = match dir {
        Direction::Ingress => Some(pod),
        Direction::Egress => remote.pod(),
    };
    let mut no_rules = true;
    for p in &policies {
        for rule in p.rules(dir) {
            no_rules = false;
            if rule_matches(c, p, rule, remote, proto, port, dst_pod) {
                return Decision::Allowed;
            }
        }
    }
    Decision::Denied { no_rules }
}

/// Whether `ip` is one of the addresses of node `node` (its InternalIP/ExternalIP).
pub fn is_node_address(c: &Cluster, node: Option<&str>, ip: IpAddr) -> bool {
    node.and_then(|n| c.nodes.get(n)).is_some_and(|n| {
        n.internal_ips
            .iter()
            .chain(n.external_ips.iter())
            .any(|a| a.to_canonical() == ip)
    })
}

/// Both verdicts for a connection from `src` to `dst` on `proto`/`port` (the destination
/// port as the destination pod sees it, i.e. after Service translation).
pub fn evaluate(c: &Cluster, src: &End, dst: &End, proto: Protocol, port: u16) -> Verdict {
    Verdict {
        egress: decide(c, Direction::Egress, src, dst, proto, port),
        ingress: decide(c, Direction::Ingress, dst, src, proto, port),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::*;

    fn labels(kv: &[(&str, &str)]) -> Labels {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(kv: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: labels(kv),
            match_expressions: vec![],
        }
    }

    fn expr(key: &str, op: SelectorOp, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelSelectorRequirement {
                key: key.into(),
                operator: op,
                values: values.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    fn tcp(p: u16) -> PolicyPort {
        PolicyPort {
            protocol: Protocol::TCP,
            port: PortMatch::Range(p, p),
        }
    }

    /// The upstream model: namespaces x, y, z with pods a, b, c (label pod=<letter>), each
    /// serving 80 and 81 on TCP and UDP under the names serve-<port>-<proto>.
    fn xyz() -> Cluster {
        let mut c = Cluster::default();
        c.nodes.insert(
            "n1".into(),
            Node {
                name: "n1".into(),
                internal_ips: vec!["192.168.0.1".parse().unwrap()],
                ..Default::default()
            },
        );
        for (i, ns) in ["x", "y", "z"].iter().enumerate() {
            c.namespaces.insert(
                ns.to_string(),
                Namespace {
                    name: ns.to_string(),
                    labels: labels(&[(LABEL_NAMESPACE_NAME, ns)]),
                },
            );
            for (j, p) in ["a", "b", "c"].iter().enumerate() {
                let mut ports = vec![];
                for port in [80, 81] {
                    for proto in [Protocol::TCP, Protocol::UDP] {
                        ports.push(ContainerPort {
                            name: format!("serve-{port}-{}", proto.to_string().to_lowercase()),
                            port,
                            protocol: proto,
                        });
                    }
                }
                let id = ObjRef::new(*ns, *p);
                c.pods.insert(
                    id.clone(),
                    Pod {
                        id,
                        labels: labels(&[("pod", p)]),
                        node_name: Some("n1".into()),
                        ips: vec![format!("10.0.{i}.{}", j + 1).parse().unwrap()],
                        ports,
                        ..Default::default()
                    },
                );
            }
        }
        c
    }

    fn add(c: &mut Cluster, ns: &str, name: &str, f: impl FnOnce(&mut NetworkPolicy)) {
        let mut p = NetworkPolicy {
            id: ObjRef::new(ns, name),
            ..Default::default()
        };
        f(&mut p);
        c.policies.insert(p.id.clone(), p);
    }

    const NAMES: [&str; 9] = [
        "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
    ];

    /// The reachability matrix as the upstream suite prints it ('.' allowed, 'X' denied),
    /// without the diagonal (never asserted upstream), as one string per source row.
    fn matrix(c: &Cluster, proto: Protocol, port: u16) -> Vec<String> {
        NAMES
            .iter()
            .map(|s| {
                let sp = &c.pods[&ObjRef::new(&s[..1], &s[2..])];
                NAMES
                    .iter()
                    .map(|d| {
                        if s == d {
                            return '-';
                        }
                        let dp = &c.pods[&ObjRef::new(&d[..1], &d[2..])];
                        let v = evaluate(
                            c,
                            &End::Pod(sp, sp.ips[0]),
                            &End::Pod(dp, dp.ips[0]),
                            proto,
                            port,
                        );
                        if v.allowed() { '.' } else { 'X' }
                    })
                    .collect()
            })
            .collect()
    }

    fn rows(m: &[&str]) -> Vec<String> {
        m.iter().map(|s| s.to_string()).collect()
    }

    /// Only x/a's column denied except from the listed sources.
    fn column_a(allowed_from: &[&str]) -> Vec<String> {
        NAMES
            .iter()
            .map(|s| {
                NAMES
                    .iter()
                    .map(|d| {
                        if s == d {
                            '-'
                        } else if *d == "x/a" && !allowed_from.contains(s) {
                            'X'
                        } else {
                            '.'
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn selector_operators_follow_metav1() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        assert!(LabelSelector::everything().matches(&l));
        assert!(sel(&[("app", "web")]).matches(&l));
        assert!(!sel(&[("app", "web"), ("tier", "back")]).matches(&l));
        assert!(expr("app", SelectorOp::In, &["db", "web"]).matches(&l));
        assert!(!expr("app", SelectorOp::In, &["db"]).matches(&l));
        assert!(!expr("zone", SelectorOp::In, &["a"]).matches(&l));
        assert!(!expr("app", SelectorOp::NotIn, &["web"]).matches(&l));
        // NotIn matches objects without the key (E20).
        assert!(expr("zone", SelectorOp::NotIn, &["a"]).matches(&l));
        assert!(expr("app", SelectorOp::Exists, &[]).matches(&l));
        assert!(!expr("zone", SelectorOp::Exists, &[]).matches(&l));
        assert!(expr("zone", SelectorOp::DoesNotExist, &[]).matches(&l));
        assert!(!expr("app", SelectorOp::DoesNotExist, &[]).matches(&l));
    }

    #[test]
    fn t01_default_deny_ingress() {
        let mut c = xyz();
        add(&mut c, "x", "deny-ingress", |p| {
            p.policy_types.ingress = true;
        });
        assert_eq!(
            matrix(&c, Protocol::TCP, 80),
            rows(&[
                "-XX......",
                "X-X......",
                "XX-......",
                "XXX-.....",
                "XXX.-....",
                "XXX..-...",
                "XXX...-..",
                "XXX....-.",
                "XXX.....-",
            ])
        );
    }

    #[test]
    fn t02_default_deny_all() {
        let mut c = xyz();
        add(&mut c, "x", "deny-all", |p| {
            p.policy_types = PolicyTypes {
                ingress: true,
                egress: true,
            };
        });
        assert_eq!(
            matrix(&c, Protocol::TCP, 80),
            rows(&[
                "-XXXXXXXX",
                "X-XXXXXXX",
                "XX-XXXXXX",
                "XXX-.....",
                "XXX.-....",
                "XXX..-...",
                "XXX...-..",
                "XXX....-.",
                "XXX.....-",
            ])
        );
    }

    #[test]
    fn t03_pod_selector_peer_means_policy_namespace() {
        let mut c = xyz();
        add(&mut c, "x", "x-a-allows-x-b", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: None,
                    pod: Some(sel(&[("pod", "b")])),
                }],
                ports: vec![],
            }];
        });
        assert_eq!(matrix(&c, Protocol::TCP, 80), column_a(&["x/b"]));
    }

    #[test]
    fn t09_peers_are_ored_t10_selectors_in_one_peer_are_anded() {
        let not_x = expr(LABEL_NAMESPACE_NAME, SelectorOp::NotIn, &["x"]);
        let mut c = xyz();
        add(&mut c, "x", "or", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![
                    PolicyPeer::Selector {
                        namespace: Some(not_x.clone()),
                        pod: None,
                    },
                    PolicyPeer::Selector {
                        namespace: None,
                        pod: Some(sel(&[("pod", "b")])),
                    },
                ],
                ports: vec![],
            }];
        });
        assert_eq!(
            matrix(&c, Protocol::TCP, 80),
            column_a(&["x/b", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"])
        );
        let mut c = xyz();
        add(&mut c, "x", "and", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: Some(not_x),
                    pod: Some(sel(&[("pod", "b")])),
                }],
                ports: vec![],
            }];
        });
        assert_eq!(matrix(&c, Protocol::TCP, 80), column_a(&["y/b", "z/b"]));
    }

    #[test]
    fn t05_empty_namespace_selector_means_all_namespaces_t23_empty_pod_selector_own_namespace() {
        let mut c = xyz();
        add(&mut c, "x", "all-ns", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: Some(LabelSelector::everything()),
                    pod: None,
                }],
                ports: vec![],
            }];
        });
        assert!(
            matrix(&c, Protocol::TCP, 80)
                .iter()
                .all(|r| !r.contains('X'))
        );
        let mut c = xyz();
        add(&mut c, "x", "own-ns", |p| {
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: None,
                    pod: Some(LabelSelector::everything()),
                }],
                ports: vec![],
            }];
        });
        assert_eq!(
            matrix(&c, Protocol::TCP, 80),
            rows(&[
                "-........",
                ".-.......",
                "..-......",
                "XXX-.....",
                "XXX.-....",
                "XXX..-...",
                "XXX...-..",
                "XXX....-.",
                "XXX.....-",
            ])
        );
    }

    #[test]
    fn t15_union_of_policies_and_ports() {
        let mut c = xyz();
        let from_y = |port| PolicyRule {
            peers: vec![PolicyPeer::Selector {
                namespace: Some(sel(&[(LABEL_NAMESPACE_NAME, "y")])),
                pod: None,
            }],
            ports: vec![tcp(port)],
        };
        add(&mut c, "x", "p81", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            p.ingress = vec![from_y(81)];
        });
        let y = ["y/a", "y/b", "y/c"];
        assert_eq!(matrix(&c, Protocol::TCP, 81), column_a(&y));
        assert_eq!(matrix(&c, Protocol::TCP, 80), column_a(&[]));
        add(&mut c, "x", "p80", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            p.ingress = vec![from_y(80)];
        });
        assert_eq!(matrix(&c, Protocol::TCP, 80), column_a(&y));
        // T40: a UDP rule does not open TCP.
        assert_eq!(matrix(&c, Protocol::UDP, 80), column_a(&[]));
    }

    #[test]
    fn t17_t19_named_ports_resolve_on_the_destination() {
        let mut c = xyz();
        add(&mut c, "x", "named-ingress", |p| {
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![],
                ports: vec![PolicyPort {
                    protocol: Protocol::TCP,
                    port: PortMatch::Named("serve-81-tcp".into()),
                }],
            }];
        });
        assert!(
            matrix(&c, Protocol::TCP, 81)
                .iter()
                .all(|r| !r.contains('X'))
        );
        assert!(
            matrix(&c, Protocol::TCP, 80)
                .iter()
                .all(|r| r[..3].chars().all(|ch| ch == 'X' || ch == '-'))
        );
        // The name exists for UDP too, but the rule's protocol is TCP.
        assert!(!matrix(&c, Protocol::UDP, 81)[3].starts_with('.'));

        let mut c = xyz();
        add(&mut c, "x", "named-egress", |p| {
            p.policy_types.egress = true;
            p.egress = vec![PolicyRule {
                peers: vec![],
                ports: vec![PolicyPort {
                    protocol: Protocol::TCP,
                    port: PortMatch::Named("serve-80-tcp".into()),
                }],
            }];
        });
        assert!(
            matrix(&c, Protocol::TCP, 80)
                .iter()
                .all(|r| !r.contains('X'))
        );
        let m81 = matrix(&c, Protocol::TCP, 81);
        assert!(m81[..3].iter().all(|r| !r.contains('.')), "{m81:?}");
        assert!(m81[3..].iter().all(|r| !r.contains('X')), "{m81:?}");
        // A named port towards an address that is no pod matches nothing (E2).
        let xa = &c.pods[&ObjRef::new("x", "a")];
        let v = evaluate(
            &c,
            &End::Pod(xa, xa.ips[0]),
            &End::Addr("8.8.8.8".parse().unwrap()),
            Protocol::TCP,
            80,
        );
        assert_eq!(v.egress, Decision::Denied { no_rules: false });
    }

    #[test]
    fn e1_one_named_port_means_different_numbers_on_different_pods() {
        let mut c = xyz();
        for (name, port) in [("a", 8080), ("b", 9090)] {
            c.pods
                .get_mut(&ObjRef::new("y", name))
                .unwrap()
                .ports
                .push(ContainerPort {
                    name: "http".into(),
                    port,
                    protocol: Protocol::TCP,
                });
        }
        add(&mut c, "y", "http", |p| {
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![],
                ports: vec![PolicyPort {
                    protocol: Protocol::TCP,
                    port: PortMatch::Named("http".into()),
                }],
            }];
        });
        let xa = &c.pods[&ObjRef::new("x", "a")];
        let ya = &c.pods[&ObjRef::new("y", "a")];
        let yb = &c.pods[&ObjRef::new("y", "b")];
        let ok = |dst: &Pod, port| {
            evaluate(
                &c,
                &End::Pod(xa, xa.ips[0]),
                &End::Pod(dst, dst.ips[0]),
                Protocol::TCP,
                port,
            )
            .allowed()
        };
        assert!(ok(ya, 8080));
        assert!(!ok(ya, 9090));
        assert!(ok(yb, 9090));
        assert!(!ok(yb, 8080));
    }

    #[test]
    fn t27_policy_types_decide_which_rules_count_and_t28_both_ends_must_agree() {
        let mut c = xyz();
        add(&mut c, "x", "ingress-only-types", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.ingress = true;
            // Egress rules without Egress in policyTypes are inert (R2, E6d).
            p.egress = vec![PolicyRule {
                peers: vec![],
                ports: vec![tcp(1)],
            }];
            p.ingress = vec![PolicyRule::default()];
        });
        assert!(
            matrix(&c, Protocol::TCP, 80)
                .iter()
                .all(|r| !r.contains('X'))
        );

        let mut c = xyz();
        let xa_peer = |ns: &str, pod: &str| PolicyPeer::Selector {
            namespace: Some(sel(&[(LABEL_NAMESPACE_NAME, ns)])),
            pod: Some(sel(&[("pod", pod)])),
        };
        add(&mut c, "x", "allow-to-ns-y-pod-a", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.egress = true;
            p.egress = vec![PolicyRule {
                peers: vec![xa_peer("y", "a")],
                ports: vec![],
            }];
        });
        for target in ["a", "b"] {
            add(&mut c, "y", &format!("allow-from-xa-on-y{target}"), |p| {
                p.pod_selector = sel(&[("pod", target)]);
                p.policy_types.ingress = true;
                p.ingress = vec![PolicyRule {
                    peers: vec![xa_peer("x", "a")],
                    ports: vec![],
                }];
            });
        }
        assert_eq!(
            matrix(&c, Protocol::TCP, 80),
            rows(&[
                "-XX.XXXXX",
                ".-.XX....",
                "..-XX....",
                "...-X....",
                "...X-....",
                "...XX-...",
                "...XX.-..",
                "...XX..-.",
                "...XX...-",
            ])
        );
    }

    #[test]
    fn t34_t35_ipblocks_match_pod_addresses_with_excepts() {
        let mut c = xyz();
        let xb_ip = c.pods[&ObjRef::new("x", "b")].ips[0];
        add(&mut c, "x", "cidr", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.egress = true;
            p.egress = vec![PolicyRule {
                peers: vec![PolicyPeer::IpBlock(IpBlock {
                    cidr: "0.0.0.0/4".parse().unwrap(),
                    except: vec![ipnet::IpNet::new(xb_ip, 32).unwrap()],
                })],
                ports: vec![],
            }];
        });
        assert_eq!(matrix(&c, Protocol::TCP, 80)[0], "-X.......");
        let xa = &c.pods[&ObjRef::new("x", "a")];
        let to = |ip: &str| {
            evaluate(
                &c,
                &End::Pod(xa, xa.ips[0]),
                &End::Addr(ip.parse().unwrap()),
                Protocol::UDP,
                53,
            )
            .allowed()
        };
        assert!(to("10.9.9.9"));
        assert!(!to("192.168.7.7"));
        // An IPv4 ipBlock never matches IPv6, however it is written.
        assert!(!to("::a09:909"));
        assert!(to("::ffff:10.9.9.9"));
    }

    #[test]
    fn e7_union_across_policies_with_excepts() {
        let mut c = xyz();
        let block = |cidr: &str, except: &[&str]| PolicyRule {
            peers: vec![PolicyPeer::IpBlock(IpBlock {
                cidr: cidr.parse().unwrap(),
                except: except.iter().map(|e| e.parse().unwrap()).collect(),
            })],
            ports: vec![],
        };
        add(&mut c, "x", "a", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.egress = true;
            p.egress = vec![block("10.0.0.0/8", &["10.1.0.0/16"])];
        });
        add(&mut c, "x", "b", |p| {
            p.pod_selector = sel(&[("pod", "a")]);
            p.policy_types.egress = true;
            p.egress = vec![block("10.1.2.0/24", &[])];
        });
        let xa = &c.pods[&ObjRef::new("x", "a")];
        let to = |ip: &str| {
            evaluate(
                &c,
                &End::Pod(xa, xa.ips[0]),
                &End::Addr(ip.parse().unwrap()),
                Protocol::TCP,
                1,
            )
            .allowed()
        };
        assert!(to("10.1.2.3"));
        assert!(!to("10.1.3.3"));
        assert!(to("10.2.0.1"));
    }

    #[test]
    fn endport_ranges_are_inclusive() {
        let mut c = xyz();
        add(&mut c, "x", "range", |p| {
            p.policy_types.ingress = true;
            p.ingress = vec![PolicyRule {
                peers: vec![],
                ports: vec![PolicyPort {
                    protocol: Protocol::UDP,
                    port: PortMatch::Range(8000, 8080),
                }],
            }];
        });
        let ya = &c.pods[&ObjRef::new("y", "a")];
        let xa = &c.pods[&ObjRef::new("x", "a")];
        let ok = |port| {
            evaluate(
                &c,
                &End::Pod(ya, ya.ips[0]),
                &End::Pod(xa, xa.ips[0]),
                Protocol::UDP,
                port,
            )
            .allowed()
        };
        assert!(!ok(7999));
        assert!(ok(8000));
        assert!(ok(8080));
        assert!(!ok(8081));
    }

    #[test]
    fn node_self_and_host_network_exceptions() {
        let mut c = xyz();
        add(&mut c, "x", "deny-all", |p| {
            p.policy_types = PolicyTypes {
                ingress: true,
                egress: true,
            };
        });
        let xa = &c.pods[&ObjRef::new("x", "a")];
        let node: IpAddr = "192.168.0.1".parse().unwrap();
        // Ingress from the pod's own node is allowed; egress to it is policy's to decide.
        let from_node = evaluate(
            &c,
            &End::Addr(node),
            &End::Pod(xa, xa.ips[0]),
            Protocol::TCP,
            80,
        );
        assert_eq!(from_node.ingress, Decision::LocalNode);
        assert_eq!(from_node.egress, Decision::NotAPod);
        let to_node = evaluate(
            &c,
            &End::Pod(xa, xa.ips[0]),
            &End::Addr(node),
            Protocol::TCP,
            80,
        );
        assert_eq!(to_node.egress, Decision::Denied { no_rules: true });
        // A pod with itself.
        let v = evaluate(
            &c,
            &End::Pod(xa, xa.ips[0]),
            &End::Pod(xa, xa.ips[0]),
            Protocol::TCP,
            80,
        );
        assert!(v.allowed());
        // A host-network pod is its address: no selector matches it, it is never isolated.
        let mut host = xa.clone();
        host.host_network = true;
        host.id.name = "host".into();
        let v = evaluate(
            &c,
            &End::Pod(&host, node),
            &End::Pod(&c.pods[&ObjRef::new("y", "a")], "10.0.1.1".parse().unwrap()),
            Protocol::TCP,
            80,
        );
        assert_eq!(v.egress, Decision::NotAPod);
    }

    #[test]
    fn e21_policies_never_reach_into_other_namespaces() {
        let mut c = xyz();
        add(&mut c, "y", "deny", |p| {
            p.policy_types.ingress = true;
        });
        let m = matrix(&c, Protocol::TCP, 80);
        assert!(m.iter().all(|r| !r[..3].contains('X')));
    }
}
