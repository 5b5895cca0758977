//! Map operations for the policy maps, and their make-before-break order.
//!
//! A packet reads `ENDPOINTS` (which key), `IPCACHE` (which identity), then `POLICY` for
//! that key and identity. So:
//! 1. rule metadata, then every new or changed `POLICY` entry: a new policy key's or a
//!    new identity's entries are complete before anything points at them;
//! 2. `IPCACHE` (addresses move to their new identity), then `ENDPOINTS` (pods switch to
//!    their new keys; a changed policy is a new key, so a pod flips from the complete old
//!    rules to the complete new ones in one write);
//! 3. removals in the reverse order: endpoints and addresses that are gone, then `POLICY`
//!    entries nothing points at any more, then rule metadata.
//!
//! An identity whose signature changed but whose members stayed keeps its number (see
//! `compile`); its entries are updated in place, so between steps 1 and 3 its members
//! get the union of the old and the new allows for that identity.

use weir_common::{
    Addr,
    policy::{EndpointValue, IpcacheValue, PolicyKey, PolicyValue, RuleInfo},
};

use super::image::PolicyImage;
use crate::image::Lpm;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyOp {
    PutRule(u32, Box<RuleInfo>),
    PutPolicy(Lpm<PolicyKey>, PolicyValue),
    PutIpcache(Lpm<Addr>, IpcacheValue),
    PutEndpoint(Addr, EndpointValue),
    DelEndpoint(Addr),
    DelIpcache(Lpm<Addr>),
    DelPolicy(Lpm<PolicyKey>),
    DelRule(u32),
}

impl PolicyOp {
    pub fn map_name(&self) -> &'static str {
        use weir_common::maps::*;
        match self {
            PolicyOp::PutRule(..) | PolicyOp::DelRule(_) => POLICY_RULES,
            PolicyOp::PutPolicy(..) | PolicyOp::DelPolicy(_) => POLICY,
            PolicyOp::PutIpcache(..) | PolicyOp::DelIpcache(_) => IPCACHE,
            PolicyOp::PutEndpoint(..) | PolicyOp::DelEndpoint(_) => ENDPOINTS,
        }
    }

    pub fn is_put(&self) -> bool {
        matches!(
            self,
            PolicyOp::PutRule(..)
                | PolicyOp::PutPolicy(..)
                | PolicyOp::PutIpcache(..)
                | PolicyOp::PutEndpoint(..)
        )
    }

    /// Whether the map this op writes already holds its key in `img`.
    pub fn key_in(&self, img: &PolicyImage) -> bool {
        match self {
            PolicyOp::PutRule(k, _) | PolicyOp::DelRule(k) => img.rules.contains_key(k),
            PolicyOp::PutPolicy(k, _) | PolicyOp::DelPolicy(k) => img.policy.contains_key(k),
            PolicyOp::PutIpcache(k, _) | PolicyOp::DelIpcache(k) => img.ipcache.contains_key(k),
            PolicyOp::PutEndpoint(k, _) | PolicyOp::DelEndpoint(k) => img.endpoints.contains_key(k),
        }
    }

    /// Applies the op to an in-memory image.
    pub fn apply_to(&self, img: &mut PolicyImage) {
        match self {
            PolicyOp::PutRule(k, v) => {
                img.rules.insert(*k, **v);
            }
            PolicyOp::PutPolicy(k, v) => {
                img.policy.insert(*k, *v);
            }
            PolicyOp::PutIpcache(k, v) => {
                img.ipcache.insert(*k, *v);
            }
            PolicyOp::PutEndpoint(k, v) => {
                img.endpoints.insert(*k, *v);
            }
            PolicyOp::DelEndpoint(k) => {
                img.endpoints.remove(k);
            }
            PolicyOp::DelIpcache(k) => {
                img.ipcache.remove(k);
            }
            PolicyOp::DelPolicy(k) => {
                img.policy.remove(k);
            }
            PolicyOp::DelRule(k) => {
                img.rules.remove(k);
            }
        }
    }

    /// For a put: whether its key exists in `img`, and the size of its map there (for
    /// capacity checks by fakes).
    pub fn occupancy(&self, img: &PolicyImage) -> Option<(bool, usize)> {
        Some(match self {
            PolicyOp::PutRule(k, _) => (img.rules.contains_key(k), img.rules.len()),
            PolicyOp::PutPolicy(k, _) => (img.policy.contains_key(k), img.policy.len()),
            PolicyOp::PutIpcache(k, _) => (img.ipcache.contains_key(k), img.ipcache.len()),
            PolicyOp::PutEndpoint(k, _) => (img.endpoints.contains_key(k), img.endpoints.len()),
            _ => return None,
        })
    }
}

fn puts<'a, K: Ord + Copy + 'a, V: PartialEq + Clone + 'a>(
    old: &'a std::collections::BTreeMap<K, V>,
    new: &'a std::collections::BTreeMap<K, V>,
) -> impl Iterator<Item = (K, V)> + 'a {
    new.iter()
        .filter(move |(k, v)| old.get(k) != Some(v))
        .map(|(k, v)| (*k, v.clone()))
}

fn dels<'a, K: Ord + Copy + 'a, V: 'a>(
    old: &'a std::collections::BTreeMap<K, V>,
    new: &'a std::collections::BTreeMap<K, V>,
) -> impl Iterator<Item = K> + 'a {
    old.keys().filter(move |k| !new.contains_key(k)).copied()
}

/// The ordered operations that turn `old` into `new` (module doc).
pub fn diff(old: &PolicyImage, new: &PolicyImage) -> Vec<PolicyOp> {
    let mut ops = Vec::new();
    ops.extend(puts(&old.rules, &new.rules).map(|(k, v)| PolicyOp::PutRule(k, Box::new(v))));
    ops.extend(puts(&old.policy, &new.policy).map(|(k, v)| PolicyOp::PutPolicy(k, v)));
    ops.extend(puts(&old.ipcache, &new.ipcache).map(|(k, v)| PolicyOp::PutIpcache(k, v)));
    ops.extend(puts(&old.endpoints, &new.endpoints).map(|(k, v)| PolicyOp::PutEndpoint(k, v)));
    ops.extend(dels(&old.endpoints, &new.endpoints).map(PolicyOp::DelEndpoint));
    ops.extend(dels(&old.ipcache, &new.ipcache).map(PolicyOp::DelIpcache));
    ops.extend(dels(&old.policy, &new.policy).map(PolicyOp::DelPolicy));
    ops.extend(dels(&old.rules, &new.rules).map(PolicyOp::DelRule));
    ops
}
