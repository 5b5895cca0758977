//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, section 3.4).
//!
//! Every backend gets a permutation of the table's slots from two hashes of its name
//! (offset and skip); backends take turns claiming their next preferred free slot until
//! the table is full. The table depends only on the set of backend names and the table
//! size, so every node computes the same table, and removing one backend moves mostly
//! that backend's slots.

/// Whether `n` is prime (table sizes must be: the skip must be coprime with the size).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2u64;
    while i * i <= n as u64 {
        if (n as u64).is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

/// FNV-1a 64 with a seed folded in first: stable across builds and machines (unlike
/// std's hasher), which the "same table on every node" property needs.
fn hash(seed: u64, data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x100_0000_01b3);
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby names spread over the table.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds a table of `size` entries (a prime) over `backends` (names, in any order),
/// returning for each entry the index into `backends`. Empty when there are no backends.
pub fn table(backends: &[String], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} must be prime");
    if backends.is_empty() {
        return Vec::new();
    }
    // Iterate in name order so the result does not depend on the caller's order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|a, b| backends[*a].cmp(&backends[*b]));
    let m = size as u64;
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = backends[i].as_bytes();
            let offset = hash(0x6d61_676c, name) % m;
            let skip = hash(0x6576_7772, name) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'outer: loop {
        for (k, &i) in order.iter().enumerate() {
            let (offset, skip) = perms[k];
            let mut c = (offset + next[k] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[k] += 1;
                c = (offset + next[k] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[k] += 1;
            filled += 1;
            if filled == m {
                break 'outer;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 1))
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(1021) && is_prime(16381) && is_prime(2));
        assert!(!is_prime(1024) && !is_prime(1) && !is_prime(65535));
    }

    #[test]
    fn every_entry_is_filled_and_load_is_even() {
        let b = names(10);
        let t = table(&b, 1021);
        assert_eq!(t.len(), 1021);
        let mut counts = [0usize; 10];
        for e in &t {
            counts[*e as usize] += 1;
        }
        // The paper's bound: each backend gets within a few slots of M/N.
        for c in counts {
            assert!((99..=105).contains(&c), "uneven load: {counts:?}");
        }
    }

    #[test]
    fn independent_of_input_order() {
        let mut b = names(7);
        let t1: Vec<String> = table(&b, 251)
            .iter()
            .map(|i| b[*i as usize].clone())
            .collect();
        b.reverse();
        let t2: Vec<String> = table(&b, 251)
            .iter()
            .map(|i| b[*i as usize].clone())
            .collect();
        assert_eq!(t1, t2);
    }

    #[test]
    fn removing_a_backend_mostly_moves_only_its_slots() {
        let b = names(10);
        let before: Vec<String> = table(&b, 1021)
            .iter()
            .map(|i| b[*i as usize].clone())
            .collect();
        let gone = b[3].clone();
        let b2: Vec<String> = b.iter().filter(|n| **n != gone).cloned().collect();
        let after: Vec<String> = table(&b2, 1021)
            .iter()
            .map(|i| b2[*i as usize].clone())
            .collect();
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| **x != gone && x != y)
            .count();
        // Slots of surviving backends rarely move (the paper reports a few percent).
        assert!(
            moved_others < 1021 / 10,
            "{moved_others} slots of surviving backends moved"
        );
    }
}
