//! The extension loaded into a Rust host: rusqlite 0.41 with its bundled SQLite (3.54.x here,
//! a different library from Debian's `sqlite3` 3.40.1 and from apsw's).
//!
//! What is checked, through the built `libreplica.so` only (this file never links the crate):
//! - `load_extension` registers the `replica` VFS as the default, so a connection opened
//!   afterwards goes through it and has every `repl_*` function of docs/SQL.md;
//! - `repl_primary()` makes a temp-file database a primary, and every commit (autocommit
//!   statement or explicit transaction) advances `repl_lsn()` by exactly one;
//! - `repl_role()`, `repl_checksum()` (16 lowercase hex digits) and `repl_status()` (JSON with
//!   `role` = "primary" and `lsn` = `repl_lsn()`) agree;
//! - naming the VFS explicitly (`Connection::open_with_flags_and_vfs(.., "replica")`) works,
//!   and naming the stock `unix` VFS bypasses the shim, which `repl_primary()` refuses.
//!
//! The extension is loaded once per process (it stays loaded: the entry point returns
//! SQLITE_OK_LOAD_PERMANENTLY); the tests of this file share that process and run in parallel,
//! each on its own temp directory.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rusqlite::{Connection, OpenFlags};

type TestResult = Result<(), Box<dyn Error>>;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

// `_` is a LIKE wildcard ('repl_%' also matches 'replace'), so compare the prefix instead.
const REPL_FUNCTIONS_SQL: &str =
    "SELECT DISTINCT name FROM pragma_function_list WHERE substr(name, 1, 5) = 'repl_'";

/// Where the built extension is, in order of preference:
/// 1. `build/libreplica.so` (what `make build` installs, and what the Python tests load);
/// 2. `target/<profile>/libreplica.so` of the profile this test was built with (`cargo test
///    --release` builds the cdylib of this crate together with its rlib), then the other one.
fn extension_path() -> PathBuf {
    let root = Path::new(MANIFEST_DIR);
    let (this, other) = if cfg!(debug_assertions) {
        ("debug", "release")
    } else {
        ("release", "debug")
    };
    let candidates = [
        root.join("build/libreplica.so"),
        root.join("target").join(this).join("libreplica.so"),
        root.join("target").join(other).join("libreplica.so"),
    ];
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.clone(),
        None => panic!(
            "the extension is not built: none of {} exists; run `make build` (in {MANIFEST_DIR}) \
             and then the tests again",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Loads the extension into this process once (through a throw-away `:memory:` connection)
/// and returns the path that was loaded. Every connection opened afterwards goes through the
/// `replica` VFS and has the `repl_*` functions.
fn load_extension() -> &'static Path {
    static LOADED: OnceLock<PathBuf> = OnceLock::new();
    LOADED.get_or_init(|| {
        let path = extension_path();
        let boot = Connection::open_in_memory().expect("open :memory:");
        // SAFETY: loading a trusted extension that this repository builds; nothing else runs
        // SQL on `boot` meanwhile.
        let loaded = unsafe {
            boot.load_extension_enable()
                .and_then(|()| boot.load_extension(&path, None::<&str>))
        };
        if let Err(e) = loaded {
            panic!(
                "loading {} into rusqlite's bundled SQLite failed: {e}; \
                 if it is stale, run `make build`",
                path.display()
            );
        }
        path
    })
}

fn lsn(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT repl_lsn()", [], |r| r.get(0))
}

fn role(conn: &Connection) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT repl_role()", [], |r| r.get(0))
}

fn status(conn: &Connection) -> Result<serde_json::Value, Box<dyn Error>> {
    let text: String = conn.query_row("SELECT repl_status()", [], |r| r.get(0))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("repl_status() is not JSON ({e}): {text}"))?;
    assert!(
        value.is_object(),
        "repl_status() is not a JSON object: {text}"
    );
    Ok(value)
}

fn assert_checksum(conn: &Connection) -> Result<String, Box<dyn Error>> {
    let sum: Option<String> = conn.query_row("SELECT repl_checksum()", [], |r| r.get(0))?;
    let sum = sum.ok_or("repl_checksum() is NULL on a primary")?;
    assert!(
        sum.len() == 16 && sum.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "repl_checksum() is not 16 lowercase hex digits: {sum:?}"
    );
    Ok(sum)
}

/// Names from the `## repl_xxx(...)` headings of docs/SQL.md, in order.
fn documented_functions() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("docs/SQL.md"))
        .expect("read docs/SQL.md");
    text.lines()
        .filter_map(|line| line.strip_prefix("## "))
        .filter(|h| h.starts_with("repl_"))
        .filter_map(|h| h.split_once('(').map(|(name, _)| name.to_string()))
        .collect()
}

#[test]
fn loads_into_rusqlite_and_reports_the_host() -> TestResult {
    let path = load_extension();
    let dir = tempfile::tempdir()?;
    let conn = Connection::open(dir.path().join("v.db"))?;

    let version: String = conn.query_row("SELECT repl_version()", [], |r| r.get(0))?;
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "repl_version() of {} differs from Cargo.toml: stale build? run `make build`",
        path.display()
    );

    // repl_debug() names the SQLite that loaded it: rusqlite's bundled library.
    let debug: String = conn.query_row("SELECT repl_debug()", [], |r| r.get(0))?;
    let host = format!("host SQLite {}", rusqlite::version());
    assert!(
        debug.lines().any(|l| l.trim() == host),
        "repl_debug() does not name the host ({host}):\n{debug}"
    );

    // No role before repl_primary(), even through the VFS.
    assert_eq!(lsn(&conn)?, None);
    assert_eq!(role(&conn)?, None);
    let st = status(&conn)?;
    assert!(st["role"].is_null(), "role before repl_primary(): {st}");
    Ok(())
}

#[test]
fn documented_functions_are_registered() -> TestResult {
    load_extension();
    let documented = documented_functions();
    assert!(
        documented.len() >= 7,
        "docs/SQL.md headings look wrong: {documented:?}"
    );
    let mut unique = documented.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        documented.len(),
        "duplicate headings in docs/SQL.md: {documented:?}"
    );

    // A NEW connection (opened after the load): functions come from the auto-extension.
    let dir = tempfile::tempdir()?;
    let conn = Connection::open(dir.path().join("f.db"))?;
    let mut stmt = conn.prepare(REPL_FUNCTIONS_SQL)?;
    let mut registered = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    registered.sort();

    let missing: Vec<_> = unique.iter().filter(|f| !registered.contains(f)).collect();
    assert!(
        missing.is_empty(),
        "documented in docs/SQL.md but not registered: {missing:?} (registered: {registered:?})"
    );
    let undocumented: Vec<_> = registered.iter().filter(|f| !unique.contains(f)).collect();
    assert!(
        undocumented.is_empty(),
        "registered but without a heading in docs/SQL.md: {undocumented:?}"
    );
    Ok(())
}

#[test]
fn primary_counts_one_lsn_per_commit() -> TestResult {
    load_extension();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("p.db");
    // Opened after the load: through the default VFS, which is now `replica`.
    let conn = Connection::open(&db)?;

    let start: i64 = conn.query_row("SELECT repl_primary()", [], |r| r.get(0))?;
    assert_eq!(start, 0, "a fresh database starts at LSN 0");
    assert_eq!(lsn(&conn)?, Some(0));
    assert_eq!(role(&conn)?.as_deref(), Some("primary"));
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    assert_eq!(mode, "wal");
    assert!(
        Path::new(&format!("{}-replica", db.display())).is_dir(),
        "no <db>-replica/ log directory"
    );

    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", [])?;
    assert_eq!(lsn(&conn)?, Some(1), "CREATE TABLE is one commit");
    let mut previous_sum = assert_checksum(&conn)?;

    // Autocommit inserts: one LSN each.
    for i in 0..20i64 {
        conn.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])?;
        assert_eq!(lsn(&conn)?, Some(2 + i), "after autocommit insert {i}");
        let sum = assert_checksum(&conn)?;
        assert_ne!(sum, previous_sum, "new content, same checksum");
        previous_sum = sum;
    }

    // An explicit transaction of many statements: one LSN.
    let before = lsn(&conn)?.unwrap();
    conn.execute_batch(
        "BEGIN; INSERT INTO t(v) VALUES ('a'); INSERT INTO t(v) VALUES ('b'); \
         UPDATE t SET v = v || '!' WHERE id % 2 = 0; COMMIT;",
    )?;
    assert_eq!(lsn(&conn)?, Some(before + 1), "one transaction, one LSN");

    // A rolled-back transaction and a read: no LSN.
    conn.execute_batch("BEGIN; INSERT INTO t(v) VALUES ('gone'); ROLLBACK;")?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
    assert_eq!(rows, 22);
    assert_eq!(
        lsn(&conn)?,
        Some(before + 1),
        "rollback and reads commit nothing"
    );

    // Idempotent: a second repl_primary() changes nothing.
    let again: i64 = conn.query_row("SELECT repl_primary()", [], |r| r.get(0))?;
    assert_eq!(again, before + 1);

    let sum = assert_checksum(&conn)?;
    let st = status(&conn)?;
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["lsn"].as_i64(), lsn(&conn)?, "{st}");
    assert!(st["generation"].as_i64().is_some_and(|g| g >= 1), "{st}");
    assert_eq!(st["log"]["last_lsn"].as_i64(), Some(before + 1), "{st}");
    drop(conn);

    // The role is remembered: a new connection (same process, same VFS) sees the primary at
    // the same LSN and content.
    let conn = Connection::open(&db)?;
    assert_eq!(role(&conn)?.as_deref(), Some("primary"));
    assert_eq!(lsn(&conn)?, Some(before + 1));
    assert_eq!(assert_checksum(&conn)?, sum);
    conn.execute("INSERT INTO t(v) VALUES ('reopened')", [])?;
    assert_eq!(lsn(&conn)?, Some(before + 2));
    Ok(())
}

#[test]
fn explicit_replica_vfs_works() -> TestResult {
    load_extension();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("x.db");
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags_and_vfs(&db, flags, "replica")?;

    assert_eq!(role(&conn)?, None);
    let start: i64 = conn.query_row("SELECT repl_primary()", [], |r| r.get(0))?;
    assert_eq!(start, 0);
    assert_eq!(role(&conn)?.as_deref(), Some("primary"));
    conn.execute("CREATE TABLE t(x)", [])?;
    conn.execute("INSERT INTO t VALUES (1)", [])?;
    conn.execute("INSERT INTO t VALUES (2)", [])?;
    assert_eq!(lsn(&conn)?, Some(3));
    assert_checksum(&conn)?;
    let st = status(&conn)?;
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["lsn"], 3, "{st}");
    Ok(())
}

#[test]
fn unix_vfs_bypasses_the_shim_and_is_refused() -> TestResult {
    load_extension();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("u.db");
    // The functions are there (auto-extension), but the file is not under the VFS.
    let conn = Connection::open_with_flags_and_vfs(&db, OpenFlags::default(), "unix")?;
    conn.execute("CREATE TABLE t(x)", [])?;
    assert_eq!(role(&conn)?, None);
    assert_eq!(lsn(&conn)?, None);
    let err = conn
        .query_row("SELECT repl_primary()", [], |r| r.get::<_, i64>(0))
        .expect_err("repl_primary() on a database not opened through the replica VFS");
    assert!(
        err.to_string().contains("with a new connection")
            && err.to_string().contains("another VFS"),
        "the error should say to open the database again through the VFS: {err}"
    );
    assert_eq!(
        role(&conn)?,
        None,
        "a refused repl_primary() changes nothing"
    );
    Ok(())
}
