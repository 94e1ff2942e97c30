//! The wal-index lock slots (WAL.md §C.2) and the one lock operation the applier needs on
//! them. The live implementation (`xShmLock` through the agent handle) lives with the VFS;
//! `VecShm`-based tests implement it in memory.

/// WAL lock slots (WAL.md §C.2).
pub const SLOT_WRITE: u32 = 0;
pub const SLOT_READ1: u32 = 4;

/// Exclusive try-locks on WAL lock slots (the applier only ever needs exclusive ones).
pub trait WalLocks {
    fn try_lock_exclusive(&mut self, ofst: u32, n: u32) -> bool;
    fn unlock_exclusive(&mut self, ofst: u32, n: u32);
}
