//! The sync loop against the real maps, with packets through BPF_PROG_TEST_RUN: a restart
//! that adopts the pinned maps writes nothing and keeps connections on their backends;
//! a change that overflows a (small) map is refused for the offending Service only,
//! whose programmed state stays; the inspection CLI reads the live pinned maps.

mod support;

use std::collections::BTreeMap;

use support::*;
use weir::{
    datapath::{Dataplane, Hook, LoadOptions},
    inspect::{conntrack_view, read_conntrack, services_view},
    testing::{
        packet::{self, ACK, SYN, sock},
        prog::{ProgHarness, TC_ACT_OK},
    },
};
use weir_common::maps as names;
use weir_core::{
    datapath::Datapath,
    model::{Cluster, Protocol},
    pipeline::{ChangeSet, NodeSettings},
    sync::{SyncInput, SyncReport, Syncer},
};

fn settings() -> NodeSettings {
    NodeSettings {
        node_name: NODE.into(),
        ..Default::default()
    }
}

fn sync(s: &mut Syncer, c: &Cluster, ch: &ChangeSet, dp: &mut impl Datapath) -> SyncReport {
    s.sync(
        SyncInput {
            cluster: c,
            changes: ch,
            sources_synced: true,
            generation: 1,
        },
        dp,
    )
}

/// Sends a SYN from `client_port` to `vip`:80 through the from-pod program; returns the
/// destination the packet leaves with.
fn syn(h: &ProgHarness, client_port: u16, vip: &str) -> String {
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock("10.244.1.2", client_port), sock(vip, 80), SYN, b""),
        )
        .unwrap();
    assert_eq!(r.verdict, TC_ACT_OK);
    let p = r.parsed();
    format!("{}:{}", p.dst, p.dport)
}

fn ack(h: &ProgHarness, client_port: u16, vip: &str) -> String {
    let r = h
        .run(
            Hook::FromPod,
            &packet::tcp(sock("10.244.1.2", client_port), sock(vip, 80), ACK, b"x"),
        )
        .unwrap();
    let p = r.parsed();
    format!("{}:{}", p.dst, p.dport)
}

fn three_services() -> Cluster {
    let mut c = Cluster::default();
    let backends: Vec<(String, u16, &str)> = (1..=6)
        .map(|i| (format!("10.244.2.{i}"), 8080, NODE))
        .collect();
    let b: Vec<(&str, u16, &str)> = backends
        .iter()
        .map(|(a, p, n)| (a.as_str(), *p, *n))
        .collect();
    add_service(&mut c, "a", "10.96.0.1", 80, Protocol::TCP, &b[0..2]);
    add_service(&mut c, "b", "10.96.0.2", 80, Protocol::TCP, &b[2..4]);
    add_service(&mut c, "c", "10.96.0.3", 80, Protocol::TCP, &b[4..6]);
    c
}

#[test]
fn a_restart_adopts_the_pinned_maps_writes_nothing_and_keeps_connections() {
    require_root();
    let c = three_services();
    let mut h = ProgHarness::new().expect("load datapath");
    let mut s = Syncer::new(settings(), h.dp.read_image().unwrap(), h.dp.capacities());
    let r = sync(&mut s, &c, &ChangeSet::everything(), &mut h.dp);
    assert!(r.ops > 0 && r.apply_error.is_none());
    // Open connections: one SYN per Service, remembered by conntrack.
    let before: Vec<String> = ["10.96.0.1", "10.96.0.2", "10.96.0.3"]
        .iter()
        .enumerate()
        .map(|(i, vip)| syn(&h, 40000 + i as u16, vip))
        .collect();
    let programmed = h.dp.read_image().unwrap();

    // "Restart": a new load of the datapath on the same pin directory adopts the maps;
    // a new syncer seeded from them syncs the unchanged cluster.
    let mut dp2 = Dataplane::load(&LoadOptions {
        pin_dir: h.pin_dir.clone(),
        capacities: Default::default(),
    })
    .expect("adopt the pinned maps");
    let mut w2 = dp2.datapath().unwrap();
    let adopted = w2.read_image().unwrap();
    assert_eq!(adopted, programmed);
    let mut s2 = Syncer::new(settings(), adopted, w2.capacities());
    let r = sync(&mut s2, &c, &ChangeSet::everything(), &mut w2);
    assert_eq!(
        r.ops, 0,
        "an unchanged cluster writes nothing after a restart"
    );
    assert_eq!(w2.read_image().unwrap(), programmed);

    // The open connections keep their backends (same ids, same conntrack entries).
    for (i, vip) in ["10.96.0.1", "10.96.0.2", "10.96.0.3"].iter().enumerate() {
        assert_eq!(ack(&h, 40000 + i as u16, vip), before[i], "{vip}");
    }
    // A change after the restart reuses the adopted ids: only the new backend, its
    // slot and the master are written.
    let mut c2 = c.clone();
    add_service(
        &mut c2,
        "a",
        "10.96.0.1",
        80,
        Protocol::TCP,
        &[
            ("10.244.2.1", 8080, NODE),
            ("10.244.2.2", 8080, NODE),
            ("10.244.2.9", 8080, NODE),
        ],
    );
    let ch = ChangeSet {
        services: [weir_core::model::ObjRef::new("default", "a")].into(),
        slices: (0..3)
            .map(|i| weir_core::model::ObjRef::new("default", format!("a-{i}")))
            .collect(),
        ..Default::default()
    };
    let r = sync(&mut s2, &c2, &ch, &mut w2);
    assert_eq!(r.ops, 3, "backend, slot, master");
    assert_eq!(ack(&h, 40000, "10.96.0.1"), before[0]);
}

#[test]
fn an_overflowing_change_is_refused_for_its_service_and_the_rest_is_programmed() {
    require_root();
    // Each Service here takes 4 SERVICES entries (master, VIP marker, two slots).
    let mut h = ProgHarness::with_capacities(BTreeMap::from([(names::SERVICES.to_string(), 9)]))
        .expect("load datapath");
    let mut s = Syncer::new(settings(), h.dp.read_image().unwrap(), h.dp.capacities());
    assert_eq!(h.dp.capacities()[names::SERVICES], 9);
    let c = three_services();
    let r = sync(&mut s, &c, &ChangeSet::everything(), &mut h.dp);
    assert!(
        r.apply_error.is_none(),
        "admission kept the map from overflowing"
    );
    assert_eq!(r.refused.len(), 1);
    assert_eq!(r.refused[0].service.name, "c");
    assert_eq!(r.refused[0].map, names::SERVICES);
    assert_eq!(s.counters.refused[names::SERVICES], 1);
    // a and b are served; c's VIP is not a frontend (the packet passes untranslated).
    assert!(syn(&h, 41000, "10.96.0.1").starts_with("10.244.2."));
    assert!(syn(&h, 41001, "10.96.0.2").starts_with("10.244.2."));
    assert_eq!(syn(&h, 41002, "10.96.0.3"), "10.96.0.3:80");

    // b grows past the capacity: refused, and its programmed backends keep serving.
    let mut c2 = c.clone();
    add_service(
        &mut c2,
        "b",
        "10.96.0.2",
        80,
        Protocol::TCP,
        &[
            ("10.244.2.3", 8080, NODE),
            ("10.244.2.4", 8080, NODE),
            ("10.244.2.7", 8080, NODE),
            ("10.244.2.8", 8080, NODE),
        ],
    );
    let before = h.dp.read_image().unwrap();
    let ch = ChangeSet {
        services: [weir_core::model::ObjRef::new("default", "b")].into(),
        slices: (0..4)
            .map(|i| weir_core::model::ObjRef::new("default", format!("b-{i}")))
            .collect(),
        ..Default::default()
    };
    let r = sync(&mut s, &c2, &ch, &mut h.dp);
    assert_eq!(r.refused.len(), 1);
    assert_eq!(r.refused[0].service.name, "b");
    assert_eq!(
        h.dp.read_image().unwrap(),
        before,
        "b's programmed state is intact"
    );
    for port in 42000..42010 {
        let d = syn(&h, port, "10.96.0.2");
        assert!(d == "10.244.2.3:8080" || d == "10.244.2.4:8080", "{d}");
    }
}

#[test]
fn the_cli_reads_the_live_pinned_maps() {
    require_root();
    let c = three_services();
    let mut h = ProgHarness::new().expect("load datapath");
    let mut s = Syncer::new(settings(), h.dp.read_image().unwrap(), h.dp.capacities());
    sync(&mut s, &c, &ChangeSet::everything(), &mut h.dp);
    syn(&h, 43000, "10.96.0.1");
    let weir = env!("CARGO_BIN_EXE_weir");
    let run = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(weir)
            .args(args)
            .arg("--pin-dir")
            .arg(&h.pin_dir)
            .args(["-o", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "weir {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let img = h.dp.read_image().unwrap();
    assert_eq!(
        run(&["services"]),
        serde_json::to_value(services_view(&img)).unwrap()
    );
    assert_eq!(
        run(&["endpoints"]),
        serde_json::to_value(weir::inspect::endpoints_view(&img)).unwrap()
    );
    let ct = run(&["conntrack"]);
    let ct = ct.as_array().unwrap();
    assert_eq!(ct.len(), 2, "{ct:#?}");
    let kinds: Vec<&str> = ct.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"service") && kinds.contains(&"flow"));
    assert_eq!(
        conntrack_view(&read_conntrack(&h.pin_dir).unwrap(), 0).len(),
        2
    );
    let e = run(&[
        "explain",
        "--from",
        "10.244.1.2",
        "--to",
        "10.96.0.1",
        "--port",
        "80",
    ]);
    assert_eq!(e["verdict"], "translated");
    assert_eq!(e["candidates"].as_array().unwrap().len(), 2);
    // Without an agent's pins the CLI says what is missing.
    let out = std::process::Command::new(weir)
        .args([
            "services",
            "--pin-dir",
            "/sys/fs/bpf/weir-test/does-not-exist",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is a weir agent running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `weir explain` computes from the maps what the datapath does: for each case, the
/// program run on the real maps (BPF_PROG_TEST_RUN) agrees with the explained verdict,
/// the chosen backend is among the explained candidates, and a masquerade shows.
#[test]
fn explain_agrees_with_the_datapath() {
    require_root();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/cli/cluster.yaml"
    ))
    .unwrap();
    let (objs, errs) = weir::source::yaml::parse_documents(&text, "cluster.yaml");
    assert!(errs.is_empty());
    let (c, errs) = weir::source::dir::to_cluster(&objs);
    assert!(errs.is_empty());
    let mut h = ProgHarness::new().expect("load datapath");
    let mut s = Syncer::new(
        NodeSettings {
            node_name: "node-a".into(),
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            compile: weir_core::compile::CompileOptions {
                maglev_table_size: 7,
                ..Default::default()
            },
            ..Default::default()
        },
        h.dp.read_image().unwrap(),
        h.dp.capacities(),
    );
    let r = sync(&mut s, &c, &ChangeSet::everything(), &mut h.dp);
    assert!(r.apply_error.is_none() && r.errors.is_empty());
    let img = h.dp.read_image().unwrap();
    use weir::testing::prog::{TC_ACT_REDIRECT, TC_ACT_SHOT};
    let cases: &[(&str, &str, u16, bool, Hook)] = &[
        ("10.244.1.5", "10.96.0.10", 80, true, Hook::FromPod),
        ("10.244.1.5", "10.96.0.10", 8080, true, Hook::FromPod),
        ("203.0.113.9", "192.168.10.11", 30080, false, Hook::UplinkIn),
        ("203.0.113.9", "198.51.100.7", 443, false, Hook::UplinkIn),
        ("192.0.2.1", "198.51.100.7", 443, false, Hook::UplinkIn),
        ("10.244.1.5", "10.96.0.14", 80, true, Hook::FromPod),
        ("10.244.1.5", "10.244.2.7", 8080, true, Hook::FromPod),
    ];
    for (i, (from, to, port, from_pod, hook)) in cases.iter().enumerate() {
        let e = weir::inspect::explain_view(
            &img,
            from.parse().unwrap(),
            to.parse().unwrap(),
            *port,
            weir_common::proto::TCP,
            *from_pod,
        );
        let r = h
            .run(
                *hook,
                &packet::tcp(sock(from, 50000 + i as u16), sock(to, *port), SYN, b""),
            )
            .unwrap();
        let what = format!("{from} -> {to}:{port}: explained {e:#?}");
        match e.verdict {
            "translated" => {
                assert_eq!(r.verdict, TC_ACT_OK, "{what}");
                let p = r.parsed();
                let dst = format!("{}:{}", p.dst, p.dport);
                assert!(e.candidates.contains(&dst), "{what}: went to {dst}");
                let masq = e
                    .steps
                    .iter()
                    .find(|s| s.stage == "masquerade")
                    .and_then(|s| s.decision.strip_prefix("source rewritten to "))
                    .map(|rest| rest.split(';').next().unwrap().to_string());
                let src = p.src.to_string();
                match masq {
                    Some(m) => assert_eq!(src, m, "{what}"),
                    None => assert_eq!(src, *from, "{what}"),
                }
            }
            "rejected" => assert_eq!(r.verdict, TC_ACT_REDIRECT, "{what}"),
            "dropped" => assert_eq!(r.verdict, TC_ACT_SHOT, "{what}"),
            "forwarded" => {
                assert_eq!(r.verdict, TC_ACT_OK, "{what}");
                assert_eq!(r.parsed().dst.to_string(), *to, "{what}");
            }
            v => panic!("unexpected verdict {v}"),
        }
    }
}
