//! Unit tests of the replication log: `support` holds a byte-level model of the database that
//! produces records and expected file bytes; `codec` covers the formats and every rejection path;
//! `log` the segment handling (rolling, torn tails, readers, retention, snapshots, watermark);
//! `rebuild` rebuild and verify against the model; `compress` compressed records (FORMAT.md §3.7).

mod codec;
mod compress;
mod log;
mod rebuild;
mod support;
