//! The HTTP source: a primary's `/v1/*` endpoints (docs/FORMAT.md §8) read with `ureq`,
//! behaving exactly like the directory source. Every record is decoded and validated (header
//! and record checksums, dense LSNs from the one asked for, the count the server announced)
//! before it leaves here; the replica then checks database checksums before writing. A
//! dropped connection, a truncated body or a flipped byte is an error for this fetch and
//! nothing is applied; the next sync retries.
//!
//! Token: `token=` in the URL's query, else `REPL_TOKEN`. It is sent as a bearer token and
//! never shown (`describe()` and errors print the URL without it).

use super::{Fetch, Source, SourceInfo};
use crate::error::{Error, Result};
use crate::txlog::{decode_record, DbChecksum, Record, SEGMENT_HEADER_LEN};
use crate::types::Lsn;
use std::io::Read;
use std::time::Duration;

/// Largest snapshot accepted in one response (the snapshot is held in memory).
const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

pub struct HttpSource {
    /// `http://host:port` (no trailing slash, no query).
    base: String,
    token: Option<String>,
    /// The token sent with `/v1/exec` (`exec_token=`, else `REPL_EXEC_TOKEN`, else `token`).
    exec_token: Option<String>,
    agent: ureq::Agent,
    follower: String,
    /// From the headers of the last /v1/log response.
    last: std::sync::Mutex<Option<SourceInfo>>,
}

/// The URL without its `token=` parameter (for messages and status). Other parameters keep
/// only their key: the value of a misspelt `token=` is a secret too.
pub fn redact(spec: &str) -> String {
    match spec.split_once('?') {
        None => spec.to_string(),
        Some((base, q)) => {
            let kept: Vec<String> = q
                .split('&')
                .map(|kv| kv.split_once('=').map_or(kv, |(k, _)| k))
                .filter(|k| !k.is_empty() && !k.eq_ignore_ascii_case("token"))
                .map(|k| format!("{k}=…"))
                .collect();
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
    }
}

impl HttpSource {
    pub fn open(spec: &str) -> Result<HttpSource> {
        let s = spec.trim();
        if s.starts_with("https://") {
            return Err(Error::Unsupported(format!(
                "repl_sync('{}'): https is not built in; put a TLS proxy in front of the primary and use \
                 http:// on the private side",
                redact(s)
            )));
        }
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| Error::Misuse(format!("not an http:// URL: {}", redact(s))))?;
        let (hostport, query) = match rest.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (rest, None),
        };
        let hostport = hostport.trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            return Err(Error::Misuse(format!(
                "repl_sync('{}'): use the primary's address only, e.g. http://127.0.0.1:7070",
                redact(s)
            )));
        }
        let mut token = None;
        let mut exec_token = None;
        for kv in query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("token", t)) if !t.is_empty() => token = Some(t.to_string()),
                Some(("exec_token", t)) if !t.is_empty() => exec_token = Some(t.to_string()),
                Some((k @ ("token" | "exec_token"), _)) => {
                    return Err(Error::Misuse(format!(
                    "repl_sync('{}'): {k}= is empty; give the primary's token, or leave {k}= out \
                         and set REPL_{}",
                    redact(s),
                    k.to_ascii_uppercase()
                )))
                }
                _ => {
                    // Only the key: the value may be a misspelt token= (a secret).
                    let key = kv.split_once('=').map_or(kv, |(k, _)| k);
                    return Err(Error::Misuse(format!(
                        "repl_sync('{}'): unknown URL parameter {key:?} (only token= and exec_token= are understood)",
                        redact(s)
                    )));
                }
            }
        }
        let token = token.or_else(|| std::env::var("REPL_TOKEN").ok().filter(|t| !t.is_empty()));
        let exec_token = exec_token.or_else(|| {
            std::env::var("REPL_EXEC_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
        });
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .build();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        Ok(HttpSource {
            base: format!("http://{hostport}"),
            token,
            exec_token,
            agent,
            follower: format!("{host}:{}", std::process::id()),
            last: std::sync::Mutex::new(None),
        })
    }

    /// Names this follower in the primary's metrics (e.g. the replica's path).
    pub fn set_follower(&mut self, name: &str) {
        let host = self
            .follower
            .split(':')
            .next()
            .unwrap_or("host")
            .to_string();
        self.follower = format!("{host}:{name}");
    }

    fn get(&self, path: &str, timeout: Duration) -> Result<ureq::Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .get(&url)
            .timeout(timeout)
            .set("X-Repl-Follower", &self.follower);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let body = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or(body);
                Err(status_error(code, &self.base, &msg))
            }
            Err(ureq::Error::Transport(t)) => Err(Error::Other(format!(
                "cannot reach the primary at {}: {t}; the replica stays readable at its current LSN and the next \
                 repl_sync() retries",
                self.base
            ))),
        }
    }

    /// The records after `from`, waiting up to `wait` at the durable end (server long-poll).
    fn log(&self, from: Lsn, max_bytes: usize, wait: Duration) -> Result<Fetch> {
        let path = format!(
            "/v1/log?from={}&max_bytes={}&wait_ms={}",
            from.0,
            max_bytes.clamp(1, 256 << 20),
            wait.as_millis()
        );
        let resp = match self.get(&path, wait + Duration::from_secs(30)) {
            Ok(r) => r,
            Err(Error::Other(m)) if m.starts_with("HTTP 410") => {
                let first = m
                    .split("first_lsn=")
                    .nth(1)
                    .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(from.0 + 1);
                return Ok(Fetch::Truncated {
                    first_lsn: Lsn(first),
                });
            }
            Err(e) => return Err(e),
        };
        let num = |h: &str| resp.header(h).and_then(|v| v.parse::<u64>().ok());
        let info = resp.header("X-Repl-Lineage").map(|l| SourceInfo {
            lineage: l.to_string(),
            first_lsn: num("X-Repl-First-Lsn").map(Lsn),
            durable_lsn: num("X-Repl-Durable-Lsn").map(Lsn),
        });
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = info;
        let announced: Option<u32> = resp.header("X-Repl-Records").and_then(|v| v.parse().ok());
        let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
        let mut body = Vec::with_capacity(len.unwrap_or(0).min(64 << 20) as usize);
        resp.into_reader()
            .take(len.unwrap_or(u64::MAX).min(512 << 20))
            .read_to_end(&mut body)
            .map_err(|e| {
                Error::Other(format!(
                    "the connection to {} broke while reading records at LSN {from}: {e}; nothing was applied, \
                     the next repl_sync() retries",
                    self.base
                ))
            })?;
        if let Some(l) = len {
            if body.len() as u64 != l {
                return Err(Error::Corrupt(format!(
                    "{}: the response for LSN {from} was cut short ({} of {l} bytes); nothing was applied",
                    self.base,
                    body.len()
                )));
            }
        }
        let records = decode_all(&body, from).map_err(|e| {
            Error::Corrupt(format!(
                "{}: a record received for LSN {from} is invalid ({e}); nothing was applied, the next repl_sync() \
                 retries",
                self.base
            ))
        })?;
        if let Some(n) = announced {
            if n as usize != records.len() {
                return Err(Error::Corrupt(format!(
                    "{}: the server announced {n} records for LSN {from} but sent {}; nothing was applied",
                    self.base,
                    records.len()
                )));
            }
        }
        Ok(Fetch::Records(records))
    }
}

fn status_error(code: u16, base: &str, msg: &str) -> Error {
    match code {
        401 => Error::Misuse(format!(
            "the primary at {base} refused the request (401): {msg}; give the token as ?token= in the URL or in REPL_TOKEN"
        )),
        410 => {
            // Keep first_lsn machine-readable for `log` (the message itself is the server's).
            let first = msg
                .split("starts at LSN ")
                .nth(1)
                .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
                .unwrap_or("");
            Error::Other(format!("HTTP 410 first_lsn={first}: {msg}"))
        }
        _ => Error::Other(format!("the primary at {base} answered HTTP {code}: {msg}")),
    }
}

/// Decodes a body of concatenated records, which must start at `from` and be dense.
pub fn decode_all(mut b: &[u8], from: Lsn) -> Result<Vec<Record>> {
    let mut out: Vec<Record> = Vec::new();
    let mut want = from;
    while !b.is_empty() {
        let (r, used) = decode_record(b)?;
        if r.meta.lsn != want {
            return Err(Error::Corrupt(format!(
                "expected LSN {want}, got LSN {}",
                r.meta.lsn
            )));
        }
        want = want.next();
        out.push(r);
        b = &b[used..];
    }
    Ok(out)
}

impl Source for HttpSource {
    fn describe(&self) -> String {
        self.base.clone()
    }

    fn info(&self) -> Result<SourceInfo> {
        let body = self
            .get("/v1/info", Duration::from_secs(10))?
            .into_string()
            .map_err(|e| Error::Other(format!("{}: reading /v1/info: {e}", self.base)))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::Corrupt(format!("{}: /v1/info is not JSON: {e}", self.base)))?;
        let lineage = v["lineage"]
            .as_str()
            .ok_or_else(|| Error::Corrupt(format!("{}: /v1/info has no lineage", self.base)))?
            .to_string();
        Ok(SourceInfo {
            lineage,
            first_lsn: v["first_lsn"].as_u64().map(Lsn),
            durable_lsn: v["durable_lsn"].as_u64().map(Lsn),
        })
    }

    fn page_size(&self) -> Result<Option<crate::types::PageSize>> {
        let body = self
            .get("/v1/info", Duration::from_secs(10))?
            .into_string()
            .map_err(|e| Error::Other(format!("{}: reading /v1/info: {e}", self.base)))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| Error::Corrupt(format!("{}: /v1/info is not JSON: {e}", self.base)))?;
        Ok(v["snapshot"]["page_size"]
            .as_u64()
            .and_then(|n| crate::types::PageSize::new(n as u32)))
    }

    fn snapshot(&self) -> Result<Record> {
        self.snapshot_progress(&mut |_, _| {})
    }

    fn snapshot_progress(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Record> {
        let resp = self.get("/v1/snapshot", Duration::from_secs(3600))?;
        let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
        let mut body = Vec::with_capacity(len.unwrap_or(0).min(1 << 30) as usize);
        let mut rd = resp
            .into_reader()
            .take(len.unwrap_or(MAX_SNAPSHOT_BYTES).min(MAX_SNAPSHOT_BYTES));
        let broke = |e: std::io::Error| {
            Error::Other(format!(
                "the snapshot download from {} broke: {e}; nothing was written, retry repl_sync()",
                self.base
            ))
        };
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = rd.read(&mut chunk).map_err(broke)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
            progress(body.len() as u64, len.unwrap_or(0));
        }
        if len.is_some_and(|l| l != body.len() as u64) || body.len() < SEGMENT_HEADER_LEN {
            return Err(Error::Corrupt(format!(
                "{}: the snapshot was cut short ({} bytes); nothing was written, retry repl_sync()",
                self.base,
                body.len()
            )));
        }
        let bad = |e: String| {
            Error::Corrupt(format!(
                "{}: the snapshot is invalid ({e}); nothing was written",
                self.base
            ))
        };
        crate::txlog::decode_segment_header(&body[..SEGMENT_HEADER_LEN])
            .map_err(|e| bad(e.to_string()))?;
        let (rec, used) =
            decode_record(&body[SEGMENT_HEADER_LEN..]).map_err(|e| bad(e.to_string()))?;
        if !rec.meta.snapshot || SEGMENT_HEADER_LEN + used != body.len() {
            return Err(bad("not exactly one SNAPSHOT record".into()));
        }
        let mut sums = DbChecksum::new(rec.meta.page_size);
        for p in &rec.pages {
            sums.set_page(p.pgno, &p.data);
        }
        sums.truncate(rec.meta.commit_size);
        if sums.total() != rec.meta.db_checksum {
            return Err(bad(format!(
                "database checksum {} but the pages give {}",
                rec.meta.db_checksum,
                sums.total()
            )));
        }
        Ok(rec)
    }

    fn fetch(&self, from: Lsn, max_bytes: usize) -> Result<Fetch> {
        self.log(from, max_bytes, Duration::ZERO)
    }

    fn exec(&self, body: &serde_json::Value) -> Result<serde_json::Value> {
        let url = format!("{}/v1/exec", self.base);
        let text = body.to_string();
        // A request id makes the retry safe: the primary answers a duplicate from its record.
        let attempts = if body["request_id"].is_string() { 2 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            let mut req = self
                .agent
                .post(&url)
                .timeout(Duration::from_secs(60))
                .set("Content-Type", "application/json")
                .set("X-Repl-Follower", &self.follower);
            if let Some(t) = self.exec_token.as_ref().or(self.token.as_ref()) {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            match req.send_string(&text) {
                Ok(r) => {
                    let s = r.into_string().map_err(|e| {
                        Error::Other(format!(
                            "{}: reading the answer of /v1/exec: {e}",
                            self.base
                        ))
                    })?;
                    return serde_json::from_str(&s).map_err(|e| {
                        Error::Corrupt(format!("{}: /v1/exec answered non-JSON: {e}", self.base))
                    });
                }
                Err(ureq::Error::Status(code, r)) => {
                    let body = r.into_string().unwrap_or_default();
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let msg = v["error"].as_str().map_or(body.clone(), str::to_string);
                    return Err(match code {
                        422 => Error::Sql {
                            code: v["code"].as_i64().unwrap_or(1) as i32,
                            message: format!("the primary refused the write: {msg}"),
                        },
                        _ => status_error(code, &self.base, &msg),
                    });
                }
                Err(ureq::Error::Transport(t)) => last = Some(t.to_string()),
            }
        }
        Err(Error::Other(format!(
            "repl_exec(): cannot reach the primary at {}: {}; the write may or may not have been applied: \
             retry with the same request id to find out (it runs at most once)",
            self.base,
            last.unwrap_or_default()
        )))
    }

    fn last_info(&self) -> Option<SourceInfo> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fetch_wait(&self, from: Lsn, max_bytes: usize, wait: Duration) -> Result<Fetch> {
        self.log(from, max_bytes, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_tokens_never_show() {
        let s = HttpSource::open("http://127.0.0.1:7070/?token=s3cret").unwrap();
        assert_eq!(s.describe(), "http://127.0.0.1:7070");
        assert_eq!(s.token.as_deref(), Some("s3cret"));
        assert_eq!(redact("http://h:1?token=s3cret"), "http://h:1");
        assert_eq!(redact("http://h:1?token=s3cret&x=1"), "http://h:1?x=…");
        assert_eq!(
            redact("http://h:1?Token=s3cret&tokn=s3cret"),
            "http://h:1?tokn=…"
        );
        assert!(HttpSource::open("http://h:1/v1/log").is_err());
        assert!(HttpSource::open("http://h:1?tok=1").is_err());
        for spec in [
            "http://h:1?tokn=s3cret",
            "http://h:1?Token=s3cret",
            "http://h:1?token=",
        ] {
            let e = HttpSource::open(spec).err().expect("refused").to_string();
            assert!(!e.contains("s3cret") && e.contains("token"), "{e}");
        }
        assert!(matches!(
            HttpSource::open("https://h:1"),
            Err(Error::Unsupported(_))
        ));
        assert!(HttpSource::open("http://").is_err());
    }

    #[test]
    fn bodies_must_be_dense_records_from_the_lsn_asked() {
        assert!(decode_all(&[], Lsn(5)).unwrap().is_empty());
        assert!(decode_all(&[1, 2, 3], Lsn(5)).is_err());
    }
}
