//! Driving `weir lab` from tests through the real binary and its JSON (the public
//! interface scripts use). [`TestLab`] removes its lab by name when dropped, also when
//! the test panics.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

pub fn weir() -> &'static str {
    env!("CARGO_BIN_EXE_weir")
}

/// A unique lab name for one test (lab names: up to 12 of [a-z0-9]).
pub fn unique_name() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

/// Runs `weir lab ARGS...`; Ok(stdout JSON) on success, Err(stderr) otherwise.
pub fn lab_cmd(args: &[&str]) -> Result<Value, String> {
    let out = Command::new(weir())
        .arg("lab")
        .args(args)
        .output()
        .expect("running weir");
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("unrecognized subcommand 'lab'"),
            "{} has no `lab` subcommand: a build from another worktree sharing the target directory replaced it; rebuild and rerun",
            weir()
        );
        return Err(format!(
            "weir lab {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "weir lab {}: stdout is not JSON ({e}):\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub struct TestLab {
    pub name: String,
    pub input: PathBuf,
}

fn write_input(dir: &Path, file: &str, yaml: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), yaml).unwrap();
}

impl TestLab {
    /// A lab that is not up yet (its name is reserved for this test).
    pub fn named() -> TestLab {
        let name = unique_name();
        let input = std::env::temp_dir().join(format!("weir-lab-test-{name}"));
        TestLab { name, input }
    }

    /// `weir lab up` with `yaml`; returns the lab and what `up` printed.
    pub fn up(yaml: &str) -> (TestLab, Value) {
        Self::up_with(yaml, &[])
    }

    pub fn up_with(yaml: &str, extra: &[&str]) -> (TestLab, Value) {
        let lab = TestLab::named();
        let v = lab.try_up(yaml, extra).unwrap_or_else(|e| panic!("{e}"));
        (lab, v)
    }

    /// `weir lab up` of files or directories as they are (e.g. the examples).
    pub fn up_paths(paths: &[&str]) -> (TestLab, Value) {
        let lab = TestLab::named();
        let mut args = vec!["up", "--name", &lab.name];
        args.extend_from_slice(paths);
        let v = lab_cmd(&args).unwrap_or_else(|e| panic!("{e}"));
        (lab, v)
    }

    pub fn try_up(&self, yaml: &str, extra: &[&str]) -> Result<Value, String> {
        write_input(&self.input, "input.yaml", yaml);
        let input = self.input.display().to_string();
        let mut args = vec!["up", "--name", &self.name];
        args.extend_from_slice(extra);
        args.push(&input);
        lab_cmd(&args)
    }

    /// `weir lab SUBCOMMAND --name NAME ARGS...`
    pub fn try_run(&self, sub: &str, args: &[&str]) -> Result<Value, String> {
        let mut a = vec![sub, "--name", &self.name];
        a.extend_from_slice(args);
        lab_cmd(&a)
    }

    pub fn run(&self, sub: &str, args: &[&str]) -> Value {
        self.try_run(sub, args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn apply(&self, yaml: &str) -> Value {
        let n = std::fs::read_dir(&self.input)
            .map(|d| d.count())
            .unwrap_or(0);
        let dir = self.input.join(format!("apply-{n}"));
        write_input(&dir, "apply.yaml", yaml);
        self.run("apply", &[&dir.display().to_string()])
    }

    pub fn delete(&self, objects: &[&str]) -> Value {
        self.run("delete", objects)
    }

    pub fn probe(&self, from: &str, to: &str, port: u16, protocol: &str, count: u32) -> Value {
        self.run(
            "probe",
            &[
                "--from",
                from,
                "--to",
                to,
                "--port",
                &port.to_string(),
                "--protocol",
                protocol,
                "--count",
                &count.to_string(),
            ],
        )
    }

    /// Backends that answered, with counts, and the result kinds seen.
    pub fn backends(&self, from: &str, to: &str, port: u16, protocol: &str, count: u32) -> Value {
        self.probe(from, to, port, protocol, count)["summary"]["backends"].clone()
    }

    pub fn matrix(&self, port: u16, protocol: &str, to_service: bool) -> Value {
        let p = port.to_string();
        let mut a = vec!["--port", &p, "--protocol", protocol];
        if to_service {
            a.push("--to-service");
        }
        self.run("matrix", &a)
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/run/weir-lab").join(&self.name)
    }

    pub fn state(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(self.state_dir().join("state.json")).unwrap())
            .unwrap()
    }

    /// Everything carrying this lab's names that still exists.
    pub fn leftovers(&self) -> Vec<String> {
        let mut v = Vec::new();
        let prefix = format!("wl-{}-", self.name);
        v.extend(weir::netns::list_by_prefix(&prefix));
        let cg = weir::netns::cgroup2_root().unwrap();
        for dir in [cg, PathBuf::from("/sys/fs/bpf/weir")] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&prefix) || n.starts_with(&format!("weir-lab-{}-", self.name)) {
                    v.push(e.path().display().to_string());
                }
            }
        }
        if self.state_dir().exists() {
            v.push(self.state_dir().display().to_string());
        }
        v
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        // In-process (the same code as `weir lab down`): cleanup must not depend on the
        // binary, which a build from another worktree sharing the target directory may
        // have replaced meanwhile.
        match weir::lab::cli::down(&self.name) {
            Ok(r) if !r.remaining.is_empty() => {
                eprintln!(
                    "cleanup of lab {}: could not remove {:?}",
                    self.name, r.remaining
                )
            }
            Ok(_) => {}
            Err(e) => eprintln!("cleanup of lab {}: {e:#}", self.name),
        }
        let _ = std::fs::remove_dir_all(&self.input);
    }
}

/// Recorded processes (pid, start time) of a lab, from its state file.
pub fn recorded_processes(state: &Value) -> Vec<weir::lab::state::Proc> {
    let mut v = Vec::new();
    let p =
        |x: &Value| -> Option<weir::lab::state::Proc> { serde_json::from_value(x.clone()).ok() };
    for n in state["nodes"]
        .as_object()
        .into_iter()
        .flat_map(|o| o.values())
    {
        v.extend(p(&n["agent"]));
    }
    for k in ["pods", "endpoints"] {
        for w in state[k].as_object().into_iter().flat_map(|o| o.values()) {
            v.extend(p(&w["server"]));
        }
    }
    v
}

/// examples/netpol-xyz: the x/y/z model with ports 80 and 81, TCP and UDP.
pub const XYZ_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/netpol-xyz");

/// The x/y/z model of the upstream NetworkPolicy e2e suite (docs/upstream-netpol.md
/// §2): namespaces x, y, z; pods a, b, c in each with the single label `pod: <letter>`;
/// one container per (port, protocol) with a port named `serve-<port>-<proto>`; a
/// ClusterIP Service `s-<ns>-<pod>` per pod selecting it. Three nodes; the lab spreads
/// the pods over them.
pub fn xyz_model(ports: &[u16], protocols: &[&str]) -> String {
    let mut y = String::new();
    for n in ["node-1", "node-2", "node-3"] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n"
        ));
    }
    for ns in ["x", "y", "z"] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
        ));
        for pod in ["a", "b", "c"] {
            let mut containers = String::new();
            let mut svc_ports = String::new();
            for port in ports {
                for proto in protocols {
                    let lp = proto.to_lowercase();
                    containers.push_str(&format!(
                        "  - name: cont-{port}-{lp}\n    ports: [{{name: serve-{port}-{lp}, containerPort: {port}, protocol: {proto}}}]\n"
                    ));
                    svc_ports.push_str(&format!(
                        "  - {{name: service-port-{lp}-{port}, port: {port}, targetPort: {port}, protocol: {proto}}}\n"
                    ));
                }
            }
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n{containers}"
            ));
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s-{ns}-{pod}, namespace: {ns}}}\nspec:\n  selector: {{pod: {pod}}}\n  ports:\n{svc_ports}"
            ));
        }
    }
    y
}

pub const XYZ_PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

/// Every source -> x/a denied (upstream T01 and the first step of many cases).
pub const ONLY_X_A_DENIED: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        X   .   .   .   .   .   .   .   .
y/b        X   .   .   .   .   .   .   .   .
y/c        X   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
";

/// Only namespace y reaches x/a (T06/T14/T21 step 2).
pub const ONLY_Y_REACHES_X_A: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
";

/// Parses an upstream-style truth table (`.` allowed, `X` denied; first line the
/// header) into (from, to, allowed).
pub fn parse_truth_table(t: &str) -> Vec<(String, String, bool)> {
    let mut lines = t.lines().map(str::trim).filter(|l| !l.is_empty());
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().skip(1).collect();
    let mut out = Vec::new();
    for l in lines {
        let mut f = l.split_whitespace();
        let from = f.next().unwrap();
        for (to, v) in header.iter().zip(f) {
            out.push((from.to_string(), to.to_string(), v == "."));
        }
    }
    assert_eq!(out.len(), header.len() * header.len(), "square table");
    out
}

/// Compares a `weir lab matrix` result with a truth table, ignoring the diagonal as the
/// upstream suite does (docs/upstream-netpol.md §2.5). Returns the cells that differ.
pub fn matrix_mismatches(m: &Value, table: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for (from, to, allowed) in parse_truth_table(table) {
        if from == to {
            continue;
        }
        let got = m["matrix"][&from][&to]
            .as_str()
            .unwrap_or("missing")
            .to_string();
        if (got == "connected") != allowed {
            bad.push(format!(
                "{from} -> {to}: {got}, expected {}",
                if allowed { "allowed" } else { "denied" }
            ));
        }
    }
    bad
}

/// The x/y/z model's namespaces and pods as the model declares them (labels `pod:
/// <letter>` only, ports 80 and 81 over TCP and UDP): what a policy case that changed
/// labels re-applies to restore them.
pub fn xyz_pods_and_namespaces() -> String {
    let mut y = String::new();
    for ns in ["x", "y", "z"] {
        y.push_str(&xyz_namespace(ns, ""));
        for pod in ["a", "b", "c"] {
            y.push_str(&xyz_pod(ns, pod, &format!("{{pod: {pod}}}")));
        }
    }
    y
}

/// A namespace of the model with extra labels (`key: value, ...`, may be empty).
pub fn xyz_namespace(ns: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{{labels}}}}}\n"
    )
}

/// A pod of the model (ports 80 and 81, TCP and UDP) with these labels (`{k: v, ...}`).
pub fn xyz_pod(ns: &str, name: &str, labels: &str) -> String {
    let mut containers = String::new();
    for port in [80, 81] {
        for proto in ["TCP", "UDP"] {
            let lp = proto.to_lowercase();
            containers.push_str(&format!(
                "  - name: cont-{port}-{lp}\n    ports: [{{name: serve-{port}-{lp}, containerPort: {port}, protocol: {proto}}}]\n"
            ));
        }
    }
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec:\n  containers:\n{containers}"
    )
}

/// A NetworkPolicy `namespace/name` with this spec (YAML lines indented by two).
pub fn netpol(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

/// A truth table with every off-diagonal cell allowed.
pub fn all_allowed(header: &str) -> String {
    let mut t = format!("{header} {}\n", XYZ_PODS.join(" "));
    for p in XYZ_PODS {
        t.push_str(&format!("{p} {}\n", [". "; 9].concat()));
    }
    t
}

/// One lab with the x/y/z model (examples/netpol-xyz) in which NetworkPolicy cases run
/// one after the other: each applies its policies (and label changes), compares
/// `weir lab matrix` with its truth tables, and the lab is reset between cases (every
/// policy deleted, namespaces and pods back to the model). One lab per test file keeps
/// the suite within minutes: bringing a lab up costs seconds, a case about one second
/// per matrix with denied cells (the probe timeout).
pub struct NetpolLab {
    pub lab: TestLab,
    /// `namespace/pod` -> its IPv4 address.
    pub ips: std::collections::BTreeMap<String, String>,
}

/// A named case of a [`NetpolLab`] suite.
pub struct Case {
    pub name: &'static str,
    pub run: fn(&NetpolLab),
}

impl NetpolLab {
    pub fn up() -> NetpolLab {
        let (lab, v) = TestLab::up_paths(&[XYZ_EXAMPLE]);
        let ips = v["pods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    format!(
                        "{}/{}",
                        p["namespace"].as_str().unwrap(),
                        p["name"].as_str().unwrap()
                    ),
                    p["ips"][0].as_str().unwrap().to_string(),
                )
            })
            .collect();
        NetpolLab { lab, ips }
    }

    pub fn ip(&self, pod: &str) -> &str {
        &self.ips[pod]
    }

    pub fn apply(&self, yaml: &str) {
        self.lab.apply(yaml);
    }

    /// Probes the matrix and compares it with `table` (the diagonal is not asserted, as
    /// upstream). Like the upstream suite (ValidateOrFail), a mismatch is probed once
    /// more before it fails; the retry is reported.
    pub fn expect(&self, port: u16, proto: &str, to_service: bool, table: &str) {
        let mut bad = Vec::new();
        let mut m = Value::Null;
        for attempt in 0..2 {
            m = self.lab.matrix(port, proto, to_service);
            bad = matrix_mismatches(&m, table);
            if bad.is_empty() {
                if attempt > 0 {
                    eprintln!("{proto}/{port}: matched on the second probe");
                }
                return;
            }
            eprintln!(
                "{proto}/{port} (to service: {to_service}): {} cells differ, probing again:\n{}",
                bad.len(),
                m["table"].as_str().unwrap_or("")
            );
        }
        panic!(
            "{proto}/{port} (to service: {to_service}) differs from the truth table:\n{}\nmatrix:\n{}",
            bad.join("\n"),
            m["table"].as_str().unwrap_or("")
        );
    }

    /// Deletes every NetworkPolicy and restores the model's namespaces and pods.
    pub fn reset(&self) {
        let status = self.lab.run("status", &[]);
        let policies: Vec<String> = status["labs"][0]["networkPolicies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| format!("networkpolicy/{}", p.as_str().unwrap()))
                    .collect()
            })
            .unwrap_or_default();
        if !policies.is_empty() {
            let refs: Vec<&str> = policies.iter().map(String::as_str).collect();
            self.lab.delete(&refs);
        }
        self.lab.apply(&xyz_pods_and_namespaces());
    }

    /// Runs every case on one lab, resetting it after each; failures are collected (the
    /// panic message is printed where it happens) and reported together at the end.
    pub fn run(cases: &[Case]) {
        let lab = NetpolLab::up();
        let mut failures = Vec::new();
        for c in cases {
            let t = std::time::Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (c.run)(&lab)));
            eprintln!(
                "case {}: {} ({:.1}s)",
                c.name,
                if r.is_ok() { "ok" } else { "FAILED" },
                t.elapsed().as_secs_f64()
            );
            if r.is_err() {
                failures.push(c.name);
            }
            lab.reset();
        }
        assert!(
            failures.is_empty(),
            "cases that failed (their messages are above): {failures:?}"
        );
    }
}
