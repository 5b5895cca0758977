//! Control plane: the agent's sync path (Store snapshot -> incremental pipeline ->
//! Syncer -> Datapath) programming the benchmark cluster from nothing, into the real BPF
//! maps (the loaded object with fresh, throwaway pins) or into the fake datapath, then
//! the latency of single EndpointSlice changes (one endpoint's readiness flips: the
//! change set the Store hands the loop, through the syncer, to the map write done).
//!
//! Run as its own process (`weir-bench cp-weir`) so that its peak memory (VmHWM) is its
//! own: the YAML is parsed into the model first (the agent's Store holds the same), the
//! peak is reset (`/proc/self/clear_refs` = 5), then the sync runs. What is left out:
//! the source side of the agent (directory polling or API watches), which is the same
//! for every dataplane.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use weir_core::{
    datapath::{Datapath, FakeDatapath},
    image::MapImage,
    model::ObjRef,
    pipeline::ChangeSet,
    sync::{SyncInput, Syncer},
};

use crate::{cluster, progcost};

#[derive(Debug, Clone, Serialize)]
pub struct WeirSync {
    pub datapath: String,
    pub services: usize,
    pub endpoints: usize,
    pub ops: usize,
    pub wall_s: f64,
    pub cpu_s: f64,
    /// VmHWM after the program, with the peak reset just before it (model included).
    pub peak_mib: f64,
    /// VmRSS before the sync (the parsed model and the loaded object).
    pub before_mib: f64,
    pub changes: usize,
    pub change_p50_us: f64,
    pub change_p99_us: f64,
    pub change_max_us: f64,
    pub change_ops_mean: f64,
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The first sync from nothing, with the peak memory reset just before it.
struct FirstSync {
    ops: usize,
    wall_s: f64,
    cpu_s: f64,
    /// VmHWM after the sync (model and loaded object included).
    peak_mib: f64,
}

fn first_sync<D: Datapath>(c: &weir_core::model::Cluster, dp: &mut D) -> (Syncer, FirstSync) {
    let mut s = Syncer::new(
        progcost::settings(),
        MapImage::default(),
        Default::default(),
    );
    // Peak memory from here on.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    let cpu = cpu_now();
    let r = s.sync(
        SyncInput {
            cluster: c,
            changes: &ChangeSet::everything(),
            sources_synced: true,
            generation: 1,
        },
        dp,
    );
    let first = FirstSync {
        ops: r.ops,
        wall_s: t.elapsed().as_secs_f64(),
        cpu_s: (cpu_now() - cpu).as_secs_f64(),
        peak_mib: status_kib("VmHWM:") / 1024.0,
    };
    (s, first)
}

/// Single-change syncs, each timed from the change set to the map write done.
#[derive(Default)]
struct Latencies {
    ns: Vec<u32>,
    ops: usize,
}

impl Latencies {
    fn time<D: Datapath>(
        &mut self,
        s: &mut Syncer,
        c: &weir_core::model::Cluster,
        cs: &ChangeSet,
        generation: u64,
        dp: &mut D,
    ) {
        let t = Instant::now();
        let r = s.sync(
            SyncInput {
                cluster: c,
                changes: cs,
                sources_synced: true,
                generation,
            },
            dp,
        );
        self.ns
            .push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        self.ops += r.ops;
    }

    /// The q-quantile in µs (1.0: the maximum).
    fn quantile_us(&mut self, q: f64) -> f64 {
        self.ns.sort_unstable();
        crate::load::percentile(&self.ns, q) / 1e3
    }
}

fn run_sync<D: Datapath>(
    n: usize,
    changes: usize,
    datapath: &str,
    dp: &mut D,
    before_mib: f64,
    mut c: weir_core::model::Cluster,
) -> WeirSync {
    let (mut s, first) = first_sync(&c, dp);
    let mut lat = Latencies::default();
    for round in 0..changes {
        // Spread over the Services (a prime stride), alternating endpoints.
        let sid = ObjRef::new(
            cluster::NAMESPACE,
            format!("{}-bench", cluster::service_name((round * 7919) % n)),
        );
        let Some(slice) = c.slices.get_mut(&sid) else {
            continue;
        };
        let e = &mut slice.endpoints[round % cluster::ENDPOINTS_PER_SERVICE];
        e.ready = Some(!e.ready.unwrap_or(true));
        let cs = ChangeSet {
            slices: [sid].into(),
            ..Default::default()
        };
        lat.time(&mut s, &c, &cs, 2 + round as u64, dp);
    }
    WeirSync {
        datapath: datapath.into(),
        services: n,
        endpoints: n * cluster::ENDPOINTS_PER_SERVICE,
        ops: first.ops,
        wall_s: first.wall_s,
        cpu_s: first.cpu_s,
        peak_mib: first.peak_mib,
        before_mib,
        changes: lat.ns.len(),
        change_p50_us: lat.quantile_us(0.5),
        change_p99_us: lat.quantile_us(0.99),
        change_max_us: lat.quantile_us(1.0),
        change_ops_mean: lat.ops as f64 / lat.ns.len().max(1) as f64,
    }
}

/// `weir-bench cp-weir`: parse the YAML like the agent, then program it.
pub fn weir_sync(n: usize, changes: usize, datapath: &str) -> Result<WeirSync> {
    let c = progcost::cluster(n)?;
    match datapath {
        "real" => {
            let mut h = weir::testing::prog::ProgHarness::with_capacities(progcost::capacities(n))
                .context("loading the datapath")?;
            let before = status_kib("VmRSS:") / 1024.0;
            Ok(run_sync(n, changes, datapath, &mut h.dp, before, c))
        }
        "fake" => {
            let mut dp = FakeDatapath::default();
            let before = status_kib("VmRSS:") / 1024.0;
            let mut r = run_sync(n, changes, datapath, &mut dp, before, c);
            // The fake keeps an op log for tests; it is not agent memory, but it is in
            // the peak: say so rather than hide it.
            r.datapath = "fake (peak includes the fake's op log and map copy)".into();
            Ok(r)
        }
        other => anyhow::bail!("datapath must be real or fake, not {other}"),
    }
}

/// `weir-bench cp-policy`: the agent's sync path programming issue 8's NetworkPolicy
/// scale (10k pods, 1k policies, 100 nodes; see [`crate::policygen`]) for one node from
/// nothing, then single pod label changes (a remote pod's `tier` flips, so its identity,
/// its IPCACHE entry and every selector that names the tier change), each from the change
/// set to the map write done.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySync {
    pub datapath: String,
    pub pods: usize,
    pub policies: usize,
    pub nodes: usize,
    pub local_pods: usize,
    pub ops: usize,
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_mib: f64,
    pub before_mib: f64,
    /// Entries of the node's policy maps after the first sync.
    pub ipcache: usize,
    pub endpoints: usize,
    pub policy: usize,
    pub policy_rules: usize,
    pub changes: usize,
    pub change_p50_us: f64,
    pub change_p99_us: f64,
    pub change_max_us: f64,
    pub change_ops_mean: f64,
}

fn policy_cluster() -> weir_core::model::Cluster {
    let mut c = weir_core::model::Cluster::default();
    c.nodes.insert(
        cluster::NODE.into(),
        weir_core::model::Node {
            name: cluster::NODE.into(),
            internal_ips: vec![cluster::NODE_IP.parse().expect("ip")],
            pod_cidrs: vec![cluster::NODE_POD_CIDR.parse().expect("cidr")],
            ..Default::default()
        },
    );
    crate::policygen::add(&mut c, &crate::policygen::Gen::ISSUE, cluster::NODE);
    c
}

fn run_policy_sync<D: Datapath>(
    changes: usize,
    datapath: &str,
    dp: &mut D,
    before_mib: f64,
    mut c: weir_core::model::Cluster,
) -> PolicySync {
    let g = crate::policygen::Gen::ISSUE;
    let (mut s, first) = first_sync(&c, dp);
    let img = &s.current().policy;
    let sizes = (
        img.ipcache.len(),
        img.endpoints.len(),
        img.policy.len(),
        img.rules.len(),
    );
    // Remote pods only (a local pod's change also rewrites its own entries), spread
    // over the cluster with a prime stride.
    let remote: Vec<ObjRef> = c
        .pods
        .values()
        .filter(|p| p.node_name.as_deref() != Some(cluster::NODE))
        .map(|p| p.id.clone())
        .collect();
    let mut lat = Latencies::default();
    for round in 0..changes {
        let id = remote[(round * 7919) % remote.len()].clone();
        let Some(pod) = c.pods.get_mut(&id) else {
            continue;
        };
        let tier = pod.labels.get("tier").cloned().unwrap_or_default();
        let next = if tier == "front" { "back" } else { "front" };
        pod.labels.insert("tier".into(), next.into());
        let cs = ChangeSet {
            pods: [id].into(),
            ..Default::default()
        };
        lat.time(&mut s, &c, &cs, 2 + round as u64, dp);
    }
    PolicySync {
        datapath: datapath.into(),
        pods: g.pods,
        policies: g.policies,
        nodes: g.nodes,
        local_pods: c
            .pods
            .values()
            .filter(|p| p.node_name.as_deref() == Some(cluster::NODE))
            .count(),
        ops: first.ops,
        wall_s: first.wall_s,
        cpu_s: first.cpu_s,
        peak_mib: first.peak_mib,
        before_mib,
        ipcache: sizes.0,
        endpoints: sizes.1,
        policy: sizes.2,
        policy_rules: sizes.3,
        changes: lat.ns.len(),
        change_p50_us: lat.quantile_us(0.5),
        change_p99_us: lat.quantile_us(0.99),
        change_max_us: lat.quantile_us(1.0),
        change_ops_mean: lat.ops as f64 / lat.ns.len().max(1) as f64,
    }
}

/// `weir-bench cp-policy`: build the policy cluster's model, then program it.
pub fn policy_sync(changes: usize, datapath: &str) -> Result<PolicySync> {
    let c = policy_cluster();
    match datapath {
        "real" => {
            let mut h = weir::testing::prog::ProgHarness::new().context("loading the datapath")?;
            let before = status_kib("VmRSS:") / 1024.0;
            Ok(run_policy_sync(changes, datapath, &mut h.dp, before, c))
        }
        "fake" => {
            let mut dp = FakeDatapath::default();
            let before = status_kib("VmRSS:") / 1024.0;
            let mut r = run_policy_sync(changes, datapath, &mut dp, before, c);
            r.datapath = "fake (peak includes the fake's op log and map copy)".into();
            Ok(r)
        }
        other => anyhow::bail!("datapath must be real or fake, not {other}"),
    }
}
