//! sqlite-replica: a loadable SQLite extension that turns stock SQLite processes into a
//! replication primary (capturing each committed WAL transaction into a replication log) or
//! replicas (applying those transactions into their own WAL).
//!
//! Module index (docs/ARCHITECTURE.md says how they fit together; docs/WAL.md, docs/FORMAT.md
//! and docs/SQL.md are the protocol, the formats and the user contract):
//! - `entry`: the `sqlite3_replica_init` entry point (unsafe boundary).
//! - `ffi`: the host API table, the panic guard, internal connections, OS calls (unsafe boundary).
//! - `vfs`: the shim over the default VFS: trampolines, capture hooks, guards (unsafe boundary).
//! - `registry`: per-process state of databases opened through the VFS (role, WRITE holders).
//! - `primary`: capture (T1/T2/T3, gaps, write intent), snapshots, retention, write forwarding.
//! - `replica`: the applier (bootstrap, batch apply, position, re-snapshot, drain) and follower.
//! - `transport`: record sources (`dir`, `http`), the HTTP server of a primary's log, wake-ups.
//! - `functions`: the `repl_*` SQL functions (thin adapters).
//! - `types`: the domain newtypes (`Lsn`, `PageNo`, `FrameNo`, `PageSize`, `Generation`, `Checksum`).
//! - `wal`: WAL file and wal-index formats and algorithms (pure, no unsafe).
//! - `txlog`: the replication log: records, segments, snapshots, compaction (pure, no unsafe).
//! - `error`: the one error type and its SQLite-code table.
//!
//! The `sqlite-replica` binary (`src/bin/`) holds the offline tools and the standalone server.

pub mod entry;
pub mod error;
pub(crate) mod ffi;
pub(crate) mod functions;
pub mod logging;
pub(crate) mod primary;
pub(crate) mod registry;
pub(crate) mod replica;
pub mod transport;
pub mod txlog;
pub mod types;
pub(crate) mod vfs;
pub mod wal;
