//! Health: kube-proxy's node health server (`/healthz`, `/livez`, default
//! `0.0.0.0:10256`), the per-Service health check node ports of eTP=Local LoadBalancer
//! Services, and the agent's own readiness.
//!
//! The semantics and bodies are kube-proxy's (docs/upstream-services.md 5.3 and 5.4;
//! kubernetes pkg/proxy/healthcheck/proxy_health.go and service_health.go):
//!
//! - [`ProxyHealth`]: per IP family, healthy unless an update was queued (a Service or
//!   EndpointSlice change arrived) and no sync completed within the health timeout
//!   (kube-proxy: 2 x syncPeriod = 60 s). weir syncs both families in one step, so a
//!   change queues every family the node has and a successful sync updates them all.
//! - `/healthz`: 200 when healthy and the node is eligible (known, not being deleted,
//!   not tainted `ToBeDeletedByClusterAutoscaler`); `/livez`: 200 when healthy. Bodies
//!   are JSON as upstream's `json.Marshal(ProxyHealth)`.
//! - Service health: 200 when the Service has local ready endpoints and the proxy is
//!   healthy, else 503; tab-indented JSON body naming the Service and the count of
//!   distinct local ready endpoint addresses (terminating ones do not count).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper::StatusCode;
use tracing::{info, warn};
use weir_core::model::{Cluster, ObjRef, ServiceType, TrafficPolicy};

use crate::http::{self, Handler};

/// kube-proxy's taint marking a node the cluster autoscaler is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Response counters of the node health server.
#[derive(Debug, Default)]
pub struct HealthCounters {
    pub healthz_200: AtomicU64,
    pub healthz_503: AtomicU64,
    pub livez_200: AtomicU64,
    pub livez_503: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    IPv4,
    IPv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::IPv4 => "IPv4",
            Family::IPv6 => "IPv6",
        }
    }
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::IPv4
        } else {
            Family::IPv6
        }
    }
}

/// kube-proxy's ProxyHealthServer state, with an injectable clock (tests step it).
#[derive(Clone, Debug)]
pub struct ProxyHealth {
    pub timeout: Duration,
    last_updated: BTreeMap<Family, SystemTime>,
    oldest_queued: BTreeMap<Family, SystemTime>,
}

/// What `Health()` returns upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthStatus {
    pub healthy: bool,
    /// Most recent update of any family (the zero time if none).
    pub last_updated: Option<SystemTime>,
    pub families: BTreeMap<Family, (Option<SystemTime>, bool)>,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> ProxyHealth {
        ProxyHealth {
            timeout,
            last_updated: BTreeMap::new(),
            oldest_queued: BTreeMap::new(),
        }
    }

    /// A change for `family` was received (kube-proxy's QueuedUpdate).
    pub fn queued(&mut self, family: Family, now: SystemTime) {
        self.oldest_queued.entry(family).or_insert(now);
    }

    /// `family`'s rules were written (kube-proxy's Updated).
    pub fn updated(&mut self, family: Family, now: SystemTime) {
        self.oldest_queued.remove(&family);
        self.last_updated.insert(family, now);
    }

    /// kube-proxy's `Health()`: only families that have been updated at least once are
    /// judged (a family is healthy while starting up).
    pub fn health(&self, now: SystemTime) -> HealthStatus {
        let mut st = HealthStatus {
            healthy: true,
            last_updated: None,
            families: BTreeMap::new(),
        };
        for (f, lu) in &self.last_updated {
            if st.last_updated.is_none_or(|l| *lu > l) {
                st.last_updated = Some(*lu);
            }
            let late = self
                .oldest_queued
                .get(f)
                .is_some_and(|q| now.duration_since(*q).unwrap_or_default() >= self.timeout);
            if late {
                st.healthy = false;
            }
            st.families.insert(*f, (Some(*lu), !late));
        }
        st
    }
}

/// Go's `time.Time` JSON form (RFC 3339 with nanoseconds, UTC; trailing zeros of the
/// fraction dropped), the zero time for `None`.
pub fn go_time(t: Option<SystemTime>) -> String {
    let Some(t) = t else {
        return "0001-01-01T00:00:00Z".into();
    };
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let nanos = d.subsec_nanos();
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    let frac = if nanos == 0 {
        String::new()
    } else {
        let f = format!(".{nanos:09}");
        f.trim_end_matches('0').to_string()
    };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}{frac}Z")
}

/// The body of `/healthz` (with `node_eligible`) or `/livez` (without), as upstream's
/// `json.Marshal(ProxyHealth)`: lastUpdated, currentTime, nodeEligible (omitempty),
/// healthy, status (omitempty, families sorted).
pub fn health_body(st: &HealthStatus, now: SystemTime, node_eligible: Option<bool>) -> String {
    let healthy = st.healthy && node_eligible.unwrap_or(true);
    // Upstream reports the current time as lastUpdated when healthy (compatibility).
    let last = if healthy { Some(now) } else { st.last_updated };
    let mut s = format!(
        "{{\"lastUpdated\":\"{}\",\"currentTime\":\"{}\"",
        go_time(last),
        go_time(Some(now))
    );
    if let Some(e) = node_eligible {
        s.push_str(&format!(",\"nodeEligible\":{e}"));
    }
    s.push_str(&format!(",\"healthy\":{}", st.healthy));
    if !st.families.is_empty() {
        s.push_str(",\"status\":{");
        let parts: Vec<String> = st
            .families
            .iter()
            .map(|(f, (lu, h))| {
                format!(
                    "\"{}\":{{\"lastUpdated\":\"{}\",\"healthy\":{h}}}",
                    f.name(),
                    go_time(*lu)
                )
            })
            .collect();
        s.push_str(&parts.join(","));
        s.push('}');
    }
    s.push('}');
    s
}

/// kube-proxy's NodeEligible: the Node object is known, has no deletion timestamp and
/// no `ToBeDeletedByClusterAutoscaler` taint.
pub fn node_eligible(cluster: &Cluster, node: &str) -> bool {
    cluster.nodes.get(node).is_some_and(|n| !n.being_deleted)
}

/// State the health servers read.
#[derive(Debug)]
pub struct HealthState {
    pub proxy: Mutex<ProxyHealth>,
    pub node_eligible: Mutex<bool>,
    /// Local ready endpoint counts per served Service, per family.
    pub services: Mutex<BTreeMap<ObjRef, ServiceHealth>>,
    pub counters: Arc<crate::metrics::Shared>,
}

impl HealthState {
    pub fn new(timeout: Duration, counters: Arc<crate::metrics::Shared>) -> HealthState {
        HealthState {
            proxy: Mutex::new(ProxyHealth::new(timeout)),
            node_eligible: Mutex::new(false),
            services: Mutex::new(BTreeMap::new()),
            counters,
        }
    }

    pub fn healthy(&self) -> bool {
        self.proxy
            .lock()
            .expect("lock")
            .health(SystemTime::now())
            .healthy
    }
}

/// One `/healthz` or `/livez` answer: (status, body).
pub fn node_health_response(state: &HealthState, path: &str, now: SystemTime) -> (u16, String) {
    let st = state.proxy.lock().expect("lock").health(now);
    let c = &state.counters.health;
    if path == "/livez" {
        let ok = st.healthy;
        if ok { &c.livez_200 } else { &c.livez_503 }.fetch_add(1, Ordering::Relaxed);
        return (if ok { 200 } else { 503 }, health_body(&st, now, None));
    }
    let eligible = *state.node_eligible.lock().expect("lock");
    let ok = st.healthy && eligible;
    if ok { &c.healthz_200 } else { &c.healthz_503 }.fetch_add(1, Ordering::Relaxed);
    (
        if ok { 200 } else { 503 },
        health_body(&st, now, Some(eligible)),
    )
}

/// The node health server's handler (`/healthz`, `/livez`; anything else is 404, as
/// upstream's ServeMux).
pub fn node_handler(state: Arc<HealthState>) -> Handler {
    Arc::new(move |req| {
        let state = state.clone();
        Box::pin(async move {
            let path = req.uri().path().to_string();
            if path != "/healthz" && path != "/livez" {
                return http::response(
                    StatusCode::NOT_FOUND,
                    "text/plain; charset=utf-8",
                    "404 page not found\n",
                );
            }
            let (code, body) = node_health_response(&state, &path, SystemTime::now());
            let mut r = http::response(
                StatusCode::from_u16(code).expect("status"),
                "application/json",
                body,
            );
            r.headers_mut().insert(
                "X-Content-Type-Options",
                hyper::header::HeaderValue::from_static("nosniff"),
            );
            r
        })
    })
}

/// A Service whose health check node port is served.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceHealth {
    pub port: u16,
    /// Distinct local ready endpoint addresses, per family.
    pub local: BTreeMap<Family, usize>,
}

/// The body of a Service health check (upstream's dedented, tab-indented template; no
/// trailing newline).
pub fn service_body(svc: &ObjRef, count: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        serde_json::to_string(&svc.namespace).expect("string"),
        serde_json::to_string(&svc.name).expect("string"),
    )
}

/// (status, body, count) of a health check of `svc` on a listener of `family`.
pub fn service_response(state: &HealthState, svc: &ObjRef, family: Family) -> (u16, String, usize) {
    let count = state
        .services
        .lock()
        .expect("lock")
        .get(svc)
        .and_then(|h| h.local.get(&family).copied())
        .unwrap_or(0);
    let healthy = state.healthy();
    let code = if count != 0 && healthy { 200 } else { 503 };
    (code, service_body(svc, count, healthy), count)
}

fn service_handler(state: Arc<HealthState>, svc: ObjRef, family: Family) -> Handler {
    Arc::new(move |_req| {
        let (state, svc) = (state.clone(), svc.clone());
        Box::pin(async move {
            let (code, body, count) = service_response(&state, &svc, family);
            let mut r = http::response(
                StatusCode::from_u16(code).expect("status"),
                "application/json",
                body,
            );
            let h = r.headers_mut();
            h.insert(
                "X-Content-Type-Options",
                hyper::header::HeaderValue::from_static("nosniff"),
            );
            h.insert(
                "X-Load-Balancing-Endpoint-Weight",
                hyper::header::HeaderValue::from(count as u64),
            );
            r
        })
    })
}

/// The Services whose health check node port kube-proxy serves (LoadBalancer, eTP
/// Local, `healthCheckNodePort` set; docs/upstream-services.md 1.1), with their counts
/// of distinct local Ready endpoint addresses per family (upstream
/// `LocalReadyEndpoints`: serving-terminating endpoints do not count; a Service without
/// any is still served, with 0).
pub fn desired_services(cluster: &Cluster, node: &str) -> BTreeMap<ObjRef, ServiceHealth> {
    let mut out: BTreeMap<ObjRef, ServiceHealth> = BTreeMap::new();
    for s in cluster.services.values() {
        if s.type_ == ServiceType::LoadBalancer
            && s.external_traffic_policy == TrafficPolicy::Local
            && s.health_check_node_port != 0
            && weir_core::services::is_proxied(s)
        {
            out.insert(
                s.id.clone(),
                ServiceHealth {
                    port: s.health_check_node_port,
                    local: BTreeMap::new(),
                },
            );
        }
    }
    if out.is_empty() {
        return out;
    }
    let mut ips: BTreeMap<ObjRef, BTreeSet<IpAddr>> = BTreeMap::new();
    for sl in cluster.slices.values() {
        let Some(name) = &sl.service else { continue };
        let key = ObjRef::new(sl.id.namespace.clone(), name.clone());
        if !out.contains_key(&key) {
            continue;
        }
        for ep in &sl.endpoints {
            // endpointslicecache.go: ready defaults to true; only the first address.
            let local = ep.node_name.as_deref() == Some(node);
            if !local || !ep.ready.unwrap_or(true) {
                continue;
            }
            if let Some(a) = ep.addresses.first() {
                ips.entry(key.clone()).or_default().insert(*a);
            }
        }
    }
    for (svc, set) in ips {
        if let Some(h) = out.get_mut(&svc) {
            for a in set {
                *h.local.entry(Family::of(&a)).or_default() += 1;
            }
        }
    }
    out
}

/// Runs the per-Service health check servers: started and stopped as Services change,
/// each listening on the node's NodePort addresses (kube-proxy binds the addresses
/// --nodeport-addresses selects).
pub struct ServiceHealthServers {
    state: Arc<HealthState>,
    /// (Service) -> (port, addresses it listens on, the listening task).
    running: BTreeMap<ObjRef, (u16, Vec<IpAddr>, tokio::task::JoinHandle<()>)>,
}

impl ServiceHealthServers {
    pub fn new(state: Arc<HealthState>) -> ServiceHealthServers {
        ServiceHealthServers {
            state,
            running: BTreeMap::new(),
        }
    }

    /// Makes the running servers match `want` on `addrs`.
    pub fn sync(&mut self, want: BTreeMap<ObjRef, ServiceHealth>, addrs: &[IpAddr]) {
        let stale: Vec<ObjRef> = self
            .running
            .iter()
            .filter(|(s, (port, a, _))| {
                want.get(*s).is_none_or(|w| w.port != *port) || a.as_slice() != addrs
            })
            .map(|(s, _)| s.clone())
            .collect();
        for s in stale {
            if let Some((port, _, task)) = self.running.remove(&s) {
                task.abort();
                info!(service = %s, port, "health check node port closed");
            }
        }
        for (svc, h) in &want {
            if self.running.contains_key(svc) || addrs.is_empty() {
                continue;
            }
            let mut listeners = Vec::new();
            for a in addrs {
                match http::bind_tcp(SocketAddr::new(*a, h.port)) {
                    Ok(l) => listeners.push((Family::of(a), l)),
                    Err(e) => warn!(
                        service = %svc,
                        port = h.port,
                        address = %a,
                        "health check node port: {e}; retrying on the next sync"
                    ),
                }
            }
            if listeners.len() != addrs.len() {
                continue;
            }
            let state = self.state.clone();
            let s2 = svc.clone();
            let task = tokio::spawn(async move {
                let mut set = tokio::task::JoinSet::new();
                for (fam, l) in listeners {
                    set.spawn(http::serve_tcp(
                        l,
                        service_handler(state.clone(), s2.clone(), fam),
                    ));
                }
                while set.join_next().await.is_some() {}
            });
            info!(service = %svc, port = h.port, "health check node port open");
            self.running
                .insert(svc.clone(), (h.port, addrs.to_vec(), task));
        }
        *self.state.services.lock().expect("lock") = want;
    }

    /// The Services being served, with their ports.
    pub fn ports(&self) -> BTreeMap<ObjRef, u16> {
        self.running
            .iter()
            .map(|(s, (p, _, _))| (s.clone(), *p))
            .collect()
    }
}

impl Drop for ServiceHealthServers {
    fn drop(&mut self) {
        for (_, (_, _, t)) in std::mem::take(&mut self.running) {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests;
