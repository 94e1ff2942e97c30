//! Object storage (issue 17, FORMAT.md §9): a primary's log backed up to an S3-compatible
//! bucket, and the bucket read back as a source (replicas, `restore`, `verify`).
//!
//! - `client`: `s3://bucket/prefix` parsed, AWS credentials from the environment, SigV4 by
//!   rusty-s3 (sans-IO) over the blocking ureq client: GET, (conditional) PUT, DELETE;
//! - `manifest`: the one mutable object, pure: encoding, lookups, the chain rule, retention;
//! - `crypt`: optional client-side encryption (XChaCha20-Poly1305, key from the environment);
//! - `upload`: one uploader pass over a log directory (snapshot base, chunks, conditional
//!   manifest write) and the status file `backup.json`;
//! - `source`: `BucketSource`, the `Source` of a bucket prefix, and the whole-chain verify.

mod client;
pub mod crypt;
pub mod manifest;
pub mod source;
pub mod upload;

pub use client::{Cond, Target};
pub use source::BucketSource;
pub use upload::{configured_target, read_status, set_target, settings, uploaded_lsn, Uploader};
