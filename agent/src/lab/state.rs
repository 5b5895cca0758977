//! A lab's state directory, its lock, the processes it started, and `down`.
//!
//! ```text
//! /run/weir-lab/<name>/state.json      everything below, rewritten atomically after
//!                                      every step (a crash leaves a usable record)
//! /run/weir-lab/<name>/objects/        the YAML the agents read (cluster.yaml, the
//!                                      generation files)
//! /run/weir-lab/<name>/logs/           one log per agent and per server
//! /run/weir-lab/.<name>.lock           flock held by up/apply/delete/down
//! ```
//!
//! Every namespace and cgroup is recorded *before* it is created, and every process
//! right after it starts (PID and start time from /proc/PID/stat, so that a reused PID
//! is never signalled). `down` uses the record and, for what a crash left unrecorded,
//! lists namespaces, cgroups and pin directories by the lab's prefix and the processes
//! inside those namespaces and cgroups.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    Names, STATE_ROOT,
    spec::{Input, LabConfig, Resolved},
};
use crate::netns;

pub const STATE_VERSION: u32 = 1;

/// A process the lab started: PID plus its start time (clock ticks since boot, field 22
/// of /proc/PID/stat), which guards every signal against PID reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Proc {
    pub pid: u32,
    pub start_time: u64,
}

/// (state, start time) of a process from /proc/PID/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields after the
    // last ')' are reliable. Field 3 (state) is the first of them, field 22 (starttime)
    // the 20th.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

impl Proc {
    pub fn of(pid: u32) -> Option<Proc> {
        proc_stat(pid).map(|(_, start_time)| Proc { pid, start_time })
    }

    /// Still the process we started, and not a zombie.
    pub fn alive(&self) -> bool {
        matches!(proc_stat(self.pid), Some((st, t)) if t == self.start_time && st != 'Z')
    }

    /// Signals the process if it is still the one we started.
    pub fn signal(&self, sig: i32) -> bool {
        if !self.alive() {
            return false;
        }
        unsafe { libc::kill(self.pid as i32, sig) == 0 }
    }

    /// Reaps it if it is our child (a no-op otherwise).
    pub fn reap(&self) {
        let mut status = 0;
        unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
    }
}

/// Ends processes: SIGTERM, up to `grace` to exit, then SIGKILL. Returns the PIDs that
/// were alive.
pub fn stop_all(procs: &[Proc], grace: Duration) -> Vec<u32> {
    let alive: Vec<Proc> = procs.iter().copied().filter(Proc::alive).collect();
    for p in &alive {
        p.signal(libc::SIGTERM);
    }
    let wait = |d: Duration| {
        let deadline = Instant::now() + d;
        loop {
            alive.iter().for_each(Proc::reap);
            if !alive.iter().any(Proc::alive) || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait(grace);
    for p in &alive {
        p.signal(libc::SIGKILL);
    }
    wait(Duration::from_secs(2));
    alive.iter().map(|p| p.pid).collect()
}

/// A pod or an endpoint server as it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRt {
    /// What its server answers with: `namespace/name`, or the bare address.
    pub identity: String,
    pub node: String,
    pub netns: String,
    /// Host-side veth in the node namespace.
    pub lxc: String,
    pub mac: String,
    pub ips: Vec<IpAddr>,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub server: Option<Proc>,
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRt {
    pub index: u32,
    pub netns: String,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub ips: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub mac: String,
    /// Next `lxc<N>` index: names are never reused within a node, so an agent never
    /// mistakes a new pod's veth for one it attached before.
    pub next_lxc: u32,
    pub agent: Option<Proc>,
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub version: u32,
    pub name: String,
    /// "up" or "demo" (the demo may clean up leftovers of its own earlier runs).
    pub created_by: String,
    /// The weir binary the daemons run.
    pub exe: PathBuf,
    pub config: LabConfig,
    /// Generation of the objects last published to the agents.
    pub generation: u64,
    /// Every network namespace and cgroup ever created for this lab (recorded first).
    pub namespaces: BTreeSet<String>,
    pub cgroups: BTreeSet<PathBuf>,
    pub fabric: Option<String>,
    pub external: Option<String>,
    pub next_node_index: u32,
    pub nodes: BTreeMap<String, NodeRt>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, WorkloadRt>,
    /// Endpoint servers by address.
    pub endpoints: BTreeMap<String, WorkloadRt>,
    /// Fabric host routes: destination -> node it is routed to.
    pub fabric_routes: BTreeMap<String, String>,
    /// Extra agent flags this build supports (e.g. --cluster-cidr).
    pub agent_flags: Vec<String>,
    pub input: Input,
    pub resolved: Option<Resolved>,
}

/// Writes a file atomically: a temporary file (whose name the directory source ignores)
/// renamed over the target.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .context("path has no file name")?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all().ok();
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

impl State {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub fn load(dir: &Path) -> Result<State> {
        let p = State::path(dir);
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let s: State =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        if s.version != STATE_VERSION {
            bail!(
                "{} has state version {} (this weir writes {STATE_VERSION}); remove the lab with `weir lab down --name {}`",
                p.display(),
                s.version,
                s.name
            );
        }
        Ok(s)
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(&State::path(dir), &serde_json::to_vec_pretty(self)?)
    }

    /// Every process the lab recorded.
    pub fn processes(&self) -> Vec<Proc> {
        self.nodes
            .values()
            .filter_map(|n| n.agent)
            .chain(
                self.pods
                    .values()
                    .chain(self.endpoints.values())
                    .filter_map(|w| w.server),
            )
            .collect()
    }
}

/// An exclusive lock on one lab, held by commands that change it.
pub struct Lock {
    _f: std::fs::File,
    path: PathBuf,
}

impl Lock {
    pub fn acquire(lab: &str, timeout: Duration) -> Result<Lock> {
        std::fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
        let path = PathBuf::from(STATE_ROOT).join(format!(".{lab}.lock"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        let mut said = false;
        loop {
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Lock { _f: f, path });
            }
            if Instant::now() > deadline {
                bail!(
                    "another `weir lab` command holds the lock of lab {lab} ({}); try again when it is done",
                    path.display()
                );
            }
            if !said {
                tracing::info!("waiting for another weir lab command on lab {lab}");
                said = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the lock file (after `down`), still holding the lock.
    pub fn remove_file(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a lab leaves on the machine, found by name.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Leftovers {
    pub namespaces: Vec<String>,
    pub cgroups: Vec<String>,
    pub pin_dirs: Vec<String>,
    pub state_dir: Option<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.cgroups.is_empty()
            && self.pin_dirs.is_empty()
            && self.state_dir.is_none()
    }
}

fn dir_entries_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Everything carrying this lab's names.
pub fn find_leftovers(names: &Names) -> Leftovers {
    let cg_root = netns::cgroup2_root().ok();
    Leftovers {
        namespaces: netns::list_by_prefix(&names.prefix()),
        cgroups: cg_root
            .map(|r| dir_entries_with_prefix(&r, &names.cgroup_prefix()))
            .unwrap_or_default()
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        pin_dirs: dir_entries_with_prefix(
            Path::new(crate::datapath::DEFAULT_BPFFS_ROOT),
            &names.prefix(),
        )
        .iter()
        .map(|p| p.display().to_string())
        .collect(),
        state_dir: names
            .state_dir()
            .exists()
            .then(|| names.state_dir().display().to_string()),
    }
}

/// Names of every lab on this machine: state directories, and namespaces, cgroups and
/// pin directories carrying a lab prefix (a crashed `up` may have left only those).
pub fn all_labs() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(rd) = std::fs::read_dir(STATE_ROOT) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && super::check_name(&n).is_ok() {
                out.insert(n);
            }
        }
    }
    let mut names: Vec<String> = netns::list_by_prefix(super::NETNS_PREFIX);
    if let Ok(root) = netns::cgroup2_root() {
        names.extend(
            dir_entries_with_prefix(&root, super::CGROUP_PREFIX)
                .iter()
                .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned())),
        );
    }
    names.extend(
        dir_entries_with_prefix(
            Path::new(crate::datapath::DEFAULT_BPFFS_ROOT),
            super::NETNS_PREFIX,
        )
        .iter()
        .filter_map(|p| p.file_name().map(|f| f.to_string_lossy().into_owned())),
    );
    for n in names {
        if let Some(l) = super::lab_of(&n) {
            out.insert(l.to_string());
        }
    }
    out
}

fn netns_inode(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(netns::netns_path(name))
        .ok()
        .map(|m| m.ino())
}

/// Processes whose network namespace is one of `namespaces` (by nsfs inode).
fn processes_in_namespaces(namespaces: &[String]) -> Vec<Proc> {
    use std::os::unix::fs::MetadataExt as _;
    let inodes: BTreeSet<u64> = namespaces.iter().filter_map(|n| netns_inode(n)).collect();
    if inodes.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            && inodes.contains(&m.ino())
            && let Some(p) = Proc::of(pid)
        {
            out.push(p);
        }
    }
    out
}

fn processes_in_cgroups(cgroups: &[String]) -> Vec<Proc> {
    let me = std::process::id();
    cgroups
        .iter()
        .filter_map(|c| std::fs::read_to_string(Path::new(c).join("cgroup.procs")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|p| *p != me)
        .filter_map(Proc::of)
        .collect()
}

/// What `down` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DownReport {
    pub lab: String,
    /// Whether anything of this lab existed.
    pub existed: bool,
    pub processes: Vec<u32>,
    pub namespaces: Vec<String>,
    pub cgroups: Vec<String>,
    pub pin_dirs: Vec<String>,
    pub state_dir: Option<String>,
    /// What could not be removed (empty on success).
    pub remaining: Vec<String>,
}

/// Removes a cgroup directory once the kernel has released its (already ended)
/// processes.
fn remove_cgroup(path: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return false,
        }
    }
}

/// Removes everything of one lab: processes (recorded ones verified by start time, and
/// any process inside the lab's namespaces or cgroups), then namespaces, cgroups, pin
/// directories and the state directory, all by name. Caller holds the lab's lock.
pub fn down(names: &Names) -> DownReport {
    let dir = names.state_dir();
    let state = State::load(&dir).ok();
    let before = find_leftovers(names);
    let mut report = DownReport {
        lab: names.lab.clone(),
        existed: !before.is_empty(),
        ..Default::default()
    };

    let mut namespaces: BTreeSet<String> = before.namespaces.iter().cloned().collect();
    let mut cgroups: BTreeSet<String> = before.cgroups.iter().cloned().collect();
    if let Some(s) = &state {
        // Only names that carry the prefix, even if the state file was edited.
        namespaces.extend(
            s.namespaces
                .iter()
                .filter(|n| n.starts_with(&names.prefix()))
                .filter(|n| Path::new(&netns::netns_path(n)).exists())
                .cloned(),
        );
        cgroups.extend(
            s.cgroups
                .iter()
                .filter(|c| {
                    c.file_name()
                        .is_some_and(|f| f.to_string_lossy().starts_with(&names.cgroup_prefix()))
                })
                .filter(|c| c.exists())
                .map(|c| c.display().to_string()),
        );
    }
    let ns_list: Vec<String> = namespaces.iter().cloned().collect();
    let cg_list: Vec<String> = cgroups.iter().cloned().collect();

    // Agents first (SIGTERM: they remove their pins), then everything else.
    let mut agents: Vec<Proc> = Vec::new();
    let mut others: Vec<Proc> = Vec::new();
    if let Some(s) = &state {
        agents.extend(s.nodes.values().filter_map(|n| n.agent));
        others.extend(
            s.pods
                .values()
                .chain(s.endpoints.values())
                .filter_map(|w| w.server),
        );
    }
    let mut stopped = stop_all(&agents, Duration::from_secs(5));
    let mut rest: BTreeMap<u32, Proc> = BTreeMap::new();
    for p in others
        .into_iter()
        .chain(processes_in_namespaces(&ns_list))
        .chain(processes_in_cgroups(&cg_list))
    {
        rest.insert(p.pid, p);
    }
    let rest: Vec<Proc> = rest.into_values().collect();
    stopped.extend(stop_all(&rest, Duration::from_secs(2)));
    // A process a crashed `up` forked just before it died enters its namespace and
    // cgroup between fork and exec: scan again until nothing new turns up.
    for _ in 0..3 {
        let late: Vec<Proc> = processes_in_namespaces(&ns_list)
            .into_iter()
            .chain(processes_in_cgroups(&cg_list))
            .filter(Proc::alive)
            .collect();
        if late.is_empty() {
            break;
        }
        stopped.extend(stop_all(&late, Duration::from_secs(2)));
    }
    stopped.sort();
    stopped.dedup();
    report.processes = stopped;

    for n in &ns_list {
        match netns::ip(&["netns", "del", n]) {
            Ok(_) => report.namespaces.push(n.clone()),
            Err(e) => report.remaining.push(format!("namespace {n}: {e:#}")),
        }
    }
    for c in &cg_list {
        if remove_cgroup(Path::new(c)) {
            report.cgroups.push(c.clone());
        } else {
            report.remaining.push(format!(
                "cgroup {c}: not empty (processes: {})",
                std::fs::read_to_string(Path::new(c).join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
    }
    for p in find_leftovers(names).pin_dirs {
        match crate::datapath::remove_pin_dir(std::path::Path::new(&p)) {
            Ok(()) => report.pin_dirs.push(p),
            Err(e) => report.remaining.push(format!("pin directory {p}: {e}")),
        }
    }
    if dir.exists() {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => report.state_dir = Some(dir.display().to_string()),
            Err(e) => report
                .remaining
                .push(format!("state directory {}: {e}", dir.display())),
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_identity_includes_start_time() {
        let me = Proc::of(std::process::id()).expect("own stat");
        assert!(me.alive());
        let impostor = Proc {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !impostor.alive(),
            "a different start time is another process"
        );
        assert!(!impostor.signal(0));
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file() {
        let d = std::env::temp_dir().join(format!("weir-lab-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("x.yaml");
        write_atomic(&p, b"a").unwrap();
        write_atomic(&p, b"b").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "b");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
