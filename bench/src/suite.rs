//! The whole suite in one run (`weir-bench suite`), so every ratio compares figures
//! measured side by side on the same machine in the same minutes.
//!
//! 1. Per-packet program cost (BPF_PROG_TEST_RUN) at 1 and 50k Services.
//! 2. Control plane: weir's sync into real maps and into the fake (own processes, for
//!    their peak memory), NetworkPolicy compile at 10k pods / 1k policies, and the load
//!    times of kube-proxy's rules (measured in step 3, in the lab's node namespace).
//! 3. Datapath, per scale: a `dataplane: none` lab whose node gets kube-proxy's
//!    iptables rules, then its nftables rules (each generated from the scale's YAML and
//!    loaded with iptables-legacy-restore / nft -f, timed), then nothing (the bare path:
//!    clients go to pod IPs); and two weir labs (socket LB on, off) that `apply` each
//!    scale's YAML in turn. In each: new connections/s and latency (pod -> ClusterIP,
//!    external client -> NodePort), kept-alive request/response rate and latency, and
//!    single-stream iperf3 throughput through a ClusterIP.
//!
//! Everything runs in lab namespaces (the lab's names carry the suite's unique lab
//! name); labs are brought down by name, the iperf3 servers stopped by PID, also when a
//! step fails.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use weir::netns;

use crate::{cluster, kubeproxy, load::LoadResult};

pub struct Opts {
    pub quick: bool,
    pub out: PathBuf,
    pub weir: PathBuf,
    /// A kube-proxy rule load that takes longer is stopped and recorded as unfinished.
    pub loader_timeout: Duration,
    pub scales: Vec<usize>,
    pub only: Vec<String>,
    pub command: String,
}

/// One datapath figure.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub dataplane: String,
    pub services: usize,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub errors: u64,
    pub note: Option<String>,
}

/// A rules load (kube-proxy baseline) timed in the lab's node namespace.
#[derive(Debug, Clone, Serialize)]
pub struct RuleLoad {
    pub tool: String,
    pub services: usize,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub max_rss_mib: f64,
    pub generate_s: f64,
    pub stats: kubeproxy::RuleStats,
    /// False when the loader was stopped at the timeout (nothing measured through it).
    pub completed: bool,
}

struct Proc {
    wall_s: f64,
    cpu_s: f64,
    max_rss_mib: f64,
    ok: bool,
    /// Stopped at the deadline.
    timed_out: bool,
    stderr: String,
    stdout: String,
}

/// A command run under GNU time (`/usr/bin/time -f %M -o FILE`), which reports its
/// child's own peak RSS. wait4's ru_maxrss on our own child would not do: a child forked
/// from this (large) process keeps the parent's pre-exec RSS as its maxrss across exec.
struct Timed {
    cmd: Command,
    rss_file: PathBuf,
}

fn timed(prog: &str, args: &[&str]) -> Result<Timed> {
    let rss_file = tempfile("maxrss")?;
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M", "-o"])
        .arg(&rss_file)
        .arg(prog)
        .args(args);
    Ok(Timed { cmd, rss_file })
}

/// Runs the command to completion: wall time, CPU (wait4's rusage: time's child is
/// included) and the child's peak RSS as GNU time measured it.
fn run_rusage(t: Timed, stdin: Option<&Path>) -> Result<Proc> {
    run_rusage_until(t, stdin, None)
}

/// [`run_rusage`] with a deadline: past it, the command's process group (GNU time and
/// the loader under it, started in a group of their own) is killed and the result says
/// `timed_out`.
fn run_rusage_until(t: Timed, stdin: Option<&Path>, limit: Option<Duration>) -> Result<Proc> {
    let Timed { mut cmd, rss_file } = t;
    let err = tempfile("stderr")?;
    let outf = tempfile("stdout")?;
    cmd.stdout(Stdio::from(std::fs::File::create(&outf)?))
        .stderr(Stdio::from(std::fs::File::create(&err)?));
    match stdin {
        Some(p) => cmd.stdin(Stdio::from(
            std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        )),
        None => cmd.stdin(Stdio::null()),
    };
    {
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
    }
    let t = Instant::now();
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id() as i32;
    let mut status = 0i32;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut timed_out = false;
    let rc = loop {
        let flags = if limit.is_some() { libc::WNOHANG } else { 0 };
        // SAFETY: wait4 on our own child, writing into locals we own.
        let rc = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if rc != 0 {
            break rc;
        }
        if limit.is_some_and(|l| t.elapsed() > l) && !timed_out {
            timed_out = true;
            // SAFETY: the process group we created for this child (its pid).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let wall = t.elapsed().as_secs_f64();
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let stdout = std::fs::read_to_string(&outf).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    let _ = std::fs::remove_file(&outf);
    Ok(Proc {
        wall_s: wall,
        cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_mib: {
            let kib = std::fs::read_to_string(&rss_file)
                .ok()
                .and_then(|t| t.lines().last().and_then(|l| l.trim().parse::<f64>().ok()));
            let _ = std::fs::remove_file(&rss_file);
            kib.map(|k| k / 1024.0).unwrap_or(f64::NAN)
        },
        ok: !timed_out && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        timed_out,
        stderr,
        stdout,
    })
}

fn tempfile(tag: &str) -> Result<PathBuf> {
    Ok(std::env::temp_dir().join(format!(
        "weir-bench-{}-{tag}-{}",
        std::process::id(),
        netns::unique_prefix('b')
    )))
}

/// A lab brought down by name on drop.
struct LabGuard {
    name: String,
    weir: PathBuf,
    view: Value,
    marker: PathBuf,
}

impl LabGuard {
    fn up(weir: &Path, name: &str, files: &[PathBuf], marker: &Path) -> Result<LabGuard> {
        // Written before `up`, so that run.sh's trap can bring it down if we are killed.
        std::fs::write(marker, name)?;
        let mut cmd = Command::new(weir);
        cmd.args(["lab", "up", "--name", name, "--timeout-s", "600"])
            .args(files);
        let out = cmd.output().context("weir lab up")?;
        let mut g = LabGuard {
            name: name.into(),
            weir: weir.into(),
            view: Value::Null,
            marker: marker.into(),
        };
        if !out.status.success() {
            bail!(
                "weir lab up --name {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        g.view = serde_json::from_slice(&out.stdout).context("lab view")?;
        Ok(g)
    }

    fn apply(&mut self, file: &Path) -> Result<f64> {
        let t = Instant::now();
        let out = Command::new(&self.weir)
            .args(["lab", "apply", "--name", &self.name, "--timeout-s", "900"])
            .arg(file)
            .output()
            .context("weir lab apply")?;
        if !out.status.success() {
            bail!(
                "weir lab apply --name {} {} failed: {}",
                self.name,
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(t.elapsed().as_secs_f64())
    }

    /// The node agent's resident memory now and its peak since it started (MiB), from
    /// /proc: what the whole agent (sources, Store, syncer, observers) holds.
    fn agent_memory(&self) -> Option<(f64, f64)> {
        let pid = self.view["nodes"][0]["agent"]["pid"].as_u64()?;
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |f: &str| {
            st.lines()
                .find(|l| l.starts_with(f))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        Some((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
    }

    fn node_netns(&self) -> String {
        self.view["nodes"][0]["netns"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn node_cgroup(&self) -> PathBuf {
        PathBuf::from(self.view["nodes"][0]["cgroup"].as_str().unwrap_or_default())
    }

    fn ext_netns(&self) -> String {
        self.view["external"]["netns"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn pod_netns(&self, name: &str) -> Result<String> {
        self.view["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name && p["namespace"] == cluster::NAMESPACE)
            .and_then(|p| p["netns"].as_str())
            .map(str::to_string)
            .with_context(|| format!("no pod {name} in the lab view"))
    }

    /// `weir lab probe`: connectivity check before measuring (also adds the external
    /// client's default source address).
    fn probe(&self, from: &str, to: &str, port: u16) -> Result<Value> {
        let out = Command::new(&self.weir)
            .args([
                "lab", "probe", "--name", &self.name, "--from", from, "--to", to,
            ])
            .args([
                "--port",
                &port.to_string(),
                "--count",
                "5",
                "--timeout-ms",
                "2000",
            ])
            .output()
            .context("weir lab probe")?;
        if !out.status.success() {
            bail!(
                "weir lab probe failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["summary"].clone())
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        let _ = Command::new(&self.weir)
            .args(["lab", "down", "--name", &self.name])
            .stdout(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.marker);
    }
}

fn set_sysctls(ns: &str) -> Result<()> {
    netns::in_netns(ns, || -> Result<()> {
        for (p, v) in [
            // Short-lived connections leave TIME_WAIT behind on the client: reuse them
            // (timestamps are on) rather than run out of ports during a rate run.
            ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
            ("/proc/sys/net/ipv4/ip_local_port_range", "10000\t60999"),
        ] {
            std::fs::write(p, v).with_context(|| format!("{p}={v}"))?;
        }
        Ok(())
    })?
}

struct Ctx<'a> {
    o: &'a Opts,
    self_exe: PathBuf,
    secs: f64,
    reps: usize,
    points: Vec<Point>,
    loads: Vec<RuleLoad>,
    probes: Vec<Value>,
    notes: Vec<String>,
}

impl Ctx<'_> {
    fn load(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        targets: &str,
        mode: &str,
    ) -> Result<LoadResult> {
        let mut cmd = Command::new(&self.self_exe);
        cmd.args(["load", "--targets", targets, "--mode", mode])
            .args(["--duration-ms", &((self.secs * 1000.0) as u64).to_string()])
            .args(["--max-ops", "2000000", "--threads", "1"]);
        weir::lab::topology::prepare_child(&mut cmd, Some(ns), cgroup, false)?;
        let out = cmd.output().context("weir-bench load")?;
        if !out.status.success() {
            bail!(
                "load generator failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn iperf(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        target: &str,
    ) -> Result<(f64, Option<String>)> {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", target, "-p", &cluster::IPERF_PORT.to_string(), "-J"])
            .args(["-t", &format!("{}", self.secs.ceil() as u64)]);
        weir::lab::topology::prepare_child(&mut cmd, Some(ns), cgroup, false)?;
        let out = cmd.output().context("iperf3")?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        let err = v["error"].as_str().map(str::to_string);
        Ok((bps / 1e9, err))
    }

    /// Median of `reps` runs of `f` (by value).
    fn median<T: Clone>(
        &self,
        mut f: impl FnMut() -> Result<T>,
        key: impl Fn(&T) -> f64,
    ) -> Result<T> {
        let mut v = Vec::new();
        for _ in 0..self.reps {
            v.push(f()?);
        }
        v.sort_by(|a, b| key(a).total_cmp(&key(b)));
        Ok(v[v.len() / 2].clone())
    }

    /// Every datapath figure of one dataplane at one scale.
    fn measure(&mut self, lab: &LabGuard, dp: &str, n: usize, bare: bool) -> Result<()> {
        let client = lab.pod_netns("client")?;
        let cg = lab.node_cgroup();
        let ext = lab.ext_netns();
        let (cluster_t, iperf_t, nodeport_t) = if bare {
            let pods: Vec<String> = (0..cluster::BACKENDS)
                .map(|i| format!("{}:{}", cluster::backend_ip(i), cluster::TARGET_PORT))
                .collect();
            (
                pods.join(","),
                cluster::backend_ip(0).to_string(),
                pods.join(","),
            )
        } else {
            (
                format!(
                    "{}:{}",
                    cluster::service_ip(cluster::probe_index(n)),
                    cluster::SERVICE_PORT
                ),
                cluster::IPERF_VIP.to_string(),
                format!("{}:{}", cluster::NODE_IP, cluster::NODE_PORT),
            )
        };
        let push = |pts: &mut Vec<Point>, metric: &str, unit: &str, r: &LoadResult| {
            pts.push(Point {
                dataplane: dp.into(),
                services: n,
                metric: metric.into(),
                value: r.rate,
                unit: unit.into(),
                p50_us: Some(r.p50_us),
                p99_us: Some(r.p99_us),
                errors: r.errors,
                note: r.first_error.clone(),
            })
        };
        let r = self.median(
            || self.load(&client, Some(&cg), &cluster_t, "crr"),
            |r| r.rate,
        )?;
        push(&mut self.points, "crr_clusterip", "conn/s", &r);
        let r = self.median(
            || self.load(&client, Some(&cg), &cluster_t, "rr"),
            |r| r.rate,
        )?;
        push(&mut self.points, "rr_clusterip", "req/s", &r);
        let r = self.median(|| self.load(&ext, None, &nodeport_t, "crr"), |r| r.rate)?;
        push(&mut self.points, "crr_nodeport", "conn/s", &r);
        let (gbps, err) = self.median(|| self.iperf(&client, Some(&cg), &iperf_t), |r| r.0)?;
        self.points.push(Point {
            dataplane: dp.into(),
            services: n,
            metric: "throughput_clusterip".into(),
            value: gbps,
            unit: "Gbit/s".into(),
            p50_us: None,
            p99_us: None,
            errors: err.is_some() as u64,
            note: err,
        });
        eprintln!("weir-bench: measured {dp} at {n} Services");
        Ok(())
    }

    fn sanity(&mut self, lab: &LabGuard, dp: &str, n: usize) {
        let vip = cluster::service_ip(cluster::probe_index(n)).to_string();
        for (from, to, port) in [
            ("bench/client", vip.as_str(), cluster::SERVICE_PORT),
            ("external", cluster::NODE_IP, cluster::NODE_PORT),
            ("bench/client", cluster::IPERF_VIP, cluster::IPERF_PORT),
        ] {
            // The iperf Service's backend answers with iperf3, not weir serve: only
            // whether it connects matters (a probe reports that as a timeout).
            let r = lab.probe(from, to, port);
            self.probes.push(json!({
                "dataplane": dp, "services": n, "from": from, "to": format!("{to}:{port}"),
                "summary": r.as_ref().map(|v| v.clone()).unwrap_or_else(|e| json!({"error": e.to_string()})),
            }));
        }
    }
}

fn iperf_servers(lab: &LabGuard) -> Result<Vec<netns::ChildGuard>> {
    let mut v = Vec::new();
    for i in 0..cluster::BACKENDS {
        let ns = lab.pod_netns(&format!("backend-{i}"))?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-p", &cluster::IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        netns::command_in(&ns, &mut cmd)?;
        v.push(netns::ChildGuard::spawn(cmd, "iperf3 server")?);
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok(v)
}

fn cluster_of(path: &Path) -> Result<weir_core::model::Cluster> {
    let text = std::fs::read_to_string(path)?;
    let (objs, errs) = weir::source::yaml::parse_documents(&text, &path.display().to_string());
    if !errs.is_empty() {
        bail!("{}: {:?}", path.display(), errs.first());
    }
    Ok(weir::source::dir::to_cluster(&objs).0)
}

fn kp_settings() -> kubeproxy::Settings {
    kubeproxy::Settings {
        cluster_cidr: cluster::POD_CIDR.into(),
        service_cidr: cluster::SERVICE_CIDR.into(),
        node_ip: cluster::NODE_IP.into(),
    }
}

fn in_ns(ns: &str, prog: &str, args: &[&str]) -> Result<Timed> {
    let mut t = timed(prog, args)?;
    // setns before exec of GNU time: its child, the loader, inherits the namespace.
    netns::command_in(ns, &mut t.cmd)?;
    Ok(t)
}

/// The `dataplane: none` lab: kube-proxy's iptables rules, its nftables rules, then the
/// bare path, at every scale.
fn baselines(cx: &mut Ctx, dir: &Path, lab_name: &str, marker: &Path) -> Result<()> {
    let cfg = dir.join("labconfig-none.yaml");
    std::fs::write(&cfg, cluster::lab_config(false, "none"))?;
    let lab = LabGuard::up(&cx.o.weir, lab_name, &[cfg, dir.join("pods.yaml")], marker)?;
    let _iperf = iperf_servers(&lab)?;
    let node = lab.node_netns();
    set_sysctls(&lab.pod_netns("client")?)?;
    set_sysctls(&lab.ext_netns())?;
    let only = |dp: &str| cx.o.only.is_empty() || cx.o.only.iter().any(|o| o == dp);
    for &n in &cx.o.scales.clone() {
        let c = cluster_of(&cluster::services_path(dir, n))?;
        if only("iptables") {
            if load_iptables(cx, &node, dir, &c, n)? {
                cx.sanity(&lab, "iptables", n);
                cx.measure(&lab, "iptables", n, false)?;
            }
            flush_iptables(&node)?;
        }
        if only("nftables") {
            if load_nft(cx, &node, dir, &c, n)? {
                cx.sanity(&lab, "nftables", n);
                cx.measure(&lab, "nftables", n, false)?;
            }
            flush_nft(&node)?;
        }
        if only("bare") {
            cx.measure(&lab, "bare", n, true)?;
        }
    }
    // The control-plane comparison at CP_SCALE (10k Services / 100k endpoints) when that
    // is not a datapath scale of this run: load times only, no traffic.
    if !cx.o.scales.contains(&CP_SCALE) && only("control") {
        let n = CP_SCALE;
        let c = cluster_of(&cluster::services_path(dir, n))?;
        eprintln!("weir-bench: kube-proxy rule loads at {n} Services (no traffic)");
        if load_iptables(cx, &node, dir, &c, n)? {
            cx.sanity(&lab, "iptables", n);
        }
        flush_iptables(&node)?;
        if load_nft(cx, &node, dir, &c, n)? {
            cx.sanity(&lab, "nftables", n);
        }
        flush_nft(&node)?;
    }
    Ok(())
}

/// The Services of the control-plane comparison (10 endpoints each: 100k endpoints).
pub const CP_SCALE: usize = 10_000;

/// kube-proxy's iptables rules for `c`, timed through iptables-legacy-restore in the
/// node namespace (peak RSS and CPU from wait4). False when the load did not finish
/// within the loader timeout (recorded, and a note says so).
fn load_iptables(
    cx: &mut Ctx,
    node: &str,
    dir: &Path,
    c: &weir_core::model::Cluster,
    n: usize,
) -> Result<bool> {
    let t = Instant::now();
    let (rules, stats) = kubeproxy::iptables_rules(c, &kp_settings());
    let generate_s = t.elapsed().as_secs_f64();
    let jumps = dir.join("iptables-jumps.rules");
    std::fs::write(&jumps, kubeproxy::iptables_jumps())?;
    let file = dir.join(format!("iptables-{n}.rules"));
    std::fs::write(&file, &rules)?;
    let p = run_rusage(
        in_ns(node, "iptables-legacy-restore", &["-w", "--noflush"])?,
        Some(&jumps),
    )?;
    if !p.ok {
        bail!("iptables-legacy-restore (jumps): {}", p.stderr);
    }
    let p = run_rusage_until(
        in_ns(
            node,
            "iptables-legacy-restore",
            &["-w", "--noflush", "--counters"],
        )?,
        Some(&file),
        Some(cx.o.loader_timeout),
    )?;
    let _ = std::fs::remove_file(&file);
    if !p.ok && !p.timed_out {
        bail!(
            "iptables-legacy-restore of {} failed: {}",
            file.display(),
            p.stderr
        );
    }
    cx.loads.push(RuleLoad {
        tool: "iptables-legacy-restore".into(),
        services: n,
        wall_s: p.wall_s,
        cpu_s: p.cpu_s,
        max_rss_mib: p.max_rss_mib,
        generate_s,
        stats,
        completed: !p.timed_out,
    });
    if p.timed_out {
        cx.notes.push(format!(
            "iptables at {n} Services: iptables-legacy-restore had not finished after {:.0} s and was stopped; no iptables figures at this scale",
            p.wall_s
        ));
    }
    Ok(!p.timed_out)
}

fn flush_iptables(node: &str) -> Result<()> {
    for table in ["nat", "filter"] {
        for op in ["-F", "-X"] {
            let p = run_rusage(
                in_ns(node, "iptables-legacy", &["-w", "-t", table, op])?,
                None,
            )?;
            if !p.ok {
                bail!("iptables-legacy -t {table} {op}: {}", p.stderr);
            }
        }
    }
    Ok(())
}

/// kube-proxy's nftables ruleset for `c`, timed through `nft -f` in the node namespace.
/// False when the load did not finish within the loader timeout.
fn load_nft(
    cx: &mut Ctx,
    node: &str,
    dir: &Path,
    c: &weir_core::model::Cluster,
    n: usize,
) -> Result<bool> {
    let t = Instant::now();
    let (rules, stats) = kubeproxy::nft_rules(c, &kp_settings());
    let generate_s = t.elapsed().as_secs_f64();
    let file = dir.join(format!("nftables-{n}.nft"));
    std::fs::write(&file, &rules)?;
    let p = run_rusage_until(
        in_ns(node, "nft", &["-f", &file.display().to_string()])?,
        None,
        Some(cx.o.loader_timeout),
    )?;
    let _ = std::fs::remove_file(&file);
    if !p.ok && !p.timed_out {
        bail!(
            "nft -f {} failed: {}",
            file.display(),
            p.stderr.lines().take(5).collect::<Vec<_>>().join("\n")
        );
    }
    cx.loads.push(RuleLoad {
        tool: "nft -f".into(),
        services: n,
        wall_s: p.wall_s,
        cpu_s: p.cpu_s,
        max_rss_mib: p.max_rss_mib,
        generate_s,
        stats,
        completed: !p.timed_out,
    });
    if p.timed_out {
        cx.notes.push(format!(
            "nftables at {n} Services: nft -f had not finished after {:.0} s and was stopped; no nftables figures at this scale",
            p.wall_s
        ));
    }
    Ok(!p.timed_out)
}

/// Removes kube-proxy's table (none is there when its load was stopped: nft commits a
/// file as one transaction).
fn flush_nft(node: &str) -> Result<()> {
    let p = run_rusage(in_ns(node, "nft", &["list", "tables"])?, None)?;
    if !p.stdout.contains("kube-proxy") {
        return Ok(());
    }
    let p = run_rusage(
        in_ns(node, "nft", &["delete", "table", "ip", "kube-proxy"])?,
        None,
    )?;
    if !p.ok {
        bail!("nft delete table: {}", p.stderr);
    }
    Ok(())
}

/// A weir lab (socket LB on or off) through every scale, ascending (`apply` adds
/// Services).
fn weir_runs(
    cx: &mut Ctx,
    dir: &Path,
    lab_name: &str,
    socket_lb: bool,
    marker: &Path,
) -> Result<()> {
    let dp = if socket_lb { "weir" } else { "weir-nosocklb" };
    let cfg = dir.join(format!("labconfig-{dp}.yaml"));
    std::fs::write(&cfg, cluster::lab_config(socket_lb, "weir"))?;
    let scales = cx.o.scales.clone();
    let t = Instant::now();
    let mut lab = LabGuard::up(
        &cx.o.weir,
        lab_name,
        &[
            cfg,
            dir.join("pods.yaml"),
            cluster::services_path(dir, scales[0]),
        ],
        marker,
    )?;
    let up_s = t.elapsed().as_secs_f64();
    cx.notes.push(format!("{dp}: lab up with {} Services took {up_s:.1} s (namespaces, servers, agent start and first program)", scales[0]));
    let _iperf = iperf_servers(&lab)?;
    set_sysctls(&lab.pod_netns("client")?)?;
    set_sysctls(&lab.ext_netns())?;
    for (i, &n) in scales.iter().enumerate() {
        if i > 0 {
            let s = lab.apply(&cluster::services_path(dir, n))?;
            cx.notes.push(format!("{dp}: `weir lab apply` to {n} Services returned after {s:.1} s (YAML written, agent re-read the directory, programmed)"));
        }
        if let Some((rss, hwm)) = lab.agent_memory() {
            cx.notes.push(format!(
                "{dp}: the agent at {n} Services: VmRSS {rss:.0} MiB, VmHWM {hwm:.0} MiB (peak since its start)"
            ));
        }
        cx.sanity(&lab, dp, n);
        cx.measure(&lab, dp, n, false)?;
    }
    Ok(())
}

fn meta(o: &Opts) -> Value {
    let sh = |c: &str| {
        Command::new("sh")
            .args(["-c", c])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    json!({
        "date": sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "kernel": sh("uname -r"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "cores": sh("nproc"),
        "memory": sh("grep MemTotal /proc/meminfo | awk '{print $2\" kB\"}'"),
        "machine": "2-core VM (Firecracker), shared with other engineers' builds and tests",
        "loadavg_start": sh("cat /proc/loadavg"),
        "git": sh("git rev-parse --short HEAD 2>/dev/null"),
        "command": o.command,
        "mode": if o.quick { "quick" } else { "full" },
        "scales": o.scales,
        "tools": {
            "iptables": sh("iptables-legacy --version"),
            "nft": sh("nft --version"),
            "iperf3": sh("iperf3 --version | head -1"),
        },
    })
}

pub fn run(o: &Opts) -> Result<Value> {
    std::fs::create_dir_all(&o.out)?;
    let work = std::env::temp_dir().join(format!("weir-bench-{}", netns::unique_prefix('y')));
    struct RmDir(PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = RmDir(work.clone());
    let mut files = o.scales.clone();
    if !files.contains(&CP_SCALE) {
        files.push(CP_SCALE);
    }
    cluster::write_all(&work, &files)?;
    let self_exe = std::env::current_exe()?;
    let mut cx = Ctx {
        o,
        self_exe: self_exe.clone(),
        secs: if o.quick { 2.0 } else { 5.0 },
        reps: if o.quick { 1 } else { 3 },
        points: Vec::new(),
        loads: Vec::new(),
        probes: Vec::new(),
        notes: Vec::new(),
    };
    let mut out = json!({ "meta": meta(o) });
    let only = |s: &str| o.only.is_empty() || o.only.iter().any(|x| x == s);

    // 1. Per-packet cost.
    if only("progcost") {
        let runs = if o.quick { 50_000 } else { 300_000 };
        let mut v = Vec::new();
        for n in [1usize, 50_000] {
            eprintln!("weir-bench: BPF_PROG_TEST_RUN at {n} Services ({runs} runs per path)");
            v.extend(crate::progcost::measure(n, runs)?);
        }
        eprintln!("weir-bench: BPF_PROG_TEST_RUN of the policy paths at 0, 1 and 1k policies");
        v.extend(crate::progcost::measure_policy(runs)?);
        out["progcost"] = serde_json::to_value(v)?;
    }

    // 2. Control plane (weir side; kube-proxy's load times come from step 3).
    if only("control") {
        let n = 10_000;
        let changes = if o.quick { 500 } else { 2000 };
        let mut cp = Vec::new();
        for dp in ["real", "fake"] {
            eprintln!("weir-bench: control plane, {n} Services into the {dp} datapath");
            let exe = self_exe.display().to_string();
            let cmd = timed(
                &exe,
                &[
                    "cp-weir",
                    "--services",
                    &n.to_string(),
                    "--changes",
                    &changes.to_string(),
                    "--datapath",
                    dp,
                ],
            )?;
            let p = run_rusage(cmd, None)?;
            if !p.ok {
                bail!("cp-weir {dp} failed: {}", p.stderr);
            }
            let mut v: Value = serde_json::from_str(&p.stdout)?;
            v["process_max_rss_mib"] = json!(p.max_rss_mib);
            cp.push(v);
        }
        out["control_weir"] = Value::Array(cp);
        let mut cp = Vec::new();
        for dp in ["real", "fake"] {
            eprintln!(
                "weir-bench: control plane, 10k pods / 1k NetworkPolicies into the {dp} datapath"
            );
            let exe = self_exe.display().to_string();
            let cmd = timed(
                &exe,
                &[
                    "cp-policy",
                    "--changes",
                    &(changes / 2).to_string(),
                    "--datapath",
                    dp,
                ],
            )?;
            let p = run_rusage(cmd, None)?;
            if !p.ok {
                bail!("cp-policy {dp} failed: {}", p.stderr);
            }
            let mut v: Value = serde_json::from_str(&p.stdout)?;
            v["process_max_rss_mib"] = json!(p.max_rss_mib);
            cp.push(v);
        }
        out["control_policy"] = Value::Array(cp);
    }

    // 3. Datapath (and kube-proxy's rule load times).
    let tag = netns::unique_prefix('b')[2..].to_string();
    let marker = o.out.join(".lab");
    let datapath = (|| -> Result<()> {
        if only("iptables") || only("nftables") || only("bare") {
            baselines(&mut cx, &work, &format!("bn{tag}k"), &marker)?;
        }
        if only("weir") {
            weir_runs(&mut cx, &work, &format!("bn{tag}s"), true, &marker)?;
        }
        if only("weir-nosocklb") {
            weir_runs(&mut cx, &work, &format!("bn{tag}p"), false, &marker)?;
        }
        Ok(())
    })();
    if let Err(e) = &datapath {
        cx.notes.push(format!("datapath runs stopped early: {e:#}"));
        eprintln!("weir-bench: datapath runs stopped early: {e:#}");
    }
    out["datapath"] = serde_json::to_value(&cx.points)?;
    out["rule_loads"] = serde_json::to_value(&cx.loads)?;
    out["probes"] = Value::Array(cx.probes.clone());
    out["notes"] = serde_json::to_value(&cx.notes)?;
    out["meta"]["loadavg_end"] = json!(
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    out["meta"]["durations"] =
        json!({"seconds_per_run": cx.secs, "repetitions": cx.reps, "threads": 1});
    out["complete"] = json!(datapath.is_ok());
    Ok(out)
}
