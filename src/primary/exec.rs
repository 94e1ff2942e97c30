//! Write forwarding, primary side (issue 5): run a statement or script sent by a replica
//! (`repl_exec`, `POST /v1/exec`) as ONE transaction on the primary's own connection and
//! answer with the commit's LSN, `changes()`, `last_insert_rowid()` and any rows a
//! `RETURNING` clause produced.
//!
//! At most once: a request id is recorded in the table `_repl_requests` *inside the same
//! transaction* as the write, so a retried request (the answer was lost after the commit, the
//! primary restarted...) finds it and gets the stored answer instead of running again. The
//! table is part of the database (it replicates like any table); rows older than a day go.
//!
//! The request and answer formats (JSON, `transport::exec`) and the HTTP status of each outcome
//! belong to the transport; this file only judges and runs a parsed request.

use super::{lock, Primary};
use crate::error::{Error, Result};
use crate::ffi::conn::{AuthRequest, DbRef, OwnedDb, SqlValue};
use crate::transport::exec::{value_to_json, ExecFailure, ExecRequest, Handler};
use crate::types::Lsn;
use crate::util::now_ms;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Request ids are kept this long.
const KEEP_MS: u64 = 24 * 3600 * 1000;

/// PRAGMAs a script may run without a value (reads only). Every PRAGMA that sets something is
/// refused: the exec connection is fresh per request, so a setting would only matter inside
/// it, and the ones that reach further (journal_mode, temp_store_directory, heap limits,
/// writable_schema, wal_checkpoint) must not be reachable from another host.
const READ_PRAGMAS: &[&str] = &[
    "application_id",
    "collation_list",
    "compile_options",
    "data_version",
    "database_list",
    "encoding",
    "foreign_key_check",
    "foreign_key_list",
    "foreign_keys",
    "freelist_count",
    "function_list",
    "index_info",
    "index_list",
    "index_xinfo",
    "integrity_check",
    "module_list",
    "page_count",
    "page_size",
    "pragma_list",
    "quick_check",
    "schema_version",
    "table_info",
    "table_list",
    "table_xinfo",
    "user_version",
];
/// Of those, the ones whose argument names a table or index (not a value to set).
const NAME_ARG_PRAGMAS: &[&str] = &[
    "foreign_key_check",
    "foreign_key_list",
    "index_info",
    "index_list",
    "index_xinfo",
    "integrity_check",
    "quick_check",
    "table_info",
    "table_xinfo",
];
/// SQL functions a forwarded script may not call: loading code, reaching files, and this
/// extension's own functions (serving, following, settings, log files).
const DENIED_FUNCTIONS: &[&str] = &[
    "load_extension",
    "readfile",
    "writefile",
    "edit",
    "fts3_tokenizer",
];

/// Why `/v1/exec` refuses the action `r` (None: allowed). The rules say what a forwarded
/// write needs: reads and writes of this database's tables, DDL in `main`, read-only PRAGMAs.
pub fn refusal(r: &AuthRequest<'_>) -> Option<String> {
    let name = |o: Option<&str>| o.unwrap_or("").to_ascii_lowercase();
    let why = match r.action {
        // SQLITE_TRANSACTION, SQLITE_SAVEPOINT
        22 | 32 => format!(
            "{} is refused: /v1/exec runs the whole script as one transaction and commits it \
             itself; send the statements without BEGIN/COMMIT/ROLLBACK/SAVEPOINT/RELEASE",
            name(r.arg1).to_uppercase()
        ),
        // SQLITE_ATTACH, SQLITE_DETACH
        24 | 25 => "ATTACH/DETACH is refused: /v1/exec reaches this database only".to_string(),
        // SQLITE_CREATE_TEMP_{INDEX,TABLE,TRIGGER,VIEW}, SQLITE_DROP_TEMP_*
        3..=6 | 12..=15 => format!(
            "TEMP objects are refused ({}): /v1/exec writes to the database itself; use a \
             table in main",
            name(r.arg1)
        ),
        // SQLITE_PRAGMA
        19 => {
            let p = name(r.arg1);
            let reads = READ_PRAGMAS.contains(&p.as_str());
            if reads && (r.arg2.is_none() || NAME_ARG_PRAGMAS.contains(&p.as_str())) {
                return None;
            }
            format!(
                "PRAGMA {p}{} is refused: /v1/exec allows only PRAGMAs that read ({})",
                r.arg2.map(|v| format!("={v}")).unwrap_or_default(),
                READ_PRAGMAS.join(", ")
            )
        }
        // SQLITE_FUNCTION
        31 => {
            let f = name(r.arg2);
            if !(f.starts_with("repl_") || DENIED_FUNCTIONS.contains(&f.as_str())) {
                return None;
            }
            format!("the function {f}() is refused: /v1/exec runs SQL on this database only")
        }
        // SQLITE_CREATE_VTABLE, SQLITE_DROP_VTABLE in temp
        29 | 30 if name(r.db) == "temp" => {
            "TEMP objects are refused (a virtual table in temp)".to_string()
        }
        // SQLITE_INSERT, SQLITE_UPDATE, SQLITE_DELETE, SQLITE_DROP_TABLE, SQLITE_ALTER_TABLE of
        // the request record: at most once depends on it.
        18 | 23 | 9 | 11 if name(r.arg1) == "_repl_requests" => {
            "writing _repl_requests is refused: it records which requests ran (at most once)"
                .to_string()
        }
        26 if name(r.arg2) == "_repl_requests" => {
            "altering _repl_requests is refused: it records which requests ran (at most once)"
                .to_string()
        }
        _ => return None,
    };
    Some(match r.inner {
        Some(t) => format!("{why} (inside {t})"),
        None => why,
    })
}

/// The first keyword of a statement's text (comments and whitespace skipped), upper case.
fn first_keyword(sql: &str) -> String {
    let mut s = sql;
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix("--") {
            s = r.split_once('\n').map_or("", |(_, rest)| rest);
        } else if let Some(r) = s.strip_prefix("/*") {
            s = r.split_once("*/").map_or("", |(_, rest)| rest);
        } else {
            break;
        }
    }
    s.chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase()
}

/// What the callbacks of one request's connection share with the runner.
#[derive(Default)]
struct Guard {
    /// Statements being prepared/run are the client's (judged, and under the deadline), not
    /// the runner's own BEGIN/COMMIT and `_repl_requests` statements.
    policing: AtomicBool,
    /// The progress handler interrupted a statement: the deadline passed.
    timed_out: AtomicBool,
    /// The first refusal of the authorizer.
    refused: Mutex<Option<String>>,
}

/// The request's limits, from the primary's settings (`repl_config`).
struct Limits {
    timeout_ms: u64,
    max_rows: u64,
    max_bytes: u64,
}

/// About how many bytes a value adds to the answer.
fn value_bytes(v: &SqlValue) -> u64 {
    match v {
        SqlValue::Text(t) => t.len() as u64,
        SqlValue::Blob(b) => 2 * b.len() as u64,
        _ => 8,
    }
}

impl Primary {
    /// Whether `/v1/exec` is on (the `exec` setting); an error names a damaged config file.
    pub fn exec_enabled(&self) -> Result<bool> {
        Ok(super::maintenance::load_policy(&self.dir)?.exec == 1)
    }

    /// Runs `req` as one transaction; the answer is the JSON of `/v1/exec`.
    pub fn exec(&self, req: &ExecRequest) -> Result<Value> {
        self.exec_checked(req).map_err(Error::from)
    }

    /// Opens the connection of one request: through our VFS (so capture sees its commit),
    /// defensive, no attached databases, the authorizer and the deadline armed. Closed (and
    /// with it every temp object, pragma and setting of the request) when it is dropped.
    fn exec_connection(&self, guard: &Arc<Guard>, deadline: Instant) -> Result<OwnedDb> {
        let mut c = OwnedDb::open(
            &self.db_path,
            crate::ffi::SQLITE_OPEN_READWRITE,
            Some(crate::vfs::VFS_NAME),
        )?;
        let left = deadline.saturating_duration_since(Instant::now());
        c.busy_timeout(left.as_millis().clamp(1, i32::MAX as u128) as i32);
        if !c.db_config_flag(crate::ffi::conn::SQLITE_DBCONFIG_DEFENSIVE, true)? {
            return Err(Error::Unsupported(
                "SQLITE_DBCONFIG_DEFENSIVE could not be set on the exec connection".into(),
            ));
        }
        // Closing this connection must never checkpoint (or delete) the WAL: capture owns
        // that decision, and the connection closes after every request.
        c.db_config_flag(crate::ffi::conn::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        c.limit(crate::ffi::conn::SQLITE_LIMIT_ATTACHED, 0)?;
        let g = guard.clone();
        c.set_authorizer(Box::new(move |r| {
            if !g.policing.load(Ordering::Acquire) {
                return true;
            }
            match refusal(r) {
                None => true,
                Some(why) => {
                    lock(&g.refused).get_or_insert(why);
                    false
                }
            }
        }))?;
        if OwnedDb::has_progress_handler() {
            let g = guard.clone();
            c.set_progress_handler(
                1000,
                Box::new(move || {
                    if g.policing.load(Ordering::Acquire) && Instant::now() >= deadline {
                        g.timed_out.store(true, Ordering::Release);
                        return true;
                    }
                    false
                }),
            )?;
        }
        Ok(c)
    }

    /// `exec` with the reason of a failure kept apart (for the HTTP status).
    pub fn exec_checked(&self, req: &ExecRequest) -> std::result::Result<Value, ExecFailure> {
        let policy = super::maintenance::load_policy(&self.dir)?;
        let limits = Limits {
            timeout_ms: policy.exec_timeout_ms,
            max_rows: policy.exec_max_rows,
            max_bytes: policy.exec_max_bytes,
        };
        let deadline = Instant::now() + Duration::from_millis(limits.timeout_ms);
        let guard = Arc::new(Guard::default());
        let conn = self.exec_connection(&guard, deadline)?;
        // Hosts without a progress handler (better-sqlite3 omits it): a watchdog interrupts
        // the connection at the deadline instead.
        let _deadline = if OwnedDb::has_progress_handler() {
            None
        } else {
            let g = guard.clone();
            Some(conn.interrupt_at(
                deadline,
                Box::new(move || {
                    let fire = g.policing.load(Ordering::Acquire);
                    if fire {
                        g.timed_out.store(true, Ordering::Release);
                    }
                    fire
                }),
            )?)
        };
        let db = conn.db();
        let refused = || lock(&guard.refused).take();
        let police = |on: bool| guard.policing.store(on, Ordering::Release);

        // 1. Judge every statement before anything runs (prepare only). A statement that
        //    cannot be prepared yet (it uses a table an earlier statement creates) is judged
        //    when the script runs, inside the transaction: a refusal then rolls it back.
        police(true);
        let (stmts, failure) = db.prepare_script(&req.sql);
        police(false);
        if let Some(why) = refused() {
            return Err(ExecFailure::Refused(why));
        }
        if let Some(s) = stmts.iter().find(|s| first_keyword(&s.text) == "VACUUM") {
            return Err(ExecFailure::Refused(format!(
                "VACUUM is refused ({}): /v1/exec writes rows, not files; run VACUUM on the primary",
                s.text.trim()
            )));
        }
        // A script with a statement that failed to prepare runs as a write: its error then
        // comes from inside the transaction (rolled back), after the duplicate check, so the
        // retry of a committed `CREATE TABLE x ...` gets its stored answer, not "x exists".
        let read_only = failure.is_none() && stmts.iter().all(|s| s.readonly);

        // 2. Run. A read-only script takes no write lock (a deferred transaction: one
        //    snapshot, never blocking the application's writers) and records nothing.
        let begin = if read_only {
            "BEGIN"
        } else {
            "BEGIN IMMEDIATE"
        };
        db.exec(begin).map_err(|e| match e {
            Error::Busy(_) => ExecFailure::Other(Error::Busy(format!(
                "the primary's write lock stayed taken for exec_timeout_ms ({} ms): another \
                 writer holds it; retry (with the same request id) or raise \
                 repl_config('exec_timeout_ms', N) on the primary",
                limits.timeout_ms
            ))),
            e => ExecFailure::Other(e),
        })?;
        let r = self.exec_in_transaction(req, db, &guard, &limits, read_only);
        police(false);
        match r {
            Ok(answer) if !read_only && answer["duplicate"] != json!(true) => {
                if let Err(e) = db.exec("COMMIT") {
                    if !db.autocommit() {
                        let _ = db.exec("ROLLBACK");
                    }
                    return Err(e.into());
                }
                self.finish(answer)
            }
            Ok(answer) => {
                let _ = db.exec("ROLLBACK");
                self.finish(answer)
            }
            Err(e) => {
                if !db.autocommit() {
                    let _ = db.exec("ROLLBACK");
                }
                Err(e)
            }
        }
    }

    fn finish(&self, mut answer: Value) -> std::result::Result<Value, ExecFailure> {
        // Our commit was claimed under WRITE before COMMIT returned: its LSN is at most the
        // current one (`lsn()` appends what is claimed first; a later commit by someone else
        // only makes the barrier stricter).
        let lsn: Lsn = self.lsn();
        answer["lsn"] = json!(lsn.0);
        answer["lineage"] = json!(self.lineage());
        Ok(answer)
    }

    /// Inside BEGIN: the duplicate check, the script, the request record.
    fn exec_in_transaction(
        &self,
        req: &ExecRequest,
        db: DbRef,
        guard: &Guard,
        limits: &Limits,
        read_only: bool,
    ) -> std::result::Result<Value, ExecFailure> {
        let request_id = req.request_id.as_ref().filter(|_| !read_only);
        if let Some(id) = request_id {
            db.exec(
                "CREATE TABLE IF NOT EXISTS _repl_requests(id TEXT PRIMARY KEY, answer TEXT NOT NULL, at_ms INTEGER NOT NULL)",
            )?;
            let seen = db
                .run_script(
                    "SELECT answer FROM _repl_requests WHERE id = ?",
                    &[SqlValue::Text(id.clone())],
                )
                .map_err(sql_failure)?;
            if let Some(SqlValue::Text(a)) = seen.rows.first().and_then(|r| r.first()) {
                let mut v: Value = serde_json::from_str(a)
                    .map_err(|e| Error::Corrupt(format!("_repl_requests {id}: {e}")))?;
                v["duplicate"] = json!(true);
                return Ok(v);
            }
        }
        let changed_before = db.total_changes();
        let (mut rows, mut bytes) = (0u64, 0u64);
        let mut over: Option<(&'static str, String)> = None;
        let mut count = |row: &[SqlValue]| {
            rows += 1;
            bytes += row.iter().map(value_bytes).sum::<u64>();
            let hit = if rows > limits.max_rows {
                Some((
                    "exec_max_rows",
                    format!("more than exec_max_rows ({}) rows", limits.max_rows),
                ))
            } else if bytes > limits.max_bytes {
                Some((
                    "exec_max_bytes",
                    format!("more than exec_max_bytes ({}) bytes", limits.max_bytes),
                ))
            } else {
                None
            };
            match hit {
                None => Ok(()),
                Some(h) => {
                    over = Some(h);
                    Err(crate::ffi::conn::SqlFailure {
                        code: crate::ffi::conn::SQLITE_TOOBIG,
                        message: "result too large".into(),
                    })
                }
            }
        };
        guard.policing.store(true, Ordering::Release);
        let out = db.run_script_with(&req.sql, &req.params, &mut count);
        guard.policing.store(false, Ordering::Release);
        if let Some(why) = lock(&guard.refused).take() {
            return Err(ExecFailure::Refused(why));
        }
        if let Some((setting, what)) = over {
            return Err(ExecFailure::Limit {
                setting,
                code: crate::ffi::conn::SQLITE_TOOBIG,
                message: format!(
                    "the script produced {what}: nothing was committed; return fewer rows \
                     (LIMIT, narrower columns) or raise repl_config('{setting}', N) on the primary"
                ),
            });
        }
        if guard.timed_out.load(Ordering::Acquire) {
            return Err(ExecFailure::Limit {
                setting: "exec_timeout_ms",
                code: crate::ffi::conn::SQLITE_INTERRUPT,
                message: format!(
                    "the script ran longer than exec_timeout_ms ({} ms) and was stopped: nothing was \
                     committed; make it cheaper or raise repl_config('exec_timeout_ms', N) on the primary",
                    limits.timeout_ms
                ),
            });
        }
        let out = out.map_err(sql_failure)?;
        let wrote = db.total_changes() != changed_before;
        if db.autocommit() {
            // Cannot happen (transaction control is refused); never commit what we did not run.
            return Err(Error::Misuse(
                "the script ended the transaction itself: repl_exec runs it as one transaction"
                    .into(),
            )
            .into());
        }
        let answer = json!({
            "changes": if wrote { out.changes } else { 0 },
            "last_insert_rowid": if wrote { out.last_insert_rowid } else { 0 },
            "columns": out.columns,
            "rows": out.rows.iter().map(|r| r.iter().map(value_to_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "duplicate": false,
        });
        // Only a script that changed something is recorded: a read (SELECT, or a write
        // that matched no row) commits nothing, so it creates no LSN, and running it again
        // on a retry is harmless.
        if let Some(id) = request_id.filter(|_| wrote) {
            let now = now_ms();
            db.run_script(
                "INSERT INTO _repl_requests(id, answer, at_ms) VALUES (?, ?, ?); \
                 DELETE FROM _repl_requests WHERE at_ms < ?",
                &[
                    SqlValue::Text(id.clone()),
                    SqlValue::Text(answer.to_string()),
                    SqlValue::Int(now as i64),
                    SqlValue::Int(now.saturating_sub(KEEP_MS) as i64),
                ],
            )
            .map_err(sql_failure)?;
        }
        Ok(answer)
    }
}

fn sql_failure(f: crate::ffi::conn::SqlFailure) -> Error {
    Error::Sql {
        code: f.code,
        message: f.message,
    }
}

/// The primary as the server's `/v1/exec` handler: off unless `repl_config('exec', 1)`, and
/// gone once the primary is dropped.
pub(crate) struct Forwarded(pub std::sync::Weak<Primary>);

impl Handler for Forwarded {
    fn exec(&self, req: &ExecRequest) -> Option<std::result::Result<Value, ExecFailure>> {
        let p = self.0.upgrade()?;
        if let Some(e) = p.fenced_error() {
            return Some(Err(ExecFailure::Other(e)));
        }
        Some(match p.exec_enabled() {
            Ok(true) => p.exec_checked(req),
            Ok(false) => Err(ExecFailure::Off),
            Err(e) => Err(ExecFailure::Other(e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(
        action: i32,
        arg1: Option<&str>,
        arg2: Option<&str>,
        db: Option<&str>,
    ) -> Option<String> {
        refusal(&AuthRequest {
            action,
            arg1,
            arg2,
            db,
            inner: None,
        })
    }

    #[test]
    fn the_authorizer_allows_what_a_forwarded_write_needs_and_names_what_it_refuses() {
        // INSERT, UPDATE, DELETE, SELECT, READ, CREATE TABLE/INDEX/TRIGGER in main, recursion.
        for action in [18, 23, 9, 21, 20, 2, 1, 7, 33] {
            assert_eq!(ask(action, Some("t"), None, Some("main")), None, "{action}");
        }
        assert!(ask(22, Some("COMMIT"), None, None)
            .unwrap()
            .contains("COMMIT is refused"));
        assert!(ask(32, Some("BEGIN"), Some("s"), None).is_some());
        assert!(ask(24, Some("/x.db"), None, None)
            .unwrap()
            .contains("ATTACH"));
        assert!(ask(5, Some("tr"), Some("t"), Some("temp"))
            .unwrap()
            .contains("TEMP"));
        assert!(ask(19, Some("query_only"), Some("1"), None)
            .unwrap()
            .contains("PRAGMA query_only=1"));
        assert!(
            ask(19, Some("query_only"), None, None).is_some(),
            "not a listed read"
        );
        assert_eq!(ask(19, Some("user_version"), None, Some("main")), None);
        assert!(ask(19, Some("user_version"), Some("7"), Some("main")).is_some());
        assert_eq!(ask(19, Some("table_info"), Some("t"), None), None);
        assert!(ask(31, None, Some("load_extension"), None).is_some());
        assert!(ask(31, None, Some("REPL_CONFIG"), None).is_some());
        assert_eq!(ask(31, None, Some("json_extract"), None), None);
        assert!(ask(9, Some("_repl_requests"), None, Some("main")).is_some());
        assert_eq!(
            ask(20, Some("_repl_requests"), Some("id"), Some("main")),
            None
        );
        let inner = refusal(&AuthRequest {
            action: 31,
            arg1: None,
            arg2: Some("repl_lsn"),
            db: None,
            inner: Some("trg"),
        });
        assert!(inner.unwrap().ends_with("(inside trg)"));
    }

    #[test]
    fn the_first_keyword_skips_comments() {
        assert_eq!(first_keyword("  vacuum into 'x'"), "VACUUM");
        assert_eq!(first_keyword("/* a */ -- b\n VACUUM"), "VACUUM");
        assert_eq!(first_keyword("-- only a comment"), "");
        assert_eq!(first_keyword("/* unterminated"), "");
        assert_eq!(first_keyword("SELECT 1"), "SELECT");
    }
}
