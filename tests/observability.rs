//! End to end: a real Prometheus scrapes a lab agent's /metrics while real traffic goes
//! through the datapath (translated connections, rejected ones, and ones denied by
//! loadBalancerSourceRanges), and the series are asserted through Prometheus's HTTP
//! query API: they exist with the expected labels and moved by exactly what the traffic
//! implies. The same run checks kube-proxy's node health server, a health check node
//! port, and `weir flows` against the agent's API socket.
//!
//! Nothing leaves the lab's namespaces: Prometheus runs inside node-a's network
//! namespace on 127.0.0.1 (where the agent's metrics address is), started by PID with a
//! throwaway config and storage directory and stopped by PID; the test queries it from a
//! thread entered into that namespace.

mod support;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::lab::{TestLab, weir};
use weir::{
    http::{Endpoint, get},
    netns::{self, ChildGuard},
};

const CLUSTER: &str = r#"
apiVersion: weir.dev/v1alpha1
kind: LabConfig
socketLB: false
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {nodeName: node-a, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {role: web}}
spec: {nodeName: node-b, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: local-1, namespace: app, labels: {role: local}}
spec: {nodeName: node-a, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app}
spec:
  selector: {role: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: app}
spec:
  selector: {role: nobody}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: app}
spec:
  type: LoadBalancer
  selector: {role: web}
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: app}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {role: local}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// Percent-encodes a PromQL expression for a query string.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server in a lab node's namespace, stopped (by PID) and its directory
/// removed when dropped.
struct Prometheus {
    netns: String,
    port: u16,
    _child: ChildGuard,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self._child.stop(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(netns: &str, target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("weir-prom-{}", netns::unique_prefix('p')));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{scrape_interval: 1s, scrape_timeout: 900ms}}\nscrape_configs:\n- job_name: weir\n  static_configs: [{{targets: ['{target}']}}]\n"
            ),
        )
        .unwrap();
        let port = 9090;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        netns::command_in(netns, &mut cmd).unwrap();
        let child = ChildGuard::spawn(cmd, "prometheus")
            .expect("starting prometheus (Debian's package, installed by scripts/bootstrap.sh)");
        Prometheus {
            netns: netns.to_string(),
            port,
            _child: child,
            dir,
        }
    }

    /// An instant query: the result vector (empty while Prometheus is not up).
    fn query(&self, q: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", urlencode(q));
        let ep = Endpoint::Tcp(format!("127.0.0.1:{}", self.port).parse().unwrap());
        let r = netns::in_netns(&self.netns, move || get(&ep, &path, &[]))
            .unwrap()
            .ok();
        let Some(r) = r.filter(|r| r.status == 200) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&r.body).unwrap();
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that returns one series.
    fn value(&self, q: &str) -> Option<f64> {
        let r = self.query(q);
        match r.as_slice() {
            [one] => one["value"][1].as_str().and_then(|s| s.parse().ok()),
            _ => None,
        }
    }

    /// Polls `q` until `ok` holds for its value (every 250 ms, up to 90 s: scrapes are
    /// every second; the bound only ends a broken run).
    fn wait_for(&self, q: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.value(q);
            if let Some(v) = v
                && ok(v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: query {q} gave {v:?} (series: {:?})",
                self.query(q)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for a in v["attempts"].as_array().unwrap() {
        *m.entry(a["result"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

#[test]
fn prometheus_scrapes_a_lab_agent_and_the_series_follow_real_traffic() {
    support::require_root();
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "prometheus is not installed: run scripts/bootstrap.sh (Debian's prometheus package)"
    );
    let (lab, up) = TestLab::up(CLUSTER);
    let state = lab.state();
    let node_a = state["nodes"]["node-a"]["netns"]
        .as_str()
        .unwrap()
        .to_string();
    let prom = Prometheus::start(&node_a, "127.0.0.1:9964");

    // The agent is scraped, ready, and describes itself.
    prom.wait_for("up{job=\"weir\"}", "the agent's /metrics is scraped", |v| {
        v == 1.0
    });
    prom.wait_for("weir_ready", "the agent is ready", |v| v == 1.0);
    let build = prom.query("weir_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert!(build[0]["metric"]["version"].as_str().is_some());
    assert_eq!(
        build[0]["metric"]["datapath"].as_str().unwrap().len(),
        16,
        "{build:?}"
    );
    prom.wait_for("weir_objects{kind=\"Service\"}", "Services known", |v| {
        v == 4.0
    });
    prom.wait_for(
        "weir_map_entries{map=\"SERVICES\"} / weir_map_max_entries{map=\"SERVICES\"}",
        "map fill ratio",
        |v| v > 0.0 && v < 1.0,
    );
    prom.wait_for(
        "weir_sync_proxy_rules_duration_seconds_count",
        "sync duration histogram",
        |v| v >= 1.0,
    );
    prom.wait_for(
        "weir_network_programming_duration_seconds_count{kind=\"Service\"}",
        "programming latency of the Services",
        |v| v >= 4.0,
    );

    // Baselines (the lab's own readiness checks may have sent nothing, but do not rely
    // on zero).
    let svc = |name: &str, m: &str| {
        format!("{m}{{namespace=\"app\",name=\"{name}\",port=\"80\",protocol=\"TCP\"}}")
    };
    let dp = |reason: &str, dir: &str, verdict: &str| {
        format!(
            "weir_datapath_packets_total{{reason=\"{reason}\",direction=\"{dir}\",verdict=\"{verdict}\"}}"
        )
    };
    let get0 = |q: &str| prom.value(q).unwrap_or(0.0);
    let q_new = svc("web", "weir_service_new_connections_total");
    let q_pk = svc("web", "weir_service_packets_total");
    let q_by = svc("web", "weir_service_bytes_total");
    let q_rej = dp("no_backend_reject", "egress", "reject");
    let q_den = dp("source_range_denied", "ingress", "drop");
    let q_ev_rej = "weir_flow_events_received_total{kind=\"reject\"}".to_string();
    let q_ev_drop = "weir_flow_events_received_total{kind=\"drop\"}".to_string();
    let base: BTreeMap<&str, f64> = [
        ("new", get0(&q_new)),
        ("packets", get0(&q_pk)),
        ("bytes", get0(&q_by)),
        ("reject", get0(&q_rej)),
        ("denied", get0(&q_den)),
        ("ev_reject", get0(&q_ev_rej)),
        ("ev_drop", get0(&q_ev_drop)),
    ]
    .into();

    // Traffic: 10 connections through the ClusterIP (per-packet path: socketLB is off),
    // 3 to a Service without endpoints (each SYN rejected with a reset), 2 from the
    // external client to a LoadBalancer IP its source ranges do not allow (each SYN
    // dropped at node-a's uplink; the 300 ms timeout is shorter than the SYN
    // retransmission timeout, so one SYN each).
    let ok = lab.probe("app/client", "svc/app/web", 80, "TCP", 10);
    assert_eq!(counts(&ok)["connected"], 10, "{}", ok["summary"]);
    let rej = lab.probe("app/client", "svc/app/empty", 80, "TCP", 3);
    assert_eq!(counts(&rej)["refused"], 3, "{}", rej["summary"]);
    let den = lab.run(
        "probe",
        &[
            "--from",
            "external@node-a",
            "--to",
            "lb/app/guarded",
            "--port",
            "80",
            "--count",
            "2",
            "--timeout-ms",
            "300",
        ],
    );
    assert_eq!(counts(&den)["timeout"], 2, "{}", den["summary"]);

    // The series moved by exactly what the traffic implies.
    let b = |k: &str| base[k];
    prom.wait_for(&q_new, "new connections to app/web:80", |v| {
        v == b("new") + 10.0
    });
    prom.wait_for(&q_rej, "rejected SYNs", |v| v == b("reject") + 3.0);
    prom.wait_for(&q_den, "SYNs denied by source ranges", |v| {
        v == b("denied") + 2.0
    });
    prom.wait_for(&q_ev_rej, "reject events read by the agent", |v| {
        v == b("ev_reject") + 3.0
    });
    prom.wait_for(&q_ev_drop, "drop events read by the agent", |v| {
        v == b("ev_drop") + 2.0
    });
    // Every connection: at least SYN, ACK and the request line from the client; bytes
    // are whole frames (at least 54 bytes each).
    let pk = prom.wait_for(&q_pk, "packets to app/web:80", |v| v >= b("packets") + 30.0);
    prom.wait_for(&q_by, "bytes to app/web:80", |v| {
        v >= b("bytes") + 54.0 * (pk - b("packets"))
    });
    // The Service without endpoints and the guarded one: counted in the datapath, not
    // as translated Service traffic.
    assert_eq!(
        get0(&svc("empty", "weir_service_new_connections_total")),
        0.0
    );
    prom.wait_for(
        "sum(weir_conntrack_entries{protocol=\"TCP\"})",
        "conntrack entries of the connections",
        |v| v >= 10.0,
    );
    let drops =
        prom.query("sum by (reason) (rate(weir_datapath_packets_total{verdict=\"drop\"}[1m])) > 0");
    assert!(
        drops
            .iter()
            .any(|s| s["metric"]["reason"] == "source_range_denied"),
        "the drops-rising alert expression finds the denied traffic: {drops:?}"
    );

    // Node health (kube-proxy's port 10256) and the health check node port of the
    // eTP=Local LoadBalancer Service: node-a has its only endpoint, node-b none.
    let hcnp = up["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "local")
        .and_then(|s| s["healthCheckNodePort"].as_u64())
        .unwrap_or_else(|| panic!("no healthCheckNodePort in {up}")) as u16;
    for (node, code, count) in [("node-a", 200, 1), ("node-b", 503, 0)] {
        let ns = state["nodes"][node]["netns"].as_str().unwrap().to_string();
        let ip = up["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node)
            .unwrap()["internalIPs"][0]
            .as_str()
            .unwrap()
            .to_string();
        let (healthz, hc) = netns::in_netns(&ns, move || {
            let h = get(
                &Endpoint::Tcp("127.0.0.1:10256".parse().unwrap()),
                "/healthz",
                &[],
            );
            let hc = get(
                &Endpoint::Tcp(format!("{ip}:{hcnp}").parse().unwrap()),
                "/",
                &[],
            );
            (h, hc)
        })
        .unwrap();
        let healthz = healthz.unwrap();
        assert_eq!(healthz.status, 200, "{node}: {}", healthz.body);
        let v: Value = serde_json::from_str(&healthz.body).unwrap();
        assert_eq!(v["healthy"], true);
        assert_eq!(v["nodeEligible"], true);
        let hc = hc.unwrap();
        assert_eq!(hc.status, code, "{node}: {}", hc.body);
        let v: Value = serde_json::from_str(&hc.body).unwrap();
        assert_eq!(v["localEndpoints"], count);
        assert_eq!(v["service"]["name"], "local");
    }
    prom.wait_for(
        "weir_proxy_healthz_total{code=\"200\"}",
        "node health requests counted",
        |v| v >= 1.0,
    );

    // `weir flows` through the agent's API socket: the rejects and denied SYNs, named.
    let socket = lab.state_dir().join("api/node-a.sock");
    let out = Command::new(weir())
        .args(["flows", "--drops", "-o", "json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let rejects: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "reject").collect();
    assert_eq!(rejects.len(), 3, "{lines:?}");
    for r in &rejects {
        assert_eq!(r["reason"], "no_backend_reject");
        assert_eq!(r["service"], "app/empty:80/TCP");
        assert_eq!(r["direction"], "egress");
        assert!(r["destination"].as_str().unwrap().ends_with(":80"));
    }
    let denied: Vec<&Value> = lines
        .iter()
        .filter(|l| l["reason"] == "source_range_denied")
        .collect();
    assert_eq!(denied.len(), 2, "{lines:?}");
    assert!(
        denied
            .iter()
            .all(|d| d["source"].as_str().unwrap().starts_with("203.0.113.2:"))
    );
    let text = Command::new(weir())
        .args(["flows", "--drops", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("REJECT") && l.contains("no-backend-reject")),
        "{text}"
    );
    drop(prom);
    drop(lab);
}
