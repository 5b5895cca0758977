//! Building and changing a running lab: namespaces, veths, routes, cgroups, servers,
//! agents; publishing the objects the agents read; waiting until they are programmed.
//!
//! ```text
//!                         wl-<lab>-fabric  (routes: node IP /32 -> n<i>,
//!                         │  │   │          node pod CIDRs via node IP, stray pod /32s,
//!                 ┌───────┘  │   └──────┐   LB IPs and externalIPs via the entry node)
//!                n0         n1          ext
//!                 │          │           │
//!   eth0 wl-<lab>-n-<node-a> │       eth0 wl-<lab>-ext   (external client; per-probe
//!     lxc0  lxc1  ...        │                             source addresses)
//!      │     │         eth0 wl-<lab>-n-<node-b>
//!    eth0   eth0         lxc0 ...
//!   pod ns  pod ns
//! ```
//!
//! Every link is a routed veth with fixed MACs and permanent neighbour entries (the
//! Calico-style gateway trick of agent/src/demo.rs, used at every hop): a pod's eth0 has
//! its IP/32 (v6: /128) and a default route via 169.254.1.1 (v6: fe80::1) whose MAC is the
//! host side's ee:ee:ee:ee:ee:ee; the node routes the pod IP to its lxc veth with a
//! permanent neighbour for the pod's MAC. Nodes do the same towards the fabric, so no
//! ARP or neighbour discovery ever happens (nothing to wait for, nothing flaky). Each
//! node blackholes its pod CIDRs: traffic to an unused pod address is dropped there
//! instead of looping between node and fabric.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use tracing::debug;

use super::{
    Names,
    spec::{self, Family, Input, LabConfig, Resolved},
    state::{self, NodeRt, Proc, State, WorkloadRt, write_atomic},
};
use crate::{agent::GENERATION_FILE, datapath::AyaDatapath, netns};

/// MAC of every "gateway" side: pod host-side veths, the fabric side of node uplinks
/// and of the external link. Peers reach it through a permanent neighbour entry.
pub const GW_MAC: &str = "ee:ee:ee:ee:ee:ee";
pub const GW_V4: &str = "169.254.1.1";
pub const GW_V6: &str = "fe80::1";
/// MAC of the external client's interface.
pub const EXT_MAC: &str = "02:00:00:ff:ff:01";
/// Default external client addresses (RFC 5737 / RFC 3849 documentation ranges).
pub const EXTERNAL_V4: &str = "203.0.113.2";
pub const EXTERNAL_V6: &str = "2001:db8:113::2";
/// File in the objects directory that changes with every generation. The agent's
/// directory source notices changes of `*.yaml` files only, and reads the generation
/// file after the objects: writing this marker *after* `.weir-generation` guarantees
/// that the agent re-reads once more after the generation file is final, so it always
/// ends up reporting the generation of what it read.
pub const GENERATION_MARKER: &str = "generation.yaml";
pub const OBJECTS_FILE: &str = "cluster.yaml";

/// A running lab: its names, state directory and state.
pub struct Lab {
    pub names: Names,
    pub dir: PathBuf,
    pub state: State,
}

fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

fn addr_add(ip: &IpAddr, dev: &str) -> String {
    match ip {
        IpAddr::V4(_) => format!("addr add {ip}/32 dev {dev}"),
        IpAddr::V6(_) => format!("addr add {ip}/128 dev {dev} nodad"),
    }
}

/// Default route of an endpoint (pod, node, external client) through its gateway
/// link `dev`, for the given families.
fn gateway_lines(dev: &str, families: &BTreeSet<Family>) -> Vec<String> {
    let mut v = vec![format!("link set {dev} up")];
    if families.contains(&Family::IPv4) {
        v.push(format!("route add {GW_V4} dev {dev} scope link"));
        v.push(format!(
            "neigh replace {GW_V4} lladdr {GW_MAC} dev {dev} nud permanent"
        ));
        v.push(format!("route add default via {GW_V4} dev {dev}"));
    }
    if families.contains(&Family::IPv6) {
        v.push(format!(
            "neigh replace {GW_V6} lladdr {GW_MAC} dev {dev} nud permanent"
        ));
        v.push(format!("route add default via {GW_V6} dev {dev}"));
    }
    v
}

/// The fabric's own address in a node CIDR: its first host (`.1`, `::1`; not the IPv6
/// subnet-router anycast address, which `hosts()` would yield first).
pub fn fabric_address(c: &IpNet) -> Option<IpAddr> {
    match c {
        IpNet::V4(n) => n.hosts().next().map(IpAddr::V4),
        IpNet::V6(n) => {
            let a = u128::from(n.network()).checked_add(1)?;
            Some(IpAddr::V6(a.into())).filter(|ip| c.contains(ip))
        }
    }
}

fn families_of(ips: &[IpAddr]) -> BTreeSet<Family> {
    ips.iter().map(Family::of).collect()
}

fn sysctls(ns: &str, forward: bool) -> Result<()> {
    let mut list: Vec<(&'static str, &'static str)> = vec![
        // rp_filter off: replies to masqueraded or DNATed flows may come back on
        // another interface than a strict reverse-path check expects.
        ("/proc/sys/net/ipv4/conf/all/rp_filter", "0"),
        ("/proc/sys/net/ipv4/conf/default/rp_filter", "0"),
    ];
    if forward {
        list.push(("/proc/sys/net/ipv4/ip_forward", "1"));
        list.push(("/proc/sys/net/ipv6/conf/all/forwarding", "1"));
    }
    netns::in_netns(ns, move || -> Result<()> {
        for (p, v) in list {
            std::fs::write(p, v).with_context(|| format!("setting {p}={v}"))?;
        }
        Ok(())
    })?
    .with_context(|| format!("sysctls in {ns}"))
}

fn create_netns(name: &str) -> Result<()> {
    netns::ip(&["netns", "add", name])?;
    netns::ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Starts a daemon detached from us (own session, stdin closed, output to `log`), in
/// `netns` and `cgroup` if given (setns and the cgroup.procs write happen in the child
/// before exec, with descriptors opened beforehand: only async-signal-safe calls run
/// between fork and exec).
pub fn spawn_detached(
    exe: &Path,
    args: &[String],
    netns: Option<&str>,
    cgroup: Option<&Path>,
    log: &Path,
) -> Result<Proc> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    prepare_child(&mut cmd, netns, cgroup, true)?;
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} {}", exe.display(), args.join(" ")))?;
    let pid = child.id();
    // Dropping `child` neither waits nor kills: the daemon outlives this command.
    drop(child);
    Proc::of(pid).with_context(|| format!("process {pid} vanished right after starting"))
}

/// Makes `cmd` start inside `netns` and `cgroup` (and, if `detach`, in a new session).
pub fn prepare_child(
    cmd: &mut Command,
    netns: Option<&str>,
    cgroup: Option<&Path>,
    detach: bool,
) -> Result<()> {
    let ns_fd = match netns {
        Some(n) => Some(
            std::fs::File::open(netns::netns_path(n))
                .with_context(|| format!("opening network namespace {n}"))?,
        ),
        None => None,
    };
    let cg_fd = match cgroup {
        Some(c) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", c.display()))?,
        ),
        None => None,
    };
    unsafe {
        cmd.pre_exec(move || {
            if detach && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(f) = &ns_fd
                && libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(f) = &cg_fd
                && libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Agent flags every node's agent gets from the lab's configuration: the pod CIDRs (the
/// local detector), the service CIDRs (unallocated addresses dropped).
fn agent_flags(_exe: &Path, cfg: &LabConfig) -> Vec<String> {
    let join = |v: &[ipnet::IpNet]| {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    vec![
        "--cluster-cidr".into(),
        join(&cfg.pod_cidrs),
        "--service-cidr".into(),
        join(&cfg.service_cidrs),
    ]
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// One workload (pod or endpoint server) as the resolution wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WantWorkload {
    identity: String,
    node: String,
    netns: String,
    ips: Vec<IpAddr>,
    tcp: Vec<u16>,
    udp: Vec<u16>,
}

fn ports_by_proto(ports: impl Iterator<Item = spec::PortSpec>) -> (Vec<u16>, Vec<u16>) {
    let mut tcp = BTreeSet::new();
    let mut udp = BTreeSet::new();
    for p in ports {
        match p.protocol.as_str() {
            "TCP" => {
                tcp.insert(p.port);
            }
            "UDP" => {
                udp.insert(p.port);
            }
            // No SCTP sockets on these kernels (TOOLCHAIN.md): SCTP ports get no server.
            _ => {}
        }
    }
    (tcp.into_iter().collect(), udp.into_iter().collect())
}

fn wanted(
    names: &Names,
    r: &Resolved,
) -> (
    BTreeMap<String, WantWorkload>,
    BTreeMap<String, WantWorkload>,
) {
    let pods = r
        .pods
        .iter()
        .map(|(k, p)| {
            let (tcp, udp) = ports_by_proto(spec::pod_ports(p).into_iter());
            (
                k.clone(),
                WantWorkload {
                    identity: k.clone(),
                    node: spec::pod_node(p).unwrap_or_default().to_string(),
                    netns: names.pod(k),
                    ips: spec::pod_ips(p),
                    tcp,
                    udp,
                },
            )
        })
        .collect();
    let eps = r
        .endpoint_servers
        .values()
        .map(|e| {
            let (tcp, udp) = ports_by_proto(e.ports.iter().cloned());
            (
                e.address.to_string(),
                WantWorkload {
                    identity: e.address.to_string(),
                    node: e.node.clone(),
                    netns: names.endpoint(&e.address),
                    ips: vec![e.address],
                    tcp,
                    udp,
                },
            )
        })
        .collect();
    (pods, eps)
}

impl Lab {
    pub fn open(name: &str) -> Result<Lab> {
        super::check_name(name)?;
        let names = Names::new(name);
        let dir = names.state_dir();
        if !State::path(&dir).exists() {
            bail!(
                "there is no lab named {name:?} (no {}); create one with `weir lab up --name {name} FILE...`",
                State::path(&dir).display()
            );
        }
        let state = State::load(&dir)?;
        Ok(Lab { names, dir, state })
    }

    pub fn save(&self) -> Result<()> {
        self.state.save(&self.dir)
    }

    pub fn objects_dir(&self) -> PathBuf {
        self.dir.join("objects")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Creates the state directory and an empty state (no namespaces yet).
    pub fn create(name: &str, cfg: LabConfig, exe: &Path, created_by: &str) -> Result<Lab> {
        super::check_name(name)?;
        let names = Names::new(name);
        let dir = names.state_dir();
        let left = state::find_leftovers(&names);
        if !left.is_empty() {
            bail!(
                "lab {name:?} already exists or an earlier run left pieces of it ({}); remove it with `weir lab down --name {name}`",
                left.state_dir
                    .iter()
                    .chain(left.namespaces.iter())
                    .chain(left.cgroups.iter())
                    .chain(left.pin_dirs.iter())
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for d in [dir.join("objects"), dir.join("logs")] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let state = State {
            version: state::STATE_VERSION,
            name: name.to_string(),
            created_by: created_by.to_string(),
            exe: exe.to_path_buf(),
            agent_flags: agent_flags(exe, &cfg),
            config: cfg,
            generation: 0,
            namespaces: BTreeSet::new(),
            cgroups: BTreeSet::new(),
            fabric: None,
            external: None,
            next_node_index: 0,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            fabric_routes: BTreeMap::new(),
            input: Input::default(),
            resolved: None,
        };
        let lab = Lab { names, dir, state };
        lab.save()?;
        Ok(lab)
    }

    /// Records a namespace in the state file, then creates it.
    fn new_netns(&mut self, name: &str) -> Result<()> {
        self.state.namespaces.insert(name.to_string());
        self.save()?;
        create_netns(name)
    }

    fn fabric(&self) -> Result<&str> {
        self.state
            .fabric
            .as_deref()
            .context("the lab has no fabric")
    }

    /// The fabric and the external client namespace.
    fn ensure_fabric(&mut self) -> Result<()> {
        if self.state.fabric.is_some() {
            return Ok(());
        }
        let fabric = self.names.fabric();
        self.new_netns(&fabric)?;
        sysctls(&fabric, true)?;
        // The fabric's own address (.1 of each node CIDR) on lo: the source of the ICMP
        // errors it sends (e.g. network unreachable for addresses nothing routes).
        let lines: Vec<String> = self
            .state
            .config
            .node_cidrs
            .iter()
            .filter_map(fabric_address)
            .map(|ip| addr_add(&ip, "lo"))
            .collect();
        netns::ip_batch(&fabric, &lines)?;
        self.state.fabric = Some(fabric.clone());
        self.save()?;

        let ext = self.names.external();
        self.new_netns(&ext)?;
        sysctls(&ext, false)?;
        netns::ip_batch(
            &fabric,
            &[
                format!(
                    "link add ext address {GW_MAC} type veth peer name eth0 address {EXT_MAC} netns {ext}"
                ),
                "link set ext up".into(),
            ],
        )?;
        let fams: BTreeSet<Family> = self.state.config.families().into_iter().collect();
        netns::ip_batch(&ext, &gateway_lines("eth0", &fams))?;
        self.state.external = Some(ext);
        self.save()?;
        Ok(())
    }

    fn create_node(&mut self, name: &str, ips: Vec<IpAddr>, cidrs: Vec<IpNet>) -> Result<()> {
        let fabric = self.fabric()?.to_string();
        let index = self.state.next_node_index;
        self.state.next_node_index += 1;
        let ns = self.names.node(name);
        self.new_netns(&ns)?;
        let built = (|| -> Result<String> {
            sysctls(&ns, true)?;
            let mac = format!(
                "02:00:00:00:{:02x}:{:02x}",
                (index >> 8) & 0xff,
                index & 0xff
            );
            let up = format!("n{index}");
            let mut fab = vec![
                format!(
                    "link add {up} address {GW_MAC} type veth peer name eth0 address {mac} netns {ns}"
                ),
                format!("link set {up} up"),
            ];
            for ip in &ips {
                fab.push(format!("route replace {} dev {up}", host_prefix(ip)));
                fab.push(format!(
                    "neigh replace {ip} lladdr {mac} dev {up} nud permanent"
                ));
            }
            for c in &cidrs {
                let f = Family::of(&c.addr());
                let via = ips.iter().find(|i| Family::of(i) == f).with_context(|| {
                    format!("node {name} has pod CIDR {c} but no address of its family")
                })?;
                fab.push(format!("route replace {c} via {via} dev {up}"));
            }
            netns::ip_batch(&fabric, &fab)?;
            let mut lines: Vec<String> = ips.iter().map(|ip| addr_add(ip, "eth0")).collect();
            lines.extend(gateway_lines("eth0", &families_of(&ips)));
            for c in &cidrs {
                lines.push(format!("route add blackhole {c}"));
            }
            netns::ip_batch(&ns, &lines)?;
            Ok(mac)
        })();
        let mac = match built {
            Ok(m) => m,
            Err(e) => {
                // Deleting the namespace also deletes the fabric end of its uplink (and
                // the fabric routes through it).
                netns::ip(&["netns", "del", &ns]).ok();
                self.state.namespaces.remove(&ns);
                self.save().ok();
                return Err(e.context(format!("setting up node {name}")));
            }
        };
        let cg = netns::cgroup2_root()?.join(self.names.cgroup_name(name));
        self.state.cgroups.insert(cg.clone());
        self.save()?;
        if !cg.exists() {
            std::fs::create_dir(&cg)
                .with_context(|| format!("creating cgroup {}", cg.display()))?;
        }
        self.state.nodes.insert(
            name.to_string(),
            NodeRt {
                index,
                netns: ns,
                cgroup: cg,
                pin_dir: self.names.pin_dir(name),
                ips,
                pod_cidrs: cidrs,
                mac,
                next_lxc: 0,
                agent: None,
                log: self.logs_dir().join(format!("agent-{name}.log")),
            },
        );
        self.save()?;
        debug!(node = name, "node namespace ready");
        Ok(())
    }

    /// The API socket of `node`'s agent (`weir flows --socket`).
    pub fn api_socket(&self, node: &str) -> PathBuf {
        self.dir.join("api").join(format!("{node}.sock"))
    }

    fn start_agent(&mut self, node: &str) -> Result<()> {
        let n = self.state.nodes.get(node).context("node")?.clone();
        if n.agent.is_some_and(|a| a.alive()) {
            return Ok(());
        }
        let mut args: Vec<String> = [
            "agent",
            "--netns",
            &n.netns,
            "--node-name",
            node,
            "--source-dir",
            &self.objects_dir().display().to_string(),
            "--pin-dir",
            &n.pin_dir.display().to_string(),
            "--pod-ifaces",
            "lxc*",
            "--uplinks",
            "eth0",
            "--on-exit",
            "remove",
            "--poll-ms",
            "50",
            "--debounce-ms",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.state.agent_flags.iter().cloned());
        for m in &self.state.config.map_sizes {
            args.push("--map-size".into());
            args.push(m.clone());
        }
        // The agent's API socket (metrics, readiness, `weir flows`) lives in the lab's
        // state directory, so `down` removes it with the rest.
        args.push("--api-socket".into());
        args.push(self.api_socket(node).display().to_string());
        if self.state.config.socket_lb {
            // The node's cgroup holds its pods' processes and its host probes.
            args.push("--cgroup".into());
            args.push(n.cgroup.display().to_string());
        }
        // Started inside the node namespace already (as well as told with --netns), so
        // that from its first instruction it is found by the namespace scan of `down`.
        let p = spawn_detached(&self.state.exe, &args, Some(&n.netns), None, &n.log)?;
        debug!(node, pid = p.pid, log = %n.log.display(), "agent started");
        self.state.nodes.get_mut(node).context("node")?.agent = Some(p);
        self.save()
    }

    /// Kills a node's agent with SIGKILL, as a crash or an OOM kill would (no exit
    /// handler runs, the pinned datapath stays and keeps forwarding), starts a new one,
    /// and waits until it reports ready: it has adopted the pins and programmed what its
    /// sources list. Returns the pids of the old and the new agent.
    pub fn kill_and_restart_agent(&mut self, node: &str, timeout: Duration) -> Result<(u32, u32)> {
        let n = self
            .state
            .nodes
            .get(node)
            .with_context(|| format!("no node {node} in lab {}", self.state.name))?
            .clone();
        let Some(old) = n.agent.filter(|a| a.alive()) else {
            bail!("node {node} has no running agent (dataplane: none, or it died)");
        };
        old.signal(libc::SIGKILL);
        let deadline = Instant::now() + timeout;
        while old.alive() {
            if Instant::now() > deadline {
                bail!("agent {} of node {node} did not die after SIGKILL", old.pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.start_agent(node)?;
        let new = self.state.nodes[node].agent.context("agent")?;
        // Readiness, not the programmed generation: the pinned CONFIG map still holds the
        // old agent's generation.
        let sock = crate::http::Endpoint::Unix(self.api_socket(node));
        loop {
            if let Ok((200, _, _)) =
                crate::http::open(&sock, "/readyz", &[], Some(Duration::from_secs(1)))
            {
                return Ok((old.pid, new.pid));
            }
            if !new.alive() {
                bail!(
                    "the new agent of node {node} exited; its log:\n{}",
                    log_tail(&n.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!("the new agent of node {node} was not ready within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop_agent_and_remove_node(&mut self, node: &str) -> Result<()> {
        let Some(n) = self.state.nodes.get(node).cloned() else {
            return Ok(());
        };
        if let Some(a) = n.agent {
            state::stop_all(&[a], Duration::from_secs(5));
        }
        netns::ip(&["netns", "del", &n.netns]).ok();
        let _ = crate::datapath::remove_pin_dir(std::path::Path::new(&n.pin_dir));
        for _ in 0..100 {
            match std::fs::remove_dir(&n.cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        self.state.nodes.remove(node);
        self.state.namespaces.remove(&n.netns);
        self.state.cgroups.remove(&n.cgroup);
        self.save()?;
        debug!(node, "node removed");
        Ok(())
    }

    fn create_workload(&mut self, key: &str, w: &WantWorkload, endpoint: bool) -> Result<()> {
        let node = self
            .state
            .nodes
            .get_mut(&w.node)
            .with_context(|| format!("node {} of {} does not exist", w.node, w.identity))?;
        let idx = node.next_lxc;
        node.next_lxc += 1;
        let node = node.clone();
        let lxc = format!("lxc{idx}");
        let mac = format!(
            "02:01:{:02x}:{:02x}:{:02x}:{:02x}",
            (node.index >> 8) & 0xff,
            node.index & 0xff,
            (idx >> 8) & 0xff,
            idx & 0xff
        );
        self.new_netns(&w.netns)?;
        let built = (|| -> Result<WorkloadRt> {
            let mut host = vec![
                format!(
                    "link add {lxc} address {GW_MAC} type veth peer name eth0 address {mac} netns {}",
                    w.netns
                ),
                format!("link set {lxc} up"),
            ];
            for ip in &w.ips {
                host.push(format!("route replace {} dev {lxc}", host_prefix(ip)));
                host.push(format!(
                    "neigh replace {ip} lladdr {mac} dev {lxc} nud permanent"
                ));
            }
            netns::ip_batch(&node.netns, &host)?;
            let mut lines: Vec<String> = w.ips.iter().map(|ip| addr_add(ip, "eth0")).collect();
            lines.extend(gateway_lines("eth0", &families_of(&w.ips)));
            netns::ip_batch(&w.netns, &lines)?;
            let log = self.logs_dir().join(format!(
                "server-{}.log",
                w.identity.replace(['/', ':'], "_")
            ));
            let mut rt = WorkloadRt {
                identity: w.identity.clone(),
                node: w.node.clone(),
                netns: w.netns.clone(),
                lxc,
                mac,
                ips: w.ips.clone(),
                tcp: w.tcp.clone(),
                udp: w.udp.clone(),
                server: None,
                log,
            };
            rt.server = self.start_server(&rt, &node.cgroup)?;
            Ok(rt)
        })();
        let rt = match built {
            Ok(rt) => rt,
            Err(e) => {
                // Leave nothing half-built: a later apply can create it afresh.
                netns::ip(&["netns", "del", &w.netns]).ok();
                self.state.namespaces.remove(&w.netns);
                self.save().ok();
                return Err(e.context(format!("setting up {}", w.identity)));
            }
        };
        if endpoint {
            self.state.endpoints.insert(key.to_string(), rt);
        } else {
            self.state.pods.insert(key.to_string(), rt);
        }
        self.save()?;
        debug!(workload = w.identity, "workload ready");
        Ok(())
    }

    fn start_server(&self, w: &WorkloadRt, cgroup: &Path) -> Result<Option<Proc>> {
        if w.tcp.is_empty() && w.udp.is_empty() {
            return Ok(None);
        }
        let join = |v: &[u16]| {
            v.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut args = vec!["serve".to_string(), "--identity".into(), w.identity.clone()];
        if !w.tcp.is_empty() {
            args.push("--tcp".into());
            args.push(join(&w.tcp));
        }
        if !w.udp.is_empty() {
            args.push("--udp".into());
            args.push(join(&w.udp));
        }
        let p = spawn_detached(&self.state.exe, &args, Some(&w.netns), Some(cgroup), &w.log)?;
        Ok(Some(p))
    }

    fn remove_workload(&mut self, key: &str, endpoint: bool) -> Result<()> {
        let map = if endpoint {
            &mut self.state.endpoints
        } else {
            &mut self.state.pods
        };
        let Some(w) = map.remove(key) else {
            return Ok(());
        };
        if let Some(s) = w.server {
            state::stop_all(&[s], Duration::from_secs(2));
        }
        // Deleting the namespace destroys the veth pair; the node's route and neighbour
        // entry for the pod go with the host-side device.
        netns::ip(&["netns", "del", &w.netns]).ok();
        self.state.namespaces.remove(&w.netns);
        self.save()?;
        debug!(workload = w.identity, "workload removed");
        Ok(())
    }

    /// Brings the running topology in line with `r` (before the objects are
    /// published: new pods' veths exist when the agents read the new objects).
    pub fn reconcile(&mut self, r: &Resolved) -> Result<()> {
        self.ensure_fabric()?;
        let (want_pods, want_eps) = wanted(&self.names, r);

        // Workloads that are gone or moved (node or addresses changed).
        for (endpoint, want) in [(false, &want_pods), (true, &want_eps)] {
            let have = if endpoint {
                &self.state.endpoints
            } else {
                &self.state.pods
            };
            let stale: Vec<String> = have
                .iter()
                .filter(|(k, w)| {
                    want.get(*k)
                        .is_none_or(|x| x.node != w.node || x.ips != w.ips || x.netns != w.netns)
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in stale {
                self.remove_workload(&k, endpoint)?;
            }
        }

        // Nodes.
        for (name, n) in &r.nodes {
            if let Some(have) = self.state.nodes.get(name) {
                let ips = spec::node_ips(n);
                let cidrs = spec::node_pod_cidrs(n);
                if have.ips != ips || have.pod_cidrs != cidrs {
                    bail!(
                        "node {name}: changing a node's addresses or pod CIDRs in a running lab is not supported (was {:?} / {:?}, now {:?} / {:?}); run `weir lab down` and `up` again",
                        have.ips,
                        have.pod_cidrs,
                        ips,
                        cidrs
                    );
                }
            }
        }
        let gone: Vec<String> = self
            .state
            .nodes
            .keys()
            .filter(|n| !r.nodes.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            self.stop_agent_and_remove_node(&n)?;
        }
        for (name, n) in &r.nodes {
            if !self.state.nodes.contains_key(name) {
                self.create_node(name, spec::node_ips(n), spec::node_pod_cidrs(n))?;
            }
        }

        // New workloads; changed ports restart the server.
        for (endpoint, want) in [(false, &want_pods), (true, &want_eps)] {
            for (k, w) in want {
                let have = if endpoint {
                    self.state.endpoints.get(k)
                } else {
                    self.state.pods.get(k)
                }
                .cloned();
                match have {
                    None => self.create_workload(k, w, endpoint)?,
                    Some(h) if h.tcp != w.tcp || h.udp != w.udp => {
                        if let Some(s) = h.server {
                            state::stop_all(&[s], Duration::from_secs(2));
                        }
                        let mut h2 = h.clone();
                        h2.tcp = w.tcp.clone();
                        h2.udp = w.udp.clone();
                        let cg = self.state.nodes[&w.node].cgroup.clone();
                        h2.server = self.start_server(&h2, &cg)?;
                        if endpoint {
                            self.state.endpoints.insert(k.clone(), h2);
                        } else {
                            self.state.pods.insert(k.clone(), h2);
                        }
                        self.save()?;
                    }
                    Some(_) => {}
                }
            }
        }

        // Fabric host routes: addresses outside their node's pod CIDRs, and (through the
        // first node until a probe chooses another entry node) LoadBalancer IPs and
        // externalIPs, as a router in front of the cluster would have them.
        let mut want_routes: BTreeMap<String, String> = BTreeMap::new();
        for (ip, node) in r.stray_addresses() {
            want_routes.insert(host_prefix(&ip), node);
        }
        if let Some(first) = r.nodes.keys().next() {
            for s in r.services.values() {
                for ip in spec::service_lb_ips(s)
                    .into_iter()
                    .chain(spec::service_external_ips(s))
                {
                    want_routes
                        .entry(host_prefix(&ip))
                        .or_insert_with(|| first.clone());
                }
            }
        }
        let fabric = self.fabric()?.to_string();
        let mut lines = Vec::new();
        for (dst, _) in self.state.fabric_routes.iter() {
            if !want_routes.contains_key(dst) {
                lines.push(format!("route del {dst}"));
            }
        }
        for (dst, node) in &want_routes {
            if self.state.fabric_routes.get(dst) == Some(node) {
                continue;
            }
            let ip: IpAddr = dst.split('/').next().unwrap_or("").parse()?;
            let n = self.state.nodes.get(node).context("node of a route")?;
            let via = n
                .ips
                .iter()
                .find(|i| Family::of(i) == Family::of(&ip))
                .with_context(|| format!("node {node} has no address of {ip}'s family"))?;
            lines.push(format!("route replace {dst} via {via} dev n{}", n.index));
        }
        // A route whose node went away went with its device; `del` may fail then.
        for l in lines {
            if let Err(e) = netns::ip_batch(&fabric, std::slice::from_ref(&l))
                && !l.starts_with("route del")
            {
                return Err(e);
            }
        }
        self.state.fabric_routes = want_routes;
        self.save()?;
        Ok(())
    }

    /// Writes the objects for the agents and bumps the generation; returns it.
    pub fn publish(&mut self, r: &Resolved) -> Result<u64> {
        let generation = self.state.generation + 1;
        let objects = self.objects_dir();
        let yaml = r.to_yaml()?;
        write_atomic(&objects.join(OBJECTS_FILE), yaml.as_bytes())?;
        write_atomic(
            &objects.join(GENERATION_FILE),
            format!("{generation}\n").as_bytes(),
        )?;
        write_atomic(
            &objects.join(GENERATION_MARKER),
            format!("# weir lab generation {generation}\n").as_bytes(),
        )?;
        self.state.generation = generation;
        self.state.resolved = Some(r.clone());
        self.save()?;
        Ok(generation)
    }

    /// Starts an agent on every node that has none running (none with `dataplane: none`).
    pub fn start_agents(&mut self) -> Result<()> {
        if self.state.config.dataplane == spec::Dataplane::None {
            return Ok(());
        }
        let nodes: Vec<String> = self.state.nodes.keys().cloned().collect();
        for n in nodes {
            self.start_agent(&n)?;
        }
        Ok(())
    }

    /// Interfaces the agent of `node` must have attached (pinned links by name).
    fn expected_links(&self, node: &str) -> Vec<(String, &'static str)> {
        let mut v = vec![("eth0".to_string(), "uplinkin")];
        for w in self
            .state
            .pods
            .values()
            .chain(self.state.endpoints.values())
        {
            if w.node == node {
                v.push((w.lxc.clone(), "frompod"));
                v.push((w.lxc.clone(), "topod"));
            }
        }
        v
    }

    /// Programmed generation of a node's agent (0 if its maps are not there yet).
    pub fn programmed(&self, node: &str) -> u64 {
        self.state
            .nodes
            .get(node)
            .and_then(|n| AyaDatapath::open(&n.pin_dir).ok())
            .and_then(|d| d.config().ok())
            .map(|c| c.generation)
            .unwrap_or(0)
    }

    /// Waits until every agent reports `generation` programmed and has attached to every
    /// pod veth and its uplink. No sleeps stand in for this: it polls the pinned CONFIG
    /// map and link pins.
    pub fn wait_programmed(&self, generation: u64, timeout: Duration) -> Result<()> {
        if self.state.config.dataplane == spec::Dataplane::None {
            // No agents: the topology is complete once reconcile returned.
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut lagging = Vec::new();
            for (name, n) in &self.state.nodes {
                let Some(agent) = n.agent else {
                    bail!("node {name} has no agent");
                };
                if !agent.alive() {
                    agent.reap();
                    bail!(
                        "the agent of node {name} (pid {}) exited; its log {} ends with:\n{}",
                        agent.pid,
                        n.log.display(),
                        log_tail(&n.log, 15)
                    );
                }
                let got = self.programmed(name);
                let pins: BTreeSet<(String, String)> = crate::datapath::PinDir::new(&n.pin_dir)
                    .links()
                    .into_iter()
                    .map(|(ifname, _, suffix, _)| (ifname, suffix))
                    .collect();
                let missing: Vec<String> = self
                    .expected_links(name)
                    .into_iter()
                    .filter(|(i, s)| !pins.contains(&(i.clone(), s.to_string())))
                    .map(|(i, s)| format!("{i}/{s}"))
                    .collect();
                if got < generation || !missing.is_empty() {
                    lagging.push((name.clone(), agent.pid, got, missing, n.log.clone()));
                }
            }
            if lagging.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let (name, pid, got, missing, log) = &lagging[0];
                bail!(
                    "timed out after {:?} waiting for the agents to program generation {generation}: the agent of node {name} (pid {pid}) has programmed generation {got}{}; see its log {}:\n{}",
                    timeout,
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!(" and has not attached to {}", missing.join(", "))
                    },
                    log.display(),
                    log_tail(log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// reconcile + publish + start agents + wait: one step of `up`, `apply`, `delete`.
    pub fn converge(&mut self, input: Input, timeout: Duration) -> Result<u64> {
        let r = spec::resolve(&input, &self.state.config, self.state.resolved.as_ref())?;
        self.reconcile(&r)?;
        let generation = self.publish(&r)?;
        self.state.input = input;
        self.save()?;
        self.start_agents()?;
        self.wait_programmed(generation, timeout)?;
        Ok(generation)
    }

    /// Adds `ip` to the external client's interface (if missing) and routes it back
    /// from the fabric.
    pub fn ensure_external_source(&self, ip: &IpAddr) -> Result<()> {
        let ext = self
            .state
            .external
            .as_deref()
            .context("the lab has no external namespace")?;
        let fabric = self.fabric()?;
        let have = netns::ip(&["-n", ext, "-o", "addr", "show", "dev", "eth0"])?;
        if !have.contains(&format!(" {ip}/")) {
            netns::ip_batch(ext, &[addr_add(ip, "eth0")])?;
        }
        netns::ip_batch(
            fabric,
            &[
                format!("route replace {} dev ext", host_prefix(ip)),
                format!("neigh replace {ip} lladdr {EXT_MAC} dev ext nud permanent"),
            ],
        )
    }

    /// Routes `dst` from the fabric through `node` (how external traffic to a VIP
    /// enters the cluster).
    pub fn route_via_node(&self, dst: &IpAddr, node: &str) -> Result<()> {
        let n = self
            .state
            .nodes
            .get(node)
            .with_context(|| format!("no node named {node}"))?;
        let via = n
            .ips
            .iter()
            .find(|i| Family::of(i) == Family::of(dst))
            .with_context(|| format!("node {node} has no address of {dst}'s family"))?;
        netns::ip_batch(
            self.fabric()?,
            &[format!(
                "route replace {} via {via} dev n{}",
                host_prefix(dst),
                n.index
            )],
        )
    }
}
