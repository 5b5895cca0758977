//! The node agent: load the datapath, attach it to interfaces as they appear, and keep
//! the maps equal to what the cluster objects say.
//!
//! The loop polls its source and the interface list (every `poll`), debounces bursts
//! (`debounce`), and on every change computes the desired image (per-Service cached,
//! see `weir_core::pipeline`), diffs it against what the maps hold and applies the
//! plan. On start it adopts the pinned maps: the ids they hold seed the allocator, and
//! the first diff only writes what changed, so a restart flushes nothing.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tracing::{debug, error, info, warn};
use weir_core::{
    datapath::Datapath,
    image::MapImage,
    model::Cluster,
    pipeline::{NodeSettings, Pipeline},
    plan,
};

use crate::{
    datapath::{Dataplane, Hook, LoadOptions},
    netns,
    source::dir::{self, DirSource},
};

/// What to do with the pinned maps and links when the agent exits on a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Leave maps and links pinned: the datapath keeps forwarding and a restarted agent
    /// adopts it (what a DaemonSet upgrade needs).
    Keep,
    /// Remove the instance's pins: the datapath is detached when the agent exits.
    Remove,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub source_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub pod_ifaces: Vec<String>,
    pub uplinks: Vec<String>,
    pub on_exit: OnExit,
    pub capacities: BTreeMap<String, u32>,
    pub poll: Duration,
    pub debounce: Duration,
    /// Node-level datapath settings (`node_name` is overwritten with `node_name` above).
    pub node: NodeSettings,
    /// cgroup v2 directory whose sockets get socket-level load balancing (None: off).
    pub cgroup: Option<PathBuf>,
}

/// Name of the file in a directory source whose number the agent reports as the input
/// generation it has programmed (CONFIG.generation), so that `weir lab` can wait for it.
pub const GENERATION_FILE: &str = ".weir-generation";

fn read_generation(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join(GENERATION_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub async fn run(cfg: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let mut dataplane = Dataplane::load(&LoadOptions {
        pin_dir: cfg.pin_dir.clone(),
        capacities: cfg.capacities.clone(),
    })?;
    if let Some(cg) = &cfg.cgroup {
        dataplane.attach_cgroup(cg)?;
    }
    let mut dp = dataplane.datapath()?;
    let mut current: MapImage = dp
        .read_image()
        .map_err(|e| anyhow::anyhow!("reading pinned maps: {e}"))?;
    let mut pipeline = Pipeline::new(NodeSettings {
        node_name: cfg.node_name.clone(),
        host_netns_cookie: crate::datapath::netns_cookie()?,
        flags: cfg.node.flags
            | if cfg.cgroup.is_some() {
                weir_common::config::CFG_F_SOCKET_LB
            } else {
                0
            },
        ..cfg.node.clone()
    });
    pipeline.ids.seed_from(&current);
    pipeline.policy.seed_from(&current.policy);
    info!(
        node = cfg.node_name,
        adopted_services = current.services.len(),
        adopted_backends = current.backends.len(),
        "agent started"
    );

    let mut source = DirSource::new(&cfg.source_dir);
    let mut cluster: Option<Cluster> = None;
    let mut dirty_since: Option<Instant> = None;
    let mut generation = 0u64;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(cfg.poll);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        attach_interfaces(&mut dataplane, &cfg);

        match source.poll() {
            Ok(Some((objs, errs))) => {
                for e in &errs {
                    warn!(reason = e.reason, "{}", e.message);
                }
                let (c, errs) = dir::to_cluster(&objs);
                for e in &errs {
                    warn!(reason = e.reason, "{}", e.message);
                }
                cluster = Some(c);
                generation = read_generation(source.root());
                dirty_since.get_or_insert_with(Instant::now);
            }
            Ok(None) => {}
            Err(e) => warn!("reading {}: {e}", cfg.source_dir.display()),
        }
        // Debounce: wait until the source has been quiet for `debounce`.
        let Some(since) = dirty_since else { continue };
        if since.elapsed() < cfg.debounce {
            continue;
        }
        let Some(c) = &cluster else { continue };
        dirty_since = None;
        let started = Instant::now();
        let (desired, errors) = pipeline.desired(c, generation);
        for e in &errors {
            error!(
                reason = e.error.to_string(),
                "{e}; keeping what was programmed for it"
            );
        }
        for e in pipeline.policy_errors() {
            error!(
                reason = e.metric_label(),
                "{e}; keeping the NetworkPolicy maps as they were"
            );
        }
        let plan = plan::diff(&current, &desired);
        let n = plan.len();
        let outcome = dp.apply(&plan);
        match outcome.error {
            None => {
                current = desired;
                info!(
                    ops = n,
                    generation,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "programmed"
                );
            }
            Some(e) => {
                error!(
                    reason = e.metric_label(),
                    "{e}; {} of {n} ops applied", outcome.applied
                );
                // What the maps hold now: the ops before the failure.
                plan::Plan {
                    ops: plan.ops[..outcome.applied].to_vec(),
                }
                .apply_to(&mut current);
                dirty_since = Some(Instant::now());
            }
        }
    }

    match cfg.on_exit {
        OnExit::Keep => info!(pin_dir = %cfg.pin_dir.display(), "exiting; datapath stays pinned"),
        OnExit::Remove => {
            dataplane.remove_pins().context("removing pins")?;
            info!(pin_dir = %cfg.pin_dir.display(), "exiting; pins removed");
        }
    }
    Ok(())
}

fn attach_interfaces(dataplane: &mut Dataplane, cfg: &AgentConfig) {
    let ifaces = netns::interfaces();
    for name in &ifaces {
        let pod = cfg.pod_ifaces.iter().any(|p| netns::glob_match(p, name));
        let uplink = cfg.uplinks.iter().any(|p| netns::glob_match(p, name));
        let hooks: &[Hook] = if pod {
            &[Hook::FromPod, Hook::ToPod]
        } else if uplink {
            &[Hook::UplinkIn]
        } else {
            &[]
        };
        for h in hooks {
            if let Err(e) = dataplane.attach(name, *h) {
                // The interface may have vanished between listing and attaching.
                debug!("attach {name}: {e:#}");
            }
        }
    }
    dataplane.prune_links();
}
