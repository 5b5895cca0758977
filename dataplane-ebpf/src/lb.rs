//! Frontend lookup and backend selection (see `weir_common::lb` for the map layout).
//! Keys are built in the per-CPU [`Work`] slot, not on the stack.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use weir_common::{Addr, config::NodeConfig, lb::*};

use crate::{
    maps::{AFFINITY, AFFINITY_SETS, BACKENDS, MAGLEV, NODE_ADDRS, SERVICES, SOURCE_RANGES, Work},
    parse::Pkt,
};

#[inline(always)]
fn set_master(key: &mut ServiceKey, addr: Addr, port_be: u16, proto: u8) {
    key.addr = addr;
    key.port_be = port_be;
    key.proto = proto;
    key.scope = SCOPE_CLUSTER;
    key.slot = 0;
    key.pad = [0; 2];
}

/// Looks up the frontend this packet is addressed to into `w.fe` / `w.svc`: an exact
/// {address, port, protocol} match, else, if the destination is one of this node's
/// addresses, a NodePort on the family wildcard.
#[inline(always)]
pub fn lookup_frontend(w: &mut Work) -> bool {
    set_master(&mut w.fe, w.pkt.dst, w.pkt.dport_be, w.pkt.proto);
    if let Some(v) = unsafe { SERVICES.get(&w.fe) } {
        w.svc = *v;
        return true;
    }
    if unsafe { NODE_ADDRS.get(&w.pkt.dst) }.is_some() {
        w.fe.addr = if w.pkt.v6 { Addr::V6_ANY } else { Addr::V4_ANY };
        if let Some(v) = unsafe { SERVICES.get(&w.fe) } {
            w.svc = *v;
            return true;
        }
    }
    false
}

/// Whether the destination address is a ClusterIP at all (the port-0 marker entry):
/// a packet to a port the Service does not have is then rejected.
#[inline(always)]
pub fn is_cluster_ip(w: &mut Work) -> bool {
    set_master(&mut w.fe, w.pkt.dst, 0, 0);
    unsafe { SERVICES.get(&w.fe) }.is_some()
}

/// The backend set to use for this packet: (scope, number of slots).
#[inline(always)]
pub fn backend_set(svc: &ServiceValue, source_is_pod: bool) -> (u8, u16) {
    // Upstream: a Local policy uses the node-local endpoints, except that traffic from
    // pods (the local detector) to an external address of an eTP=Local Service is
    // short-circuited to the cluster-wide set ("pod traffic for ... external
    // destinations", pkg/proxy/nftables/proxier.go).
    let local = svc.flags & SVC_F_LOCAL != 0 && !(svc.flags & SVC_F_EXTERNAL != 0 && source_is_pod);
    if local {
        (SCOPE_LOCAL, svc.local_count)
    } else {
        (SCOPE_CLUSTER, svc.count)
    }
}

/// loadBalancerSourceRanges: whether the packet's source lies in one of the frontend's
/// ranges.
#[inline(always)]
pub fn source_allowed(w: &mut Work) -> bool {
    w.range_key.prefix_len = 32 + 128;
    w.range_key.data = SourceRangeKey {
        rev_nat_id: w.svc.rev_nat_id,
        addr: w.pkt.src,
    };
    SOURCE_RANGES.get(&w.range_key).is_some()
}

/// A hash of the 5-tuple (used by Maglev and SNAT port choice). The same on every node,
/// so Maglev picks the same backend for a flow wherever it lands.
#[inline(always)]
pub fn hash_tuple(pkt: &Pkt) -> u32 {
    #[inline(always)]
    fn mix(h: u32, v: u32) -> u32 {
        let h = (h ^ v).wrapping_mul(0x9e37_79b1);
        h ^ (h >> 15)
    }
    let mut h = 0x811c_9dc5u32;
    h = mix(h, pkt.src.w[0]);
    h = mix(h, pkt.src.w[1]);
    h = mix(h, pkt.src.w[2]);
    h = mix(h, pkt.src.w[3]);
    h = mix(h, pkt.dst.w[0]);
    h = mix(h, pkt.dst.w[1]);
    h = mix(h, pkt.dst.w[2]);
    h = mix(h, pkt.dst.w[3]);
    h = mix(h, (pkt.sport_be as u32) << 16 | pkt.dport_be as u32);
    mix(h, pkt.proto as u32)
}

#[inline(always)]
fn slot_backend(w: &mut Work, scope: u8, slot: u16) -> Option<u32> {
    w.slot = w.fe;
    w.slot.scope = scope;
    w.slot.slot = slot;
    unsafe { SERVICES.get(&w.slot) }.map(|v| v.backend_id)
}

/// Picks the backend for a new connection among `count` slots of `scope` into `w.be_id`
/// and `w.be`: the client's affinity record if it is fresh and its backend is still in
/// this set; else Maglev (if the frontend uses it) or a uniformly random slot.
#[inline(always)]
pub fn select(w: &mut Work, scope: u8, count: u16, cfg: *const NodeConfig, now: u64) -> bool {
    let affinity = w.svc.flags & SVC_F_AFFINITY != 0;
    if affinity {
        w.akey = AffinityKey {
            client: w.pkt.src,
            svc_port_id: w.svc.svc_port_id,
            pad: 0,
        };
        if let Some(a) = AFFINITY.get_ptr_mut(&w.akey) {
            let (id, last) = unsafe { ((*a).backend_id, (*a).last_used_ns) };
            let fresh = now.saturating_sub(last) <= w.svc.affinity_timeout_s as u64 * 1_000_000_000;
            w.aset = AffinitySetKey {
                svc_port_id: w.svc.svc_port_id,
                backend_id: id,
                scope,
                pad: [0; 3],
            };
            // A backend that left the set is a miss (the client is re-balanced), never a
            // drop.
            let in_set = unsafe { AFFINITY_SETS.get(&w.aset) }.is_some();
            if fresh
                && in_set
                && let Some(be) = backend(id)
            {
                // kube-proxy refreshes the affinity timer on every new connection.
                unsafe { (*a).last_used_ns = now };
                w.be_id = id;
                w.be = be;
                return true;
            }
        }
    }

    let id = if w.svc.flags & SVC_F_MAGLEV != 0 {
        let size = unsafe { (*cfg).maglev_table_size };
        w.mkey = MaglevKey {
            rev_nat_id: w.svc.rev_nat_id,
            scope,
            pad: [0; 3],
            // checked_rem: the verifier rejects a division it cannot prove non-zero.
            index: hash_tuple(&w.pkt).checked_rem(size).unwrap_or(0),
        };
        let Some(id) = (unsafe { MAGLEV.get(&w.mkey) }) else {
            return false;
        };
        *id
    } else {
        let r = unsafe { bpf_get_prandom_u32() };
        let slot = r.checked_rem(count as u32).unwrap_or(0) as u16 + 1;
        let Some(id) = slot_backend(w, scope, slot) else {
            return false;
        };
        id
    };
    let Some(be) = backend(id) else {
        return false;
    };
    w.be_id = id;
    w.be = be;
    if affinity {
        w.aval = AffinityValue {
            backend_id: id,
            pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(&w.akey, &w.aval, BPF_ANY as u64);
    }
    true
}

/// The backend with this id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    unsafe { BACKENDS.get(&id) }.copied()
}
