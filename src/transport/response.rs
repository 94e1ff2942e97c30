//! The HTTP building blocks of the log server: responses (JSON, errors, bodies framed with
//! Content-Length), request headers and query parameters, and the constant-time token compare.

use std::io::Read;
use tiny_http::{Header, Request, Response, StatusCode};

pub(super) type Resp = Response<Box<dyn Read + Send>>;

pub(super) fn header(name: &str, value: impl std::fmt::Display) -> Header {
    Header::from_bytes(name.as_bytes(), value.to_string().as_bytes()).expect("valid header")
}

/// A response of `len` bytes when known. tiny_http switches bodies of 32 KiB or more to
/// `Transfer-Encoding: chunked` (no Content-Length) by default; the protocol promises
/// Content-Length framing so that a client can check it received the whole body before it
/// decodes anything: raise the threshold so a known length is always sent as Content-Length.
pub(super) fn boxed<R: Read + Send + 'static>(
    status: u16,
    r: R,
    len: Option<usize>,
    headers: Vec<Header>,
) -> Resp {
    let resp = Response::new(
        StatusCode(status),
        headers,
        Box::new(r) as Box<dyn Read + Send>,
        len,
        None,
    );
    if len.is_some() {
        resp.with_chunked_threshold(usize::MAX)
    } else {
        resp
    }
}

pub(super) fn json_response(status: u16, v: &serde_json::Value) -> Resp {
    let body = v.to_string().into_bytes();
    let len = body.len();
    boxed(
        status,
        std::io::Cursor::new(body),
        Some(len),
        vec![header("Content-Type", "application/json")],
    )
}

pub(super) fn error_response(status: u16, msg: &str) -> Resp {
    json_response(status, &serde_json::json!({ "error": msg }))
}

/// Constant-time comparison (the length is not secret).
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn header_value(req: &Request, name: &'static str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str().to_string())
}

/// `?a=1&b=2` → pairs (no percent-decoding: every parameter is a number).
pub(super) fn query(url: &str) -> (&str, Vec<(&str, &str)>) {
    match url.split_once('?') {
        None => (url, Vec::new()),
        Some((path, q)) => (
            path,
            q.split('&')
                .filter(|s| !s.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect(),
        ),
    }
}

/// A parameter as an integer in `range`, or a 400 message naming it.
pub(super) fn num(
    params: &[(&str, &str)],
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> std::result::Result<Option<u64>, String> {
    let Some((_, v)) = params.iter().rev().find(|(k, _)| *k == name) else {
        return Ok(None);
    };
    let bad = || {
        format!(
            "{name} must be a decimal integer between {} and {}, got {v:?}",
            range.start(),
            range.end()
        )
    };
    if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match v.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(bad()),
    }
}
