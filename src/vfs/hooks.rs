//! What the shim asks of the layer above it, without knowing any role: the per-database
//! hooks (`DbHooks`) behind every main-database and WAL file it opens, found through the one
//! process-wide `Hooks` object installed at load time. The replication roles implement them
//! (`roles`); the shim only forwards what SQLite does at the points they care about.

use crate::error::Result;
use std::any::Any;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// What capture needs from a database file handle (a connection's, or the agent's).
pub trait DbFileIo {
    /// The first 136 bytes of the wal-index (header copies + checkpoint info), if mapped.
    fn shm_head(&self) -> Option<[u8; 136]>;
    /// Read database-file bytes at `offset`; zero-fills past EOF.
    fn read_db(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// Which guards the shim applies to a database (the role attached to it, if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleKind {
    None,
    /// WAL writes need the WRITE lock taken through the shim; capture runs at WRITE.
    Primary,
    /// Read-only: WRITE is refused while the wal-index header is valid, WAL writes too.
    Replica,
}

/// What the write-lock hook established for the connection that now holds WRITE, handed back
/// to the unlock hook of the same connection.
#[derive(Clone, Copy, Debug)]
pub struct Witness {
    /// After the lock hook ran, every committed frame was captured (position == header).
    pub caught_up: bool,
    /// The write must not go ahead (the primary's log cannot take it: disk full): the shim
    /// releases WRITE at once and the writer gets SQLITE_FULL, before it writes anything.
    pub refuse: bool,
    /// The wal-index header's iChange when the lock hook ran (it counts commits).
    pub change: u32,
    /// The lock hook took the fast path (memory only); the unlock hook may too.
    pub fast: bool,
}

/// Bookkeeping the shim keeps per database across the connections of this process.
#[derive(Default)]
pub struct WalCounters {
    /// Connections of this process that hold the WAL WRITE lock through the shim (0 or 1).
    pub write_holders: AtomicU32,
    /// Incremented before every WAL write made through the shim in this process.
    pub wal_write_seq: AtomicU64,
    /// The highest `wal_write_seq` known to be covered by a completed WAL sync.
    pub wal_synced_seq: AtomicU64,
}

impl WalCounters {
    /// True when all WAL writes made through this process are covered by a sync.
    pub fn wal_synced(&self) -> bool {
        self.wal_synced_seq.load(Ordering::Acquire) >= self.wal_write_seq.load(Ordering::Acquire)
    }
}

/// The per-database object behind a file opened through the shim.
pub trait DbHooks: Send + Sync {
    /// The database path SQLite gave the VFS.
    fn path(&self) -> &str;
    fn counters(&self) -> &WalCounters;
    fn role(&self) -> RoleKind;
    /// Writes are refused with SQLITE_READONLY (the WAL write lock, WAL writes): a replica,
    /// or a primary that learned it was deposed (a newer epoch exists; it stays a primary for
    /// everything else, e.g. the restart hook).
    fn read_only(&self) -> bool {
        self.role() == RoleKind::Replica
    }
    /// A connection's main-database file is closing.
    fn main_closing(&self);
    /// A connection's main-database file was closed (after the underlying xClose): the last
    /// one of this process ends the database's role (see `roles`).
    fn main_closed(&self);
    /// `PRAGMA name = value` on a main database: `Some(message)` refuses it.
    fn pragma_veto(&self, name: &str, value: Option<&str>) -> Option<String>;
    /// The connection behind `io` just took the WAL WRITE lock.
    fn write_locked(&self, io: &dyn DbFileIo) -> Option<Witness>;
    /// The connection behind `io` is about to release WRITE (`wal_synced`: every WAL write of
    /// this process has been synced).
    /// Returns the LSN this session committed, if it committed one.
    fn write_unlocking(
        &self,
        io: &dyn DbFileIo,
        w: Option<Witness>,
        wal_synced: bool,
    ) -> Option<u64>;
    /// WRITE was released after a session that committed `lsn`: synchronous replication may
    /// wait here (other writers go on).
    fn write_released(&self, _lsn: u64) {}
    /// A connection holding WRITE asks for READ1..READ4 exclusively: it is about to restart
    /// or truncate the WAL, which overwrites its frames. `false` refuses (the shim answers
    /// SQLITE_BUSY: SQLite then appends to the WAL instead of restarting it, or reports the
    /// checkpoint busy).
    fn wal_restarting(&self) -> bool {
        true
    }
    /// A background job of this process may hold the WAL WRITE lock for a moment: a busy
    /// WRITE request of an application connection is retried (bounded) instead of failing.
    fn background_may_hold_write(&self) -> bool {
        false
    }
    /// A connection that just committed asks for the checkpoint lock (SQLite's automatic
    /// checkpoint) while the WAL holds `mx_frame` frames. `true` hands the checkpoint to a
    /// background job: the shim answers SQLITE_BUSY, which SQLite's automatic checkpoint
    /// ignores (as it does when another connection is checkpointing).
    fn checkpoint_handoff(&self, _mx_frame: u32) -> bool {
        false
    }
    /// True when the main database file must read as empty (size 0) to SQLite connections:
    /// a replica's interrupted bootstrap holds pages of an unfinished snapshot in it, page 1
    /// not written yet (WAL.md §E.1). Asked only when the file is not empty.
    fn shows_empty(&self) -> bool {
        false
    }
    /// For the layer above, which knows the concrete type.
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

/// The process-wide lookup of per-database hooks.
pub trait Hooks: Send + Sync {
    /// A main database file was opened: its entry (created on first use; may resume a role).
    fn open_main(&self, path: &str) -> Arc<dyn DbHooks>;
    /// The entry for `path`, if one exists (a WAL file's database).
    fn lookup(&self, path: &str) -> Option<Arc<dyn DbHooks>>;
}

static HOOKS: OnceLock<&'static dyn Hooks> = OnceLock::new();

/// Install the hooks (once per process; later calls keep the first).
pub fn set_hooks(h: &'static dyn Hooks) {
    let _ = HOOKS.set(h);
}

pub(super) fn hooks() -> Option<&'static dyn Hooks> {
    HOOKS.get().copied()
}
