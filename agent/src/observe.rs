//! Wiring of the agent's observability: the HTTP servers (metrics and API, kube-proxy's
//! node health, the per-Service health check ports), the flow event reader, the
//! conntrack scan, and [`Observer`], the sync-loop hook that keeps them current.
//!
//! ```text
//!  --metrics-addr (TCP, default 127.0.0.1:9964) ─┐
//!  --api-socket   (unix, /run/weir/<instance>.sock) ┴─ /metrics /healthz /readyz /flows
//!  --health-addr  (TCP, default 0.0.0.0:10256)   ── /healthz /livez  (kube-proxy's)
//!  healthCheckNodePort of eTP=Local LB Services   ── any path, on the NodePort addresses
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use hyper::{StatusCode, header::ACCEPT};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use weir_common::Addr;
use weir_core::model::ObjRef;

use crate::{
    agent::{Hooks, Observation},
    flows::{FlowHub, FlowLog},
    health::{self, Family, HealthState, ServiceHealthServers},
    http::{self, Handler},
    metrics::{KernelCounters, Metrics, Shared, kernel::AyaKernelCounters},
    source::store::Store,
};

/// Observability options (flags in `config.rs`).
#[derive(Clone, Debug)]
pub struct ObserveConfig {
    /// `/metrics`, `/healthz`, `/readyz`, `/flows` over TCP (None: off).
    pub metrics_addr: Option<SocketAddr>,
    /// The same over a unix socket (what `weir flows` connects to; None: off).
    pub api_socket: Option<PathBuf>,
    /// kube-proxy's node health server (None: off).
    pub health_addr: Option<SocketAddr>,
    /// Service ports with their own series; the rest are summed into `other`.
    pub service_limit: usize,
    /// How often the conntrack map is counted.
    pub ct_scan: Duration,
    /// kube-proxy's health timeout (2 x syncPeriod).
    pub healthz_timeout: Duration,
    /// Serve the health check node ports of eTP=Local LoadBalancer Services.
    pub service_health: bool,
    pub flow_log: bool,
}

impl Default for ObserveConfig {
    fn default() -> Self {
        ObserveConfig {
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))),
            api_socket: None,
            health_addr: Some(SocketAddr::from(([0, 0, 0, 0], 10256))),
            service_limit: 1000,
            ct_scan: Duration::from_secs(5),
            healthz_timeout: Duration::from_secs(60),
            service_health: true,
            flow_log: false,
        }
    }
}

/// Default metrics port: not kube-proxy's 10249, so both can run side by side while a
/// cluster migrates, and next to Cilium's 9962/9963/9965 family of ports.
pub const DEFAULT_METRICS_PORT: u16 = 9964;

/// The API socket of the instance whose pin directory is `pin_dir`.
pub fn default_api_socket(pin_dir: &std::path::Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weir".into());
    PathBuf::from("/run/weir").join(format!("{name}.sock"))
}

/// What `/readyz` answers from.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// Source kinds still waiting for their initial list ("source/Kind").
    pub waiting_for: Vec<String>,
    pub listed: bool,
    pub attached: bool,
    /// The last sync after every source listed applied without error.
    pub programmed: bool,
    pub last_error: Option<String>,
    /// Last tick of the sync loop (liveness).
    pub heartbeat: Instant,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            waiting_for: vec!["sources".into()],
            listed: false,
            attached: false,
            programmed: false,
            last_error: None,
            heartbeat: Instant::now(),
        }
    }
}

impl Readiness {
    pub fn ready(&self) -> bool {
        self.listed && self.attached && self.programmed
    }

    /// Why the agent is not ready, one line each.
    pub fn reasons(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.listed {
            v.push(format!(
                "waiting for the initial list of: {}",
                self.waiting_for.join(", ")
            ));
        }
        if !self.attached {
            v.push("datapath not attached yet".into());
        }
        if !self.programmed {
            match &self.last_error {
                Some(e) => v.push(format!("last sync failed: {e}")),
                None => v.push("not programmed yet".into()),
            }
        }
        v
    }
}

/// Longest a sync loop may go without a tick before `/healthz` fails.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything the servers share.
pub struct Observability {
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    pub health: Arc<HealthState>,
    pub hub: Arc<FlowHub>,
    pub ready: Arc<Mutex<Readiness>>,
    pub cfg: ObserveConfig,
    tasks: Vec<JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl Drop for Observability {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Observability {
    pub fn new(
        cfg: ObserveConfig,
        kernel: Option<Box<dyn KernelCounters>>,
        kube: Arc<crate::source::kube::KubeCounters>,
    ) -> Observability {
        let shared = Arc::new(Shared::new(kernel, kube, cfg.service_limit));
        let metrics = Arc::new(Metrics::new(shared.clone()));
        let health = Arc::new(HealthState::new(cfg.healthz_timeout, shared.clone()));
        Observability {
            metrics,
            shared,
            health,
            hub: Arc::new(FlowHub::default()),
            ready: Arc::new(Mutex::new(Readiness::default())),
            cfg,
            tasks: Vec::new(),
            socket: None,
        }
    }

    /// The handler of the metrics address and the API socket.
    pub fn handler(&self) -> Handler {
        let (metrics, ready, hub) = (self.metrics.clone(), self.ready.clone(), self.hub.clone());
        Arc::new(move |req| {
            let (metrics, ready, hub) = (metrics.clone(), ready.clone(), hub.clone());
            Box::pin(async move {
                match req.uri().path() {
                    "/metrics" => {
                        let accept = req
                            .headers()
                            .get(ACCEPT)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        // Reading the per-CPU maps is a few syscalls per entry: off the
                        // async workers.
                        let m = metrics.clone();
                        let (ct, body) =
                            tokio::task::spawn_blocking(move || m.render(accept.as_deref()))
                                .await
                                .unwrap_or_else(|_| ("text/plain".into(), String::new()));
                        http::response(StatusCode::OK, &ct, body)
                    }
                    "/healthz" => {
                        let age = ready.lock().expect("lock").heartbeat.elapsed();
                        if age > LIVENESS_TIMEOUT {
                            http::response(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain; charset=utf-8",
                                format!("sync loop stalled for {}s\n", age.as_secs()),
                            )
                        } else {
                            http::response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
                        }
                    }
                    "/readyz" => {
                        let r = ready.lock().expect("lock").clone();
                        if r.ready() {
                            http::response(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
                        } else {
                            http::response(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain; charset=utf-8",
                                r.reasons().join("\n") + "\n",
                            )
                        }
                    }
                    "/flows" => crate::flows::handle(&hub, &req),
                    _ => http::response(
                        StatusCode::NOT_FOUND,
                        "text/plain; charset=utf-8",
                        "not found; try /metrics, /healthz, /readyz or /flows\n",
                    ),
                }
            })
        })
    }

    /// Starts the servers (binding failures are logged and retried: the datapath must be
    /// programmed even if a port is taken).
    pub fn start_servers(&mut self) {
        if let Some(addr) = self.cfg.metrics_addr {
            let h = self.handler();
            self.tasks
                .push(tokio::spawn(serve_retrying(addr, h, "metrics")));
        }
        if let Some(addr) = self.cfg.health_addr {
            let h = health::node_handler(self.health.clone());
            self.tasks
                .push(tokio::spawn(serve_retrying(addr, h, "node health")));
        }
        if let Some(path) = self.cfg.api_socket.clone() {
            match http::bind_unix(&path) {
                Ok(l) => {
                    info!(socket = %path.display(), "API socket (metrics, readiness, flows)");
                    self.tasks
                        .push(tokio::spawn(http::serve_unix(l, self.handler())));
                    self.socket = Some(path);
                }
                Err(e) => warn!("API socket: {e:#}; `weir flows` cannot reach this agent"),
            }
        }
    }

    /// Counts the conntrack map every `ct_scan` (kernel-written maps cannot be counted
    /// from the syncer's image).
    pub fn start_ct_scan(&mut self, pin_dir: PathBuf) {
        let shared = self.shared.clone();
        let every = self.cfg.ct_scan;
        self.tasks.push(tokio::spawn(async move {
            loop {
                let p = pin_dir.clone();
                let started = Instant::now();
                match tokio::task::spawn_blocking(move || crate::metrics::kernel::scan_ct(&p)).await
                {
                    Ok(Ok(c)) => {
                        debug!(
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "conntrack scanned"
                        );
                        *shared.ct.lock().expect("lock") = c;
                    }
                    Ok(Err(e)) => debug!("conntrack scan: {e:#}"),
                    Err(_) => {}
                }
                tokio::time::sleep(scan_pause(every, started.elapsed())).await;
            }
        }));
    }

    /// Reads flow events from the datapath's ring.
    pub fn start_events(&mut self, ring: aya::maps::RingBuf<aya::maps::MapData>) {
        let (hub, shared) = (self.hub.clone(), self.shared.clone());
        let opts = FlowLog {
            log: self.cfg.flow_log,
        };
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::flows::read_events(ring, hub, shared, opts).await {
                warn!("flow events: {e:#}");
            }
        }));
    }

    /// Forwards the kernel side's aya-log records to tracing.
    pub fn start_kernel_log(&mut self, logger: crate::datapath::KernelLogger) {
        self.tasks.push(tokio::spawn(async move {
            // SAFETY: the logger owns its ring buffer's fd for its whole life.
            let Ok(mut fd) = (unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    logger,
                    tokio::io::Interest::READABLE,
                )
            }) else {
                return;
            };
            loop {
                let Ok(mut g) = fd.readable_mut().await else {
                    return;
                };
                g.get_inner_mut().flush();
                g.clear_ready();
            }
        }));
    }
}

async fn serve_retrying(addr: SocketAddr, h: Handler, what: &'static str) {
    let mut warned = false;
    loop {
        match http::bind_tcp(addr) {
            Ok(l) => {
                info!(%addr, "{what} server listening");
                http::serve_tcp(l, h).await;
                return;
            }
            Err(e) => {
                if !warned {
                    warn!(%addr, "{what} server: {e}; retrying every 5s");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// The sync-loop hook that keeps metrics, health and readiness current.
pub struct Observer {
    pub shared: Arc<Shared>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<HealthState>,
    pub ready: Arc<Mutex<Readiness>>,
    node_name: String,
    capacities: BTreeMap<&'static str, u32>,
    families: Vec<Family>,
    services: Option<ServiceHealthServers>,
    kernel_gc: Option<Arc<AyaKernelCounters>>,
    swept: bool,
    first: bool,
}

impl Observer {
    pub fn new(
        obs: &Observability,
        node_name: &str,
        capacities: BTreeMap<&'static str, u32>,
        kernel_gc: Option<Arc<AyaKernelCounters>>,
    ) -> Observer {
        Observer {
            shared: obs.shared.clone(),
            metrics: obs.metrics.clone(),
            health: obs.health.clone(),
            ready: obs.ready.clone(),
            node_name: node_name.to_string(),
            capacities,
            families: vec![Family::IPv4],
            services: obs
                .cfg
                .service_health
                .then(|| ServiceHealthServers::new(obs.health.clone())),
            kernel_gc,
            swept: false,
            first: true,
        }
    }

    /// The datapath is attached (the first interface scan ran).
    pub fn attached(&self) {
        self.ready.lock().expect("lock").attached = true;
    }

    /// Health check node ports served now (tests).
    pub fn health_ports(&self) -> BTreeMap<ObjRef, u16> {
        self.services
            .as_ref()
            .map(|s| s.ports())
            .unwrap_or_default()
    }
}

impl Hooks for Observer {
    fn housekeeping(&mut self) {
        self.ready.lock().expect("lock").heartbeat = Instant::now();
    }

    fn events_applied(&mut self, store: &Store) {
        // kube-proxy queues an update per family on Service and EndpointSlice events.
        let ch = store.changes();
        if !ch.services.is_empty() || !ch.slices.is_empty() {
            let now = SystemTime::now();
            let mut h = self.health.proxy.lock().expect("lock");
            for f in &self.families {
                h.queued(*f, now);
            }
        }
    }

    fn observe(&mut self, o: &Observation<'_>) {
        let ok = o.report.apply_error.is_none();
        let store = o.store;
        let cluster = store.cluster();
        let current = o.syncer.current();

        // Families this node runs (its NodePort addresses; IPv4 if none is known).
        let mut fam: BTreeSet<Family> = current
            .node_addrs
            .keys()
            .map(|a| Family::of(&a.to_ip()))
            .collect();
        if fam.is_empty() {
            fam.insert(Family::IPv4);
        }
        self.families = fam.into_iter().collect();

        // Histograms.
        if ok {
            for (kind, t) in o.change_times {
                self.metrics
                    .hist
                    .programming
                    .get_or_create(&[("kind", kind.name())])
                    .observe(o.finished.saturating_duration_since(*t).as_secs_f64());
            }
        }
        // kube-proxy's definition: from the slice's trigger time, for each slice version
        // this sync programmed. Not on a sync that recomputed everything (start, settings
        // change): old annotations there say when the slice last changed, not how long
        // programming took.
        if ok && !o.changes.all {
            let now_ns = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            for id in &o.changes.slices {
                if let Some(t) = cluster.slices.get(id).and_then(|s| s.trigger_time_unix_ns) {
                    self.metrics
                        .hist
                        .trigger
                        .observe(now_ns.saturating_sub(t).max(0) as f64 / 1e9);
                }
            }
        }
        self.metrics.hist.sync.observe(
            o.finished
                .saturating_duration_since(o.started)
                .as_secs_f64(),
        );

        // Service labels: the Services this sync touched (all of them on a full sync).
        {
            let mut labels = self.shared.services.lock().expect("lock");
            let touched: Vec<ObjRef> = if self.first || o.report.full || o.changes.all {
                let mut all: BTreeSet<ObjRef> = cluster.services.keys().cloned().collect();
                all.extend(
                    labels
                        .by_id
                        .values()
                        .map(|l| ObjRef::new(l.namespace.clone(), l.name.clone())),
                );
                all.into_iter().collect()
            } else {
                let mut v: BTreeSet<ObjRef> = o.changes.services.iter().cloned().collect();
                v.extend(o.report.refused.iter().map(|r| r.service.clone()));
                v.extend(o.report.admitted.iter().cloned());
                v.into_iter().collect()
            };
            for svc in &touched {
                labels.update(svc, o.syncer.pipeline().service_image(svc));
            }
            if let Some(k) = &self.kernel_gc {
                let gone = labels.collectable(|id| current.rev_nat.contains_key(&id));
                if !gone.is_empty() {
                    k.forget_services(&gone);
                }
                if !self.swept && o.syncer.deletes_allowed() && ok {
                    // After a restart: counters of Service ports deleted while no agent ran.
                    let n = k.retain_services(|id| {
                        labels.by_id.contains_key(&id) || current.rev_nat.contains_key(&id)
                    });
                    if n > 0 {
                        debug!(n, "removed counters of Service ports that no longer exist");
                    }
                    self.swept = true;
                }
            }
        }

        // Health: kube-proxy's Updated per family; node eligibility.
        if ok {
            let now = SystemTime::now();
            let mut h = self.health.proxy.lock().expect("lock");
            for f in &self.families {
                h.updated(*f, now);
            }
        }
        *self.health.node_eligible.lock().expect("lock") =
            health::node_eligible(cluster, &self.node_name);

        // Health check node ports.
        let ch = o.changes;
        if let Some(srv) = &mut self.services
            && (self.first
                || ch.all
                || !ch.services.is_empty()
                || !ch.slices.is_empty()
                || !ch.nodes.is_empty()
                || o.report.full)
        {
            let addrs: Vec<IpAddr> = current
                .node_addrs
                .keys()
                .filter(|a| **a != Addr::V4_ANY && **a != Addr::V6_ANY && **a != Addr::ZERO)
                .map(|a| a.to_ip())
                .collect();
            srv.sync(health::desired_services(cluster, &self.node_name), &addrs);
        }

        // Readiness.
        {
            let mut r = self.ready.lock().expect("lock");
            r.listed = store.synced();
            r.waiting_for = store.waiting_for();
            if ok {
                r.last_error = None;
                if r.listed && o.syncer.deletes_allowed() {
                    r.programmed = true;
                }
            } else {
                r.programmed = false;
                r.last_error = o.report.apply_error.as_ref().map(|e| e.to_string());
            }
        }

        // The snapshot scrapes read.
        {
            let mut s = self.shared.snapshot.lock().expect("lock");
            s.sync = o.syncer.counters.clone();
            s.store = store.counters.clone();
            s.objects = store
                .counts()
                .into_iter()
                .map(|(k, n)| (k.name(), n))
                .collect();
            for k in crate::source::Kind::ALL {
                s.objects.entry(k.name()).or_insert(0);
            }
            s.invalid = store
                .invalid_by_kind()
                .into_iter()
                .map(|(k, n)| (k.name(), n))
                .collect();
            s.map_entries = current.counts();
            s.capacities = self.capacities.clone();
            if ok {
                s.last_sync_unix = Some(
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs_f64(),
                );
            }
            s.ready = self.ready.lock().expect("lock").ready();
        }
        self.first = false;
    }
}

/// The pause after a map walk that took `took`: the configured interval, but at least
/// nine times the walk, so walking a full map (one syscall per key: ~1 s at 262k
/// conntrack entries) costs at most a tenth of a core however short the interval.
pub fn scan_pause(every: Duration, took: Duration) -> Duration {
    every.max(took.saturating_mul(9))
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;
    use weir_core::{datapath::FakeDatapath, image::MapImage};

    use super::*;
    use crate::{
        agent::{LoopConfig, run_loop},
        source::{Event, Kind, Object, SourceEvent, yaml},
        testing::shared::SharedFake,
    };

    fn svc(name: &str, i: u32) -> Object {
        let y = format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 10.96.0.{}, ports: [{{port: 80}}]}}\n",
            i + 1
        );
        yaml::parse_documents(&y, "t").0.remove(0)
    }

    #[test]
    fn a_long_scan_waits_nine_times_as_long() {
        let ms = Duration::from_millis;
        assert_eq!(scan_pause(ms(5000), ms(20)), ms(5000));
        assert_eq!(scan_pause(ms(5000), ms(1500)), ms(13500));
    }

    /// An EndpointSlice of Service `svc` whose trigger time is `ago` before now.
    fn slice(svc: &str, ip: &str, ago: Duration) -> Object {
        let t = jiff::Timestamp::try_from(SystemTime::now() - ago).unwrap();
        let y = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: t, labels: {{kubernetes.io/service-name: {svc}}}, annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{t}'}}}}\naddressType: IPv4\nports: [{{name: '', port: 8080}}]\nendpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]\n"
        );
        let (mut objs, errs) = yaml::parse_documents(&y, "t");
        assert!(errs.is_empty(), "{errs:?}");
        objs.remove(0)
    }

    /// The value of the sample line starting with `prefix` (labels included).
    fn value(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The Observer as the sync loop's hook, over the fake datapath: readiness follows
    /// the sources' lists, and every sync updates the programming latency histogram (one
    /// observation per changed object), the sync histogram, objects, map entries and
    /// capacities.
    #[tokio::test(start_paused = true)]
    async fn the_observer_follows_the_sync_loop() {
        let cfg = ObserveConfig {
            metrics_addr: None,
            api_socket: None,
            health_addr: None,
            service_health: false,
            ..Default::default()
        };
        let obs = Observability::new(
            cfg,
            None,
            Arc::new(crate::source::kube::KubeCounters::default()),
        );
        let fake = SharedFake::new(FakeDatapath::default());
        let caps = crate::datapath::effective_capacities(&Default::default());
        let mut observer = Observer::new(&obs, "n1", caps, None);
        observer.attached();
        let (metrics, ready) = (obs.metrics.clone(), obs.ready.clone());
        let scrape = || metrics.render(None).1;

        let mut store = Store::new();
        store.register("test", &[Kind::Service, Kind::EndpointSlice]);
        let (tx, rx) = mpsc::channel(64);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let loop_cfg = LoopConfig {
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            housekeeping: Duration::from_secs(3600),
            ..Default::default()
        };
        let mut dp = fake.clone();
        let task = tokio::spawn(async move {
            run_loop(
                loop_cfg,
                store,
                rx,
                &mut dp,
                MapImage::default(),
                &mut observer,
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        let send = |event| {
            let tx = tx.clone();
            async move { tx.send(SourceEvent { source: 0, event }).await.unwrap() }
        };

        assert!(!ready.lock().unwrap().ready());
        assert_eq!(value(&scrape(), "weir_ready "), Some(0.0));

        send(Event::Init(Kind::Service)).await;
        send(Event::InitApply(svc("a", 0))).await;
        send(Event::InitDone(Kind::Service)).await;
        send(Event::Init(Kind::EndpointSlice)).await;
        send(Event::InitDone(Kind::EndpointSlice)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = scrape();
        assert!(
            ready.lock().unwrap().ready(),
            "{:?}",
            ready.lock().unwrap().reasons()
        );
        assert_eq!(value(&t, "weir_ready "), Some(1.0));
        assert_eq!(value(&t, "weir_objects{kind=\"Service\"}"), Some(1.0));
        assert_eq!(value(&t, "weir_syncs_total "), Some(1.0));
        assert_eq!(
            value(
                &t,
                "weir_network_programming_duration_seconds_count{kind=\"Service\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "weir_sync_proxy_rules_duration_seconds_count "),
            Some(1.0)
        );
        let services = value(&t, "weir_map_entries{map=\"SERVICES\"}").unwrap();
        assert_eq!(services as usize, fake.image().services.len());
        assert!(services > 0.0);
        assert_eq!(
            value(&t, "weir_map_max_entries{map=\"SERVICES\"}"),
            Some(f64::from(
                crate::datapath::effective_capacities(&Default::default())
                    [weir_common::maps::SERVICES]
            ))
        );
        assert!(value(&t, "weir_last_sync_timestamp_seconds ").unwrap() > 1.7e9);

        // Two more Services in one burst: one sync, two programming observations.
        send(Event::Apply(svc("b", 1))).await;
        send(Event::Apply(svc("c", 2))).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = scrape();
        assert_eq!(value(&t, "weir_syncs_total "), Some(2.0));
        assert_eq!(value(&t, "weir_objects{kind=\"Service\"}"), Some(3.0));
        assert_eq!(
            value(
                &t,
                "weir_network_programming_duration_seconds_count{kind=\"Service\"}"
            ),
            Some(3.0)
        );
        assert_eq!(
            value(&t, "weir_sync_proxy_rules_duration_seconds_count "),
            Some(2.0)
        );
        assert_eq!(value(&t, "weir_service_ports{series=\"own\"}"), Some(3.0));
        assert!(value(&t, "weir_map_entries{map=\"SERVICES\"}").unwrap() > services);

        // An EndpointSlice whose change was triggered 2 s ago (by the wall clock): one
        // observation of at least 2 s from the trigger time, far more than from receipt.
        assert_eq!(
            value(
                &t,
                "weir_endpoint_programming_from_trigger_duration_seconds_count "
            ),
            Some(0.0)
        );
        send(Event::Apply(slice("a", "10.0.0.5", Duration::from_secs(2)))).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = scrape();
        assert_eq!(
            value(
                &t,
                "weir_endpoint_programming_from_trigger_duration_seconds_count "
            ),
            Some(1.0)
        );
        let sum = value(
            &t,
            "weir_endpoint_programming_from_trigger_duration_seconds_sum ",
        )
        .unwrap();
        assert!((2.0..60.0).contains(&sum), "{sum}");
        assert!(
            value(
                &t,
                "weir_network_programming_duration_seconds_sum{kind=\"EndpointSlice\"}"
            )
            .unwrap()
                < 2.0
        );

        let _ = stop.send(());
        task.await.unwrap();
    }
}
