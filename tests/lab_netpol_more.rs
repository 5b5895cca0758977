//! More NetworkPolicy cases in `weir lab` with real packets, in a second lab of the
//! x/y/z model (examples/netpol-xyz; see tests/lab_netpol.rs for the first): the rest of
//! the upstream cases that cover selectors, stacked policies, named ports, updates,
//! egress, both ends, precedence and ipBlocks (truth tables copied from
//! docs/upstream-netpol.md §3), and our own cases for what the upstream suite does not
//! probe (endPort ranges, ingress ipBlocks with excepts naming pod IPs, UDP egress, egress
//! to pod IPs next to ClusterIPs), with truth tables written from the API reference
//! (docs/upstream-netpol.md §1, rules R-numbers cited per case).
//!
//! Probes go to each destination's Service ClusterIP unless a case says otherwise, so
//! every egress case also checks that egress is decided on the backend pod behind the
//! ClusterIP. The diagonal is not asserted.

mod support;

use support::lab::{Case, NetpolLab, ONLY_X_A_DENIED, ONLY_Y_REACHES_X_A, all_allowed, netpol};

fn x(name: &str, spec: &str) -> String {
    netpol("x", name, spec)
}

/// Every source -> x/* denied.
const X_DENIED: &str = "
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

/// x/a -> everything denied.
const X_A_SENDS_NOTHING: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   X   X   X   X   X   X
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
";

/// x/* -> everything denied.
const X_SENDS_NOTHING: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   X   X   X   X   X   X
x/b        X   X   X   X   X   X   X   X   X
x/c        X   X   X   X   X   X   X   X   X
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
";

/// x/a -> only y/a.
const X_A_ONLY_TO_Y_A: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   .   X   X   X   X   X
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
";

#[test]
fn more_cases_in_one_lab() {
    support::require_root();
    NetpolLab::run(&[
        Case {
            name: "T06",
            run: t06_namespace_selector,
        },
        Case {
            name: "T09",
            run: t09_pod_or_namespace_selector,
        },
        Case {
            name: "T10",
            run: t10_pod_and_namespace_selector,
        },
        Case {
            name: "T11",
            run: t11_match_expressions,
        },
        Case {
            name: "T15",
            run: t15_stacked_policies,
        },
        Case {
            name: "T17",
            run: t17_named_port_ingress,
        },
        Case {
            name: "T19",
            run: t19_named_port_egress,
        },
        Case {
            name: "T20",
            run: t20_updated_policy,
        },
        Case {
            name: "T25",
            run: t25_deny_egress_of_a_pod,
        },
        Case {
            name: "T26",
            run: t26_deny_egress_of_a_namespace,
        },
        Case {
            name: "T27",
            run: t27_ingress_and_egress_together,
        },
        Case {
            name: "T28",
            run: t28_both_ends_must_allow,
        },
        Case {
            name: "T29",
            run: t29_egress_to_a_pod_by_clusterip_and_pod_ip,
        },
        Case {
            name: "T30",
            run: t30_protocol_only,
        },
        Case {
            name: "T31",
            run: t31_ingress_allow_all_takes_precedence,
        },
        Case {
            name: "T32",
            run: t32_egress_allow_all_takes_precedence,
        },
        Case {
            name: "T34",
            run: t34_egress_ipblock,
        },
        Case {
            name: "T35",
            run: t35_egress_ipblock_except,
        },
        Case {
            name: "T36",
            run: t36_ipblock_replaced,
        },
        Case {
            name: "T37",
            run: t37_ingress_and_egress_independent,
        },
        Case {
            name: "U3",
            run: u3_udp_pod_and_namespace,
        },
        Case {
            name: "endPort",
            run: endport_ranges_and_protocol_defaults,
        },
        Case {
            name: "ipBlock-ingress",
            run: ingress_ipblock_except_pod_ips,
        },
        Case {
            name: "UDP-egress",
            run: udp_egress,
        },
    ]);
}

/// T06 `should enforce policy to allow traffic only from a different namespace, based on
/// NamespaceSelector`.
fn t06_namespace_selector(l: &NetpolLab) {
    l.apply(&x(
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n",
    ));
    l.expect(80, "TCP", true, ONLY_Y_REACHES_X_A);
}

/// T09 `should enforce policy based on PodSelector or NamespaceSelector`.
fn t09_pod_or_namespace_selector(l: &NetpolLab) {
    l.apply(&x(
        "allow-ns-y-match-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]\n    - podSelector: {matchLabels: {pod: b}}\n",
    ));
    l.expect(
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        .   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
",
    );
}

/// T10 `should enforce policy based on PodSelector and NamespaceSelector`.
fn t10_pod_and_namespace_selector(l: &NetpolLab) {
    l.apply(&x(
        "allow-ns-y-podselector-and-nsselector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]\n      podSelector: {matchLabels: {pod: b}}\n",
    ));
    l.expect(
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        X   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        X   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
}

/// T11 `should enforce policy based on Multiple PodSelectors and NamespaceSelectors`
/// (matchExpressions In / NotIn).
fn t11_match_expressions(l: &NetpolLab) {
    l.apply(&x(
        "allow-ns-y-z-pod-b-c",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]\n      podSelector:\n        matchExpressions: [{key: pod, operator: In, values: [b, c]}]\n",
    ));
    l.expect(
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        X   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
",
    );
}

/// T15 `should enforce multiple, stacked policies with overlapping podSelectors`: a
/// second policy adds port 80 to what the first allows (R4, union).
fn t15_stacked_policies(l: &NetpolLab) {
    let p81 = x(
        "allow-client-a-via-ns-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports:\n    - {port: 81, protocol: TCP}\n",
    );
    l.apply(&p81);
    l.expect(
        81,
        "TCP",
        true,
        &ONLY_Y_REACHES_X_A.replace("TCP/80", "TCP/81"),
    );
    l.expect(80, "TCP", true, ONLY_X_A_DENIED);
    l.apply(
        &p81.replace(
            "allow-client-a-via-ns-selector",
            "allow-client-a-via-ns-selector-80",
        )
        .replace("port: 81", "port: 80"),
    );
    l.expect(80, "TCP", true, ONLY_Y_REACHES_X_A);
}

/// T17 `should allow ingress access on one named port` (serve-81-tcp).
fn t17_named_port_ingress(l: &NetpolLab) {
    l.apply(&x(
        "allow-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - ports:\n    - port: serve-81-tcp\n",
    ));
    l.expect(81, "TCP", true, &all_allowed("TCP/81"));
    l.expect(80, "TCP", true, X_DENIED);
}

/// T19 `should allow egress access on one named port`: serve-80-tcp is resolved on the
/// destination pod, behind its ClusterIP.
fn t19_named_port_egress(l: &NetpolLab) {
    l.apply(&x(
        "allow-egress",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: serve-80-tcp\n",
    ));
    l.expect(80, "TCP", true, &all_allowed("TCP/80"));
    l.expect(
        81,
        "TCP",
        true,
        &X_SENDS_NOTHING.replace("TCP/80", "TCP/81"),
    );
}

/// T20 `should enforce updated policy`: the same object changed from allow-all to
/// deny-all.
fn t20_updated_policy(l: &NetpolLab) {
    let allow = x(
        "allow-all-mutate-to-deny-all",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{}]\n",
    );
    l.apply(&allow);
    l.expect(81, "TCP", true, &all_allowed("TCP/81"));
    l.apply(&allow.replace("ingress: [{}]", "ingress: []"));
    l.expect(81, "TCP", true, &X_DENIED.replace("TCP/80", "TCP/81"));
}

/// T25 `should deny egress from pods based on PodSelector`.
fn t25_deny_egress_of_a_pod(l: &NetpolLab) {
    l.apply(&x(
        "deny-egress-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: []\n",
    ));
    l.expect(80, "TCP", true, X_A_SENDS_NOTHING);
}

/// T26 `should deny egress from all pods in a namespace`.
fn t26_deny_egress_of_a_namespace(l: &NetpolLab) {
    l.apply(&x(
        "deny-egress-ns-x",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: []\n",
    ));
    l.expect(80, "TCP", true, X_SENDS_NOTHING);
}

/// T27 `should work with Ingress, Egress specified together`: on port 81, x/b -> x/a is
/// allowed and x/a's answers (from port 81) pass although x/a's egress allows port 80
/// only (R6).
fn t27_ingress_and_egress_together(l: &NetpolLab) {
    l.apply(&x(
        "allow-client-a-via-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress, Ingress]\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {pod: b}}\n  egress:\n  - ports:\n    - port: 80\n",
    ));
    l.expect(
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
    l.expect(
        81,
        "TCP",
        true,
        "
TCP/81   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   X   X   X   X   X   X
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

/// T28 `should support denying of egress traffic on the client side (even if the server
/// explicitly allows this traffic)`: both ends must allow (R5).
fn t28_both_ends_must_allow(l: &NetpolLab) {
    let from_xa = |name: &str, pod: &str| {
        netpol(
            "y",
            name,
            &format!(
                "  podSelector: {{matchLabels: {{pod: {pod}}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: x}}}}\n      podSelector: {{matchLabels: {{pod: a}}}}\n"
            ),
        )
    };
    l.apply(
        &(x(
            "allow-to-ns-y-pod-a",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
        ) + &from_xa("allow-from-xa-on-ya-match-selector", "a")
            + &from_xa("allow-from-xa-on-yb-match-selector", "b")),
    );
    l.expect(
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   .   X   X   X   X   X
x/b        .   .   .   X   X   .   .   .   .
x/c        .   .   .   X   X   .   .   .   .
y/a        .   .   .   X   X   .   .   .   .
y/b        .   .   .   X   X   .   .   .   .
y/c        .   .   .   X   X   .   .   .   .
z/a        .   .   .   X   X   .   .   .   .
z/b        .   .   .   X   X   .   .   .   .
z/c        .   .   .   X   X   .   .   .   .
",
    );
}

/// T29 `should enforce egress policy allowing traffic to a server in a different
/// namespace based on PodSelector and NamespaceSelector`; probed through the ClusterIPs
/// (as upstream) and to the pod IPs directly: the verdict is the backend pod's either way.
fn t29_egress_to_a_pod_by_clusterip_and_pod_ip(l: &NetpolLab) {
    l.apply(&x(
        "allow-to-ns-y-pod-a",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
    ));
    l.expect(80, "TCP", true, X_A_ONLY_TO_Y_A);
    l.expect(80, "TCP", false, X_A_ONLY_TO_Y_A);
}

/// T30 `should enforce ingress policy allowing any port traffic to a server on a
/// specific protocol`.
fn t30_protocol_only(l: &NetpolLab) {
    l.apply(&x(
        "allow-ingress-by-proto",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - ports:\n    - protocol: TCP\n",
    ));
    l.expect(80, "TCP", true, &all_allowed("TCP/80"));
    l.expect(
        80,
        "UDP",
        true,
        &ONLY_X_A_DENIED.replace("TCP/80", "UDP/80"),
    );
}

/// T31 `should enforce multiple ingress policies with ingress allow-all policy taking
/// precedence`.
fn t31_ingress_allow_all_takes_precedence(l: &NetpolLab) {
    l.apply(&x(
        "allow-ingress-port-80",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{ports: [{port: 80}]}]\n",
    ));
    l.expect(81, "TCP", true, &X_DENIED.replace("TCP/80", "TCP/81"));
    l.apply(&x(
        "allow-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{}]\n",
    ));
    l.expect(81, "TCP", true, &all_allowed("TCP/81"));
}

/// T32 `should enforce multiple egress policies with egress allow-all policy taking
/// precedence`.
fn t32_egress_allow_all_takes_precedence(l: &NetpolLab) {
    l.apply(&x(
        "allow-egress-port-80",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: 80}]}]\n",
    ));
    l.expect(
        81,
        "TCP",
        true,
        &X_SENDS_NOTHING.replace("TCP/80", "TCP/81"),
    );
    l.apply(&x(
        "allow-egress",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{}]\n",
    ));
    l.expect(81, "TCP", true, &all_allowed("TCP/81"));
}

/// T34 `should allow egress access to server in CIDR block`: y/b's pod IP, reached
/// through its ClusterIP.
fn t34_egress_ipblock(l: &NetpolLab) {
    l.apply(&x(
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: {}/32}}\n",
            l.ip("y/b")
        ),
    ));
    l.expect(
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   X   .   X   X   X   X
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
",
    );
}

/// The T35/T36 policy: everything in the /4 around x/b's address except x/b itself.
fn t35_policy(l: &NetpolLab) -> String {
    let xb: std::net::Ipv4Addr = l.ip("x/b").parse().unwrap();
    let large = ipnet::Ipv4Net::new(xb, 4).unwrap().trunc();
    x(
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock:\n        cidr: {large}\n        except: [{xb}/32]\n"
        ),
    )
}

const T35: &str = "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        .   X   .   .   .   .   .   .   .
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
";

/// T35 `should enforce except clause while egress access to server in CIDR block`: x/b's
/// ClusterIP lies inside the block and is not excepted; only its pod IP is.
fn t35_egress_ipblock_except(l: &NetpolLab) {
    l.apply(&t35_policy(l));
    l.expect(80, "TCP", true, T35);
}

/// T36 `should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is
/// allowed`: the same policy replaced by one naming x/b only.
fn t36_ipblock_replaced(l: &NetpolLab) {
    let p = t35_policy(l);
    l.apply(&p);
    l.expect(80, "TCP", true, T35);
    l.apply(&x(
        "allow-client-a-via-cidr-egress-rule",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: {}/32}}\n",
            l.ip("x/b")
        ),
    ));
    l.expect(
        80,
        "TCP",
        true,
        "
TCP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   X   X   X   X   X   X   X
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
",
    );
}

/// T37 `should enforce policies to check ingress and egress policies can be controlled
/// independently based on PodSelector`: x/a accepts nothing but its own connections'
/// replies come in (R6).
fn t37_ingress_and_egress_independent(l: &NetpolLab) {
    l.apply(&x(
        "allow-egress-for-target",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{}]\n",
    ));
    l.expect(80, "TCP", true, &all_allowed("TCP/80"));
    l.apply(&x(
        "deny-ingress-via-label-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress: []\n",
    ));
    l.expect(80, "TCP", true, ONLY_X_A_DENIED);
    l.expect(
        80,
        "UDP",
        true,
        &ONLY_X_A_DENIED.replace("TCP/80", "UDP/80"),
    );
}

/// U3 (UDP) `should enforce policy to allow traffic only from a pod in a different
/// namespace based on PodSelector and NamespaceSelector` (as T13).
fn u3_udp_pod_and_namespace(l: &NetpolLab) {
    l.apply(&x(
        "allow-ns-y-pod-a-via-namespace-pod-selector",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n      podSelector: {matchLabels: {pod: a}}\n",
    ));
    l.expect(
        80,
        "UDP",
        true,
        "
UDP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   .   .   .   .   .   .   .   .
x/b        X   .   .   .   .   .   .   .   .
x/c        X   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        X   .   .   .   .   .   .   .   .
y/c        X   .   .   .   .   .   .   .   .
z/a        X   .   .   .   .   .   .   .   .
z/b        X   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
}

/// Ours: ranges with endPort (R13: `port..endPort` inclusive, protocol TCP by default),
/// two policies in two namespaces, ingress and egress. x/*: ingress from namespace y on
/// TCP 81-90 only. y/a: egress to anywhere on TCP 1-80 only.
fn endport_ranges_and_protocol_defaults(l: &NetpolLab) {
    l.apply(
        &(x(
            "range-in",
            "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports: [{port: 81, endPort: 90}]\n",
        ) + &netpol(
            "y",
            "range-out",
            "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: 1, endPort: 80}]\n",
        )),
    );
    // 80 is outside x's range; y/a may send to 80 (but not into x).
    l.expect(80, "TCP", true, X_DENIED);
    // 81 is inside x's range for y's pods, outside y/a's egress range.
    l.expect(
        81,
        "TCP",
        true,
        "
TCP/81   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   .   .   .   .   .   .
x/b        X   X   X   .   .   .   .   .   .
x/c        X   X   X   .   .   .   .   .   .
y/a        X   X   X   X   X   X   X   X   X
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        X   X   X   .   .   .   .   .   .
z/b        X   X   X   .   .   .   .   .   .
z/c        X   X   X   .   .   .   .   .   .
",
    );
    // UDP: neither range covers it (both default to TCP).
    l.expect(
        81,
        "UDP",
        true,
        "
UDP/81   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   .   .   .   .   .   .
x/b        X   X   X   .   .   .   .   .   .
x/c        X   X   X   .   .   .   .   .   .
y/a        X   X   X   X   X   X   X   X   X
y/b        X   X   X   .   .   .   .   .   .
y/c        X   X   X   .   .   .   .   .   .
z/a        X   X   X   .   .   .   .   .   .
z/b        X   X   X   .   .   .   .   .   .
z/c        X   X   X   .   .   .   .   .   .
",
    );
}

/// Ours: an ingress ipBlock that covers every pod address with excepts naming two pods
/// (R14: ipBlocks match pod IPs; R10: addresses inside `cidr`, not inside an `except`);
/// then a second policy allows one excepted pod by its labels (R4: the union).
fn ingress_ipblock_except_pod_ips(l: &NetpolLab) {
    l.apply(&x(
        "from-pod-cidr",
        &format!(
            "  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 10.244.0.0/16\n        except: [{}/32, {}/32]\n",
            l.ip("y/b"),
            l.ip("z/c")
        ),
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
y/a        .   .   .   .   .   .   .   .   .
y/b        X   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        X   .   .   .   .   .   .   .   .
",
    );
    l.apply(&x(
        "from-z-c",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}\n      podSelector: {matchLabels: {pod: c}}\n",
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
y/a        .   .   .   .   .   .   .   .   .
y/b        X   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
",
    );
}

/// Ours: UDP egress. x/a may send UDP to namespace y on port 80 only (R9, R13); the
/// answers come back (R6); no TCP at all.
fn udp_egress(l: &NetpolLab) {
    l.apply(&x(
        "udp-to-y",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}\n    ports: [{port: 80, protocol: UDP}]\n",
    ));
    let table = "
UDP/80   x/a x/b x/c y/a y/b y/c z/a z/b z/c
x/a        X   X   X   .   .   .   X   X   X
x/b        .   .   .   .   .   .   .   .   .
x/c        .   .   .   .   .   .   .   .   .
y/a        .   .   .   .   .   .   .   .   .
y/b        .   .   .   .   .   .   .   .   .
y/c        .   .   .   .   .   .   .   .   .
z/a        .   .   .   .   .   .   .   .   .
z/b        .   .   .   .   .   .   .   .   .
z/c        .   .   .   .   .   .   .   .   .
";
    l.expect(80, "UDP", true, table);
    l.expect(80, "UDP", false, table);
    l.expect(80, "TCP", true, X_A_SENDS_NOTHING);
}
