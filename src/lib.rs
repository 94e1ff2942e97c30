//! sqlite-replica: a loadable SQLite extension that turns stock SQLite processes into a
//! replication primary (capturing each committed WAL transaction into a replication log) or
//! replicas (applying those transactions into their own WAL).
//!
//! Module index (see docs/ARCHITECTURE.md):
//! - `config`: the environment settings, read once into one struct.
//! - `entry`: the `sqlite3_replica_init` entry point (unsafe boundary).
//! - `ffi`: the host API table, the panic guard, safe wrappers (unsafe boundary).
//! - `sys`: thin safe wrappers over the few OS calls std does not offer (libc).
//! - `vfs`: the shim over the host's default VFS: trampolines and hooks (unsafe boundary).
//! - `primary`: the capture agent (T1/T2/T3 triggers, gap detection, snapshots).
//! - `replica`: the applier (bootstrap, batch apply into the replica's WAL, position, re-snapshot).
//! - `roles`: the per-database registry: attaches, resumes and detaches roles; the VFS hooks.
//! - `transport`: record sources for replicas (`dir`: a primary's log directory).
//! - `functions`: the `repl_*` SQL functions.
//! - `util`: small shared helpers (milliseconds, hex, random bytes).
//! - `types`: the domain newtypes (`Lsn`, `PageNo`, `FrameNo`, `PageSize`, `Generation`, `Checksum`).
//! - `wal`: WAL file and wal-index formats (pure, no unsafe).
//! - `txlog`: the replication log: record/snapshot format, segments (pure, no unsafe).
//! - `error`: the one error type and its SQLite-code table.

pub mod config;
pub mod entry;
pub mod error;
pub(crate) mod ffi;
pub(crate) mod functions;
pub(crate) mod primary;
pub(crate) mod replica;
pub(crate) mod roles;
pub(crate) mod sys;
pub mod transport;
pub mod txlog;
pub mod types;
pub(crate) mod util;
pub(crate) mod vfs;
pub mod wal;
