//! Scrape cost at scale: the metrics state of SERVICES Services (one TCP port each, all
//! with traffic counted), rendered the way `/metrics` renders it, SCRAPES times per case.
//! A measurement, not a test: nothing here asserts on time.
//!
//! ```text
//! cargo run --release -p weir --example metrics_scale [SERVICES] [SCRAPES] [--fake]
//! ```
//!
//! By default the per-Service counters are read from the real `SVC_COUNTERS` per-CPU map
//! of a datapath loaded into a throwaway pin directory (needs root and bpffs; removed on
//! exit), filled with one entry per Service port, exactly as a scrape reads them; with
//! `--fake` they come from memory (the userspace part alone).
//!
//! Cases: every Service port with its own series (`--metrics-service-limit` >= SERVICES,
//! the worst case) and the default limit of 1000 (the rest summed into `other`), each in
//! both exposition formats. Printed: wall and thread CPU time per scrape (min, median,
//! max), body size and sample lines.

use std::{sync::Arc, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use weir::{
    datapath::maps::open_pinned,
    metrics::{KernelCounters, Metrics, Shared, kernel::AyaKernelCounters},
    testing::prog::ProgHarness,
};
use weir_common::{
    Addr,
    events::SvcCounter,
    lb::{RevNat, SCOPE_CLUSTER, ServiceKey, ServiceValue},
    maps as names,
    metrics::{Counter, DIR_EGRESS, REASON_NAMES, index},
};
use weir_core::{image::MapImage, model::ObjRef};

const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0";

/// Counters held in memory (`--fake`).
struct MemCounters {
    services: std::collections::BTreeMap<u32, SvcCounter>,
}

impl KernelCounters for MemCounters {
    fn datapath(&self) -> Result<std::collections::BTreeMap<u32, Counter>> {
        Ok((0..REASON_NAMES.len() as u8)
            .map(|r| {
                (
                    index(r, DIR_EGRESS),
                    Counter {
                        packets: 1000 + r as u64,
                        bytes: 64_000,
                    },
                )
            })
            .collect())
    }
    fn services(&self) -> Result<std::collections::BTreeMap<u32, SvcCounter>> {
        Ok(self.services.clone())
    }
    fn event_stats(&self) -> Result<std::collections::BTreeMap<u32, u64>> {
        Ok((0..8).map(|i| (i, 0)).collect())
    }
}

fn counter(id: u32) -> SvcCounter {
    SvcCounter {
        packets: 100 + id as u64,
        bytes: 6400 + id as u64,
        new_conns: 10 + (id as u64 % 7),
    }
}

/// The image of Service `i`: its ClusterIP master entry naming Service port id `i + 1`
/// and the REV_NAT entry of that id (what `ServiceLabels` reads the labels from).
fn service_image(i: u32) -> MapImage {
    let id = i + 1;
    let ip = std::net::Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8);
    let addr = Addr::from_ip(ip.into());
    let mut img = MapImage::default();
    img.services.insert(
        ServiceKey {
            addr,
            port_be: 80u16.to_be(),
            proto: weir_common::proto::TCP,
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
            port_be: 80u16.to_be(),
            proto: weir_common::proto::TCP,
            pad: [0; 5],
        },
    );
    img
}

fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn metrics(kernel: Box<dyn KernelCounters>, services: u32, limit: usize) -> Metrics {
    let shared = Shared::new(
        Some(kernel),
        Arc::new(weir::source::kube::KubeCounters::default()),
        limit,
    );
    {
        let mut labels = shared.services.lock().unwrap();
        for i in 0..services {
            let svc = ObjRef::new(format!("ns-{}", i / 100), format!("svc-{i}"));
            labels.update(&svc, Some(&service_image(i)));
        }
        let mut s = shared.snapshot.lock().unwrap();
        s.capacities = weir::datapath::effective_capacities(&Default::default());
        s.map_entries = [
            (names::SERVICES, services as usize * 11),
            (names::BACKENDS, services as usize * 10),
            (names::REV_NAT, services as usize),
        ]
        .into();
        s.objects = [
            ("Service", services as usize),
            ("EndpointSlice", services as usize),
        ]
        .into();
        s.ready = true;
    }
    let m = Metrics::new(Arc::new(shared));
    for kind in ["Service", "EndpointSlice"] {
        m.hist
            .programming
            .get_or_create(&[("kind", kind)])
            .observe(0.002);
    }
    m.hist.sync.observe(0.01);
    m
}

fn ms(d: std::time::Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn measure(label: &str, m: &Metrics, accept: Option<&str>, scrapes: usize) {
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    let mut body = String::new();
    for _ in 0..scrapes {
        let (w, c) = (Instant::now(), thread_cpu());
        body = m.render(accept).1;
        cpu.push(thread_cpu() - c);
        wall.push(w.elapsed());
    }
    wall.sort();
    cpu.sort();
    let samples = body.lines().filter(|l| !l.starts_with('#')).count();
    let svc_series = body
        .lines()
        .filter(|l| l.starts_with("weir_service_packets_total{"))
        .count();
    println!(
        "{label:<44} wall {} / {} / {}  cpu {} / {} / {}  body {} KiB, {samples} samples ({svc_series} weir_service_packets_total series)",
        ms(wall[0]),
        ms(wall[wall.len() / 2]),
        ms(wall[wall.len() - 1]),
        ms(cpu[0]),
        ms(cpu[cpu.len() / 2]),
        ms(cpu[cpu.len() - 1]),
        body.len() / 1024,
    );
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fake = args.iter().any(|a| a == "--fake");
    let nums: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let services: u32 = nums
        .first()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let scrapes: usize = nums
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20)
        .max(1);

    // The harness owns the throwaway pin directory and removes it on drop (also on an
    // error below: it is dropped while the error propagates).
    let mut harness = None;
    let kernel: Box<dyn Fn() -> Result<Box<dyn KernelCounters>>> = if fake {
        let services = (1..=services).map(|id| (id, counter(id))).collect();
        let mem = Arc::new(MemCounters { services });
        Box::new(move || Ok(Box::new(mem.clone()) as Box<dyn KernelCounters>))
    } else {
        let h = harness.insert(ProgHarness::new().context(
            "loading the datapath (needs root and bpffs; --fake measures without the kernel)",
        )?);
        let mut map: PerCpuHashMap<MapData, u32, SvcCounter> =
            open_pinned(&h.pin_dir, names::SVC_COUNTERS)?.try_into()?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let t = Instant::now();
        for id in 1..=services {
            let v = PerCpuValues::try_from(vec![counter(id); cpus])?;
            map.insert(id, v, 0)
                .with_context(|| format!("SVC_COUNTERS entry {id}"))?;
        }
        println!(
            "filled SVC_COUNTERS with {services} entries x {cpus} CPUs in {}",
            ms(t.elapsed())
        );
        let pin_dir = h.pin_dir.clone();
        Box::new(
            move || Ok(Box::new(AyaKernelCounters::open(&pin_dir)?) as Box<dyn KernelCounters>),
        )
    };
    let source = if fake {
        "in-memory counters"
    } else {
        "SVC_COUNTERS map"
    };
    println!(
        "{services} Services (one port each), {scrapes} scrapes per case, {source}; min / median / max"
    );

    // Reading the map alone (a hash map walk: get_next_key + lookup per entry).
    let k = kernel()?;
    let mut walk = Vec::new();
    for _ in 0..scrapes {
        let t = Instant::now();
        let n = k.services()?.len();
        walk.push(t.elapsed());
        assert_eq!(
            n, services as usize,
            "every Service port's counters read back"
        );
    }
    walk.sort();
    println!(
        "{:<44} wall {} / {} / {}",
        "read per-Service counters",
        ms(walk[0]),
        ms(walk[walk.len() / 2]),
        ms(walk[walk.len() - 1])
    );

    for (limit, what) in [
        (services as usize, "all own series"),
        (1000, "limit 1000 (default), rest in other"),
    ] {
        let m = metrics(kernel()?, services, limit);
        measure(&format!("{what}, Prometheus text"), &m, None, scrapes);
        measure(
            &format!("{what}, OpenMetrics"),
            &m,
            Some(OPENMETRICS),
            scrapes,
        );
    }
    drop(harness);
    Ok(())
}
