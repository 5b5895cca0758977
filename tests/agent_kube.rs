//! The real `weir agent` binary with the Kubernetes source: started from a config file
//! (`--config`, with `--api-server`, JSON logs and small timings), inside a throwaway
//! network namespace where a local list/watch server (recorded API responses) listens on
//! loopback. It lists the six kinds, programs the real maps, follows a watch event, and
//! logs JSON. Nothing is attached: its interface patterns match nothing.

mod support;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;
use weir::{
    datapath::AyaDatapath,
    inspect::services_view,
    netns::{ChildGuard, NetnsGuard, unique_prefix},
    testing::apiserver::FakeApiServer,
};
use weir_core::datapath::Datapath as _;

const COLLECTIONS: [(&str, &str); 6] = [
    ("/api/v1/services", "services.json"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "endpointslices.json",
    ),
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
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The fake API server, running on its own thread inside a network namespace.
struct ServerInNetns {
    server: Arc<FakeApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerInNetns {
    fn start(ns: &str) -> ServerInNetns {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ns = ns.to_string();
        let thread = std::thread::spawn(move || {
            weir::netns::enter(&ns).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let lists: Vec<(&str, Value)> =
                    COLLECTIONS.iter().map(|(p, f)| (*p, fixture(f))).collect();
                let server = Arc::new(FakeApiServer::start(&lists).await.unwrap());
                tx.send(server.clone()).unwrap();
                let _ = stopped.await;
            });
        });
        let server = rx.recv().expect("API server started");
        ServerInNetns {
            server,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for ServerInNetns {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        let _ = self.thread.take().map(|t| t.join());
    }
}

/// Removes a file or directory by path on drop.
struct Rm(PathBuf);
impl Drop for Rm {
    fn drop(&mut self) {
        let _ = weir::datapath::remove_pin_dir(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

fn frontends(pin_dir: &std::path::Path) -> Vec<String> {
    AyaDatapath::open(pin_dir)
        .and_then(|d| d.read_image().map_err(anyhow::Error::msg))
        .map(|img| {
            services_view(&img)
                .into_iter()
                .map(|f| f.frontend)
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool, agent: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        if let Ok(Some(st)) = agent.child.try_wait() {
            panic!("weir agent exited ({st}) while waiting for {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_binary_watches_an_api_server_from_a_config_file() {
    support::require_root();
    let prefix = unique_prefix('k');
    let ns = NetnsGuard::create(&format!("{prefix}-api")).unwrap();
    let api = ServerInNetns::start(&ns.name);
    let pin_dir = PathBuf::from("/sys/fs/bpf/weir-test").join(&prefix);
    let _pins = Rm(pin_dir.clone());
    let dir = std::env::temp_dir().join(format!("{prefix}-agent"));
    std::fs::create_dir_all(&dir).unwrap();
    let _dir = Rm(dir.clone());
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "node-name: node-a\napi-server: {}\npin-dir: {}\npod-ifaces: [no-such-if*]\nuplinks: [no-such-if*]\non-exit: remove\ndebounce-ms: 10\napi-retry-max-ms: 200\ncluster-cidr: [10.244.0.0/16]\nlog-format: json\n",
            api.server.url(),
            pin_dir.display()
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.args(["agent", "--config"])
        .arg(&config)
        .args(["--netns", &ns.name])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut agent = ChildGuard::spawn(cmd, "weir agent").unwrap();

    let want = [
        "10.96.0.10:80/TCP",
        "10.96.0.53:53/TCP",
        "10.96.0.53:53/UDP",
    ];
    wait_for(
        "the initial lists to be programmed",
        || {
            let mut f = frontends(&pin_dir);
            f.sort();
            f == want
        },
        &mut agent,
    );
    // CONFIG carries the cluster CIDR from the config file and node-a's address.
    let cfg = AyaDatapath::open(&pin_dir).unwrap().config().unwrap();
    assert_eq!(cfg.cluster_v4_plen, 16);
    assert_eq!(cfg.masq_v4.to_string(), "192.168.10.11");

    // A watch event: kube-dns is deleted.
    api.server
        .delete("/api/v1/services", "kube-system/kube-dns");
    wait_for(
        "the deletion to be programmed",
        || frontends(&pin_dir) == ["10.96.0.10:80/TCP"],
        &mut agent,
    );

    agent.stop(Duration::from_secs(10));
    assert!(!pin_dir.exists(), "on-exit: remove took the pins away");
    // Every log line is a JSON object; the syncs are there with their fields.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(
            |l| l["fields"]["message"] == "programmed" && l["fields"]["ops"].as_u64() > Some(0)
        ),
        "{text}"
    );
}
