//! The walking-skeleton demo: one node namespace running a real weir agent, a client pod
//! and two backend pods, one ClusterIP Service. Real TCP connections from the client to
//! the VIP are balanced over both backends by the TC programs, and replies come back from
//! the VIP (the client's socket is connected to it).
//!
//! [`Mini`] is the topology; `weir demo` drives it and prints what happens, and the
//! skeleton end-to-end test (tests/skeleton.rs) drives it and asserts.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    agent::GENERATION_FILE,
    datapath::{AyaDatapath, DEFAULT_BPFFS_ROOT},
    netns::{self, ChildGuard, NetnsGuard},
    serve::Reply,
};

pub const VIP: &str = "10.96.0.10";
pub const NODE_NAME: &str = "demo-node";
pub const NODE_IP: &str = "192.168.50.2";
/// MAC of every host-side pod interface (as Calico does): pods reach their gateway
/// without ARP through a permanent neighbour entry.
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// One pod of the mini cluster.
pub struct MiniPod {
    pub name: String,
    pub ip: IpAddr,
    pub ns: NetnsGuard,
    pub host_if: String,
}

pub struct Mini {
    pub prefix: String,
    pub node: NetnsGuard,
    pub pods: Vec<MiniPod>,
    pub dir: PathBuf,
    pub pin_dir: PathBuf,
    exe: PathBuf,
    servers: Vec<ChildGuard>,
    pub agent: Option<ChildGuard>,
    /// The node's cgroup when socket-level load balancing is on.
    pub cgroup: Option<crate::netns::CgroupGuard>,
}

const SERVICE_YAML: &str = r#"apiVersion: v1
kind: Node
metadata:
  name: demo-node
status:
  addresses: [{type: InternalIP, address: 192.168.50.2}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x1
  namespace: demo
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 8080, protocol: UDP}
endpoints:
- addresses: [10.244.1.3]
  conditions: {ready: true}
  nodeName: demo-node
  targetRef: {kind: Pod, namespace: demo, name: backend-1}
- addresses: [10.244.1.4]
  conditions: {ready: true}
  nodeName: demo-node
  targetRef: {kind: Pod, namespace: demo, name: backend-2}
"#;

fn write_sysctl(ns: &str, path: &'static str, value: &'static str) -> Result<()> {
    netns::in_netns(ns, move || std::fs::write(path, value))?
        .with_context(|| format!("setting {path}={value} in {ns}"))
}

impl Mini {
    /// Builds the namespaces, links, servers and the YAML directory (no agent yet).
    pub fn build(exe: &Path) -> Result<Mini> {
        let prefix = netns::unique_prefix('d');
        let node = NetnsGuard::create(&format!("{prefix}-node"))?;
        let dir = std::env::temp_dir().join(format!("{prefix}-objects"));
        std::fs::create_dir_all(&dir)?;
        let mut m = Mini {
            pin_dir: PathBuf::from(DEFAULT_BPFFS_ROOT).join(&prefix),
            prefix: prefix.clone(),
            node,
            pods: Vec::new(),
            dir,
            exe: exe.to_path_buf(),
            servers: Vec::new(),
            agent: None,
            cgroup: None,
        };
        write_sysctl(&m.node.name, "/proc/sys/net/ipv4/ip_forward", "1")?;
        for (i, name) in ["client", "backend-1", "backend-2"].iter().enumerate() {
            let ip: IpAddr = format!("10.244.1.{}", i + 2).parse()?;
            let ns = NetnsGuard::create(&format!("{prefix}-{name}"))?;
            let host_if = format!("{prefix}p{i}");
            let n = &m.node.name;
            netns::ip_batch(
                n,
                &[
                    format!(
                        "link add {host_if} type veth peer name eth0 netns {}",
                        ns.name
                    ),
                    format!("link set {host_if} address {HOST_MAC}"),
                    format!("link set {host_if} up"),
                    format!("route add {ip}/32 dev {host_if}"),
                ],
            )?;
            netns::ip_batch(
                &ns.name,
                &[
                    format!("addr add {ip}/32 dev eth0"),
                    "link set eth0 up".into(),
                    // The Calico-style gateway: a link-local next hop whose MAC is the
                    // host side's fixed address, so the pod needs no ARP for it.
                    "route add 169.254.1.1 dev eth0 scope link".into(),
                    format!("neigh add 169.254.1.1 lladdr {HOST_MAC} dev eth0 nud permanent"),
                    "route add default via 169.254.1.1 dev eth0".into(),
                ],
            )?;
            m.pods.push(MiniPod {
                name: name.to_string(),
                ip,
                ns,
                host_if,
            });
        }
        // The node's own address lives on its loopback (this kernel has no dummy
        // interfaces, and nothing in the demo leaves the node).
        netns::ip(&[
            "-n",
            &m.node.name,
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "lo",
        ])?;
        for pod in m.pods.iter().filter(|p| p.name.starts_with("backend")) {
            let mut cmd = Command::new(&m.exe);
            cmd.args([
                "serve",
                "--identity",
                &format!("demo/{}", pod.name),
                "--tcp",
                "8080",
                "--udp",
                "8080",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
            netns::command_in(&pod.ns.name, &mut cmd)?;
            m.servers
                .push(ChildGuard::spawn(cmd, &format!("server in {}", pod.name))?);
        }
        std::fs::write(m.dir.join("objects.yaml"), SERVICE_YAML)?;
        std::fs::write(m.dir.join(GENERATION_FILE), "1")?;
        Ok(m)
    }

    /// Creates the node's cgroup; the agent started next attaches the socket-level load
    /// balancer to it, and `probe` runs its clients inside it.
    pub fn with_socket_lb(&mut self) -> Result<()> {
        self.cgroup = Some(crate::netns::CgroupGuard::create(&format!(
            "{}-node",
            self.prefix
        ))?);
        Ok(())
    }

    /// Starts the agent in the node namespace.
    pub fn start_agent(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "agent",
            "--netns",
            &self.node.name,
            "--node-name",
            NODE_NAME,
            "--source-dir",
            &self.dir.display().to_string(),
            "--pin-dir",
            &self.pin_dir.display().to_string(),
            "--pod-ifaces",
            &format!("{}p*", self.prefix),
            "--on-exit",
            "remove",
            "--poll-ms",
            "50",
            "--debounce-ms",
            "0",
        ]);
        if let Some(cg) = &self.cgroup {
            cmd.arg("--cgroup").arg(&cg.path);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        self.agent = Some(ChildGuard::spawn(cmd, "weir agent")?);
        Ok(())
    }

    /// Waits until the agent reports input generation `gen` as programmed and every pod
    /// interface carries its links.
    pub fn wait_programmed(&mut self, generation: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(a) = self.agent.as_mut()
                && let Ok(Some(st)) = a.child.try_wait()
            {
                bail!("weir agent exited early ({st}); see its log above");
            }
            let programmed = AyaDatapath::open(&self.pin_dir)
                .and_then(|d| d.config())
                .map(|c| c.generation)
                .unwrap_or(0);
            let links = std::fs::read_dir(self.pin_dir.join("links"))
                .map(|d| d.count())
                .unwrap_or(0);
            if programmed >= generation && links >= 2 * self.pods.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for the agent (programmed generation {programmed}, {links} links)"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pod(&self, name: &str) -> &MiniPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    /// Connects from `from` to `to`, reads the server's reply line, and returns it with
    /// the peer address the client's socket reports.
    pub fn connect(&self, from: &str, to: SocketAddr) -> Result<(Reply, SocketAddr)> {
        let ns = self.pod(from).ns.name.clone();
        netns::in_netns(&ns, move || -> Result<(Reply, SocketAddr)> {
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let peer = s.peer_addr()?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            let _ = (&s).write_all(b"");
            Ok((serde_json::from_str(line.trim())?, peer))
        })?
    }

    /// One probe from a pod, made by a child process in the pod's namespace and (with
    /// socket LB) the node's cgroup, exactly like a pod process.
    pub fn probe(
        &self,
        from: &str,
        to: SocketAddr,
        udp: bool,
        connected: bool,
    ) -> Result<crate::probe::ProbeResult> {
        let mut cmd = Command::new(&self.exe);
        cmd.args([
            "probe-once",
            "--to",
            &to.to_string(),
            "--timeout-ms",
            "1500",
        ]);
        if udp {
            cmd.arg("--udp");
        }
        if connected {
            cmd.arg("--connected");
        }
        netns::command_in(&self.pod(from).ns.name, &mut cmd)?;
        if let Some(cg) = &self.cgroup {
            cg.command_in(&mut cmd);
        }
        let out = cmd
            .stderr(Stdio::inherit())
            .output()
            .context("running weir probe-once")?;
        if !out.status.success() {
            bail!("probe-once failed: {}", out.status);
        }
        serde_json::from_slice(&out.stdout).context("probe-once output")
    }

    /// Number of TCX programs attached to a pod's host interface (ingress + egress).
    pub fn attached_programs(&self, pod: &str) -> Result<usize> {
        let ifname = self.pod(pod).host_if.clone();
        netns::in_netns(&self.node.name, move || -> Result<usize> {
            use aya::programs::{SchedClassifier, TcAttachType};
            let i = SchedClassifier::query_tcx(&ifname, TcAttachType::Ingress)?
                .1
                .len();
            let e = SchedClassifier::query_tcx(&ifname, TcAttachType::Egress)?
                .1
                .len();
            Ok(i + e)
        })?
    }

    /// Stops the agent with SIGTERM (it removes its pins on the way out).
    pub fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop(Duration::from_secs(5));
        }
    }
}

impl Drop for Mini {
    fn drop(&mut self) {
        self.stop_agent();
        self.servers.clear();
        // The cgroup can only go once the processes in it (servers, probes) are gone.
        self.cgroup.take();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Pins are removed by the agent on SIGTERM; remove them here too if it crashed.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Runs the demo, printing progress; returns connections per backend.
pub fn run(connections: usize) -> Result<BTreeMap<String, usize>> {
    let exe = std::env::current_exe()?;
    eprintln!("weir demo: building a node namespace with a client and two backend pods ...");
    let mut m = Mini::build(&exe)?;
    eprintln!(
        "weir demo: starting the weir agent in {} (pins under {})",
        m.node.name,
        m.pin_dir.display()
    );
    m.start_agent()?;
    m.wait_programmed(1, Duration::from_secs(30))?;
    eprintln!(
        "weir demo: Service demo/web is programmed: ClusterIP {VIP}:80 -> 10.244.1.3:8080, 10.244.1.4:8080"
    );
    let vip: SocketAddr = format!("{VIP}:80").parse()?;
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..connections {
        let (reply, peer) = m
            .connect("client", vip)
            .with_context(|| format!("connection {i} to {vip}"))?;
        if peer != vip {
            bail!("connection {i}: the client's socket is connected to {peer}, not the VIP");
        }
        *per_backend.entry(reply.server.clone()).or_default() += 1;
        if i < 3 {
            eprintln!(
                "  client -> {vip}: answered by {} (it saw the client as {}, reply came from {peer})",
                reply.server, reply.client
            );
        }
    }
    eprintln!("weir demo: {connections} connections to {vip}:");
    for (b, n) in &per_backend {
        eprintln!("  {b:<20} {n}");
    }
    m.stop_agent();
    let pins_gone = !m.pin_dir.exists();
    eprintln!(
        "weir demo: agent stopped; pins under {} {}",
        m.pin_dir.display(),
        if pins_gone {
            "removed"
        } else {
            "STILL PRESENT"
        }
    );
    drop(m);
    eprintln!("weir demo: namespaces removed. Done.");
    Ok(per_backend)
}
