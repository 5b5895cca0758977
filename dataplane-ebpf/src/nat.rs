//! Header rewrites with incremental checksum updates.
//!
//! IPv4: the IP header checksum covers the addresses (l3_csum_replace); TCP/UDP checksums
//! cover them through the pseudo-header (l4_csum_replace with BPF_F_PSEUDO_HDR) and the
//! ports directly. IPv6 has no header checksum; its L4 checksums (TCP, UDP, ICMPv6) cover
//! the 16-byte addresses through the pseudo-header, so the update is a csum_diff of the
//! old and new address. UDP over IPv4 may carry checksum 0 ("none"): BPF_F_MARK_MANGLED_0
//! keeps it 0 and turns a computed 0 into 0xffff (RFC 768).
//!
//! Values handed to the csum helpers are raw network-order words as they sit in the
//! packet; the one's-complement sum does not care about byte order as long as old and
//! new are in the same order.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use weir_common::{Addr, proto};

use crate::parse::Pkt;

const IPV4_CSUM_OFF: usize = 10;
const IPV4_SADDR_OFF: usize = 12;
const IPV4_DADDR_OFF: usize = 16;
const IPV6_SADDR_OFF: usize = 8;
const IPV6_DADDR_OFF: usize = 24;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

#[inline(always)]
fn l4_flags(pkt: &Pkt) -> u64 {
    if pkt.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

/// Rewrites one end's address and port. `pkt` gives offsets, family and protocol (and
/// the current addresses unless `old` overrides them: a second rewrite of the same packet
/// passes the values the first rewrite left, instead of copying the whole `Pkt`).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, pkt: &Pkt, end: End, addr: &Addr, port_be: u16) -> Result<(), ()> {
    let (old_addr, old_port) = match end {
        End::Src => (pkt.src, pkt.sport_be),
        End::Dst => (pkt.dst, pkt.dport_be),
    };
    rewrite_from(ctx, pkt, end, &old_addr, old_port, addr, port_be)
}

#[inline(always)]
pub fn rewrite_from(
    ctx: &TcContext,
    pkt: &Pkt,
    end: End,
    old_addr: &Addr,
    old_port: u16,
    addr: &Addr,
    port_be: u16,
) -> Result<(), ()> {
    let (old_addr, old_port) = (*old_addr, old_port);
    let csum_off = pkt.l4_csum_off();
    let flags = l4_flags(pkt);
    if old_addr != *addr {
        if pkt.v6 {
            rewrite_addr_v6(ctx, pkt, end, &old_addr, addr, csum_off, flags)?;
        } else {
            rewrite_addr_v4(
                ctx,
                pkt,
                end,
                old_addr.v4_raw(),
                addr.v4_raw(),
                csum_off,
                flags,
            )?;
        }
    }
    if pkt.has_ports() && old_port != port_be {
        // SCTP: the CRC32c is fixed once per stage by `sctp_fix_crc`, after every port
        // of the packet is rewritten (one call keeps the verifier's work small).
        if let Some(off) = csum_off {
            ctx.l4_csum_replace(off, old_port as u64, port_be as u64, flags | 2)
                .map_err(|_| ())?;
        }
        let port_off = match end {
            End::Src => pkt.l4_off,
            End::Dst => pkt.l4_off + 2,
        };
        ctx.store(port_off, &port_be, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Updates SCTP's CRC32c after its ports changed from `old` to `new` (each the packet's
/// first four bytes, source port then destination port, as a raw native u32): the ports
/// are the first four bytes of the packet, so the CRC moves by a term that depends only
/// on their XOR and the packet length (weir_common::crc32c). Called once per translation
/// stage, after every rewrite of the packet's ports.
#[inline(never)]
pub fn sctp_fix_crc(ctx: &TcContext, pkt: &Pkt, old: u32, new: u32) -> Result<(), ()> {
    if pkt.proto != proto::SCTP || old == new {
        return Ok(());
    }
    let off = pkt.l4_off + 8;
    // The CRC sits in the packet least significant byte first (RFC 4960 B): a native
    // (little-endian) u32 load gives its value.
    let crc: u32 = ctx.load(off).map_err(|_| ())?;
    let diff = (old ^ new).to_ne_bytes(); // in packet byte order
    let Some(shift) = crate::maps::CRC32C_SHIFT.get(pkt.l4_len.saturating_sub(4)) else {
        return Err(());
    };
    if *shift == 0 {
        // Not filled (x^n mod P is never 0): refuse rather than corrupt the CRC.
        return Err(());
    }
    let new = weir_common::crc32c::adjust_prefix_with(crc, diff, *shift);
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[inline(always)]
fn rewrite_addr_v4(
    ctx: &TcContext,
    pkt: &Pkt,
    end: End,
    old: u32,
    new: u32,
    csum_off: Option<usize>,
    flags: u64,
) -> Result<(), ()> {
    if let Some(off) = csum_off {
        ctx.l4_csum_replace(
            off,
            old as u64,
            new as u64,
            flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
    }
    ctx.l3_csum_replace(pkt.l3_off + IPV4_CSUM_OFF, old as u64, new as u64, 4)
        .map_err(|_| ())?;
    let off = match end {
        End::Src => pkt.l3_off + IPV4_SADDR_OFF,
        End::Dst => pkt.l3_off + IPV4_DADDR_OFF,
    };
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[inline(always)]
fn rewrite_addr_v6(
    ctx: &TcContext,
    pkt: &Pkt,
    end: End,
    old: &Addr,
    new: &Addr,
    csum_off: Option<usize>,
    flags: u64,
) -> Result<(), ()> {
    if let Some(off) = csum_off {
        let mut from = old.w;
        let mut to = new.w;
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(());
        }
        ctx.l4_csum_replace(off, 0, diff as u64, flags | BPF_F_PSEUDO_HDR as u64)
            .map_err(|_| ())?;
    }
    let off = match end {
        End::Src => pkt.l3_off + IPV6_SADDR_OFF,
        End::Dst => pkt.l3_off + IPV6_DADDR_OFF,
    };
    ctx.store(off, &new.w, 0).map_err(|_| ())
}

/// The packet's two ports as they sit in its first four L4 bytes (for `sctp_fix_crc`).
#[inline(always)]
pub fn ports_word(sport_be: u16, dport_be: u16) -> u32 {
    let (s, d) = (sport_be.to_ne_bytes(), dport_be.to_ne_bytes());
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}
