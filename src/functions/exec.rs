//! `repl_exec` and `repl_exec_json`: a write forwarded to the primary (or run there).

use super::args::{self, Args};
use super::main_db_checked;
use crate::error::{Error, Result};
use crate::ffi::conn::SqlValue;
use crate::ffi::func::Call;

/// `repl_exec(sql [, params_json [, request_id]])`: run a write on the primary as one
/// transaction (forwarded over HTTP from a replica, locally on a primary); on a replica, wait
/// until it holds the commit. Returns the commit's LSN.
pub(super) fn repl_exec(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    let answer = exec_any(c, a, "repl_exec")?;
    Ok(SqlValue::Int(answer["lsn"].as_i64().unwrap_or(0)))
}

/// `repl_exec_json(...)`: `repl_exec`, returning the primary's whole answer as JSON (`lsn`,
/// `lineage`, `changes`, `last_insert_rowid`, `columns`, `rows`, `duplicate`).
pub(super) fn repl_exec_json(c: &Call, a: &[SqlValue]) -> Result<SqlValue> {
    Ok(SqlValue::Text(
        exec_any(c, a, "repl_exec_json")?.to_string(),
    ))
}

fn exec_any(c: &Call, a: &[SqlValue], what: &'static str) -> Result<serde_json::Value> {
    if a.is_empty() || a.len() > 3 {
        return Err(Error::Misuse(format!(
            "{what}() takes the SQL, optional params as a JSON array, and an optional request id"
        )));
    }
    let args = Args::new(what, a);
    let Some(SqlValue::Text(sql)) = args.get(0) else {
        return Err(args.bad(
            0,
            "SQL",
            "text",
            &args::describe(args.get(0).unwrap_or(&SqlValue::Null)),
        ));
    };
    let params = match args.text(1, "params (a JSON array as text)")? {
        None => serde_json::json!([]),
        Some(t) => serde_json::from_str::<serde_json::Value>(&t).map_err(|e| {
            Error::Misuse(format!(
                "{what}(): params must be a JSON array (e.g. '[1, \"x\"]'); {e}"
            ))
        })?,
    };
    crate::transport::exec::params_from_json(&params)
        .map_err(|m| Error::Misuse(format!("{what}(): {m}")))?;
    let request_id = match args.text_or_int(2, "request id")? {
        None => None,
        Some(t) if !t.is_empty() => Some(t),
        Some(_) => return Err(args.bad(2, "request id", "non-empty text", "the text ''")),
    };
    let (entry, path) = main_db_checked(c.db, &format!("{what}()"))?;
    if let Some(p) = entry.primary() {
        let req = crate::transport::exec::ExecRequest {
            sql: sql.clone(),
            params: crate::transport::exec::params_from_json(&params).map_err(Error::Misuse)?,
            request_id,
        };
        return p.exec(&req);
    }
    if let Some(r) = entry.replica() {
        // Always send a request id: it makes the client's own retry safe.
        let id = request_id.unwrap_or_else(random_id);
        let body = serde_json::json!({"sql": sql, "params": params, "request_id": id});
        return r.forward_exec(&body, std::time::Duration::from_secs(10));
    }
    Err(Error::Misuse(format!(
        "{what}(): {path} is neither a primary nor a replica: writes go to the primary"
    )))
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    let _ = crate::util::urandom(&mut b);
    crate::util::hex(&b)
}
