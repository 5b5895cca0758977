//! A model of the datapath's policy lookups, step for step as `weir_common::policy`
//! documents them (steps 2-6), over anything that answers the three map lookups: an
//! in-memory [`PolicyImage`] (property tests) or the kernel's maps (the agent's map
//! tests implement [`PolicyMaps`] over real LPM tries, which checks the key layout and
//! byte order against the kernel's own longest-prefix match). The eBPF side must make
//! the same decisions.

use weir_common::{Addr, metrics::REASON_POLICY_DENIED, policy::*};

use super::{
    eval::{Decision, Direction},
    image::{PolicyImage, lpm_get},
};

/// The three lookups, as the datapath does them (LPM lookups with full-length keys).
pub trait PolicyMaps {
    fn endpoint(&self, a: &Addr) -> Option<EndpointValue>;
    fn ipcache(&self, a: &Addr) -> Option<IpcacheValue>;
    fn policy(&self, k: &PolicyKey) -> Option<PolicyValue>;
}

impl<T: PolicyMaps + ?Sized> PolicyMaps for &T {
    fn endpoint(&self, a: &Addr) -> Option<EndpointValue> {
        (**self).endpoint(a)
    }
    fn ipcache(&self, a: &Addr) -> Option<IpcacheValue> {
        (**self).ipcache(a)
    }
    fn policy(&self, k: &PolicyKey) -> Option<PolicyValue> {
        (**self).policy(k)
    }
}

impl PolicyMaps for PolicyImage {
    fn endpoint(&self, a: &Addr) -> Option<EndpointValue> {
        self.endpoints.get(a).copied()
    }
    fn ipcache(&self, a: &Addr) -> Option<IpcacheValue> {
        lpm_get(&self.ipcache, a, 128).map(|x| x.1)
    }
    fn policy(&self, k: &PolicyKey) -> Option<PolicyValue> {
        lpm_get(&self.policy, k, POLICY_PLEN_FULL).map(|x| x.1)
    }
}

/// What the lookups decided for one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No endpoint entry for the local address: not a pod of this node.
    NoEndpoint,
    NotIsolated,
    SamePod,
    LocalNode,
    Allowed {
        rule_id: u32,
    },
    Denied {
        reason: u8,
        rule_id: u32,
    },
}

impl Outcome {
    pub fn allows(self) -> bool {
        !matches!(self, Outcome::Denied { .. })
    }
}

impl Outcome {
    /// Whether this outcome of the node that holds the local pod is the evaluator's
    /// `decision` (same verdict, same reason; rule ids are the maps' own business).
    pub fn agrees_with(self, decision: Decision) -> bool {
        use weir_common::metrics::REASON_POLICY_ISOLATED;
        match (self, decision) {
            (Outcome::NotIsolated, Decision::NotIsolated)
            | (Outcome::SamePod, Decision::SamePod)
            | (Outcome::LocalNode, Decision::LocalNode)
            | (Outcome::Allowed { .. }, Decision::Allowed) => true,
            (Outcome::Denied { reason, .. }, Decision::Denied { no_rules }) => {
                reason
                    == if no_rules {
                        REASON_POLICY_ISOLATED
                    } else {
                        REASON_POLICY_DENIED
                    }
            }
            _ => false,
        }
    }
}

/// Steps 2-6 for a new connection `src -> dst` (after Service translation) on
/// `proto`/`dport`, for `dir`'s policy (egress: the source's; ingress: the destination's).
pub fn decide(
    maps: &impl PolicyMaps,
    dir: Direction,
    src: Addr,
    dst: Addr,
    proto: u8,
    dport: u16,
) -> Outcome {
    let (local, remote) = match dir {
        Direction::Egress => (src, dst),
        Direction::Ingress => (dst, src),
    };
    // 2.
    let Some(ep) = maps.endpoint(&local) else {
        return Outcome::NoEndpoint;
    };
    let (isolated, key) = match dir {
        Direction::Egress => (ep.flags & EP_F_EGRESS_ISOLATED != 0, ep.egress_key),
        Direction::Ingress => (ep.flags & EP_F_INGRESS_ISOLATED != 0, ep.ingress_key),
    };
    if !isolated {
        return Outcome::NotIsolated;
    }
    // 3.
    if src == dst {
        return Outcome::SamePod;
    }
    // 4.
    let ic = maps.ipcache(&remote).unwrap_or(IpcacheValue {
        identity: ID_UNKNOWN,
        flags: 0,
    });
    if dir == Direction::Ingress && ic.flags & IC_F_LOCAL_NODE != 0 {
        return Outcome::LocalNode;
    }
    let mut k = PolicyKey {
        policy_key: key,
        identity: ic.identity,
        direction: dir.abi(),
        proto,
        port_be: dport.to_be(),
    };
    // 5.
    if let Some(v) = maps.policy(&k)
        && v.verdict == VERDICT_ALLOW
    {
        return Outcome::Allowed { rule_id: v.rule_id };
    }
    // 6.
    k.identity = ID_ANY;
    match maps.policy(&k) {
        Some(v) if v.verdict == VERDICT_ALLOW => Outcome::Allowed { rule_id: v.rule_id },
        Some(v) => Outcome::Denied {
            reason: v.reason,
            rule_id: v.rule_id,
        },
        None => Outcome::Denied {
            reason: REASON_POLICY_DENIED,
            rule_id: 0,
        },
    }
}
