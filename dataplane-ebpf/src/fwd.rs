//! Forwarding translated packets whose new source is one of the node's own addresses.
//!
//! After masquerading (source := the node's address) or reverse-translating a reply from a
//! NodePort frontend (source := the node address the client used), a packet seen at TC
//! ingress would enter the node's input path with a local source address, which Linux
//! drops as a martian (fib_validate_source). Such packets are forwarded here instead: a FIB
//! lookup for the new destination gives the egress device and the next hop, the TTL is
//! decremented as a router does, and the packet is redirected straight to that device
//! (bpf_redirect with the MACs from the lookup, or bpf_redirect_neigh when the neighbour is
//! not resolved yet). Anything the FIB does not forward (local delivery, unreachable, an
//! MTU problem, TTL expiry) goes back to the stack, which reports it as usual.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup},
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::maps::Work;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Forwards the (already translated) packet; returns the TC verdict.
#[inline(never)]
pub fn redirect(ctx: &TcContext, w: &Work) -> i32 {
    let l3 = w.pkt.l3_off;
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.l4_protocol = w.pkt.proto;
    if w.pkt.v6 {
        let Ok(hl) = ctx.load::<u8>(l3 + 7) else {
            return TC_ACT_OK;
        };
        let (Ok(src), Ok(dst)) = (ctx.load::<[u32; 4]>(l3 + 8), ctx.load::<[u32; 4]>(l3 + 24))
        else {
            return TC_ACT_OK;
        };
        let Ok(plen) = ctx.load::<u16>(l3 + 4) else {
            return TC_ACT_OK;
        };
        if hl <= 1 {
            return TC_ACT_OK;
        }
        p.family = AF_INET6;
        p.__bindgen_anon_1.tot_len = u16::from_be(plen).wrapping_add(40);
        p.__bindgen_anon_3.ipv6_src = src;
        p.__bindgen_anon_4.ipv6_dst = dst;
    } else {
        let Ok(ttl) = ctx.load::<u8>(l3 + 8) else {
            return TC_ACT_OK;
        };
        let (Ok(src), Ok(dst)) = (ctx.load::<u32>(l3 + 12), ctx.load::<u32>(l3 + 16)) else {
            return TC_ACT_OK;
        };
        let Ok(tot) = ctx.load::<u16>(l3 + 2) else {
            return TC_ACT_OK;
        };
        if ttl <= 1 {
            return TC_ACT_OK;
        }
        p.family = AF_INET;
        p.__bindgen_anon_1.tot_len = u16::from_be(tot);
        p.__bindgen_anon_3.ipv4_src = src;
        p.__bindgen_anon_4.ipv4_dst = dst;
    }
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK;
    }
    if decrement_ttl(ctx, w).is_err() {
        return TC_ACT_OK;
    }
    let ifindex = p.ifindex;
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
            return TC_ACT_OK;
        }
        unsafe { bpf_redirect(ifindex, 0) as i32 }
    } else {
        // The kernel resolves the next hop's MAC (and queues the packet meanwhile).
        unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }
}

/// TTL / hop limit minus one, as the forwarding path would do (IPv4 header checksum
/// updated incrementally: TTL shares a 16-bit word with the protocol).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, w: &Work) -> Result<(), ()> {
    let l3 = w.pkt.l3_off;
    if w.pkt.v6 {
        let hl: u8 = ctx.load(l3 + 7).map_err(|_| ())?;
        ctx.store(l3 + 7, &(hl - 1), 0).map_err(|_| ())
    } else {
        let old: u16 = ctx.load(l3 + 8).map_err(|_| ())?; // TTL, protocol (raw)
        let b = old.to_ne_bytes();
        let new = u16::from_ne_bytes([b[0].wrapping_sub(1), b[1]]);
        ctx.l3_csum_replace(l3 + 10, old as u64, new as u64, 2)
            .map_err(|_| ())?;
        ctx.store(l3 + 8, &new, 0).map_err(|_| ())
    }
}
