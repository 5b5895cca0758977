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
        prog::{ProgHarness, TC_ACT_OK, TC_ACT_SHOT},
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
    /// Pods in the cluster the maps were compiled from.
    pub pods: usize,
    /// The program run (`tc_from_pod`, `tc_to_pod`).
    pub program: String,
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

fn time_path(h: &ProgHarness, hook: Hook, frame: &[u8], runs: u32) -> Result<(f64, f64, f64)> {
    time_frames(h, hook, runs, |_| frame.to_vec())
}

/// Runs `make(i)` for i in 0..runs, each once: median, mean and p99 of the kernel's
/// per-run time.
fn time_frames(
    h: &ProgHarness,
    hook: Hook,
    runs: u32,
    make: impl Fn(u32) -> Vec<u8>,
) -> Result<(f64, f64, f64)> {
    let mut v = Vec::with_capacity(runs as usize);
    for i in 0..runs {
        let r = h.run(hook, &make(i))?;
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
        let (median, mean, p99) = time_path(&h, Hook::FromPod, frame, runs)?;
        out.push(PathCost {
            path: path.into(),
            services: n,
            policies: 0,
            pods: c.pods.len(),
            program: Hook::FromPod.program().into(),
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
        pods: c.pods.len(),
        program: Hook::FromPod.program().into(),
        runs: runs.max(1000),
        median_ns: rep.duration.as_nanos() as f64,
        mean_ns: rep.duration.as_nanos() as f64,
        p99_ns: rep.duration.as_nanos() as f64,
        verified: "one BPF_PROG_TEST_RUN with repeat (kernel average per run; same path every run)"
            .into(),
    });
    Ok(out)
}

/// The one NetworkPolicy of the policy rows: the backend pods admit the client (label
/// `role: client`) on their serving port, and nothing else.
const BACKEND_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backends-from-client, namespace: bench}
spec:
  podSelector: {matchLabels: {app: backend}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {role: client}}}]
    ports: [{protocol: TCP, port: 8080}]
";

/// Per-packet cost of NetworkPolicy at `tc_to_pod` (ingress to backend-0), on the
/// benchmark cluster (1 Service) with 0 policies, with the one backend policy, and with
/// it plus issue 8's generated scale ([`crate::policygen`]: 10k pods, 1k policies over
/// 100 nodes, 100 of the pods on this node): the three packets are
/// - `ingress-new-allowed`: a SYN from the client (a new connection: endpoint, conntrack
///   miss, IPCACHE, POLICY lookups, flow created), each run with its own source port;
/// - `ingress-new-other`: a SYN from another backend (dropped once backend-0 is isolated:
///   the same lookups, a drop; nothing is recorded, so every run takes the same path);
/// - `ingress-established`: a packet of the admitted connection (conntrack hit).
pub fn measure_policy(runs: u32) -> Result<Vec<PathCost>> {
    let runs = runs.min(50_000); // distinct source ports for the new connections
    let mut out = Vec::new();
    // 0: no policy; 1: the backend policy; 2: it plus 10k generated pods on 100 nodes
    // and no other policy (separates the cost of a large IPCACHE from that of many
    // policies); 3: it plus the generated 10k pods and 1k policies.
    for variant in 0..4 {
        let mut c = cluster(1)?;
        if variant >= 1 {
            let (objs, errs) = weir::source::yaml::parse_documents(BACKEND_POLICY, "policy");
            if !errs.is_empty() {
                bail!("policy YAML: {:?}", errs.first());
            }
            let (pc, _) = weir::source::dir::to_cluster(&objs);
            c.policies.extend(pc.policies);
        }
        if variant >= 2 {
            let g = crate::policygen::Gen {
                policies: if variant == 2 { 0 } else { 1_000 },
                ..crate::policygen::Gen::ISSUE
            };
            crate::policygen::add(&mut c, &g, cluster::NODE);
        }
        let policies = c.policies.len();
        let pods = c.pods.len();
        let (img, errs) = Pipeline::new(settings()).desired(&c, 1);
        if !errs.is_empty() {
            bail!("pipeline refused objects: {:?}", errs.first());
        }
        let mut h = ProgHarness::new()?;
        h.program(&img).context("programming the maps")?;
        let isolated = variant >= 1;
        let server = sock(&cluster::backend_ip(0).to_string(), cluster::TARGET_PORT);
        let client_ip = cluster::CLIENT_IP;
        let other = sock(&cluster::backend_ip(1).to_string(), 40000);
        let new_allowed =
            |i: u32| packet::tcp(sock(client_ip, 10_000 + i as u16), server, SYN, b"");
        let est_client = sock(client_ip, 9_000);
        let est = packet::tcp(est_client, server, ACK, b"req\n");
        let other_syn = packet::tcp(other, server, SYN, b"");

        // Check each packet's first run before timing it.
        let what = if isolated {
            format!("backend-0 isolated, {pods} pods")
        } else {
            "no policy (ENDPOINTS miss)".to_string()
        };
        let r = h.run(Hook::ToPod, &packet::tcp(est_client, server, SYN, b""))?;
        if r.verdict != TC_ACT_OK {
            bail!("the client's SYN to backend-0 was dropped ({policies} policies)");
        }
        let r = h.run(Hook::ToPod, &est)?;
        if r.verdict != TC_ACT_OK {
            bail!("an established packet to backend-0 was dropped ({policies} policies)");
        }
        let r = h.run(Hook::ToPod, &other_syn)?;
        let want = if isolated { TC_ACT_SHOT } else { TC_ACT_OK };
        if r.verdict != want {
            bail!(
                "backend-1's SYN to backend-0: verdict {} (wanted {want}) with {policies} policies",
                r.verdict
            );
        }
        let rows: [(&str, String); 3] = [
            (
                "ingress-new-allowed",
                format!(
                    "{what}: client SYN {} (each run a new source port)",
                    if isolated {
                        "admitted, flow created"
                    } else {
                        "forwarded"
                    }
                ),
            ),
            (
                "ingress-new-other",
                format!(
                    "{what}: backend-1 SYN {}",
                    if isolated { "dropped" } else { "forwarded" }
                ),
            ),
            (
                "ingress-established",
                format!("{what}: conntrack hit, forwarded"),
            ),
        ];
        for (path, verified) in rows {
            let (median, mean, p99) = match path {
                "ingress-new-allowed" => time_frames(&h, Hook::ToPod, runs, new_allowed)?,
                "ingress-new-other" => time_path(&h, Hook::ToPod, &other_syn, runs)?,
                _ => time_path(&h, Hook::ToPod, &est, runs)?,
            };
            out.push(PathCost {
                path: path.into(),
                services: 1,
                policies,
                pods,
                program: Hook::ToPod.program().into(),
                runs,
                median_ns: median,
                mean_ns: mean,
                p99_ns: p99,
                verified,
            });
        }
    }
    Ok(out)
}
