//! Small helpers used across layers: wall-clock milliseconds, hex encoding, random bytes, and
//! per-thread scratch buffers. Pure std; the only state is the scratch buffers.

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

/// Which per-thread scratch buffer (`take_scratch`): one for each use that can be live at once.
#[derive(Clone, Copy, Debug)]
pub enum Scratch {
    /// WAL bytes read ahead by an append pass.
    WalRead = 0,
    /// Encoded records of one batched log append.
    LogBatch = 1,
}

/// Scratch buffers larger than this are not kept (a thread that once appended a huge batch
/// does not hold its memory for good).
const SCRATCH_KEEP: usize = 1 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<[Vec<u8>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// This thread's scratch buffer `which`, emptied (length 0, capacity kept): an append pass
/// reuses the same memory every time instead of allocating, zeroing and freeing (and, for
/// large buffers, mapping and unmapping) per pass. A buffer taken twice without `put_scratch`
/// in between is simply a new one.
pub fn take_scratch(which: Scratch) -> Vec<u8> {
    let mut v = SCRATCH
        .try_with(|s| {
            s.try_borrow_mut()
                .map(|mut a| std::mem::take(&mut a[which as usize]))
                .ok()
        })
        .ok()
        .flatten()
        .unwrap_or_default();
    v.clear();
    v
}

/// Gives a buffer from `take_scratch` back for the next use on this thread (dropped if large).
pub fn put_scratch(which: Scratch, v: Vec<u8>) {
    if v.capacity() <= SCRATCH_KEEP {
        let _ = SCRATCH.try_with(|s| {
            if let Ok(mut a) = s.try_borrow_mut() {
                a[which as usize] = v;
            }
        });
    }
}
