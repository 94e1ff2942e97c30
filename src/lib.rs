//! sqlite-replica: a loadable SQLite extension that turns stock SQLite processes into a
//! replication primary (capturing each committed WAL transaction into a replication log) or
//! replicas (applying those transactions into their own WAL).
//!
//! Module index (see docs/ARCHITECTURE.md):
//! - `types`: the domain newtypes (`Lsn`, `PageNo`, `FrameNo`, `PageSize`, `Generation`, `Checksum`).
//! - `wal`: WAL file and wal-index formats (pure, no unsafe).
//! - `txlog`: the replication log: record/snapshot format, segments (pure, no unsafe).
//! - `error`: the one error type and its SQLite-code table.

pub mod error;
pub mod txlog;
pub mod types;
pub mod wal;
