//! The health endpoints against upstream's bodies, codes and test tables
//! (docs/upstream-services.md 5.3 and 5.4: kubernetes pkg/proxy/healthcheck
//! healthcheck_test.go `TestServer`, `TestHealthzServer`, `TestLivezServer`,
//! `testProxyHealthUpdater`; endpointschangetracker `TestHealthCheckNodePortWhenTerminating`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use weir_core::model::{Cluster, ObjRef};

use super::*;
use crate::{
    http::{Endpoint, get},
    source::{Object, convert, yaml},
};

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn state() -> Arc<HealthState> {
    let shared = Arc::new(crate::metrics::Shared::new(
        None,
        Arc::new(crate::source::kube::KubeCounters::default()),
        10,
    ));
    Arc::new(HealthState::new(secs(60), shared))
}

#[test]
fn go_time_matches_gos_json_form() {
    assert_eq!(go_time(None), "0001-01-01T00:00:00Z");
    assert_eq!(go_time(Some(t0())), "2023-11-14T22:13:20Z");
    assert_eq!(
        go_time(Some(t0() + Duration::from_nanos(120_000_000))),
        "2023-11-14T22:13:20.12Z"
    );
    assert_eq!(
        go_time(Some(SystemTime::UNIX_EPOCH + secs(951_782_400))),
        "2000-02-29T00:00:00Z"
    );
}

/// testProxyHealthUpdater with a 10 s timeout: the steps and statuses of upstream's table.
#[test]
fn proxy_health_follows_upstreams_updater_sequence() {
    use Family::*;
    let mut h = ProxyHealth::new(secs(10));
    let mut now = t0();
    let healthy = |h: &ProxyHealth, now| h.health(now).healthy;
    // Start, nothing synced.
    assert!(healthy(&h, now));
    assert!(h.health(now).families.is_empty());
    // Both families synced.
    h.updated(IPv4, now);
    h.updated(IPv6, now);
    assert!(healthy(&h, now));
    // +25 s, nothing queued.
    now += secs(25);
    assert!(healthy(&h, now));
    // IPv4 queued, +25 s: IPv4 unhealthy, IPv6 healthy.
    h.queued(IPv4, now);
    now += secs(25);
    let st = h.health(now);
    assert!(!st.healthy);
    assert!(!st.families[&IPv4].1);
    assert!(st.families[&IPv6].1);
    // Both synced, +5 s.
    h.updated(IPv4, now);
    h.updated(IPv6, now);
    now += secs(5);
    assert!(healthy(&h, now));
    // IPv6 queued, +25 s.
    h.queued(IPv6, now);
    now += secs(25);
    assert!(!healthy(&h, now));
    // Both queued, +25 s: both unhealthy.
    h.updated(IPv6, now);
    h.queued(IPv4, now);
    h.queued(IPv6, now);
    now += secs(25);
    let st = h.health(now);
    assert!(!st.families[&IPv4].1 && !st.families[&IPv6].1);
    // IPv6 late, IPv4 syncs: still unhealthy until IPv6 syncs.
    h.updated(IPv4, now);
    assert!(!healthy(&h, now));
    h.updated(IPv6, now);
    assert!(healthy(&h, now));
    // A queued update that is not late yet is healthy.
    h.queued(IPv4, now);
    assert!(healthy(&h, now + secs(9)));
    assert!(!healthy(&h, now + secs(10)));
}

#[test]
fn health_bodies_are_upstreams_json() {
    let mut h = ProxyHealth::new(secs(10));
    let now = t0();
    h.updated(Family::IPv4, now - secs(3));
    let st = h.health(now);
    assert_eq!(
        health_body(&st, now, Some(true)),
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"2023-11-14T22:13:17Z","healthy":true}}}"#
    );
    // /livez has no nodeEligible; before any sync there is no status.
    let st = ProxyHealth::new(secs(10)).health(now);
    assert_eq!(
        health_body(&st, now, None),
        r#"{"lastUpdated":"2023-11-14T22:13:20Z","currentTime":"2023-11-14T22:13:20Z","healthy":true}"#
    );
    // Unhealthy: lastUpdated is the last successful update, not now.
    h.queued(Family::IPv4, now);
    let later = now + secs(11);
    let st = h.health(later);
    let b = health_body(&st, later, Some(true));
    assert!(
        b.starts_with(r#"{"lastUpdated":"2023-11-14T22:13:17Z","currentTime":"2023-11-14T22:13:31Z","nodeEligible":true,"healthy":false"#),
        "{b}"
    );
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["status"]["IPv4"]["healthy"], false);
}

fn node(yaml_text: &str) -> weir_core::model::Node {
    let (mut objs, errs) = yaml::parse_documents(yaml_text, "t");
    assert!(errs.is_empty(), "{errs:?}");
    match objs.remove(0) {
        Object::Node(n) => convert::node(&n).unwrap(),
        _ => unreachable!(),
    }
}

/// TestHealthzServer / TestLivezServer node cases, through the conversion of real Node
/// objects.
#[test]
fn node_eligibility_follows_taints_and_deletion() {
    let s = state();
    s.proxy
        .lock()
        .unwrap()
        .updated(Family::IPv4, SystemTime::now());
    let mut c = Cluster::default();
    let now = SystemTime::now();
    let check = |c: &Cluster, healthz: u16, eligible: bool| {
        *s.node_eligible.lock().unwrap() = node_eligible(c, "n1");
        let (code, body) = node_health_response(&s, "/healthz", now);
        assert_eq!(code, healthz, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["nodeEligible"], eligible);
        assert_eq!(v["healthy"], true);
        let (code, body) = node_health_response(&s, "/livez", now);
        assert_eq!(code, 200, "livez ignores the node: {body}");
        assert!(!body.contains("nodeEligible"));
    };
    // Unknown node: not eligible.
    check(&c, 503, false);
    c.nodes.insert(
        "n1".into(),
        node("kind: Node\nmetadata: {name: n1}\nspec: {taints: [{key: other, effect: NoSchedule}]}\n"),
    );
    check(&c, 200, true);
    c.nodes.insert(
        "n1".into(),
        node("kind: Node\nmetadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\n"),
    );
    check(&c, 503, false);
    c.nodes.insert(
        "n1".into(),
        node("kind: Node\nmetadata: {name: n1, deletionTimestamp: '2024-01-01T00:00:00Z'}\n"),
    );
    check(&c, 503, false);
    let h = &s.counters.health;
    assert_eq!(h.healthz_200.load(Ordering::Relaxed), 1);
    assert_eq!(h.healthz_503.load(Ordering::Relaxed), 3);
    assert_eq!(h.livez_200.load(Ordering::Relaxed), 4);
}

#[test]
fn service_body_is_upstreams_template() {
    assert_eq!(
        service_body(&ObjRef::new("a", "b"), 18, true),
        "{\n\t\"service\": {\n\t\t\"namespace\": \"a\",\n\t\t\"name\": \"b\"\n\t},\n\t\"localEndpoints\": 18,\n\t\"serviceProxyHealthy\": true\n}"
    );
}

fn cluster(yaml_text: &str) -> Cluster {
    let mut store = crate::source::store::Store::new();
    let id = store.register("t", &crate::source::Kind::ALL);
    let (objs, errs) = yaml::parse_documents(yaml_text, "t");
    assert!(errs.is_empty(), "{errs:?}");
    for o in objs {
        store.apply(crate::source::SourceEvent {
            source: id,
            event: crate::source::Event::Apply(o),
        });
    }
    store.cluster().clone()
}

const LB_LOCAL: &str = "kind: Service
metadata: {name: svc1, namespace: ns1}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.1
  externalTrafficPolicy: Local
  healthCheckNodePort: PORT
  ports: [{name: p80, port: 80, nodePort: 30080}, {name: p443, port: 443, nodePort: 30443}]
";

fn slice(eps: &str) -> String {
    format!(
        "---\nkind: EndpointSlice\nmetadata: {{name: svc1-a, namespace: ns1, labels: {{kubernetes.io/service-name: svc1}}}}\naddressType: IPv4\nports: [{{name: p80, port: 80}}, {{name: p443, port: 443}}]\nendpoints: {eps}\n"
    )
}

/// TestHealthCheckNodePortWhenTerminating and the Service selection rules.
#[test]
fn local_ready_endpoints_are_counted_per_service() {
    let eps = "[{addresses: [10.0.1.1], nodeName: n1}, {addresses: [10.0.1.2], nodeName: n1}, {addresses: [10.0.1.3], nodeName: n1}, {addresses: [10.0.1.4], nodeName: n1, conditions: {ready: false}}, {addresses: [10.0.1.5], nodeName: n2}]";
    let c = cluster(&(LB_LOCAL.replace("PORT", "30000") + &slice(eps)));
    let d = desired_services(&c, "n1");
    // Two ports of the same three addresses count once each.
    assert_eq!(d[&ObjRef::new("ns1", "svc1")].local[&Family::IPv4], 3);
    assert_eq!(d[&ObjRef::new("ns1", "svc1")].port, 30000);

    // Only serving-terminating (and not-ready) local endpoints: served, with 0.
    let eps = "[{addresses: [10.0.1.1], nodeName: n1, conditions: {ready: false, serving: true, terminating: false}}, {addresses: [10.0.1.2], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.0.1.3], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.0.1.4], nodeName: n1, conditions: {ready: false, serving: false, terminating: true}}]";
    let c = cluster(&(LB_LOCAL.replace("PORT", "30000") + &slice(eps)));
    let d = desired_services(&c, "n1");
    assert!(d[&ObjRef::new("ns1", "svc1")].local.is_empty());

    // Not served: eTP Cluster, not a LoadBalancer, no port.
    for y in [
        LB_LOCAL
            .replace("PORT", "30000")
            .replace("Local", "Cluster"),
        LB_LOCAL
            .replace("PORT", "30000")
            .replace("type: LoadBalancer", "type: NodePort"),
        LB_LOCAL.replace("  healthCheckNodePort: PORT\n", ""),
    ] {
        assert!(desired_services(&cluster(&y), "n1").is_empty(), "{y}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn fetch(addr: SocketAddr, path: &str) -> crate::http::Reply {
    let p = path.to_string();
    tokio::task::spawn_blocking(move || get(&Endpoint::Tcp(addr), &p, &[]).unwrap())
        .await
        .unwrap()
}

/// TestServer's sequence, over real sockets: 503/0 without endpoints, 200 with the count,
/// 503 again at 0, closed when the Service goes, reopened on a new port, 503 for all when
/// the proxy is unhealthy, and a Service whose only local endpoints are terminating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_health_servers_follow_upstreams_test_server() {
    let s = state();
    let mut srv = ServiceHealthServers::new(s.clone());
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let (p1, p2) = (free_port(), free_port());
    let svc = ObjRef::new("ns1", "svc1");

    // Synced, no endpoints.
    let c = cluster(&LB_LOCAL.replace("PORT", &p1.to_string()));
    srv.sync(desired_services(&c, "n1"), &[lo]);
    let addr = SocketAddr::new(lo, p1);
    let r = fetch(addr, "/any/path").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, service_body(&svc, 0, true));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("0"));

    // Local ready endpoints.
    let eps = "[{addresses: [10.0.1.1], nodeName: n1}, {addresses: [10.0.1.2], nodeName: n1}]";
    let c = cluster(&(LB_LOCAL.replace("PORT", &p1.to_string()) + &slice(eps)));
    srv.sync(desired_services(&c, "n1"), &[lo]);
    let r = fetch(addr, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, service_body(&svc, 2, true));
    assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("2"));

    // The proxy is unhealthy: 503 even with endpoints, serviceProxyHealthy false.
    {
        let mut h = s.proxy.lock().unwrap();
        h.updated(Family::IPv4, SystemTime::now() - secs(3600));
        h.queued(Family::IPv4, SystemTime::now() - secs(3600));
    }
    let r = fetch(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, service_body(&svc, 2, false));
    s.proxy
        .lock()
        .unwrap()
        .updated(Family::IPv4, SystemTime::now());

    // Only terminating local endpoints remain: 503 with 0.
    let eps = "[{addresses: [10.0.1.1], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}]";
    let c = cluster(&(LB_LOCAL.replace("PORT", &p1.to_string()) + &slice(eps)));
    srv.sync(desired_services(&c, "n1"), &[lo]);
    let r = fetch(addr, "/").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, service_body(&svc, 0, true));

    // Port changed: the old port closes, the new one answers (count reset).
    let c = cluster(&LB_LOCAL.replace("PORT", &p2.to_string()));
    srv.sync(desired_services(&c, "n1"), &[lo]);
    assert_eq!(srv.ports()[&svc], p2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = fetch(SocketAddr::new(lo, p2), "/").await;
    assert_eq!(r.status, 503);
    let gone = tokio::task::spawn_blocking(move || get(&Endpoint::Tcp(addr), "/", &[]))
        .await
        .unwrap();
    assert!(gone.is_err(), "the old port is closed");

    // Service deleted: closed.
    srv.sync(desired_services(&Cluster::default(), "n1"), &[lo]);
    assert!(srv.ports().is_empty());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let a2 = SocketAddr::new(lo, p2);
    let gone = tokio::task::spawn_blocking(move || get(&Endpoint::Tcp(a2), "/", &[]))
        .await
        .unwrap();
    assert!(gone.is_err());
}

/// The node health server over a real socket: paths, codes, headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_health_server_answers_healthz_and_livez() {
    let s = state();
    let l = crate::http::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(crate::http::serve_tcp(l, node_handler(s.clone())));
    // No Node object yet: /healthz 503 (not eligible), /livez 200.
    let r = fetch(addr, "/healthz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["nodeEligible"], false);
    assert_eq!(fetch(addr, "/livez").await.status, 200);
    *s.node_eligible.lock().unwrap() = true;
    assert_eq!(fetch(addr, "/healthz").await.status, 200);
    assert_eq!(fetch(addr, "/other").await.status, 404);
    task.abort();
}
