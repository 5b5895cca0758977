//! Stable numbering: a hash that never changes between builds or runs (FNV-1a, not std's
//! `DefaultHasher`, whose output may change with the Rust version), probing for a free
//! number, and a dense allocator for rule ids.

use std::collections::{BTreeMap, BTreeSet};

use weir_common::policy::ID_FIRST_DYNAMIC;

/// 64-bit FNV-1a over structured input. Every variable-length item is length-prefixed,
/// so different inputs cannot run together into the same byte stream.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for x in b {
            self.0 ^= *x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    pub fn u8(&mut self, x: u8) -> &mut Self {
        self.bytes(&[x])
    }

    pub fn u16(&mut self, x: u16) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }

    pub fn u32(&mut self, x: u32) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }

    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u32(s.len() as u32).bytes(s.as_bytes())
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The first number at or after the one `hash` prefers, in
/// `[ID_FIRST_DYNAMIC, u32::MAX]`, that `ok` accepts (wrapping once). None when every
/// number is refused.
pub fn probe(hash: u64, mut ok: impl FnMut(u32) -> bool) -> Option<u32> {
    let span = (u32::MAX - ID_FIRST_DYNAMIC) as u64 + 1;
    let start = (hash % span) as u32 + ID_FIRST_DYNAMIC;
    let mut id = start;
    loop {
        if ok(id) {
            return Some(id);
        }
        id = if id == u32::MAX {
            ID_FIRST_DYNAMIC
        } else {
            id + 1
        };
        if id == start {
            return None;
        }
    }
}

/// The number `hash` prefers (what [`probe`] tries first).
pub fn preferred(hash: u64) -> u32 {
    probe(hash, |_| true).expect("some id")
}

/// Dense ids `1..max` for keys, kept for as long as the key is in use, reused only after
/// being free for a while (the search starts from a moving hint), seeded from the maps
/// after a restart.
#[derive(Debug, Clone)]
pub struct DenseIds<K: Ord> {
    by_key: BTreeMap<K, u32>,
    used: BTreeSet<u32>,
    next: u32,
    /// Ids must stay below this (the capacity of the map they index).
    pub max: u32,
}

impl<K: Ord + Clone> DenseIds<K> {
    pub fn new(max: u32) -> Self {
        Self {
            by_key: BTreeMap::new(),
            used: BTreeSet::new(),
            next: 1,
            max,
        }
    }

    pub fn get(&self, k: &K) -> Option<u32> {
        self.by_key.get(k).copied()
    }

    /// The id of `k`, allocating one if needed; None when all `1..max` are in use.
    pub fn get_or_alloc(&mut self, k: &K) -> Option<u32> {
        if let Some(id) = self.by_key.get(k) {
            return Some(*id);
        }
        if self.max <= 1 {
            return None;
        }
        let start = self.next.clamp(1, self.max - 1);
        let mut id = start;
        while self.used.contains(&id) {
            id = if id + 1 >= self.max { 1 } else { id + 1 };
            if id == start {
                return None;
            }
        }
        self.used.insert(id);
        self.by_key.insert(k.clone(), id);
        self.next = id + 1;
        Some(id)
    }

    pub fn seed(&mut self, k: K, id: u32) {
        if id == 0 || id >= self.max || self.used.contains(&id) || self.by_key.contains_key(&k) {
            return;
        }
        self.used.insert(id);
        self.by_key.insert(k, id);
        self.next = self.next.max(id + 1);
    }

    /// Frees every id whose key `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let gone: Vec<K> = self.by_key.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            if let Some(id) = self.by_key.remove(&k) {
                self.used.remove(&id);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, u32)> {
        self.by_key.iter().map(|(k, v)| (k, *v))
    }
}

/// Cuts the inclusive port range `lo..=hi` into the fewest aligned blocks, each as
/// (first port, prefix length in bits of the 16-bit port): what an LPM key can express.
/// At most 30 blocks (2 per bit level).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut cur, hi) = (lo as u32, hi as u32);
    while cur <= hi {
        // The largest block that starts at `cur` (aligned) and ends within the range.
        let mut k = if cur == 0 {
            16
        } else {
            cur.trailing_zeros().min(16)
        };
        while cur + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((cur as u16, 16 - k));
        cur += 1 << k;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_is_fixed() {
        // Identity numbers are derived from it and must survive rebuilds: the published
        // FNV-1a 64 test vector for "a".
        assert_eq!(Fnv::default().bytes(b"a").finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn probe_skips_refused_and_stays_in_range() {
        let first = preferred(42);
        assert!(first >= ID_FIRST_DYNAMIC);
        assert_eq!(probe(42, |id| id != first), Some(first + 1));
        assert_eq!(
            probe(u32::MAX as u64 - ID_FIRST_DYNAMIC as u64, |id| id
                != u32::MAX),
            Some(ID_FIRST_DYNAMIC)
        );
    }

    #[test]
    fn dense_ids_are_stable_and_bounded() {
        let mut ids = DenseIds::new(4);
        assert_eq!(ids.get_or_alloc(&"a"), Some(1));
        assert_eq!(ids.get_or_alloc(&"b"), Some(2));
        assert_eq!(ids.get_or_alloc(&"a"), Some(1));
        assert_eq!(ids.get_or_alloc(&"c"), Some(3));
        assert_eq!(ids.get_or_alloc(&"d"), None);
        ids.retain(|k| *k != "b");
        assert_eq!(ids.get_or_alloc(&"d"), Some(2));
        let mut seeded = DenseIds::new(10);
        seeded.seed("x", 7);
        assert_eq!(seeded.get_or_alloc(&"x"), Some(7));
        assert_eq!(seeded.get_or_alloc(&"y"), Some(8));
    }

    #[test]
    fn whole_and_single_port_ranges() {
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
        assert_eq!(port_prefixes(8000, 8007), vec![(8000, 13)]);
        assert_eq!(port_prefixes(1, 65535).len(), 16);
        assert!(port_prefixes(1, 65534).len() <= 30);
    }

    proptest! {
        /// Every port of the range is in exactly one block, and no other port is in any.
        #[test]
        fn port_prefixes_cover_the_range_exactly(a in any::<u16>(), b in any::<u16>(), probe_port in any::<u16>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = port_prefixes(lo, hi);
            prop_assert!(blocks.len() <= 30);
            let covering = |p: u16| blocks.iter().filter(|(start, plen)| {
                let mask = if *plen == 0 { 0 } else { u16::MAX << (16 - plen) };
                p & mask == *start && start & !mask == 0
            }).count();
            for p in [lo, hi, probe_port, lo.saturating_sub(1), hi.saturating_add(1)] {
                let inside = (lo..=hi).contains(&p);
                prop_assert_eq!(covering(p), usize::from(inside), "port {} range {}-{} blocks {:?}", p, lo, hi, blocks);
            }
        }
    }
}
