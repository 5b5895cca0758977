//! [`ImageKeys`]: a set of map keys, one set per map. The incremental pipeline reports
//! which keys a change touched, and the sync loop diffs only those keys
//! (`plan::diff(current.subset(k), desired.subset(k))`), so the work of a sync is
//! proportional to the change, not to the cluster.
//!
//! When a map is added to [`MapImage`], add its key set here too (and to `subset`,
//! `of`, `extend`, `len`); `plan::diff` then orders its ops as usual.

use std::collections::BTreeSet;

use weir_common::{
    Addr,
    lb::{AffinitySetKey, MaglevKey, ServiceKey, SourceRangeKey},
};

use crate::{
    image::{Lpm, MapImage},
    plan::{Op, Plan},
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageKeys {
    pub services: BTreeSet<ServiceKey>,
    pub backends: BTreeSet<u32>,
    pub rev_nat: BTreeSet<u32>,
    pub node_addrs: BTreeSet<Addr>,
    pub source_ranges: BTreeSet<Lpm<SourceRangeKey>>,
    pub maglev: BTreeSet<MaglevKey>,
    pub affinity_sets: BTreeSet<AffinitySetKey>,
    /// The single CONFIG entry.
    pub config: bool,
    /// The NetworkPolicy maps, as a whole: they are compiled (and diffed) per node, not
    /// per key (`policy::plan` orders their ops).
    pub policy: bool,
}

fn sub<K: Ord + Copy, V: Copy>(
    m: &std::collections::BTreeMap<K, V>,
    keys: &BTreeSet<K>,
) -> std::collections::BTreeMap<K, V> {
    // Walk the smaller side: the key set is usually tiny next to the map.
    keys.iter()
        .filter_map(|k| m.get(k).map(|v| (*k, *v)))
        .collect()
}

impl ImageKeys {
    /// Every key of `img`.
    pub fn of(img: &MapImage) -> ImageKeys {
        ImageKeys {
            services: img.services.keys().copied().collect(),
            backends: img.backends.keys().copied().collect(),
            rev_nat: img.rev_nat.keys().copied().collect(),
            node_addrs: img.node_addrs.keys().copied().collect(),
            source_ranges: img.source_ranges.keys().copied().collect(),
            maglev: img.maglev.keys().copied().collect(),
            affinity_sets: img.affinity_sets.keys().copied().collect(),
            config: img.config.is_some(),
            policy: !img.policy.is_empty(),
        }
    }

    /// The keys the ops of `plan` write.
    pub fn of_plan(plan: &Plan) -> ImageKeys {
        let mut k = ImageKeys::default();
        for op in &plan.ops {
            k.insert_op(op);
        }
        k
    }

    pub fn insert_op(&mut self, op: &Op) {
        match op {
            Op::PutConfig(_) => self.config = true,
            Op::PutNodeAddr(a, _) | Op::DelNodeAddr(a) => {
                self.node_addrs.insert(*a);
            }
            Op::PutBackend(id, _) | Op::DelBackend(id) => {
                self.backends.insert(*id);
            }
            Op::PutRevNat(id, _) | Op::DelRevNat(id) => {
                self.rev_nat.insert(*id);
            }
            Op::PutService(k, _) | Op::DelService(k) => {
                self.services.insert(*k);
            }
            Op::PutSourceRange(k, _) | Op::DelSourceRange(k) => {
                self.source_ranges.insert(*k);
            }
            Op::PutMaglev(k, _) | Op::DelMaglev(k) => {
                self.maglev.insert(*k);
            }
            Op::PutAffinitySet(k, _) | Op::DelAffinitySet(k) => {
                self.affinity_sets.insert(*k);
            }
            Op::Policy(_) => self.policy = true,
        }
    }

    pub fn extend(&mut self, other: &ImageKeys) {
        self.services.extend(other.services.iter().copied());
        self.backends.extend(other.backends.iter().copied());
        self.rev_nat.extend(other.rev_nat.iter().copied());
        self.node_addrs.extend(other.node_addrs.iter().copied());
        self.source_ranges
            .extend(other.source_ranges.iter().copied());
        self.maglev.extend(other.maglev.iter().copied());
        self.affinity_sets
            .extend(other.affinity_sets.iter().copied());
        self.config |= other.config;
        self.policy |= other.policy;
    }

    /// Adds every key of `img`.
    pub fn extend_from_image(&mut self, img: &MapImage) {
        self.services.extend(img.services.keys().copied());
        self.backends.extend(img.backends.keys().copied());
        self.rev_nat.extend(img.rev_nat.keys().copied());
        self.node_addrs.extend(img.node_addrs.keys().copied());
        self.source_ranges.extend(img.source_ranges.keys().copied());
        self.maglev.extend(img.maglev.keys().copied());
        self.affinity_sets.extend(img.affinity_sets.keys().copied());
        self.config |= img.config.is_some();
        self.policy |= !img.policy.is_empty();
    }

    /// Number of keys (CONFIG counts as one).
    pub fn len(&self) -> usize {
        self.services.len()
            + self.backends.len()
            + self.rev_nat.len()
            + self.node_addrs.len()
            + self.source_ranges.len()
            + self.maglev.len()
            + self.affinity_sets.len()
            + usize::from(self.config)
            + usize::from(self.policy)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MapImage {
    /// The entries of `self` whose keys are in `keys`.
    pub fn subset(&self, keys: &ImageKeys) -> MapImage {
        MapImage {
            services: sub(&self.services, &keys.services),
            backends: sub(&self.backends, &keys.backends),
            rev_nat: sub(&self.rev_nat, &keys.rev_nat),
            node_addrs: sub(&self.node_addrs, &keys.node_addrs),
            source_ranges: sub(&self.source_ranges, &keys.source_ranges),
            maglev: sub(&self.maglev, &keys.maglev),
            affinity_sets: sub(&self.affinity_sets, &keys.affinity_sets),
            config: if keys.config { self.config } else { None },
            policy: if keys.policy {
                self.policy.clone()
            } else {
                Default::default()
            },
        }
    }

    /// Whether the map `op` writes holds the key of `op`.
    pub fn has_key_of(&self, op: &Op) -> bool {
        match op {
            Op::PutConfig(_) => self.config.is_some(),
            Op::PutNodeAddr(a, _) | Op::DelNodeAddr(a) => self.node_addrs.contains_key(a),
            Op::PutBackend(id, _) | Op::DelBackend(id) => self.backends.contains_key(id),
            Op::PutRevNat(id, _) | Op::DelRevNat(id) => self.rev_nat.contains_key(id),
            Op::PutService(k, _) | Op::DelService(k) => self.services.contains_key(k),
            Op::PutSourceRange(k, _) | Op::DelSourceRange(k) => self.source_ranges.contains_key(k),
            Op::PutMaglev(k, _) | Op::DelMaglev(k) => self.maglev.contains_key(k),
            Op::PutAffinitySet(k, _) | Op::DelAffinitySet(k) => self.affinity_sets.contains_key(k),
            Op::Policy(p) => p.key_in(&self.policy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan;

    #[test]
    fn diff_of_subsets_is_the_diff_restricted_to_the_keys() {
        let mut old = MapImage::default();
        let mut new = MapImage::default();
        for id in 1..=10u32 {
            old.backends.insert(id, Default::default());
        }
        for id in 5..=15u32 {
            new.backends.insert(
                id,
                weir_common::lb::Backend {
                    port_be: id as u16,
                    ..Default::default()
                },
            );
        }
        let full = plan::diff(&old, &new);
        let keys = ImageKeys {
            backends: [2, 7, 12].into_iter().collect(),
            ..Default::default()
        };
        let part = plan::diff(&old.subset(&keys), &new.subset(&keys));
        let expected: Vec<Op> = full
            .ops
            .iter()
            .filter(|op| {
                keys.backends.contains(&match op {
                    Op::PutBackend(id, _) | Op::DelBackend(id) => *id,
                    _ => unreachable!(),
                })
            })
            .cloned()
            .collect();
        assert_eq!(part.ops, expected);
        assert_eq!(part.len(), 3);
        assert_eq!(ImageKeys::of_plan(&part), keys);
    }
}
