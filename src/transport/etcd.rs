//! A small client of etcd's v3 API over its HTTP/JSON gateway (issue 16, automatic failover):
//! `POST /v3/kv/range`, `/v3/kv/put`, `/v3/kv/deleterange`, `/v3/kv/txn`, `/v3/lease/grant`,
//! `/v3/lease/keepalive`, `/v3/lease/revoke`. Keys and values travel base64-encoded, 64-bit
//! integers as decimal strings, and fields equal to zero are left out of answers (proto3 JSON),
//! which is why every decoder here treats a missing number as 0 and a missing list as empty.
//! Blocking ureq calls with a short timeout; each call tries the endpoints of the cluster in
//! turn, starting with the one that answered last. No async runtime, no gRPC.
//!
//! Also the failover URL: `etcd://host:port[,host:port…]/key[?listen=host:port&name=…&ttl_ms=…]`.

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// `repl_config('failover', url)` parsed: where etcd is and what this node is called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverUrl {
    /// `http://host:port` of each etcd member given.
    pub endpoints: Vec<String>,
    /// The leadership key; the election's other keys live under `<key>/`.
    pub key: String,
    /// Where a candidate serves once promoted (`host:port`).
    pub listen: Option<String>,
    /// This node's name among the candidates (default: `listen`, else the database path).
    pub name: Option<String>,
    /// The lease TTL in milliseconds (rounded up to whole seconds for etcd; at least 1 s).
    pub ttl_ms: u64,
}

pub const DEFAULT_TTL_MS: u64 = 2000;

impl FailoverUrl {
    pub fn parse(s: &str) -> Result<FailoverUrl> {
        let bad = |why: &str| {
            Error::Misuse(format!(
                "failover URL {s:?}: {why}; expected etcd://host:port[,host:port…]/key[?listen=host:port&name=…&ttl_ms=…]"
            ))
        };
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| bad("only the etcd:// scheme is supported"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (hosts, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("no key after the host"))?;
        let key = key.trim_end_matches('/');
        if key.is_empty() {
            return Err(bad("the key is empty"));
        }
        let endpoints: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| format!("http://{h}"))
            .collect();
        if endpoints.is_empty() || hosts.split(',').any(|h| !h.contains(':')) {
            return Err(bad("each etcd member must be host:port"));
        }
        let mut url = FailoverUrl {
            endpoints,
            key: key.to_string(),
            listen: None,
            name: None,
            ttl_ms: DEFAULT_TTL_MS,
        };
        for kv in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "listen" if !v.is_empty() => url.listen = Some(v.to_string()),
                "name" if !v.is_empty() => url.name = Some(v.to_string()),
                "ttl_ms" => {
                    url.ttl_ms = v
                        .parse()
                        .ok()
                        .filter(|t| (1000..=600_000).contains(t))
                        .ok_or_else(|| bad("ttl_ms must be 1000..=600000"))?
                }
                _ => return Err(bad(&format!("unknown parameter {k:?}"))),
            }
        }
        Ok(url)
    }

    /// The TTL etcd is given: whole seconds, rounded up.
    pub fn ttl_secs(&self) -> i64 {
        self.ttl_ms.div_ceil(1000) as i64
    }
}

/// One key as etcd returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A comparison of a transaction.
#[derive(Clone, Debug)]
pub enum Cmp {
    /// The key does not exist (`create_revision == 0`).
    Absent(String),
    /// The key's `mod_revision` equals this (0: the key does not exist).
    ModRev(String, i64),
    /// The key is held by this lease.
    Lease(String, i64),
}

/// An operation of a transaction.
#[derive(Clone, Debug)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete(String),
}

pub struct Etcd {
    endpoints: Vec<String>,
    next: AtomicUsize,
    agent: ureq::Agent,
}

impl Etcd {
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Etcd {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout(timeout)
            .build();
        Etcd {
            endpoints,
            next: AtomicUsize::new(0),
            agent,
        }
    }

    /// POSTs `body` to `path` on the first member that answers; the error names every one tried.
    fn call(&self, path: &str, body: &Value) -> Result<Value> {
        let n = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let at = (start + i) % n;
            let url = format!("{}{path}", self.endpoints[at]);
            match self.agent.post(&url).send_string(&body.to_string()) {
                Ok(r) => {
                    let text = r
                        .into_string()
                        .map_err(|e| Error::io(format!("reading etcd's answer from {url}"), e))?;
                    self.next.store(at, Ordering::Relaxed);
                    return serde_json::from_str(&text).map_err(|e| {
                        Error::Other(format!(
                            "etcd {url} answered something that is not JSON: {e}"
                        ))
                    });
                }
                Err(ureq::Error::Status(code, r)) => {
                    let text = r.into_string().unwrap_or_default();
                    errors.push(format!("{url}: HTTP {code} {}", text.trim()));
                }
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        Err(Error::Other(format!(
            "etcd unreachable ({}); check that etcd runs there",
            errors.join("; ")
        )))
    }

    pub fn grant(&self, ttl_secs: i64) -> Result<(i64, i64)> {
        decode_grant(&self.call("/v3/lease/grant", &json!({"TTL": ttl_secs}))?)
    }

    /// Renews `lease`: `Ok(ttl)` left in seconds, 0 when the lease is gone.
    pub fn keepalive(&self, lease: i64) -> Result<i64> {
        Ok(decode_keepalive(&self.call(
            "/v3/lease/keepalive",
            &json!({"ID": lease.to_string()}),
        )?))
    }

    pub fn revoke(&self, lease: i64) -> Result<()> {
        self.call("/v3/lease/revoke", &json!({"ID": lease.to_string()}))
            .map(|_| ())
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>> {
        let v = self.call("/v3/kv/range", &json!({"key": b64(key.as_bytes())}))?;
        Ok(decode_kvs(&v)?.into_iter().next())
    }

    /// Every key starting with `prefix`.
    pub fn get_prefix(&self, prefix: &str) -> Result<Vec<Kv>> {
        let v = self.call(
            "/v3/kv/range",
            &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix.as_bytes()))}),
        )?;
        decode_kvs(&v)
    }

    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<()> {
        self.call("/v3/kv/put", &put_body(key, value, lease))
            .map(|_| ())
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.call("/v3/kv/deleterange", &json!({"key": b64(key.as_bytes())}))
            .map(|_| ())
    }

    /// Runs `ops` if every comparison holds; returns whether it did.
    pub fn txn(&self, cmps: &[Cmp], ops: &[Op]) -> Result<bool> {
        let v = self.call("/v3/kv/txn", &txn_body(cmps, ops))?;
        Ok(v.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }
}

fn put_body(key: &str, value: &[u8], lease: i64) -> Value {
    let mut b = json!({"key": b64(key.as_bytes()), "value": b64(value)});
    if lease != 0 {
        b["lease"] = json!(lease.to_string());
    }
    b
}

pub(crate) fn txn_body(cmps: &[Cmp], ops: &[Op]) -> Value {
    let compare: Vec<Value> = cmps
        .iter()
        .map(|c| match c {
            Cmp::Absent(k) => {
                json!({"key": b64(k.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
            }
            Cmp::ModRev(k, r) => {
                json!({"key": b64(k.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()})
            }
            Cmp::Lease(k, l) => {
                json!({"key": b64(k.as_bytes()), "target": "LEASE", "result": "EQUAL", "lease": l.to_string()})
            }
        })
        .collect();
    let success: Vec<Value> = ops
        .iter()
        .map(|o| match o {
            Op::Put { key, value, lease } => json!({"request_put": put_body(key, value, *lease)}),
            Op::Delete(k) => json!({"request_delete_range": {"key": b64(k.as_bytes())}}),
        })
        .collect();
    json!({"compare": compare, "success": success})
}

/// An int64 of the gateway: a decimal string (or a number), absent = 0.
fn int(v: &Value, field: &str) -> i64 {
    match v.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

pub(crate) fn decode_grant(v: &Value) -> Result<(i64, i64)> {
    let (id, ttl) = (int(v, "ID"), int(v, "TTL"));
    if id == 0 || ttl <= 0 {
        return Err(Error::Other(format!(
            "etcd refused a lease: {}",
            v.get("error").unwrap_or(v)
        )));
    }
    Ok((id, ttl))
}

pub(crate) fn decode_keepalive(v: &Value) -> i64 {
    // The gateway answers the streaming call with one `{"result": …}` object.
    int(v.get("result").unwrap_or(v), "TTL")
}

pub(crate) fn decode_kvs(v: &Value) -> Result<Vec<Kv>> {
    let Some(list) = v.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|kv| {
            let field = |f: &str| -> Result<Vec<u8>> {
                unb64(kv.get(f).and_then(Value::as_str).unwrap_or(""))
                    .ok_or_else(|| Error::Other(format!("etcd answered a {f} that is not base64")))
            };
            Ok(Kv {
                key: String::from_utf8_lossy(&field("key")?).into_owned(),
                value: field("value")?,
                create_revision: int(kv, "create_revision"),
                mod_revision: int(kv, "mod_revision"),
                lease: int(kv, "lease"),
            })
        })
        .collect()
}

/// The range end that selects every key starting with `prefix` (etcd's rule: the prefix with
/// its last byte below 0xff incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (what the gateway reads and writes for `bytes`).
pub fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unb64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_values() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("k", "aw=="),
        ] {
            assert_eq!(b64(raw.as_bytes()), enc);
            assert_eq!(unb64(enc).unwrap(), raw.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unb64(&b64(&all)).unwrap(), all);
        assert!(unb64("a*b=").is_none());
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn decodes_gateway_answers_with_omitted_zero_fields() {
        // A range answer as etcd 3.4's gateway sends it (numbers as strings).
        let v: Value = serde_json::from_str(
            r#"{"header":{"revision":"2"},"kvs":[{"key":"aw==","create_revision":"2","mod_revision":"3","version":"1","value":"dg==","lease":"2324035851144292103"}],"count":"1"}"#,
        )
        .unwrap();
        let kvs = decode_kvs(&v).unwrap();
        assert_eq!(
            kvs,
            vec![Kv {
                key: "k".into(),
                value: b"v".to_vec(),
                create_revision: 2,
                mod_revision: 3,
                lease: 2324035851144292103
            }]
        );
        // No key: no "kvs" at all.
        assert!(
            decode_kvs(&serde_json::from_str(r#"{"header":{}}"#).unwrap())
                .unwrap()
                .is_empty()
        );
        // A value that is empty is left out too.
        let v: Value =
            serde_json::from_str(r#"{"kvs":[{"key":"aw==","create_revision":"9"}]}"#).unwrap();
        assert_eq!(decode_kvs(&v).unwrap()[0].value, b"");
        // Keepalive of a live lease and of an expired one (TTL left out).
        let live: Value = serde_json::from_str(r#"{"result":{"ID":"5","TTL":"3"}}"#).unwrap();
        let dead: Value = serde_json::from_str(r#"{"result":{"ID":"5"}}"#).unwrap();
        assert_eq!((decode_keepalive(&live), decode_keepalive(&dead)), (3, 0));
        assert_eq!(
            decode_grant(&serde_json::from_str(r#"{"ID":"7","TTL":"2"}"#).unwrap()).unwrap(),
            (7, 2)
        );
        assert!(decode_grant(&serde_json::from_str(r#"{"error":"x"}"#).unwrap()).is_err());
    }

    #[test]
    fn encodes_transactions_as_the_gateway_reads_them() {
        let body = txn_body(
            &[
                Cmp::Absent("k".into()),
                Cmp::ModRev("e".into(), 4),
                Cmp::Lease("k".into(), 9),
            ],
            &[
                Op::Put {
                    key: "k".into(),
                    value: b"v".to_vec(),
                    lease: 9,
                },
                Op::Put {
                    key: "e".into(),
                    value: b"2".to_vec(),
                    lease: 0,
                },
                Op::Delete("c".into()),
            ],
        );
        assert_eq!(
            body,
            json!({
                "compare": [
                    {"key": "aw==", "target": "CREATE", "result": "EQUAL", "create_revision": "0"},
                    {"key": "ZQ==", "target": "MOD", "result": "EQUAL", "mod_revision": "4"},
                    {"key": "aw==", "target": "LEASE", "result": "EQUAL", "lease": "9"},
                ],
                "success": [
                    {"request_put": {"key": "aw==", "value": "dg==", "lease": "9"}},
                    {"request_put": {"key": "ZQ==", "value": "Mg=="}},
                    {"request_delete_range": {"key": "Yw=="}},
                ]
            })
        );
    }

    #[test]
    fn parses_failover_urls() {
        let u = FailoverUrl::parse(
            "etcd://127.0.0.1:2379,127.0.0.1:2381/app/db?listen=127.0.0.1:7001&ttl_ms=1500&name=r1",
        )
        .unwrap();
        assert_eq!(
            u.endpoints,
            vec!["http://127.0.0.1:2379", "http://127.0.0.1:2381"]
        );
        assert_eq!(u.key, "app/db");
        assert_eq!(u.listen.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(u.name.as_deref(), Some("r1"));
        assert_eq!((u.ttl_ms, u.ttl_secs()), (1500, 2));
        let d = FailoverUrl::parse("etcd://h:1/k").unwrap();
        assert_eq!((d.ttl_ms, d.listen, d.name), (DEFAULT_TTL_MS, None, None));
        for bad in [
            "http://h:1/k",
            "etcd://h:1",
            "etcd://h:1/",
            "etcd://h/k",
            "etcd://h:1/k?ttl_ms=5",
            "etcd://h:1/k?x=1",
        ] {
            assert!(FailoverUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
