//! Per-packet cost of NetworkPolicy enforcement, measured with BPF_PROG_TEST_RUN on the
//! real programs (a measurement, not a test: it asserts nothing about time).
//!
//! ```sh
//! sudo cargo run -p weir --example policy_cost [-- REPEAT]   # default 200000
//! ```
//!
//! Maps are those the agent compiles for node-1 of the upstream x/y/z model
//! (tests/data/policy/model.yaml) with a few policies. Paths measured:
//! - no policy at all (empty `ENDPOINTS`: the lookup misses), and a pod that is an
//!   endpoint but not isolated: the one `ENDPOINTS` lookup policy adds;
//! - a packet of an admitted connection (conntrack hit, no policy lookup);
//! - a denied packet (`ENDPOINTS`, conntrack misses, `IPCACHE`, two `POLICY` lookups,
//!   counters): every repetition takes the whole path, since nothing is recorded;
//! - an allowed new connection (the same lookups plus creating the flow entry): every
//!   run must be a new connection, so these are single runs with distinct source ports,
//!   averaged (the kernel times each run), next to single runs of the no-policy path
//!   for comparison.
//!
//! With `repeat`, the kernel reruns the same skb, so the repeated paths are chosen such
//! that the program does not change the packet (TOOLCHAIN.md).

use std::{net::SocketAddr, time::Duration};

use anyhow::{Result, ensure};
use weir::{
    datapath::Hook,
    source::{dir, yaml},
    testing::{
        packet::{self, ACK, SYN, sock},
        prog::{ProgHarness, TC_ACT_OK, TC_ACT_SHOT},
    },
};
use weir_core::{
    image::MapImage,
    model::Cluster,
    pipeline::{NodeSettings, Pipeline},
};

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-in, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}
      podSelector: {matchLabels: {pod: a}}
    ports: [{port: 80}, {port: 8000, endPort: 8999}]
  - from: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.128/25]}}]
  egress:
  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]
"#;

fn cluster(with_policies: bool) -> Result<Cluster> {
    let model = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/policy/model.yaml"
    ))?;
    let (mut objs, errs) = yaml::parse_documents(&model, "model.yaml");
    ensure!(errs.is_empty(), "{errs:?}");
    if with_policies {
        objs.extend(yaml::parse_documents(POLICIES, "policies").0);
    }
    let (c, errs) = dir::to_cluster(&objs);
    ensure!(errs.is_empty(), "{errs:?}");
    Ok(c)
}

fn image(c: &Cluster) -> MapImage {
    let mut p = Pipeline::new(NodeSettings {
        node_name: "node-1".into(),
        cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        ..Default::default()
    });
    p.desired(c, 1).0
}

struct Row {
    what: &'static str,
    hook: Hook,
    ns: f64,
}

fn repeated(h: &ProgHarness, hook: Hook, f: &[u8], repeat: u32, want: i32) -> Result<f64> {
    let r = h.run_repeat(hook, f, repeat)?;
    ensure!(r.verdict == want, "verdict {} (wanted {want})", r.verdict);
    Ok(r.duration.as_nanos() as f64)
}

/// Average over `n` single runs, each a new connection (source port `base + i`).
fn singles(
    h: &ProgHarness,
    hook: Hook,
    n: u16,
    make: impl Fn(u16) -> Vec<u8>,
    want: i32,
) -> Result<f64> {
    let mut total = Duration::ZERO;
    for i in 0..n {
        let r = h.run(hook, &make(i))?;
        ensure!(r.verdict == want, "verdict {} (wanted {want})", r.verdict);
        total += r.duration;
    }
    Ok(total.as_nanos() as f64 / n as f64)
}

fn main() -> Result<()> {
    let repeat: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let singles_n: u16 = 20_000;
    let (xa, ya, za, yc) = ("10.244.0.10", "10.244.1.10", "10.244.2.10", "10.244.1.12");
    let syn = |s: SocketAddr, d: SocketAddr| packet::tcp(s, d, SYN, b"");
    let ack = |s: SocketAddr, d: SocketAddr| packet::tcp(s, d, ACK, b"0123456789");
    let mut rows = Vec::new();

    // No policy: ENDPOINTS is empty.
    let mut h = ProgHarness::new()?;
    h.program(&image(&cluster(false)?))?;
    let f = ack(sock(za, 40000), sock(ya, 80));
    rows.push(Row {
        what: "no policy anywhere (ENDPOINTS miss)",
        hook: Hook::ToPod,
        ns: repeated(&h, Hook::ToPod, &f, repeat, TC_ACT_OK)?,
    });
    rows.push(Row {
        what: "no policy anywhere (ENDPOINTS miss)",
        hook: Hook::FromPod,
        ns: repeated(&h, Hook::FromPod, &f, repeat, TC_ACT_OK)?,
    });
    let base_single = singles(
        &h,
        Hook::ToPod,
        singles_n,
        |i| syn(sock(za, 10000 + i), sock(ya, 80)),
        TC_ACT_OK,
    )?;
    drop(h);

    let mut h = ProgHarness::new()?;
    h.program(&image(&cluster(true)?))?;
    // y/c is an endpoint of node-1 that no policy selects.
    let f = ack(sock(za, 40000), sock(yc, 80));
    rows.push(Row {
        what: "pod not isolated (one ENDPOINTS hit)",
        hook: Hook::ToPod,
        ns: repeated(&h, Hook::ToPod, &f, repeat, TC_ACT_OK)?,
    });
    // An admitted connection: x/a -> y/a:80 (y/a ingress allows x/a on 80).
    let c = sock(xa, 40000);
    let s = sock(ya, 80);
    ensure!(h.run(Hook::ToPod, &syn(c, s))?.verdict == TC_ACT_OK);
    rows.push(Row {
        what: "admitted connection (conntrack hit)",
        hook: Hook::ToPod,
        ns: repeated(&h, Hook::ToPod, &ack(c, s), repeat, TC_ACT_OK)?,
    });
    // Its replies leave y/a (egress-isolated: only to z) through the reply check.
    rows.push(Row {
        what: "reply of an admitted connection (conntrack hit)",
        hook: Hook::FromPod,
        ns: repeated(&h, Hook::FromPod, &ack(s, c), repeat, TC_ACT_OK)?,
    });
    // Egress of y/a to z/a: admitted once, then conntrack.
    let e = (sock(ya, 40001), sock(za, 80));
    ensure!(h.run(Hook::FromPod, &syn(e.0, e.1))?.verdict == TC_ACT_OK);
    rows.push(Row {
        what: "admitted egress connection (conntrack hit)",
        hook: Hook::FromPod,
        ns: repeated(&h, Hook::FromPod, &ack(e.0, e.1), repeat, TC_ACT_OK)?,
    });
    // Denied: z/a -> y/a:80 (not x/a), and y/a -> x/a (egress only to z).
    rows.push(Row {
        what: "denied (full lookup, drop)",
        hook: Hook::ToPod,
        ns: repeated(
            &h,
            Hook::ToPod,
            &syn(sock(za, 40002), sock(ya, 80)),
            repeat,
            TC_ACT_SHOT,
        )?,
    });
    rows.push(Row {
        what: "denied (full lookup, drop)",
        hook: Hook::FromPod,
        ns: repeated(
            &h,
            Hook::FromPod,
            &syn(sock(ya, 40003), sock(xa, 80)),
            repeat,
            TC_ACT_SHOT,
        )?,
    });
    // Allowed new connections: x/a -> y/a:8000-8999 (an endPort range), from
    // 203.0.113.x (ipBlock), each a new flow entry.
    let allowed_in = singles(
        &h,
        Hook::ToPod,
        singles_n,
        |i| syn(sock(xa, 10000 + i), sock(ya, 8000 + i % 1000)),
        TC_ACT_OK,
    )?;
    let allowed_out = singles(
        &h,
        Hook::FromPod,
        singles_n,
        |i| syn(sock(ya, 10000 + i), sock(za, 80)),
        TC_ACT_OK,
    )?;

    println!("repeat {repeat} (single runs: {singles_n} each)\n");
    println!("{:<50} {:<12} {:>10}", "path", "program", "ns/packet");
    for r in &rows {
        println!("{:<50} {:<12} {:>10.0}", r.what, r.hook.program(), r.ns);
    }
    println!(
        "{:<50} {:<12} {:>10.0}",
        "new connection, no policy (single runs)", "tc_to_pod", base_single
    );
    println!(
        "{:<50} {:<12} {:>10.0}",
        "new connection allowed, flow created (single runs)", "tc_to_pod", allowed_in
    );
    println!(
        "{:<50} {:<12} {:>10.0}",
        "new connection allowed, flow created (single runs)", "tc_from_pod", allowed_out
    );
    Ok(())
}
