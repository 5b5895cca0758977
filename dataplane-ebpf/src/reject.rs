//! Rejecting a packet the way kube-proxy's REJECT does, built in place and sent back out
//! of the interface it arrived on:
//!
//! - TCP: a RST (RFC 9293 3.10.7.1: if the offending segment has ACK, the RST carries
//!   `seq = SEG.ACK`; otherwise `seq = 0`, `ack = SEG.SEQ + SEG.LEN` (SYN and FIN count
//!   one each) and the ACK flag). The client's connect() fails at once with ECONNREFUSED.
//! - UDP, SCTP: ICMP (v4: type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable,
//!   quoting the offending IP header and the first 8 bytes of its payload (RFC 792,
//!   RFC 4443 limits the quote to fit the minimum MTU; 8 bytes is what we keep).
//!
//! The source of the generated packet is the address the client sent to (the frontend),
//! so the client's stack matches it to its socket. Checksums are computed from scratch
//! with bpf_csum_diff; header layouts are written with store_bytes after the packet has
//! been resized, and no packet pointer is held across helpers that move data.

use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_adjust_room, bpf_skb_change_tail},
    programs::TcContext,
};
use weir_common::proto;

use crate::parse::{Pkt, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const ETH_ALEN: usize = 6;

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// One's-complement partial sum of `words` (a multiple of 4 bytes) added to `seed`.
#[inline(always)]
fn csum(words: *mut u32, len: u32, seed: u32) -> Result<u64, ()> {
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words, len, seed) };
    if r < 0 { Err(()) } else { Ok(r as u64) }
}

#[inline(always)]
fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    // Fixed-size loads: aya's load_bytes clamps the length to the packet, which the
    // verifier sees as a possibly zero-sized read.
    let dst: [u8; ETH_ALEN] = ctx.load(0).map_err(|_| ())?;
    let src: [u8; ETH_ALEN] = ctx.load(ETH_ALEN).map_err(|_| ())?;
    ctx.store(0, &src, 0).map_err(|_| ())?;
    ctx.store(ETH_ALEN, &dst, 0).map_err(|_| ())
}

#[inline(always)]
fn send_back(ctx: &TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Sends the rejection for `pkt` back where it came from. Returns the TC verdict:
/// TC_ACT_REDIRECT, or TC_ACT_SHOT if the packet cannot be turned into a rejection.
#[inline(never)]
pub fn reject(ctx: &TcContext, pkt: &Pkt) -> i32 {
    let built = match pkt.proto {
        proto::TCP => tcp_rst(ctx, pkt),
        proto::UDP | proto::SCTP => icmp_unreachable(ctx, pkt),
        _ => Err(()),
    };
    if built.is_err() {
        return TC_ACT_SHOT as i32;
    }
    let r = send_back(ctx);
    if r == TC_ACT_REDIRECT as i32 {
        r
    } else {
        TC_ACT_SHOT as i32
    }
}

#[repr(C)]
struct TcpHdr {
    sport_be: u16,
    dport_be: u16,
    seq_be: u32,
    ack_be: u32,
    doff_flags_be: u16,
    window_be: u16,
    check: u16,
    urg_be: u16,
}

#[inline(always)]
fn tcp_rst(ctx: &TcContext, pkt: &Pkt) -> Result<(), ()> {
    // Only a packet whose TCP header directly follows a plain IP header is answered
    // (IPv4 options and IPv6 extension headers would be reflected otherwise).
    let plain = if pkt.v6 {
        pkt.l4_off == pkt.l3_off + 40
    } else {
        pkt.l4_off == pkt.l3_off + 20
    };
    if !plain || pkt.tcp_flags & TCP_RST != 0 {
        return Err(());
    }
    let seq = u32::from_be(ctx.load::<u32>(pkt.l4_off + 4).map_err(|_| ())?);
    let ack = u32::from_be(ctx.load::<u32>(pkt.l4_off + 8).map_err(|_| ())?);
    let doff = ((ctx.load::<u8>(pkt.l4_off + 12).map_err(|_| ())? >> 4) as u32) * 4;
    let ip_payload = if pkt.v6 {
        u16::from_be(ctx.load::<u16>(pkt.l3_off + 4).map_err(|_| ())?) as u32
    } else {
        u16::from_be(ctx.load::<u16>(pkt.l3_off + 2).map_err(|_| ())?) as u32 - 20
    };
    let seg_len = ip_payload.saturating_sub(doff)
        + (pkt.tcp_flags & TCP_SYN != 0) as u32
        + (pkt.tcp_flags & TCP_FIN != 0) as u32;
    let (rst_seq, rst_ack, flags) = if pkt.tcp_flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        (0, seq.wrapping_add(seg_len), TCP_RST | TCP_ACK)
    };

    let new_len = (pkt.l4_off + 20) as u32;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, new_len, 0) } != 0 {
        return Err(());
    }
    swap_macs(ctx)?;

    let mut tcp = TcpHdr {
        sport_be: pkt.dport_be,
        dport_be: pkt.sport_be,
        seq_be: rst_seq.to_be(),
        ack_be: rst_ack.to_be(),
        doff_flags_be: ((5u16 << 12) | flags as u16).to_be(),
        window_be: 0,
        check: 0,
        urg_be: 0,
    };
    let tcp_words = &mut tcp as *mut TcpHdr as *mut u32;
    if pkt.v6 {
        // Pseudo-header: src, dst, upper-layer length (32 bits), zeros, next header.
        let mut ph = [0u32; 10];
        ph[0..4].copy_from_slice(&pkt.dst.w);
        ph[4..8].copy_from_slice(&pkt.src.w);
        ph[8] = 20u32.to_be();
        ph[9] = (proto::TCP as u32).to_be();
        let s = csum(ph.as_mut_ptr(), 40, 0)?;
        tcp.check = fold(csum(tcp_words, 20, s as u32)?);
        // IPv6: payload length, hop limit, swapped addresses.
        ctx.store(pkt.l3_off + 4, &20u16.to_be(), 0)
            .map_err(|_| ())?;
        ctx.store(pkt.l3_off + 7, &64u8, 0).map_err(|_| ())?;
        ctx.store(pkt.l3_off + 8, &pkt.dst.w, 0).map_err(|_| ())?;
        ctx.store(pkt.l3_off + 24, &pkt.src.w, 0).map_err(|_| ())?;
    } else {
        let mut ph = [
            pkt.dst.v4_raw(),
            pkt.src.v4_raw(),
            ((proto::TCP as u32) << 16 | 20).to_be(),
        ];
        let s = csum(ph.as_mut_ptr(), 12, 0)?;
        tcp.check = fold(csum(tcp_words, 20, s as u32)?);
        let mut ip = [0u32; 5];
        ip[0] = u32::from_be_bytes([0x45, 0, 0, 40]).to_be();
        ip[1] = 0; // id 0, no fragment flags
        ip[2] = u32::from_be_bytes([64, proto::TCP, 0, 0]).to_be();
        ip[3] = pkt.dst.v4_raw();
        ip[4] = pkt.src.v4_raw();
        let c = fold(csum(ip.as_mut_ptr(), 20, 0)?);
        let ipb = ip.as_mut_ptr() as *mut u8;
        unsafe { core::ptr::copy_nonoverlapping(c.to_ne_bytes().as_ptr(), ipb.add(10), 2) };
        ctx.store(pkt.l3_off, &ip, 0).map_err(|_| ())?;
    }
    ctx.store(pkt.l4_off, &tcp, 0).map_err(|_| ())
}

/// Bytes of the offending packet an ICMP error quotes beyond its IP header.
const QUOTE_L4: usize = 8;

#[inline(always)]
fn icmp_unreachable(ctx: &TcContext, pkt: &Pkt) -> Result<(), ()> {
    let plain = if pkt.v6 {
        pkt.l4_off == pkt.l3_off + 40
    } else {
        pkt.l4_off == pkt.l3_off + 20
    };
    if !plain {
        return Err(());
    }
    // Keep the offending IP header and 8 bytes of L4, then make room for the new IP and
    // ICMP headers in front of them (after the Ethernet header).
    let ip_len: usize = if pkt.v6 { 40 } else { 20 };
    let quoted = ip_len + QUOTE_L4;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (pkt.l3_off + quoted) as u32, 0) } != 0 {
        return Err(());
    }
    let grow = (ip_len + 8) as i32;
    if unsafe { bpf_skb_adjust_room(ctx.skb.skb, grow, BPF_ADJ_ROOM_MAC, 0) } != 0 {
        return Err(());
    }
    swap_macs(ctx)?;
    let l3 = pkt.l3_off;
    let icmp_off = l3 + ip_len;
    let quote_off = icmp_off + 8;

    // The quoted bytes feed the ICMP checksum (fixed sizes per family, for the verifier).
    let mut q = [0u32; 12]; // up to 48 bytes (IPv6 header + 8)
    if pkt.v6 {
        q = ctx.load::<[u32; 12]>(quote_off).map_err(|_| ())?;
    } else {
        let q7: [u32; 7] = ctx.load(quote_off).map_err(|_| ())?;
        q[..7].copy_from_slice(&q7);
    }

    if pkt.v6 {
        let icmp_len = (8 + quoted) as u32;
        let mut icmp = [u32::from_be_bytes([1, 4, 0, 0]).to_be(), 0];
        let mut ph = [0u32; 10];
        ph[0..4].copy_from_slice(&pkt.dst.w);
        ph[4..8].copy_from_slice(&pkt.src.w);
        ph[8] = icmp_len.to_be();
        ph[9] = (proto::ICMPV6 as u32).to_be();
        let s = csum(ph.as_mut_ptr(), 40, 0)?;
        let s = csum(q.as_mut_ptr(), 48, s as u32)?;
        let c = fold(csum(icmp.as_mut_ptr(), 8, s as u32)?);
        let ib = icmp.as_mut_ptr() as *mut u8;
        unsafe { core::ptr::copy_nonoverlapping(c.to_ne_bytes().as_ptr(), ib.add(2), 2) };
        let mut ip = [0u32; 10];
        ip[0] = 0x6000_0000u32.to_be();
        ip[1] = u32::from_be_bytes([0, 0, proto::ICMPV6, 64]).to_be()
            | (icmp_len as u16).to_be() as u32;
        ip[2..6].copy_from_slice(&pkt.dst.w);
        ip[6..10].copy_from_slice(&pkt.src.w);
        ctx.store(l3, &ip, 0).map_err(|_| ())?;
        ctx.store(icmp_off, &icmp, 0).map_err(|_| ())
    } else {
        let mut icmp = [u32::from_be_bytes([3, 3, 0, 0]).to_be(), 0];
        // The v4 quote is 28 bytes: only the first 7 words of `q` are data.
        let s = csum(q.as_mut_ptr(), 28, 0)?;
        let c = fold(csum(icmp.as_mut_ptr(), 8, s as u32)?);
        let ib = icmp.as_mut_ptr() as *mut u8;
        unsafe { core::ptr::copy_nonoverlapping(c.to_ne_bytes().as_ptr(), ib.add(2), 2) };
        let total = (20 + 8 + quoted) as u16;
        let mut ip = [0u32; 5];
        ip[0] = (u32::from_be_bytes([0x45, 0, 0, 0]) | total as u32).to_be();
        ip[1] = 0;
        ip[2] = u32::from_be_bytes([64, proto::ICMP, 0, 0]).to_be();
        ip[3] = pkt.dst.v4_raw();
        ip[4] = pkt.src.v4_raw();
        let ipc = fold(csum(ip.as_mut_ptr(), 20, 0)?);
        let ipb = ip.as_mut_ptr() as *mut u8;
        unsafe { core::ptr::copy_nonoverlapping(ipc.to_ne_bytes().as_ptr(), ipb.add(10), 2) };
        ctx.store(l3, &ip, 0).map_err(|_| ())?;
        ctx.store(icmp_off, &icmp, 0).map_err(|_| ())
    }
}
