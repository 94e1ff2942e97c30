//! The `repl_*` SQL functions: thin adapters from SQL values to the roles. Each Rust function
//! carries the name of the SQL function it implements; `register_all` is the index.

pub mod args;
mod exec;

use crate::error::{Error, Result};
use crate::ffi::conn::{DbRef, OwnedDb, SqlValue};
use crate::ffi::func::{register_scalar, Call};
use crate::ffi::{self, sqlite3};
use crate::roles::Db;
use args::Args;
use std::sync::Arc;

/// Every SQL function of the extension: (name, number of args, implementation).
pub const FUNCTIONS: &[(&str, i32, crate::ffi::func::ScalarFn)] = &[
    ("repl_version", 0, repl_version),
    ("repl_debug", 0, repl_debug),
    ("repl_primary", -1, repl_primary),
    ("repl_sync", -1, repl_sync),
    ("repl_lsn", 0, repl_lsn),
    ("repl_role", 0, repl_role),
    ("repl_checksum", 0, repl_checksum),
    ("repl_status", 0, repl_status),
    ("repl_config", -1, repl_config),
    ("repl_follow", -1, repl_follow),
    ("repl_promote", -1, repl_promote),
    ("repl_wait", -1, repl_wait),
    ("repl_wait_replicas", -1, repl_wait_replicas),
    ("repl_exec", -1, exec::repl_exec),
    ("repl_exec_json", -1, exec::repl_exec_json),
];

/// The `repl_*` URI parameters of a newly opened connection's main database:
/// `repl_listen=host:port` (with `repl_token=`) makes it a primary serving over HTTP, as
/// `repl_primary(listen, token)`; `repl_follow=1` starts following the remembered source, as
/// `repl_follow()`; `repl_backup=s3://…` sets a primary's bucket backup, as
/// `repl_config('backup', …)`. Absent parameters change nothing.
pub fn apply_uri_parameters(db: *mut sqlite3) -> Result<()> {
    let call = Call { db: DbRef(db) };
    let p = |n: &str| call.db.uri_parameter("main", n).filter(|v| !v.is_empty());
    let listen = p("repl_listen");
    let token = p("repl_token");
    let exec_token = p("repl_exec_token");
    let follow = p("repl_follow");
    let failover = p("repl_failover");
    let backup = p("repl_backup");
    let tls = match (p("repl_tls_cert"), p("repl_tls_key")) {
        (None, None) => crate::transport::server::TlsFiles::from_env()?,
        (cert, key) => crate::transport::server::TlsFiles::pair(
            cert,
            key,
            "the repl_tls_cert and repl_tls_key URI parameters",
        )?,
    };
    if listen.is_none()
        && token.is_none()
        && exec_token.is_none()
        && follow.is_none()
        && failover.is_none()
        && backup.is_none()
    {
        return Ok(());
    }
    if let Some(t) = &backup {
        crate::transport::s3::Target::parse(t)
            .map_err(|e| Error::Misuse(format!("the repl_backup URI parameter: {e}")))?;
    }
    // Check every parameter before acting on any, so a bad one changes nothing.
    let follow = match follow.map(|f| f.to_ascii_lowercase()) {
        None => false,
        Some(f) => match f.as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            other => {
                return Err(Error::Misuse(format!(
                    "the repl_follow URI parameter must be 1 or 0, not {other:?}"
                )))
            }
        },
    };
    if (token.is_some() || exec_token.is_some()) && listen.is_none() {
        let which = if token.is_some() {
            "repl_token"
        } else {
            "repl_exec_token"
        };
        return Err(Error::Misuse(format!(
            "the {which} URI parameter needs repl_listen=host:port (replicas take the tokens in the \
             source URL's token= and exec_token=, or REPL_TOKEN and REPL_EXEC_TOKEN)"
        )));
    }
    if let Some(addr) = listen {
        primary_listen(&call, &addr, token, exec_token, tls)
            .map_err(|e| Error::Misuse(format!("the repl_listen URI parameter: {e}")))?;
    }
    if let Some(target) = backup {
        let (entry, path) = main_db_checked(call.db, "the repl_backup URI parameter")?;
        let p = entry.primary().ok_or_else(|| {
            Error::Misuse(format!(
                "the repl_backup URI parameter: {path} is not a primary (add repl_listen=host:port, \
                 or open it once and run repl_primary())"
            ))
        })?;
        crate::transport::s3::set_target(p.dir(), &target)
            .map_err(|e| Error::Misuse(format!("the repl_backup URI parameter: {e}")))?;
        p.backup_settings_changed();
    }
    if follow {
        repl_follow(&call, &[])
            .map_err(|e| Error::Misuse(format!("the repl_follow URI parameter: {e}")))?;
    }
    if let Some(url) = failover {
        let entry = main_db(call.db).ok_or_else(|| {
            Error::Misuse("the repl_failover URI parameter: the database is not opened through the replica VFS".into())
        })?;
        crate::failover::configure(&entry, Some(&url))
            .map_err(|e| Error::Misuse(format!("the repl_failover URI parameter: {e}")))?;
    }
    Ok(())
}

/// Register every function on `db`.
pub fn register_all(db: *mut sqlite3) -> Result<()> {
    for (name, n, f) in FUNCTIONS {
        register_scalar(db, name, *n, *f)?;
    }
    Ok(())
}

fn repl_version(_c: &Call, _a: &[SqlValue]) -> Result<SqlValue> {
    Ok(SqlValue::Text(env!("CARGO_PKG_VERSION").into()))
}

fn repl_debug(_c: &Call, _a: &[SqlValue]) -> Result<SqlValue> {
    let v = ffi::libversion_number();
    Ok(SqlValue::Text(format!(
        "sqlite-replica {}\nhost SQLite {}.{}.{}\nvfs replica over {}\nbuild {}",
        env!("CARGO_PKG_VERSION"),
        v / 1_000_000,
        (v / 1000) % 1000,
        v % 1000,
        crate::vfs::base_name(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )))
}

/// The registry entry of the connection's main database, if it was opened through our VFS.
fn main_db(db: DbRef) -> Option<Arc<Db>> {
    let f = db.file_pointer("main")?;
    crate::roles::db_of_file(f)
}

/// Like `main_db`, but explains what is wrong when there is no usable main database.
fn main_db_checked(db: DbRef, what: &str) -> Result<(Arc<Db>, String)> {
    let Some(path) = db.filename("main") else {
        return Err(Error::Misuse(format!(
            "{what} needs a database file: ':memory:' and temporary databases cannot be replicated; open a file"
        )));
    };
    let Some(f) = db.file_pointer("main") else {
        return Err(Error::Misuse(format!(
            "{what}: the main database is not open"
        )));
    };
    if !crate::vfs::is_ours(f) {
        // Opened through another VFS. If that VFS is stacked on top of ours, this process has
        // the file open through `replica` underneath (the registry has it): say so.
        let top = db.vfs_name("main").unwrap_or_default();
        let ours = crate::vfs::VFS_NAME.to_str().unwrap_or("replica");
        if top != ours && crate::roles::is_open_here(&path) {
            return Err(Error::Misuse(format!(
                "{what}: this connection reaches {path} through the VFS '{top}', stacked on top of \
                 'replica': sqlite-replica cannot reach the database through another VFS's file. Call \
                 {what} on a connection that opens {path} through 'replica' itself (no vfs= parameter \
                 naming another VFS); commits through '{top}' are captured like any other once the \
                 database is a primary"
            )));
        }
        return Err(Error::Misuse(format!(
            "{what}: {}",
            opened_before_message(&path)
        )));
    }
    let entry = crate::roles::db_of_file(f)
        .ok_or_else(|| Error::Other(format!("{what}: no state for {path}")))?;
    Ok((entry, path))
}

/// `repl_primary([listen [, token [, exec_token]]])`: make the main database a primary
/// (idempotent) and, with `listen` (host:port), serve its log over HTTP from this process;
/// `/v1/exec` takes `exec_token` when one is given (and stays off until `repl_config('exec', 1)`).
fn repl_primary(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    if a.len() > 3 {
        return Err(Error::Misuse(
            "repl_primary() takes at most three arguments: the address to serve on (host:port), a token \
             and an exec token"
                .into(),
        ));
    }
    let args = Args::new("repl_primary", a);
    let listen = args.text(0, "address (host:port)")?;
    let token = args.text_or_int(1, "token")?;
    let exec_token = args.text_or_int(2, "exec token")?;
    let Some(addr) = listen else {
        return become_primary(c);
    };
    let tls = crate::transport::server::TlsFiles::from_env()?;
    primary_listen(c, &addr, token, exec_token, tls)
}

/// `repl_primary(addr, token, exec_token)` with TLS files (environment or URI parameters).
fn primary_listen(
    c: &Call,
    addr: &str,
    token: Option<String>,
    exec_token: Option<String>,
    tls: Option<crate::transport::server::TlsFiles>,
) -> Result<SqlValue> {
    let addr = addr.to_string();
    let token = token.or_else(|| crate::config::get().token.clone());
    let exec_token = exec_token
        .or_else(|| crate::config::get().exec_token.clone())
        .filter(|t| !t.is_empty());
    // Already a primary served here on that address: nothing to do (or a clear refusal).
    if let Some(p) = main_db(c.db).and_then(|d| d.primary()) {
        if p.serving(&addr)? {
            return Ok(SqlValue::Int(p.lsn().0 as i64));
        }
    }
    // Check the address and token and bind the socket BEFORE the database is touched: a bad
    // address, a port in use or a missing token must leave the files exactly as they were.
    main_db_checked(c.db, "repl_primary()")?;
    let bound = crate::transport::server::Server::bind(&addr, token, tls.as_ref())
        .map_err(|e| Error::Misuse(format!("repl_primary('{addr}'): {e}; nothing was changed")))?
        .with_exec_token(exec_token);
    let lsn = become_primary(c)?;
    let (entry, _) = main_db_checked(c.db, "repl_primary()")?;
    let p = entry
        .primary()
        .ok_or_else(|| Error::Other("repl_primary(): the primary vanished".into()))?;
    p.serve(bound)?;
    Ok(lsn)
}

/// What to do when a database was opened before the extension was loaded: it did not go
/// through the `replica` VFS, and nothing can move an open connection onto it.
pub fn opened_before_message(path: &str) -> String {
    format!(
        "{path} is not open through the 'replica' VFS: it was opened before sqlite-replica was loaded, \
         or with another VFS named (vfs=...). Load the extension first (e.g. on a ':memory:' connection), \
         then open {path} with a new connection that names no other VFS (in the sqlite3 shell: .load the \
         extension, then .open {path})"
    )
}

fn become_primary(c: &Call) -> Result<SqlValue> {
    let (entry, path) = main_db_checked(c.db, "repl_primary()")?;
    if let Some(r) = entry.replica() {
        return Err(Error::Misuse(format!(
            "repl_primary(): {path} is a replica of {}; a replica becomes a primary only by promotion: repl_promote([listen [, token]]) (docs/SQL.md)",
            r.source().map_or("?".into(), |s| s.to_string())
        )));
    }
    if let Some(p) = entry.primary() {
        return Ok(SqlValue::Int(p.lsn().0 as i64));
    }
    if c.db.readonly("main") == 1 {
        return Err(Error::ReadOnly(format!(
            "repl_primary(): {path} is opened read-only; a primary must be writable (check file permissions and open flags)"
        )));
    }
    // Enforce WAL mode on the calling connection first: it honours a page size chosen
    // before the database was created. If that fails (e.g. inside a transaction or with
    // statements running), switch from a separate connection with the same page size.
    let _ = c.db.exec("PRAGMA main.journal_mode=WAL");
    let aux = OwnedDb::open(
        &path,
        ffi::SQLITE_OPEN_READWRITE,
        Some(crate::vfs::VFS_NAME),
    )?;
    aux.busy_timeout(5000);
    if let SqlValue::Int(ps) = c.db.query_value("PRAGMA main.page_size")? {
        let _ = aux.db().exec(&format!("PRAGMA page_size={ps}"));
    }
    let mode = aux.db().query_value("PRAGMA journal_mode=WAL")?;
    if mode != SqlValue::Text("wal".into()) {
        return Err(Error::Unsupported(format!(
            "repl_primary(): could not switch {path} to WAL mode (journal_mode is {mode:?}); \
             close other connections or finish open transactions and retry"
        )));
    }
    aux.db().query_value("PRAGMA schema_version")?; // initialises the wal-index
    let p = crate::roles::make_primary(&entry)?;
    drop(aux);
    let _ = c.db.exec("PRAGMA main.journal_mode=WAL");
    Ok(SqlValue::Int(p.lsn().0 as i64))
}

/// `repl_sync([source])`: make the main database a replica of `source` (a primary's database
/// path, a `file:` URL or an `http(s)://` URL) if it is not one yet, then pull and apply
/// everything available.
fn repl_sync(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    if a.len() > 1 {
        return Err(Error::Misuse(
            "repl_sync() takes at most one argument: the primary's database path or URL".into(),
        ));
    }
    let source = Args::new("repl_sync", a).text(0, "source (a path or URL)")?;
    let source = source.as_deref();
    let (entry, path) = main_db_checked(c.db, "repl_sync()")?;
    rejoin_if_deposed(c, &entry, source)?;
    if entry.primary().is_some() {
        return Err(Error::Misuse(format!(
            "repl_sync(): {path} is a primary; a primary cannot follow another database"
        )));
    }
    if c.db.readonly("main") == 1 {
        // SQLite also opens read-only a file this process may not write: name that first.
        let e = crate::replica::check_writable(&path).err().unwrap_or_else(|| {
            Error::ReadOnly(format!(
                "repl_sync(): {path} is opened read-only (SQLITE_OPEN_READONLY, ?mode=ro or sqlite3 -readonly) \
                 and applying changes writes its files; nothing was changed. Call repl_sync() on a \
                 read-write connection (read-only connections can still read the replica)"
            ))
        });
        if let Some(r) = entry.replica() {
            r.note_refused_sync(&e);
        }
        return Err(e);
    }
    let r = match entry.replica() {
        Some(r) => r,
        None => {
            if source.is_none() {
                return Err(Error::Misuse(format!(
                    "repl_sync(): {path} is not a replica yet; pass the primary, e.g. SELECT repl_sync('/path/to/primary.db')"
                )));
            }
            // Refuse to overwrite a database that is not empty: only an empty (new) file
            // can be bootstrapped.
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size > 0 {
                return Err(Error::Misuse(format!(
                    "repl_sync(): {path} already holds a database ({size} bytes) that is not a replica; \
                     a replica must start from a new, empty file: open a new path"
                )));
            }
            // Validate the source before creating anything on disk: its syntax, and that it
            // answers (an unreachable primary or a missing token must leave no replica files).
            let spec = crate::transport::SourceSpec::parse(source.unwrap_or_default())?;
            let opened = spec.open()?;
            opened.info()?;
            let r = crate::roles::make_replica(&entry)?;
            return match r.sync_opened(spec, opened) {
                Ok(lsn) => Ok(SqlValue::Int(lsn.0 as i64)),
                Err(e) => {
                    drop(r);
                    crate::roles::unmake_new_replica(&entry);
                    Err(e)
                }
            };
        }
    };
    Ok(SqlValue::Int(r.sync(source)?.0 as i64))
}

fn repl_lsn(c: &Call, _a: &[SqlValue]) -> Result<SqlValue> {
    let Some(d) = main_db(c.db) else {
        return Ok(SqlValue::Null);
    };
    Ok(match (d.primary(), d.replica()) {
        (Some(p), _) => SqlValue::Int(p.lsn().0 as i64),
        (_, Some(r)) => SqlValue::Int(r.lsn().0 as i64),
        _ => SqlValue::Null,
    })
}

/// `repl_wait_replicas([lsn [, n [, timeout_ms]]])` on a primary: waits until `n` followers
/// (default: the `sync_replicas` setting, at least 1) acknowledged `lsn` (default: this
/// primary's `repl_lsn()`), at most `timeout_ms` (default: `sync_timeout_ms`); returns how
/// many followers have it, or fails saying how many did.
fn repl_wait_replicas(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    if a.len() > 3 {
        return Err(Error::Misuse(
            "repl_wait_replicas() takes at most three arguments: an LSN, a number of followers and a timeout in ms"
                .into(),
        ));
    }
    let args = Args::new("repl_wait_replicas", a);
    let lsn = args.int(0, "LSN", 0..=i64::MAX)?;
    let n = args.int(1, "number of followers", 1..=16)?;
    let timeout = args.int(2, "timeout in ms", 0..=3_600_000)?;
    let (entry, path) = main_db_checked(c.db, "repl_wait_replicas()")?;
    let Some(p) = entry.primary() else {
        return Err(Error::Misuse(format!(
            "repl_wait_replicas(): {path} is not a primary; on a replica, repl_wait(lsn) waits for an LSN to be applied here"
        )));
    };
    let policy = crate::primary::maintenance::load_policy(p.dir())?;
    let lsn = lsn.map_or_else(|| p.lsn().0, |l| l as u64);
    let n = n.map_or(policy.sync_replicas.max(1) as usize, |n| n as usize);
    let timeout =
        std::time::Duration::from_millis(timeout.map_or(policy.sync_timeout_ms, |t| t as u64));
    Ok(SqlValue::Int(p.wait_replicas(lsn, n, timeout)? as i64))
}

fn repl_role(c: &Call, _a: &[SqlValue]) -> Result<SqlValue> {
    let Some(d) = main_db(c.db) else {
        return Ok(SqlValue::Null);
    };
    Ok(match (d.primary(), d.replica()) {
        (Some(_), _) => SqlValue::Text("primary".into()),
        (_, Some(_)) => SqlValue::Text("replica".into()),
        _ => SqlValue::Null,
    })
}

fn repl_checksum(c: &Call, _a: &[SqlValue]) -> Result<SqlValue> {
    let Some(d) = main_db(c.db) else {
        return Ok(SqlValue::Null);
    };
    Ok(match (d.primary(), d.replica()) {
        (Some(p), _) => {
            // A process that has not read the database yet has no wal-index mapped (the first
            // reader of a closed database rebuilds it): read once on the caller's connection.
            let _ = c.db.query_value("PRAGMA main.schema_version");
            SqlValue::Text(p.checksum()?.1.to_string())
        }
        (_, Some(r)) => SqlValue::Text(r.checksum()?.1.to_string()),
        _ => SqlValue::Null,
    })
}

fn repl_status(c: &Call, _a: &[SqlValue]) -> Result<SqlValue> {
    let d = main_db(c.db);
    let v = match (
        d.as_ref().and_then(|d| d.primary()),
        d.as_ref().and_then(|d| d.replica()),
    ) {
        (Some(p), _) => with_failover(p.status_json(), &p_path(&d)),
        (_, Some(r)) => with_failover(r.status_json(), &p_path(&d)),
        _ => serde_json::json!({
            "role": null,
            "db": c.db.filename("main"),
            "through_vfs": c.db.file_pointer("main").is_some_and(crate::vfs::is_ours),
        }),
    };
    Ok(SqlValue::Text(v.to_string()))
}

fn p_path(d: &Option<Arc<Db>>) -> String {
    d.as_ref().map(|d| d.path.clone()).unwrap_or_default()
}

/// `repl_status().failover`: the agent of `repl_config('failover')`, or null.
fn with_failover(mut v: serde_json::Value, path: &str) -> serde_json::Value {
    v["failover"] = crate::failover::status(path).unwrap_or(serde_json::Value::Null);
    v
}

/// `repl_config()`: the primary's settings as JSON; `repl_config(name)`: one value;
/// `repl_config(name, value)`: set it (persisted for every process of this primary) and
/// return the new value.
fn repl_config(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    use crate::primary::maintenance::{load_policy, policy_json, set_setting, setting};
    if a.len() > 2 {
        return Err(Error::Misuse(
            "repl_config() takes at most two arguments: a setting name and a value".into(),
        ));
    }
    let args = Args::new("repl_config", a);
    let name = args.text(0, "setting name")?;
    // Process-wide settings that need no primary: the event log.
    match name.as_deref() {
        Some("log") => return config_log_level(&args),
        Some("log_file") => return config_log_file(&args),
        _ => {}
    }
    let (entry, path) = main_db_checked(c.db, "repl_config()")?;
    if name.as_deref() == Some("failover") {
        return config_failover(&entry, &args);
    }
    let Some(p) = entry.primary() else {
        return Err(Error::Misuse(format!(
            "repl_config(): {path} is not a primary; the settings (log retention and snapshots) \
             belong to the primary: run repl_config() there after repl_primary()"
        )));
    };
    let Some(name) = name else {
        return Ok(SqlValue::Text(
            policy_json(&load_policy(p.dir())?).to_string(),
        ));
    };
    if name == "compress" {
        return config_compress(&p, &args);
    }
    if name == "sync_level" {
        return config_sync_level(&p, &args);
    }
    if name == "backup" {
        if let Some(v) = args.text(1, "backup target")? {
            crate::transport::s3::set_target(p.dir(), &v)?;
            p.backup_settings_changed();
        }
        return Ok(
            crate::transport::s3::configured_target(p.dir()).map_or(SqlValue::Null, SqlValue::Text)
        );
    }
    if name == "backup_retain_secs" || name == "backup_retain" {
        if let Some(SqlValue::Text(t)) = args.get(1) {
            let secs = parse_duration_secs(t).ok_or_else(|| {
                args.bad(
                    1,
                    "value of backup_retain",
                    "a number of seconds or a duration such as '7d', '12h', '30m'",
                    &args::describe(&SqlValue::Text(t.clone())),
                )
            })?;
            let policy = set_setting(p.dir(), "backup_retain_secs", secs as i64)?;
            p.backup_settings_changed();
            return Ok(SqlValue::Int(policy.backup_retain_secs as i64));
        }
        if name == "backup_retain" && args.get(1).is_none() {
            return Ok(SqlValue::Int(
                load_policy(p.dir())?.backup_retain_secs as i64,
            ));
        }
    }
    let name = if name == "backup_retain" {
        "backup_retain_secs".to_string()
    } else {
        name
    };
    match args.get(1) {
        None => Ok(SqlValue::Int(setting(&load_policy(p.dir())?, &name)? as i64)),
        Some(_) => {
            let v = args
                .int(1, &format!("value of {name}"), 0..=i64::MAX)?
                .unwrap_or_default();
            let policy = set_setting(p.dir(), &name, v)?;
            p.apply_policy(&policy);
            if name.starts_with("backup") {
                p.backup_settings_changed();
            }
            Ok(SqlValue::Int(setting(&policy, &name)? as i64))
        }
    }
}

/// `'7d'`, `'12h'`, `'30m'`, `'45s'` or a plain number of seconds.
fn parse_duration_secs(t: &str) -> Option<u64> {
    let t = t.trim();
    let (n, unit) = match t.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let mul = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        'w' => 7 * 86400,
        _ => return None,
    };
    n.trim().parse::<u64>().ok()?.checked_mul(mul)
}

/// `repl_config('compress'[, value])`: 'none', 'zstd', 'lz4', 'zstd:<level>' or a zstd level
/// (0 = none); returns the setting in force by name ('zstd', 'zstd:9', 'lz4', 'none').
fn config_compress(p: &crate::primary::Primary, args: &Args) -> Result<SqlValue> {
    use crate::primary::maintenance::{load_policy, set_setting};
    use crate::txlog::Compression;
    let expected = "'none', 'zstd', 'lz4', 'zstd:<level>' or a zstd level 0..19";
    let policy = match args.get(1) {
        None => load_policy(p.dir())?,
        Some(v) => {
            let c = match v {
                SqlValue::Int(n) => u64::try_from(*n)
                    .ok()
                    .filter(|n| *n <= 19)
                    .and_then(Compression::from_code),
                SqlValue::Text(t) => Compression::parse(t),
                _ => None,
            }
            .ok_or_else(|| args.bad(1, "value of compress", expected, &args::describe(v)))?;
            let policy = set_setting(p.dir(), "compress", c.code() as i64)?;
            p.apply_policy(&policy);
            policy
        }
    };
    let c = Compression::from_code(policy.compress).unwrap_or_default();
    Ok(SqlValue::Text(c.name()))
}

/// `repl_config('failover'[, url])`: automatic failover on etcd for this database in this
/// process (a primary takes the leadership key now; a replica becomes a candidate); NULL or ''
/// stops it. Returns the URL in force, or NULL.
fn config_failover(entry: &Arc<Db>, args: &Args) -> Result<SqlValue> {
    if args.len() > 1 {
        let url = args.text(1, "failover URL (etcd://host:port/key?listen=host:port)")?;
        crate::failover::configure(entry, url.as_deref())?;
    }
    Ok(crate::failover::configured(&entry.path).map_or(SqlValue::Null, SqlValue::Text))
}

/// `repl_config('sync_level'[, value])`: 'received', 'durable', 'applied' (or 1, 2, 3); returns
/// the level in force by name.
fn config_sync_level(p: &crate::primary::Primary, args: &Args) -> Result<SqlValue> {
    use crate::primary::maintenance::{load_policy, set_setting};
    const NAMES: [&str; 3] = ["received", "durable", "applied"];
    let policy = match args.get(1) {
        None => load_policy(p.dir())?,
        Some(v) => {
            let code = match v {
                SqlValue::Int(n) => u64::try_from(*n).ok().filter(|n| (1..=3).contains(n)),
                SqlValue::Text(t) => NAMES
                    .iter()
                    .position(|n| t.eq_ignore_ascii_case(n))
                    .map(|i| i as u64 + 1),
                _ => None,
            }
            .ok_or_else(|| {
                args.bad(
                    1,
                    "value of sync_level",
                    "'received', 'durable', 'applied' or 1..3",
                    &args::describe(v),
                )
            })?;
            let policy = set_setting(p.dir(), "sync_level", code as i64)?;
            p.apply_policy(&policy);
            policy
        }
    };
    Ok(SqlValue::Text(
        NAMES[(policy.sync_level.clamp(1, 3) - 1) as usize].into(),
    ))
}

/// `repl_config('log'[, level])`: the event log level of this process (off, error, warn,
/// info, debug); returns the level in force.
fn config_log_level(args: &Args) -> Result<SqlValue> {
    use crate::logging::{level, set_level, Level};
    if let Some(v) = args.text(1, "log level")? {
        let l = Level::parse(&v).ok_or_else(|| {
            args.bad(
                1,
                "log level",
                "one of 'off', 'error', 'warn', 'info', 'debug'",
                &args::describe(&SqlValue::Text(v.clone())),
            )
        })?;
        set_level(l);
    }
    Ok(SqlValue::Text(level().name().into()))
}

/// `repl_config('log_file'[, path])`: where this process's event lines go (a file, appended;
/// `''` for stderr); returns the path, or NULL for stderr.
fn config_log_file(args: &Args) -> Result<SqlValue> {
    if args.len() > 1 {
        let path = args.text(1, "log file path")?.filter(|p| !p.is_empty());
        crate::logging::set_file(path.as_deref()).map_err(|e| {
            Error::io(
                format!(
                    "repl_config('log_file'): cannot open {:?} for appending; the log still goes where it went",
                    path.unwrap_or_default()
                ),
                e,
            )
        })?;
    }
    Ok(crate::logging::file().map_or(SqlValue::Null, SqlValue::Text))
}

/// `repl_follow([source [, interval_ms]])`: keep this replica up to date in the background
/// (long-polling the source from the HTTP engine's shared loop and workers, no thread of its
/// own); `repl_follow(NULL)` stops it. Returns the LSN reached by
/// the first sync (or, when stopping, the current LSN).
/// A primary pointed at a primary of its lineage's newer epoch was deposed: it comes back as
/// that primary's replica (`roles::rejoin_as_replica`: its unreplicated tail is kept aside).
fn rejoin_if_deposed(c: &Call, entry: &Arc<Db>, source: Option<&str>) -> Result<()> {
    let (Some(source), Some(_)) = (source, entry.primary()) else {
        return Ok(());
    };
    if c.db.readonly("main") == 1 {
        return Ok(()); // the usual refusal follows
    }
    crate::roles::rejoin_as_replica(entry, source).map(|_| ())
}

/// `repl_promote([listen [, token [, 'force']]])`: make this replica the primary of the next
/// epoch (serving its log on `listen` when given) and tell its former primary it was deposed.
fn repl_promote(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    if a.len() > 3 {
        return Err(Error::Misuse(
            "repl_promote() takes at most three arguments: the address to serve on (host:port), a token,              and 'force'"
                .into(),
        ));
    }
    let args = Args::new("repl_promote", a);
    let listen = args.text(0, "address (host:port)")?;
    let token = args.text_or_int(1, "token")?;
    let force = match args.text(2, "'force'")?.as_deref() {
        None => false,
        Some(m) if m.eq_ignore_ascii_case("force") => true,
        Some(m) => {
            return Err(Error::Misuse(format!(
            "repl_promote(): the third argument must be 'force' (got {m:?}); nothing was changed"
        )))
        }
    };
    let (entry, path) = main_db_checked(c.db, "repl_promote()")?;
    if entry.primary().is_some() {
        return Err(Error::Misuse(format!(
            "repl_promote(): {path} is already a primary"
        )));
    }
    if entry.replica().is_none() {
        return Err(Error::Misuse(format!(
            "repl_promote(): {path} is not a replica; only a replica can be promoted (repl_primary() makes              a database a primary)"
        )));
    }
    if c.db.readonly("main") == 1 {
        return Err(Error::ReadOnly(format!(
            "repl_promote(): {path} is opened read-only; a primary must be writable"
        )));
    }
    // The address is checked and bound before anything changes.
    let bound = match &listen {
        Some(addr) => {
            let token = token.or_else(|| crate::config::get().token.clone());
            let tls = crate::transport::server::TlsFiles::from_env()?;
            let exec_token = crate::config::get().exec_token.clone();
            Some(
                crate::transport::server::Server::bind(addr, token, tls.as_ref())
                    .map_err(|e| {
                        Error::Misuse(format!("repl_promote('{addr}'): {e}; nothing was changed"))
                    })?
                    .with_exec_token(exec_token),
            )
        }
        None => None,
    };
    let (p, done) = crate::roles::promote(&entry, force, None)?;
    if let Some(b) = bound {
        p.serve(b)?;
    }
    let me = p.server_url().unwrap_or_else(|| path.clone());
    crate::roles::notify_former(&done, &me);
    Ok(SqlValue::Text(
        serde_json::json!({
            "epoch": done.epoch.0,
            "lsn": done.lsn.0,
            "generation": done.generation.0,
            "lineage": done.lineage,
            "checksum": done.checksum.to_string(),
            "primary": me,
            "former": done.former.as_ref().map(|s| s.to_string()),
        })
        .to_string(),
    ))
}

fn repl_follow(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    if a.len() > 2 {
        return Err(Error::Misuse(
            "repl_follow() takes at most two arguments: the source and interval_ms".into(),
        ));
    }
    let (entry, path) = main_db_checked(c.db, "repl_follow()")?;
    if let Some(SqlValue::Text(s)) = a.first() {
        rejoin_if_deposed(c, &entry, Some(s.as_str()))?;
    }
    if entry.primary().is_some() {
        return Err(Error::Misuse(format!(
            "repl_follow(): {path} is a primary; a primary cannot follow another database"
        )));
    }
    if let Some(SqlValue::Null) = a.first() {
        if a.len() == 1 {
            if let Some(r) = entry.replica() {
                r.unfollow();
                return Ok(SqlValue::Int(r.lsn().0 as i64));
            }
            return Ok(SqlValue::Null);
        }
    }
    let args = Args::new("repl_follow", a);
    args.text(0, "source (a path or URL)")?;
    let interval = args.int(1, "interval_ms", 1..=60_000)?.unwrap_or(1000) as u64;
    // The first sync runs here, in the caller: a bad source is an error now, not in a thread.
    let lsn = repl_sync(c, &a[..a.len().min(1)])?;
    let r = entry
        .replica()
        .ok_or_else(|| Error::Other(format!("repl_follow(): {path} did not become a replica")))?;
    r.follow(std::time::Duration::from_millis(interval))?;
    Ok(lsn)
}

/// `repl_wait(lsn | token [, timeout_ms])`: return once this database holds `lsn` (a token
/// `<lineage>:<lsn>` also checks the lineage), at most `timeout_ms` (default 5000) later.
fn repl_wait(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    if a.is_empty() || a.len() > 2 {
        return Err(Error::Misuse(
            "repl_wait() takes an LSN (or a '<lineage>:<lsn>' token) and an optional timeout_ms"
                .into(),
        ));
    }
    let args = Args::new("repl_wait", a);
    let (lineage, target) = match &a[0] {
        v if args::as_integer(v).is_some() => (
            None,
            args.int(0, "LSN", 0..=i64::MAX)?.unwrap_or_default() as u64,
        ),
        SqlValue::Text(t) => {
            let (l, n) = t.rsplit_once(':').unwrap_or(("", t));
            let n = n.trim().parse::<u64>().map_err(|_| {
                args.bad(
                    0,
                    "LSN",
                    "a non-negative integer or a '<lineage>:<lsn>' token",
                    &args::describe(&a[0]),
                )
            })?;
            (Some(l.trim().to_string()).filter(|l| !l.is_empty()), n)
        }
        v => {
            return Err(args.bad(
                0,
                "LSN",
                "a non-negative integer or a '<lineage>:<lsn>' token",
                &args::describe(v),
            ))
        }
    };
    let timeout = args.int(1, "timeout_ms", 0..=3_600_000)?.unwrap_or(5000) as u64;
    let timeout = std::time::Duration::from_millis(timeout);
    let (entry, path) = main_db_checked(c.db, "repl_wait()")?;
    let ours = entry
        .replica()
        .and_then(|r| r.lineage())
        .or_else(|| entry.primary().map(|p| p.lineage()));
    if let (Some(want), Some(ours)) = (&lineage, &ours) {
        if want != ours {
            return Err(Error::Misuse(format!(
                "repl_wait(): the token belongs to lineage {want} but {path} follows lineage {ours}: it was issued by \
                 another primary; this replica can never reach it"
            )));
        }
    }
    let target = crate::types::Lsn(target);
    if let Some(r) = entry.replica() {
        return Ok(SqlValue::Int(r.wait_for(target, timeout)?.0 as i64));
    }
    if let Some(p) = entry.primary() {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let l = p.lsn();
            if l >= target {
                return Ok(SqlValue::Int(l.0 as i64));
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Busy(format!(
                    "repl_wait({target}): timed out after {} ms; the primary is at LSN {l}",
                    timeout.as_millis()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    Err(Error::Misuse(format!(
        "repl_wait(): {path} is neither a primary nor a replica"
    )))
}
