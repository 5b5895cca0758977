//! NetworkPolicy lookups: steps 2-7 of the sequence `weir_common::policy` documents,
//! exactly as `weir_core::policy::lookup::decide` models them (the property and kernel
//! map tests check that model against the evaluator; `tests/datapath_policy.rs` checks
//! this code against both). Conntrack (step 1) lives in `flow`, which calls [`decide`]
//! only for packets that are not part of a connection already admitted.
//!
//! Everything is built in the per-CPU [`Work`] slot: the LPM keys (16 and 20 bytes) and
//! the decision record (`w.event`, 88 bytes) would not fit a frame of their own.

use aya_ebpf::maps::lpm_trie::Key;
use weir_common::{
    metrics::{DIR_EGRESS, DIR_INGRESS, REASON_POLICY_DENIED, REASON_POLICY_ISOLATED},
    policy::*,
};

use crate::maps::{ENDPOINTS, FRAGS, IPCACHE, POLICY, POLICY_COUNTERS, Work};

/// Both isolation flags.
pub const EP_F_ISOLATED: u32 = EP_F_INGRESS_ISOLATED | EP_F_EGRESS_ISOLATED;

/// Step 2's lookup: `ENDPOINTS[local]` (the source if `egress`, else the destination)
/// into `w.ep`; returns (and keeps in `w.iso`) its isolation flags, 0 when the address
/// is no pod of this node or the pod is isolated in neither direction. This one hash
/// lookup is all a packet of such a pod pays.
#[inline(always)]
pub fn endpoint(w: &mut Work, egress: bool) -> u32 {
    let local = if egress { &w.pkt.src } else { &w.pkt.dst };
    w.iso = match unsafe { ENDPOINTS.get(local) } {
        Some(ep) => {
            w.ep = *ep;
            ep.flags & EP_F_ISOLATED
        }
        None => 0,
    };
    w.iso
}

/// The isolation flag of a direction.
#[inline(always)]
pub fn isolated_flag(dir: u8) -> u32 {
    if dir == DIR_EGRESS {
        EP_F_EGRESS_ISOLATED
    } else {
        EP_F_INGRESS_ISOLATED
    }
}

#[inline(always)]
fn count_rule(rule_id: u32, bytes: u32) {
    // Rule ids start at 1; 0 is "no entry" (a miss of the catch-all) and counts nowhere.
    if rule_id == 0 {
        return;
    }
    if let Some(c) = POLICY_COUNTERS.get_ptr_mut(rule_id) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// Steps 2-7 for the connection in `w.event` (src, dst, sport, dport, proto, as the
/// caller filled them: after Service translation) under `dir`'s policy of the local pod
/// in `w.ep`/`w.iso`. Returns 0 when allowed, else the drop reason
/// (`REASON_POLICY_DENIED` / `REASON_POLICY_ISOLATED`), with the decision recorded in
/// `w.event`. Counts the deciding entry's rule in `POLICY_COUNTERS`.
#[inline(never)]
pub fn decide(w: &mut Work, dir: u8) -> u8 {
    // 2. Isolated for this direction at all?
    if w.iso & isolated_flag(dir) == 0 {
        return 0;
    }
    // 3. A pod talking to itself (through its own Service).
    if w.event.src == w.event.dst {
        return 0;
    }
    let (key, remote) = if dir == DIR_EGRESS {
        (w.ep.egress_key, w.event.dst)
    } else {
        (w.ep.ingress_key, w.event.src)
    };
    // 4. The remote's identity (a miss only while the map is not programmed yet).
    w.ic_key = Key::new(128, remote);
    let (identity, ic_flags) = match IPCACHE.get(&w.ic_key) {
        Some(v) => (v.identity, v.flags),
        None => (ID_UNKNOWN, 0),
    };
    // The pod's own node may always connect to it (API reference, NetworkPolicySpec
    // .ingress); egress to the node is policy like any address.
    if dir == DIR_INGRESS && ic_flags & IC_F_LOCAL_NODE != 0 {
        return 0;
    }
    let proto = w.event.proto;
    let port_be = w.event.dport_be;
    w.pol_key = Key::new(
        POLICY_PLEN_FULL,
        PolicyKey {
            policy_key: key,
            identity,
            direction: dir,
            proto,
            port_be,
        },
    );
    let len = w.pkt.len;
    // 5. An entry for this identity is always an allow.
    if let Some(v) = POLICY.get(&w.pol_key)
        && v.verdict == VERDICT_ALLOW
    {
        count_rule(v.rule_id, len);
        return 0;
    }
    // 6. Rules without peers and the key's catch-all.
    w.pol_key = Key::new(
        POLICY_PLEN_FULL,
        PolicyKey {
            policy_key: key,
            identity: ID_ANY,
            direction: dir,
            proto,
            port_be,
        },
    );
    let (reason, rule_id) = match POLICY.get(&w.pol_key) {
        Some(v) if v.verdict == VERDICT_ALLOW => {
            count_rule(v.rule_id, len);
            return 0;
        }
        Some(v) => (
            if v.reason == REASON_POLICY_ISOLATED {
                REASON_POLICY_ISOLATED
            } else {
                REASON_POLICY_DENIED
            },
            v.rule_id,
        ),
        // Fail closed: an isolated key always has its catch-all.
        None => (REASON_POLICY_DENIED, 0),
    };
    // 7. Count and record the drop.
    count_rule(rule_id, len);
    w.event.kind = EVENT_POLICY_DROP;
    w.event.direction = dir;
    w.event.reason = reason;
    w.event.policy_key = key;
    w.event.remote_identity = identity;
    w.event.rule_id = rule_id;
    reason
}

/// Fills the connection `decide` looks at: the packet's own tuple (no translation).
#[inline(always)]
pub fn set_tuple(w: &mut Work) {
    w.event.src = w.pkt.src;
    w.event.dst = w.pkt.dst;
    w.event.sport_be = w.pkt.sport_be;
    w.event.dport_be = w.pkt.dport_be;
    w.event.proto = w.pkt.proto;
    w.event.orig_dst = w.pkt.dst;
    w.event.orig_dport_be = w.pkt.dport_be;
}

/// A fragment's key, from the packet as it arrived (before any translation).
#[inline(always)]
pub fn set_frag_key(w: &mut Work, dir: u8) {
    w.fkey = FragKey {
        src: w.pkt.src,
        dst: w.pkt.dst,
        id: w.pkt.frag_id,
        proto: w.pkt.proto,
        direction: dir,
        pad: [0; 2],
    };
    w.fval = FragValue {
        sport_be: w.pkt.sport_be,
        dport_be: w.pkt.dport_be,
        verdict: FRAG_ALLOWED,
        reason: 0,
        pad: [0; 2],
    };
}

/// Records what the first fragment of a datagram got (`reason` 0: allowed).
#[inline(always)]
pub fn record_first_fragment(w: &mut Work, reason: u8) {
    if reason != 0 {
        w.fval.verdict = FRAG_DROPPED;
        w.fval.reason = reason;
    }
    let _ = FRAGS.insert(&w.fkey, &w.fval, 0);
}

/// A later fragment (no transport header) of a datagram from or to an isolated pod: the
/// verdict its first fragment got, and its ports (for the drop record). `None` when the
/// first fragment was not seen (lost, or reordered behind this one): the caller drops it,
/// since no policy decision exists for it.
#[inline(always)]
pub fn later_fragment(w: &mut Work) -> Option<u8> {
    let v = unsafe { FRAGS.get(&w.fkey) }?;
    w.pkt.sport_be = v.sport_be;
    w.pkt.dport_be = v.dport_be;
    Some(if v.verdict == FRAG_DROPPED {
        v.reason
    } else {
        0
    })
}

/// Clears the decision record for a new packet.
#[inline(always)]
pub fn reset(w: &mut Work) {
    w.event.kind = 0;
    w.event.rule_id = 0;
}
