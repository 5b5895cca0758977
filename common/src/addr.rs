//! The address type of every key and value.
//!
//! One 16-byte representation for both families keeps one code path and one map per
//! purpose: IPv6 as is, IPv4 as the v4-mapped address `::ffff:a.b.c.d` (RFC 4291 2.5.5.2).
//! The four words hold the address bytes in network order exactly as `struct in6_addr`
//! does in memory, so a word read from a packet is copied without swapping.

/// A v4-mapped or IPv6 address, network byte order in memory.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr {
    pub w: [u32; 4],
}
crate::assert_layout!(Addr, size = 16);
crate::impl_pod!(Addr);

/// Word 2 of a v4-mapped address: bytes 00 00 ff ff, read as a little-endian u32.
const V4_MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    pub const ZERO: Addr = Addr { w: [0; 4] };
    /// The IPv4 wildcard `::ffff:0.0.0.0`: the key of NodePort frontends (any node address).
    pub const V4_ANY: Addr = Addr {
        w: [0, 0, V4_MAPPED_W2, 0],
    };
    /// The IPv6 wildcard `::`.
    pub const V6_ANY: Addr = Addr::ZERO;

    /// From an IPv4 address word as it sits in the packet (network order in memory).
    #[inline(always)]
    pub const fn from_v4_raw(raw: u32) -> Addr {
        Addr {
            w: [0, 0, V4_MAPPED_W2, raw],
        }
    }

    /// From the 16 bytes of an IPv6 header address, read as four raw words.
    #[inline(always)]
    pub const fn from_v6_raw(w: [u32; 4]) -> Addr {
        Addr { w }
    }

    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.w[0] == 0 && self.w[1] == 0 && self.w[2] == V4_MAPPED_W2
    }

    /// The IPv4 word in packet (network) order; meaningful only when `is_v4()`.
    #[inline(always)]
    pub const fn v4_raw(&self) -> u32 {
        self.w[3]
    }

    pub const fn from_octets(o: [u8; 16]) -> Addr {
        Addr {
            w: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    pub const fn octets(&self) -> [u8; 16] {
        let a = self.w[0].to_ne_bytes();
        let b = self.w[1].to_ne_bytes();
        let c = self.w[2].to_ne_bytes();
        let d = self.w[3].to_ne_bytes();
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    pub const fn from_ipv4(ip: core::net::Ipv4Addr) -> Addr {
        Addr::from_v4_raw(u32::from_ne_bytes(ip.octets()))
    }

    pub const fn from_ip(ip: core::net::IpAddr) -> Addr {
        match ip {
            core::net::IpAddr::V4(v4) => Addr::from_ipv4(v4),
            core::net::IpAddr::V6(v6) => Addr::from_octets(v6.octets()),
        }
    }

    pub const fn to_ip(&self) -> core::net::IpAddr {
        if self.is_v4() {
            let b = self.w[3].to_ne_bytes();
            core::net::IpAddr::V4(core::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from_octets(self.octets()))
        }
    }
}

/// Whether the first `plen` bits (0..=128) of `a` and `net` agree. Unrolled over the four
/// words so the verifier sees no loop.
#[inline(always)]
pub fn in_prefix(a: &Addr, net: &Addr, plen: u32) -> bool {
    #[inline(always)]
    fn word_ok(a: u32, n: u32, bits: u32) -> bool {
        if bits == 0 {
            return true;
        }
        // Words hold bytes in network order: compare in big-endian numeric order.
        let mask = if bits >= 32 {
            u32::MAX
        } else {
            u32::MAX << (32 - bits)
        };
        (u32::from_be(a) ^ u32::from_be(n)) & mask == 0
    }
    let b = |i: u32| plen.saturating_sub(32 * i).min(32);
    word_ok(a.w[0], net.w[0], b(0))
        && word_ok(a.w[1], net.w[1], b(1))
        && word_ok(a.w[2], net.w[2], b(2))
        && word_ok(a.w[3], net.w[3], b(3))
}

impl From<core::net::IpAddr> for Addr {
    fn from(ip: core::net::IpAddr) -> Addr {
        Addr::from_ip(ip)
    }
}

impl From<core::net::Ipv4Addr> for Addr {
    fn from(ip: core::net::Ipv4Addr) -> Addr {
        Addr::from_ipv4(ip)
    }
}

impl core::fmt::Debug for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.to_ip(), f)
    }
}

impl core::fmt::Display for Addr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.to_ip(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn v4_round_trip_and_mapping() {
        let ip = Ipv4Addr::new(10, 96, 0, 10);
        let a = Addr::from_ipv4(ip);
        assert!(a.is_v4());
        assert_eq!(a.to_ip(), IpAddr::V4(ip));
        // In memory it is exactly the v4-mapped in6_addr.
        let mapped: Ipv6Addr = ip.to_ipv6_mapped();
        assert_eq!(a.octets(), mapped.octets());
        // The raw word is the four address bytes in packet order.
        assert_eq!(a.v4_raw().to_ne_bytes(), [10, 96, 0, 10]);
    }

    #[test]
    fn v6_round_trip() {
        let ip: Ipv6Addr = "fd00:10:96::a".parse().unwrap();
        let a = Addr::from_ip(IpAddr::V6(ip));
        assert!(!a.is_v4());
        assert_eq!(a.to_ip(), IpAddr::V6(ip));
    }

    #[test]
    fn prefixes() {
        let a = Addr::from_ip("10.244.3.7".parse().unwrap());
        let net = Addr::from_ip("10.244.0.0".parse().unwrap());
        assert!(in_prefix(&a, &net, 96 + 16));
        assert!(!in_prefix(&a, &net, 96 + 24));
        assert!(in_prefix(&a, &net, 0));
        let b = Addr::from_ip("fd00:10:244::5".parse().unwrap());
        let n6 = Addr::from_ip("fd00:10:244::".parse().unwrap());
        assert!(in_prefix(&b, &n6, 64));
        assert!(!in_prefix(
            &Addr::from_ip("fd00:10:245::5".parse().unwrap()),
            &n6,
            48
        ));
        assert!(in_prefix(&b, &b, 128));
    }

    #[test]
    fn wildcards() {
        assert!(Addr::V4_ANY.is_v4());
        assert_eq!(Addr::V4_ANY.to_ip(), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(!Addr::V6_ANY.is_v4());
    }
}
