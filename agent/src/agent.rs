//! The node agent: load the datapath, attach it to interfaces as they appear, and keep
//! the maps equal to what the cluster objects say.
//!
//! ```text
//!  DirSource thread ─┐                      ┌─ debounce ─> Syncer::sync ─> Datapath::apply
//!  kube watchers  ───┴─> mpsc<SourceEvent> ─> Store (model objects, ChangeSet, readiness)
//! ```
//!
//! [`run`] wires the real datapath and the sources; [`run_loop`] is the loop itself,
//! generic over the [`Datapath`] so that tests drive it with the fake one. The loop
//! applies every event to the [`Store`] as it arrives and syncs once the sources have
//! been quiet for `debounce` (or `max_delay` after the first unsynced change, so a
//! steady stream of changes cannot starve the maps). Each sync costs what its changes
//! cost (`weir_core::sync`). Deletions wait until every source has delivered its initial
//! list; a restarted agent adopts the pinned maps (ids included), so an unchanged cluster
//! writes nothing and established connections keep their backends.

use std::{
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{sync::mpsc, time::Instant};
use tracing::{debug, error, info, warn};
use weir_core::{
    datapath::Datapath,
    image::MapImage,
    pipeline::{ChangeSet, NodeSettings},
    sync::{SyncInput, SyncReport, Syncer},
};

use crate::{
    datapath::{Dataplane, Hook, LoadOptions},
    netns,
    source::{
        Kind, SourceEvent, SourceId,
        dir::DirSource,
        kube::{self as kubesrc, KubeCounters, KubeOptions, WatchOptions},
        store::Store,
    },
};

pub use crate::source::dir::GENERATION_FILE;

/// What to do with the pinned maps and links when the agent exits on a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Leave maps and links pinned: the datapath keeps forwarding and a restarted agent
    /// adopts it (what a DaemonSet upgrade needs).
    Keep,
    /// Remove the instance's pins: the datapath is detached when the agent exits.
    Remove,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    /// Directory source, if any.
    pub source_dir: Option<PathBuf>,
    /// Kubernetes source, if configured.
    pub kube: KubeOptions,
    pub watch: WatchOptions,
    pub pin_dir: PathBuf,
    pub pod_ifaces: Vec<String>,
    pub uplinks: Vec<String>,
    pub on_exit: OnExit,
    pub capacities: std::collections::BTreeMap<String, u32>,
    /// Directory poll and interface scan interval.
    pub poll: Duration,
    pub sync: LoopConfig,
    /// cgroup v2 directory whose sockets get socket-level load balancing (None: off).
    pub cgroup: Option<PathBuf>,
    /// Conntrack sweep interval.
    pub ct_gc_interval: Duration,
    /// Metrics, health, flow events.
    pub observe: crate::observe::ObserveConfig,
    /// Flow event rate limits and sampling (fixed at load).
    pub events: crate::datapath::EventSettings,
}

/// Timing and settings of the sync loop.
#[derive(Clone, Debug)]
pub struct LoopConfig {
    pub settings: NodeSettings,
    /// Quiet time after a change before syncing (batches bursts).
    pub debounce: Duration,
    /// Longest time a change waits for a sync while changes keep arriving.
    pub max_delay: Duration,
    /// Delay before retrying a sync that failed or left Services waiting for room.
    pub retry: Duration,
    /// Interval of the housekeeping hook (interface scan).
    pub housekeeping: Duration,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            settings: NodeSettings::default(),
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            retry: Duration::from_secs(1),
            housekeeping: Duration::from_millis(200),
        }
    }
}

/// What the loop calls besides syncing.
pub trait Hooks {
    /// Every `housekeeping` interval (the agent scans interfaces to attach to).
    fn housekeeping(&mut self) {}
    /// After every sync.
    fn synced(&mut self, _syncer: &Syncer, _report: &SyncReport) {}
    /// After every sync, with everything an observer needs (metrics, health).
    fn observe(&mut self, _o: &Observation<'_>) {}
    /// After a batch of source events was applied to the store.
    fn events_applied(&mut self, _store: &Store) {}
}

/// One sync as observers see it.
pub struct Observation<'a> {
    pub store: &'a Store,
    pub syncer: &'a Syncer,
    pub report: &'a SyncReport,
    pub changes: &'a ChangeSet,
    /// Kind and arrival time of the first change of each changed object.
    pub change_times: &'a [(Kind, std::time::Instant)],
    pub started: std::time::Instant,
    pub finished: std::time::Instant,
}

/// No hooks.
pub struct NoHooks;
impl Hooks for NoHooks {}

/// Logs one sync's outcome: every refused or broken object by name, at warn/error.
fn log_report(r: &SyncReport, changed: usize, generation: u64, elapsed: Duration, store: &Store) {
    for e in &r.errors {
        error!(
            reason = e.error.to_string(),
            "{e}; keeping what was programmed for it"
        );
    }
    for x in &r.refused {
        warn!(
            service = %x.service,
            map = x.map,
            capacity = x.capacity,
            reason = x.metric_label(),
            "{x}"
        );
    }
    for s in &r.admitted {
        info!(service = %s, "Service programmed now that its map has room");
    }
    if let Some(e) = &r.apply_error {
        error!(
            reason = e.metric_label(),
            "{e}; {} of {} ops applied, retrying the rest", r.ops, r.planned
        );
    }
    if r.deferred > 0 {
        info!(
            deferred = r.deferred,
            waiting_for = store.waiting_for().join(","),
            "deletions deferred until every source has delivered its initial list"
        );
    }
    let msg = "programmed";
    if r.ops > 0 || r.full {
        info!(
            ops = r.ops,
            changed,
            translated = r.translations,
            touched = r.touched,
            generation,
            elapsed_us = elapsed.as_micros() as u64,
            "{msg}"
        );
    } else {
        debug!(
            ops = r.ops,
            changed,
            translated = r.translations,
            generation,
            elapsed_us = elapsed.as_micros() as u64,
            "{msg}"
        );
    }
}

/// The sync loop: applies source events to `store` and syncs `dp` after each debounced
/// burst, until `shutdown` resolves. `adopted` is what the maps held at start. Returns
/// the syncer (tests inspect it).
pub async fn run_loop<D: Datapath + ?Sized, H: Hooks + ?Sized>(
    cfg: LoopConfig,
    mut store: Store,
    mut rx: mpsc::Receiver<SourceEvent>,
    dp: &mut D,
    adopted: MapImage,
    hooks: &mut H,
    shutdown: impl std::future::Future<Output = ()>,
) -> Syncer {
    let mut syncer = Syncer::new(cfg.settings.clone(), adopted, dp.capacities());
    let mut first_change: Option<Instant> = None;
    let mut last_change: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut housekeeping = tokio::time::interval(cfg.housekeeping);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rx_open = true;
    tokio::pin!(shutdown);
    loop {
        let deadline = match (first_change, last_change) {
            (Some(f), Some(l)) => Some((l + cfg.debounce).min(f + cfg.max_delay)),
            _ => retry_at,
        };
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            ev = rx.recv(), if rx_open => {
                let Some(ev) = ev else {
                    rx_open = false;
                    continue;
                };
                store.apply(ev);
                // Drain what is queued: one wake-up per burst, not per event.
                while let Ok(ev) = rx.try_recv() {
                    store.apply(ev);
                }
                if store.dirty() {
                    let now = Instant::now();
                    first_change.get_or_insert(now);
                    last_change = Some(now);
                }
                hooks.events_applied(&store);
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap()).await }, if deadline.is_some() => {
                first_change = None;
                last_change = None;
                retry_at = None;
                let change_times = store.change_times();
                let changes = store.take_changes();
                let started = std::time::Instant::now();
                let generation = store.generation();
                let r = syncer.sync(
                    SyncInput {
                        cluster: store.cluster(),
                        changes: &changes,
                        sources_synced: store.synced(),
                        generation,
                    },
                    dp,
                );
                log_report(&r, changes.len(), generation, started.elapsed(), &store);
                if r.retry {
                    retry_at = Some(Instant::now() + cfg.retry);
                }
                let finished = std::time::Instant::now();
                hooks.synced(&syncer, &r);
                hooks.observe(&Observation {
                    store: &store,
                    syncer: &syncer,
                    report: &r,
                    changes: &changes,
                    change_times: &change_times,
                    started,
                    finished,
                });
            }
            _ = housekeeping.tick() => hooks.housekeeping(),
        }
    }
    syncer
}

/// Starts the configured sources; their events go to `tx`.
pub async fn start_sources(
    cfg: &AgentConfig,
    store: &mut Store,
    tx: mpsc::Sender<SourceEvent>,
) -> Result<Sources> {
    let mut sources = Sources::default();
    if let Some(dir) = &cfg.source_dir {
        let id = store.register("dir", &Kind::ALL);
        sources.threads.push(spawn_dir_source(
            DirSource::new(dir),
            id,
            tx.clone(),
            cfg.poll,
        )?);
    }
    if cfg.kube.configured() {
        let client = kubesrc::client(&cfg.kube).await?;
        let id = store.register("kube", &Kind::ALL);
        sources.tasks.extend(kubesrc::spawn(
            client,
            id,
            tx,
            cfg.watch.clone(),
            sources.kube.clone(),
        ));
    }
    if sources.threads.is_empty() && sources.tasks.is_empty() {
        anyhow::bail!(
            "no source of cluster objects: give --source-dir, --kubeconfig, --api-server or --in-cluster"
        );
    }
    Ok(sources)
}

/// Handles of running sources.
#[derive(Default)]
pub struct Sources {
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    pub kube: Arc<KubeCounters>,
}

impl Drop for Sources {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Polls a directory source on its own thread (file reads block) and sends its events,
/// until the receiver goes away.
pub fn spawn_dir_source(
    mut src: DirSource,
    id: SourceId,
    tx: mpsc::Sender<SourceEvent>,
    poll: Duration,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-dir-source".into())
        .spawn(move || {
            let mut failing = false;
            while !tx.is_closed() {
                match src.poll() {
                    Ok(p) => {
                        failing = false;
                        for e in &p.errors {
                            warn!(reason = e.reason, "{}", e.message);
                        }
                        for event in p.events {
                            if tx.blocking_send(SourceEvent { source: id, event }).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        if !failing {
                            warn!(
                                "reading {}: {e}; keeping what was read before",
                                src.root().display()
                            );
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(poll);
            }
        })
        .context("starting the directory source thread")
}

/// The hooks of the real agent: attach to new interfaces and forget vanished ones, keep
/// metrics, health and readiness current, and after a sync that changed the maps have
/// the GC thread look for sockets connected to backends that are gone.
struct AgentHooks<'a> {
    dataplane: &'a mut Dataplane,
    pod_ifaces: &'a [String],
    uplinks: &'a [String],
    observer: crate::observe::Observer,
    gc_kick: std::sync::mpsc::Sender<()>,
}

impl Hooks for AgentHooks<'_> {
    fn housekeeping(&mut self) {
        attach_interfaces(self.dataplane, self.pod_ifaces, self.uplinks);
        self.observer.housekeeping();
    }
    fn observe(&mut self, o: &Observation<'_>) {
        self.observer.observe(o);
    }
    fn events_applied(&mut self, store: &Store) {
        self.observer.events_applied(store);
    }
    fn synced(&mut self, _syncer: &Syncer, report: &SyncReport) {
        // Only a BACKENDS change can strand a socket-LB socket on a backend that is
        // gone (gc::stale_targets reads BACKENDS and SOCK_REV only).
        if report.backend_ops > 0 {
            let _ = self.gc_kick.send(());
        }
    }
}

pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut dataplane = Dataplane::load_with_events(
        &LoadOptions {
            pin_dir: cfg.pin_dir.clone(),
            capacities: cfg.capacities.clone(),
        },
        &cfg.events,
    )?;
    if let Some(cg) = &cfg.cgroup {
        dataplane.attach_cgroup(cg)?;
    }
    let mut dp = dataplane.datapath()?;
    let adopted: MapImage = dp
        .read_image()
        .map_err(|e| anyhow::anyhow!("reading pinned maps: {e}"))?;
    info!(
        node = cfg.node_name,
        adopted_services = adopted.services.len(),
        adopted_backends = adopted.backends.len(),
        "agent started"
    );
    // Socket hooks tell node-originated sockets by the host namespace's cookie.
    let mut sync = cfg.sync.clone();
    sync.settings.host_netns_cookie = crate::datapath::netns_cookie()?;
    if cfg.cgroup.is_some() {
        sync.settings.flags |= weir_common::config::CFG_F_SOCKET_LB;
    }
    let (tx, rx) = mpsc::channel(4096);
    let mut store = Store::new();
    let sources = start_sources(&cfg, &mut store, tx).await?;

    // Observability: counters from the pinned maps, servers, events, kernel logs.
    let kernel = match crate::metrics::kernel::AyaKernelCounters::open(&cfg.pin_dir) {
        Ok(k) => Some(Arc::new(k)),
        Err(e) => {
            warn!("datapath counters unavailable: {e:#}");
            None
        }
    };
    let mut obs = crate::observe::Observability::new(
        cfg.observe.clone(),
        kernel
            .clone()
            .map(|k| Box::new(k) as Box<dyn crate::metrics::KernelCounters>),
        sources.kube.clone(),
    );
    obs.start_servers();
    obs.start_ct_scan(cfg.pin_dir.clone());
    match dataplane.take_events() {
        Ok(ring) => obs.start_events(ring),
        Err(e) => warn!("flow events unavailable: {e:#}"),
    }
    if let Some(l) = dataplane.take_logger() {
        obs.start_kernel_log(l);
    }
    let observer =
        crate::observe::Observer::new(&obs, &cfg.node_name, dataplane.capacities().clone(), kernel);

    attach_interfaces(&mut dataplane, &cfg.pod_ifaces, &cfg.uplinks);
    let (gc_kick, gc_rx) = std::sync::mpsc::channel();
    let gc_counters = obs.shared.gc.clone();
    let gc = crate::datapath::gc::spawn(
        crate::datapath::gc::GcConfig {
            pin_dir: cfg.pin_dir.clone(),
            cgroup: cfg.cgroup.clone(),
            ct_interval: cfg.ct_gc_interval,
            socket_min_interval: Duration::from_millis(200),
        },
        gc_rx,
        gc_counters.clone(),
    )
    .context("starting the GC thread")?;
    observer.attached();
    let mut hooks = AgentHooks {
        dataplane: &mut dataplane,
        pod_ifaces: &cfg.pod_ifaces,
        uplinks: &cfg.uplinks,
        observer,
        gc_kick,
    };
    let syncer = run_loop(sync, store, rx, &mut dp, adopted, &mut hooks, shutdown).await;
    drop(hooks);
    let _ = gc.join();
    info!(
        syncs = syncer.counters.syncs,
        ops = syncer.counters.ops_applied,
        ct_deleted = gc_counters.ct_deleted.load(Ordering::Relaxed),
        sockets_destroyed = gc_counters.sockets_destroyed.load(Ordering::Relaxed),
        watch_errors = sources.kube.errors.load(Ordering::Relaxed),
        "stopping"
    );
    drop(obs);
    drop(sources);

    match cfg.on_exit {
        OnExit::Keep => info!(pin_dir = %cfg.pin_dir.display(), "exiting; datapath stays pinned"),
        OnExit::Remove => {
            dataplane.remove_pins().context("removing pins")?;
            info!(pin_dir = %cfg.pin_dir.display(), "exiting; pins removed");
        }
    }
    Ok(())
}

fn attach_interfaces(dataplane: &mut Dataplane, pod_ifaces: &[String], uplinks: &[String]) {
    let ifaces = netns::interfaces();
    for name in &ifaces {
        let pod = pod_ifaces.iter().any(|p| netns::glob_match(p, name));
        let uplink = uplinks.iter().any(|p| netns::glob_match(p, name));
        let hooks: &[Hook] = if pod {
            &[Hook::FromPod, Hook::ToPod]
        } else if uplink {
            &[Hook::UplinkIn, Hook::UplinkOut]
        } else {
            &[]
        };
        for h in hooks {
            if let Err(e) = dataplane.attach(name, *h) {
                // The interface may have vanished between listing and attaching.
                debug!("attach {name}: {e:#}");
            }
        }
    }
    dataplane.prune_links();
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use weir_core::{datapath::FakeDatapath, pipeline::ChangeSet};

    use super::*;
    use crate::{
        source::{Event, Object, yaml},
        testing::shared::SharedFake,
    };

    fn svc(name: &str, i: u32) -> Object {
        let y = format!(
            "kind: Service\nmetadata: {{name: {name}, namespace: t}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80}}]}}\n",
            i / 200,
            i % 200 + 1
        );
        yaml::parse_documents(&y, "t").0.remove(0)
    }

    /// Records every sync's (ops, deferred).
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(usize, usize)>>>);
    impl Hooks for Recorder {
        fn synced(&mut self, _s: &Syncer, r: &SyncReport) {
            self.0.lock().unwrap().push((r.ops, r.deferred));
        }
    }

    struct Running {
        tx: mpsc::Sender<SourceEvent>,
        syncs: Recorder,
        fake: SharedFake,
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Syncer>,
    }

    fn start(kinds: &[Kind], adopted: MapImage, fake: SharedFake) -> Running {
        let mut store = Store::new();
        store.register("test", kinds);
        let (tx, rx) = mpsc::channel(1024);
        let syncs = Recorder::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cfg = LoopConfig {
            debounce: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            housekeeping: Duration::from_secs(3600),
            ..Default::default()
        };
        let (mut dp, mut hooks) = (fake.clone(), syncs.clone());
        let task = tokio::spawn(async move {
            run_loop(cfg, store, rx, &mut dp, adopted, &mut hooks, async {
                let _ = stopped.await;
            })
            .await
        });
        Running {
            tx,
            syncs,
            fake,
            stop,
            task,
        }
    }

    async fn send(r: &Running, event: Event) {
        r.tx.send(SourceEvent { source: 0, event }).await.unwrap();
    }

    async fn list(r: &Running, kind: Kind, objs: Vec<Object>) {
        send(r, Event::Init(kind)).await;
        for o in objs {
            send(r, Event::InitApply(o)).await;
        }
        send(r, Event::InitDone(kind)).await;
    }

    fn syncs(r: &Running) -> Vec<(usize, usize)> {
        r.syncs.0.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_programmed_in_one_sync() {
        let r = start(&[Kind::Service], MapImage::default(), SharedFake::default());
        list(&r, Kind::Service, vec![]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(syncs(&r).len(), 1, "the initial list");
        // 50 changes, 10 ms apart: closer than the debounce, so one sync for all.
        for i in 0..50 {
            send(&r, Event::Apply(svc(&format!("s{i}"), i))).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = syncs(&r);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(
            crate::inspect::services_view(&r.fake.image()).len(),
            50,
            "every Service programmed"
        );
        let _ = r.stop.send(());
        r.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_of_changes_is_still_programmed_every_max_delay() {
        let r = start(&[Kind::Service], MapImage::default(), SharedFake::default());
        list(&r, Kind::Service, vec![]).await;
        // A change every 50 ms for 3.5 s: the sources are never quiet for the debounce
        // (100 ms), so only max_delay (1 s) makes the loop sync meanwhile.
        for i in 0..70 {
            send(&r, Event::Apply(svc(&format!("s{i}"), i))).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let during = syncs(&r).len();
        assert!(during >= 3, "synced {during} times during the stream");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(crate::inspect::services_view(&r.fake.image()).len(), 70);
        let _ = r.stop.send(());
        r.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn deletions_wait_until_every_kind_has_listed() {
        // The pinned maps hold a Service of a previous run.
        let fake = SharedFake::new(FakeDatapath::default());
        {
            let mut c = weir_core::model::Cluster::default();
            let s = crate::source::convert::service(match &svc("stale", 7) {
                Object::Service(s) => s,
                _ => unreachable!(),
            })
            .unwrap();
            c.services.insert(s.id.clone(), s);
            let mut f = fake.clone();
            let mut sy = Syncer::new(NodeSettings::default(), MapImage::default(), f.capacities());
            sy.sync(
                SyncInput {
                    cluster: &c,
                    changes: &ChangeSet::everything(),
                    sources_synced: true,
                    generation: 0,
                },
                &mut f,
            );
        }
        let adopted = fake.image();
        assert_eq!(crate::inspect::services_view(&adopted).len(), 1);
        let r = start(&[Kind::Service, Kind::EndpointSlice], adopted, fake);
        // Services listed, EndpointSlices not yet: the new Service is added, the stale
        // one kept.
        list(&r, Kind::Service, vec![svc("new", 1)]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = syncs(&r);
        assert_eq!(s.len(), 1);
        assert!(s[0].1 > 0, "deletions deferred: {s:?}");
        assert_eq!(crate::inspect::services_view(&r.fake.image()).len(), 2);
        // The last kind lists (nothing changes in it): the sync that follows deletes.
        list(&r, Kind::EndpointSlice, vec![]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = syncs(&r);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1].1, 0);
        let fes = crate::inspect::services_view(&r.fake.image());
        assert_eq!(fes.len(), 1);
        assert_eq!(fes[0].frontend, "10.96.0.2:80/TCP");
        let _ = r.stop.send(());
        r.task.await.unwrap();
    }
}
