//! The `/v1/exec` wire format (write forwarding, issue 5) and its HTTP boundary: a replica's
//! `repl_exec` sends a statement or script with parameters and an optional request id; the
//! server hands the parsed request to a `Handler` (a primary in the serving process) and maps
//! the outcome to an HTTP status here, so the roles never see HTTP.
//!
//! JSON values (params and rows): null, integers, reals, strings, and `{"blob": "<hex>"}`.

use crate::error::Error;
use crate::ffi::conn::SqlValue;
use crate::util::{hex, unhex};
use serde_json::{json, Value};

/// Runs forwarded writes (a primary in this process).
pub trait Handler: Send + Sync {
    /// Runs `req` as one transaction; the answer is the JSON of `/v1/exec`. None: whoever ran
    /// writes is gone (shutting down).
    fn exec(&self, req: &ExecRequest) -> Option<std::result::Result<Value, ExecFailure>>;
}

/// `SQLITE_AUTH`: a statement the exec rules refuse.
pub const SQLITE_AUTH: i32 = crate::ffi::conn::SQLITE_AUTH;

/// Why a request was not run, or stopped: each maps to one HTTP answer (`respond`) and to an
/// `Error` for local callers (`repl_exec` on the primary itself).
#[derive(Debug)]
pub enum ExecFailure {
    /// Forwarded writes are off on this primary (`repl_config('exec', 1)` turns them on).
    Off,
    /// The authorizer (or the VACUUM check) refused a statement: nothing ran.
    Refused(String),
    /// A limit was reached (`setting` names it): the transaction was rolled back.
    Limit {
        setting: &'static str,
        code: i32,
        message: String,
    },
    /// Anything else (an SQL error of the script, busy, I/O).
    Other(Error),
}

impl From<Error> for ExecFailure {
    fn from(e: Error) -> Self {
        ExecFailure::Other(e)
    }
}

impl From<ExecFailure> for Error {
    fn from(f: ExecFailure) -> Self {
        match f {
            ExecFailure::Off => Error::Misuse(OFF.into()),
            ExecFailure::Refused(m) => Error::Sql {
                code: SQLITE_AUTH,
                message: m,
            },
            ExecFailure::Limit { code, message, .. } => Error::Sql { code, message },
            ExecFailure::Other(e) => e,
        }
    }
}

const OFF: &str =
    "forwarded writes are off on this primary: run repl_config('exec', 1) on it to accept \
                   them (see docs/SQL.md, repl_exec)";

/// The HTTP answer to a `/v1/exec` body: 400 for a request that does not parse, 200 with the
/// answer, 422 for an SQL error (with its SQLite code), 503 when busy or shutting down, 500
/// for anything else.
pub fn respond(handler: &dyn Handler, body: &Value) -> (u16, Value) {
    let req = match request_from_json(body) {
        Ok(r) => r,
        Err(m) => return (400, json!({ "error": m })),
    };
    match handler.exec(&req) {
        None => (503, json!({"error": "the primary is shutting down"})),
        Some(Ok(a)) => (200, a),
        Some(Err(f)) => failure_answer(f),
    }
}

/// The HTTP status and body of a failed request.
fn failure_answer(f: ExecFailure) -> (u16, Value) {
    match f {
        ExecFailure::Off => (403, json!({ "error": OFF })),
        ExecFailure::Refused(m) => (
            422,
            json!({"error": m, "code": SQLITE_AUTH, "refused": true}),
        ),
        ExecFailure::Limit {
            setting,
            code,
            message,
        } => (
            422,
            json!({"error": message, "code": code, "limit": setting}),
        ),
        ExecFailure::Other(Error::Sql { code, message }) => {
            (422, json!({"error": message, "code": code}))
        }
        // A deposed primary (fencing, FORMAT.md §8.1): nothing ran.
        ExecFailure::Other(e @ Error::ReadOnly(_)) => (
            409,
            json!({"error": e.to_string(), "code": e.sqlite_code()}),
        ),
        ExecFailure::Other(e) => (
            if matches!(e, Error::Busy(_)) {
                503
            } else {
                500
            },
            json!({"error": e.to_string(), "code": e.sqlite_code()}),
        ),
    }
}

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
