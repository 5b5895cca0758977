//! The collector against fake counters, the exposition formats, and a golden test of the
//! whole metrics text for a fixed fake datapath (regenerate with
//! `UPDATE_GOLDEN=1 cargo nextest run -p weir --lib metrics`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
};

use weir_common::{
    ct::{CT_KIND_FLOW, CT_KIND_SVC},
    events::*,
    lb::{RevNat, SCOPE_CLUSTER, ServiceKey, ServiceValue},
    maps as names,
    metrics::*,
};
use weir_core::{image::MapImage, model::ObjRef};

use super::*;

/// Counters a test sets by hand.
#[derive(Default)]
pub struct FakeKernel {
    pub datapath: Mutex<BTreeMap<u32, Counter>>,
    pub services: Mutex<BTreeMap<u32, SvcCounter>>,
    pub stats: Mutex<BTreeMap<u32, u64>>,
}

impl KernelCounters for FakeKernel {
    fn datapath(&self) -> anyhow::Result<BTreeMap<u32, Counter>> {
        Ok(self.datapath.lock().unwrap().clone())
    }
    fn services(&self) -> anyhow::Result<BTreeMap<u32, SvcCounter>> {
        Ok(self.services.lock().unwrap().clone())
    }
    fn event_stats(&self) -> anyhow::Result<BTreeMap<u32, u64>> {
        Ok(self.stats.lock().unwrap().clone())
    }
}

fn metrics(fake: &Arc<FakeKernel>, limit: usize) -> Metrics {
    let mut shared = Shared::new(
        Some(Box::new(fake.clone())),
        Arc::new(crate::source::kube::KubeCounters::default()),
        limit,
    );
    shared.build = vec![
        ("version", "0.0.0-test".into()),
        ("datapath", "0123456789abcdef".into()),
    ];
    Metrics::new(Arc::new(shared))
}

fn om(m: &Metrics) -> String {
    m.render(Some("application/openmetrics-text;version=1.0.0"))
        .1
}

/// A Service image with one port: master at `vip:port` naming `id` as its Service port,
/// and the REV_NAT entry of that id.
fn service_image(id: u32, vip: &str, port: u16, proto: u8) -> MapImage {
    let mut img = MapImage::default();
    let addr = weir_common::Addr::from_ip(vip.parse().unwrap());
    img.services.insert(
        ServiceKey {
            addr,
            port_be: port.to_be(),
            proto,
            scope: SCOPE_CLUSTER,
            slot: 0,
            pad: [0; 2],
        },
        ServiceValue {
            rev_nat_id: id,
            svc_port_id: id,
            ..Default::default()
        },
    );
    img.rev_nat.insert(
        id,
        RevNat {
            addr,
            port_be: port.to_be(),
            proto,
            pad: [0; 5],
        },
    );
    img
}

fn sample<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn datapath_counters_are_summed_per_reason_and_direction_with_a_verdict() {
    let fake = Arc::new(FakeKernel::default());
    fake.datapath.lock().unwrap().extend([
        (
            index(REASON_POLICY_DENIED, DIR_EGRESS),
            Counter {
                packets: 3,
                bytes: 180,
            },
        ),
        (
            index(REASON_TRANSLATED, DIR_INGRESS),
            Counter {
                packets: 10,
                bytes: 1000,
            },
        ),
        (
            index(REASON_NO_BACKEND_REJECT, DIR_EGRESS),
            Counter {
                packets: 1,
                bytes: 60,
            },
        ),
    ]);
    let m = metrics(&fake, 10);
    let t = om(&m);
    for want in [
        r#"weir_datapath_packets_total{reason="policy_denied",direction="egress",verdict="drop"} 3"#,
        r#"weir_datapath_bytes_total{reason="policy_denied",direction="egress",verdict="drop"} 180"#,
        r#"weir_datapath_packets_total{reason="translated",direction="ingress",verdict="forward"} 10"#,
        r#"weir_datapath_packets_total{reason="no_backend_reject",direction="egress",verdict="reject"} 1"#,
        // Every known reason has a series from the start (rate() needs a zero).
        r#"weir_datapath_packets_total{reason="conntrack_full",direction="ingress",verdict="drop"} 0"#,
    ] {
        assert!(t.contains(want), "missing {want} in\n{t}");
    }
    assert_eq!(
        sample(&t, "weir_datapath_packets_total{").len(),
        REASON_NAMES.len() * 2
    );
    // A reason code this build does not name still shows up.
    fake.datapath.lock().unwrap().insert(
        index(40, DIR_INGRESS),
        Counter {
            packets: 2,
            bytes: 2,
        },
    );
    assert!(om(&m).contains(r#"{reason="reason_40",direction="ingress",verdict="drop"} 2"#));
    // The counters move as the maps do (read at every scrape).
    fake.datapath
        .lock()
        .unwrap()
        .get_mut(&index(REASON_POLICY_DENIED, DIR_EGRESS))
        .unwrap()
        .packets = 7;
    assert!(om(&m).contains(
        r#"weir_datapath_packets_total{reason="policy_denied",direction="egress",verdict="drop"} 7"#
    ));
}

#[test]
fn service_series_are_limited_and_the_rest_is_summed_into_other() {
    let fake = Arc::new(FakeKernel::default());
    let m = metrics(&fake, 2);
    {
        let mut l = m.shared.services.lock().unwrap();
        l.update(
            &ObjRef::new("shop", "a"),
            Some(&service_image(11, "10.96.0.1", 80, weir_common::proto::TCP)),
        );
        l.update(
            &ObjRef::new("shop", "b"),
            Some(&service_image(12, "10.96.0.2", 53, weir_common::proto::UDP)),
        );
        l.update(
            &ObjRef::new("shop", "c"),
            Some(&service_image(
                13,
                "10.96.0.3",
                443,
                weir_common::proto::TCP,
            )),
        );
    }
    let c = |p: u64, n: u64| SvcCounter {
        packets: p,
        bytes: p * 100,
        new_conns: n,
    };
    fake.services.lock().unwrap().extend([
        (11, c(5, 1)),
        (12, c(7, 7)),
        (13, c(4, 2)),
        (99, c(1000, 1)),
    ]);
    let t = om(&m);
    assert_eq!(
        sample(&t, "weir_service_packets_total{"),
        [
            r#"weir_service_packets_total{namespace="shop",name="a",port="80",protocol="TCP"} 5"#,
            r#"weir_service_packets_total{namespace="shop",name="b",port="53",protocol="UDP"} 7"#,
            r#"weir_service_packets_total{namespace="",name="other",port="",protocol=""} 4"#,
        ],
        "{t}"
    );
    assert!(t.contains(
        r#"weir_service_new_connections_total{namespace="shop",name="b",port="53",protocol="UDP"} 7"#
    ));
    assert!(t.contains(
        r#"weir_service_bytes_total{namespace="",name="other",port="",protocol=""} 400"#
    ));
    assert!(t.contains(r#"weir_service_ports{series="other"} 1"#));

    // Membership is sticky: b's Service changes (same id), c stays in "other"; when a is
    // deleted its place goes to the next new Service port, not to c.
    {
        let mut l = m.shared.services.lock().unwrap();
        l.update(
            &ObjRef::new("shop", "b"),
            Some(&service_image(12, "10.96.0.2", 53, weir_common::proto::UDP)),
        );
        l.update(&ObjRef::new("shop", "a"), None);
        l.update(
            &ObjRef::new("shop", "d"),
            Some(&service_image(
                14,
                "10.96.0.4",
                8080,
                weir_common::proto::TCP,
            )),
        );
    }
    fake.services.lock().unwrap().insert(14, c(1, 1));
    let t = om(&m);
    assert_eq!(
        sample(&t, "weir_service_packets_total{"),
        [
            r#"weir_service_packets_total{namespace="shop",name="b",port="53",protocol="UDP"} 7"#,
            r#"weir_service_packets_total{namespace="shop",name="d",port="8080",protocol="TCP"} 1"#,
            r#"weir_service_packets_total{namespace="",name="other",port="",protocol=""} 4"#,
        ],
        "{t}"
    );
}

#[test]
fn counters_of_a_released_service_port_are_deleted_only_once_its_rev_nat_entry_is_gone() {
    let mut l = ServiceLabels::new(10);
    let a = ObjRef::new("shop", "a");
    l.update(&a, Some(&service_image(11, "10.96.0.1", 80, 6)));
    assert!(l.collectable(|_| false).is_empty());
    l.update(&a, None);
    // Deferred deletion: the maps still hold REV_NAT 11, the datapath may still count.
    assert!(l.collectable(|id| id == 11).is_empty());
    assert_eq!(l.collectable(|_| false), [11]);
    assert!(
        l.collectable(|_| false).is_empty(),
        "forgotten once collected"
    );
    // An id that comes back before it was collected is not deleted.
    l.update(&a, Some(&service_image(12, "10.96.0.1", 80, 6)));
    l.update(&a, None);
    l.update(&a, Some(&service_image(12, "10.96.0.1", 80, 6)));
    assert!(l.collectable(|_| false).is_empty());
}

#[test]
fn conntrack_maps_sync_and_event_counters() {
    let fake = Arc::new(FakeKernel::default());
    fake.stats.lock().unwrap().extend([
        (stat_index(CLASS_DROP, STAT_EMITTED), 1000),
        (stat_index(CLASS_DROP, STAT_RATE_LIMITED), 250),
        (stat_index(CLASS_FLOW, STAT_NOT_SAMPLED), 9),
    ]);
    let m = metrics(&fake, 10);
    *m.shared.ct.lock().unwrap() = CtCounts {
        by_proto: [
            ((6, CT_KIND_FLOW), 40),
            ((6, CT_KIND_SVC), 20),
            ((17, CT_KIND_FLOW), 3),
        ]
        .into(),
        maps: [(names::CT, 63), (names::AFFINITY, 2)].into(),
        scanned: true,
    };
    {
        let mut s = m.shared.snapshot.lock().unwrap();
        s.capacities = [
            (names::CT, 262144),
            (names::SERVICES, 100),
            (names::AFFINITY, 10),
        ]
        .into();
        s.map_entries = [(names::SERVICES, 95)].into();
        s.sync.syncs = 4;
        s.sync.apply_errors.insert("map_full", 2);
        s.sync.refused.insert(names::SERVICES, 3);
        s.sync.compile_errors = 1;
    }
    m.shared
        .events
        .received
        .lock()
        .unwrap()
        .insert(EV_DROP, 990);
    m.shared.gc.ct_sweeps.store(7, Ordering::Relaxed);
    m.shared.gc.ct_deleted.store(31, Ordering::Relaxed);
    m.shared.gc.sockets_destroyed.store(2, Ordering::Relaxed);
    let t = om(&m);
    for want in [
        r#"weir_conntrack_entries{protocol="TCP",kind="flow"} 40"#,
        r#"weir_conntrack_entries{protocol="TCP",kind="service"} 20"#,
        r#"weir_conntrack_entries{protocol="UDP",kind="flow"} 3"#,
        r#"weir_map_entries{map="CT"} 63"#,
        r#"weir_map_entries{map="SERVICES"} 95"#,
        r#"weir_map_max_entries{map="SERVICES"} 100"#,
        r#"weir_syncs_total 4"#,
        r#"weir_sync_errors_total{reason="map_full"} 2"#,
        r#"weir_sync_errors_total{reason="compile"} 1"#,
        r#"weir_services_refused_total{map="SERVICES",reason="map_capacity"} 3"#,
        r#"weir_flow_events_total{class="drop",outcome="emitted"} 1000"#,
        r#"weir_flow_events_total{class="drop",outcome="rate_limited"} 250"#,
        r#"weir_flow_events_total{class="flow",outcome="not_sampled"} 9"#,
        r#"weir_flow_events_received_total{kind="drop"} 990"#,
        "weir_conntrack_gc_sweeps_total 7",
        "weir_conntrack_gc_deleted_entries_total 31",
        "weir_sockets_destroyed_total 2",
        "weir_gc_errors_total 0",
    ] {
        assert!(t.contains(want), "missing {want} in\n{t}");
    }
}

#[test]
fn content_negotiation_and_the_classic_text_format() {
    use format::*;
    // What Prometheus 2.x sends.
    let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert!(wants_openmetrics(Some(prom)));
    assert!(!wants_openmetrics(None));
    assert!(!wants_openmetrics(Some("*/*")));
    assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
    assert!(!wants_openmetrics(Some(
        "application/openmetrics-text;q=0.2,text/plain;q=0.9"
    )));
    let om = "# HELP weir_x Things.\n# TYPE weir_x counter\nweir_x_total{a=\"1\"} 2\n# HELP weir_build Build.\n# TYPE weir_build info\nweir_build_info{version=\"1\"} 1\n# HELP weir_t Time.\n# TYPE weir_t_seconds gauge\n# UNIT weir_t_seconds seconds\nweir_t_seconds 1.5\n# EOF\n";
    assert_eq!(
        to_prometheus_text(om),
        "# HELP weir_x_total Things.\n# TYPE weir_x_total counter\nweir_x_total{a=\"1\"} 2\n# HELP weir_build_info Build.\n# TYPE weir_build_info gauge\nweir_build_info{version=\"1\"} 1\n# HELP weir_t Time.\n# TYPE weir_t_seconds gauge\nweir_t_seconds 1.5\n"
    );
    let fake = Arc::new(FakeKernel::default());
    let m = metrics(&fake, 10);
    let (ct, body) = m.render(None);
    assert_eq!(ct, PROMETHEUS_TEXT);
    assert!(!body.contains("# EOF"));
    let (ct, body) = m.render(Some(prom));
    assert_eq!(ct, OPENMETRICS);
    assert!(body.ends_with("# EOF\n"));
}

fn golden(name: &str, got: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/metrics")
        .join(name);
    if std::env::var("UPDATE_GOLDEN").is_ok() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing; run with UPDATE_GOLDEN=1", path.display()));
    assert!(
        want == got,
        "{} differs (UPDATE_GOLDEN=1 regenerates it):\n{}",
        path.display(),
        diff(&want, got)
    );
}

fn diff(a: &str, b: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(i), b.get(i));
        if x != y {
            out.push_str(&format!(
                "line {}: want {:?}\n         got  {:?}\n",
                i + 1,
                x,
                y
            ));
        }
    }
    out
}

/// The whole exposition, both formats, for a fixed fake datapath and agent state.
#[test]
fn golden_metrics_text() {
    let fake = Arc::new(FakeKernel::default());
    fake.datapath.lock().unwrap().extend([
        (
            index(REASON_TRANSLATED, DIR_EGRESS),
            Counter {
                packets: 120,
                bytes: 9600,
            },
        ),
        (
            index(REASON_POLICY_DENIED, DIR_INGRESS),
            Counter {
                packets: 4,
                bytes: 240,
            },
        ),
    ]);
    fake.services.lock().unwrap().insert(
        7,
        SvcCounter {
            packets: 120,
            bytes: 9600,
            new_conns: 12,
        },
    );
    fake.stats
        .lock()
        .unwrap()
        .insert(stat_index(CLASS_DROP, STAT_EMITTED), 4);
    let m = metrics(&fake, 1000);
    m.shared.services.lock().unwrap().update(
        &ObjRef::new("shop", "web"),
        Some(&service_image(7, "10.96.0.10", 80, weir_common::proto::TCP)),
    );
    *m.shared.ct.lock().unwrap() = CtCounts {
        by_proto: [((6, CT_KIND_FLOW), 12), ((6, CT_KIND_SVC), 12)].into(),
        maps: [(names::CT, 24), (names::AFFINITY, 0), (names::SOCK_REV, 0)].into(),
        scanned: true,
    };
    {
        let mut s = m.shared.snapshot.lock().unwrap();
        s.capacities = crate::datapath::effective_capacities(&Default::default());
        s.map_entries = [
            (names::SERVICES, 3),
            (names::BACKENDS, 2),
            (names::REV_NAT, 1),
            (names::NODE_ADDRS, 1),
        ]
        .into();
        s.sync.syncs = 3;
        s.sync.ops_applied = 8;
        s.objects = [("Service", 1), ("EndpointSlice", 1), ("Node", 1)].into();
        s.store.events = 9;
        s.store.lists = 6;
        s.last_sync_unix = Some(1_700_000_000.5);
        s.ready = true;
    }
    m.shared.events.received.lock().unwrap().insert(EV_DROP, 4);
    m.hist
        .programming
        .get_or_create(&[("kind", "Service")])
        .observe(0.00042);
    m.hist.sync.observe(0.00013);
    m.hist.sync.observe(0.0021);
    golden("metrics.openmetrics.txt", &om(&m));
    golden("metrics.prometheus.txt", &m.render(None).1);
}

/// Sample names (`weir_x_total`, `weir_x_bucket`, ...) and family names of the golden
/// Prometheus text exposition.
fn golden_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/metrics/metrics.prometheus.txt"),
    )
    .unwrap();
    let mut samples = BTreeSet::new();
    let mut families = BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            families.insert(rest.split(' ').next().unwrap().to_string());
        } else if !l.starts_with('#') && !l.is_empty() {
            samples.insert(l.split(['{', ' ']).next().unwrap().to_string());
        }
    }
    (samples, families)
}

/// `weir_...` identifiers in a text.
fn weir_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(p) = text[i..].find("weir_") {
        let start = i + p;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        // Not part of a longer identifier (e.g. a path like agent/src/weir_x).
        if start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_queries_only_metrics_the_agent_exports() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/grafana-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(
        exprs.len() > 20,
        "the dashboard has {} queries",
        exprs.len()
    );
    let (samples, _) = golden_names();
    let mut used = BTreeSet::new();
    for e in &exprs {
        for n in weir_names(e) {
            assert!(
                samples.contains(&n),
                "the dashboard queries {n}, which the agent does not export: {e}"
            );
            used.insert(n);
        }
    }
    // The dashboard covers the headline series.
    for n in [
        "weir_ready",
        "weir_datapath_packets_total",
        "weir_service_packets_total",
        "weir_network_programming_duration_seconds_bucket",
        "weir_map_entries",
        "weir_flow_events_total",
    ] {
        assert!(used.contains(n), "the dashboard does not show {n}");
    }
}

#[test]
fn docs_list_every_metric_and_no_other() {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .unwrap();
    let (samples, families) = golden_names();
    let documented = weir_names(&doc);
    for f in &families {
        // The text format names counters `_total` and infos `_info`; the docs use those.
        let shown = [f.clone(), format!("{f}_total"), format!("{f}_info")];
        assert!(
            shown.iter().any(|n| documented.contains(n)),
            "docs/metrics.md does not list {f}"
        );
    }
    for n in &documented {
        let known = samples.contains(n) || families.contains(n);
        assert!(
            known,
            "docs/metrics.md names {n}, which the agent does not export"
        );
    }
}
