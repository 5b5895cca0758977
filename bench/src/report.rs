//! results.json -> RESULTS.md (tables of ratios against the baselines measured in the
//! same run, the targets of issue 8, how to reproduce) and one SVG plot per metric
//! against the number of Services. Pure: `weir-bench report` regenerates both from a
//! results.json.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::Value;

pub const DATAPLANES: &[&str] = &["weir", "weir-nosocklb", "iptables", "nftables", "bare"];
const COLORS: &[&str] = &["#1b7f3b", "#7fbf3f", "#c0392b", "#2e6fbf", "#555555"];

pub const METRICS: &[(&str, &str, &str)] = &[
    (
        "crr_clusterip",
        "new connections/s, pod -> ClusterIP (connect, request, reply, close)",
        "conn/s",
    ),
    (
        "rr_clusterip",
        "request/response on a kept-alive connection, pod -> ClusterIP",
        "req/s",
    ),
    (
        "crr_nodeport",
        "new connections/s, external client -> NodePort",
        "conn/s",
    ),
    (
        "throughput_clusterip",
        "single-stream iperf3 throughput, pod -> ClusterIP",
        "Gbit/s",
    ),
];

type Table = BTreeMap<(String, String, u64), Value>;

fn index(v: &Value) -> Table {
    let mut t = BTreeMap::new();
    for p in v["datapath"].as_array().into_iter().flatten() {
        let key = (
            p["metric"].as_str().unwrap_or("").to_string(),
            p["dataplane"].as_str().unwrap_or("").to_string(),
            p["services"].as_u64().unwrap_or(0),
        );
        t.insert(key, p.clone());
    }
    t
}

fn scales(t: &Table) -> Vec<u64> {
    let mut s: Vec<u64> = t.keys().map(|k| k.2).collect();
    s.sort();
    s.dedup();
    s
}

fn fmt(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn val(t: &Table, m: &str, dp: &str, n: u64) -> Option<f64> {
    t.get(&(m.to_string(), dp.to_string(), n))
        .and_then(|p| p["value"].as_f64())
        .filter(|v| *v > 0.0)
}

fn lat(t: &Table, m: &str, dp: &str, n: u64, q: &str) -> Option<f64> {
    t.get(&(m.to_string(), dp.to_string(), n))
        .and_then(|p| p[q].as_f64())
        .filter(|v| *v > 0.0)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}x", a / b),
        _ => "–".into(),
    }
}

/// One SVG line plot: x = Services (log scale), y = metric, a line per dataplane.
pub fn svg(t: &Table, metric: &str, title: &str, unit: &str) -> String {
    let (w, h, l, r, top, b) = (720.0, 420.0, 80.0, 170.0, 40.0, 50.0);
    let xs = scales(t);
    let mut ymax: f64 = 0.0;
    for dp in DATAPLANES {
        for n in &xs {
            if let Some(v) = val(t, metric, dp, *n) {
                ymax = ymax.max(v);
            }
        }
    }
    let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.1 };
    let lx = |n: u64| (n.max(1) as f64).log10();
    let (x0, x1) = (
        xs.first().map(|n| lx(*n)).unwrap_or(0.0),
        xs.last().map(|n| lx(*n)).unwrap_or(1.0),
    );
    let span = if x1 > x0 { x1 - x0 } else { 1.0 };
    let px = |n: u64| l + (lx(n) - x0) / span * (w - l - r);
    let py = |v: f64| top + (1.0 - v / ymax) * (h - top - b);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="20" text-anchor="middle" font-size="14">{title}</text>
<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{l}" y1="{top}" x2="{l}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">Services (log scale)</text>
<text x="15" y="{}" transform="rotate(-90 15 {})" text-anchor="middle">{unit}</text>
"#,
        w / 2.0,
        h - b,
        w - r,
        h - b,
        h - b,
        l + (w - l - r) / 2.0,
        h - 10.0,
        top + (h - top - b) / 2.0,
        top + (h - top - b) / 2.0,
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - r,
            l - 5.0,
            y + 4.0,
            fmt(v)
        );
    }
    for n in &xs {
        let x = px(*n);
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{n}</text>"#,
            h - b + 16.0
        );
    }
    for (i, dp) in DATAPLANES.iter().enumerate() {
        let pts: Vec<(f64, f64)> = xs
            .iter()
            .filter_map(|n| val(t, metric, dp, *n).map(|v| (px(*n), py(v))))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let c = COLORS[i];
        let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        for (x, y) in &pts {
            let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"/>"#);
        }
        let ly = top + 20.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="2"/><text x="{}" y="{}">{dp}</text>"#,
            w - r + 10.0,
            w - r + 30.0,
            w - r + 35.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Writes the plots into `dir` and returns RESULTS.md's text. `rel` is the results
/// directory relative to RESULTS.md.
pub fn render(v: &Value, dir: &Path, rel: &str) -> Result<String> {
    let t = index(v);
    let xs = scales(&t);
    let m = &v["meta"];
    let mut s = String::new();
    let _ = writeln!(s, "# weir benchmark results\n");
    if v["runs"].is_object() {
        let _ = writeln!(
            s,
            "Measurements, not tests: nothing here is asserted in CI. The figures come from the runs listed below, on the same machine, in the same lab topology, from the same Kubernetes YAML; a ratio between dataplanes measured in different runs carries the noise between those runs as well.\n"
        );
    } else {
        let _ = writeln!(
            s,
            "Measurements, not tests: nothing here is asserted in CI. Every ratio below compares figures measured in the same run ({}), on the same machine, in the same lab topology, from the same Kubernetes YAML.\n",
            m["date"].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(s, "| | |\n|---|---|");
    for (k, label) in [
        ("date", "date (UTC)"),
        ("mode", "mode"),
        ("command", "command"),
        ("git", "commit"),
        ("kernel", "kernel"),
        ("cpu", "CPU"),
        ("cores", "cores"),
        ("memory", "memory"),
        ("machine", "machine"),
        ("loadavg_start", "load average at start"),
        ("loadavg_end", "load average at end"),
    ] {
        let _ = writeln!(
            s,
            "| {label} | `{}` |",
            m[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| m[k].to_string())
        );
    }
    let _ = writeln!(
        s,
        "| tools | {}, {}, {} |",
        m["tools"]["iptables"].as_str().unwrap_or(""),
        m["tools"]["nft"].as_str().unwrap_or(""),
        m["tools"]["iperf3"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        s,
        "| per run | {} s, median of {} repetition(s), 1 client thread (closed loop) |",
        m["durations"]["seconds_per_run"], m["durations"]["repetitions"]
    );
    // A report combined from several runs (one interrupted) lists each.
    if let Some(runs) = v["runs"].as_object() {
        let _ = writeln!(
            s,
            "\nThis report combines {} runs on the same machine (figures of one dataplane always come from one run):\n",
            runs.len()
        );
        for (name, r) in runs {
            let _ = writeln!(
                s,
                "- run {name}: {} (commit `{}`), `{}`, load average {} -> {}",
                r["date"].as_str().unwrap_or(""),
                r["git"].as_str().unwrap_or(""),
                r["command"].as_str().unwrap_or(""),
                r["loadavg_start"].as_str().unwrap_or(""),
                r["loadavg_end"].as_str().unwrap_or(""),
            );
        }
    }
    let _ = writeln!(
        s,
        "\n**Noise.** The machine has 2 cores shared with other engineers' builds and tests; absolute figures move by tens of percent between runs (compare the load averages above). Ratios within one run are steadier, but a build that starts in the middle of one dataplane's runs still skews them: read small differences (< 10-15 %) as equal.\n"
    );
    let _ = writeln!(
        s,
        "Raw data: [`{rel}/results.json`]({rel}/results.json). Reproduce: `bench/run.sh --quick` (or `--full`), as root on a machine set up by `scripts/bootstrap.sh`; `weir-bench report {rel}/results.json` regenerates this file and the plots.\n"
    );

    // Datapath.
    let _ = writeln!(s, "## Datapath\n");
    let _ = writeln!(
        s,
        "One node (`node-a`), a client pod and 10 backend pods (`weir serve`); N Services of 10 endpoints each, all on the backend pool; the probed Service sits at the median of the Service list (its expected position in kube-proxy's randomly ordered KUBE-SERVICES chain). `weir` = socket LB on (connect-time translation in the node's cgroup), `weir-nosocklb` = the per-packet TC path, `iptables`/`nftables` = kube-proxy's rules generated from the same YAML and loaded into the node namespace, `bare` = the client talks to pod IPs directly (no Service, the ceiling). External clients reach the NodePort (bare: the pod IPs) through the lab's fabric.\n"
    );
    for (metric, title, unit) in METRICS {
        let _ = writeln!(s, "### {title} ({unit})\n");
        let _ = writeln!(
            s,
            "| Services | weir | weir-nosocklb | iptables | nftables | bare | weir/iptables | weir/nftables | weir/bare | weir-nosocklb/iptables |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for n in &xs {
            let g = |dp: &str| val(&t, metric, dp, *n);
            let cell = |dp: &str| g(dp).map(fmt).unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell("weir"),
                cell("weir-nosocklb"),
                cell("iptables"),
                cell("nftables"),
                cell("bare"),
                ratio(g("weir"), g("iptables")),
                ratio(g("weir"), g("nftables")),
                ratio(g("weir"), g("bare")),
                ratio(g("weir-nosocklb"), g("iptables")),
            );
        }
        let file = format!("{metric}.svg");
        std::fs::write(dir.join(&file), svg(&t, metric, title, unit))?;
        let _ = writeln!(s, "\n![{title}]({rel}/{file})\n");
    }
    let _ = writeln!(s, "### Latency p50 / p99 (µs)\n");
    let _ = writeln!(
        s,
        "| metric | Services | weir | weir-nosocklb | iptables | nftables | bare |\n|---|---|---|---|---|---|---|"
    );
    for (metric, label) in [
        (
            "crr_clusterip",
            "request on a new connection, pod -> ClusterIP",
        ),
        (
            "crr_nodeport",
            "request on a new connection, external -> NodePort",
        ),
        (
            "rr_clusterip",
            "request on a kept-alive connection, pod -> ClusterIP",
        ),
    ] {
        for n in &xs {
            let cell = |dp: &str| match (
                lat(&t, metric, dp, *n, "p50_us"),
                lat(&t, metric, dp, *n, "p99_us"),
            ) {
                (Some(a), Some(b)) => format!("{} / {}", fmt(a), fmt(b)),
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {label} | {n} | {} | {} | {} | {} | {} |",
                cell("weir"),
                cell("weir-nosocklb"),
                cell("iptables"),
                cell("nftables"),
                cell("bare")
            );
        }
    }
    let errs: Vec<String> = v["datapath"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["errors"].as_u64().unwrap_or(0) > 0)
        .map(|p| {
            format!(
                "- {} {} at {} Services: {} errors (first: {})",
                p["dataplane"].as_str().unwrap_or(""),
                p["metric"].as_str().unwrap_or(""),
                p["services"],
                p["errors"],
                p["note"].as_str().unwrap_or("")
            )
        })
        .collect();
    if !errs.is_empty() {
        let _ = writeln!(
            s,
            "\nErrors during the runs (each failed operation is excluded from the rate and latency):\n\n{}",
            errs.join("\n")
        );
    }
    let bad_probes: Vec<String> = v["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["summary"]["connected"].as_u64().unwrap_or(0) == 0
                && !p["to"].as_str().unwrap_or("").ends_with(":5201")
        })
        .map(|p| {
            format!(
                "- {} at {} Services: {} -> {}: {}",
                p["dataplane"].as_str().unwrap_or(""),
                p["services"],
                p["from"].as_str().unwrap_or(""),
                p["to"].as_str().unwrap_or(""),
                p["summary"]
            )
        })
        .collect();
    if !bad_probes.is_empty() {
        let _ = writeln!(
            s,
            "\nConnectivity checks (`weir lab probe`, 5 connections) that failed before measuring:\n\n{}",
            bad_probes.join("\n")
        );
    }

    // Per-packet cost.
    if let Some(pc) = v["progcost"].as_array() {
        let _ = writeln!(s, "\n## Per-packet program cost (BPF_PROG_TEST_RUN)\n");
        let _ = writeln!(
            s,
            "The real programs on maps programmed by the real pipeline from the benchmark YAML: `tc_from_pod` for the Service paths at 1 and 50k Services; `tc_to_pod` (ingress to a backend pod) for the NetworkPolicy paths with no policy, with one policy isolating the backends (admitting the client on 8080), and with it plus 1k generated policies over 10k pods on 100 nodes (100 of them on this node). Each packet is run with `repeat = 1` from a fresh copy, many times (a repeated skb would be the rewritten one and take another path; a new connection must be new), and the kernel's per-run time (ns, including its timer read) is summarised. Each path's first run is checked (verdict, rewritten addresses, checksums).\n"
        );
        let _ = writeln!(
            s,
            "| path | program | Services | policies | pods | runs | median ns | mean ns | p99 ns | checked |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for p in pc {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                p["path"].as_str().unwrap_or(""),
                p["program"].as_str().unwrap_or("tc_from_pod"),
                p["services"],
                p["policies"],
                p["pods"],
                p["runs"],
                fmt(p["median_ns"].as_f64().unwrap_or(0.0)),
                fmt(p["mean_ns"].as_f64().unwrap_or(0.0)),
                fmt(p["p99_ns"].as_f64().unwrap_or(0.0)),
                p["verified"].as_str().unwrap_or("")
            );
        }
        let _ = writeln!(s);
        for path in ["service", "revnat", "plain", "plain-repeat"] {
            let _ = writeln!(
                s,
                "- {path}: 50k / 1 Services = {}",
                ratio(median_ns(pc, path, 50_000, 0), median_ns(pc, path, 1, 0))
            );
        }
        let most = max_policies(pc);
        for path in [
            "ingress-new-allowed",
            "ingress-new-other",
            "ingress-established",
        ] {
            if most > 1 {
                let _ = writeln!(
                    s,
                    "- {path}: {most} / 1 policies = {}; 1 / 0 policies = {}",
                    ratio(median_ns(pc, path, 1, most), median_ns(pc, path, 1, 1)),
                    ratio(median_ns(pc, path, 1, 1), median_ns(pc, path, 1, 0)),
                );
                // One policy, with and without the generated pods: how much of the
                // difference is the size of IPCACHE rather than the number of policies.
                let one: Vec<&Value> = pc
                    .iter()
                    .filter(|p| p["path"] == path && p["policies"].as_u64() == Some(1))
                    .collect();
                if let (Some(few), Some(many)) = (
                    one.iter().min_by_key(|p| p["pods"].as_u64()),
                    one.iter().max_by_key(|p| p["pods"].as_u64()),
                ) && few["pods"] != many["pods"]
                {
                    let _ = writeln!(
                        s,
                        "  - 1 policy, {} / {} pods = {}",
                        many["pods"],
                        few["pods"],
                        ratio(many["median_ns"].as_f64(), few["median_ns"].as_f64())
                    );
                }
            }
        }
        if !pc.iter().any(|p| p["policies"].as_u64().unwrap_or(0) > 0) {
            let _ = writeln!(s, "- policy paths: not measured in this run");
        }
    }

    // Control plane.
    let _ = writeln!(s, "\n## Control plane\n");
    if let Some(cp) = v["control_weir"].as_array() {
        let _ = writeln!(
            s,
            "weir's sync path (incremental pipeline + syncer) programming the benchmark YAML from nothing, in its own process; peak = VmHWM with the peak reset after the YAML was parsed into the model (so it includes the model, as the agent's Store holds it, and the loaded object); then single-endpoint readiness flips, each from the change set to the map write done.\n"
        );
        let _ = writeln!(
            s,
            "| datapath | Services | endpoints | map ops | wall s | CPU s | peak MiB | RSS before MiB | process max RSS MiB | changes | change p50 µs | change p99 µs | max µs | ops per change |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in cp {
            let f = |k: &str| fmt(c[k].as_f64().unwrap_or(0.0));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c["datapath"].as_str().unwrap_or(""),
                c["services"],
                c["endpoints"],
                c["ops"],
                f("wall_s"),
                f("cpu_s"),
                f("peak_mib"),
                f("before_mib"),
                f("process_max_rss_mib"),
                c["changes"],
                f("change_p50_us"),
                f("change_p99_us"),
                f("change_max_us"),
                f("change_ops_mean"),
            );
        }
    }
    if let Some(loads) = v["rule_loads"].as_array() {
        let _ = writeln!(
            s,
            "\nkube-proxy's rules for the same YAML (generated by weir-bench from the upstream proxiers), loaded into the lab's empty node namespace, timed from process start to exit; max RSS of the loader:\n"
        );
        let _ = writeln!(
            s,
            "| tool | Services | endpoints | chains | rules | input MiB | wall s | CPU s | max RSS MiB |\n|---|---|---|---|---|---|---|---|---|"
        );
        for l in loads {
            if l["completed"] == false {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {:.1} | **stopped unfinished after {} s** | {} | – |",
                    l["tool"].as_str().unwrap_or(""),
                    l["services"],
                    l["stats"]["endpoints"],
                    l["stats"]["chains"],
                    l["stats"]["rules"],
                    l["stats"]["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    fmt(l["wall_s"].as_f64().unwrap_or(0.0)),
                    fmt(l["cpu_s"].as_f64().unwrap_or(0.0)),
                );
                continue;
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
                l["tool"].as_str().unwrap_or(""),
                l["services"],
                l["stats"]["endpoints"],
                l["stats"]["chains"],
                l["stats"]["rules"],
                l["stats"]["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                fmt(l["wall_s"].as_f64().unwrap_or(0.0)),
                fmt(l["cpu_s"].as_f64().unwrap_or(0.0)),
                fmt(l["max_rss_mib"].as_f64().unwrap_or(0.0)),
            );
        }
    }
    // weir against kube-proxy's loaders at the same scale.
    if let (Some(cp), Some(loads)) = (v["control_weir"].as_array(), v["rule_loads"].as_array())
        && let Some(real) = cp.iter().find(|c| c["datapath"] == "real")
    {
        {
            let n = real["services"].as_u64().unwrap_or(0);
            let ws = real["wall_s"].as_f64().unwrap_or(0.0);
            let wm = real["peak_mib"].as_f64().unwrap_or(0.0);
            for l in loads
                .iter()
                .filter(|l| l["services"].as_u64() == Some(n) && l["completed"] != false)
            {
                let _ = writeln!(
                    s,
                    "
- at {n} Services: {} took {} s and {} MiB; weir (real maps) {} s and {} MiB peak (loader time / weir time = {})",
                    l["tool"].as_str().unwrap_or(""),
                    fmt(l["wall_s"].as_f64().unwrap_or(0.0)),
                    fmt(l["max_rss_mib"].as_f64().unwrap_or(0.0)),
                    fmt(ws),
                    fmt(wm),
                    ratio(l["wall_s"].as_f64(), Some(ws).filter(|x| *x > 0.0)),
                );
            }
        }
    }
    if let Some(cp) = v["control_policy"].as_array() {
        let _ = writeln!(
            s,
            "\nNetworkPolicy: the same sync path programming 10k pods, 1k NetworkPolicies and 100 nodes (generated, `bench/src/policygen.rs`) for one node (100 local pods) from nothing, peak as above; then single label changes of remote pods (a `tier` label flips: new identity, IPCACHE entry, selectors), each from the change set to the map write done. kube-proxy has no NetworkPolicy to compare with.\n"
        );
        let _ = writeln!(
            s,
            "| datapath | pods | policies | nodes | local pods | map ops | IPCACHE | ENDPOINTS | POLICY | POLICY_RULES | wall s | CPU s | peak MiB | RSS before MiB | changes | change p50 µs | change p99 µs | max µs | ops per change |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for c in cp {
            let f = |k: &str| fmt(c[k].as_f64().unwrap_or(0.0));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c["datapath"].as_str().unwrap_or(""),
                c["pods"],
                c["policies"],
                c["nodes"],
                c["local_pods"],
                c["ops"],
                c["ipcache"],
                c["endpoints"],
                c["policy"],
                c["policy_rules"],
                f("wall_s"),
                f("cpu_s"),
                f("peak_mib"),
                f("before_mib"),
                c["changes"],
                f("change_p50_us"),
                f("change_p99_us"),
                f("change_max_us"),
                f("change_ops_mean"),
            );
        }
    }
    targets(&mut s, v, &t);
    // Hand-written reading of this run (why a target is missed, what the profile showed),
    // kept beside results.json so that regenerating the report keeps it.
    if let Ok(a) = std::fs::read_to_string(dir.join("analysis.md")) {
        let _ = writeln!(s, "\n{}", a.trim_end());
    }
    if let Some(notes) = v["notes"].as_array()
        && !notes.is_empty()
    {
        {
            let _ = writeln!(s, "\n## Notes from the run\n");
            for n in notes {
                let _ = writeln!(s, "- {}", n.as_str().unwrap_or(""));
            }
        }
    }
    Ok(s)
}

/// The median of one per-packet path (0 when the path was not measured).
fn median_ns(pc: &[Value], path: &str, services: u64, policies: u64) -> Option<f64> {
    pc.iter()
        .find(|p| {
            p["path"] == path
                && p["services"].as_u64() == Some(services)
                && p["policies"].as_u64().unwrap_or(0) == policies
        })
        .and_then(|p| p["median_ns"].as_f64())
}

/// The largest number of policies a per-packet row was measured with.
fn max_policies(pc: &[Value]) -> u64 {
    pc.iter()
        .filter_map(|p| p["policies"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Issue 8's targets against this run's figures (None where the run did not measure it).
fn targets(s: &mut String, v: &Value, t: &Table) {
    let _ = writeln!(s, "\n## Targets of issue 8\n");
    let _ = writeln!(s, "| target | this run | met? |\n|---|---|---|");
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    // Per-packet cost flat from 1 to 50k Services.
    if let Some(pc) = v["progcost"].as_array() {
        if let (Some(a), Some(b)) = (
            median_ns(pc, "service", 1, 0),
            median_ns(pc, "service", 50_000, 0),
        ) {
            let r = b / a;
            let _ = writeln!(
                s,
                "| per-packet cost flat 1 -> 50k Services (service path) | {} ns -> {} ns ({r:.2}x) | {} |",
                fmt(a),
                fmt(b),
                yes(r < 1.15)
            );
        }
        let most = max_policies(pc);
        for path in ["ingress-new-allowed", "ingress-new-other"] {
            if let (Some(a), Some(b)) = (
                median_ns(pc, path, 1, 1),
                median_ns(pc, path, 1, most).filter(|_| most > 1),
            ) {
                let r = b / a;
                let _ = writeln!(
                    s,
                    "| per-packet cost flat 1 -> {most} policies ({path}) | {} ns -> {} ns ({r:.2}x) | {} |",
                    fmt(a),
                    fmt(b),
                    yes(r < 1.15)
                );
            }
        }
    }
    let xs = scales(t);
    let big = xs.iter().copied().filter(|n| *n >= 10_000).min();
    match big {
        Some(n) => {
            let w = val(t, "crr_clusterip", "weir", n);
            let i = val(t, "crr_clusterip", "iptables", n);
            let nf = val(t, "crr_clusterip", "nftables", n);
            if let (Some(w), Some(i)) = (w, i) {
                let _ = writeln!(
                    s,
                    "| >= 1.5x iptables' connection rate at 10k Services | {:.2}x at {n} | {} |",
                    w / i,
                    yes(w / i >= 1.5)
                );
            }
            if let (Some(w), Some(nf)) = (w, nf) {
                let _ = writeln!(
                    s,
                    "| ahead of nftables' connection rate at 10k Services | {:.2}x at {n} | {} |",
                    w / nf,
                    yes(w > nf)
                );
            }
        }
        None => {
            let _ = writeln!(
                s,
                "| >= 1.5x iptables / ahead of nftables in connection rate at 10k Services | not measured in this run (datapath scales {xs:?}; 10k and 50k are in `--full`) | – |"
            );
        }
    }
    for n in &xs {
        if let (Some(w), Some(b)) = (
            val(t, "rr_clusterip", "weir", *n),
            val(t, "rr_clusterip", "bare", *n),
        ) {
            let _ = writeln!(
                s,
                "| request/response within 10% of bare with socket LB on ({n} Services) | {:.2}x bare | {} |",
                w / b,
                yes(w / b >= 0.9)
            );
        }
    }
    if let Some(real) = v["control_weir"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["datapath"] == "real"))
    {
        let ws = real["wall_s"].as_f64().unwrap_or(0.0);
        let wm = real["peak_mib"].as_f64().unwrap_or(0.0);
        let p99 = real["change_p99_us"].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            s,
            "| program 10k Services / 100k endpoints in < 2 s | {} s | {} |",
            fmt(ws),
            yes(ws < 2.0)
        );
        let _ = writeln!(
            s,
            "| ... using < 200 MB | {} MiB peak | {} |",
            fmt(wm),
            yes(wm * 1.048576 < 200.0)
        );
        let _ = writeln!(
            s,
            "| one endpoint change to the map in < 10 ms at p99 | {} µs | {} |",
            fmt(p99),
            yes(p99 < 10_000.0)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tables_and_plots_from_results() {
        let v = serde_json::json!({
            "meta": {"date": "2026-01-01T00:00:00Z", "durations": {"seconds_per_run": 2, "repetitions": 1}},
            "datapath": [
                {"dataplane": "weir", "services": 1, "metric": "crr_clusterip", "value": 200.0, "p50_us": 50.0, "p99_us": 90.0, "errors": 0},
                {"dataplane": "iptables", "services": 1, "metric": "crr_clusterip", "value": 100.0, "p50_us": 80.0, "p99_us": 120.0, "errors": 0},
                {"dataplane": "weir", "services": 1000, "metric": "crr_clusterip", "value": 190.0, "errors": 0},
            ],
        });
        let dir = std::env::temp_dir().join(format!("weir-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let md = render(&v, &dir, "results/x").unwrap();
        assert!(md.contains("| 1 | 200 | – | 100 | – | – | 2.00x |"), "{md}");
        assert!(md.contains("50.0 / 90.0"), "{md}");
        let svg = std::fs::read_to_string(dir.join("crr_clusterip.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
