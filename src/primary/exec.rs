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
//! belong to the transport; this file only runs a parsed request.

use super::{lock, Primary};
use crate::error::{Error, Result};
use crate::ffi::conn::{OwnedDb, SqlValue};
use crate::transport::exec::{value_to_json, ExecRequest, Handler};
use crate::types::Lsn;
use crate::util::now_ms;
use serde_json::{json, Value};
use std::sync::Weak;

/// Request ids are kept this long.
const KEEP_MS: u64 = 24 * 3600 * 1000;

impl Primary {
    /// Runs `req` as one transaction; the answer is the JSON of `/v1/exec`.
    pub fn exec(&self, req: &ExecRequest) -> Result<Value> {
        let mut g = lock(&self.exec_conn);
        if g.is_none() {
            let c = OwnedDb::open(
                &self.db_path,
                crate::ffi::SQLITE_OPEN_READWRITE,
                Some(crate::vfs::VFS_NAME),
            )?;
            c.busy_timeout(10_000);
            *g = Some(c);
        }
        let conn = g.as_ref().expect("opened above");
        let db = conn.db();
        let sql_err = |f: crate::ffi::conn::SqlFailure| Error::Sql {
            code: f.code,
            message: f.message,
        };
        db.exec("BEGIN IMMEDIATE")?;
        let r = (|| -> Result<Value> {
            if let Some(id) = &req.request_id {
                db.exec(
                    "CREATE TABLE IF NOT EXISTS _repl_requests(id TEXT PRIMARY KEY, answer TEXT NOT NULL, at_ms INTEGER NOT NULL)",
                )?;
                let seen = db
                    .run_script(
                        "SELECT answer FROM _repl_requests WHERE id = ?",
                        &[SqlValue::Text(id.clone())],
                    )
                    .map_err(sql_err)?;
                if let Some(SqlValue::Text(a)) = seen.rows.first().and_then(|r| r.first()) {
                    let mut v: Value = serde_json::from_str(a)
                        .map_err(|e| Error::Corrupt(format!("_repl_requests {id}: {e}")))?;
                    v["duplicate"] = json!(true);
                    return Ok(v);
                }
            }
            // A fresh rowid and change count: the connection is shared by every request, and
            // a script that inserts nothing must not report another request's rowid.
            db.set_last_insert_rowid(0);
            let changed_before = db.total_changes();
            let out = db.run_script(&req.sql, &req.params).map_err(sql_err)?;
            let wrote = db.total_changes() != changed_before;
            if db.autocommit() {
                return Err(Error::Misuse(
                    "the script ended the transaction itself (COMMIT/ROLLBACK/END): repl_exec runs it as one \
                     transaction; send the statements without BEGIN/COMMIT"
                        .into(),
                ));
            }
            let answer = json!({
                // sqlite3_changes() keeps the count of the last write on the connection: a
                // script that wrote nothing reports 0, not another request's count.
                "changes": if wrote { out.changes } else { 0 },
                "last_insert_rowid": out.last_insert_rowid,
                "columns": out.columns,
                "rows": out.rows.iter().map(|r| r.iter().map(value_to_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "duplicate": false,
            });
            // Only a script that changed something is recorded: a read (SELECT, or a write
            // that matched no row) commits nothing, so it creates no LSN, and running it again
            // on a retry is harmless.
            if let Some(id) = req.request_id.as_ref().filter(|_| wrote) {
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
                .map_err(sql_err)?;
            }
            Ok(answer)
        })();
        let mut answer = match r {
            Ok(a) if a["duplicate"] == json!(true) => {
                let _ = db.exec("ROLLBACK");
                a
            }
            Ok(a) => {
                if let Err(e) = db.exec("COMMIT") {
                    if !db.autocommit() {
                        let _ = db.exec("ROLLBACK");
                    }
                    return Err(e);
                }
                a
            }
            Err(e) => {
                if !db.autocommit() {
                    let _ = db.exec("ROLLBACK");
                }
                return Err(e);
            }
        };
        // Our commit was captured under WRITE before COMMIT returned: its LSN is at most the
        // current one (a later commit by someone else only makes the barrier stricter).
        let lsn: Lsn = self.lsn();
        answer["lsn"] = json!(lsn.0);
        answer["lineage"] = json!(self.lineage());
        Ok(answer)
    }
}

/// The `/v1/exec` handler of a primary serving its log from this process (`Primary::serve`):
/// holds the primary weakly, so a server outliving it answers "shutting down".
pub(crate) struct Forwarded(pub Weak<Primary>);

impl Handler for Forwarded {
    fn exec(&self, req: &ExecRequest) -> Option<Result<Value>> {
        Some(self.0.upgrade()?.exec(req))
    }
}
