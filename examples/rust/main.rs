//! sqlite-replica from Rust (rusqlite): a primary that serves its log over HTTP and a replica
//! that follows it, in one program. Run from the repository root after `make build`:
//!
//!     cargo run --release --example rust-replica
//!
//! The extension is loaded once per process (through a throw-away connection); every
//! connection opened afterwards goes through its VFS and has the `repl_*` functions.

use rusqlite::Connection;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ext = std::env::var("REPLICA_EXT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("build/libreplica"));
    let boot = Connection::open_in_memory()?;
    // SAFETY: loading the extension this repository builds; nothing else uses `boot` meanwhile.
    unsafe {
        boot.load_extension_enable()?;
        boot.load_extension(&ext, None::<&str>)?;
    }
    let dir = tempfile::tempdir()?;

    // The primary: WAL mode, a replication log, and an HTTP server on a free port.
    let primary = Connection::open(dir.path().join("primary.db"))?;
    primary.query_row("SELECT repl_primary('127.0.0.1:0')", [], |r| {
        r.get::<_, i64>(0)
    })?;
    // Accept writes forwarded by replicas (repl_exec); off by default.
    primary.query_row("SELECT repl_config('exec', 1)", [], |r| r.get::<_, i64>(0))?;
    let url: String = primary.query_row(
        "SELECT json_extract(repl_status(), '$.server.url')",
        [],
        |r| r.get(0),
    )?;
    primary.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, text TEXT NOT NULL)")?;
    primary.execute(
        "INSERT INTO notes(text) VALUES (?1)",
        ["written on the primary"],
    )?;

    // A replica: a new file that bootstraps from the primary and then follows it.
    let replica = Connection::open(dir.path().join("replica.db"))?;
    let lsn: i64 = replica.query_row("SELECT repl_follow(?1)", [&url], |r| r.get(0))?;
    println!("replica bootstrapped from {url} at LSN {lsn}");

    // Write through the replica (forwarded to the primary), then read it back locally.
    let lsn: i64 = replica.query_row(
        "SELECT repl_exec('INSERT INTO notes(text) VALUES (?)', '[\"written through the replica\"]')",
        [],
        |r| r.get(0),
    )?;
    let mut stmt = replica.prepare("SELECT id, text FROM notes ORDER BY id")?;
    let notes: Vec<(i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    println!("after repl_exec (LSN {lsn}) the replica reads {notes:?}");

    // Both sides agree byte for byte: equal checksums at the same LSN.
    let (p_lsn, p_sum): (i64, String) =
        primary.query_row("SELECT repl_lsn(), repl_checksum()", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    replica.query_row("SELECT repl_wait(?1, 5000)", [p_lsn], |r| {
        r.get::<_, i64>(0)
    })?;
    let r_sum: String = replica.query_row("SELECT repl_checksum()", [], |r| r.get(0))?;
    println!("primary LSN {p_lsn} checksum {p_sum}; replica checksum {r_sum}");
    if r_sum != p_sum || notes.len() != 2 {
        return Err("the replica does not equal the primary".into());
    }
    // A local write on the replica is refused: writes go through repl_exec.
    let refused = replica.execute("INSERT INTO notes(text) VALUES ('local')", []);
    println!("a local write on the replica: {}", refused.unwrap_err());
    replica.query_row("SELECT repl_follow(NULL)", [], |r| r.get::<_, i64>(0))?;
    println!("ok");
    Ok(())
}
