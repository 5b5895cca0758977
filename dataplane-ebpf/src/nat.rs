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
        if pkt.proto == proto::SCTP {
            // SCTP's CRC32c covers the ports and cannot be updated incrementally; port
            // translation for SCTP is refused by the caller (see lb.rs) until the CRC is
            // recomputed here.
            return Err(());
        }
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
