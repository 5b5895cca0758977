//! A generated NetworkPolicy cluster (the scale of issue 8: 10k pods, 1k policies, 100
//! nodes), added to a model: what `cp-policy` programs and what the policy rows of the
//! per-packet cost run against.
//!
//! 50 namespaces labelled with one of 5 teams; pods of 200 apps (labels `app`, `tier`),
//! each with named ports `http` and `metrics` whose numbers differ between apps; per
//! namespace a default deny (ingress); the other policies select one app and allow, in a
//! mix modelled on real policy sets: from another app of the namespace on a port range,
//! from a team's front-end pods on a named port, from a CIDR with an except, egress to an
//! app on a named port plus DNS to one namespace, and a NodePort-like port range from
//! every namespace's back-end pods. Deterministic (a fixed LCG), so every run and every
//! dataplane sees the same objects.
//!
//! Pod IPs are 10.244.(1 + i / 256).(i % 256): inside the benchmark's cluster CIDR and
//! never in node-a's own /24 (10.244.0.0/24, the benchmark pods).

use std::net::{IpAddr, Ipv4Addr};

use weir_core::model::*;

pub struct Gen {
    pub pods: usize,
    pub policies: usize,
    pub nodes: usize,
}

impl Gen {
    /// Issue 8's NetworkPolicy scale.
    pub const ISSUE: Gen = Gen {
        pods: 10_000,
        policies: 1_000,
        nodes: 100,
    };
}

const NAMESPACES: usize = 50;
const APPS: usize = 200;

struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn sel(kv: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        match_expressions: vec![],
    }
}

fn tcp(p: PortMatch) -> PolicyPort {
    PolicyPort {
        protocol: Protocol::TCP,
        port: p,
    }
}

/// The IP of generated pod `i`.
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1 + (i / 256) as u8, (i % 256) as u8)
}

/// Node `i`'s name: `node0` for node 0 (the node being programmed or measured; the
/// caller's model already has it), `gen-node-<i>` for the others.
fn node_name(i: usize, node0: &str) -> String {
    if i == 0 {
        node0.to_string()
    } else {
        format!("gen-node-{i}")
    }
}

/// Adds the generated namespaces, pods, nodes (all but node 0) and policies to `c`.
/// Pod `i` runs on node `i % nodes`.
pub fn add(c: &mut Cluster, g: &Gen, node0: &str) {
    assert!(g.pods <= 40 * 256, "pod IPs must stay below 10.244.41.0");
    let mut r = Lcg(7);
    for i in 1..g.nodes {
        let name = node_name(i, node0);
        c.nodes.insert(
            name.clone(),
            Node {
                name,
                internal_ips: vec![IpAddr::V4(Ipv4Addr::new(
                    192,
                    168,
                    (i / 250) as u8,
                    (i % 250 + 1) as u8,
                ))],
                ..Default::default()
            },
        );
    }
    for i in 0..NAMESPACES {
        let name = format!("ns-{i}");
        c.namespaces.insert(
            name.clone(),
            Namespace {
                name: name.clone(),
                labels: [
                    (LABEL_NAMESPACE_NAME.to_string(), name.clone()),
                    ("team".to_string(), format!("team-{}", i % 5)),
                ]
                .into(),
            },
        );
    }
    // App a lives in namespace a % NAMESPACES.
    for i in 0..g.pods {
        let app = r.next(APPS);
        let ns = format!("ns-{}", app % NAMESPACES);
        let id = ObjRef::new(&ns, format!("app-{app}-{i}"));
        c.pods.insert(
            id.clone(),
            Pod {
                id,
                labels: [
                    ("app".to_string(), format!("app-{app}")),
                    (
                        "tier".to_string(),
                        ["front", "back", "db"][app % 3].to_string(),
                    ),
                ]
                .into(),
                node_name: Some(node_name(i % g.nodes, node0)),
                ips: vec![IpAddr::V4(pod_ip(i))],
                ports: vec![
                    ContainerPort {
                        name: "http".into(),
                        port: 8000 + (app % 4) as u16,
                        protocol: Protocol::TCP,
                    },
                    ContainerPort {
                        name: "metrics".into(),
                        port: 9100,
                        protocol: Protocol::TCP,
                    },
                ],
                ..Default::default()
            },
        );
    }
    let mut add = |p: NetworkPolicy| {
        c.policies.insert(p.id.clone(), p);
    };
    for i in 0..NAMESPACES.min(g.policies) {
        add(NetworkPolicy {
            id: ObjRef::new(format!("ns-{i}"), "default-deny"),
            policy_types: PolicyTypes {
                ingress: true,
                egress: false,
            },
            ..Default::default()
        });
    }
    for i in 0..g.policies.saturating_sub(NAMESPACES) {
        let app = r.next(APPS);
        let ns = format!("ns-{}", app % NAMESPACES);
        let other = (app + NAMESPACES * (1 + r.next(3))) % APPS; // same namespace
        let mut p = NetworkPolicy {
            id: ObjRef::new(&ns, format!("pol-{i}")),
            pod_selector: sel(&[("app", format!("app-{app}"))]),
            policy_types: PolicyTypes {
                ingress: true,
                egress: false,
            },
            ..Default::default()
        };
        match i % 5 {
            0 => p.ingress.push(PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: None,
                    pod: Some(sel(&[("app", format!("app-{other}"))])),
                }],
                ports: vec![tcp(PortMatch::Range(8000, 8003))],
            }),
            1 => p.ingress.push(PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: Some(sel(&[("team", format!("team-{}", r.next(5)))])),
                    pod: Some(sel(&[("tier", "front".into())])),
                }],
                ports: vec![tcp(PortMatch::Named("http".into()))],
            }),
            2 => p.ingress.push(PolicyRule {
                peers: vec![PolicyPeer::IpBlock(IpBlock {
                    cidr: "10.0.0.0/8".parse().expect("cidr"),
                    except: vec![
                        format!("10.{}.0.0/16", 100 + r.next(2))
                            .parse()
                            .expect("cidr"),
                    ],
                })],
                ports: vec![tcp(PortMatch::Range(443, 443))],
            }),
            3 => {
                p.policy_types.egress = true;
                p.egress.push(PolicyRule {
                    peers: vec![PolicyPeer::Selector {
                        namespace: Some(LabelSelector::everything()),
                        pod: Some(sel(&[("app", format!("app-{other}"))])),
                    }],
                    ports: vec![tcp(PortMatch::Named("http".into()))],
                });
                p.egress.push(PolicyRule {
                    peers: vec![PolicyPeer::Selector {
                        namespace: Some(sel(&[(LABEL_NAMESPACE_NAME, "ns-0".into())])),
                        pod: None,
                    }],
                    ports: vec![PolicyPort {
                        protocol: Protocol::UDP,
                        port: PortMatch::Range(53, 53),
                    }],
                });
            }
            _ => p.ingress.push(PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: Some(LabelSelector::everything()),
                    pod: Some(sel(&[("tier", "back".into())])),
                }],
                ports: vec![tcp(PortMatch::Range(30000, 32767))],
            }),
        }
        add(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_scale_has_its_counts_and_a_hundred_pods_on_node_zero() {
        let mut c = Cluster::default();
        add(&mut c, &Gen::ISSUE, "node-a");
        assert_eq!(c.pods.len(), 10_000);
        assert_eq!(c.policies.len(), 1_000);
        assert_eq!(c.nodes.len(), 99, "node 0 is the caller's");
        let local = c
            .pods
            .values()
            .filter(|p| p.node_name.as_deref() == Some("node-a"))
            .count();
        assert_eq!(local, 100);
        let ips: std::collections::BTreeSet<_> = c.pods.values().map(|p| p.ips[0]).collect();
        assert_eq!(ips.len(), 10_000, "pod IPs are distinct");
        assert!(!ips.contains(&IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2))));
    }
}
