//! The one seam every map write goes through.
//!
//! [`Datapath`] is implemented by the agent over the real BPF maps (aya) and here by
//! [`FakeDatapath`] (an in-memory image) and [`FaultyDatapath`] (fails on a chosen op),
//! so that the sync loop can be tested without privileges. The fake is kept honest by
//! end-to-end tests that drive the real datapath with the same plans.

use std::collections::BTreeMap;

use crate::{
    image::MapImage,
    plan::{Op, Plan},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("map {map} is full ({capacity} entries) while applying {op:?}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        op: Box<Op>,
    },
    #[error("writing map {map} failed for {op:?}: {reason}")]
    Write {
        map: &'static str,
        op: Box<Op>,
        reason: String,
    },
}

impl ApplyError {
    /// A short stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ApplyError::MapFull { .. } => "map_full",
            ApplyError::Write { .. } => "map_write",
        }
    }
}

/// Result of applying a plan: how many ops were applied before an error, if any.
/// A failed plan leaves the ops before the failing one applied (each is a consistent
/// state by the plan's ordering) and nothing after it.
#[derive(Debug)]
pub struct ApplyOutcome {
    pub applied: usize,
    pub error: Option<ApplyError>,
}

pub trait Datapath {
    /// Applies the ops in order, stopping at the first failure.
    fn apply(&mut self, plan: &Plan) -> ApplyOutcome;
    /// Reads back what the maps hold (used to adopt pinned maps after a restart).
    fn read_image(&self) -> Result<MapImage, String>;
    /// Capacity (max entries) of each map, by name.
    fn capacities(&self) -> BTreeMap<&'static str, u32>;
}

/// An in-memory datapath: applies plans to a [`MapImage`], enforcing capacities.
#[derive(Debug, Default, Clone)]
pub struct FakeDatapath {
    pub image: MapImage,
    pub capacities: BTreeMap<&'static str, u32>,
    /// Every op ever applied, in order (tests inspect ordering).
    pub log: Vec<Op>,
}

impl FakeDatapath {
    pub fn with_capacities(caps: &[(&'static str, u32)]) -> Self {
        Self {
            capacities: caps.iter().copied().collect(),
            ..Default::default()
        }
    }

    fn check_capacity(&self, op: &Op) -> Result<(), ApplyError> {
        let map = op.map_name();
        let Some(&cap) = self.capacities.get(map) else {
            return Ok(());
        };
        let (exists, len) = match op {
            Op::PutService(k, _) => (
                self.image.services.contains_key(k),
                self.image.services.len(),
            ),
            Op::PutBackend(k, _) => (
                self.image.backends.contains_key(k),
                self.image.backends.len(),
            ),
            Op::PutRevNat(k, _) => (self.image.rev_nat.contains_key(k), self.image.rev_nat.len()),
            Op::PutNodeAddr(k, _) => (
                self.image.node_addrs.contains_key(k),
                self.image.node_addrs.len(),
            ),
            Op::Policy(p) => match p.occupancy(&self.image.policy) {
                Some(x) => x,
                None => return Ok(()),
            },
            _ => return Ok(()),
        };
        if !exists && len >= cap as usize {
            return Err(ApplyError::MapFull {
                map,
                capacity: cap,
                op: Box::new(op.clone()),
            });
        }
        Ok(())
    }
}

impl Datapath for FakeDatapath {
    fn apply(&mut self, plan: &Plan) -> ApplyOutcome {
        for (i, op) in plan.ops.iter().enumerate() {
            if let Err(e) = self.check_capacity(op) {
                return ApplyOutcome {
                    applied: i,
                    error: Some(e),
                };
            }
            Plan {
                ops: vec![op.clone()],
            }
            .apply_to(&mut self.image);
            self.log.push(op.clone());
        }
        ApplyOutcome {
            applied: plan.ops.len(),
            error: None,
        }
    }

    fn read_image(&self) -> Result<MapImage, String> {
        Ok(self.image.clone())
    }

    fn capacities(&self) -> BTreeMap<&'static str, u32> {
        self.capacities.clone()
    }
}

/// Wraps a datapath and fails the `fail_at`-th op it is asked to apply (counting from 0
/// over the datapath's lifetime), to test that failures leave consistent state.
#[derive(Debug, Default)]
pub struct FaultyDatapath<D> {
    pub inner: D,
    pub fail_at: Option<usize>,
    seen: usize,
}

impl<D: Datapath> FaultyDatapath<D> {
    pub fn new(inner: D, fail_at: usize) -> Self {
        Self {
            inner,
            fail_at: Some(fail_at),
            seen: 0,
        }
    }
}

impl<D: Datapath> Datapath for FaultyDatapath<D> {
    fn apply(&mut self, plan: &Plan) -> ApplyOutcome {
        for (i, op) in plan.ops.iter().enumerate() {
            if self.fail_at == Some(self.seen) {
                self.seen += 1;
                return ApplyOutcome {
                    applied: i,
                    error: Some(ApplyError::Write {
                        map: op.map_name(),
                        op: Box::new(op.clone()),
                        reason: "injected fault".into(),
                    }),
                };
            }
            self.seen += 1;
            let out = self.inner.apply(&Plan {
                ops: vec![op.clone()],
            });
            if let Some(e) = out.error {
                return ApplyOutcome {
                    applied: i,
                    error: Some(e),
                };
            }
        }
        ApplyOutcome {
            applied: plan.ops.len(),
            error: None,
        }
    }

    fn read_image(&self) -> Result<MapImage, String> {
        self.inner.read_image()
    }

    fn capacities(&self) -> BTreeMap<&'static str, u32> {
        self.inner.capacities()
    }
}
