//! The `weir` command: the node agent, the demo, and the inspection tools.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use weir::{
    agent::{self, AgentConfig, OnExit},
    datapath::DEFAULT_BPFFS_ROOT,
    logging::{self, LogFormat},
};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "An eBPF kube-proxy replacement and NetworkPolicy enforcer"
)]
struct Cli {
    /// Log level filter (also RUST_LOG), e.g. info, debug, weir=debug.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Agent(AgentArgs),
    /// Show weir balancing a ClusterIP in a throwaway network namespace.
    Demo {
        /// Number of connections to make.
        #[arg(long, default_value_t = 20)]
        connections: usize,
    },
    /// A mini-cluster of network namespaces from Kubernetes YAML: real servers, one agent
    /// per node, probes (JSON on stdout).
    Lab(weir::lab::cli::LabArgs),
    /// Remove an instance's pinned maps and links.
    Cleanup {
        #[arg(long)]
        pin_dir: PathBuf,
    },
    /// Make one connection (or UDP exchange) and print the outcome as JSON (tests, lab).
    #[command(hide = true)]
    ProbeOnce {
        /// Enter this network namespace first.
        #[arg(long)]
        netns: Option<String>,
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        udp: bool,
        /// UDP: connect() the socket instead of sendto/recvfrom.
        #[arg(long)]
        connected: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Run the identity server used by lab pods.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        identity: String,
        /// Enter this network namespace first.
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, value_delimiter = ',')]
        bind: Vec<std::net::IpAddr>,
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Name of the node this agent programs (endpoints on it are local).
    #[arg(long, env = "WEIR_NODE_NAME")]
    node_name: String,
    /// Read cluster objects from this directory of Kubernetes YAML (reloaded on change).
    #[arg(long)]
    source_dir: PathBuf,
    /// bpffs directory for this instance's pinned maps and links.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Glob patterns of the host-side pod interfaces to attach to.
    #[arg(long, value_delimiter = ',', default_value = "lxc*,cali*,veth*")]
    pod_ifaces: Vec<String>,
    /// Glob patterns of the node's uplink interfaces.
    #[arg(long, value_delimiter = ',', default_value = "eth0")]
    uplinks: Vec<String>,
    /// Keep or remove the pinned datapath when the agent exits on SIGTERM/SIGINT.
    #[arg(long, value_enum, default_value_t = OnExit::Keep)]
    on_exit: OnExit,
    /// Map capacity overrides, NAME=ENTRIES (e.g. CT=1048576).
    #[arg(long = "map-size", value_parser = parse_kv)]
    map_sizes: Vec<(String, u32)>,
    /// How often to poll the source and the interface list.
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Quiet time after a change before programming (batches bursts).
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Enter this network namespace (by name, /run/netns) before starting.
    #[arg(long)]
    netns: Option<String>,
    /// The cluster's pod CIDRs, one per family (kube-proxy's --cluster-cidr): sources in
    /// them are pods, which decides masquerading and the eTP=Local short-circuit.
    #[arg(long, value_delimiter = ',')]
    cluster_cidr: Vec<ipnet::IpNet>,
    /// The service CIDRs, one per family: unallocated addresses in them are dropped.
    #[arg(long, value_delimiter = ',')]
    service_cidr: Vec<ipnet::IpNet>,
    /// Node addresses that accept NodePorts, as CIDRs (kube-proxy's --nodeport-addresses).
    /// Empty: the node's primary address of each family (the nftables default).
    /// NodePorts are never served on loopback addresses.
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<ipnet::IpNet>,
    /// Backend selection for every Service: random (kube-proxy's), or maglev
    /// (consistent hashing; per Service with the annotation weir.dev/lb-algorithm: maglev).
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Random)]
    lb_algorithm: LbAlgorithm,
    /// cgroup v2 directory whose sockets get socket-level load balancing (east-west
    /// traffic connected straight to backends); usually the cgroup root. Unset: off, all
    /// traffic takes the per-packet path.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Entries of each Maglev lookup table (a prime, e.g. 251, 1021, 4093, 16381).
    #[arg(long, default_value_t = weir_common::maps::DEFAULT_MAGLEV_TABLE_SIZE, value_parser = parse_prime)]
    maglev_table_size: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LbAlgorithm {
    Random,
    Maglev,
}

fn parse_prime(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !weir_core::maglev::is_prime(n) || n > 1 << 20 {
        return Err(format!(
            "{n} must be a prime up to 1048576 (e.g. 1021, 16381)"
        ));
    }
    Ok(n)
}

fn parse_kv(s: &str) -> Result<(String, u32), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ENTRIES, got {s:?}"))?;
    let v: u32 = v.parse().map_err(|_| format!("{v:?} is not a number"))?;
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
    Ok((k.to_string(), v))
}

fn main() {
    let cli = Cli::parse();
    logging::init(&cli.log_level, cli.log_format);
    if let Err(e) = real_main(cli) {
        eprintln!("weir: error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent(a) => {
            // setns must happen before the runtime spawns its threads: new threads inherit
            // the namespace of the thread that creates them.
            if let Some(ns) = &a.netns {
                weir::netns::enter(ns)?;
            }
            let pin_dir = a
                .pin_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_ROOT).join(&a.node_name));
            let cfg = AgentConfig {
                node_name: a.node_name,
                source_dir: a.source_dir,
                pin_dir,
                pod_ifaces: a.pod_ifaces,
                uplinks: a.uplinks,
                on_exit: a.on_exit,
                capacities: a.map_sizes.into_iter().collect::<BTreeMap<_, _>>(),
                poll: Duration::from_millis(a.poll_ms.max(10)),
                debounce: Duration::from_millis(a.debounce_ms),
                node: weir_core::pipeline::NodeSettings {
                    cluster_cidrs: a.cluster_cidr,
                    service_cidrs: a.service_cidr,
                    nodeport_cidrs: a.nodeport_addresses,
                    compile: weir_core::compile::CompileOptions {
                        maglev_table_size: a.maglev_table_size,
                        maglev_all: a.lb_algorithm == LbAlgorithm::Maglev,
                        node_ips: Vec::new(),
                    },
                    ..Default::default()
                },
                cgroup: a.cgroup,
            };
            runtime()?.block_on(agent::run(cfg, shutdown_signal()))
        }
        Cmd::Demo { connections } => {
            let per = weir::demo::run(connections)?;
            if per.len() < 2 {
                bail!("only {} backend(s) answered: {per:?}", per.len());
            }
            Ok(())
        }
        Cmd::Lab(args) => weir::lab::cli::run(args),
        Cmd::Cleanup { pin_dir } => {
            if !pin_dir.starts_with("/sys/fs/bpf") {
                bail!(
                    "refusing to remove {}: not under /sys/fs/bpf",
                    pin_dir.display()
                );
            }
            std::fs::remove_dir_all(&pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))
        }
        Cmd::ProbeOnce {
            netns,
            to,
            udp,
            connected,
            timeout_ms,
        } => {
            if let Some(ns) = &netns {
                weir::netns::enter(ns)?;
            }
            weir::probe::run(to, udp, connected, Duration::from_millis(timeout_ms));
            Ok(())
        }
        Cmd::Serve {
            identity,
            netns,
            bind,
            tcp,
            udp,
        } => {
            if let Some(ns) = &netns {
                weir::netns::enter(ns)?;
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(weir::serve::serve(identity, bind, tcp, udp))
        }
    }
}
