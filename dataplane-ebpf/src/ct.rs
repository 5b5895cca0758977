//! Connection tracking: lookups, creation, and per-packet state updates.
//! See `weir_common::ct` for the two entry kinds and the timeouts.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use weir_common::{ct::*, proto};

use crate::{
    maps::CT,
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Sets `key` to this packet's tuple as it is on the wire.
#[inline(always)]
pub fn set_key(key: &mut CtKey, pkt: &Pkt, kind: u8) {
    key.src = pkt.src;
    key.dst = pkt.dst;
    key.sport_be = pkt.sport_be;
    key.dport_be = pkt.dport_be;
    key.proto = pkt.proto;
    key.kind = kind;
    key.pad = [0; 2];
}

/// Sets `key` to the tuple a packet in the reply direction of this one was created under.
#[inline(always)]
pub fn set_reply_key(key: &mut CtKey, pkt: &Pkt, kind: u8) {
    key.src = pkt.dst;
    key.dst = pkt.src;
    key.sport_be = pkt.dport_be;
    key.dport_be = pkt.sport_be;
    key.proto = pkt.proto;
    key.kind = kind;
    key.pad = [0; 2];
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CT.get_ptr_mut(key)
}

#[inline(always)]
pub fn insert(key: &CtKey, entry: &CtEntry) -> Result<(), ()> {
    CT.insert(key, entry, BPF_ANY as u64).map_err(|_| ())
}

/// Whether a live entry should give way to a new connection on the same tuple: it has
/// expired, or it is a TCP connection that closed and a fresh SYN reuses its ports
/// (without this a client reusing a source port inherits stale translation state, see
/// TOOLCHAIN.md "Runtime pitfalls").
#[inline(always)]
pub fn is_stale(e: *const CtEntry, pkt: &Pkt, now: u64) -> bool {
    let e = unsafe { &*e };
    if e.expired(pkt.proto, now) {
        return true;
    }
    pkt.proto == proto::TCP
        && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
        && e.flags & (CT_F_RST | CT_F_FIN_FWD | CT_F_FIN_REV) != 0
}

/// Updates timestamps, counters and TCP state for one packet.
#[inline(always)]
pub fn touch(e: *mut CtEntry, pkt: &Pkt, reply: bool, now: u64) {
    unsafe {
        (*e).last_seen_ns = now;
        (*e).packets += 1;
        (*e).bytes += pkt.len as u64;
        if reply && (*e).flags & CT_F_SEEN_REPLY == 0 {
            (*e).flags |= CT_F_SEEN_REPLY;
        }
        if pkt.proto == proto::TCP {
            let f = pkt.tcp_flags;
            if reply {
                (*e).tcp_rev |= f;
            } else {
                (*e).tcp_fwd |= f;
            }
            if f & TCP_RST != 0 {
                (*e).flags |= CT_F_RST;
            }
            if f & TCP_FIN != 0 {
                (*e).flags |= if reply { CT_F_FIN_REV } else { CT_F_FIN_FWD };
            }
        }
    }
}

/// Resets `e` to a fresh entry for this packet.
#[inline(always)]
pub fn init_entry(e: &mut CtEntry, pkt: &Pkt, now: u64) {
    *e = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: pkt.len as u64,
        ..CtEntry::default()
    };
    if pkt.proto == proto::TCP {
        e.tcp_fwd = pkt.tcp_flags;
        if pkt.tcp_flags & TCP_SYN != 0 {
            e.flags |= CT_F_SYN;
        }
    }
}
