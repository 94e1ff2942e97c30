//! Small helpers used across layers: wall-clock milliseconds, hex encoding, random bytes.
//! Pure std, no state.

#![forbid(unsafe_code)]

use std::io::Read;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Lowercase hex digits of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The bytes of an even-length hex string (either case); None if it is not one.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Fill `buf` from `/dev/urandom`. On error `buf` may be partly filled; callers decide
/// whether that matters (ids and salts only need to differ, a lineage id must be random).
pub fn urandom(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abFF"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        let mut b = [0u8; 32];
        urandom(&mut b).unwrap();
        assert_ne!(b, [0u8; 32]);
    }
}

/// Transfer rate and time left of a download: `done` of `total` bytes, of which `base` were
/// already there when it started `elapsed_ms` ago (a resumed bootstrap starts past 0).
/// Returns (bytes per second, ETA in ms): the rate is 0 and the ETA `None` until some bytes
/// moved and some time passed; the ETA is 0 once `done` reaches `total`.
pub fn rate_eta(done: u64, base: u64, total: u64, elapsed_ms: u64) -> (u64, Option<u64>) {
    let moved = done.saturating_sub(base) as u128;
    let rate = if elapsed_ms == 0 {
        0
    } else {
        (moved * 1000 / elapsed_ms as u128).min(u64::MAX as u128) as u64
    };
    let eta = if done >= total {
        Some(0)
    } else if rate == 0 {
        None
    } else {
        Some(((total - done) as u128 * 1000 / rate as u128).min(u64::MAX as u128) as u64)
    };
    (rate, eta)
}

#[cfg(test)]
mod rate_tests {
    use super::rate_eta;

    #[test]
    fn rate_and_eta() {
        // 10 MiB in 2 s: 5 MiB/s, 30 MiB left: 6 s.
        assert_eq!(rate_eta(10 << 20, 0, 40 << 20, 2000), (5 << 20, Some(6000)));
        // Resumed at 20 MiB: only what moved counts.
        assert_eq!(
            rate_eta(30 << 20, 20 << 20, 40 << 20, 1000),
            (10 << 20, Some(1000))
        );
        // Nothing moved or no time yet: no rate, no ETA.
        assert_eq!(rate_eta(5, 5, 10, 1000), (0, None));
        assert_eq!(rate_eta(5, 0, 10, 0), (0, None));
        // Done.
        assert_eq!(rate_eta(10, 0, 10, 500).1, Some(0));
        // Huge numbers do not overflow.
        assert_eq!(rate_eta(u64::MAX - 1, 0, u64::MAX, 1).1, Some(0));
    }
}
