//! The Kubernetes source end to end, without a cluster: a local HTTP server speaking the
//! list/watch protocol (`weir::testing::apiserver`) serves recorded API responses
//! (tests/fixtures/kube/); the real kube-rs watchers feed the real agent loop, which
//! programs a fake datapath. Covered: initial lists, ADDED/MODIFIED/DELETED/BOOKMARK
//! events, a watch that breaks (resumed without a re-list), 410 Gone (re-list that
//! deletes what vanished), and an API server outage (the datapath keeps its state; on
//! return the re-list converges). No privileges needed.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use weir::{
    agent::{LoopConfig, NoHooks, run_loop},
    inspect::services_view,
    source::{
        Kind,
        kube::{self as kubesrc, KubeCounters, WatchOptions},
        store::Store,
    },
    testing::{apiserver::FakeApiServer, shared::SharedFake},
};
use weir_core::{image::MapImage, pipeline::NodeSettings, sync::Syncer};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const COLLECTIONS: [(&str, &str); 6] = [
    (SERVICES, "services.json"),
    (SLICES, "endpointslices.json"),
    ("/api/v1/nodes", "nodes.json"),
    ("/api/v1/pods", "pods.json"),
    ("/api/v1/namespaces", "namespaces.json"),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "networkpolicies.json",
    ),
];

fn fixture(name: &str) -> Value {
    let p = format!(
        "{}/../tests/fixtures/kube/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

struct Harness {
    server: FakeApiServer,
    fake: SharedFake,
    counters: Arc<KubeCounters>,
    stop: Option<oneshot::Sender<()>>,
    agent: Option<tokio::task::JoinHandle<Syncer>>,
    _watchers: Vec<tokio::task::JoinHandle<()>>,
}

/// How the agent is told where the API server is.
enum Connect {
    /// `--api-server URL`.
    ApiServer,
    /// `--kubeconfig FILE` (written to this path) with `--kube-context`.
    Kubeconfig(std::path::PathBuf),
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(Connect::ApiServer).await
    }

    async fn start_with(how: Connect) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let lists: Vec<(&str, Value)> = COLLECTIONS.iter().map(|(p, f)| (*p, fixture(f))).collect();
        let server = FakeApiServer::start(&lists).await.unwrap();
        // Through the agent's own configuration code, as `weir agent` builds it.
        let opts = match how {
            Connect::ApiServer => kubesrc::KubeOptions {
                api_server: Some(server.url()),
                ..Default::default()
            },
            Connect::Kubeconfig(path) => {
                std::fs::write(
                    &path,
                    format!(
                        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: me\n  user: {{token: not-checked}}\ncontexts:\n- name: other\n  context: {{cluster: nowhere, user: me}}\n- name: fake\n  context: {{cluster: fake, user: me}}\ncurrent-context: other\n",
                        server.url()
                    ),
                )
                .unwrap();
                kubesrc::KubeOptions {
                    kubeconfig: Some(path),
                    context: Some("fake".into()),
                    ..Default::default()
                }
            }
        };
        let client = kubesrc::client(&opts).await.unwrap();
        let (tx, rx) = mpsc::channel(1024);
        let mut store = Store::new();
        let id = store.register("kube", &Kind::ALL);
        let counters = Arc::new(KubeCounters::default());
        let watchers = kubesrc::spawn(
            client,
            id,
            tx,
            WatchOptions {
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_millis(200),
                watch_timeout_s: 290,
            },
            counters.clone(),
        );
        let fake = SharedFake::default();
        let cfg = LoopConfig {
            settings: NodeSettings {
                node_name: "node-a".into(),
                ..Default::default()
            },
            debounce: Duration::from_millis(10),
            max_delay: Duration::from_millis(100),
            retry: Duration::from_millis(50),
            housekeeping: Duration::from_secs(3600),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let mut dp = fake.clone();
        let agent = tokio::spawn(async move {
            run_loop(
                cfg,
                store,
                rx,
                &mut dp,
                MapImage::default(),
                &mut NoHooks,
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        Harness {
            server,
            fake,
            counters,
            stop: Some(stop),
            agent: Some(agent),
            _watchers: watchers,
        }
    }

    /// Frontend -> its cluster-wide backends, as `weir services` shows them.
    fn frontends(&self) -> BTreeMap<String, Vec<String>> {
        services_view(&self.fake.image())
            .into_iter()
            .map(|f| {
                let mut b: Vec<String> = f.backends.into_iter().map(|s| s.backend).collect();
                b.sort();
                (f.frontend, b)
            })
            .collect()
    }

    /// Waits (up to a generous deadline, never as an assertion on time) until the
    /// programmed frontends are `want`.
    async fn until_frontends(&self, what: &str, want: &[(&str, &[&str])]) {
        let want: BTreeMap<String, Vec<String>> = want
            .iter()
            .map(|(f, b)| (f.to_string(), b.iter().map(|s| s.to_string()).collect()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.frontends();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: programmed frontends\n{got:#?}\nwant\n{want:#?}\nrequests: {:#?}",
                self.server.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn requests_like(&self, prefix: &str) -> usize {
        self.server
            .requests()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    async fn stop(mut self) -> Syncer {
        let _ = self.stop.take().unwrap().send(());
        self.agent.take().unwrap().await.unwrap()
    }
}

const WEB: &str = "10.96.0.10:80/TCP";
const DNS_UDP: &str = "10.96.0.53:53/UDP";
const DNS_TCP: &str = "10.96.0.53:53/TCP";
const WEB_BACKENDS: &[&str] = &["10.244.1.3:8080", "10.244.2.7:8080"];
const DNS_BACKENDS: &[&str] = &["10.244.1.2:53"];

fn initial() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        (DNS_TCP, DNS_BACKENDS),
        (DNS_UDP, DNS_BACKENDS),
        (WEB, WEB_BACKENDS),
    ]
}

fn api_service() -> Value {
    json!({
        "metadata": {"name": "api", "namespace": "shop", "uid": "11111111-2222-4333-8444-555555555555"},
        "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "type": "ClusterIP",
                 "ports": [{"name": "grpc", "protocol": "TCP", "port": 9090, "targetPort": 9090}]}
    })
}

fn api_slice() -> Value {
    json!({
        "metadata": {"name": "api-abc12", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.1.9"], "conditions": {"ready": true}, "nodeName": "node-a"}],
        "ports": [{"name": "grpc", "protocol": "TCP", "port": 9090}]
    })
}

/// The web slice with its node-b endpoint not ready.
fn web_slice_one_ready() -> Value {
    let mut s = fixture("endpointslices.json")["items"][0].clone();
    s["endpoints"][1]["conditions"]["ready"] = false.into();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_watch_events_reach_the_datapath() {
    let h = Harness::start().await;
    // The headless Service (shop/db) is not proxied.
    h.until_frontends("initial lists", &initial()).await;
    // The node's own address (from its Node object) is programmed too.
    let img = h.fake.image();
    assert_eq!(img.node_addrs.len(), 1);
    assert_eq!(
        img.config.unwrap().masq_v4.to_string(),
        "192.168.10.11",
        "masquerade address from node-a's InternalIP"
    );
    // Each collection was listed once, then watched from the list's resourceVersion.
    for (p, _) in COLLECTIONS {
        assert_eq!(h.requests_like(&format!("list {p}")), 1, "{p}");
        assert!(h.requests_like(&format!("watch {p} from ")) >= 1, "{p}");
    }

    // ADDED: a new Service and its slice.
    h.server.apply(SERVICES, api_service());
    h.server.apply(SLICES, api_slice());
    let mut want = initial();
    want.push(("10.96.0.20:9090/TCP", &["10.244.1.9:9090"]));
    want.sort();
    h.until_frontends("ADDED", &want).await;

    // MODIFIED: one web endpoint is no longer ready.
    h.server.apply(SLICES, web_slice_one_ready());
    let want: Vec<(&str, &[&str])> = vec![
        ("10.96.0.20:9090/TCP", &["10.244.1.9:9090"]),
        (DNS_TCP, DNS_BACKENDS),
        (DNS_UDP, DNS_BACKENDS),
        (WEB, &["10.244.1.3:8080"]),
    ];
    h.until_frontends("MODIFIED", &want).await;

    // BOOKMARK then DELETED: kube-dns goes.
    h.server.bookmark(SERVICES);
    h.server.delete(SERVICES, "kube-system/kube-dns");
    let want: Vec<(&str, &[&str])> = vec![
        ("10.96.0.20:9090/TCP", &["10.244.1.9:9090"]),
        (WEB, &["10.244.1.3:8080"]),
    ];
    h.until_frontends("DELETED", &want).await;
    assert_eq!(h.counters.errors.load(Ordering::Relaxed), 0);

    let syncer = h.stop().await;
    // Only ever diffs of what changed: never a full recomputation after the first.
    let (b, f) = syncer.pipeline().ids.allocated();
    assert_eq!(b, syncer.current().backends.len());
    assert_eq!(f, syncer.current().rev_nat.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_watch_resumes_from_its_resource_version_without_a_relist() {
    let h = Harness::start().await;
    h.until_frontends("initial lists", &initial()).await;
    let watches_before = h.requests_like(&format!("watch {SLICES} from "));
    h.server.break_watches();
    // A change made while the watch is being re-established is not lost: the new watch
    // starts from the last resourceVersion seen.
    h.server.apply(SLICES, web_slice_one_ready());
    h.until_frontends(
        "after the broken watch",
        &[
            (DNS_TCP, DNS_BACKENDS),
            (DNS_UDP, DNS_BACKENDS),
            (WEB, &["10.244.1.3:8080"]),
        ],
    )
    .await;
    assert!(h.requests_like(&format!("watch {SLICES} from ")) > watches_before);
    assert_eq!(
        h.requests_like(&format!("list {SLICES}")),
        1,
        "no re-list after a plain broken watch"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_forces_a_relist_that_deletes_what_vanished() {
    let h = Harness::start().await;
    h.until_frontends("initial lists", &initial()).await;
    // web vanishes without a watch event reaching us, and the history is compacted:
    // the resumed watch gets 410 Gone, the watcher lists again, and the list no longer
    // has web.
    h.server.forget(SERVICES, "shop/web");
    h.server.expire_history();
    h.server.break_watches();
    h.until_frontends(
        "after 410 and re-list",
        &[(DNS_TCP, DNS_BACKENDS), (DNS_UDP, DNS_BACKENDS)],
    )
    .await;
    assert_eq!(h.requests_like(&format!("list {SERVICES}")), 2);
    assert!(
        h.counters.errors.load(Ordering::Relaxed) >= 1,
        "410 is reported"
    );
    // The web backends are gone from the maps too; kube-dns's stay (one per protocol).
    let img = h.fake.image();
    assert_eq!(img.backends.len(), 2, "{:?}", img.backends);
    assert!(
        img.backends
            .values()
            .all(|b| b.addr.to_string() == "10.244.1.2")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_keeps_the_datapath_and_the_relist_converges() {
    let h = Harness::start().await;
    h.until_frontends("initial lists", &initial()).await;
    let programmed = h.fake.image();
    let ops = h.fake.ops();

    // The API server stops answering.
    h.server.set_down(true);
    let errors = h.counters.errors.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.counters.errors.load(Ordering::Relaxed) < errors + 6 {
        assert!(
            Instant::now() < deadline,
            "watchers never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile the cluster changes: web is deleted, api created; history is lost.
    h.server.delete(SERVICES, "shop/web");
    h.server.delete(SLICES, "shop/web-7xk2p");
    h.server.apply(SERVICES, api_service());
    h.server.apply(SLICES, api_slice());
    h.server.expire_history();
    // Through all the failed attempts the datapath kept exactly what it had.
    assert_eq!(h.fake.image(), programmed);
    assert_eq!(h.fake.ops(), ops, "nothing was written during the outage");

    // It comes back: the watchers get 410, list again, and the maps converge,
    // web deleted and api added.
    h.server.set_down(false);
    h.until_frontends(
        "after the outage",
        &[
            ("10.96.0.20:9090/TCP", &["10.244.1.9:9090"]),
            (DNS_TCP, DNS_BACKENDS),
            (DNS_UDP, DNS_BACKENDS),
        ],
    )
    .await;
    assert!(h.requests_like(&format!("list {SERVICES}")) >= 2);
    let img = h.fake.image();
    assert!(
        !img.backends
            .values()
            .any(|b| b.addr.to_string().starts_with("10.244.2.7")),
        "web's backends were deleted"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_through_a_kubeconfig_file_and_context() {
    let path = std::env::temp_dir().join(format!("{}-kubeconfig", weir::netns::unique_prefix('k')));
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Rm(path.clone());
    let h = Harness::start_with(Connect::Kubeconfig(path)).await;
    h.until_frontends("initial lists", &initial()).await;
    h.stop().await;
}
