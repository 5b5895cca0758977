//! Packet builder and parser for datapath tests.
//!
//! Builders produce complete Ethernet frames with correct checksums. [`parse`] decodes a
//! frame back and reports whether each checksum verifies, which is how tests catch NAT
//! checksum bugs that veth's CHECKSUM_PARTIAL would hide on the wire (TOOLCHAIN.md).

use std::net::{IpAddr, SocketAddr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;

/// One's-complement sum of 16-bit words (RFC 1071), not yet folded or inverted.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        acc += (*b as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

pub fn inet_checksum(data: &[u8]) -> u16 {
    fold(sum16(data, 0))
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut acc = 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += proto as u32;
            acc += len as u32;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum16(&s.octets(), acc);
            acc = sum16(&d.octets(), acc);
            acc += (len as u32 >> 16) + (len as u32 & 0xffff);
            acc += proto as u32;
        }
        _ => panic!("mixed address families"),
    }
    acc
}

/// L4 checksum over the pseudo-header and `l4` (whose checksum field must be zero).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    fold(sum16(l4, pseudo_sum(src, dst, proto, l4.len())))
}

/// CRC32c (Castagnoli), as SCTP uses it (RFC 4960 appendix B), bitwise (tests only).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc: u32 = !0;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Options for building a frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub ttl: u8,
    /// IPv4 only: fragment offset in 8-byte units and the more-fragments flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub ip_id: u16,
    /// IPv6 only: extension headers to insert (next-header values 0, 60).
    pub v6_ext: Vec<u8>,
    /// IPv6 only: a fragment header after `v6_ext` (RFC 8200 4.5) with `frag_offset`
    /// (8-byte units), `more_fragments` and `ip_id` as its identification.
    pub v6_fragment: bool,
}

impl Default for Frame {
    fn default() -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 1],
            dst_mac: [0xee; 6],
            ttl: 64,
            frag_offset: 0,
            more_fragments: false,
            ip_id: 0x1234,
            v6_ext: Vec::new(),
            v6_fragment: false,
        }
    }
}

/// Builds an IP frame carrying `l4` (with its checksum already in place).
pub fn ip_frame(f: &Frame, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + 40 + l4.len());
    out.extend_from_slice(&f.dst_mac);
    out.extend_from_slice(&f.src_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&f.ip_id.to_be_bytes());
            let frag = f.frag_offset | if f.more_fragments { 0x2000 } else { 0 };
            ip[6..8].copy_from_slice(&frag.to_be_bytes());
            ip[8] = f.ttl;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = inet_checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut chain = f.v6_ext.clone();
            if f.v6_fragment {
                chain.push(44);
            }
            let ext_len = chain.len() * 8;
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
            ip[6] = chain.first().copied().unwrap_or(proto);
            ip[7] = f.ttl;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            out.extend_from_slice(&ip);
            for (i, h) in chain.iter().enumerate() {
                let next = chain.get(i + 1).copied().unwrap_or(proto);
                if *h == 44 {
                    let fo = f.frag_offset << 3 | u16::from(f.more_fragments);
                    out.extend_from_slice(&[next, 0]);
                    out.extend_from_slice(&fo.to_be_bytes());
                    out.extend_from_slice(&u32::from(f.ip_id).to_be_bytes());
                } else {
                    out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]); // 8 bytes, PadN option
                }
            }
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(l4);
    out
}

pub fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    tcp_with(&Frame::default(), src, dst, flags, 1000, 0, payload)
}

pub fn tcp_with(
    f: &Frame,
    src: SocketAddr,
    dst: SocketAddr,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = vec![0u8; 20];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..8].copy_from_slice(&seq.to_be_bytes());
    l4[8..12].copy_from_slice(&ack.to_be_bytes());
    l4[12] = 5 << 4;
    l4[13] = flags;
    l4[14..16].copy_from_slice(&65535u16.to_be_bytes());
    l4.extend_from_slice(payload);
    let c = l4_checksum(src.ip(), dst.ip(), TCP, &l4);
    l4[16..18].copy_from_slice(&c.to_be_bytes());
    ip_frame(f, src.ip(), dst.ip(), TCP, &l4)
}

pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    udp_with(&Frame::default(), src, dst, payload, true)
}

/// `checksum: false` sends an IPv4 UDP datagram with checksum 0 ("none", RFC 768).
pub fn udp_with(
    f: &Frame,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    checksum: bool,
) -> Vec<u8> {
    let mut l4 = vec![0u8; 8];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    l4.extend_from_slice(payload);
    if checksum {
        let mut c = l4_checksum(src.ip(), dst.ip(), UDP, &l4);
        if c == 0 {
            c = 0xffff;
        }
        l4[6..8].copy_from_slice(&c.to_be_bytes());
    }
    ip_frame(f, src.ip(), dst.ip(), UDP, &l4)
}

/// An SCTP packet with one INIT chunk, CRC32c set.
pub fn sctp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut l4 = vec![0u8; 12];
    l4[0..2].copy_from_slice(&src.port().to_be_bytes());
    l4[2..4].copy_from_slice(&dst.port().to_be_bytes());
    l4[4..8].copy_from_slice(&0u32.to_be_bytes()); // verification tag 0 for INIT
    // INIT chunk: type 1, flags 0, length 20, initiate tag, a_rwnd, streams, initial TSN.
    l4.extend_from_slice(&[1, 0, 0, 20]);
    l4.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    l4.extend_from_slice(&65535u32.to_be_bytes());
    l4.extend_from_slice(&[0, 1, 0, 1]);
    l4.extend_from_slice(&1u32.to_be_bytes());
    let c = crc32c(&l4);
    // The CRC is stored in little-endian byte order (RFC 4960 B: transmitted LSB first).
    l4[8..12].copy_from_slice(&c.to_le_bytes());
    ip_frame(&Frame::default(), src.ip(), dst.ip(), SCTP, &l4)
}

/// An ICMP (v4) or ICMPv6 echo request.
pub fn icmp_echo(src: IpAddr, dst: IpAddr, id: u16, seq: u16) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let mut l4 = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(&seq.to_be_bytes());
    l4.extend_from_slice(b"weirping");
    let (proto, c) = if v6 {
        (ICMPV6, l4_checksum(src, dst, ICMPV6, &l4))
    } else {
        (ICMP, inet_checksum(&l4))
    };
    l4[2..4].copy_from_slice(&c.to_be_bytes());
    ip_frame(&Frame::default(), src, dst, proto, &l4)
}

/// An ICMP error (destination unreachable, code `code`) from `from` about `inner`, an IP
/// packet (without Ethernet header) the error refers to; carries its first 28/48 bytes
/// for v4 / as much as fits for v6, as routers do (RFC 792 / RFC 4443).
pub fn icmp_unreachable(from: IpAddr, to: IpAddr, code: u8, inner_frame: &[u8]) -> Vec<u8> {
    let inner = &inner_frame[14..];
    let v6 = from.is_ipv6();
    let keep = if v6 {
        inner.len().min(1232)
    } else {
        inner.len().min(28)
    };
    let mut l4 = vec![if v6 { 1 } else { 3 }, code, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&inner[..keep]);
    let (proto, c) = if v6 {
        (ICMPV6, l4_checksum(from, to, ICMPV6, &l4))
    } else {
        (ICMP, inet_checksum(&l4))
    };
    l4[2..4].copy_from_slice(&c.to_be_bytes());
    ip_frame(&Frame::default(), from, to, proto, &l4)
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub ttl: u8,
    /// IPv4 header checksum verifies (always true for IPv6).
    pub ip_csum_ok: bool,
    /// The L4 checksum verifies (TCP/UDP/ICMP/ICMPv6 internet checksum, SCTP CRC32c);
    /// true for an IPv4 UDP checksum of 0 (none).
    pub l4_csum_ok: bool,
    /// The raw UDP checksum field (tests of the "checksum 0" case look at it).
    pub udp_csum: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// For ICMP errors: the quoted inner packet, parsed without checksum checks.
    pub inner: Option<Box<Parsed>>,
    pub payload: Vec<u8>,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

pub fn sock(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("ip"), port)
}

/// Parses a frame; `None` if it is not an IP frame this parser understands.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < 14 {
        return None;
    }
    let mut dst_mac = [0; 6];
    let mut src_mac = [0; 6];
    dst_mac.copy_from_slice(&frame[0..6]);
    src_mac.copy_from_slice(&frame[6..12]);
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    let mut p = parse_ip(&frame[14..], et, true)?;
    p.src_mac = src_mac;
    p.dst_mac = dst_mac;
    Some(p)
}

fn parse_ip(ip: &[u8], et: u16, verify: bool) -> Option<Parsed> {
    let (src, dst, mut proto, ttl, ip_csum_ok, mut off, total) = match et {
        ETH_P_IP => {
            if ip.len() < 20 {
                return None;
            }
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).min(ip.len());
            (
                IpAddr::from(s),
                IpAddr::from(d),
                ip[9],
                ip[8],
                inet_checksum(&ip[..ihl]) == 0,
                ihl,
                total,
            )
        }
        ETH_P_IPV6 => {
            if ip.len() < 40 {
                return None;
            }
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            let total = (40 + u16::from_be_bytes([ip[4], ip[5]]) as usize).min(ip.len());
            let mut next = ip[6];
            let mut off = 40;
            while matches!(next, 0 | 43 | 60) && off + 2 <= ip.len() {
                let n = ip[off];
                off += (ip[off + 1] as usize + 1) * 8;
                next = n;
            }
            (
                IpAddr::from(s),
                IpAddr::from(d),
                next,
                ip[7],
                true,
                off,
                total,
            )
        }
        _ => return None,
    };
    let l4 = ip.get(off..total)?;
    let mut p = Parsed {
        src,
        dst,
        proto,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        ttl,
        ip_csum_ok,
        l4_csum_ok: false,
        udp_csum: None,
        icmp_type: None,
        icmp_code: None,
        inner: None,
        payload: Vec::new(),
        src_mac: [0; 6],
        dst_mac: [0; 6],
    };
    if proto == 44 {
        // IPv6 fragment header: report the upper protocol, no ports.
        proto = *l4.first()?;
        p.proto = proto;
        off += 8;
        let _ = off;
        p.l4_csum_ok = true;
        return Some(p);
    }
    let pseudo_ok = |l4: &[u8]| fold(sum16(l4, pseudo_sum(src, dst, proto, l4.len()))) == 0;
    match proto {
        TCP if l4.len() >= 20 => {
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            p.tcp_flags = l4[13];
            let doff = (l4[12] >> 4) as usize * 4;
            p.payload = l4.get(doff..).unwrap_or_default().to_vec();
            p.l4_csum_ok = !verify || pseudo_ok(l4);
        }
        // A TCP header quoted by an ICMP error may be cut after 8 bytes (RFC 792).
        TCP if !verify && l4.len() >= 4 => {
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        UDP if l4.len() >= 8 => {
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            let c = u16::from_be_bytes([l4[6], l4[7]]);
            p.udp_csum = Some(c);
            p.payload = l4[8..].to_vec();
            p.l4_csum_ok = !verify || (c == 0 && src.is_ipv4()) || pseudo_ok(l4);
        }
        SCTP if l4.len() >= 12 => {
            p.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.dport = u16::from_be_bytes([l4[2], l4[3]]);
            let mut z = l4.to_vec();
            let got = u32::from_le_bytes([z[8], z[9], z[10], z[11]]);
            z[8..12].copy_from_slice(&[0; 4]);
            p.l4_csum_ok = !verify || crc32c(&z) == got;
        }
        ICMP | ICMPV6 if l4.len() >= 8 => {
            p.icmp_type = Some(l4[0]);
            p.icmp_code = Some(l4[1]);
            p.sport = u16::from_be_bytes([l4[4], l4[5]]); // echo identifier
            p.l4_csum_ok = !verify
                || if proto == ICMP {
                    inet_checksum(l4) == 0
                } else {
                    pseudo_ok(l4)
                };
            let is_error = if proto == ICMP {
                matches!(l4[0], 3 | 11 | 12)
            } else {
                l4[0] < 128
            };
            if is_error {
                let inner_et = if proto == ICMP { ETH_P_IP } else { ETH_P_IPV6 };
                p.inner = parse_ip(&l4[8..], inner_et, false).map(Box::new);
            }
        }
        _ => {}
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_verify() {
        for (s, d) in [("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")] {
            let t = parse(&tcp(sock(s, 1234), sock(d, 80), SYN, b"hi")).unwrap();
            assert!(t.ip_csum_ok && t.l4_csum_ok, "{t:?}");
            assert_eq!((t.sport, t.dport, t.tcp_flags), (1234, 80, SYN));
            let u = parse(&udp(sock(s, 53), sock(d, 5353), b"q")).unwrap();
            assert!(u.l4_csum_ok);
            let sc = parse(&sctp(sock(s, 3868), sock(d, 3868))).unwrap();
            assert!(sc.l4_csum_ok);
            let e = parse(&icmp_echo(s.parse().unwrap(), d.parse().unwrap(), 7, 1)).unwrap();
            assert!(e.l4_csum_ok);
        }
    }

    #[test]
    fn corruption_is_detected() {
        let mut f = tcp(sock("10.0.0.1", 1), sock("10.0.0.2", 2), SYN, b"");
        f[14 + 16] ^= 1; // flip a destination address bit
        let p = parse(&f).unwrap();
        assert!(!p.ip_csum_ok);
        assert!(!p.l4_csum_ok);
        let mut s = sctp(sock("10.0.0.1", 1), sock("10.0.0.2", 2));
        let n = s.len();
        s[n - 1] ^= 1;
        assert!(!parse(&s).unwrap().l4_csum_ok);
    }

    #[test]
    fn crc32c_known_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn icmp_error_quotes_inner() {
        let inner = udp(sock("10.0.0.1", 5000), sock("10.0.0.2", 53), b"x");
        let e = parse(&icmp_unreachable(
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            3,
            &inner,
        ))
        .unwrap();
        assert!(e.l4_csum_ok);
        let i = e.inner.unwrap();
        assert_eq!((i.sport, i.dport, i.proto), (5000, 53, UDP));
    }
}
