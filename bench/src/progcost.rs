//! Per-packet program cost through BPF_PROG_TEST_RUN: the real `tc_from_pod` program
//! with maps programmed by the real pipeline from the benchmark YAML at a given number of
//! Services.
//!
//! With `repeat > 1` the kernel reruns the *same* skb, and a translating program sees its
//! own output from the second run on (shared/TOOLCHAIN.md): a DNATed packet no longer
//! goes to the VIP, so `repeat` would time the cheap path. Every measured packet here is
//! therefore run with `repeat = 1`, from a fresh copy of the original bytes, many times;
//! the kernel times each run (`duration`, ns, excluding the syscall and skb setup) and we
//! report the median, mean and p99 over the runs. The first run of each path is checked
//! (verdict and rewritten addresses), so a wrong path cannot be timed silently.
//!
//! Paths: `service` (an established client -> ClusterIP packet: frontend lookup,
//! conntrack hit, DNAT), `revnat` (the backend's reply: conntrack hit, source rewritten
//! to the VIP), `plain` (pod -> pod IP, no Service: the floor of parsing and conntrack).

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use weir::{
    datapath::Hook,
    testing::{
        packet::{self, ACK, SYN, sock},
        prog::{ProgHarness, TC_ACT_OK},
    },
};
use weir_common::ct::CT_KIND_FLOW;
use weir_core::pipeline::{NodeSettings, Pipeline};

use crate::cluster;

#[derive(Debug, Clone, Serialize)]
pub struct PathCost {
    pub path: String,
    pub services: usize,
    pub policies: usize,
    pub runs: u32,
    pub median_ns: f64,
    pub mean_ns: f64,
    pub p99_ns: f64,
    pub verified: String,
}

pub fn settings() -> NodeSettings {
    NodeSettings {
        node_name: cluster::NODE.into(),
        cluster_cidrs: vec![cluster::POD_CIDR.parse().expect("cidr")],
        service_cidrs: vec![cluster::SERVICE_CIDR.parse().expect("cidr")],
        ..Default::default()
    }
}

/// The model of the benchmark cluster at `n` Services (the same YAML the lab reads).
pub fn cluster(n: usize) -> Result<weir_core::model::Cluster> {
    let mut text = cluster::pods_yaml();
    text.push_str(&cluster::services_yaml(n));
    let (objs, errs) = weir::source::yaml::parse_documents(&text, "bench");
    if !errs.is_empty() {
        bail!("benchmark YAML: {:?}", errs.first());
    }
    let (c, errs) = weir::source::dir::to_cluster(&objs);
    if !errs.is_empty() {
        bail!("benchmark objects: {:?}", errs.first().map(|e| &e.message));
    }
    Ok(c)
}

/// Map capacities that hold `n` Services of 10 endpoints (slot 0 + 10 slots each).
pub fn capacities(n: usize) -> BTreeMap<String, u32> {
    let frontends = (n + 16) as u32;
    [
        (
            weir_common::maps::SERVICES.to_string(),
            (frontends * 12).max(65536),
        ),
        (
            weir_common::maps::REV_NAT.to_string(),
            (frontends * 2).max(65536),
        ),
    ]
    .into()
}

fn time_path(h: &ProgHarness, frame: &[u8], runs: u32) -> Result<(f64, f64, f64)> {
    let mut v = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let r = h.run(Hook::FromPod, frame)?;
        v.push(r.duration.as_nanos() as u32);
    }
    v.sort_unstable();
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    Ok((
        crate::load::percentile(&v, 0.5),
        mean,
        crate::load::percentile(&v, 0.99),
    ))
}

/// Measures every path at `n` Services.
pub fn measure(n: usize, runs: u32) -> Result<Vec<PathCost>> {
    let c = cluster(n)?;
    let (img, errs) = Pipeline::new(settings()).desired(&c, 1);
    if !errs.is_empty() {
        bail!("pipeline refused Services: {:?}", errs.first());
    }
    let mut h = ProgHarness::with_capacities(capacities(n))?;
    h.program(&img).context("programming the maps")?;

    let vip = cluster::service_ip(cluster::probe_index(n)).to_string();
    let client = sock(cluster::CLIENT_IP, 40000);
    let front: SocketAddr = sock(&vip, cluster::SERVICE_PORT);
    // Open the connection (SYN creates the conntrack entries), then time an established
    // packet of it: frontend lookup, conntrack hit, DNAT.
    let first = h.run(Hook::FromPod, &packet::tcp(client, front, SYN, b""))?;
    if first.verdict != TC_ACT_OK {
        bail!(
            "SYN to {front} was not forwarded (verdict {})",
            first.verdict
        );
    }
    let backend = {
        let p = first.parsed();
        SocketAddr::new(p.dst, p.dport)
    };
    if backend.ip().to_string() == vip {
        bail!("SYN to {front} was not translated");
    }
    let flows = h
        .ct()?
        .into_iter()
        .filter(|(k, _)| k.kind == CT_KIND_FLOW)
        .count();
    let est = packet::tcp(client, front, ACK, b"req\n");
    let r = h.run(Hook::FromPod, &est)?;
    let p = r.parsed();
    let service_ok = r.verdict == TC_ACT_OK
        && SocketAddr::new(p.dst, p.dport) == backend
        && p.ip_csum_ok
        && p.l4_csum_ok;
    let reply = packet::tcp(backend, client, ACK, b"reply\n");
    let r = h.run(Hook::FromPod, &reply)?;
    let p = r.parsed();
    let revnat_ok = r.verdict == TC_ACT_OK
        && SocketAddr::new(p.src, p.sport) == front
        && p.ip_csum_ok
        && p.l4_csum_ok;
    // A pod talking to a pod IP: no frontend, its own conntrack entry after the first.
    let plain = packet::tcp(
        client,
        sock(&cluster::backend_ip(1).to_string(), 8080),
        ACK,
        b"x",
    );
    let r = h.run(Hook::FromPod, &plain)?;
    let plain_ok = r.verdict == TC_ACT_OK && r.parsed().dst == cluster::backend_ip(1);

    let mut out = Vec::new();
    for (path, frame, ok, what) in [
        (
            "service",
            &est,
            service_ok,
            format!("DNAT {front} -> {backend}, checksums valid ({flows} FLOW entries)"),
        ),
        (
            "revnat",
            &reply,
            revnat_ok,
            format!("reply source {backend} -> {front}, checksums valid"),
        ),
        (
            "plain",
            &plain,
            plain_ok,
            "forwarded untranslated".to_string(),
        ),
    ] {
        if !ok {
            bail!("the {path} path did not do what it should ({what}) at {n} Services");
        }
        let (median, mean, p99) = time_path(&h, frame, runs)?;
        out.push(PathCost {
            path: path.into(),
            services: n,
            policies: 0,
            runs,
            median_ns: median,
            mean_ns: mean,
            p99_ns: p99,
            verified: what,
        });
    }
    // The plain path stays the same path when the skb is rerun (nothing is rewritten):
    // its amortised cost with `repeat` against its `repeat = 1` median shows the fixed
    // cost of timing single runs (the kernel's timer reads), which every figure above
    // includes.
    let rep = h.run_repeat(Hook::FromPod, &plain, runs.max(1000))?;
    out.push(PathCost {
        path: "plain-repeat".into(),
        services: n,
        policies: 0,
        runs: runs.max(1000),
        median_ns: rep.duration.as_nanos() as f64,
        mean_ns: rep.duration.as_nanos() as f64,
        p99_ns: rep.duration.as_nanos() as f64,
        verified: "one BPF_PROG_TEST_RUN with repeat (kernel average per run; same path every run)"
            .into(),
    });
    Ok(out)
}
