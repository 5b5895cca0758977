//! `weir lab` end to end, through the real binary and its JSON: building a cluster from
//! YAML (with everything a cluster would fill in), real connections through the real
//! agents, apply/delete, probes of every kind and result, the matrix, status, down
//! (also after a crashed `up`), and the demo. Every test uses its own lab name and
//! removes the lab when it ends, also when it fails.

mod support;

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::lab::{TestLab, lab_cmd, recorded_processes};

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn find<'a>(list: &'a Value, key: &str, val: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|x| x[key] == val)
        .unwrap_or_else(|| panic!("no {key}={val} in {list}"))
}

fn pod<'a>(v: &'a Value, ns: &str, name: &str) -> &'a Value {
    v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["namespace"] == ns && p["name"] == name)
        .unwrap_or_else(|| panic!("no pod {ns}/{name}"))
}

fn service<'a>(v: &'a Value, ns: &str, name: &str) -> &'a Value {
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["namespace"] == ns && p["name"] == name)
        .unwrap_or_else(|| panic!("no service {ns}/{name}"))
}

fn backend_set(b: &Value) -> BTreeSet<String> {
    b.as_object().unwrap().keys().cloned().collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const FILL_IN: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {topology.kubernetes.io/zone: zone-a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  nodeName: n2
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status:
  podIP: 10.244.1.77
---
apiVersion: v1
kind: Pod
metadata: {name: quiet, namespace: shop}
spec:
  nodeName: n2
  containers: [{name: c}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.7.7
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 31080}
  - {name: alt, port: 81, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: zlb, namespace: shop}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: anything, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress], ingress: [{}]}
"#;

#[test]
fn up_fills_in_the_cluster_status_reports_it_and_down_removes_everything() {
    support::require_root();
    let (lab, v) = TestLab::up(FILL_IN);
    assert_eq!(v["lab"], lab.name.as_str());
    assert_eq!(v["generation"], 1);
    assert_eq!(v["programmed"], true);

    // Nodes: n1 declared (its labels kept), n2 created because a pod names it; both got
    // an address and a pod CIDR, and run an agent that has programmed generation 1.
    let n1 = find(&v["nodes"], "name", "n1");
    let n2 = find(&v["nodes"], "name", "n2");
    assert_eq!(strs(&n1["internalIPs"]), ["192.168.100.2"]);
    assert_eq!(strs(&n2["internalIPs"]), ["192.168.100.3"]);
    assert_eq!(strs(&n1["podCIDRs"]), ["10.244.0.0/24"]);
    assert_eq!(strs(&n2["podCIDRs"]), ["10.244.1.0/24"]);
    assert_eq!(n1["labels"]["topology.kubernetes.io/zone"], "zone-a");
    for n in [n1, n2] {
        assert_eq!(n["agent"]["running"], true);
        assert_eq!(n["agent"]["programmedGeneration"], 1);
        assert!(
            n["netns"]
                .as_str()
                .unwrap()
                .starts_with(&format!("wl-{}-n-", lab.name))
        );
    }

    // Pods: allocated from the node's CIDR, or exactly as given; ready; a server only
    // where ports are declared.
    assert_eq!(strs(&pod(&v, "shop", "web-1")["ips"]), ["10.244.0.2"]);
    assert_eq!(strs(&pod(&v, "shop", "web-2")["ips"]), ["10.244.1.77"]);
    assert_eq!(strs(&pod(&v, "shop", "quiet")["ips"]), ["10.244.1.2"]);
    assert_eq!(pod(&v, "shop", "web-1")["ready"], true);
    assert_eq!(pod(&v, "shop", "web-1")["server"]["running"], true);
    assert!(pod(&v, "shop", "quiet")["server"].is_null());

    // Services: a clusterIP allocated, a given one honoured, nodePorts given and
    // allocated, endpoints derived from the selector with named targetPorts resolved.
    let web = service(&v, "shop", "web");
    assert_eq!(strs(&web["clusterIPs"]), ["10.96.0.10"]);
    assert_eq!(web["endpointSlices"], "derived");
    let mut eps: Vec<String> = web["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {} {}", e["address"], e["pod"], e["ports"][0]["port"]))
        .collect();
    eps.sort();
    assert_eq!(
        eps,
        [
            "\"10.244.0.2\" \"shop/web-1\" 8080",
            "\"10.244.1.77\" \"shop/web-2\" 8080"
        ]
    );
    let np = service(&v, "shop", "web-np");
    assert_eq!(strs(&np["clusterIPs"]), ["10.96.7.7"]);
    assert_eq!(np["type"], "NodePort");
    assert_eq!(np["ports"][0]["nodePort"], 31080);
    assert_eq!(np["ports"][1]["nodePort"], 30000);
    assert_eq!(strs(&v["networkPolicies"]), ["shop/anything"]);
    // A LoadBalancer gets an ingress IP (as a load-balancer controller would publish) and
    // a nodePort; the fabric routes its IP through the first node.
    let lb = service(&v, "shop", "zlb");
    assert_eq!(strs(&lb["loadBalancerIPs"]), ["198.51.100.10"]);
    assert_eq!(lb["ports"][0]["nodePort"], 30001);
    let fabric = format!("wl-{}-fabric", lab.name);
    let routes = || weir::netns::ip(&["-n", &fabric, "route", "show", "198.51.100.10"]).unwrap();
    assert!(routes().contains("via 192.168.100.2"), "{}", routes());

    // Destinations resolve to what a client would dial (results depend on NodePort and
    // LoadBalancer support in the datapath, which these lines do not assert).
    let r = lab.run(
        "probe",
        &[
            "--from",
            "external@n2",
            "--to",
            "nodeport/n2/shop/web-np",
            "--port",
            "81",
            "--timeout-ms",
            "200",
        ],
    );
    assert_eq!(
        (
            r["to"]["kind"].clone(),
            r["to"]["address"].clone(),
            r["to"]["port"].clone(),
            r["to"]["servicePort"].clone()
        ),
        (
            "nodePort".into(),
            "192.168.100.3".into(),
            30000.into(),
            81.into()
        )
    );
    let r = lab.run(
        "probe",
        &[
            "--from",
            "external@n2",
            "--to",
            "lb/shop/zlb",
            "--port",
            "80",
            "--timeout-ms",
            "200",
        ],
    );
    assert_eq!(r["to"]["address"], "198.51.100.10");
    assert_eq!(r["from"]["entryNode"], "n2");
    // The probe entered through n2: the fabric now routes the LB IP there.
    assert!(routes().contains("via 192.168.100.3"), "{}", routes());

    // The agents read the filled-in objects, derived EndpointSlices included, and the
    // policy passed through untouched.
    let objects = std::fs::read_to_string(lab.state_dir().join("objects/cluster.yaml")).unwrap();
    assert!(objects.contains("kind: EndpointSlice"), "{objects}");
    assert!(objects.contains("podIP: 10.244.0.2"));
    assert!(objects.contains("kind: NetworkPolicy"));
    assert_eq!(
        std::fs::read_to_string(lab.state_dir().join("objects/.weir-generation"))
            .unwrap()
            .trim(),
        "1"
    );

    // Pod processes live in their node's cgroup.
    let state = lab.state();
    let server = &state["pods"]["shop/web-1"]["server"]["pid"];
    let cg = std::fs::read_to_string(format!("/proc/{server}/cgroup")).unwrap();
    assert!(
        cg.contains(&format!("/weir-lab-{}-n1", lab.name)),
        "server cgroup: {cg}"
    );

    // status shows the same lab, programmed.
    let st = lab_cmd(&["status", "--name", &lab.name]).unwrap();
    assert_eq!(st["labs"][0]["lab"], lab.name.as_str());
    assert_eq!(st["labs"][0]["programmed"], true);
    let all = lab_cmd(&["status"]).unwrap();
    assert!(
        all["labs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["lab"] == lab.name.as_str())
    );

    // down: every recorded process ends, every name is gone.
    let procs = recorded_processes(&state);
    assert_eq!(procs.len(), 4, "two agents and two servers: {procs:?}");
    assert!(procs.iter().all(|p| p.alive()));
    assert!(!lab.leftovers().is_empty());
    let d = lab_cmd(&["down", "--name", &lab.name]).unwrap();
    let r = &d["labs"][0];
    assert_eq!(r["existed"], true);
    assert_eq!(r["remaining"].as_array().unwrap().len(), 0, "{r}");
    assert_eq!(r["namespaces"].as_array().unwrap().len(), 7, "{r}");
    for p in &procs {
        assert!(!p.alive(), "process {} still runs after down", p.pid);
    }
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    // A second down finds nothing and still succeeds.
    let d = lab_cmd(&["down", "--name", &lab.name]).unwrap();
    assert_eq!(d["labs"][0]["existed"], false);
}

const BALANCE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app}
spec: {nodeName: node-a, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: be-1, namespace: app, labels: {role: be}}
spec:
  nodeName: node-a
  containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: be-2, namespace: app, labels: {role: be}}
spec:
  nodeName: node-b
  containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: be-3, namespace: app, labels: {role: be}}
spec:
  nodeName: node-b
  containers: [{name: c, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: be, namespace: app}
spec:
  selector: {role: be}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
"#;

/// ClusterIP DNAT with conntrack and reverse NAT, TCP and UDP, to pods on the client's
/// node and on another node (docs/upstream-services.md §1.5: uniform choice among the
/// Ready endpoints; §4 row 1: pod to ClusterIP is not masqueraded).
#[test]
fn cluster_ip_balances_tcp_and_udp_across_pods_on_two_nodes() {
    support::require_root();
    let (lab, v) = TestLab::up(BALANCE);
    let vip = strs(&service(&v, "app", "be")["clusterIPs"])[0].clone();
    let client_ip = strs(&pod(&v, "app", "client")["ips"])[0].clone();
    let all = set(&["app/be-1", "app/be-2", "app/be-3"]);
    for (port, proto) in [(80, "TCP"), (53, "UDP")] {
        let r = lab.probe("app/client", "svc/app/be", port, proto, 30);
        assert_eq!(r["summary"]["connected"], 30, "{proto}: {}", r["summary"]);
        assert_eq!(backend_set(&r["summary"]["backends"]), all, "{proto}");
        for a in r["attempts"].as_array().unwrap() {
            // The backend saw the client's own address, and the reply came from the VIP.
            assert!(
                a["client"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{client_ip}:")),
                "{a}"
            );
            assert_eq!(a["peer"].as_str().unwrap(), format!("{vip}:{port}"), "{a}");
            assert_eq!(a["client"], a["source"], "no masquerade: {a}");
        }
    }
}

const EDGES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: p}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 80, protocol: UDP}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: p}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 80}]}]}
"#;

/// Every result kind, every source kind, fixed source ports.
#[test]
fn probes_report_each_result_kind_from_pods_nodes_and_outside() {
    support::require_root();
    let (lab, v) = TestLab::up(EDGES);
    let one = |from: &str, to: &str, port: u16, proto: &str| -> Value {
        let r = lab.run(
            "probe",
            &[
                "--from",
                from,
                "--to",
                to,
                "--port",
                &port.to_string(),
                "--protocol",
                proto,
                "--timeout-ms",
                "400",
            ],
        );
        r["attempts"][0].clone()
    };
    let a_ip = strs(&pod(&v, "p", "a")["ips"])[0].clone();
    let b_ip = strs(&pod(&v, "p", "b")["ips"])[0].clone();
    let n1_ip = strs(&find(&v["nodes"], "name", "n1")["internalIPs"])[0].clone();

    let r = one("p/a", "p/b", 80, "TCP");
    assert_eq!(r["result"], "connected", "{r}");
    assert_eq!(r["server"], "p/b");
    assert!(
        r["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{a_ip}:"))
    );
    assert_eq!(r["serverLocal"], format!("{b_ip}:80").as_str());
    // Closed ports: TCP RST and ICMP port unreachable.
    assert_eq!(one("p/a", "p/b", 81, "TCP")["result"], "refused");
    assert_eq!(one("p/a", "p/b", 80, "UDP")["result"], "refused");
    assert_eq!(one("p/b", "p/a", 80, "UDP")["result"], "connected");
    // An unused address in n2's pod CIDR: n2 blackholes it, nothing answers.
    assert_eq!(one("p/a", "10.244.1.200", 80, "TCP")["result"], "timeout");
    assert_eq!(one("p/a", "10.244.1.200", 80, "UDP")["result"], "timeout");
    // An address nothing routes: the fabric answers network unreachable.
    assert_eq!(one("p/a", "198.18.0.1", 80, "TCP")["result"], "unreachable");
    assert_eq!(one("p/a", "198.18.0.1", 80, "UDP")["result"], "unreachable");

    // From a node's host network: the server sees the node's address.
    let r = one("node/n1", "p/b", 80, "TCP");
    assert_eq!(r["result"], "connected", "{r}");
    assert!(
        r["client"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{n1_ip}:")),
        "{r}"
    );
    // From outside the cluster, with a chosen source address.
    let r = lab.run(
        "probe",
        &[
            "--from",
            "external:203.0.113.9@n2",
            "--to",
            "p/a",
            "--port",
            "80",
        ],
    );
    assert_eq!(r["from"]["kind"], "external");
    assert_eq!(r["from"]["address"], "203.0.113.9");
    assert_eq!(r["from"]["entryNode"], "n2");
    assert_eq!(r["attempts"][0]["result"], "connected", "{r}");
    assert!(
        r["attempts"][0]["client"]
            .as_str()
            .unwrap()
            .starts_with("203.0.113.9:")
    );
    // The default external source.
    let r = one("external", "p/b", 80, "TCP");
    assert!(
        r["client"].as_str().unwrap().starts_with("203.0.113.2:"),
        "{r}"
    );

    // A fixed source port is used by every attempt.
    let r = lab.run(
        "probe",
        &[
            "--from",
            "p/a",
            "--to",
            "p/b",
            "--port",
            "80",
            "--count",
            "3",
            "--source-port",
            "40123",
        ],
    );
    assert_eq!(r["summary"]["connected"], 3, "{r}");
    for a in r["attempts"].as_array().unwrap() {
        assert_eq!(a["client"], format!("{a_ip}:40123").as_str());
    }

    // Bad specs are clear errors.
    let e = lab
        .try_run(
            "probe",
            &["--from", "p/nope", "--to", "p/b", "--port", "80"],
        )
        .unwrap_err();
    assert!(e.contains("no pod p/nope"), "{e}");
    let e = lab
        .try_run(
            "probe",
            &["--from", "p/a", "--to", "svc/p/none", "--port", "80"],
        )
        .unwrap_err();
    assert!(e.contains("no Service p/none"), "{e}");
}

/// TestTerminatingEndpointsTrafficPolicyCluster (docs/upstream-services.md §1.6), pod
/// to ClusterIP, with endpoint addresses that belong to no pod: the lab serves each at
/// its address on its node. Serving-and-terminating endpoints are used only when no
/// endpoint is Ready (pkg/proxy/topology.go CategorizeEndpoints); not-serving ones never.
#[test]
fn terminating_endpoints_are_used_only_when_no_endpoint_is_ready() {
    support::require_root();
    let svc = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ns1}
spec: {nodeName: test-node, containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  clusterIP: 172.30.1.1
  ports: [{name: "", port: 80, protocol: TCP}]
"#;
    let slice = |eps: &str| {
        format!(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: svc1-abc, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}
addressType: IPv4
ports: [{{name: "", port: 80, protocol: TCP}}]
endpoints:
{eps}"#
        )
    };
    let ep = |ip: &str, ready: bool, serving: bool, terminating: bool, node: &str| {
        format!(
            "- {{addresses: [{ip}], nodeName: {node}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}\n"
        )
    };
    let ready_exist = [
        ep("10.0.1.1", true, true, false, "test-node"),
        ep("10.0.1.2", true, true, false, "test-node"),
        ep("10.0.1.3", false, true, true, "another-node"),
        ep("10.0.1.4", false, false, true, "another-node"),
        ep("10.0.1.5", true, true, false, "another-node"),
    ]
    .concat();
    let (lab, v) = TestLab::up(&format!("{svc}---{}", slice(&ready_exist)));
    let s = service(&v, "ns1", "svc1");
    assert_eq!(s["endpointSlices"], "given");
    let t = find(&s["endpoints"], "address", "10.0.1.3");
    assert_eq!(
        (
            t["ready"].clone(),
            t["serving"].clone(),
            t["terminating"].clone()
        ),
        (Value::Bool(false), Value::Bool(true), Value::Bool(true))
    );
    // Every endpoint address got a server at that address on its node.
    let servers: Vec<String> = v["endpointServers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}@{}",
                e["address"].as_str().unwrap(),
                e["node"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        servers,
        [
            "10.0.1.1@test-node",
            "10.0.1.2@test-node",
            "10.0.1.3@another-node",
            "10.0.1.4@another-node",
            "10.0.1.5@another-node"
        ]
    );
    // Each endpoint answers directly (its server runs whatever its conditions say).
    for ip in ["10.0.1.3", "10.0.1.4"] {
        let b = lab.backends("ns1/client", ip, 80, "TCP", 1);
        assert_eq!(backend_set(&b), set(&[ip]));
    }
    let b = lab.backends("ns1/client", "svc/ns1/svc1", 80, "TCP", 40);
    assert_eq!(backend_set(&b), set(&["10.0.1.1", "10.0.1.2", "10.0.1.5"]));

    // Only terminating endpoints: the serving ones are used.
    let only_terminating = [
        ep("10.0.1.2", false, true, true, "test-node"),
        ep("10.0.1.3", false, true, true, "test-node"),
        ep("10.0.1.4", false, false, true, "another-node"),
        ep("10.0.1.5", false, true, true, "another-node"),
    ]
    .concat();
    let a = lab.apply(&slice(&only_terminating));
    assert_eq!(a["changes"][0]["action"], "configured", "{}", a["changes"]);
    let b = lab.backends("ns1/client", "svc/ns1/svc1", 80, "TCP", 40);
    assert_eq!(backend_set(&b), set(&["10.0.1.2", "10.0.1.3", "10.0.1.5"]));

    // No usable endpoint anywhere: nothing is chosen (upstream: REJECT).
    lab.apply(&slice(&ep("10.0.1.5", false, false, true, "test-node")));
    let r = lab.probe("ns1/client", "svc/ns1/svc1", 80, "TCP", 3);
    assert_eq!(r["summary"]["connected"], 0, "{}", r["summary"]);
    assert_eq!(r["summary"]["refused"], 3, "REJECT: {}", r["summary"]);
}

const APPLY_BASE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: d}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: w1, namespace: d, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: w2, namespace: d, labels: {app: other}}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: d}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

fn pod_yaml(name: &str, app: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: d, labels: {{app: {app}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\n"
    )
}

/// apply (create, replace, label changes) and delete take effect when the command
/// returns: every agent has programmed the new generation, no sleeps.
#[test]
fn apply_and_delete_change_what_the_service_reaches() {
    support::require_root();
    let (lab, v) = TestLab::up(APPLY_BASE);
    let w2_ip = strs(&pod(&v, "d", "w2")["ips"])[0].clone();
    let to = "svc/d/web";
    assert_eq!(
        backend_set(&lab.backends("d/client", to, 80, "TCP", 10)),
        set(&["d/w1"])
    );

    // A label change brings w2 into the Service; its address does not change.
    let a = lab.apply(&pod_yaml("w2", "web", "n2"));
    assert_eq!(a["generation"], 2);
    assert_eq!(a["programmed"], true);
    assert_eq!(a["changes"][0]["kind"], "Pod");
    assert_eq!(a["changes"][0]["key"], "d/w2");
    assert_eq!(a["changes"][0]["action"], "configured");
    assert_eq!(
        strs(&pod(&a, "d", "w2")["ips"]),
        std::slice::from_ref(&w2_ip)
    );
    assert_eq!(
        backend_set(&lab.backends("d/client", to, 80, "TCP", 30)),
        set(&["d/w1", "d/w2"])
    );

    // A changed container port list restarts the pod's server on the new ports (same
    // pod, same address).
    let before = lab.state()["pods"]["d/w2"]["server"]["pid"].clone();
    lab.apply(&pod_yaml("w2", "web", "n2").replace(
        "[{containerPort: 8080}]",
        "[{containerPort: 8080}, {containerPort: 9090, protocol: UDP}]",
    ));
    assert_ne!(lab.state()["pods"]["d/w2"]["server"]["pid"], before);
    let r = lab.probe("d/client", "d/w2", 9090, "UDP", 1);
    assert_eq!(r["attempts"][0]["result"], "connected", "{r}");
    assert_eq!(r["to"]["address"], w2_ip.as_str());

    // Another label change takes w1 out.
    lab.apply(&pod_yaml("w1", "old", "n1"));
    assert_eq!(
        backend_set(&lab.backends("d/client", to, 80, "TCP", 10)),
        set(&["d/w2"])
    );

    // A new pod on a new node: the node, its agent and the pod come up.
    let a = lab.apply(&pod_yaml("w3", "web", "n3"));
    assert_eq!(a["changes"][0]["action"], "created");
    let n3 = find(&a["nodes"], "name", "n3");
    assert_eq!(n3["agent"]["running"], true);
    assert_eq!(n3["agent"]["programmedGeneration"], 5);
    assert_eq!(
        backend_set(&lab.backends("d/client", to, 80, "TCP", 30)),
        set(&["d/w2", "d/w3"])
    );

    // Applying the same object again changes nothing but still completes.
    let a = lab.apply(&pod_yaml("w3", "web", "n3"));
    assert_eq!(a["changes"][0]["action"], "unchanged");
    assert_eq!(a["generation"], 6);

    // delete: the pod goes (namespace included); the last node-n3 pod goes, so does n3.
    let d = lab.delete(&["pod/d/w3"]);
    assert_eq!(d["changes"][0]["action"], "deleted");
    assert!(
        d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["name"] != "n3")
    );
    assert!(
        weir::netns::list_by_prefix(&format!("wl-{}-p-d.w3", lab.name)).is_empty(),
        "pod namespace removed"
    );
    assert!(
        weir::netns::list_by_prefix(&format!("wl-{}-n-n3", lab.name)).is_empty(),
        "node namespace removed"
    );
    assert_eq!(
        backend_set(&lab.backends("d/client", to, 80, "TCP", 10)),
        set(&["d/w2"])
    );

    // No endpoints left: the ClusterIP rejects (docs/upstream-services.md §3.2
    // TestNoEndpointsReject).
    lab.delete(&["Pod/d/w2"]);
    let r = lab.probe("d/client", to, 80, "TCP", 2);
    assert_eq!(r["summary"]["refused"], 2, "{}", r["summary"]);
    // The Service deleted: its address is no longer served at all.
    let vip = strs(&service(&v, "d", "web")["clusterIPs"])[0].clone();
    lab.delete(&["svc/d/web"]);
    let r = lab.probe("d/client", &vip, 80, "TCP", 1);
    assert_eq!(r["summary"]["connected"], 0, "{}", r["summary"]);

    // Mistakes are errors that change nothing.
    let e = lab.try_run("delete", &["pod/d/nope"]).unwrap_err();
    assert!(e.contains("no such Pod d/nope"), "{e}");
    let e = lab.try_run("delete", &["pod/nope"]).unwrap_err();
    assert!(e.contains("KIND/NAMESPACE/NAME"), "{e}");
}

#[test]
fn bad_input_fails_clearly_and_leaves_nothing_behind() {
    support::require_root();
    let lab = TestLab::named();
    let e = lab
        .try_up("kind: Pod\nmetadata: {name: a}\nspec: [\n", &[])
        .unwrap_err();
    assert!(e.contains("invalid YAML"), "{e}");
    let e = lab
        .try_up(
            "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {nodeName: n, containers: []}\nstatus: {podIP: 10.244.0.5}\n---\nkind: Pod\napiVersion: v1\nmetadata: {name: b}\nspec: {nodeName: n, containers: []}\nstatus: {podIP: 10.244.0.5}\n",
            &[],
        )
        .unwrap_err();
    assert!(
        e.contains("Pod default/b: IP 10.244.0.5 is also the IP of pod default/a"),
        "{e}"
    );
    let e = lab
        .try_up(
            "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: []}\n",
            &["--pod-cidr", "10.96.0.0/12"],
        )
        .unwrap_err();
    assert!(e.contains("overlaps"), "{e}");
    assert_eq!(lab.leftovers(), Vec::<String>::new());
    let e = lab_cmd(&["up", "--name", "Bad-Name", "/nonexistent"]).unwrap_err();
    assert!(e.contains("bad lab name"), "{e}");
    let e = lab
        .try_run("probe", &["--from", "x/a", "--to", "x/b", "--port", "1"])
        .unwrap_err();
    assert!(e.contains("there is no lab named"), "{e}");

    // A second `up` of a running lab is refused.
    lab.try_up(
        "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: []}\n",
        &[],
    )
    .unwrap();
    let e = lab
        .try_up(
            "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: []}\n",
            &[],
        )
        .unwrap_err();
    assert!(e.contains("already exists"), "{e}");
}

/// `up` killed at several points (after its first namespace, after its first process,
/// after most of its processes) and its state file lost: `down` still finds every
/// namespace, cgroup, pin directory and process by the lab's names and removes them.
#[test]
fn down_cleans_up_after_a_crashed_up_even_without_its_state_file() {
    support::require_root();
    let namespaces = |s: &Value| s["namespaces"].as_array().map_or(0, |a| a.len());
    let processes = |s: &Value| recorded_processes(s).len();
    type CrashWhen<'a> = &'a dyn Fn(&Value) -> bool;
    let kill_points: [(&str, CrashWhen); 3] = [
        ("first namespace", &|s| namespaces(s) >= 1),
        ("first process", &|s| processes(s) >= 1),
        ("four processes", &|s| processes(s) >= 4),
    ];
    for (what, crash_when) in kill_points {
        let lab = TestLab::named();
        std::fs::create_dir_all(&lab.input).unwrap();
        std::fs::write(lab.input.join("in.yaml"), BALANCE).unwrap();
        let mut child = Command::new(support::lab::weir())
            .args([
                "lab",
                "up",
                "--name",
                &lab.name,
                &lab.input.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let state_file = lab.state_dir().join("state.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reached = std::fs::read_to_string(&state_file)
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .is_some_and(|s| crash_when(&s));
            if reached {
                break;
            }
            assert!(Instant::now() < deadline, "up never reached: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
        // Crash: SIGKILL (by the PID of the child this test started), then lose the
        // state file.
        child.kill().unwrap();
        child.wait().unwrap();
        let procs = recorded_processes(
            &serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap(),
        );
        std::fs::remove_file(&state_file).unwrap();
        assert!(!lab.leftovers().is_empty(), "{what}");

        let st = lab_cmd(&["status", "--name", &lab.name]).unwrap();
        assert!(st["labs"][0]["error"].is_string(), "{what}: {st}");

        let d = lab_cmd(&["down", "--name", &lab.name]).unwrap();
        assert_eq!(
            d["labs"][0]["remaining"].as_array().unwrap().len(),
            0,
            "{what}: {d}"
        );
        assert_eq!(lab.leftovers(), Vec::<String>::new(), "{what}");
        for p in &procs {
            assert!(!p.alive(), "{what}: process {} survived down", p.pid);
        }
    }
}

#[test]
fn matrix_probes_every_pair_at_once() {
    support::require_root();
    let (lab, _) = TestLab::up(EDGES);
    let m = lab.matrix(80, "TCP", false);
    assert_eq!(strs(&m["pods"]), ["p/a", "p/b"]);
    for from in ["p/a", "p/b"] {
        for to in ["p/a", "p/b"] {
            assert_eq!(m["matrix"][from][to], "connected", "{from} -> {to}");
        }
    }
    let m = lab.matrix(80, "UDP", false);
    assert_eq!(m["matrix"]["p/a"]["p/b"], "refused", "p/b serves TCP only");
    assert_eq!(m["matrix"]["p/b"]["p/a"], "connected");
    assert_eq!(m["summary"]["connected"], 2);
    assert_eq!(
        m["table"],
        "UDP/80 p/a p/b\np/a      .   R\np/b      .   R\n"
    );
    // No Service selects these pods.
    let m = lab.matrix(80, "TCP", true);
    assert_eq!(m["matrix"]["p/a"]["p/b"], "noService");
}

/// The README's first command: builds examples/demo, probes, explains, cleans up.
#[test]
fn demo_shows_cluster_ip_balancing_policy_and_cleans_up() {
    support::require_root();
    let lab = TestLab::named();
    let d = lab_cmd(&["demo", "--name", &lab.name]).unwrap();
    assert_eq!(d["cleanedUp"], true, "{d}");
    let steps = d["steps"].as_array().unwrap();
    assert_eq!(
        steps
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "clusterip-balancing",
            "nodeport-from-outside",
            "policy-allows-client",
            "policy-denies-intruder"
        ]
    );
    assert_eq!(steps[0]["matchesExpectation"], true, "{}", steps[0]);
    assert_eq!(steps[2]["matchesExpectation"], true, "{}", steps[2]);
    // NetworkPolicy enforced: the intruder's packets dropped and counted by the datapath.
    assert_eq!(steps[3]["matchesExpectation"], true, "{}", steps[3]);
    assert_eq!(steps[3]["probe"]["connected"], 0, "{}", steps[3]);
    assert!(
        steps[3]["observed"]
            .as_str()
            .unwrap()
            .contains("counted as policy-denied"),
        "{}",
        steps[3]
    );
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

/// Dual stack: pods get an address of each family, a PreferDualStack Service a
/// clusterIP of each, and IPv6 works pod to pod across nodes and through the ClusterIP.
#[test]
fn dual_stack_pods_and_services() {
    support::require_root();
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ds}
spec: {nodeName: n1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: srv, namespace: ds, labels: {app: srv}}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: srv, namespace: ds}
spec:
  ipFamilyPolicy: PreferDualStack
  selector: {app: srv}
  ports: [{port: 80, targetPort: 8080}]
"#;
    let (lab, v) = TestLab::up_with(yaml, &["--pod-cidr", "10.244.0.0/16,fd00:10:244::/56"]);
    assert_eq!(
        strs(&pod(&v, "ds", "srv")["ips"]),
        ["10.244.1.2", "fd00:10:244:1::2"]
    );
    assert_eq!(
        strs(&service(&v, "ds", "srv")["clusterIPs"]),
        ["10.96.0.10", "fd00:10:96::a"]
    );
    let r = lab.run(
        "probe",
        &[
            "--from",
            "ds/client",
            "--to",
            "ds/srv",
            "--port",
            "8080",
            "--family",
            "IPv6",
        ],
    );
    assert_eq!(r["to"]["address"], "fd00:10:244:1::2");
    assert_eq!(r["attempts"][0]["result"], "connected", "{r}");
    assert_eq!(
        r["attempts"][0]["client"],
        "[fd00:10:244::2]:".to_string()
            + r["attempts"][0]["source"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
    );
    let r = lab.run(
        "probe",
        &[
            "--from",
            "ds/client",
            "--to",
            "svc/ds/srv",
            "--port",
            "80",
            "--family",
            "IPv6",
            "--count",
            "3",
        ],
    );
    assert_eq!(r["summary"]["connected"], 3, "{r}");
    assert_eq!(r["attempts"][0]["peer"], "[fd00:10:96::a]:80");
    // IPv6 results: unreachable (the fabric's ICMPv6 no-route), timeout (a blackholed
    // unused pod address), refused (closed port), from pods and from outside.
    for (to, port, proto, want) in [
        ("2001:db8:dead::1", "80", "TCP", "unreachable"),
        ("2001:db8:dead::1", "80", "UDP", "unreachable"),
        ("fd00:10:244:1::99", "80", "TCP", "timeout"),
        ("ds/srv", "8081", "TCP", "refused"),
    ] {
        let r = lab.run(
            "probe",
            &[
                "--from",
                "ds/client",
                "--to",
                to,
                "--port",
                port,
                "--protocol",
                proto,
                "--family",
                "IPv6",
                "--timeout-ms",
                "300",
            ],
        );
        assert_eq!(r["attempts"][0]["result"], want, "{to} {proto}: {r}");
    }
    let r = lab.run(
        "probe",
        &[
            "--from", "external", "--to", "ds/srv", "--port", "8080", "--family", "IPv6",
        ],
    );
    assert_eq!(r["from"]["address"], "2001:db8:113::2");
    assert_eq!(r["attempts"][0]["result"], "connected", "{r}");
    assert!(
        r["attempts"][0]["client"]
            .as_str()
            .unwrap()
            .starts_with("[2001:db8:113::2]:")
    );
}

#[test]
fn dataplane_none_builds_the_topology_without_agents_and_translates_nothing() {
    // The benchmarks' baseline labs: pods, servers and routes as usual, no agent, so a
    // pod reaches pod IPs but a ClusterIP goes nowhere until someone loads rules.
    let (lab, v) = TestLab::up(
        "apiVersion: weir.dev/v1alpha1\nkind: LabConfig\ndataplane: none\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: d}\nspec: {containers: [{name: c}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: d, labels: {app: web}}\n\
         spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: d}\n\
         spec: {clusterIP: 10.96.0.50, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    assert_eq!(v["programmed"], true, "{v}");
    for n in v["nodes"].as_array().unwrap() {
        assert!(n["agent"]["pid"].is_null(), "no agent expected: {n}");
    }
    let st = lab.state();
    assert!(
        st["nodes"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| n["agent"].is_null()),
        "{st}"
    );
    let web = pod(&v, "d", "web")["ips"][0].as_str().unwrap().to_string();
    let direct = lab.probe("d/client", &web, 8080, "TCP", 2);
    assert_eq!(direct["summary"]["connected"], 2, "{direct}");
    let vip = lab.probe("d/client", "svc/d/web", 80, "TCP", 1);
    assert_eq!(vip["summary"]["connected"], 0, "nothing translates: {vip}");
    // apply returns without agents to wait for.
    let a = lab.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web2, namespace: d, labels: {app: web}}\n\
         spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}\n",
    );
    assert_eq!(a["programmed"], true, "{a}");
    let web2 = pod(&a, "d", "web2")["ips"][0].as_str().unwrap().to_string();
    let direct = lab.probe("d/client", &web2, 8080, "TCP", 1);
    assert_eq!(direct["summary"]["connected"], 1, "{direct}");
}

#[test]
fn map_sizes_reach_the_agents() {
    let (_lab, v) = TestLab::up(
        "apiVersion: weir.dev/v1alpha1\nkind: LabConfig\nmapSizes: [SERVICES=131072]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: d, labels: {app: web}}\n\
         spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}\n",
    );
    assert_eq!(v["programmed"], true, "{v}");
    let pid = v["nodes"][0]["agent"]["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let i = args
        .iter()
        .position(|a| a == "--map-size")
        .expect("--map-size passed");
    assert_eq!(args[i + 1], "SERVICES=131072");
    let pins = std::path::PathBuf::from(v["nodes"][0]["agent"]["pinDir"].as_str().unwrap());
    let info = aya::maps::MapInfo::from_pin(pins.join("maps").join("SERVICES")).unwrap();
    assert_eq!(info.max_entries(), 131072);
    let bad = lab_cmd(&[
        "up",
        "--name",
        &support::lab::unique_name(),
        &write_bad_config(),
    ]);
    assert!(
        bad.as_ref().is_err_and(|e| e.contains("mapSizes")),
        "{bad:?}"
    );
}

fn write_bad_config() -> String {
    let dir = std::env::temp_dir().join(format!("weir-lab-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("cfg.yaml");
    std::fs::write(
        &p,
        "apiVersion: weir.dev/v1alpha1\nkind: LabConfig\nmapSizes: [SERVICES]\n",
    )
    .unwrap();
    p.display().to_string()
}
