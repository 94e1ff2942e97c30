//! Property test (WAL.md §G2) of the hash index: random appends, duplicates, block
//! boundaries, rolled-back writers, truncate-to(X) and re-append, checked against a model
//! (a plain `Vec` of page numbers, i.e. a linear scan of aPgno).
//!
//! Invariant checked: for every published prefix of frames and every window
//! `[min, max] ⊆ [1, published]`, `hash_lookup` equals the linear scan of the model, and every
//! aPgno entry for a published frame equals the model's page number.

use super::hash::*;
use super::shm::{ShmAccess, VecShm};

/// xorshift64* — small deterministic PRNG (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % (hi as u64 - lo as u64 + 1)) as u32
    }
    fn chance(&mut self, percent: u32) -> bool {
        self.range(1, 100) <= percent
    }
}

fn random_page(rng: &mut Rng) -> u32 {
    match rng.range(0, 9) {
        // Heavy duplicates from a small set.
        0..=5 => rng.range(1, 40),
        // Pages that collide with the small set (same hash, + k * 8192).
        6 => rng.range(1, 40) + 8192 * rng.range(1, 3),
        7 => rng.range(1, 5000),
        // Large page numbers (wrapping product in the hash).
        _ => rng.range(1, u32::MAX),
    }
}

fn model_lookup(model: &[u32], pgno: u32, min: u32, max: u32) -> Option<u32> {
    (min.max(1)..=max)
        .rev()
        .find(|&f| model[f as usize - 1] == pgno)
}

fn check(shm: &VecShm, model: &[u32], rng: &mut Rng, queries: u32) {
    let mx = model.len() as u32;
    for f in 1..=mx {
        let off = apgno_offset(f);
        let (k, o) = ((off / 32768) as u32, (off % 32768) as usize);
        assert_eq!(
            shm.read_u32(k, o),
            model[f as usize - 1],
            "aPgno of frame {f}"
        );
    }
    if mx == 0 {
        return;
    }
    for _ in 0..queries {
        let pgno = if rng.chance(80) {
            model[rng.range(1, mx) as usize - 1]
        } else {
            random_page(rng)
        };
        let (min, max) = if rng.chance(30) {
            (1, mx)
        } else {
            let a = rng.range(1, mx);
            let b = rng.range(1, mx);
            (a.min(b), a.max(b))
        };
        assert_eq!(
            hash_lookup_checked(shm, pgno, min, max).unwrap(),
            model_lookup(model, pgno, min, max),
            "page {pgno} in [{min}, {max}] with {mx} frames"
        );
    }
}

fn append(shm: &mut VecShm, model: &mut Vec<u32>, rng: &mut Rng, n: u32) {
    for _ in 0..n {
        let p = random_page(rng);
        let f = model.len() as u32 + 1;
        hash_insert(shm, f, p).unwrap();
        model.push(p);
    }
}

#[test]
fn hash_matches_linear_scan() {
    for seed in [1u64, 0x9e37_79b9_7f4a_7c15, 42] {
        let mut rng = Rng(seed);
        let mut shm = VecShm::new();
        let mut model: Vec<u32> = Vec::new();
        let mut rounds = 0;
        // Grow past 3 blocks (> 8159 frames) with truncations and rollbacks on the way.
        while model.len() < 13_000 || rounds < 40 {
            rounds += 1;
            let n = if rng.chance(20) {
                rng.range(500, 2500)
            } else {
                rng.range(1, 300)
            };
            append(&mut shm, &mut model, &mut rng, n);
            match rng.range(0, 9) {
                // Explicit truncate-to(X), then continue appending from X + 1.
                0 | 1 => {
                    let x = rng.range(0, model.len() as u32);
                    hash_truncate(&mut shm, x);
                    model.truncate(x as usize);
                }
                // A rolled-back writer leaves stale entries beyond the published frame;
                // the next append starts over at published + 1 without an explicit truncate.
                2 | 3 => {
                    let published = model.len();
                    let mut scratch = model.clone();
                    let n = rng.range(1, 600);
                    append(&mut shm, &mut scratch, &mut rng, n);
                    check(&shm, &model, &mut rng, 50);
                    model.truncate(published);
                }
                _ => {}
            }
            check(&shm, &model, &mut rng, 200);
        }
        assert!(
            shm.block_count() >= 4,
            "reached {} blocks",
            shm.block_count()
        );
        // Truncate back to exact block boundaries and re-append across them.
        for x in [8159u32, 8158, 4063, 4062, 1] {
            if (x as usize) <= model.len() {
                hash_truncate(&mut shm, x);
                model.truncate(x as usize);
                append(&mut shm, &mut model, &mut rng, 4200);
                check(&shm, &model, &mut rng, 500);
            }
        }
    }
}

#[test]
fn block_boundary_lookups() {
    // Same page in every frame: the latest in the window must win, across blocks.
    let mut shm = VecShm::new();
    let model: Vec<u32> = vec![7; 9000];
    for f in 1..=9000 {
        hash_insert(&mut shm, f, 7).unwrap_or_else(|e| panic!("frame {f}: {e}"));
    }
    for (min, max) in [
        (1, 4062),
        (1, 4063),
        (4062, 4062),
        (4063, 8158),
        (8158, 8159),
        (1, 9000),
    ] {
        assert_eq!(
            hash_lookup(&shm, 7, min, max),
            model_lookup(&model, 7, min, max)
        );
    }
    assert_eq!(hash_lookup(&shm, 7, 1, 9000), Some(9000));
    // Window entirely in an earlier block than the last entries.
    assert_eq!(hash_lookup(&shm, 7, 10, 20), Some(20));
}
