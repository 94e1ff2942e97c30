//! sqlite-replica: a loadable SQLite extension that turns stock SQLite processes into a
//! replication primary (capturing each committed WAL transaction into a replication log) or
//! replicas (applying those transactions into their own WAL).
//!
//! Module index (docs/ARCHITECTURE.md says how they fit together; docs/WAL.md, docs/FORMAT.md
//! and docs/SQL.md are the protocol, the formats and the user contract):
//! - `config`: the environment settings, read once into one struct.
//! - `entry`: the `sqlite3_replica_init` entry point (unsafe boundary).
//! - `ffi`: the host API table, the panic guard, safe wrappers (unsafe boundary).
//! - `sys`: thin safe wrappers over the few OS calls std does not offer (libc).
//! - `vfs`: the shim over the host's default VFS: trampolines and hooks (unsafe boundary).
//! - `primary`: the capture agent (T1/T2/T3 triggers, gap detection, snapshots).
//! - `replica`: the applier (bootstrap, batch apply into the replica's WAL, position, re-snapshot).
//! - `roles`: the per-database registry: attaches, resumes and detaches roles; the VFS hooks.
//! - `logging`: the event log (levels, file), one line per event.
//! - `transport`: record sources (`dir`, `http(s)`), the HTTP engine (`httpd`: one event loop per
//!   process) and the routes of a primary's log (`server`).
//! - `functions`: the `repl_*` SQL functions.
//! - `util`: small shared helpers (milliseconds, hex, random bytes).
//! - `types`: the domain newtypes (`Lsn`, `PageNo`, `FrameNo`, `PageSize`, `Generation`, `Checksum`).
//! - `wal`: WAL file and wal-index formats and algorithms (pure, no unsafe).
//! - `txlog`: the replication log: records, segments, snapshots, compaction (pure, no unsafe).
//! - `error`: the one error type and its SQLite-code table.
//!
//! The `sqlite-replica` binary (`src/bin/`) holds the offline tools and the standalone server.

pub mod config;
pub mod entry;
pub mod error;
pub(crate) mod failover;
pub(crate) mod ffi;
pub(crate) mod functions;
pub mod logging;
pub(crate) mod primary;
pub(crate) mod replica;
pub(crate) mod roles;
pub(crate) mod sys;
pub mod transport;
pub mod txlog;
pub mod types;
pub(crate) mod util;
/// Rate and ETA of a transfer (the CLI progress bar shares it with `repl_status()`).
pub use util::rate_eta;
pub(crate) mod vfs;
pub mod wal;
