//! Header parsing into a [`Pkt`]: offsets and the 5-tuple, for IPv4 and IPv6.
//!
//! Reads use direct packet access; every read checks `data + off + size <= data_end`
//! first, which is the bound the verifier needs. If the headers are not in the linear
//! part of the skb, the parser pulls them in once and retries. Nothing here keeps a
//! packet pointer: callers get plain values and offsets, so later helpers that move
//! packet data (csum_replace, store_bytes) cannot invalidate anything they hold.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use weir_common::{Addr, proto};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// Not a fragment / first fragment (has L4 header) / later fragment (no L4 header).
pub const FRAG_NONE: u8 = 0;
pub const FRAG_FIRST: u8 = 1;
pub const FRAG_LATER: u8 = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtcfl: u32,
    pub payload_len_be: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

#[repr(C)]
struct Ipv6OptHdr {
    nexthdr: u8,
    hdrlen: u8,
}

#[repr(C)]
struct Ipv6FragHdr {
    nexthdr: u8,
    reserved: u8,
    frag_off_be: u16,
    id_be: u32,
}

#[repr(C)]
struct Ports {
    src_be: u16,
    dst_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pkt {
    pub l3_off: usize,
    pub l4_off: usize,
    pub src: Addr,
    pub dst: Addr,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub v6: bool,
    pub tcp_flags: u8,
    pub frag: u8,
    /// IP identification of a fragment (IPv4: 16 bits; IPv6: the fragment header's 32),
    /// host order; 0 when not a fragment.
    pub frag_id: u32,
    pub len: u32,
    /// Length of the L4 segment from the IP header (the frame may carry padding).
    pub l4_len: u32,
}

impl Pkt {
    /// Offset of the L4 checksum field, for protocols whose checksum covers the
    /// addresses (pseudo-header) or ports. SCTP (CRC32c over the packet, no pseudo-header)
    /// and ICMPv4 (no pseudo-header, no ports) have none in that sense.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> Option<usize> {
        match self.proto {
            proto::TCP => Some(self.l4_off + 16),
            proto::UDP => Some(self.l4_off + 6),
            proto::ICMPV6 => Some(self.l4_off + 2),
            _ => None,
        }
    }

    /// Whether this protocol carries ports in the first four L4 bytes.
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        matches!(self.proto, proto::TCP | proto::UDP | proto::SCTP)
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Parses the packet into `out`; `Ok(false)` for non-IP traffic, `Err(())` for a
/// malformed packet.
#[inline(always)]
pub fn parse(ctx: &TcContext, out: &mut Pkt) -> Result<bool, ()> {
    // Headers up to 14 + 40 + 4 * 8 (v6 options) + 20 (TCP) fit in 128 bytes; pull them
    // into the linear area if the skb is fragmented there (pull fails on short packets,
    // which the bounds checks below then reject).
    if ctx.data() + 128 > ctx.data_end() {
        let _ = ctx.pull_data(128);
    }
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let eth_proto = u16::from_be(unsafe { (*eth).proto_be });
    let l3_off = ETH_HLEN;
    let pkt = out;
    *pkt = Pkt {
        l3_off,
        l4_off: 0,
        src: Addr::ZERO,
        dst: Addr::ZERO,
        sport_be: 0,
        dport_be: 0,
        proto: 0,
        v6: false,
        tcp_flags: 0,
        frag: FRAG_NONE,
        frag_id: 0,
        len: ctx.len(),
        l4_len: 0,
    };
    match eth_proto {
        ETH_P_IP => {
            let ip = ptr_at::<Ipv4Hdr>(ctx, l3_off).ok_or(())?;
            let (vihl, frag_off, id, p, s, d, tot_len) = unsafe {
                (
                    (*ip).vihl,
                    u16::from_be((*ip).frag_off_be),
                    u16::from_be((*ip).id_be),
                    (*ip).proto,
                    (*ip).saddr,
                    (*ip).daddr,
                    u16::from_be((*ip).tot_len_be) as u32,
                )
            };
            if vihl >> 4 != 4 {
                return Err(());
            }
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return Err(());
            }
            pkt.l4_off = l3_off + ihl;
            pkt.l4_len = tot_len.saturating_sub(ihl as u32);
            pkt.proto = p;
            pkt.src = Addr::from_v4_raw(s);
            pkt.dst = Addr::from_v4_raw(d);
            if frag_off & 0x1fff != 0 {
                pkt.frag = FRAG_LATER;
                pkt.frag_id = id as u32;
            } else if frag_off & 0x2000 != 0 {
                pkt.frag = FRAG_FIRST;
                pkt.frag_id = id as u32;
            }
        }
        ETH_P_IPV6 => {
            let ip = ptr_at::<Ipv6Hdr>(ctx, l3_off).ok_or(())?;
            let (mut next, s, d, plen) = unsafe {
                (
                    (*ip).nexthdr,
                    (*ip).saddr,
                    (*ip).daddr,
                    u16::from_be((*ip).payload_len_be) as u32,
                )
            };
            pkt.v6 = true;
            pkt.src = Addr::from_v6_raw(s);
            pkt.dst = Addr::from_v6_raw(d);
            let mut off = l3_off + size_of::<Ipv6Hdr>();
            // Walk at most 4 extension headers (bounded for the verifier; more is treated
            // as unparseable, as Cilium does with IPV6_MAX_HEADERS).
            let mut i = 0;
            while i < 4 {
                match next {
                    0 | 43 | 60 => {
                        let h = ptr_at::<Ipv6OptHdr>(ctx, off).ok_or(())?;
                        let (n, len) = unsafe { ((*h).nexthdr, (*h).hdrlen) };
                        next = n;
                        off += (len as usize + 1) * 8;
                    }
                    51 => {
                        let h = ptr_at::<Ipv6OptHdr>(ctx, off).ok_or(())?;
                        let (n, len) = unsafe { ((*h).nexthdr, (*h).hdrlen) };
                        next = n;
                        off += (len as usize + 2) * 4;
                    }
                    44 => {
                        let h = ptr_at::<Ipv6FragHdr>(ctx, off).ok_or(())?;
                        let (n, fo, id) = unsafe {
                            (
                                (*h).nexthdr,
                                u16::from_be((*h).frag_off_be),
                                u32::from_be((*h).id_be),
                            )
                        };
                        next = n;
                        off += size_of::<Ipv6FragHdr>();
                        // Offset (high 13 bits) non-zero: a later fragment; offset 0 with
                        // M (bit 0) set: the first; offset 0 without M is an atomic
                        // fragment (RFC 8200 4.5), a whole datagram.
                        if fo & 0xfff8 != 0 {
                            pkt.frag = FRAG_LATER;
                            pkt.frag_id = id;
                        } else if fo & 1 != 0 {
                            pkt.frag = FRAG_FIRST;
                            pkt.frag_id = id;
                        }
                    }
                    _ => break,
                }
                i += 1;
            }
            if matches!(next, 0 | 43 | 60 | 51 | 44) {
                return Err(());
            }
            pkt.proto = next;
            pkt.l4_off = off;
            pkt.l4_len = plen.saturating_sub((off - l3_off - size_of::<Ipv6Hdr>()) as u32);
        }
        _ => return Ok(false),
    }

    if pkt.frag == FRAG_LATER {
        return Ok(true);
    }
    match pkt.proto {
        proto::TCP => {
            let ports = ptr_at::<Ports>(ctx, pkt.l4_off).ok_or(())?;
            let flags = ptr_at::<u8>(ctx, pkt.l4_off + 13).ok_or(())?;
            unsafe {
                pkt.sport_be = (*ports).src_be;
                pkt.dport_be = (*ports).dst_be;
                pkt.tcp_flags = *flags;
            }
        }
        proto::UDP | proto::SCTP => {
            let ports = ptr_at::<Ports>(ctx, pkt.l4_off).ok_or(())?;
            unsafe {
                pkt.sport_be = (*ports).src_be;
                pkt.dport_be = (*ports).dst_be;
            }
        }
        _ => {}
    }
    Ok(true)
}
