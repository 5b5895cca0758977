//! `weir lab`: a mini-cluster of network namespaces built from ordinary Kubernetes YAML,
//! with real servers, one real `weir agent` per node and scriptable probes. It is weir's
//! embedded default (what a newcomer runs first) and the test bed of the end-to-end
//! tests. Commands and their JSON are a public interface, documented in docs/lab.md.
//!
//! # Layout
//! - [`spec`] (pure): the input objects, the lab configuration, and [`spec::resolve`],
//!   which fills in what a cluster would (node addresses and pod CIDRs, pod IPs,
//!   clusterIPs, nodePorts, load balancer IPs, readiness, derived EndpointSlices).
//! - [`state`]: the state directory (`/run/weir-lab/<name>/state.json`, `objects/`,
//!   `logs/`), the lock, recorded processes (PID + start time), and `down`, which also
//!   cleans up after a crashed `up` by listing everything carrying the lab's prefix.
//! - [`topology`]: namespaces, veths, routes, cgroups, servers and agents; reconciles
//!   the running topology with a resolution; publishes the objects the agents read and
//!   waits until every agent reports the generation programmed.
//! - [`probe`]: `--from`/`--to` parsing and resolution, the probe worker (a child process
//!   entered into the source's namespace and cgroup) and its JSON results.
//! - [`matrix`]: every pod to every pod at once.
//! - [`view`]: the JSON shapes `up`, `apply`, `delete` and `status` print.
//! - [`demo`]: `weir lab demo`, driven by examples/demo.
//! - [`cli`]: the `weir lab` subcommands.
//!
//! # Names (everything the lab creates carries its prefix)
//! A lab name is 1-12 of `[a-z0-9]` (no `-`, so that `wl-<name>-` never prefixes another
//! lab's names). Network namespaces: `wl-<name>-fabric`, `wl-<name>-ext`,
//! `wl-<name>-n-<node>`, `wl-<name>-p-<namespace>.<pod>`, `wl-<name>-e-<address>`.
//! cgroups: `<cgroup2 root>/weir-lab-<name>-<node>`. bpffs: `/sys/fs/bpf/weir/wl-<name>-<node>`.
//! Interfaces only need to be unique inside their namespace: `eth0` (node uplink, pod
//! side of a pod veth, external client), `lxc<N>` (host side of pod veths, never reused
//! within a node), `n<N>` and `ext` in the fabric.

pub mod cli;
pub mod demo;
pub mod matrix;
pub mod probe;
pub mod spec;
pub mod state;
pub mod topology;
pub mod view;

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Where lab state directories live.
pub const STATE_ROOT: &str = "/run/weir-lab";
/// Prefix of every network namespace of every lab.
pub const NETNS_PREFIX: &str = "wl-";
/// Prefix of every cgroup of every lab.
pub const CGROUP_PREFIX: &str = "weir-lab-";
/// Default lab name.
pub const DEFAULT_NAME: &str = "lab";

/// Checks a lab name: 1-12 of `[a-z0-9]`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 12
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        bail!(
            "bad lab name {name:?}: use 1-12 lowercase letters and digits (no '-', so that one lab's prefix never matches another's)"
        );
    }
    Ok(())
}

/// Names of one lab's objects outside its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub lab: String,
}

/// Keeps a netns name within what `ip netns` and /run/netns accept; long Kubernetes
/// names (up to 253 bytes) are shortened with a hash that keeps them unique.
fn bounded(s: String) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s;
    }
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    let mut cut = MAX - 17;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}-{h:016x}", &s[..cut])
}

impl Names {
    pub fn new(lab: &str) -> Names {
        Names {
            lab: lab.to_string(),
        }
    }

    /// Prefix of every namespace and pin directory of this lab.
    pub fn prefix(&self) -> String {
        format!("{NETNS_PREFIX}{}-", self.lab)
    }

    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(STATE_ROOT).join(&self.lab)
    }

    pub fn fabric(&self) -> String {
        format!("{}fabric", self.prefix())
    }

    pub fn external(&self) -> String {
        format!("{}ext", self.prefix())
    }

    pub fn node(&self, node: &str) -> String {
        bounded(format!("{}n-{node}", self.prefix()))
    }

    pub fn pod(&self, key: &str) -> String {
        // `.` between namespace and pod: a namespace name (a DNS label) has no dot, so
        // `a-b/c` and `a/b-c` cannot collide as they would with `-`.
        bounded(format!("{}p-{}", self.prefix(), key.replacen('/', ".", 1)))
    }

    pub fn endpoint(&self, addr: &std::net::IpAddr) -> String {
        bounded(format!(
            "{}e-{}",
            self.prefix(),
            addr.to_string().replace(':', "_")
        ))
    }

    pub fn cgroup_name(&self, node: &str) -> String {
        format!("{CGROUP_PREFIX}{}-{node}", self.lab)
    }

    pub fn cgroup_prefix(&self) -> String {
        format!("{CGROUP_PREFIX}{}-", self.lab)
    }

    /// bpffs refuses `.` in names; node names may contain dots.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        PathBuf::from(crate::datapath::DEFAULT_BPFFS_ROOT).join(format!(
            "{}{}",
            self.prefix(),
            node.replace('.', "_")
        ))
    }
}

/// The lab a namespace, cgroup or pin directory name belongs to, if it is a lab's.
pub fn lab_of(name: &str) -> Option<&str> {
    let rest = name
        .strip_prefix(NETNS_PREFIX)
        .or_else(|| name.strip_prefix(CGROUP_PREFIX))?;
    let (lab, _) = rest.split_once('-')?;
    check_name(lab).ok().map(|_| lab)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_never_match_another_lab() {
        let n = Names::new("a");
        assert_eq!(n.node("node-1"), "wl-a-n-node-1");
        assert_eq!(n.pod("x/a"), "wl-a-p-x.a");
        assert_ne!(n.pod("a-b/c"), n.pod("a/b-c"));
        assert_eq!(n.endpoint(&"fd00::5".parse().unwrap()), "wl-a-e-fd00__5");
        assert_eq!(n.cgroup_name("node.1"), "weir-lab-a-node.1");
        assert_eq!(
            n.pin_dir("node.1"),
            PathBuf::from("/sys/fs/bpf/weir/wl-a-node_1")
        );
        // Lab "ab"'s names never start with lab "a"'s prefix.
        assert!(!Names::new("ab").node("x").starts_with(&n.prefix()));
        assert_eq!(lab_of("wl-ab-n-x"), Some("ab"));
        assert_eq!(lab_of("weir-lab-ab-node-1"), Some("ab"));
        assert_eq!(lab_of("wl-"), None);
        assert_eq!(lab_of("wd1234"), None);
        let long = n.pod(&format!("x/{}", "p".repeat(250)));
        assert!(
            long.len() <= 200 && long.starts_with("wl-a-p-x.ppp"),
            "{long}"
        );
        assert_ne!(long, n.pod(&format!("x/{}q", "p".repeat(250))));
    }

    #[test]
    fn lab_names_are_checked() {
        assert!(check_name("t1").is_ok());
        for bad in ["", "a-b", "A", "toolongname123", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
