//! ICMP errors about translated flows.
//!
//! When a backend (or a router on the way) answers a translated packet with an ICMP
//! error — port unreachable, fragmentation needed (PMTU discovery), time exceeded — the
//! error quotes the packet as it was on the wire: client (or masquerade address) ->
//! backend. The client must see it as if the frontend had sent it, exactly as Linux NAT
//! does (nf_nat_icmp_reply_translation): the quoted destination becomes the frontend,
//! the quoted source the original client if it was masqueraded, the outer destination
//! the client, and the outer source the frontend if the error came from the backend
//! itself.
//!
//! Checksums: the outer headers are rewritten through `nat` (IPv4 header checksum;
//! ICMPv6's checksum covers the outer addresses through its pseudo-header). Quoted
//! fields are updated with RFC 1624 incremental arithmetic on the raw 16-bit words as
//! they sit in memory (one's complement sums do not depend on byte order): the quoted
//! IPv4 header checksum, the quoted UDP checksum (when present and non-zero) and TCP
//! checksum (when quoted), and the ICMP checksum for every quoted byte that changed. A
//! quoted IPv4 header with an updated checksum still sums to zero, so it leaves the
//! ICMPv4 checksum unchanged; quoted IPv6 addresses do change ICMPv6's.

use aya_ebpf::programs::TcContext;
use weir_common::{Addr, ct::*, proto};

use crate::{
    ct,
    maps::Work,
    nat::{self, End},
    parse::Pkt,
};

/// ICMPv4 types that carry a quoted packet (RFC 792): destination unreachable, time
/// exceeded, parameter problem. ICMPv6 errors are types below 128 (RFC 4443).
#[inline(always)]
pub fn is_error(pkt: &Pkt, icmp_type: u8) -> bool {
    if pkt.v6 {
        pkt.proto == proto::ICMPV6 && icmp_type < 128
    } else {
        pkt.proto == proto::ICMP && matches!(icmp_type, 3 | 11 | 12)
    }
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') over the 16-bit halves of a raw u32.
#[inline(always)]
fn upd32(check: u16, old: u32, new: u32) -> u16 {
    let s = (!check) as u32
        + (!(old as u16)) as u32
        + (!((old >> 16) as u16)) as u32
        + (new as u16) as u32
        + ((new >> 16) as u16) as u32;
    !fold(s)
}

#[inline(always)]
fn upd16(check: u16, old: u16, new: u16) -> u16 {
    let s = (!check) as u32 + (!old) as u32 + new as u32;
    !fold(s)
}

#[inline(always)]
fn upd_addr(mut check: u16, old: &Addr, new: &Addr, v6: bool) -> u16 {
    if v6 {
        check = upd32(check, old.w[0], new.w[0]);
        check = upd32(check, old.w[1], new.w[1]);
        check = upd32(check, old.w[2], new.w[2]);
    }
    upd32(check, old.w[3], new.w[3])
}

/// The quoted packet of an ICMP error.
struct Inner {
    l3: usize,
    l4: usize,
    src: Addr,
    dst: Addr,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
}

#[inline(always)]
fn parse_inner(ctx: &TcContext, pkt: &Pkt) -> Option<Inner> {
    let l3 = pkt.l4_off + 8;
    let (src, dst, proto, l4) = if pkt.v6 {
        let next: u8 = ctx.load(l3 + 6).ok()?;
        let s: [u32; 4] = ctx.load(l3 + 8).ok()?;
        let d: [u32; 4] = ctx.load(l3 + 24).ok()?;
        (Addr::from_v6_raw(s), Addr::from_v6_raw(d), next, l3 + 40)
    } else {
        let vihl: u8 = ctx.load(l3).ok()?;
        let p: u8 = ctx.load(l3 + 9).ok()?;
        let s: u32 = ctx.load(l3 + 12).ok()?;
        let d: u32 = ctx.load(l3 + 16).ok()?;
        (
            Addr::from_v4_raw(s),
            Addr::from_v4_raw(d),
            p,
            l3 + ((vihl & 0xf) as usize) * 4,
        )
    };
    if !matches!(proto, proto::TCP | proto::UDP | proto::SCTP) {
        return None;
    }
    // Ports are the first 4 bytes of the quoted transport header (always quoted).
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    Some(Inner {
        l3,
        l4,
        src,
        dst,
        sport_be: ports[0],
        dport_be: ports[1],
        proto,
    })
}

/// Whether an ICMP error quotes a packet of a tracked connection, so that NetworkPolicy
/// lets it pass with that connection: the quoted tuple is a `FLOW` entry in either
/// direction (an error about a packet the pod sent, or about one it received), or, for an
/// error already translated back to the frontend, the client's `SVC` entry.
#[inline(never)]
pub fn related(ctx: &TcContext, w: &mut Work) -> bool {
    let Some(inner) = parse_inner(ctx, &w.pkt) else {
        return false;
    };
    w.key = CtKey {
        src: inner.src,
        dst: inner.dst,
        sport_be: inner.sport_be,
        dport_be: inner.dport_be,
        proto: inner.proto,
        kind: CT_KIND_FLOW,
        pad: [0; 2],
    };
    if ct::lookup(&w.key).is_some() {
        return true;
    }
    w.key.kind = CT_KIND_SVC;
    if ct::lookup(&w.key).is_some() {
        return true;
    }
    w.key = w.key.reversed();
    w.key.kind = CT_KIND_FLOW;
    ct::lookup(&w.key).is_some()
}

/// Translates an ICMP error about a translated flow; `Ok(true)` if it was one.
#[inline(never)]
pub fn reverse_error(ctx: &TcContext, w: &mut Work) -> Result<bool, ()> {
    let Some(inner) = parse_inner(ctx, &w.pkt) else {
        return Ok(false);
    };
    // The quoted packet is a forward packet of the flow as it left this node.
    w.key = CtKey {
        src: inner.src,
        dst: inner.dst,
        sport_be: inner.sport_be,
        dport_be: inner.dport_be,
        proto: inner.proto,
        kind: CT_KIND_FLOW,
        pad: [0; 2],
    };
    let Some(e) = ct::lookup(&w.key) else {
        return Ok(false);
    };
    let flags = unsafe { (*e).flags };
    if flags & CT_F_DNAT == 0 {
        return Ok(false);
    }
    let (fe, fe_port, cl, cl_port) = unsafe {
        (
            (*e).nat_dst,
            (*e).nat_dport_be,
            (*e).nat_src,
            (*e).nat_sport_be,
        )
    };
    let snat = flags & CT_F_SNAT != 0;
    let v6 = w.pkt.v6;
    let icmp_csum_off = w.pkt.l4_off + 2;
    let mut icmp_csum: u16 = ctx.load(icmp_csum_off).map_err(|_| ())?;

    // Quoted transport checksum: UDP's at +6 (0 = none over IPv4); TCP's at +16 when the
    // quote is long enough; SCTP has none that covers addresses (and ports are CRC'd:
    // left alone, a quoted SCTP header is informational).
    let l4_csum_off = match inner.proto {
        proto::UDP => Some(inner.l4 + 6),
        proto::TCP if (ctx.len() as usize) >= inner.l4 + 18 => Some(inner.l4 + 16),
        _ => None,
    };
    let old_l4_csum: Option<u16> = match l4_csum_off {
        Some(off) => {
            let c: u16 = ctx.load(off).map_err(|_| ())?;
            if c == 0 && inner.proto == proto::UDP && !v6 {
                None
            } else {
                Some(c)
            }
        }
        None => None,
    };
    let mut l4_csum = old_l4_csum.unwrap_or(0);

    // Quoted destination: backend -> frontend.
    if inner.dst != fe {
        if v6 {
            ctx.store(inner.l3 + 24, &fe.w, 0).map_err(|_| ())?;
            icmp_csum = upd_addr(icmp_csum, &inner.dst, &fe, true);
        } else {
            ctx.store(inner.l3 + 16, &fe.w[3], 0).map_err(|_| ())?;
            let c: u16 = ctx.load(inner.l3 + 10).map_err(|_| ())?;
            ctx.store(inner.l3 + 10, &upd32(c, inner.dst.w[3], fe.w[3]), 0)
                .map_err(|_| ())?;
        }
        l4_csum = upd_addr(l4_csum, &inner.dst, &fe, v6);
    }
    if inner.dport_be != fe_port {
        ctx.store(inner.l4 + 2, &fe_port, 0).map_err(|_| ())?;
        icmp_csum = upd16(icmp_csum, inner.dport_be, fe_port);
        l4_csum = upd16(l4_csum, inner.dport_be, fe_port);
    }
    // Quoted source: masquerade address -> the client.
    if snat {
        if v6 {
            ctx.store(inner.l3 + 8, &cl.w, 0).map_err(|_| ())?;
            icmp_csum = upd_addr(icmp_csum, &inner.src, &cl, true);
        } else {
            ctx.store(inner.l3 + 12, &cl.w[3], 0).map_err(|_| ())?;
            let c: u16 = ctx.load(inner.l3 + 10).map_err(|_| ())?;
            ctx.store(inner.l3 + 10, &upd32(c, inner.src.w[3], cl.w[3]), 0)
                .map_err(|_| ())?;
        }
        l4_csum = upd_addr(l4_csum, &inner.src, &cl, v6);
        if inner.sport_be != cl_port {
            ctx.store(inner.l4, &cl_port, 0).map_err(|_| ())?;
            icmp_csum = upd16(icmp_csum, inner.sport_be, cl_port);
            l4_csum = upd16(l4_csum, inner.sport_be, cl_port);
        }
    }
    if let (Some(off), Some(old)) = (l4_csum_off, old_l4_csum) {
        let new = if l4_csum == 0 && inner.proto == proto::UDP {
            0xffff
        } else {
            l4_csum
        };
        ctx.store(off, &new, 0).map_err(|_| ())?;
        icmp_csum = upd16(icmp_csum, old, new);
    }
    ctx.store(icmp_csum_off, &icmp_csum, 0).map_err(|_| ())?;

    // Outer headers (through nat, which keeps the IPv4 header checksum and ICMPv6's
    // pseudo-header coverage right): the error came from the backend -> from the
    // frontend; addressed to the masquerade address -> to the client.
    let (osrc, odst) = (w.pkt.src, w.pkt.dst);
    if osrc == inner.dst {
        nat::rewrite_from(ctx, &w.pkt, End::Src, &osrc, 0, &fe, 0)?;
        w.pkt.src = fe;
        if unsafe { crate::maps::NODE_ADDRS.get(&fe) }.is_some() {
            w.redirect = 1;
        }
    }
    if snat && odst == inner.src {
        nat::rewrite_from(ctx, &w.pkt, End::Dst, &odst, 0, &cl, 0)?;
        // Addressed to the node before: it must now be forwarded, not delivered.
        w.redirect = 1;
    }
    Ok(true)
}
