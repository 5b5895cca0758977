//! The `weir lab` subcommands. Every command prints JSON on stdout (logs go to stderr)
//! and exits non-zero with a message naming what failed.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use serde::Serialize;

use super::{
    DEFAULT_NAME, Names,
    matrix::{self, MatrixOptions},
    probe::{self, ProbeOptions, Proto},
    spec::{self, Family, Input, LabConfig},
    state::{self, DownReport, Leftovers, Lock},
    topology::Lab,
    view::{self, LabView},
};

#[derive(Args, Debug)]
pub struct LabArgs {
    #[command(subcommand)]
    pub cmd: LabCmd,
}

#[derive(Args, Debug, Clone)]
pub struct NameArg {
    /// Name of the lab (1-12 lowercase letters and digits).
    #[arg(long, env = "WEIR_LAB_NAME", default_value = DEFAULT_NAME)]
    pub name: String,
}

#[derive(Args, Debug, Clone)]
pub struct WaitArg {
    /// How long to wait for every agent to program the new objects.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

#[derive(Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab from Kubernetes YAML files or directories; returns when every agent has
    /// programmed what it read.
    Up {
        #[command(flatten)]
        name: NameArg,
        #[command(flatten)]
        wait: WaitArg,
        /// Cluster pod CIDR (one per IP family; overrides a LabConfig document).
        #[arg(long = "pod-cidr", value_delimiter = ',')]
        pod_cidrs: Vec<IpNet>,
        /// Service CIDR (one per IP family).
        #[arg(long = "service-cidr", value_delimiter = ',')]
        service_cidrs: Vec<IpNet>,
        /// Leave what was built in place when `up` fails (for debugging; remove it with
        /// `weir lab down`).
        #[arg(long)]
        keep_on_failure: bool,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Create or replace objects (whole objects, label changes included); returns when
    /// every agent has programmed the new state.
    Apply {
        #[command(flatten)]
        name: NameArg,
        #[command(flatten)]
        wait: WaitArg,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Delete objects by KIND/NAMESPACE/NAME (cluster-scoped kinds: KIND/NAME); returns
    /// when every agent has programmed the new state.
    Delete {
        #[command(flatten)]
        name: NameArg,
        #[command(flatten)]
        wait: WaitArg,
        #[arg(required = true)]
        objects: Vec<String>,
    },
    /// Connect from a pod, node or the external client to a pod, Service, NodePort or
    /// address, and report every attempt.
    Probe {
        #[command(flatten)]
        name: NameArg,
        /// NS/POD, node/NODE, or external[:IP][@NODE].
        #[arg(long)]
        from: String,
        /// NS/POD, svc/NS/NAME, nodeport/NODE/NS/NAME, lb/NS/NAME, or an IP address.
        #[arg(long)]
        to: String,
        /// Destination port (for nodeport/: the Service port, or the nodePort itself).
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        protocol: Proto,
        /// Number of connections (each a new connection, one after the other).
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Per-attempt timeout.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Fixed client source port (every attempt reuses it).
        #[arg(long)]
        source_port: Option<u16>,
        /// Address family of the destination when it has both (IPv4 or IPv6).
        #[arg(long, value_parser = parse_family)]
        family: Option<Family>,
    },
    /// Probe every pod to every pod at once and print the reachability matrix.
    Matrix {
        #[command(flatten)]
        name: NameArg,
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value_t = Proto::Tcp)]
        protocol: Proto,
        /// Probe each destination pod through a ClusterIP Service that selects it (as the
        /// upstream NetworkPolicy e2e suite does) instead of its pod IP.
        #[arg(long)]
        to_service: bool,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        #[arg(long, value_parser = parse_family)]
        family: Option<Family>,
    },
    /// Show labs (all, or the one named).
    Status {
        /// Only this lab.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a lab (everything carrying its names, also after a crash).
    Down {
        /// The lab to remove (default: "lab" unless --all).
        #[arg(long, env = "WEIR_LAB_NAME")]
        name: Option<String>,
        /// Remove every lab on this machine.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Kill a node's agent with SIGKILL (as a crash would) and start a new one, which
    /// adopts the pinned datapath; returns once the new agent is ready.
    KillAgent {
        #[command(flatten)]
        name: NameArg,
        #[command(flatten)]
        wait: WaitArg,
        /// The node whose agent to kill and restart.
        node: String,
    },
    /// Build the example cluster (examples/demo), show live probes, explain, clean up.
    Demo {
        #[arg(long, default_value = "demo")]
        name: String,
        /// Directory of the demo YAML (default: examples/demo of this checkout, or the
        /// copy built into weir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the lab running at the end.
        #[arg(long)]
        keep: bool,
    },
    /// Internal: run a probe job (JSON on stdin) in the current namespace.
    #[command(name = "_probe-worker", hide = true)]
    ProbeWorker,
}

fn parse_family(s: &str) -> Result<Family, String> {
    Family::parse(s).ok_or_else(|| format!("{s:?}: expected IPv4 or IPv6"))
}

fn print<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

const LOCK_WAIT: Duration = Duration::from_secs(120);

/// `weir lab up` as a library call (the demo and tests use it).
pub fn up(
    name: &str,
    paths: &[PathBuf],
    pod_cidrs: &[IpNet],
    service_cidrs: &[IpNet],
    timeout: Duration,
    keep_on_failure: bool,
    created_by: &str,
) -> Result<LabView> {
    super::check_name(name)?;
    let _lock = Lock::acquire(name, LOCK_WAIT)?;
    // Everything is read and checked before anything is created.
    let loaded = spec::load_paths(paths)?;
    let cfg = LabConfig::build(loaded.config.as_ref(), pod_cidrs, service_cidrs)?;
    let mut input = Input::default();
    input.apply(loaded.objects)?;
    if input.is_empty() {
        bail!("no Kubernetes objects in the given files");
    }
    spec::resolve(&input, &cfg, None)?;
    let exe = std::env::current_exe().context("finding the weir binary")?;
    let mut lab = Lab::create(name, cfg, &exe, created_by)?;
    tracing::debug!(lab = name, dir = %lab.dir.display(), "building the lab");
    match lab.converge(input, timeout) {
        Ok(generation) => {
            tracing::debug!(lab = name, generation, "lab is up and programmed");
            let mut v = view::lab_view(&lab, None);
            v.warnings.extend(loaded.warnings);
            Ok(v)
        }
        Err(e) if keep_on_failure => Err(e.context(format!(
            "lab up failed; what was built is left in place (remove it with `weir lab down --name {name}`)"
        ))),
        Err(e) => {
            let r = state::down(&Names::new(name));
            let note = if r.remaining.is_empty() {
                "everything it created was removed".to_string()
            } else {
                format!("could not remove: {}", r.remaining.join("; "))
            };
            Err(e.context(format!("lab up failed; {note}")))
        }
    }
}

/// `weir lab apply` as a library call.
pub fn apply(name: &str, paths: &[PathBuf], timeout: Duration) -> Result<LabView> {
    let _lock = Lock::acquire(name, LOCK_WAIT)?;
    let mut lab = Lab::open(name)?;
    let loaded = spec::load_paths(paths)?;
    if let Some(doc) = &loaded.config {
        let c = LabConfig::build(Some(doc), &[], &[])?;
        if c != lab.state.config {
            bail!(
                "a LabConfig document can only be given to `weir lab up` (the lab's addressing is fixed while it runs)"
            );
        }
    }
    let mut input = lab.state.input.clone();
    let changes = input.apply(loaded.objects)?;
    lab.converge(input, timeout)?;
    let mut v = view::lab_view(&lab, Some(changes));
    v.warnings.extend(loaded.warnings);
    Ok(v)
}

/// `weir lab delete` as a library call.
pub fn delete(name: &str, objects: &[String], timeout: Duration) -> Result<LabView> {
    let _lock = Lock::acquire(name, LOCK_WAIT)?;
    let mut lab = Lab::open(name)?;
    let mut input = lab.state.input.clone();
    let mut changes = Vec::new();
    for o in objects {
        changes.extend(input.delete(o)?);
    }
    lab.converge(input, timeout)?;
    Ok(view::lab_view(&lab, Some(changes)))
}

/// `weir lab down` for one lab.
pub fn down(name: &str) -> Result<DownReport> {
    super::check_name(name)?;
    let lock = Lock::acquire(name, LOCK_WAIT)?;
    let r = state::down(&Names::new(name));
    lock.remove_file();
    Ok(r)
}

#[derive(Serialize)]
#[serde(untagged)]
enum StatusEntry {
    Lab(Box<LabView>),
    /// A lab whose state cannot be read (a crashed `up`): what carries its names.
    Broken {
        lab: String,
        error: String,
        leftovers: Leftovers,
    },
}

fn status_of(name: &str) -> StatusEntry {
    match Lab::open(name) {
        Ok(lab) => StatusEntry::Lab(Box::new(view::lab_view(&lab, None))),
        Err(e) => StatusEntry::Broken {
            lab: name.to_string(),
            error: format!("{e:#}"),
            leftovers: state::find_leftovers(&Names::new(name)),
        },
    }
}

#[derive(Serialize)]
struct Labs<T> {
    labs: Vec<T>,
}

pub fn run(args: LabArgs) -> Result<()> {
    match args.cmd {
        LabCmd::Up {
            name,
            wait,
            pod_cidrs,
            service_cidrs,
            keep_on_failure,
            paths,
        } => print(&up(
            &name.name,
            &paths,
            &pod_cidrs,
            &service_cidrs,
            Duration::from_secs(wait.timeout_s),
            keep_on_failure,
            "up",
        )?),
        LabCmd::Apply { name, wait, paths } => print(&apply(
            &name.name,
            &paths,
            Duration::from_secs(wait.timeout_s),
        )?),
        LabCmd::Delete {
            name,
            wait,
            objects,
        } => print(&delete(
            &name.name,
            &objects,
            Duration::from_secs(wait.timeout_s),
        )?),
        LabCmd::Probe {
            name,
            from,
            to,
            port,
            protocol,
            count,
            timeout_ms,
            source_port,
            family,
        } => {
            let lab = Lab::open(&name.name)?;
            print(&probe::probe(
                &lab,
                &ProbeOptions {
                    from,
                    to,
                    port,
                    protocol,
                    count,
                    timeout_ms,
                    source_port,
                    family,
                },
            )?)
        }
        LabCmd::Matrix {
            name,
            port,
            protocol,
            to_service,
            timeout_ms,
            family,
        } => {
            let lab = Lab::open(&name.name)?;
            let m = matrix::matrix(
                &lab,
                &MatrixOptions {
                    port,
                    protocol,
                    to_service,
                    timeout_ms,
                    family,
                },
            )?;
            eprint!("{}", m.table);
            print(&m)
        }
        LabCmd::Status { name } => {
            let names: Vec<String> = match name {
                Some(n) => {
                    super::check_name(&n)?;
                    vec![n]
                }
                None => state::all_labs().into_iter().collect(),
            };
            print(&Labs {
                labs: names.iter().map(|n| status_of(n)).collect(),
            })
        }
        LabCmd::Down { name, all } => {
            let names: Vec<String> = if all {
                state::all_labs().into_iter().collect()
            } else {
                vec![name.unwrap_or_else(|| DEFAULT_NAME.to_string())]
            };
            let reports = names.iter().map(|n| down(n)).collect::<Result<Vec<_>>>()?;
            print(&Labs {
                labs: reports.clone(),
            })?;
            let left: Vec<String> = reports.iter().flat_map(|r| r.remaining.clone()).collect();
            if !left.is_empty() {
                bail!("some things could not be removed: {}", left.join("; "));
            }
            Ok(())
        }
        LabCmd::KillAgent { name, wait, node } => {
            let _lock = Lock::acquire(&name.name, LOCK_WAIT)?;
            let mut lab = Lab::open(&name.name)?;
            let (old_pid, new_pid) =
                lab.kill_and_restart_agent(&node, Duration::from_secs(wait.timeout_s))?;
            print(&serde_json::json!({
                "node": node,
                "killedPid": old_pid,
                "agentPid": new_pid,
                "ready": true,
            }))
        }
        LabCmd::Demo { name, dir, keep } => {
            let report = super::demo::run(&name, dir, keep)?;
            print(&report)
        }
        LabCmd::ProbeWorker => probe::worker_main(),
    }
}
