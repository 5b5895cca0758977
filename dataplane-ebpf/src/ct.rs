//! Connection tracking: lookups, creation, and per-packet state updates.
//! See `weir_common::ct` for the two entry kinds and the timeouts.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use weir_common::{ct::*, proto};

use crate::{
    maps::{CT, SCRATCH},
    parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// The key of this packet's tuple as it is on the wire.
#[inline(always)]
pub fn key_of(pkt: &Pkt, kind: u8) -> CtKey {
    CtKey {
        src: pkt.src,
        dst: pkt.dst,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        kind,
        pad: [0; 2],
    }
}

/// The key a packet in the reply direction of this tuple would have been created under.
#[inline(always)]
pub fn reply_key_of(pkt: &Pkt, kind: u8) -> CtKey {
    CtKey {
        src: pkt.dst,
        dst: pkt.src,
        sport_be: pkt.dport_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        kind,
        pad: [0; 2],
    }
}

#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<*mut CtEntry> {
    CT.get_ptr_mut(key)
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
        if reply {
            if (*e).flags & CT_F_SEEN_REPLY == 0 {
                (*e).flags |= CT_F_SEEN_REPLY;
            }
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

/// A zeroed entry for this packet in the per-CPU scratch slot (CtEntry is 80 bytes: too
/// much to build on the BPF stack next to everything else). Fill it, then [`insert`].
#[inline(always)]
pub fn scratch_entry(pkt: &Pkt, now: u64) -> Option<*mut CtEntry> {
    let s = SCRATCH.get_ptr_mut(0)?;
    unsafe {
        let e = core::ptr::addr_of_mut!((*s).ct);
        core::ptr::write_bytes(e, 0, 1);
        (*e).created_ns = now;
        (*e).last_seen_ns = now;
        (*e).packets = 1;
        (*e).bytes = pkt.len as u64;
        if pkt.proto == proto::TCP {
            (*e).tcp_fwd = pkt.tcp_flags;
            if pkt.tcp_flags & TCP_SYN != 0 {
                (*e).flags |= CT_F_SYN;
            }
        }
        Some(e)
    }
}

#[inline(always)]
pub fn insert_ptr(key: &CtKey, entry: *const CtEntry) -> Result<(), ()> {
    CT.insert(key, unsafe { &*entry }, BPF_ANY as u64)
        .map_err(|_| ())
}
