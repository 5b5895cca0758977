//! `weir agent` options: flags and a YAML config file (`--config FILE`) with the same
//! names; a flag given on the command line overrides the file. Every option is
//! documented in `weir agent --help` (the doc comments below) and docs/agent.md.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use weir_core::{compile::CompileOptions, pipeline::NodeSettings};

use crate::{
    agent::{AgentConfig, LoopConfig, OnExit},
    datapath::{DEFAULT_BPFFS_ROOT, EventSettings},
    logging::LogFormat,
    observe::ObserveConfig,
    source::kube::{KubeOptions, WatchOptions},
};

/// `NAME=ENTRIES`: a map capacity.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MapSize {
    pub name: String,
    pub entries: u32,
}

impl std::str::FromStr for MapSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=ENTRIES, got {s:?}"))?;
        let entries: u32 = v
            .trim()
            .parse()
            .map_err(|_| format!("{v:?} is not a number"))?;
        let k = k.trim();
        if !weir_common::maps::ALL.iter().any(|(n, _)| *n == k) {
            return Err(format!(
                "unknown map {k:?}; maps: {}",
                weir_common::maps::ALL
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if entries == 0 {
            return Err(format!("map {k}: capacity must be at least 1"));
        }
        Ok(MapSize {
            name: k.to_string(),
            entries,
        })
    }
}

impl TryFrom<String> for MapSize {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// How backends are picked for a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbAlgorithm {
    /// A uniformly random backend (kube-proxy's behaviour).
    Random,
    /// Maglev consistent hashing of the 5-tuple for every Service (the
    /// `weir.dev/lb-algorithm: maglev` annotation selects it per Service).
    Maglev,
}

/// Options of `weir agent`. In the config file, use the flag names without the dashes
/// in front (`node-name: n1`, `map-size: [CT=1048576]`, `cluster-cidr: [10.244.0.0/16]`).
#[derive(Clone, Debug, Default, clap::Args, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentOptions {
    /// Name of the node this agent programs (endpoints on it are local). Required.
    #[arg(long, env = "WEIR_NODE_NAME")]
    pub node_name: Option<String>,

    /// Read cluster objects from this directory of Kubernetes YAML (multi-document,
    /// recursive; re-read on change).
    #[arg(long, help_heading = "Sources")]
    pub source_dir: Option<PathBuf>,
    /// Watch the API server using this kubeconfig file.
    #[arg(long, help_heading = "Sources")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of the kubeconfig to use [default: its current context].
    #[arg(long, help_heading = "Sources")]
    pub kube_context: Option<String>,
    /// Watch the API server at this URL (e.g. https://10.0.0.1:6443). With kube-proxy
    /// gone the `kubernetes` Service VIP is not reachable until weir programs it, so give
    /// the API server's real address. Uses --api-ca-file and --api-token-file.
    #[arg(long, help_heading = "Sources")]
    pub api_server: Option<String>,
    /// CA bundle (PEM) for --api-server [default: the service account's ca.crt if
    /// present].
    #[arg(long, help_heading = "Sources")]
    pub api_ca_file: Option<PathBuf>,
    /// Bearer token file for --api-server, re-read when it rotates [default: the service
    /// account's token if present].
    #[arg(long, help_heading = "Sources")]
    pub api_token_file: Option<PathBuf>,
    /// Watch the API server with in-cluster configuration (KUBERNETES_SERVICE_HOST/PORT
    /// and the service account).
    #[arg(long, help_heading = "Sources")]
    pub in_cluster: bool,
    /// Longest wait between retries after an API error, in milliseconds [default: 10000].
    #[arg(long, help_heading = "Sources")]
    pub api_retry_max_ms: Option<u64>,

    /// bpffs directory for this instance's pinned maps and links [default:
    /// /sys/fs/bpf/weir/<node-name>].
    #[arg(long, help_heading = "Datapath")]
    pub pin_dir: Option<PathBuf>,
    /// Glob patterns of the host-side pod interfaces to attach to [default:
    /// lxc*,cali*,veth*].
    #[arg(long, value_delimiter = ',', help_heading = "Datapath")]
    pub pod_ifaces: Vec<String>,
    /// Glob patterns of the node's uplink interfaces [default: eth0].
    #[arg(long, value_delimiter = ',', help_heading = "Datapath")]
    pub uplinks: Vec<String>,
    /// Keep or remove the pinned datapath when the agent exits on SIGTERM/SIGINT
    /// [default: keep].
    #[arg(long, value_enum, help_heading = "Datapath")]
    pub on_exit: Option<OnExit>,
    /// Map capacity, NAME=ENTRIES, repeatable (e.g. CT=1048576). A change that would
    /// overflow a map is refused for the objects causing it, which keep their previous
    /// state. Changing a capacity needs `weir cleanup` of the pinned maps first.
    #[arg(long, help_heading = "Datapath")]
    pub map_size: Vec<MapSize>,
    /// The cluster's pod CIDR(s), at most one per family (kube-proxy's --cluster-cidr):
    /// decides which sources are pods (masquerading, eTP=Local short-circuit).
    #[arg(long, value_delimiter = ',', help_heading = "Datapath")]
    pub cluster_cidr: Vec<ipnet::IpNet>,
    /// The service CIDR(s), at most one per family (the API server's
    /// --service-cluster-ip-range): an address in them that no Service holds is dropped,
    /// as kube-proxy's nftables mode does.
    #[arg(long, value_delimiter = ',', help_heading = "Datapath")]
    pub service_cidr: Vec<ipnet::IpNet>,
    /// Node addresses that accept NodePorts, as CIDRs (kube-proxy's
    /// --nodeport-addresses) [default: the node's primary address of each family, the
    /// nftables default]. NodePorts are never served on loopback addresses.
    #[arg(long, value_delimiter = ',', help_heading = "Datapath")]
    pub nodeport_addresses: Vec<ipnet::IpNet>,
    /// cgroup v2 directory whose sockets get socket-level load balancing (east-west
    /// traffic connected straight to backends), usually the cgroup2 root [default: off:
    /// every packet takes the per-packet path].
    #[arg(long, help_heading = "Datapath")]
    pub cgroup: Option<PathBuf>,
    /// Backend selection for every Service [default: random].
    #[arg(long, value_enum, help_heading = "Datapath")]
    pub lb_algorithm: Option<LbAlgorithm>,
    /// Entries of each Maglev lookup table; a prime [default: 1021]. Every Maglev
    /// frontend takes this many MAGLEV entries per backend set.
    #[arg(long, help_heading = "Datapath")]
    pub maglev_table_size: Option<u32>,

    /// How often to poll the source directory and the interface list, in ms [default:
    /// 200].
    #[arg(long, help_heading = "Sync")]
    pub poll_ms: Option<u64>,
    /// Quiet time after a change before programming, in ms (batches bursts) [default:
    /// 100].
    #[arg(long, help_heading = "Sync")]
    pub debounce_ms: Option<u64>,
    /// Longest a change waits while changes keep arriving, in ms [default: 1000].
    #[arg(long, help_heading = "Sync")]
    pub max_delay_ms: Option<u64>,
    /// How often idle conntrack entries are swept, in ms [default: 10000]. Sockets
    /// connected by socket LB to a removed backend are destroyed after every sync.
    #[arg(long, help_heading = "Sync")]
    pub ct_gc_interval_ms: Option<u64>,

    /// Address of the metrics server: /metrics (Prometheus text and OpenMetrics), /healthz,
    /// /readyz, /flows. "off" disables it [default: 127.0.0.1:9964: loopback, like
    /// kube-proxy's metrics address, so nothing is exposed off the node unless you say so].
    #[arg(long, help_heading = "Observability")]
    pub metrics_addr: Option<String>,
    /// Unix socket serving the same as the metrics address; `weir flows` connects to it
    /// ("off" disables) [default: /run/weir/<pin-dir name>.sock].
    #[arg(long, help_heading = "Observability")]
    pub api_socket: Option<String>,
    /// Address of kube-proxy's node health server (/healthz, /livez); "off" disables it
    /// [default: 0.0.0.0:10256, kube-proxy's].
    #[arg(long, help_heading = "Observability")]
    pub health_addr: Option<String>,
    /// Health timeout in ms: a Service or EndpointSlice change not programmed within it
    /// makes /healthz and /livez fail (kube-proxy: 2 x syncPeriod) [default: 60000].
    #[arg(long, help_heading = "Observability")]
    pub healthz_timeout_ms: Option<u64>,
    /// Do not serve the health check node ports of externalTrafficPolicy=Local
    /// LoadBalancer Services.
    #[arg(long, help_heading = "Observability")]
    pub no_service_health: bool,
    /// Service ports with their own weir_service_* series; the rest are summed into one
    /// series named "other" [default: 1000].
    #[arg(long, help_heading = "Observability")]
    pub metrics_service_limit: Option<usize>,
    /// How often the conntrack map is counted for weir_conntrack_entries, in ms
    /// [default: 5000].
    #[arg(long, help_heading = "Observability")]
    pub conntrack_scan_ms: Option<u64>,
    /// Emit flow events for new connections too (sampled, see --flow-sample); drops and
    /// rejects are always reported.
    #[arg(long, help_heading = "Observability")]
    pub flow_events: bool,
    /// One new-connection event in this many [default: 1].
    #[arg(long, help_heading = "Observability")]
    pub flow_sample: Option<u32>,
    /// Flow events per second per CPU and class (drops, new connections) the datapath may
    /// emit; the rest are counted as rate_limited [default: 1000].
    #[arg(long, help_heading = "Observability")]
    pub event_rate: Option<u64>,
    /// Burst of the flow event rate limit [default: 1000].
    #[arg(long, help_heading = "Observability")]
    pub event_burst: Option<u64>,
    /// Log every flow event as a structured line (target weir::flow, level info).
    #[arg(long, help_heading = "Observability")]
    pub flow_log: bool,

    /// Enter this network namespace (by name, /run/netns) before starting.
    #[arg(long)]
    pub netns: Option<String>,

    /// Log level (config file only; the global --log-level flag wins).
    #[arg(skip)]
    pub log_level: Option<String>,
    /// Log format (config file only; the global --log-format flag wins).
    #[arg(skip)]
    pub log_format: Option<LogFormat>,
}

fn or_vec<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
    if a.is_empty() { b } else { a }
}

impl AgentOptions {
    /// Reads a config file.
    pub fn from_file(path: &std::path::Path) -> Result<AgentOptions> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(AgentOptions::default());
        }
        serde_yaml::from_str(&text).with_context(|| format!("config file {}", path.display()))
    }

    /// `self` (the command line) over `file`.
    pub fn over(self, file: AgentOptions) -> AgentOptions {
        AgentOptions {
            node_name: self.node_name.or(file.node_name),
            source_dir: self.source_dir.or(file.source_dir),
            kubeconfig: self.kubeconfig.or(file.kubeconfig),
            kube_context: self.kube_context.or(file.kube_context),
            api_server: self.api_server.or(file.api_server),
            api_ca_file: self.api_ca_file.or(file.api_ca_file),
            api_token_file: self.api_token_file.or(file.api_token_file),
            in_cluster: self.in_cluster || file.in_cluster,
            api_retry_max_ms: self.api_retry_max_ms.or(file.api_retry_max_ms),
            pin_dir: self.pin_dir.or(file.pin_dir),
            pod_ifaces: or_vec(self.pod_ifaces, file.pod_ifaces),
            uplinks: or_vec(self.uplinks, file.uplinks),
            on_exit: self.on_exit.or(file.on_exit),
            map_size: or_vec(self.map_size, file.map_size),
            cluster_cidr: or_vec(self.cluster_cidr, file.cluster_cidr),
            service_cidr: or_vec(self.service_cidr, file.service_cidr),
            nodeport_addresses: or_vec(self.nodeport_addresses, file.nodeport_addresses),
            cgroup: self.cgroup.or(file.cgroup),
            lb_algorithm: self.lb_algorithm.or(file.lb_algorithm),
            maglev_table_size: self.maglev_table_size.or(file.maglev_table_size),
            poll_ms: self.poll_ms.or(file.poll_ms),
            debounce_ms: self.debounce_ms.or(file.debounce_ms),
            max_delay_ms: self.max_delay_ms.or(file.max_delay_ms),
            ct_gc_interval_ms: self.ct_gc_interval_ms.or(file.ct_gc_interval_ms),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            api_socket: self.api_socket.or(file.api_socket),
            health_addr: self.health_addr.or(file.health_addr),
            healthz_timeout_ms: self.healthz_timeout_ms.or(file.healthz_timeout_ms),
            no_service_health: self.no_service_health || file.no_service_health,
            metrics_service_limit: self.metrics_service_limit.or(file.metrics_service_limit),
            conntrack_scan_ms: self.conntrack_scan_ms.or(file.conntrack_scan_ms),
            flow_events: self.flow_events || file.flow_events,
            flow_sample: self.flow_sample.or(file.flow_sample),
            event_rate: self.event_rate.or(file.event_rate),
            event_burst: self.event_burst.or(file.event_burst),
            flow_log: self.flow_log || file.flow_log,
            netns: self.netns.or(file.netns),
            log_level: self.log_level.or(file.log_level),
            log_format: self.log_format.or(file.log_format),
        }
    }

    /// Validates and applies the defaults.
    pub fn resolve(self) -> Result<AgentConfig> {
        let Some(node_name) = self.node_name.filter(|n| !n.is_empty()) else {
            bail!("--node-name (or node-name in the config file, or WEIR_NODE_NAME) is required");
        };
        if self.source_dir.is_none()
            && self.kubeconfig.is_none()
            && self.api_server.is_none()
            && !self.in_cluster
        {
            bail!(
                "no source of cluster objects: give --source-dir, --kubeconfig, --api-server or --in-cluster"
            );
        }
        for (flag, nets) in [
            ("--cluster-cidr", &self.cluster_cidr),
            ("--service-cidr", &self.service_cidr),
        ] {
            let v4 = nets.iter().filter(|n| n.addr().is_ipv4()).count();
            if v4 > 1 || nets.len() - v4 > 1 {
                bail!(
                    "{flag}: at most one CIDR per family, got {}",
                    nets.iter()
                        .map(|c| c.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        let maglev_table_size = self
            .maglev_table_size
            .unwrap_or(weir_common::maps::DEFAULT_MAGLEV_TABLE_SIZE);
        if maglev_table_size < 2 || !weir_core::maglev::is_prime(maglev_table_size) {
            bail!("--maglev-table-size {maglev_table_size} is not a prime");
        }
        if maglev_table_size > 131071 {
            bail!("--maglev-table-size {maglev_table_size} is larger than 131071");
        }
        let mut capacities = BTreeMap::new();
        for m in self.map_size {
            capacities.insert(m.name, m.entries);
        }
        let pin_dir = self
            .pin_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_ROOT).join(&node_name));
        let ms = Duration::from_millis;
        let poll = ms(self.poll_ms.unwrap_or(200).max(10));
        let addr = |flag: &str, v: Option<String>, default: Option<std::net::SocketAddr>| match v
            .as_deref()
        {
            None => Ok(default),
            Some("off") | Some("") => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .with_context(|| format!("{flag} {s:?} is not an address:port (or off)")),
        };
        let defaults = ObserveConfig::default();
        let observe = ObserveConfig {
            metrics_addr: addr("--metrics-addr", self.metrics_addr, defaults.metrics_addr)?,
            health_addr: addr("--health-addr", self.health_addr, defaults.health_addr)?,
            api_socket: match self.api_socket.as_deref() {
                Some("off") | Some("") => None,
                Some(p) => Some(PathBuf::from(p)),
                None => Some(crate::observe::default_api_socket(&pin_dir)),
            },
            healthz_timeout: self
                .healthz_timeout_ms
                .map(ms)
                .unwrap_or(defaults.healthz_timeout),
            service_health: !self.no_service_health,
            service_limit: self.metrics_service_limit.unwrap_or(defaults.service_limit),
            ct_scan: ms(self.conntrack_scan_ms.unwrap_or(5000).max(100)),
            flow_log: self.flow_log,
        };
        let events = EventSettings {
            rate: self
                .event_rate
                .unwrap_or(weir_common::events::DEFAULT_EVENT_RATE)
                .max(1),
            burst: self
                .event_burst
                .unwrap_or(weir_common::events::DEFAULT_EVENT_BURST)
                .max(1),
            flow_sample: self.flow_sample.unwrap_or(1).max(1),
        };
        let flags = if self.flow_events {
            weir_common::config::CFG_F_FLOW_EVENTS
        } else {
            0
        };
        Ok(AgentConfig {
            kube: KubeOptions {
                kubeconfig: self.kubeconfig,
                context: self.kube_context,
                api_server: self.api_server,
                ca_file: self.api_ca_file,
                token_file: self.api_token_file,
                in_cluster: self.in_cluster,
            },
            watch: WatchOptions {
                backoff_max: ms(self.api_retry_max_ms.unwrap_or(10_000).max(100)),
                ..Default::default()
            },
            source_dir: self.source_dir,
            pin_dir,
            pod_ifaces: if self.pod_ifaces.is_empty() {
                vec!["lxc*".into(), "cali*".into(), "veth*".into()]
            } else {
                self.pod_ifaces
            },
            uplinks: if self.uplinks.is_empty() {
                vec!["eth0".into()]
            } else {
                self.uplinks
            },
            on_exit: self.on_exit.unwrap_or(OnExit::Keep),
            capacities,
            poll,
            sync: LoopConfig {
                settings: NodeSettings {
                    node_name: node_name.clone(),
                    flags,
                    cluster_cidrs: self.cluster_cidr,
                    service_cidrs: self.service_cidr,
                    nodeport_cidrs: self.nodeport_addresses,
                    compile: CompileOptions {
                        maglev_table_size,
                        maglev_all: self.lb_algorithm == Some(LbAlgorithm::Maglev),
                        node_ips: Vec::new(),
                    },
                    ..Default::default()
                },
                debounce: ms(self.debounce_ms.unwrap_or(100)),
                max_delay: ms(self.max_delay_ms.unwrap_or(1000)),
                retry: ms(1000),
                housekeeping: poll,
            },
            cgroup: self.cgroup,
            ct_gc_interval: ms(self.ct_gc_interval_ms.unwrap_or(10_000).max(100)),
            node_name,
            observe,
            events,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: AgentOptions = serde_yaml::from_str(
            "node-name: from-file\nsource-dir: /srv/objects\nmap-size: [CT=1000, SERVICES=10]\ncluster-cidr: [10.244.0.0/16]\nlb-algorithm: maglev\nmaglev-table-size: 251\ndebounce-ms: 5\n",
        )
        .unwrap();
        let cli = AgentOptions {
            node_name: Some("from-flag".into()),
            map_size: vec!["BACKENDS=7".parse().unwrap()],
            ..Default::default()
        };
        let c = cli.over(file).resolve().unwrap();
        assert_eq!(c.node_name, "from-flag");
        assert_eq!(c.source_dir, Some(PathBuf::from("/srv/objects")));
        assert_eq!(c.capacities, BTreeMap::from([("BACKENDS".to_string(), 7)]));
        assert_eq!(c.sync.settings.cluster_cidrs.len(), 1);
        assert!(c.sync.settings.compile.maglev_all);
        assert_eq!(c.sync.settings.compile.maglev_table_size, 251);
        assert_eq!(c.sync.debounce, Duration::from_millis(5));
        assert_eq!(c.sync.max_delay, Duration::from_millis(1000));
        assert_eq!(c.pin_dir, PathBuf::from("/sys/fs/bpf/weir/from-flag"));
        assert_eq!(c.uplinks, ["eth0"]);
        assert_eq!(c.on_exit, OnExit::Keep);
    }

    #[test]
    fn bad_values_are_refused_with_a_clear_message() {
        let e = serde_yaml::from_str::<AgentOptions>("nod-name: x\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `nod-name`"), "{e}");
        let e = "FOO=1".parse::<MapSize>().unwrap_err();
        assert!(e.contains("unknown map \"FOO\""), "{e}");
        let o = |y: &str| {
            serde_yaml::from_str::<AgentOptions>(y)
                .unwrap()
                .resolve()
                .unwrap_err()
                .to_string()
        };
        assert!(
            o("node-name: n\nsource-dir: /x\nmaglev-table-size: 1000\n").contains("not a prime")
        );
        assert!(
            o("node-name: n\nsource-dir: /x\ncluster-cidr: [10.0.0.0/8, 10.1.0.0/16]\n")
                .contains("at most one CIDR per family")
        );
        assert!(o("source-dir: /x\n").contains("--node-name"));
        assert!(o("node-name: n\n").contains("no source of cluster objects"));
    }

    /// Every option of `weir agent` is documented in docs/agent.md.
    #[test]
    fn every_option_is_documented() {
        use clap::Args as _;
        let cmd = AgentOptions::augment_args(clap::Command::new("agent"));
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent.md"))
            .unwrap();
        let mut n = 0;
        for a in cmd.get_arguments() {
            if let Some(long) = a.get_long() {
                n += 1;
                assert!(
                    doc.contains(&format!("`--{long}")),
                    "--{long} is not documented in docs/agent.md"
                );
            }
        }
        assert!(n >= 20, "{n} options");
    }
}
