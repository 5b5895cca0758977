//! The `weir` command: the node agent, the demo, and the inspection tools.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use weir::{
    config::AgentOptions,
    inspect::{self, InspectArgs},
    logging::{self, LogFormat},
};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "An eBPF kube-proxy replacement and NetworkPolicy enforcer"
)]
struct Cli {
    /// Log level filter (also RUST_LOG), e.g. info, debug, weir=debug [default: info].
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
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
    /// Service frontends and their backends, from the live maps (like `cilium-dbg bpf lb
    /// list`).
    Services(InspectArgs),
    /// Backends, from the live maps, with the frontends that use them.
    Endpoints(InspectArgs),
    /// Connection tracking entries, from the live maps.
    Conntrack(inspect::ConntrackArgs),
    /// The path a packet would take and every decision on it, from the live maps.
    Explain(inspect::ExplainArgs),
    /// What a pod may send and receive (NetworkPolicy; arrives with issue 5).
    Policy(inspect::PolicyArgs),
    /// Flow and drop events of the datapath, from the running agent (`-f` to follow).
    Flows(inspect::FlowsArgs),
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
    /// YAML config file with the same option names (`node-name: n1`); flags given on
    /// the command line win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    opts: AgentOptions,
}

fn main() {
    let cli = Cli::parse();
    // kube's TLS stack needs a process-wide crypto provider (it panics without one).
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    let init_logs = |level: Option<String>, format: Option<LogFormat>| {
        logging::init(
            cli.log_level
                .as_deref()
                .or(level.as_deref())
                .unwrap_or("info"),
            cli.log_format.or(format).unwrap_or_default(),
        )
    };
    match cli.cmd {
        Cmd::Agent(a) => {
            let file = match &a.config {
                Some(p) => AgentOptions::from_file(p)?,
                None => AgentOptions::default(),
            };
            let opts = a.opts.over(file);
            init_logs(opts.log_level.clone(), opts.log_format);
            // setns must happen before the runtime spawns its threads: new threads inherit
            // the namespace of the thread that creates them.
            if let Some(ns) = &opts.netns {
                weir::netns::enter(ns)?;
            }
            let cfg = opts.resolve()?;
            runtime()?.block_on(weir::agent::run(cfg, shutdown_signal()))
        }
        Cmd::Services(a) => {
            init_logs(None, None);
            inspect::services(&a)
        }
        Cmd::Endpoints(a) => {
            init_logs(None, None);
            inspect::endpoints(&a)
        }
        Cmd::Conntrack(a) => {
            init_logs(None, None);
            inspect::conntrack(&a)
        }
        Cmd::Explain(a) => {
            init_logs(None, None);
            inspect::explain(&a)
        }
        Cmd::Policy(a) => {
            init_logs(None, None);
            inspect::policy(&a)
        }
        Cmd::Flows(a) => {
            init_logs(None, None);
            inspect::flows(&a)
        }
        Cmd::Demo { connections } => {
            init_logs(None, None);
            let per = weir::demo::run(connections)?;
            if per.len() < 2 {
                bail!("only {} backend(s) answered: {per:?}", per.len());
            }
            Ok(())
        }
        Cmd::Lab(args) => weir::lab::cli::run(args),
        Cmd::Cleanup { pin_dir } => {
            init_logs(None, None);
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
            weir::probe::run(
                to,
                udp,
                connected,
                std::time::Duration::from_millis(timeout_ms),
            );
            Ok(())
        }
        Cmd::Serve {
            identity,
            netns,
            bind,
            tcp,
            udp,
        } => {
            init_logs(None, None);
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
