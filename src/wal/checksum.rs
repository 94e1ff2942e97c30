//! The WAL checksum (WAL.md §A.3): a pair of u32 accumulators extended over 32-bit words.
//!
//! Owns: `CksumPair`, `cksum_extend`, `native_is_big_endian`.
//!
//! Invariants:
//! - Input lengths are multiples of 8 bytes (a pair of words); callers pass fixed-size headers
//!   and whole pages (multiples of 512), so a violation is a programming error and panics.
//! - The word order is chosen by the caller: from the WAL magic for the WAL file (`…83` = BE,
//!   `…82` = LE), always *native* for the wal-index header checksum.
//! - All arithmetic wraps modulo 2^32; s2 uses the freshly updated s1.

/// Checksum state (s1, s2).
pub type CksumPair = (u32, u32);

/// Extend checksum state over `bytes` (length a multiple of 8). `big_endian` selects the word
/// decode order (true: each 4-byte word is read big-endian; false: little-endian).
pub fn cksum_extend(state: CksumPair, bytes: &[u8], big_endian: bool) -> CksumPair {
    assert!(
        bytes.len().is_multiple_of(8),
        "cksum_extend: input length {} is not a multiple of 8",
        bytes.len()
    );
    // One monomorphic loop per word order: a decode chosen through a function pointer is not
    // inlined (an indirect call per word; this runs over every captured page).
    if big_endian {
        extend_with(state, bytes, u32::from_be_bytes)
    } else {
        extend_with(state, bytes, u32::from_le_bytes)
    }
}

#[inline(always)]
fn extend_with(state: CksumPair, bytes: &[u8], decode: impl Fn([u8; 4]) -> u32) -> CksumPair {
    let (mut s1, mut s2) = state;
    for pair in bytes.chunks_exact(8) {
        let x0 = decode([pair[0], pair[1], pair[2], pair[3]]);
        let x1 = decode([pair[4], pair[5], pair[6], pair[7]]);
        s1 = s1.wrapping_add(x0).wrapping_add(s2);
        s2 = s2.wrapping_add(x1).wrapping_add(s1);
    }
    (s1, s2)
}

/// True when the host CPU is big-endian (the wal-index uses native byte order).
pub fn native_is_big_endian() -> bool {
    cfg!(target_endian = "big")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_keeps_state() {
        assert_eq!(cksum_extend((5, 7), &[], false), (5, 7));
    }

    #[test]
    fn uses_new_s1_for_s2() {
        // words LE: x0 = 1, x1 = 2 -> s1 = 0+1+0 = 1, s2 = 0+2+1 = 3
        let b = [1, 0, 0, 0, 2, 0, 0, 0];
        assert_eq!(cksum_extend((0, 0), &b, false), (1, 3));
        // same bytes read BE: x0 = 0x01000000, x1 = 0x02000000
        assert_eq!(cksum_extend((0, 0), &b, true), (0x0100_0000, 0x0300_0000));
    }

    #[test]
    fn wraps_modulo_2_32() {
        let b = [0xff; 8];
        let (s1, s2) = cksum_extend((1, 1), &b, true);
        assert_eq!(s1, 1u32.wrapping_add(0xffff_ffff).wrapping_add(1));
        assert_eq!(s2, 1u32.wrapping_add(0xffff_ffff).wrapping_add(s1));
    }

    #[test]
    #[should_panic]
    fn rejects_odd_length() {
        cksum_extend((0, 0), &[0; 12], false);
    }
}
