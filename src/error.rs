//! The one error type of the crate and its mapping to SQLite result codes (`Error::sqlite_code`,
//! one table, each row commented). Messages say what went wrong and what to do.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// An I/O error on one of our own files (log segments, snapshots, WAL reads).
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Bytes on disk or on the wire failed validation (bad magic, checksum, truncated).
    Corrupt(String),
    /// The caller asked for something invalid (bad argument, wrong database kind).
    Misuse(String),
    /// The database is a replica (or otherwise read-only) and a write was attempted.
    ReadOnly(String),
    /// A lock could not be taken right now; retrying later may succeed.
    Busy(String),
    /// The operation needs a newer SQLite or an unsupported configuration.
    Unsupported(String),
    /// Anything else; the message says what.
    Other(String),
    /// An SQL error reported by a database (e.g. the primary running a forwarded write), with
    /// its SQLite extended result code.
    Sql { code: i32, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The SQLite primary result code for this error. ONE table:
    pub fn sqlite_code(&self) -> i32 {
        match self {
            Error::Io { .. } => 10,           // SQLITE_IOERR: our file I/O failed
            Error::Corrupt(_) => 11,          // SQLITE_CORRUPT: bytes failed validation
            Error::Misuse(_) => 1, // SQLITE_ERROR: bad argument (not SQLITE_MISUSE: that means API misuse)
            Error::ReadOnly(_) => 8, // SQLITE_READONLY: write on a replica
            Error::Busy(_) => 5,   // SQLITE_BUSY: try again
            Error::Unsupported(_) => 1, // SQLITE_ERROR: configuration we refuse
            Error::Other(_) => 1,  // SQLITE_ERROR
            Error::Sql { code, .. } => *code, // whatever the database said (extended code)
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Corrupt(m)
            | Error::Misuse(m)
            | Error::ReadOnly(m)
            | Error::Busy(m)
            | Error::Unsupported(m)
            | Error::Other(m) => f.write_str(m),
            Error::Sql { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}
