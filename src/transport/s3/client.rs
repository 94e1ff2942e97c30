//! The S3 client: `s3://bucket/prefix` parsed once, credentials the AWS way, requests signed by
//! rusty-s3 (SigV4, sans-IO: a presigned URL) and sent with the blocking ureq client. The
//! operations: GET (whole, or as a reader for large objects), PUT (optionally conditional; large
//! objects as multipart uploads, one part in memory at a time), HEAD-less existence through GET,
//! DELETE.
//!
//! Settings (environment, as the AWS tools read them): `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or `AWS_DEFAULT_REGION`, default
//! us-east-1), `AWS_ENDPOINT_URL` (an S3-compatible server). URL parameters override them:
//! `?endpoint=http://host:port&region=R&path_style=1`. Path-style addressing is the default
//! with a custom endpoint (most S3-compatible servers want it), virtual-host style on AWS.

use crate::error::{Error, Result};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::io::Read;
use std::time::Duration;

/// How long a signed request stays valid.
const SIGN_FOR: Duration = Duration::from_secs(600);

/// Objects larger than this go up as multipart uploads of parts this size (64 MiB, or
/// `REPL_BACKUP_PART_MB`; S3 takes at least 5 MiB per part but the last, at most 10,000 parts).
pub fn part_size() -> usize {
    (crate::config::get().backup_part_mb as usize) << 20
}

/// A parsed `s3://bucket/prefix` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub bucket: String,
    /// Without leading or trailing `/` (may be empty).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: Option<bool>,
}

impl Target {
    /// Parses `s3://bucket[/prefix][?endpoint=…&region=…&path_style=0|1]`.
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        let bad = |why: &str| {
            Error::Misuse(format!(
                "{s:?}: {why}; a backup target looks like s3://bucket/prefix (optionally ?endpoint=http://host:port&region=R&path_style=1)"
            ))
        };
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(bad(
                "the bucket name must be 3-63 lower-case letters, digits, '-' or '.'",
            ));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|p| p == ".." || p == ".")
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-._=".contains(&b))
        {
            return Err(bad(
                "the prefix may hold letters, digits and / - . _ = only",
            ));
        }
        let mut t = Target {
            bucket: bucket.to_string(),
            prefix,
            endpoint: None,
            region: None,
            path_style: None,
        };
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("endpoint", v)) if v.starts_with("http://") || v.starts_with("https://") => {
                    t.endpoint = Some(v.trim_end_matches('/').to_string())
                }
                Some(("region", v)) if !v.is_empty() => t.region = Some(v.to_string()),
                Some(("path_style", "1" | "true")) => t.path_style = Some(true),
                Some(("path_style", "0" | "false")) => t.path_style = Some(false),
                _ => {
                    let k = kv.split_once('=').map_or(kv, |(k, _)| k);
                    return Err(bad(&format!(
                        "unknown or invalid URL parameter {k:?} (endpoint=http(s)://…, region=, path_style=0|1 are understood)"
                    )));
                }
            }
        }
        Ok(t)
    }

    /// `s3://bucket/prefix` (no parameters): for messages and status.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A conditional PUT.
#[derive(Clone, Copy, Debug)]
pub enum Cond<'a> {
    None,
    /// `If-None-Match: *`: only if the object does not exist yet.
    Absent,
    /// `If-Match: <etag>`: only if the object is still that version.
    Etag(&'a str),
}

/// One bucket prefix.
pub struct Client {
    target: Target,
    bucket: Bucket,
    creds: Option<Credentials>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(target: Target) -> Result<Client> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let endpoint = target.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL"));
        let region = target
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let path_style = target.path_style.unwrap_or(endpoint.is_some());
        let url = endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let parsed = url.parse().map_err(|e| {
            Error::Misuse(format!("the S3 endpoint {url:?} is not a URL ({e}); set AWS_ENDPOINT_URL or endpoint= to http(s)://host:port"))
        })?;
        let style = if path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(parsed, style, target.bucket.clone(), region).map_err(|e| {
            Error::Misuse(format!(
                "{}: cannot address the bucket at {url} ({e}); with an IP address as the endpoint use path_style=1",
                target.display()
            ))
        })?;
        let creds = match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(k), Some(s)) => Some(match env("AWS_SESSION_TOKEN") {
                Some(t) => Credentials::new_with_token(k, s, t),
                None => Credentials::new(k, s),
            }),
            _ => None,
        };
        // Per socket read and write, not per request: a 1 GiB snapshot streams for longer than
        // any whole-request limit would allow, but a stalled bucket still fails in a minute.
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout_read(Duration::from_secs(60))
            .timeout_write(Duration::from_secs(60))
            .build();
        Ok(Client {
            target,
            bucket,
            creds,
            agent,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The full object key of `name` under the prefix.
    fn key(&self, name: &str) -> String {
        if self.target.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.target.prefix)
        }
    }

    /// `s3://bucket/prefix/name`, for messages.
    pub fn describe(&self, name: &str) -> String {
        format!("s3://{}/{}", self.target.bucket, self.key(name))
    }

    fn failed(&self, op: &str, name: &str, e: ureq::Error) -> Error {
        match e {
            ureq::Error::Status(code, r) => {
                let body = r.into_string().unwrap_or_default();
                let code_text = body
                    .split("<Code>")
                    .nth(1)
                    .and_then(|s| s.split("</Code>").next())
                    .unwrap_or("")
                    .to_string();
                let hint = match code {
                    403 => " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and the bucket policy)",
                    404 if code_text == "NoSuchBucket" => " (the bucket does not exist: create it first)",
                    _ => "",
                };
                Error::Other(format!(
                    "S3 {op} {}: HTTP {code} {code_text}{hint}",
                    self.describe(name)
                ))
            }
            ureq::Error::Transport(t) => Error::Other(format!(
                "S3 {op} {}: the bucket is unreachable ({t}); uploads resume by themselves when it is back",
                self.describe(name)
            )),
        }
    }

    /// A signed GET of the object `name`, sent (ureq's own result: callers match its statuses).
    #[allow(clippy::result_large_err)]
    fn signed_get(&self, name: &str) -> std::result::Result<ureq::Response, ureq::Error> {
        let url = self
            .bucket
            .get_object(self.creds.as_ref(), &self.key(name))
            .sign(SIGN_FOR);
        self.agent.request_url("GET", &url).call()
    }

    /// The object's bytes and ETag, or None when it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<(Vec<u8>, String)>> {
        match self.signed_get(name) {
            Ok(r) => {
                let etag = r.header("ETag").unwrap_or("").to_string();
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut r.into_reader(), &mut b)
                    .map_err(|e| Error::io(format!("S3 GET {}", self.describe(name)), e))?;
                Ok(Some((b, etag)))
            }
            Err(ureq::Error::Status(404, r)) => {
                let body = r.into_string().unwrap_or_default();
                if body.contains("NoSuchBucket") {
                    return Err(Error::Other(format!(
                        "S3 GET {}: the bucket {} does not exist: create it first",
                        self.describe(name),
                        self.target.bucket
                    )));
                }
                Ok(None)
            }
            Err(e) => Err(self.failed("GET", name, e)),
        }
    }

    /// The object's body as a reader (read in pieces, never whole), or None when it does not
    /// exist.
    pub fn get_reader(&self, name: &str) -> Result<Option<Box<dyn Read + Send>>> {
        match self.signed_get(name) {
            Ok(r) => Ok(Some(Box::new(r.into_reader()))),
            Err(ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(self.failed("GET", name, e)),
        }
    }

    /// Uploads `len` bytes read from `r`, unconditionally: one PUT when they fit in a part
    /// (`part_size()`), else a multipart upload of parts that size, so memory stays one part
    /// whatever the object's size. Returns the stored length and its xxh3-64.
    pub fn put_stream(&self, name: &str, len: u64, r: &mut dyn Read) -> Result<(u64, u64)> {
        let part = part_size();
        let what = || format!("S3 PUT {}", self.describe(name));
        if len <= part as u64 {
            let mut body = Vec::with_capacity(len as usize);
            r.read_to_end(&mut body).map_err(|e| Error::io(what(), e))?;
            self.put(name, &body, Cond::None)?;
            return Ok((body.len() as u64, xxhash_rust::xxh3::xxh3_64(&body)));
        }
        let key = self.key(name);
        let url = self
            .bucket
            .create_multipart_upload(self.creds.as_ref(), &key)
            .sign(SIGN_FOR);
        let resp = self
            .agent
            .request_url("POST", &url)
            .call()
            .map_err(|e| self.failed("POST (create multipart upload)", name, e))?
            .into_string()
            .map_err(|e| Error::io(what(), e))?;
        let created =
            rusty_s3::actions::CreateMultipartUpload::parse_response(&resp).map_err(|e| {
                Error::Other(format!(
                    "{}: the bucket's answer to CreateMultipartUpload is not understood ({e})",
                    what()
                ))
            })?;
        let id = created.upload_id().to_string();
        let r = self.upload_parts(name, &key, &id, part, r);
        if r.is_err() {
            // Best effort: an upload neither completed nor aborted keeps its parts (billed)
            // until the bucket's lifecycle rule for incomplete uploads removes them.
            let url = self
                .bucket
                .abort_multipart_upload(self.creds.as_ref(), &key, &id)
                .sign(SIGN_FOR);
            let _ = self.agent.request_url("DELETE", &url).call();
        }
        r
    }

    fn upload_parts(
        &self,
        name: &str,
        key: &str,
        id: &str,
        part: usize,
        r: &mut dyn Read,
    ) -> Result<(u64, u64)> {
        let what = || format!("S3 PUT {}", self.describe(name));
        let mut hash = xxhash_rust::xxh3::Xxh3::new();
        let mut etags: Vec<String> = Vec::new();
        let mut buf = vec![0u8; part];
        let mut total = 0u64;
        loop {
            let mut n = 0;
            while n < part {
                match r.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io(what(), e)),
                }
            }
            if n == 0 && !etags.is_empty() {
                break;
            }
            let number = u16::try_from(etags.len() + 1).map_err(|_| {
                Error::Other(format!(
                    "{}: more than 65535 parts; raise REPL_BACKUP_PART_MB",
                    what()
                ))
            })?;
            hash.update(&buf[..n]);
            total += n as u64;
            let url = self
                .bucket
                .upload_part(self.creds.as_ref(), key, number, id)
                .sign(SIGN_FOR);
            let resp = self
                .agent
                .request_url("PUT", &url)
                .send_bytes(&buf[..n])
                .map_err(|e| self.failed(&format!("PUT (part {number})"), name, e))?;
            etags.push(resp.header("ETag").unwrap_or("").to_string());
            if n < part {
                break;
            }
        }
        let action = self.bucket.complete_multipart_upload(
            self.creds.as_ref(),
            key,
            id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGN_FOR);
        let resp = self
            .agent
            .request_url("POST", &url)
            .send_string(&action.body())
            .map_err(|e| self.failed("POST (complete multipart upload)", name, e))?
            .into_string()
            .map_err(|e| Error::io(what(), e))?;
        // S3 may answer 200 and still report a failure in the body.
        if resp.contains("<Error>") {
            return Err(Error::Other(format!(
                "{}: CompleteMultipartUpload failed: {}",
                what(),
                resp.split("<Code>")
                    .nth(1)
                    .and_then(|s| s.split("</Code>").next())
                    .unwrap_or("unknown error")
            )));
        }
        Ok((total, hash.digest()))
    }

    /// PUTs `body`; under a condition, `Ok(None)` when the condition failed (HTTP 412, or 409
    /// from servers that report a concurrent conditional write so). Returns the new ETag.
    pub fn put(&self, name: &str, body: &[u8], cond: Cond) -> Result<Option<String>> {
        let key = self.key(name);
        let mut action = self.bucket.put_object(self.creds.as_ref(), &key);
        match cond {
            Cond::None => {}
            Cond::Absent => action.headers_mut().insert("if-none-match", "*"),
            Cond::Etag(e) => action.headers_mut().insert("if-match", e.to_string()),
        }
        let url = action.sign(SIGN_FOR);
        let mut req = self.agent.request_url("PUT", &url);
        match cond {
            Cond::None => {}
            Cond::Absent => req = req.set("If-None-Match", "*"),
            Cond::Etag(e) => req = req.set("If-Match", e),
        }
        match req.send_bytes(body) {
            Ok(r) => Ok(Some(r.header("ETag").unwrap_or("").to_string())),
            Err(ureq::Error::Status(412 | 409, _)) if !matches!(cond, Cond::None) => Ok(None),
            Err(e) => Err(self.failed("PUT", name, e)),
        }
    }

    /// DELETEs the object (a missing one is not an error).
    pub fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        let url = self
            .bucket
            .delete_object(self.creds.as_ref(), &key)
            .sign(SIGN_FOR);
        match self.agent.request_url("DELETE", &url).call() {
            Ok(_) | Err(ureq::Error::Status(404, _)) => Ok(()),
            Err(e) => Err(self.failed("DELETE", name, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_refuse() {
        let t = Target::parse(
            "s3://my-bucket/backups/app/?endpoint=http://127.0.0.1:9000&path_style=1",
        )
        .unwrap();
        assert_eq!(t.bucket, "my-bucket");
        assert_eq!(t.prefix, "backups/app");
        assert_eq!(t.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(t.path_style, Some(true));
        assert_eq!(t.display(), "s3://my-bucket/backups/app");
        assert_eq!(Target::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "http://x/y",
            "s3://B/x",
            "s3://ab/x",
            "s3://bkt/../x",
            "s3://bkt/x?foo=1",
            "s3://bkt/x?endpoint=ftp://h",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
