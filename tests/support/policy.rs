//! NetworkPolicy scenarios for tests: the upstream x/y/z model plus one case file of
//! tests/data/policy, compiled per node; reachability matrices read from compiled maps;
//! exhaustive comparison of the lookup sequence with the evaluator.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use weir::source::dir;
use weir_common::Addr;
use weir_core::{
    model::{Cluster, ObjRef, Protocol},
    policy::{
        Compiled, Direction, PolicyCompiler,
        eval::{self, end_for},
        lookup::{self, Outcome, PolicyMaps},
    },
};

pub const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/policy");
pub const NODES: [&str; 2] = ["node-1", "node-2"];
pub const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];
/// Addresses outside the pods: nodes and the outside world.
pub const OTHERS: [&str; 7] = [
    "192.168.100.1",
    "fd00:100::1",
    "192.168.100.2",
    "8.8.8.8",
    "10.9.9.9",
    "2001:db8::1",
    "fd00:244::99",
];
pub const PORTS: [u16; 8] = [1, 53, 79, 80, 81, 1023, 8080, 9090];
pub const PROTOS: [Protocol; 3] = [Protocol::TCP, Protocol::UDP, Protocol::SCTP];

/// Every case file (everything but the model), sorted.
pub fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(DATA)
        .expect("tests/data/policy")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "model.yaml")
        })
        .collect();
    v.sort();
    v
}

/// The model plus the case (objects of the case replace the model's of the same name).
pub fn cluster(case: &Path) -> Cluster {
    let files = [PathBuf::from(DATA).join("model.yaml"), case.to_path_buf()];
    let (objs, errs) = dir::read_objects(files.iter()).expect("reading YAML");
    assert!(errs.is_empty(), "{errs:?}");
    let (c, errs) = dir::to_cluster(&objs);
    assert!(errs.is_empty(), "{case:?}: {errs:?}");
    c
}

pub fn compile(c: &Cluster) -> BTreeMap<&'static str, Compiled> {
    NODES
        .iter()
        .map(|n| {
            (
                *n,
                PolicyCompiler::default().compile(c, n).expect("compiles"),
            )
        })
        .collect()
}

fn pod_ip(c: &Cluster, name: &str) -> IpAddr {
    let (ns, n) = name.split_once('/').unwrap();
    c.pods[&ObjRef::new(ns, n)].ips[0]
}

/// A connection's verdict from the maps: the source's egress on its node AND the
/// destination's ingress on its node.
pub fn allowed_by_maps<M: PolicyMaps>(
    maps: &BTreeMap<&str, M>,
    src: IpAddr,
    dst: IpAddr,
    proto: Protocol,
    port: u16,
) -> bool {
    let (s, d) = (
        Addr::from_ip(src.to_canonical()),
        Addr::from_ip(dst.to_canonical()),
    );
    maps.values().all(|m| {
        lookup::decide(m, Direction::Egress, s, d, proto.number(), port).allows()
            && lookup::decide(m, Direction::Ingress, s, d, proto.number(), port).allows()
    })
}

/// The upstream-style matrix ('.' allowed, 'X' denied, '-' diagonal) from the maps.
pub fn matrix<M: PolicyMaps>(
    c: &Cluster,
    maps: &BTreeMap<&str, M>,
    proto: Protocol,
    port: u16,
) -> Vec<String> {
    PODS.iter()
        .map(|s| {
            PODS.iter()
                .map(|d| {
                    if s == d {
                        '-'
                    } else if allowed_by_maps(maps, pod_ip(c, s), pod_ip(c, d), proto, port) {
                        '.'
                    } else {
                        'X'
                    }
                })
                .collect()
        })
        .collect()
}

/// The truth tables a case file states in comments:
/// `# expect TCP/80` followed by nine lines `#   <row>`.
pub fn expectations(case: &Path) -> Vec<(Protocol, u16, Vec<String>)> {
    let text = std::fs::read_to_string(case).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(rest) = l.strip_prefix("# expect ") {
            let (proto, port) = rest.trim().split_once('/').expect("PROTO/PORT");
            let rows: Vec<String> = lines[i + 1..i + 10]
                .iter()
                .map(|r| r.trim_start_matches('#').trim().to_string())
                .collect();
            assert!(
                rows.iter().all(|r| r.len() == 9),
                "{case:?}: bad table {rows:?}"
            );
            out.push((
                Protocol::parse(proto).expect("protocol"),
                port.parse().unwrap(),
                rows,
            ));
        }
    }
    out
}

/// Every address of the scenario.
pub fn universe(c: &Cluster) -> Vec<IpAddr> {
    let mut u: BTreeSet<IpAddr> = c.pods.values().flat_map(|p| p.ips.clone()).collect();
    u.extend(OTHERS.iter().map(|s| s.parse::<IpAddr>().unwrap()));
    u.into_iter().collect()
}

/// Compares the lookup sequence over `maps` (node `node`'s) with the evaluator for every
/// same-family pair of addresses, every protocol and port of the lists, both directions.
/// Returns the number of decisions checked.
pub fn check_node<M: PolicyMaps>(c: &Cluster, node: &str, maps: &M) -> Result<usize, String> {
    let u = universe(c);
    let mut n = 0;
    for src in &u {
        for dst in &u {
            if src.is_ipv4() != dst.is_ipv4() {
                continue;
            }
            let (s, d) = (end_for(c, *src), end_for(c, *dst));
            for proto in PROTOS {
                for port in PORTS {
                    let v = eval::evaluate(c, &s, &d, proto, port);
                    for (dir, decision, local) in [
                        (Direction::Egress, v.egress, &s),
                        (Direction::Ingress, v.ingress, &d),
                    ] {
                        let got = lookup::decide(
                            maps,
                            dir,
                            Addr::from_ip(*src),
                            Addr::from_ip(*dst),
                            proto.number(),
                            port,
                        );
                        let here = local
                            .pod()
                            .is_some_and(|p| p.node_name.as_deref() == Some(node));
                        let ok = if here {
                            got.agrees_with(decision)
                        } else {
                            got == Outcome::NoEndpoint
                        };
                        if !ok {
                            return Err(format!(
                                "{node}: {dir:?} {src} -> {dst} {proto}/{port}: evaluator {decision:?}, maps {got:?}"
                            ));
                        }
                        n += 1;
                    }
                }
            }
        }
    }
    Ok(n)
}
