//! `weir lab demo`: builds the example cluster of examples/demo (two nodes, web pods
//! behind a ClusterIP and a NodePort Service, a database guarded by a NetworkPolicy),
//! shows with live probes what the datapath does, says in plain words what it expected
//! and what it saw, and removes the lab.
//!
//! The narrative goes to stderr; a JSON report of every step goes to stdout. Each step
//! states its expectation (from Kubernetes semantics) and the observed probe results;
//! a step whose observation differs from the expectation says so plainly instead of
//! claiming anything the probes did not show. The NetworkPolicy step shows both sides:
//! the allowed client connects, the intruder's packets are dropped by the datapath (the
//! policy-denied counter of the database's node grows), and it prints what the live maps
//! hold for the database (`weir policy`).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{
    Names,
    probe::{self, Outcome, ProbeOptions, ProbeReport, Proto},
    state::{self, State},
    topology::Lab,
};

/// Connections to the ClusterIP: with 3 backends chosen uniformly, the chance that one
/// of them gets none of 30 is 3 * (2/3)^30, about 1.6e-5 (12 would leave it at 2%).
const CONNECTIONS: u32 = 30;

/// The example files, built in so that `weir lab demo` works from anywhere.
const EMBEDDED: &[(&str, &str)] = &[
    (
        "cluster.yaml",
        include_str!("../../../examples/demo/cluster.yaml"),
    ),
    (
        "pods.yaml",
        include_str!("../../../examples/demo/pods.yaml"),
    ),
    (
        "services.yaml",
        include_str!("../../../examples/demo/services.yaml"),
    ),
    (
        "policy.yaml",
        include_str!("../../../examples/demo/policy.yaml"),
    ),
];

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub name: String,
    pub what: String,
    pub expected: String,
    pub observed: String,
    pub matches_expectation: bool,
    pub probe: probe::Summary,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DemoReport {
    pub lab: String,
    pub input: String,
    pub steps: Vec<Step>,
    pub all_match: bool,
    pub cleaned_up: bool,
}

fn say(s: impl AsRef<str>) {
    eprintln!("{}", s.as_ref());
}

fn input_dir(name: &str, dir: Option<PathBuf>) -> Result<(PathBuf, Option<PathBuf>)> {
    if let Some(d) = dir {
        return Ok((d, None));
    }
    let local = PathBuf::from("examples/demo");
    if local.join("cluster.yaml").exists() {
        return Ok((local, None));
    }
    let tmp = std::env::temp_dir().join(format!("weir-lab-demo-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    for (f, text) in EMBEDDED {
        std::fs::write(tmp.join(f), text)?;
    }
    Ok((tmp.clone(), Some(tmp)))
}

fn probe(lab: &Lab, from: &str, to: &str, port: u16, count: u32) -> Result<ProbeReport> {
    probe::probe(
        lab,
        &ProbeOptions {
            from: from.into(),
            to: to.into(),
            port,
            protocol: Proto::Tcp,
            count,
            timeout_ms: 1000,
            source_port: None,
            family: None,
        },
    )
    .with_context(|| format!("probing {from} -> {to}:{port}"))
}

/// `weir policy` for a pod, from the live maps of its node, names from the lab's objects.
fn policy_of(lab: &Lab, pin_dir: &std::path::Path, pod: &str) -> Option<String> {
    let (cluster, _) = crate::source::dir::read_cluster(&lab.dir.join("objects")).ok()?;
    let (name, ips) = crate::inspect::resolve_pod(pod, Some(&cluster)).ok()?;
    let dp = crate::datapath::AyaDatapath::open(pin_dir).ok()?;
    let img = weir_core::datapath::Datapath::read_image(&dp).ok()?;
    let counters = dp.policy_counters().ok()?;
    Some(crate::inspect::policy_text(&crate::inspect::policy_view(
        &img,
        &counters,
        Some(&cluster),
        name,
        *ips.first()?,
    )))
}

fn describe(r: &ProbeReport) -> String {
    let s = &r.summary;
    let mut parts = Vec::new();
    for (n, what) in [
        (s.connected, "connected"),
        (s.refused, "refused"),
        (s.timeout, "timed out"),
        (s.unreachable, "unreachable"),
        (s.error, "failed"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    let mut out = format!(
        "{} (of {} to {}:{})",
        parts.join(", "),
        s.attempts,
        r.to.address,
        r.to.port
    );
    if !s.backends.is_empty() {
        out.push_str(&format!(
            "; answered by {}",
            s.backends
                .iter()
                .map(|(b, n)| format!("{b} ({n})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

pub fn run(name: &str, dir: Option<PathBuf>, keep: bool) -> Result<DemoReport> {
    super::check_name(name)?;
    let names = Names::new(name);
    // Leftovers of an earlier demo run (interrupted with Ctrl-C) are removed; a lab of
    // that name made by `weir lab up` is not touched.
    if !state::find_leftovers(&names).is_empty() {
        let by_demo = State::load(&names.state_dir())
            .map(|s| s.created_by == "demo")
            .unwrap_or(true);
        if !by_demo {
            bail!(
                "a lab named {name:?} exists and was not made by the demo; remove it with `weir lab down --name {name}` or pick another --name"
            );
        }
        say(format!(
            "Removing what an earlier demo run left behind (lab {name:?})."
        ));
        super::cli::down(name)?;
    }
    let (input, tmp) = input_dir(name, dir)?;
    say(format!(
        "weir lab demo: building a two-node cluster from {} (network namespaces, one weir agent per node).",
        input.display()
    ));
    say(format!(
        "If interrupted, `weir lab down --name {name}` removes everything."
    ));
    let result = super::cli::up(
        name,
        std::slice::from_ref(&input),
        &[],
        &[],
        Duration::from_secs(60),
        false,
        "demo",
    );
    if let Some(t) = &tmp {
        let _ = std::fs::remove_dir_all(t);
    }
    let view = result?;
    for n in &view.nodes {
        say(format!(
            "  node {}: address {}, pod CIDR {}, agent pid {}",
            n.name,
            n.internal_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            n.pod_cidrs
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            n.agent.process.as_ref().map(|p| p.pid).unwrap_or(0)
        ));
    }
    for p in &view.pods {
        say(format!(
            "  pod {}/{} on {}: {}",
            p.namespace,
            p.name,
            p.node,
            p.ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for s in &view.services {
        say(format!(
            "  service {}/{} ({}): {}{}",
            s.namespace,
            s.name,
            s.type_,
            s.cluster_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            s.ports
                .iter()
                .map(|p| match p.node_port {
                    Some(np) => format!(" port {} (nodePort {np})", p.port),
                    None => format!(" port {}", p.port),
                })
                .collect::<String>()
        ));
    }
    say("Every agent reports the objects programmed. Now real connections:");

    let lab = Lab::open(name)?;
    let steps = (|| -> Result<Vec<Step>> {
        let mut steps = Vec::new();
        let backends: BTreeSet<String> = ["shop/web-1", "shop/web-2", "shop/web-3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let node_of: BTreeMap<String, String> = view
            .pods
            .iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), p.node.clone()))
            .collect();

        // 1. ClusterIP balancing across nodes.
        let r = probe(&lab, "shop/client", "svc/shop/web", 80, CONNECTIONS)?;
        let seen: BTreeSet<String> = r.summary.backends.keys().cloned().collect();
        let client_ip = view
            .pods
            .iter()
            .find(|p| p.name == "client")
            .and_then(|p| p.ips.first().copied());
        let kept_source = r.attempts.iter().filter(|a| a.server.is_some()).all(|a| {
            a.client
                .as_deref()
                .zip(client_ip)
                .is_some_and(|(c, ip)| c.starts_with(&format!("{ip}:")))
        });
        let ok = r.summary.connected == CONNECTIONS as usize && seen == backends && kept_source;
        say(format!(
            "\n1. shop/client -> ClusterIP of shop/web ({}:80), {CONNECTIONS} new connections:\n   {}",
            r.to.address,
            describe(&r)
        ));
        for b in &seen {
            say(format!(
                "     {b} runs on {}",
                node_of.get(b).cloned().unwrap_or_default()
            ));
        }
        say(format!(
            "   Expected: every connection answered, spread over all three web pods on both nodes, each seeing the client's own address. {}",
            if ok {
                "That is what happened."
            } else {
                "This does NOT match the expectation."
            }
        ));
        steps.push(Step {
            name: "clusterip-balancing".into(),
            what: format!("{CONNECTIONS} TCP connections from shop/client to the ClusterIP of shop/web"),
            expected: "all connected; answered by shop/web-1, shop/web-2 and shop/web-3; client address preserved".into(),
            observed: describe(&r),
            matches_expectation: ok,
            probe: r.summary.clone(),
        });

        // 2. NodePort from outside the cluster.
        let r = probe(
            &lab,
            "external:203.0.113.2@node-a",
            "nodeport/node-a/shop/web-nodeport",
            80,
            6,
        )?;
        let ok =
            r.summary.connected == 6 && r.summary.backends.keys().all(|b| backends.contains(b));
        say(format!(
            "\n2. an external client (203.0.113.2) -> NodePort {}:{} of shop/web-nodeport on node-a, 6 connections:\n   {}",
            r.to.address,
            r.to.port,
            describe(&r)
        ));
        say(format!(
            "   Expected: every connection answered by a web pod (on either node). {}",
            if ok {
                "That is what happened."
            } else {
                "This does NOT match the expectation."
            }
        ));
        steps.push(Step {
            name: "nodeport-from-outside".into(),
            what: "6 TCP connections from 203.0.113.2 (outside the cluster) to node-a's NodePort 30080".into(),
            expected: "all connected, answered by the web pods".into(),
            observed: describe(&r),
            matches_expectation: ok,
            probe: r.summary.clone(),
        });

        // 3. The NetworkPolicy: client allowed, intruder denied.
        let allowed = probe(&lab, "shop/client", "shop/db", 5432, 2)?;
        let ok_a = allowed.summary.connected == 2;
        say(format!(
            "\n3. NetworkPolicy shop/db-allow-client lets only app=client reach shop/db on port sql (5432).\n   shop/client -> shop/db:5432: {}\n   Expected: connected. {}",
            describe(&allowed),
            if ok_a {
                "That is what happened."
            } else {
                "This does NOT match the expectation."
            }
        ));
        steps.push(Step {
            name: "policy-allows-client".into(),
            what: "2 TCP connections from shop/client to shop/db:5432".into(),
            expected: "connected (allowed by shop/db-allow-client)".into(),
            observed: describe(&allowed),
            matches_expectation: ok_a,
            probe: allowed.summary.clone(),
        });
        // The drops must be the policy's: dropped by the datapath at shop/db's ingress
        // (the probe times out; a refusal would mean the packet reached the pod), and
        // counted under policy-denied on shop/db's node.
        let db_pin = node_of
            .get("shop/db")
            .and_then(|n| lab.state.nodes.get(n))
            .map(|n| n.pin_dir.clone());
        let policy_drops = || -> u64 {
            let idx = weir_common::metrics::index(
                weir_common::metrics::REASON_POLICY_DENIED,
                weir_common::metrics::DIR_INGRESS,
            );
            db_pin
                .as_ref()
                .and_then(|p| crate::datapath::maps::read_counters(p).ok())
                .and_then(|m| m.get(&idx).map(|c| c.packets))
                .unwrap_or(0)
        };
        let before = policy_drops();
        let denied = probe(&lab, "shop/intruder", "shop/db", 5432, 2)?;
        let dropped = policy_drops().saturating_sub(before);
        let ok_d = denied.summary.connected == 0
            && denied
                .attempts
                .iter()
                .all(|a| matches!(a.result, Outcome::Timeout))
            && dropped > 0;
        say(format!(
            "   shop/intruder -> shop/db:5432: {}; the datapath of {} counted {dropped} packet(s) dropped by policy (no rule allows them)\n   Expected: not connected, dropped by the datapath (the policy selects shop/db and does not allow app=intruder). {}",
            describe(&denied),
            node_of.get("shop/db").cloned().unwrap_or_default(),
            if ok_d {
                "That is what happened."
            } else {
                "This does NOT match the expectation."
            }
        ));
        if let Some(p) = &db_pin
            && let Some(text) = policy_of(&lab, p, "shop/db")
        {
            say("   What the datapath holds for shop/db (`weir policy`):");
            for l in text.lines() {
                say(format!("     {l}"));
            }
        }
        steps.push(Step {
            name: "policy-denies-intruder".into(),
            what: "2 TCP connections from shop/intruder to shop/db:5432".into(),
            expected: "not connected; dropped by the datapath and counted as policy-denied (shop/db-allow-client does not allow app=intruder)".into(),
            observed: format!("{}; {dropped} packet(s) counted as policy-denied", describe(&denied)),
            matches_expectation: ok_d,
            probe: denied.summary.clone(),
        });
        Ok(steps)
    })();

    let cleaned_up = if keep {
        say(format!(
            "\nThe lab stays up (--keep): try `weir lab probe --name {name} --from shop/client --to svc/shop/web --port 80 --count 5`, and `weir lab down --name {name}` when done."
        ));
        false
    } else {
        let r = super::cli::down(name)?;
        if r.remaining.is_empty() {
            say(format!(
                "\nRemoved the lab: {} processes ended, {} network namespaces, {} cgroups and {} pin directories deleted.",
                r.processes.len(),
                r.namespaces.len(),
                r.cgroups.len(),
                r.pin_dirs.len()
            ));
            true
        } else {
            say(format!(
                "\nCould not remove everything: {}",
                r.remaining.join("; ")
            ));
            false
        }
    };
    let steps = steps?;
    let all_match = steps.iter().all(|s| s.matches_expectation);
    say(format!(
        "\n{} of {} steps behaved as Kubernetes specifies.",
        steps.iter().filter(|s| s.matches_expectation).count(),
        steps.len()
    ));
    Ok(DemoReport {
        lab: name.to_string(),
        input: input.display().to_string(),
        steps,
        all_match,
        cleaned_up,
    })
}
