//! Frontend lookup and backend selection (see `weir_common::lb` for the map layout).

use aya_ebpf::helpers::bpf_get_prandom_u32;
use weir_common::{Addr, lb::*};

use crate::{
    maps::{BACKENDS, NODE_ADDRS, SERVICES},
    parse::Pkt,
};

#[inline(always)]
fn master_key(addr: Addr, port_be: u16, proto: u8) -> ServiceKey {
    ServiceKey {
        addr,
        port_be,
        proto,
        scope: SCOPE_CLUSTER,
        slot: 0,
        pad: [0; 2],
    }
}

/// The frontend this packet is addressed to: an exact {address, port, protocol} match,
/// else, if the destination is one of this node's addresses, a NodePort on the wildcard.
#[inline(always)]
pub fn lookup_frontend(pkt: &Pkt) -> Option<(ServiceKey, ServiceValue)> {
    let mut key = master_key(pkt.dst, pkt.dport_be, pkt.proto);
    if let Some(v) = unsafe { SERVICES.get(&key) } {
        return Some((key, *v));
    }
    if unsafe { NODE_ADDRS.get(&pkt.dst) }.is_some() {
        key.addr = if pkt.v6 { Addr::V6_ANY } else { Addr::V4_ANY };
        if let Some(v) = unsafe { SERVICES.get(&key) } {
            return Some((key, *v));
        }
    }
    None
}

/// Whether the destination address is a ClusterIP at all (the port-0 marker entry):
/// a packet to a port the Service does not have is then rejected.
#[inline(always)]
pub fn is_cluster_ip(pkt: &Pkt) -> bool {
    let key = master_key(pkt.dst, 0, 0);
    unsafe { SERVICES.get(&key) }.is_some()
}

/// The backend set to use for this packet: (scope, number of slots).
#[inline(always)]
pub fn backend_set(svc: &ServiceValue, source_is_local: bool) -> (u8, u16) {
    // Upstream: a Local policy uses the node-local endpoints, except that traffic from
    // local pods or the node itself to an external address of an eTP=Local Service is
    // short-circuited to the cluster-wide set (iptables proxier, "pod traffic for ...
    // external destinations" / "masquerade LOCAL traffic"), pkg/proxy/iptables/proxier.go.
    let local =
        svc.flags & SVC_F_LOCAL != 0 && !(svc.flags & SVC_F_EXTERNAL != 0 && source_is_local);
    if local {
        (SCOPE_LOCAL, svc.local_count)
    } else {
        (SCOPE_CLUSTER, svc.count)
    }
}

/// Picks a backend uniformly at random among `count` slots of `scope`.
#[inline(always)]
pub fn select_random(fe: &ServiceKey, scope: u8, count: u16) -> Option<(u32, Backend)> {
    if count == 0 {
        return None;
    }
    let r = unsafe { bpf_get_prandom_u32() };
    let slot = (r % count as u32) as u16 + 1;
    let key = ServiceKey { scope, slot, ..*fe };
    let id = unsafe { SERVICES.get(&key) }?.backend_id;
    let be = unsafe { BACKENDS.get(&id) }?;
    Some((id, *be))
}

/// The backend with this id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    unsafe { BACKENDS.get(&id) }.copied()
}
