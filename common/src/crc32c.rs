//! Incremental CRC32c (Castagnoli), for SCTP port translation.
//!
//! SCTP's checksum is a CRC32c over the whole packet (RFC 4960 appendix B), not a one's
//! complement sum, so a NAT cannot patch it per field the usual way, and recomputing it
//! over the packet in BPF costs a loop over every byte. CRC is affine in the message,
//! though: for equal-length messages, crc(M ^ D) = crc(M) ^ raw(D), where raw is the CRC
//! register with zero initial value and no final XOR. Translating ports changes only the
//! first four bytes, so raw(D) = raw(those 4 bytes) followed by L-4 zero bytes, which is
//! raw(4 bytes) multiplied by x^(8(L-4)) modulo the polynomial: O(log L) work, using the
//! same arithmetic as zlib's crc32_combine (multmodp, x2nmodp), in the reflected bit order
//! CRC32c uses.
//!
//! Everything here is `const`-friendly, branch-bounded code that the BPF verifier accepts
//! (fixed loop counts, no tables indexed by data).

/// CRC32c polynomial 0x1EDC6F41, bit-reflected.
pub const POLY: u32 = 0x82F6_3B78;

/// `v` if bit 0 of `x` is set, else zero, without a branch and without the
/// `(x << 63) s>> 63` mask idiom: this kernel's verifier forks a path at every such mask
/// (2^32 paths for one multiplication). A multiplication by the bit is tracked as one
/// path; `black_box` keeps LLVM from turning it back into the mask idiom.
#[inline(always)]
const fn sel(x: u32, v: u32) -> u32 {
    v.wrapping_mul(core::hint::black_box(x & 1))
}

/// One step of the reflected CRC register over a zero bit.
#[inline(always)]
const fn step(b: u32) -> u32 {
    (b >> 1) ^ sel(b, POLY)
}

/// Repeats `$body` with `$i` bound to 0..32 (or 0..8), unrolled in the source: the BPF
/// verifier lost track of a loop counter here and walked the loop as unbounded.
macro_rules! unroll {
    ($i:ident in 32 => $body:block) => {
        unroll!(@ $i $body 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31)
    };
    ($i:ident in 8 => $body:block) => {
        unroll!(@ $i $body 0 1 2 3 4 5 6 7)
    };
    (@ $i:ident $body:block $($n:literal)*) => {
        $({
            let $i: u32 = $n;
            $body
        })*
    };
}

/// a * b modulo POLY, both polynomials in reflected order (x^0 is the top bit).
#[inline(always)]
#[allow(
    unused_assignments,
    reason = "the unrolled loop's last step of `b` is not read"
)]
pub const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut p = 0u32;
    unroll!(i in 32 => {
        p ^= sel(a >> (31 - i), b);
        b = step(b);
    });
    p
}

const fn x2n_table() -> [u32; 32] {
    let mut t = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    t[0] = p;
    let mut n = 1;
    while n < 32 {
        p = multmodp(p, p);
        t[n] = p;
        n += 1;
    }
    t
}

/// x^(2^k) mod POLY for k = 0..32.
pub const X2N: [u32; 32] = x2n_table();

/// x^(8 * n) mod POLY: the operator that runs a CRC register over `n` zero bytes.
/// `n` < 2^16 (an IP packet).
#[inline(always)]
pub fn x8nmodp(n: u32) -> u32 {
    let mut p = 1u32 << 31; // x^0
    let mut k = 0;
    while k < 16 {
        let bit = (n >> k) & 1;
        p = sel(bit, multmodp(X2N[(k + 3) as usize & 31], p)) ^ sel(bit ^ 1, p);
        k += 1;
    }
    p
}

/// The CRC register after `bytes`, from `s` (no initial or final XOR).
#[inline(always)]
pub fn raw4(mut s: u32, bytes: [u8; 4]) -> u32 {
    s ^= bytes[0] as u32;
    unroll!(_j in 8 => { s = step(s); });
    s ^= bytes[1] as u32;
    unroll!(_j in 8 => { s = step(s); });
    s ^= bytes[2] as u32;
    unroll!(_j in 8 => { s = step(s); });
    s ^= bytes[3] as u32;
    unroll!(_j in 8 => { s = step(s); });
    s
}

/// The CRC32c of a `len`-byte message whose first four bytes were XORed with `diff`,
/// given the old CRC.
#[inline(always)]
pub fn adjust_prefix(crc: u32, diff: [u8; 4], len: u32) -> u32 {
    adjust_prefix_with(crc, diff, x8nmodp(len.saturating_sub(4)))
}

/// [`adjust_prefix`] with `shift` = `x8nmodp(len - 4)` looked up instead of computed (the
/// datapath reads it from the `CRC32C_SHIFT` map).
#[inline(always)]
pub fn adjust_prefix_with(crc: u32, diff: [u8; 4], shift: u32) -> u32 {
    crc ^ multmodp(shift, raw4(0, diff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn crc32c(data: &[u8]) -> u32 {
        !data.iter().fold(!0u32, |s, b| raw4_byte(s, *b))
    }

    fn raw4_byte(mut s: u32, b: u8) -> u32 {
        s ^= b as u32;
        for _ in 0..8 {
            s = if s & 1 != 0 { (s >> 1) ^ POLY } else { s >> 1 };
        }
        s
    }

    #[test]
    fn known_vector() {
        // RFC 3720 B.4: 32 bytes of 0xff.
        assert_eq!(crc32c(&[0xff; 32]), 0x62a8_ab43);
    }

    #[test]
    fn adjusting_the_prefix_equals_recomputing() {
        let mut seed = 0x1234_5678u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in [4usize, 5, 12, 13, 64, 100, 1480, 9000, 65000] {
            let mut m: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            let old = crc32c(&m);
            let new_prefix = rnd().to_le_bytes();
            let diff = [
                m[0] ^ new_prefix[0],
                m[1] ^ new_prefix[1],
                m[2] ^ new_prefix[2],
                m[3] ^ new_prefix[3],
            ];
            m[..4].copy_from_slice(&new_prefix);
            assert_eq!(
                adjust_prefix(old, diff, len as u32),
                crc32c(&m),
                "len {len}"
            );
        }
    }
}
