//! The classic NetworkPolicy model of the upstream e2e suite in `weir lab`
//! (docs/upstream-netpol.md §2): namespaces x, y, z; pods a, b, c; ports 80 and 81, TCP
//! and UDP; a Service per pod (examples/netpol-xyz), with real packets through the real
//! datapath. Expectations are the upstream truth tables (§3), copied verbatim; like
//! upstream, probes go to each destination pod's Service ClusterIP and the diagonal (a
//! pod to itself) is not asserted.
//!
//! One lab runs every case in turn (`support::lab::NetpolLab`): the baseline (no
//! policies, everything reachable), then the upstream cases with policies applied,
//! labels changed (`weir lab apply`) and policies deleted (`weir lab delete`) between
//! steps. tests/lab_netpol_more.rs runs the rest of the upstream cases and our own in a
//! second lab.

mod support;

use support::lab::{
    Case, NetpolLab, ONLY_X_A_DENIED, ONLY_Y_REACHES_X_A, XYZ_PODS, all_allowed, netpol,
    xyz_namespace, xyz_pod,
};

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

/// T03/T07/T22 step 2: only x/b reaches x/a.
const ONLY_X_B_REACHES_X_A: &str = "
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
";

fn policy(name: &str, body: &str) -> String {
    netpol("x", name, body)
}

#[test]
fn upstream_cases_in_one_lab() {
    support::require_root();
    NetpolLab::run(&[
        Case {
            name: "baseline",
            run: baseline,
        },
        Case {
            name: "T01",
            run: t01_default_deny_ingress,
        },
        Case {
            name: "T02",
            run: t02_default_deny_all,
        },
        Case {
            name: "T03",
            run: t03_pod_selector_within_namespace,
        },
        Case {
            name: "T04",
            run: t04_allow_ingress_for_a_target,
        },
        Case {
            name: "T14",
            run: t14_ports,
        },
        Case {
            name: "T23",
            run: t23_deny_ingress_from_other_namespaces,
        },
        Case {
            name: "T22",
            run: t22_label_change_on_the_client_flips_the_verdict,
        },
        Case {
            name: "T24",
            run: t24_label_change_on_the_target_flips_the_verdict,
        },
        Case {
            name: "T33",
            run: t33_deleted_policies_stop_being_enforced,
        },
        Case {
            name: "U1",
            run: u1_udp_default_deny_ingress,
        },
        Case {
            name: "U2",
            run: u2_udp_ports,
        },
        Case {
            name: "T21",
            run: t21_namespace_label_change,
        },
    ]);
}

/// No policies: every pair reachable on 80 and 81, TCP and UDP, to pod IPs and through
/// the Services (answered by the destination pod itself).
fn baseline(l: &NetpolLab) {
    // The pods are spread over the three nodes.
    let v = l.lab.run("status", &[]);
    let nodes: std::collections::BTreeSet<&str> = v["labs"][0]["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 3);
    for port in [80, 81] {
        for proto in ["TCP", "UDP"] {
            // Pod IPs, diagonal included: everything connects.
            let m = l.lab.matrix(port, proto, false);
            assert_eq!(m["summary"]["connected"], 81, "{}", m["table"]);
            // Reported, not asserted (no timing thresholds in tests).
            eprintln!("{proto}/{port}: 9x9 matrix in {} ms", m["elapsedMs"]);
            l.expect(port, proto, true, &all_allowed(&format!("{proto}/{port}")));
        }
    }
    let m = l.lab.matrix(80, "TCP", true);
    for c in m["cells"].as_array().unwrap() {
        if c["from"] != c["to"] {
            assert_eq!(c["server"], c["to"], "{c}");
            let (ns, pod) = c["to"].as_str().unwrap().split_once('/').unwrap();
            assert_eq!(c["service"], format!("{ns}/s-{ns}-{pod}").as_str());
        }
    }
    assert_eq!(XYZ_PODS.len(), 9);
}

/// T01 `should support a 'default-deny-ingress' policy`.
fn t01_default_deny_ingress(l: &NetpolLab) {
    l.apply(&policy(
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n",
    ));
    l.expect(80, "TCP", true, T01);
}

/// T02 `should support a 'default-deny-all' policy`.
fn t02_default_deny_all(l: &NetpolLab) {
    l.apply(&policy(
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []\n",
    ));
    l.expect(80, "TCP", true, DENY_ALL);
}

/// T03 `should enforce policy to allow traffic from pods within server namespace based
/// on PodSelector`.
fn t03_pod_selector_within_namespace(l: &NetpolLab) {
    l.apply(&policy(
        "x-a-allows-x-b",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n",
    ));
    l.expect(80, "TCP", true, ONLY_X_B_REACHES_X_A);
}

/// T04 `should enforce policy to allow ingress traffic for a target`.
fn t04_allow_ingress_for_a_target(l: &NetpolLab) {
    l.apply(&(policy(
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n",
    ) + &policy(
        "allow-all-to-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {}\n      namespaceSelector: {}\n",
    )));
    l.expect(
        80,
        "TCP",
        true,
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
fn t14_ports(l: &NetpolLab) {
    l.apply(&policy(
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: TCP}\n",
    ));
    l.expect(
        81,
        "TCP",
        true,
        &ONLY_Y_REACHES_X_A.replace("TCP/80", "TCP/81"),
    );
}

/// T23 `should deny ingress from pods on other namespaces`.
fn t23_deny_ingress_from_other_namespaces(l: &NetpolLab) {
    l.apply(&policy(
        "deny-empty-policy",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {}\n",
    ));
    l.expect(
        80,
        "TCP",
        true,
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

/// T22 `should allow ingress access from updated pod`: a label change (applied with
/// `weir lab apply`) flips x/b -> x/a from denied to allowed.
fn t22_label_change_on_the_client_flips_the_verdict(l: &NetpolLab) {
    l.apply(&policy(
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b, pod2: updated}}\n",
    ));
    l.expect(80, "TCP", true, ONLY_X_A_DENIED);
    l.apply(&xyz_pod("x", "b", "{pod: b, pod2: updated}"));
    l.expect(80, "TCP", true, ONLY_X_B_REACHES_X_A);
}

/// T24 `should deny ingress access to updated pod`: the policy selects no pod until a
/// label change on x/a makes it the target.
fn t24_label_change_on_the_target_flips_the_verdict(l: &NetpolLab) {
    l.apply(&policy(
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n  ingress: []\n",
    ));
    l.expect(80, "TCP", true, &all_allowed("TCP/80"));
    l.apply(&xyz_pod("x", "a", "{pod: a, target: isolated}"));
    l.expect(80, "TCP", true, ONLY_X_A_DENIED);
}

/// T33 `should stop enforcing policies after they are deleted`.
fn t33_deleted_policies_stop_being_enforced(l: &NetpolLab) {
    l.apply(&policy(
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []\n",
    ));
    l.expect(80, "TCP", true, DENY_ALL);
    l.lab.delete(&["networkpolicy/x/deny-all"]);
    l.expect(80, "TCP", true, &all_allowed("TCP/80"));
}

/// U1 (UDP) `should support a 'default-deny-ingress' policy`: the reply must come back.
fn u1_udp_default_deny_ingress(l: &NetpolLab) {
    l.apply(&policy(
        "deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n",
    ));
    l.expect(80, "UDP", true, &T01.replace("TCP/80", "UDP/80"));
}

/// U2 (UDP) `should enforce policy based on Ports`.
fn u2_udp_ports(l: &NetpolLab) {
    l.apply(&policy(
        "allow-ingress-on-port-81-ns-x",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: UDP}\n",
    ));
    l.expect(
        81,
        "UDP",
        true,
        &ONLY_Y_REACHES_X_A.replace("TCP/80", "UDP/81"),
    );
    // The same policy allows no TCP.
    l.expect(
        81,
        "TCP",
        true,
        &ONLY_X_A_DENIED.replace("TCP/80", "TCP/81"),
    );
}

/// T21 `should allow ingress access from updated namespace`: a label added to namespace y
/// (`weir lab apply` of the Namespace) lets y's pods in.
fn t21_namespace_label_change(l: &NetpolLab) {
    l.apply(&policy(
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns2: updated}}\n",
    ));
    l.expect(80, "TCP", true, ONLY_X_A_DENIED);
    l.apply(&xyz_namespace("y", "ns2: updated"));
    l.expect(80, "TCP", true, ONLY_Y_REACHES_X_A);
}
