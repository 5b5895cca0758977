//! The Kubernetes source: one kube-rs watcher per kind weir reads (Services,
//! EndpointSlices, Nodes, Pods, Namespaces, NetworkPolicies), cluster-wide, with only
//! the `list` and `watch` verbs (manifests' RBAC grants nothing else).
//!
//! Each watcher (`kube::runtime::watcher`) lists, then watches from the list's
//! resourceVersion, resumes a broken watch from the last version it saw, and re-lists
//! when the server answers 410 Gone; its `Init`/`InitApply`/`InitDone`/`Apply`/`Delete`
//! events go unchanged to the agent's [`super::store::Store`]. `managedFields` and the
//! `last-applied-configuration` annotation are stripped on arrival (`.modify()`): weir
//! never reads them and they are most of an object's size. Errors are logged, counted and
//! retried with a capped exponential backoff; while the API server is unreachable the
//! datapath keeps what it has (nothing is deleted until a new list says so).
//!
//! Connection: `--kubeconfig FILE` (optionally `--kube-context`), `--api-server URL`
//! (with `--api-ca-file` and `--api-token-file`, defaulting to the pod's service account
//! files): with kube-proxy gone, the `kubernetes` Service VIP that in-cluster config
//! points at is not reachable until weir itself programs it, so a DaemonSet gives the API
//! server's real address), or in-cluster config (`KUBERNETES_SERVICE_HOST`).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1 as core, discovery::v1 as discovery, networking::v1 as networking,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, utils::Backoff, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{Event, Kind, Object, SourceEvent, SourceId};

/// The service account files a pod gets.
pub const SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const SA_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub api_server: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub in_cluster: bool,
}

impl KubeOptions {
    /// Whether any way to reach an API server was given.
    pub fn configured(&self) -> bool {
        self.kubeconfig.is_some() || self.api_server.is_some() || self.in_cluster
    }
}

/// The kube client configuration for `opts`.
pub async fn client_config(opts: &KubeOptions) -> Result<kube::Config> {
    if let Some(url) = &opts.api_server {
        // An in-memory kubeconfig, so that kube's own code reads the CA and token files
        // (and re-reads the token when it rotates).
        let ca = opts
            .ca_file
            .clone()
            .or_else(|| Some(PathBuf::from(SA_CA)).filter(|p| p.exists()));
        let token = opts
            .token_file
            .clone()
            .or_else(|| Some(PathBuf::from(SA_TOKEN)).filter(|p| p.exists()));
        let mut cluster = serde_json::json!({ "server": url });
        if let Some(ca) = &ca {
            cluster["certificate-authority"] = ca.display().to_string().into();
        }
        let mut user = serde_json::json!({});
        if let Some(t) = &token {
            user["tokenFile"] = t.display().to_string().into();
        }
        let kc: Kubeconfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "weir", "cluster": cluster }],
            "users": [{ "name": "weir", "user": user }],
            "contexts": [{ "name": "weir", "context": { "cluster": "weir", "user": "weir" } }],
            "current-context": "weir",
        }))
        .context("building the API server configuration")?;
        return kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("API server {url}"));
    }
    if let Some(path) = &opts.kubeconfig {
        let kc = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let o = KubeConfigOptions {
            context: opts.context.clone(),
            ..Default::default()
        };
        return kube::Config::from_custom_kubeconfig(kc, &o)
            .await
            .with_context(|| format!("kubeconfig {}", path.display()));
    }
    if opts.in_cluster {
        return kube::Config::incluster().context(
            "in-cluster configuration (KUBERNETES_SERVICE_HOST/PORT and the service account files)",
        );
    }
    bail!("no API server configured (--kubeconfig, --api-server or --in-cluster)")
}

pub async fn client(opts: &KubeOptions) -> Result<Client> {
    let cfg = client_config(opts).await?;
    info!(server = %cfg.cluster_url, "connecting to the API server");
    Client::try_from(cfg).context("creating the Kubernetes client")
}

/// Counters of the watchers (exported by the metrics issue).
#[derive(Debug, Default)]
pub struct KubeCounters {
    /// Watch and list errors (each is retried after a backoff).
    pub errors: AtomicU64,
    /// Events received.
    pub events: AtomicU64,
}

/// Capped exponential backoff between retries after a watch error (kube's default caps
/// at 30 s; a node dataplane wants to notice a returning API server sooner).
#[derive(Clone, Debug)]
pub struct RetryBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl RetryBackoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Watcher settings.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Server-side watch timeout in seconds (the client notices a silently dead
    /// connection after this plus 5 s).
    pub watch_timeout_s: u32,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            watch_timeout_s: 290,
        }
    }
}

/// Strips what weir never reads from an object on arrival.
fn strip<K: Resource>(o: &mut K) {
    o.managed_fields_mut().clear();
    o.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// Starts one watcher per kind; they send their events to `tx` until it closes.
pub fn spawn(
    client: Client,
    source: SourceId,
    tx: mpsc::Sender<SourceEvent>,
    opts: WatchOptions,
    counters: Arc<KubeCounters>,
) -> Vec<JoinHandle<()>> {
    let c = || client.clone();
    let w = |o: &WatchOptions| o.clone();
    vec![
        tokio::spawn(watch_kind::<core::Service>(
            Api::all(c()),
            Kind::Service,
            |o| Object::Service(Box::new(o)),
            source,
            tx.clone(),
            w(&opts),
            counters.clone(),
        )),
        tokio::spawn(watch_kind::<discovery::EndpointSlice>(
            Api::all(c()),
            Kind::EndpointSlice,
            |o| Object::EndpointSlice(Box::new(o)),
            source,
            tx.clone(),
            w(&opts),
            counters.clone(),
        )),
        tokio::spawn(watch_kind::<core::Node>(
            Api::all(c()),
            Kind::Node,
            |o| Object::Node(Box::new(o)),
            source,
            tx.clone(),
            w(&opts),
            counters.clone(),
        )),
        tokio::spawn(watch_kind::<core::Pod>(
            Api::all(c()),
            Kind::Pod,
            |o| Object::Pod(Box::new(o)),
            source,
            tx.clone(),
            w(&opts),
            counters.clone(),
        )),
        tokio::spawn(watch_kind::<core::Namespace>(
            Api::all(c()),
            Kind::Namespace,
            |o| Object::Namespace(Box::new(o)),
            source,
            tx.clone(),
            w(&opts),
            counters.clone(),
        )),
        tokio::spawn(watch_kind::<networking::NetworkPolicy>(
            Api::all(c()),
            Kind::NetworkPolicy,
            |o| Object::NetworkPolicy(Box::new(o)),
            source,
            tx,
            opts,
            counters,
        )),
    ]
}

/// A kube-rs watcher event as a source event.
pub fn translate<K>(kind: Kind, wrap: fn(K) -> Object, e: watcher::Event<K>) -> Event {
    match e {
        watcher::Event::Init => Event::Init(kind),
        watcher::Event::InitApply(o) => Event::InitApply(wrap(o)),
        watcher::Event::InitDone => Event::InitDone(kind),
        watcher::Event::Apply(o) => Event::Apply(wrap(o)),
        watcher::Event::Delete(o) => Event::Delete(wrap(o)),
    }
}

async fn watch_kind<K>(
    api: Api<K>,
    kind: Kind,
    wrap: fn(K) -> Object,
    source: SourceId,
    tx: mpsc::Sender<SourceEvent>,
    opts: WatchOptions,
    counters: Arc<KubeCounters>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let cfg = watcher::Config::default().timeout(opts.watch_timeout_s);
    let mut stream = watcher(api, cfg)
        .modify(strip::<K>)
        .backoff(RetryBackoff::new(opts.backoff_initial, opts.backoff_max))
        .boxed();
    let mut failing = false;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(e) => {
                if failing {
                    info!(%kind, "watch recovered");
                    failing = false;
                }
                counters.events.fetch_add(1, Ordering::Relaxed);
                translate(kind, wrap, e)
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                // Log the first error of a run of failures at warn, the rest at debug.
                if failing {
                    tracing::debug!(%kind, "watch: {e}");
                } else {
                    warn!(%kind, "watch: {e}; retrying (the datapath keeps its state)");
                    failing = true;
                }
                continue;
            }
        };
        if tx.send(SourceEvent { source, event }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::source::store::Store;

    fn slice(name: &str, ready: bool) -> discovery::EndpointSlice {
        discovery::EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some(
                    [("kubernetes.io/service-name".to_string(), "web".to_string())].into(),
                ),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(vec![discovery::Endpoint {
                addresses: vec!["10.0.0.1".into()],
                conditions: Some(discovery::EndpointConditions {
                    ready: Some(ready),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ports: None,
        }
    }

    /// A reflector-level test: a scripted sequence of kube-rs watcher events, as the
    /// watcher emits them for a list, changes, and a re-list after 410 Gone, drives the
    /// store; the change sets say exactly what changed.
    #[test]
    fn synthetic_watcher_events_drive_the_store() {
        let wrap: fn(discovery::EndpointSlice) -> Object = |o| Object::EndpointSlice(Box::new(o));
        let mut store = Store::new();
        let src = store.register("kube", &[Kind::EndpointSlice]);
        let feed = |store: &mut Store, e: watcher::Event<discovery::EndpointSlice>| {
            store.apply(SourceEvent {
                source: src,
                event: translate(Kind::EndpointSlice, wrap, e),
            })
        };
        let r = |n: &str| weir_core::model::ObjRef::new("shop", n);

        feed(&mut store, watcher::Event::Init);
        feed(&mut store, watcher::Event::InitApply(slice("a", true)));
        feed(&mut store, watcher::Event::InitApply(slice("b", true)));
        assert!(!store.synced());
        feed(&mut store, watcher::Event::InitDone);
        assert!(store.synced());
        assert_eq!(store.take_changes().slices, [r("a"), r("b")].into());

        feed(&mut store, watcher::Event::Apply(slice("a", false)));
        feed(&mut store, watcher::Event::Delete(slice("b", true)));
        assert_eq!(store.take_changes().slices, [r("a"), r("b")].into());
        assert_eq!(
            store.cluster().slices[&r("a")].endpoints[0].ready,
            Some(false)
        );

        // 410 Gone: the watcher starts over; c appeared and a vanished meanwhile.
        feed(&mut store, watcher::Event::Init);
        feed(&mut store, watcher::Event::InitApply(slice("c", true)));
        // Until InitDone the old state stands.
        assert!(store.cluster().slices.contains_key(&r("a")));
        feed(&mut store, watcher::Event::InitDone);
        assert_eq!(store.take_changes().slices, [r("a"), r("c")].into());
        assert_eq!(
            store.cluster().slices.keys().cloned().collect::<Vec<_>>(),
            [r("c")]
        );
    }

    #[test]
    fn managed_fields_and_last_applied_are_stripped() {
        let mut s = slice("a", true);
        s.metadata.managed_fields = Some(vec![Default::default()]);
        s.metadata.annotations = Some(
            [
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{}".to_string(),
                ),
                ("keep".to_string(), "me".to_string()),
            ]
            .into(),
        );
        strip(&mut s);
        assert!(s.metadata.managed_fields.unwrap_or_default().is_empty());
        assert_eq!(
            s.metadata.annotations.unwrap().keys().collect::<Vec<_>>(),
            ["keep"]
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = RetryBackoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let v: Vec<u64> = (0..4)
            .map(|_| b.next().unwrap().as_millis() as u64)
            .collect();
        assert_eq!(v, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.next(), Some(Duration::from_millis(100)));
    }
}
