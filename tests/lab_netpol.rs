//! The classic NetworkPolicy model of the upstream e2e suite in `weir lab`
//! (docs/upstream-netpol.md §2): namespaces x, y, z; pods a, b, c; ports 80 and 81, TCP
//! and UDP; a Service per pod. Expectations are the upstream truth tables (§3), copied
//! verbatim; like upstream, probes go to each destination pod's Service ClusterIP and
//! the diagonal (a pod to itself) is not asserted.
//!
//! The baseline (no policies: every pair reachable on every port and protocol, to pod
//! IPs and through Services) runs in CI. The policy cases need NetworkPolicy
//! enforcement in the datapath (issue 5) and are ignored until it lands; they are
//! complete otherwise (`cargo nextest run --run-ignored all -E 'binary(lab_netpol)'`).

mod support;

use support::lab::{TestLab, XYZ_EXAMPLE, XYZ_PODS, matrix_mismatches, xyz_model};

fn all_allowed(header: &str) -> String {
    let mut t = format!("{header} {}\n", XYZ_PODS.join(" "));
    for p in XYZ_PODS {
        t.push_str(&format!("{p} {}\n", [". "; 9].concat()));
    }
    t
}

fn assert_matrix(lab: &TestLab, port: u16, proto: &str, to_service: bool, table: &str) {
    let m = lab.matrix(port, proto, to_service);
    let bad = matrix_mismatches(&m, table);
    assert!(
        bad.is_empty(),
        "{proto}/{port} (to service: {to_service}) differs from the truth table:\n{}\nmatrix:\n{}",
        bad.join("\n"),
        m["table"].as_str().unwrap_or("")
    );
}

#[test]
fn xyz_baseline_every_pair_reachable_on_80_and_81_tcp_and_udp() {
    support::require_root();
    // The model as examples/netpol-xyz has it (what users start from).
    let (lab, v) = TestLab::up_paths(&[XYZ_EXAMPLE]);
    // The pods are spread over the three nodes.
    let nodes: std::collections::BTreeSet<&str> = v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 3);
    for port in [80, 81] {
        for proto in ["TCP", "UDP"] {
            let table = all_allowed(&format!("{proto}/{port}"));
            // Pod IPs, diagonal included: everything connects.
            let m = lab.matrix(port, proto, false);
            assert_eq!(m["summary"]["connected"], 81, "{}", m["table"]);
            // Reported, not asserted (no timing thresholds in tests).
            eprintln!("{proto}/{port}: 9x9 matrix in {} ms", m["elapsedMs"]);
            // Through each pod's Service, as upstream probes.
            assert_matrix(&lab, port, proto, true, &table);
        }
    }
    // The Service cells were answered by the destination pod itself.
    let m = lab.matrix(80, "TCP", true);
    for c in m["cells"].as_array().unwrap() {
        if c["from"] != c["to"] {
            assert_eq!(c["server"], c["to"], "{c}");
            let (ns, pod) = c["to"].as_str().unwrap().split_once('/').unwrap();
            assert_eq!(c["service"], format!("{ns}/s-{ns}-{pod}").as_str());
        }
    }
}

/// Runs one upstream case: the model, the policies (YAML in namespace x unless they say
/// otherwise), the probe, the expected table.
fn policy_case(
    ports: &[u16],
    protos: &[&str],
    policies: &str,
    port: u16,
    proto: &str,
    table: &str,
) -> TestLab {
    let (lab, _) = TestLab::up(&xyz_model(ports, protos));
    assert_matrix(
        &lab,
        port,
        proto,
        true,
        &all_allowed(&format!("{proto}/{port}")),
    );
    lab.apply(policies);
    assert_matrix(&lab, port, proto, true, table);
    lab
}

const T01: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   .   .   .   .   .   .
x/b        X   X   X   .   .   .   .   .   .
x/c        X   X   X   .   .   .   .   .   .
y/a        X   X   X   .   .   .   .   .   .
y/b        X   X   X   .   .   .   .   .   .
y/c        X   X   X   .   .   .   .   .   .
z/a        X   X   X   .   .   .   .   .   .
z/b        X   X   X   .   .   .   .   .   .
z/c        X   X   X   .   .   .   .   .   .
";

const DENY_ALL: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   X   X   X   X   X   X
x/b        X   X   X   X   X   X   X   X   X
x/c        X   X   X   X   X   X   X   X   X
y/a        X   X   X   .   .   .   .   .   .
y/b        X   X   X   .   .   .   .   .   .
y/c        X   X   X   .   .   .   .   .   .
z/a        X   X   X   .   .   .   .   .   .
z/b        X   X   X   .   .   .   .   .   .
z/c        X   X   X   .   .   .   .   .   .
";

const ONLY_X_A_DENIED: &str = "
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

fn policy(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{body}"
    )
}

/// T01 `should support a 'default-deny-ingress' policy`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t01_default_deny_ingress() {
    support::require_root();
    policy_case(
        &[80],
        &["TCP"],
        &policy(
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n",
        ),
        80,
        "TCP",
        T01,
    );
}

/// T02 `should support a 'default-deny-all' policy`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t02_default_deny_all() {
    support::require_root();
    policy_case(
        &[80],
        &["TCP"],
        &policy(
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []\n",
        ),
        80,
        "TCP",
        DENY_ALL,
    );
}

/// T03 `should enforce policy to allow traffic from pods within server namespace based
/// on PodSelector`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t03_pod_selector_within_namespace() {
    support::require_root();
    policy_case(
        &[80],
        &["TCP"],
        &policy(
            "x-a-allows-x-b",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n",
        ),
        80,
        "TCP",
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        .   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        X   .   .   .   .   .   .   .   .
y/b        X   .   .   .   .   .   .   .   .
y/c        X   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
}

/// T04 `should enforce policy to allow ingress traffic for a target`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t04_allow_ingress_for_a_target() {
    support::require_root();
    let policies = policy(
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n",
    ) + &policy(
        "allow-all-to-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {}\n      namespaceSelector: {}\n",
    );
    policy_case(
        &[80],
        &["TCP"],
        &policies,
        80,
        "TCP",
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        .   X   X   .   .   .   .   .   .
x/b        .   X   X   .   .   .   .   .   .
x/c        .   X   X   .   .   .   .   .   .
y/a        .   X   X   .   .   .   .   .   .
y/b        .   X   X   .   .   .   .   .   .
y/c        .   X   X   .   .   .   .   .   .
z/a        .   X   X   .   .   .   .   .   .
z/b        .   X   X   .   .   .   .   .   .
z/c        .   X   X   .   .   .   .   .   .
",
    );
}

/// T14 `should enforce policy based on Ports` (TCP/81, from namespace y by its
/// kubernetes.io/metadata.name label).
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t14_ports() {
    support::require_root();
    policy_case(
        &[81],
        &["TCP"],
        &policy(
            "allow-client-a-via-ns-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: TCP}\n",
        ),
        81,
        "TCP",
        "
TCP/81   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
}

/// T23 `should deny ingress from pods on other namespaces`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t23_deny_ingress_from_other_namespaces() {
    support::require_root();
    policy_case(
        &[80],
        &["TCP"],
        &policy(
            "deny-empty-policy",
            "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {}\n",
        ),
        80,
        "TCP",
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        .   .   .   .   .   .   .   .   .
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        X   X   X   .   .   .   .   .   .
y/b        X   X   X   .   .   .   .   .   .
y/c        X   X   X   .   .   .   .   .   .
z/a        X   X   X   .   .   .   .   .   .
z/b        X   X   X   .   .   .   .   .   .
z/c        X   X   X   .   .   .   .   .   .
",
    );
}

fn xyz_pod(ns: &str, name: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\nspec:\n  containers:\n  - name: cont-80-tcp\n    ports: [{{name: serve-80-tcp, containerPort: 80, protocol: TCP}}]\n"
    )
}

/// T22 `should allow ingress access from updated pod`: a label change (applied with
/// `weir lab apply`) flips x/b -> x/a from denied to allowed.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t22_label_change_on_the_client_flips_the_verdict() {
    support::require_root();
    let lab = policy_case(
        &[80],
        &["TCP"],
        &policy(
            "allow-client-a-via-pod-selector",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b, pod2: updated}}\n",
        ),
        80,
        "TCP",
        ONLY_X_A_DENIED,
    );
    lab.apply(&xyz_pod("x", "b", "{pod: b, pod2: updated}"));
    assert_matrix(
        &lab,
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        .   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        X   .   .   .   .   .   .   .   .
y/b        X   .   .   .   .   .   .   .   .
y/c        X   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
}

/// T24 `should deny ingress access to updated pod`: the policy selects no pod until a
/// label change on x/a makes it the target.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t24_label_change_on_the_target_flips_the_verdict() {
    support::require_root();
    let lab = policy_case(
        &[80],
        &["TCP"],
        &policy(
            "deny-ingress-via-label-selector",
            "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n  ingress: []\n",
        ),
        80,
        "TCP",
        &all_allowed("TCP/80"),
    );
    lab.apply(&xyz_pod("x", "a", "{pod: a, target: isolated}"));
    assert_matrix(&lab, 80, "TCP", true, ONLY_X_A_DENIED);
}

/// T33 `should stop enforcing policies after they are deleted`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn t33_deleted_policies_stop_being_enforced() {
    support::require_root();
    let lab = policy_case(
        &[80],
        &["TCP"],
        &policy(
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []\n",
        ),
        80,
        "TCP",
        DENY_ALL,
    );
    lab.delete(&["networkpolicy/x/deny-all"]);
    assert_matrix(&lab, 80, "TCP", true, &all_allowed("TCP/80"));
}

/// U1 (UDP) `should support a 'default-deny-ingress' policy`: the reply must come back.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn u1_udp_default_deny_ingress() {
    support::require_root();
    policy_case(
        &[80],
        &["UDP"],
        &policy(
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n",
        ),
        80,
        "UDP",
        &T01.replace("TCP/80", "UDP/80"),
    );
}

/// U2 (UDP) `should enforce policy based on Ports`.
#[test]
#[ignore = "needs NetworkPolicy enforcement (issue 5)"]
fn u2_udp_ports() {
    support::require_root();
    policy_case(
        &[81],
        &["UDP"],
        &policy(
            "allow-ingress-on-port-81-ns-x",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: UDP}\n",
        ),
        81,
        "UDP",
        "
UDP/81   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
}
