//! The one error type of the crate and its mapping to SQLite result codes (`Error::sqlite_code`,
//! one table, each row commented). Messages say what went wrong and what to do. Code that
//! decides something from an error matches a variant (`StaleHandle`, `OutOfSequence`,
//! `LogTruncated`, ...), never the text of a message.

use crate::types::Lsn;
use std::fmt;

/// The SQLite primary result codes this crate answers with (values from sqlite3.h).
pub mod code {
    pub const ERROR: i32 = 1;
    pub const BUSY: i32 = 5;
    pub const READONLY: i32 = 8;
    pub const IOERR: i32 = 10;
    pub const CORRUPT: i32 = 11;
}

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
    /// A log handle no longer describes the log's end (another writer appended, or a torn tail
    /// is pending): refresh it (`Log::refresh_for_append`) and retry.
    StaleHandle(String),
    /// A record does not continue the log (its LSN or generation breaks the sequence rules):
    /// the caller's view of the log is behind; refresh and retry.
    OutOfSequence(String),
    /// The source no longer holds the LSN asked for (HTTP 410); `first_lsn` is its oldest
    /// retained one when it said so: re-snapshot.
    LogTruncated {
        first_lsn: Option<Lsn>,
        message: String,
    },
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
            Error::Io { .. } => code::IOERR,      // our file I/O failed
            Error::Corrupt(_) => code::CORRUPT,   // bytes failed validation
            Error::Misuse(_) => code::ERROR, // bad argument (not SQLITE_MISUSE: that means API misuse)
            Error::ReadOnly(_) => code::READONLY, // write on a replica
            Error::Busy(_) => code::BUSY,    // try again
            Error::Unsupported(_) => code::ERROR, // configuration we refuse
            Error::Other(_) => code::ERROR,
            Error::Sql { code, .. } => *code, // whatever the database said (extended code)
            Error::StaleHandle(_) | Error::OutOfSequence(_) => code::ERROR, // retried inside
            Error::LogTruncated { .. } => code::ERROR, // answered with a re-snapshot
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
            | Error::Other(m)
            | Error::StaleHandle(m)
            | Error::OutOfSequence(m) => f.write_str(m),
            Error::Sql { message, .. } | Error::LogTruncated { message, .. } => {
                f.write_str(message)
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn codes_messages_and_source() {
        let io = Error::io("reading x", std::io::Error::other("boom"));
        assert_eq!(io.sqlite_code(), code::IOERR);
        assert_eq!(io.to_string(), "reading x: boom");
        assert_eq!(io.source().map(|s| s.to_string()).as_deref(), Some("boom"));
        assert!(Error::Corrupt("c".into()).source().is_none());
        assert_eq!(Error::OutOfSequence("o".into()).to_string(), "o");
        assert_eq!(Error::StaleHandle("s".into()).sqlite_code(), code::ERROR);
        let t = Error::LogTruncated {
            first_lsn: Some(Lsn(7)),
            message: "HTTP 410 first_lsn=7: gone".into(),
        };
        assert_eq!(t.to_string(), "HTTP 410 first_lsn=7: gone");
    }
}
