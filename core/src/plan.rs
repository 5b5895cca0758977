//! Diff two map images into an ordered [`Plan`] that never lets a packet see a
//! half-written Service ("make before break"):
//!
//! 1. backends and rev-NAT entries that are new or changed (nothing points at them yet);
//! 2. backend slots (a slot only becomes reachable once a master entry counts it);
//! 3. master entries, new or changed (counts grow only after their slots exist, and
//!    shrink before the slots beyond the new count go away);
//! 4. deletions: master entries of vanished frontends first, then their slots, then
//!    rev-NAT entries and backends nobody references any more.
//!
//! Source ranges and Maglev tables, which a packet reaches only through a master entry,
//! are written before the masters and removed after them.
//!
//! Node addresses and the node config are written first (a NodePort frontend is looked
//! up only through a node address) and removed last.
//!
//! The NetworkPolicy maps are independent of the Service maps; their ops come last, in
//! their own make-before-break order (`policy::plan`).

use weir_common::{
    Addr,
    config::{NodeAddrValue, NodeConfig},
    lb::{AffinitySetKey, Backend, MaglevKey, RevNat, ServiceKey, ServiceValue, SourceRangeKey},
};

use crate::{
    image::{Lpm, MapImage},
    policy::plan::PolicyOp,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutConfig(NodeConfig),
    PutNodeAddr(Addr, NodeAddrValue),
    PutBackend(u32, Backend),
    PutRevNat(u32, RevNat),
    PutService(ServiceKey, ServiceValue),
    PutSourceRange(Lpm<SourceRangeKey>, u32),
    PutMaglev(MaglevKey, u32),
    PutAffinitySet(AffinitySetKey, u32),
    DelService(ServiceKey),
    DelAffinitySet(AffinitySetKey),
    DelSourceRange(Lpm<SourceRangeKey>),
    DelMaglev(MaglevKey),
    DelRevNat(u32),
    DelBackend(u32),
    DelNodeAddr(Addr),
    /// A NetworkPolicy map op.
    Policy(PolicyOp),
}

impl Op {
    /// The map this op writes.
    pub fn map_name(&self) -> &'static str {
        use weir_common::maps::*;
        match self {
            Op::PutConfig(_) => CONFIG,
            Op::PutNodeAddr(..) | Op::DelNodeAddr(_) => NODE_ADDRS,
            Op::PutBackend(..) | Op::DelBackend(_) => BACKENDS,
            Op::PutRevNat(..) | Op::DelRevNat(_) => REV_NAT,
            Op::PutService(..) | Op::DelService(_) => SERVICES,
            Op::PutSourceRange(..) | Op::DelSourceRange(_) => SOURCE_RANGES,
            Op::PutMaglev(..) | Op::DelMaglev(_) => MAGLEV,
            Op::PutAffinitySet(..) | Op::DelAffinitySet(_) => AFFINITY_SETS,
            Op::Policy(p) => p.map_name(),
        }
    }

    pub fn is_put(&self) -> bool {
        if let Op::Policy(p) = self {
            return p.is_put();
        }
        matches!(
            self,
            Op::PutConfig(_)
                | Op::PutNodeAddr(..)
                | Op::PutBackend(..)
                | Op::PutRevNat(..)
                | Op::PutService(..)
                | Op::PutSourceRange(..)
                | Op::PutMaglev(..)
                | Op::PutAffinitySet(..)
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Applies the plan to an in-memory image (what a correct datapath ends up holding).
    pub fn apply_to(&self, img: &mut MapImage) {
        for op in &self.ops {
            match op {
                Op::PutConfig(c) => img.config = Some(*c),
                Op::PutNodeAddr(k, v) => {
                    img.node_addrs.insert(*k, *v);
                }
                Op::PutBackend(k, v) => {
                    img.backends.insert(*k, *v);
                }
                Op::PutRevNat(k, v) => {
                    img.rev_nat.insert(*k, *v);
                }
                Op::PutService(k, v) => {
                    img.services.insert(*k, *v);
                }
                Op::DelService(k) => {
                    img.services.remove(k);
                }
                Op::DelRevNat(k) => {
                    img.rev_nat.remove(k);
                }
                Op::DelBackend(k) => {
                    img.backends.remove(k);
                }
                Op::DelNodeAddr(k) => {
                    img.node_addrs.remove(k);
                }
                Op::PutSourceRange(k, v) => {
                    img.source_ranges.insert(*k, *v);
                }
                Op::DelSourceRange(k) => {
                    img.source_ranges.remove(k);
                }
                Op::PutMaglev(k, v) => {
                    img.maglev.insert(*k, *v);
                }
                Op::DelMaglev(k) => {
                    img.maglev.remove(k);
                }
                Op::PutAffinitySet(k, v) => {
                    img.affinity_sets.insert(*k, *v);
                }
                Op::DelAffinitySet(k) => {
                    img.affinity_sets.remove(k);
                }
                Op::Policy(p) => p.apply_to(&mut img.policy),
            }
        }
    }
}

fn puts<'a, K: Ord + Copy + 'a, V: PartialEq + Copy + 'a>(
    old: &'a std::collections::BTreeMap<K, V>,
    new: &'a std::collections::BTreeMap<K, V>,
) -> impl Iterator<Item = (K, V)> + 'a {
    new.iter()
        .filter(move |(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, *v))
}

fn dels<'a, K: Ord + Copy + 'a, V: 'a>(
    old: &'a std::collections::BTreeMap<K, V>,
    new: &'a std::collections::BTreeMap<K, V>,
) -> impl Iterator<Item = K> + 'a {
    old.keys().filter(move |k| !new.contains_key(k)).copied()
}

/// The ordered operations that turn `old` into `new`.
pub fn diff(old: &MapImage, new: &MapImage) -> Plan {
    let mut ops = Vec::new();
    if let Some(c) = new.config
        && old.config != Some(c)
    {
        ops.push(Op::PutConfig(c));
    }
    ops.extend(puts(&old.node_addrs, &new.node_addrs).map(|(k, v)| Op::PutNodeAddr(k, v)));
    ops.extend(puts(&old.backends, &new.backends).map(|(k, v)| Op::PutBackend(k, v)));
    ops.extend(puts(&old.rev_nat, &new.rev_nat).map(|(k, v)| Op::PutRevNat(k, v)));
    // Source ranges and Maglev tables are read only through a master entry's flags:
    // written before it, removed after it.
    ops.extend(puts(&old.source_ranges, &new.source_ranges).map(|(k, v)| Op::PutSourceRange(k, v)));
    ops.extend(puts(&old.maglev, &new.maglev).map(|(k, v)| Op::PutMaglev(k, v)));
    ops.extend(puts(&old.affinity_sets, &new.affinity_sets).map(|(k, v)| Op::PutAffinitySet(k, v)));
    let (masters_new, slots_new): (Vec<_>, Vec<_>) =
        puts(&old.services, &new.services).partition(|(k, _)| k.slot == 0);
    ops.extend(slots_new.into_iter().map(|(k, v)| Op::PutService(k, v)));
    ops.extend(masters_new.into_iter().map(|(k, v)| Op::PutService(k, v)));
    let (masters_gone, slots_gone): (Vec<_>, Vec<_>) =
        dels(&old.services, &new.services).partition(|k| k.slot == 0);
    ops.extend(masters_gone.into_iter().map(Op::DelService));
    ops.extend(slots_gone.into_iter().map(Op::DelService));
    ops.extend(dels(&old.maglev, &new.maglev).map(Op::DelMaglev));
    ops.extend(dels(&old.affinity_sets, &new.affinity_sets).map(Op::DelAffinitySet));
    ops.extend(dels(&old.source_ranges, &new.source_ranges).map(Op::DelSourceRange));
    ops.extend(dels(&old.rev_nat, &new.rev_nat).map(Op::DelRevNat));
    ops.extend(dels(&old.backends, &new.backends).map(Op::DelBackend));
    ops.extend(dels(&old.node_addrs, &new.node_addrs).map(Op::DelNodeAddr));
    ops.extend(
        crate::policy::plan::diff(&old.policy, &new.policy)
            .into_iter()
            .map(Op::Policy),
    );
    Plan { ops }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::MapImage;
    use weir_common::Addr;

    fn key(slot: u16) -> ServiceKey {
        ServiceKey {
            addr: Addr::from_ip("10.96.0.10".parse().unwrap()),
            port_be: 80u16.to_be(),
            proto: 6,
            scope: 0,
            slot,
            pad: [0; 2],
        }
    }

    fn image(backends: &[u32]) -> MapImage {
        let mut img = MapImage::default();
        for (i, id) in backends.iter().enumerate() {
            img.backends.insert(
                *id,
                Backend {
                    port_be: 8080u16.to_be(),
                    ..Default::default()
                },
            );
            img.services.insert(
                key(i as u16 + 1),
                ServiceValue {
                    backend_id: *id,
                    ..Default::default()
                },
            );
            img.affinity_sets.insert(
                AffinitySetKey {
                    svc_port_id: 1,
                    backend_id: *id,
                    scope: 0,
                    pad: [0; 3],
                },
                1,
            );
            img.maglev.insert(
                MaglevKey {
                    rev_nat_id: 1,
                    scope: 0,
                    pad: [0; 3],
                    index: i as u32,
                },
                *id,
            );
        }
        img.services.insert(
            key(0),
            ServiceValue {
                count: backends.len() as u16,
                rev_nat_id: 1,
                ..Default::default()
            },
        );
        img.rev_nat.insert(1, RevNat::default());
        img
    }

    /// Applying the plan yields the new image, whatever the maps.
    #[test]
    fn applying_a_diff_yields_the_new_image() {
        for (a, b) in [
            (vec![], vec![1, 2]),
            (vec![1, 2, 3], vec![2]),
            (vec![1], vec![4, 5, 6]),
            (vec![1, 2], vec![]),
        ] {
            let (old, new) = (image(&a), image(&b));
            let mut got = old.clone();
            diff(&old, &new).apply_to(&mut got);
            assert_eq!(got, new, "{a:?} -> {b:?}");
        }
    }

    /// Make before break: after every prefix of the plan, every slot a master entry counts
    /// names an existing backend, so no packet can pick a missing backend.
    #[test]
    fn no_prefix_of_a_plan_lets_a_counted_slot_miss_its_backend() {
        for (a, b) in [
            (vec![1, 2, 3], vec![4]),
            (vec![1], vec![2, 3, 4]),
            (vec![1, 2], vec![3, 1]),
        ] {
            let (old, new) = (image(&a), image(&b));
            let plan = diff(&old, &new);
            let mut img = old.clone();
            for op in &plan.ops {
                Plan {
                    ops: vec![op.clone()],
                }
                .apply_to(&mut img);
                if let Some(m) = img.services.get(&key(0)) {
                    for slot in 1..=m.count {
                        let s = img
                            .services
                            .get(&key(slot))
                            .unwrap_or_else(|| panic!("slot {slot} missing after {op:?}"));
                        assert!(
                            img.backends.contains_key(&s.backend_id),
                            "backend {} missing after {op:?}",
                            s.backend_id
                        );
                    }
                }
            }
        }
    }
}
