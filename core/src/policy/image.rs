//! [`PolicyImage`]: the exact contents of the NetworkPolicy maps, and longest-prefix-match
//! over an image's LPM maps with the kernel's semantics (bits compared in key memory order,
//! most significant bit of each byte first), used by the reference lookup and the compiler.

use std::collections::BTreeMap;

use weir_common::{
    Addr,
    policy::{EndpointValue, IpcacheValue, PolicyKey, PolicyValue, RuleInfo},
};

use crate::image::Lpm;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyImage {
    /// `IPCACHE`: (prefix length over the 128-bit [`Addr`], masked address) -> identity.
    pub ipcache: BTreeMap<Lpm<Addr>, IpcacheValue>,
    /// `ENDPOINTS`: local pod address -> policy keys and isolation.
    pub endpoints: BTreeMap<Addr, EndpointValue>,
    /// `POLICY`: (prefix length over the 96-bit key, masked key) -> verdict.
    pub policy: BTreeMap<Lpm<PolicyKey>, PolicyValue>,
    /// `POLICY_RULES`: rule id -> what it stands for.
    pub rules: BTreeMap<u32, RuleInfo>,
}

impl PolicyImage {
    pub fn is_empty(&self) -> bool {
        self.ipcache.is_empty()
            && self.endpoints.is_empty()
            && self.policy.is_empty()
            && self.rules.is_empty()
    }

    /// Entry counts per map.
    pub fn counts(&self) -> [(&'static str, usize); 4] {
        use weir_common::maps::*;
        [
            (IPCACHE, self.ipcache.len()),
            (ENDPOINTS, self.endpoints.len()),
            (POLICY, self.policy.len()),
            (POLICY_RULES, self.rules.len()),
        ]
    }
}

/// Keys of LPM maps: a fixed number of bits, maskable to a prefix.
pub trait LpmData: Copy + Ord {
    const BITS: u32;
    /// The key with every bit after the first `plen` cleared.
    fn masked(&self, plen: u32) -> Self;
}

fn mask_bytes<const N: usize>(mut b: [u8; N], plen: u32) -> [u8; N] {
    for (i, byte) in b.iter_mut().enumerate() {
        let start = i as u32 * 8;
        if plen <= start {
            *byte = 0;
        } else if plen < start + 8 {
            *byte &= 0xffu8 << (8 - (plen - start));
        }
    }
    b
}

impl LpmData for Addr {
    const BITS: u32 = 128;
    fn masked(&self, plen: u32) -> Self {
        Addr::from_octets(mask_bytes(self.octets(), plen))
    }
}

/// [`PolicyKey`] as the bytes the kernel compares (its `#[repr(C)]` memory layout).
pub fn policy_key_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.policy_key.to_ne_bytes());
    b[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    b[8] = k.direction;
    b[9] = k.proto;
    b[10..12].copy_from_slice(&k.port_be.to_ne_bytes());
    b
}

fn policy_key_from(b: [u8; 12]) -> PolicyKey {
    PolicyKey {
        policy_key: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        identity: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        direction: b[8],
        proto: b[9],
        port_be: u16::from_ne_bytes([b[10], b[11]]),
    }
}

impl LpmData for PolicyKey {
    const BITS: u32 = 96;
    fn masked(&self, plen: u32) -> Self {
        policy_key_from(mask_bytes(policy_key_bytes(self), plen))
    }
}

/// The longest-prefix match for `key` among entries of at most `max_plen` bits, as the
/// kernel's LPM trie answers a lookup with prefix length `max_plen`.
pub fn lpm_get<K: LpmData, V: Copy>(
    map: &BTreeMap<Lpm<K>, V>,
    key: &K,
    max_plen: u32,
) -> Option<(u32, V)> {
    lpm_get_among(map, key, (0..=max_plen.min(K::BITS)).rev())
}

/// The prefix lengths that occur in `map`, longest first.
pub fn prefix_lengths<K, V>(map: &BTreeMap<Lpm<K>, V>) -> Vec<u32> {
    let set: std::collections::BTreeSet<u32> = map.keys().map(|(plen, _)| *plen).collect();
    set.into_iter().rev().collect()
}

/// [`lpm_get`] probing only the prefix lengths `plens` (longest first), e.g. those
/// [`prefix_lengths`] found: one map lookup per length that occurs instead of one per
/// possible length (129 for an address), which matters when it runs once per pod.
pub fn lpm_get_among<K: LpmData, V: Copy>(
    map: &BTreeMap<Lpm<K>, V>,
    key: &K,
    plens: impl IntoIterator<Item = u32>,
) -> Option<(u32, V)> {
    plens
        .into_iter()
        .find_map(|plen| map.get(&(plen, key.masked(plen))).map(|v| (plen, *v)))
}

/// An `IPCACHE`/`Addr` prefix for an `ipnet` network (IPv4 v4-mapped: 96 + its length).
pub fn addr_prefix(net: &ipnet::IpNet) -> Lpm<Addr> {
    let net = net.trunc();
    match net {
        ipnet::IpNet::V4(n) => (
            96 + n.prefix_len() as u32,
            Addr::from_ipv4(n.network()).masked(96 + n.prefix_len() as u32),
        ),
        ipnet::IpNet::V6(n) => (
            n.prefix_len() as u32,
            Addr::from_octets(n.network().octets()).masked(n.prefix_len() as u32),
        ),
    }
}

/// Human form of an `IPCACHE` prefix: `10.0.0.0/8`, `::/0`.
pub fn show_addr_prefix((plen, a): &Lpm<Addr>) -> String {
    if a.is_v4() && *plen >= 96 {
        format!("{}/{}", a, plen - 96)
    } else {
        let v6 = std::net::Ipv6Addr::from(a.octets());
        format!("{v6}/{plen}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_memory_order() {
        let a = Addr::from_ip("10.1.2.3".parse().unwrap());
        assert_eq!(
            a.masked(96 + 16),
            Addr::from_ip("10.1.0.0".parse().unwrap())
        );
        assert_eq!(
            a.masked(96 + 12),
            Addr::from_ip("10.0.0.0".parse().unwrap())
        );
        let k = PolicyKey {
            policy_key: 7,
            identity: 9,
            direction: 1,
            proto: 6,
            port_be: 0x1f90u16.to_be(), // 8080
        };
        let m = k.masked(80 + 12);
        assert_eq!(u16::from_be(m.port_be), 0x1f90 & 0xfff0);
        assert_eq!((m.policy_key, m.identity, m.proto), (7, 9, 6));
        let m = k.masked(72);
        assert_eq!((m.proto, m.port_be, m.direction), (0, 0, 1));
    }

    #[test]
    fn longest_prefix_wins() {
        let mut m = BTreeMap::new();
        let net = |s: &str| addr_prefix(&s.parse().unwrap());
        m.insert(net("0.0.0.0/0"), 1);
        m.insert(net("10.0.0.0/8"), 2);
        m.insert(net("10.1.0.0/16"), 3);
        m.insert(net("::/0"), 4);
        let get = |ip: &str| lpm_get(&m, &Addr::from_ip(ip.parse().unwrap()), 128).map(|x| x.1);
        assert_eq!(get("10.1.2.3"), Some(3));
        assert_eq!(get("10.2.2.3"), Some(2));
        assert_eq!(get("11.0.0.1"), Some(1));
        assert_eq!(get("2001:db8::1"), Some(4));
        assert_eq!(show_addr_prefix(&net("10.1.0.0/16")), "10.1.0.0/16");
        assert_eq!(show_addr_prefix(&net("::/0")), "::/0");
        assert_eq!(show_addr_prefix(&net("10.244.0.5/4")), "0.0.0.0/4");
    }

    #[test]
    fn probing_only_the_lengths_present_answers_as_probing_every_length() {
        let mut m = BTreeMap::new();
        for (i, n) in [
            "0.0.0.0/0",
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/25",
            "::/0",
        ]
        .iter()
        .enumerate()
        {
            m.insert(addr_prefix(&n.parse().unwrap()), i);
        }
        let plens = prefix_lengths(&m);
        assert_eq!(plens, vec![96 + 25, 96 + 16, 96 + 8, 96, 0]);
        for ip in [
            "10.1.2.3",
            "10.1.2.200",
            "10.1.9.9",
            "10.9.9.9",
            "11.0.0.1",
            "2001:db8::1",
        ] {
            let a = Addr::from_ip(ip.parse().unwrap());
            assert_eq!(
                lpm_get_among(&m, &a, plens.iter().copied()),
                lpm_get(&m, &a, 128),
                "{ip}"
            );
        }
    }
}
