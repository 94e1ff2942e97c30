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
//! JSON values (params and rows): null, integers, reals, strings, and `{"blob": "<hex>"}`.

use super::{lock, Primary};
use crate::error::{Error, Result};
use crate::ffi::conn::{OwnedDb, SqlValue};
use crate::types::Lsn;
use serde_json::{json, Value};

/// Request ids are kept this long.
const KEEP_MS: u64 = 24 * 3600 * 1000;

/// A parsed `/v1/exec` request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub sql: String,
    pub params: Vec<SqlValue>,
    pub request_id: Option<String>,
}

/// JSON → parameter values, or a message saying what is wrong.
pub fn params_from_json(v: &Value) -> std::result::Result<Vec<SqlValue>, String> {
    let bad =
        "params must be a JSON array of null, numbers, strings, booleans or {\"blob\": \"<hex>\"}";
    let Value::Array(items) = v else {
        return Err(format!("{bad}; got {}", short(v)));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            Ok(match x {
                Value::Null => SqlValue::Null,
                Value::Bool(b) => SqlValue::Int(*b as i64),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => SqlValue::Int(i),
                    None => SqlValue::Real(n.as_f64().unwrap_or(f64::NAN)),
                },
                Value::String(s) => SqlValue::Text(s.clone()),
                Value::Object(o)
                    if o.len() == 1 && o.get("blob").is_some_and(|b| b.is_string()) =>
                {
                    SqlValue::Blob(
                        unhex(o["blob"].as_str().unwrap_or(""))
                            .ok_or_else(|| format!("params[{i}]: the blob is not hex"))?,
                    )
                }
                other => return Err(format!("{bad}; params[{i}] is {}", short(other))),
            })
        })
        .collect()
}

fn short(v: &Value) -> String {
    // At most 60 characters (not bytes: a byte cut may split a character and panic; found by
    // the http_input fuzz target).
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

pub fn value_to_json(v: &SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Int(i) => json!(i),
        SqlValue::Real(f) => json!(f),
        SqlValue::Text(t) => json!(t),
        SqlValue::Blob(b) => json!({ "blob": hex(b) }),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses a `/v1/exec` body: `{"sql": "...", "params": [...], "request_id": "..."}`.
pub fn request_from_json(v: &Value) -> std::result::Result<ExecRequest, String> {
    let sql = v["sql"]
        .as_str()
        .filter(|s| !s.trim().is_empty())
        .ok_or("the body must be a JSON object with \"sql\": the statement(s) to run")?
        .to_string();
    let params = match &v["params"] {
        Value::Null => Vec::new(),
        p => params_from_json(p)?,
    };
    let request_id = match &v["request_id"] {
        Value::Null => None,
        Value::String(s) if !s.is_empty() && s.len() <= 200 => Some(s.clone()),
        _ => return Err("request_id must be a non-empty string of at most 200 characters".into()),
    };
    Ok(ExecRequest {
        sql,
        params,
        request_id,
    })
}

fn now_ms() -> u64 {
    super::now_ms()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_bad_ones_are_named() {
        let v: Value =
            serde_json::from_str(r#"[null, 1, 2.5, "x", true, {"blob": "00ff"}]"#).unwrap();
        let p = params_from_json(&v).unwrap();
        assert_eq!(
            p,
            vec![
                SqlValue::Null,
                SqlValue::Int(1),
                SqlValue::Real(2.5),
                SqlValue::Text("x".into()),
                SqlValue::Int(1),
                SqlValue::Blob(vec![0, 255])
            ]
        );
        assert_eq!(
            value_to_json(&SqlValue::Blob(vec![0, 255])),
            json!({"blob": "00ff"})
        );
        assert!(params_from_json(&json!({"a": 1}))
            .unwrap_err()
            .contains("JSON array"));
        assert!(params_from_json(&json!([[1]]))
            .unwrap_err()
            .contains("params[0]"));
        assert!(params_from_json(&json!([{"blob": "0g"}]))
            .unwrap_err()
            .contains("not hex"));
        assert!(request_from_json(&json!({"params": []})).is_err());
        assert!(request_from_json(&json!({"sql": "x", "request_id": 5})).is_err());
        let r = request_from_json(&json!({"sql": "INSERT", "request_id": "a"})).unwrap();
        assert_eq!(r.request_id.as_deref(), Some("a"));
        assert!(r.params.is_empty());
    }
}
