//! NetworkPolicy map sizes and compile times on a generated cluster:
//!
//! ```sh
//! cargo run --release -p weir-core --example policy_scale [PODS] [POLICIES] [NODES]
//! ```
//!
//! (defaults 10000 pods, 1000 policies, 100 nodes). The cluster: 50 namespaces labelled
//! with one of 5 teams; pods of 200 apps (labels app, tier), each with named ports http
//! and metrics whose numbers differ between apps; per namespace a default deny; the other
//! policies select one app and allow, in a mix modelled on real policy sets: from another
//! app of the namespace on a port, from a team's front-end pods on a named port, from a
//! CIDR with an except, egress to an app on a named port and to DNS, and a port range.
//! Prints, for node 0: map entries, compile time, and the plan sizes of typical changes.

use std::{net::IpAddr, time::Instant};

use weir_core::{
    model::*,
    policy::{PolicyCompiler, plan},
};

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

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (n_pods, n_pol, n_nodes) = (
        *args.first().unwrap_or(&10_000),
        *args.get(1).unwrap_or(&1_000),
        *args.get(2).unwrap_or(&100),
    );
    let (n_ns, n_apps) = (50usize, 200usize);
    let mut r = Lcg(7);
    let mut c = Cluster::default();
    for i in 0..n_nodes {
        c.nodes.insert(
            format!("node-{i}"),
            Node {
                name: format!("node-{i}"),
                internal_ips: vec![
                    format!("192.168.{}.{}", i / 250, i % 250 + 1)
                        .parse()
                        .unwrap(),
                ],
                ..Default::default()
            },
        );
    }
    for i in 0..n_ns {
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
    // App a lives in namespace a % n_ns.
    for i in 0..n_pods {
        let app = r.next(n_apps);
        let ns = format!("ns-{}", app % n_ns);
        let id = ObjRef::new(&ns, format!("app-{app}-{i}"));
        let ip: IpAddr = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
            .parse()
            .unwrap();
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
                node_name: Some(format!("node-{}", i % n_nodes)),
                ips: vec![ip],
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
    for i in 0..n_ns.min(n_pol) {
        add(NetworkPolicy {
            id: ObjRef::new(format!("ns-{i}"), "default-deny"),
            policy_types: PolicyTypes {
                ingress: true,
                egress: false,
            },
            ..Default::default()
        });
    }
    for i in 0..n_pol.saturating_sub(n_ns) {
        let app = r.next(n_apps);
        let ns = format!("ns-{}", app % n_ns);
        let other = (app + n_ns * (1 + r.next(3))) % n_apps; // same namespace
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
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec![format!("10.{}.0.0/16", 100 + r.next(2)).parse().unwrap()],
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
    println!(
        "cluster: {} pods, {} namespaces, {} policies, {} nodes",
        c.pods.len(),
        c.namespaces.len(),
        c.policies.len(),
        n_nodes
    );
    let node = "node-0";
    let mut comp = PolicyCompiler::default();
    let t = Instant::now();
    let first = comp.compile(&c, node).unwrap();
    let dt = t.elapsed();
    let img = &first.image;
    println!(
        "node-0 ({} local pods): IPCACHE {} ENDPOINTS {} POLICY {} POLICY_RULES {}; identities {}, policy keys {}; compile {:.1} ms",
        c.pods
            .values()
            .filter(|p| p.node_name.as_deref() == Some(node))
            .count(),
        img.ipcache.len(),
        img.endpoints.len(),
        img.policy.len(),
        img.rules.len(),
        first.info.identities.len(),
        first.info.keys.len(),
        dt.as_secs_f64() * 1e3
    );
    let (mut max, mut sum) = ([0usize; 3], [0usize; 3]);
    for i in 0..n_nodes {
        let x = PolicyCompiler::default()
            .compile(&c, &format!("node-{i}"))
            .unwrap()
            .image;
        for (j, n) in [x.ipcache.len(), x.policy.len(), x.rules.len()]
            .into_iter()
            .enumerate()
        {
            max[j] = max[j].max(n);
            sum[j] += n;
        }
    }
    println!(
        "over all {n_nodes} nodes: IPCACHE max {} mean {}; POLICY max {} mean {}; POLICY_RULES max {} mean {}",
        max[0],
        sum[0] / n_nodes,
        max[1],
        sum[1] / n_nodes,
        max[2],
        sum[2] / n_nodes
    );
    let mut prev = first.image;
    let mut step = |what: &str, c: &Cluster, comp: &mut PolicyCompiler| {
        let t = Instant::now();
        let next = comp.compile(c, node).unwrap().image;
        let dt = t.elapsed();
        let ops = plan::diff(&prev, &next);
        println!(
            "{what}: {} ops (compile {:.1} ms)",
            ops.len(),
            dt.as_secs_f64() * 1e3
        );
        prev = next;
    };
    step("recompile, nothing changed", &c, &mut comp);
    // A label change on one remote pod.
    let k = c.pods.keys().nth(n_pods / 2).unwrap().clone();
    c.pods
        .get_mut(&k)
        .unwrap()
        .labels
        .insert("tier".into(), "front".into());
    step("one remote pod's tier label changed", &c, &mut comp);
    // A new policy selecting an app, allowing from another app.
    let local_app = c
        .pods
        .values()
        .find(|p| p.node_name.as_deref() == Some(node))
        .unwrap()
        .clone();
    c.policies.insert(
        ObjRef::new(&local_app.id.namespace, "new"),
        NetworkPolicy {
            id: ObjRef::new(&local_app.id.namespace, "new"),
            pod_selector: sel(&[("app", local_app.labels["app"].clone())]),
            policy_types: PolicyTypes {
                ingress: true,
                egress: false,
            },
            ingress: vec![PolicyRule {
                peers: vec![PolicyPeer::Selector {
                    namespace: None,
                    pod: Some(sel(&[("tier", "db".into())])),
                }],
                ports: vec![tcp(PortMatch::Range(5432, 5432))],
            }],
            egress: vec![],
        },
    );
    step("a policy added for a local app", &c, &mut comp);
    let mut restarted = PolicyCompiler::default();
    restarted.seed_from(&prev);
    let t = Instant::now();
    let again = restarted.compile(&c, node).unwrap().image;
    println!(
        "agent restart (seeded from the maps): {} ops (compile {:.1} ms)",
        plan::diff(&prev, &again).len(),
        t.elapsed().as_secs_f64() * 1e3
    );
}
