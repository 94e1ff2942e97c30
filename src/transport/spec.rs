//! What the user names as a replica's source, parsed once: a primary's database path (or
//! `file:` URL) or an `http(s)://host:port[/v1/db/<name>][?token=T&ca=F]` URL. The scheme, the address and the token
//! are kept apart; `Display` shows the source without its token (for messages and status), and
//! the text as given is kept only to be remembered in `replica.json` (owner-only).

use super::dir::DirSource;
use super::http::HttpSource;
use super::Source;
use crate::error::{Error, Result};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A primary's log directory on this machine (`<db>-replica/` next to the database).
    Dir,
    /// A primary serving its log over HTTP.
    Http,
    /// A primary's backup in an S3-compatible bucket (`s3://bucket/prefix`, FORMAT.md §9).
    S3,
}

#[derive(Clone, PartialEq, Eq)]
pub struct SourceSpec {
    scheme: Scheme,
    /// `Dir`: the primary's database path; `Http`: `http(s)://host:port`.
    address: String,
    /// `Http`: the database named in the path (`/v1/db/<name>`), None for the listener's default.
    db: Option<String>,
    /// `Http` over TLS: the URL's `ca=` (a PEM file the server certificate is checked against).
    ca: Option<String>,
    /// `Http`: the URL's `exec_token=`, sent with forwarded writes instead of `token`.
    exec_token: Option<String>,
    /// `Http`: the URL's `token=` (without it, `REPL_TOKEN` applies when the source is opened).
    token: Option<String>,
    /// The text as given (trimmed): what `replica.json` remembers. Never shown.
    given: String,
}

impl SourceSpec {
    /// Parse what the user passed to `repl_sync()`: a primary database path, a `file:` URL or
    /// an `http://` URL. Checks the syntax only; `open` reaches the source.
    pub fn parse(spec: &str) -> Result<SourceSpec> {
        let s = spec.trim();
        if s.is_empty() {
            return Err(Error::Misuse(
                "repl_sync(): the source is empty; pass the primary's database path, e.g. repl_sync('/data/app.db')"
                    .into(),
            ));
        }
        if s.starts_with("http://") || s.starts_with("https://") {
            return parse_http(s);
        }
        if s.starts_with("s3://") {
            super::s3::Target::parse(s)?;
            return Ok(SourceSpec {
                scheme: Scheme::S3,
                address: s.to_string(),
                db: None,
                ca: None,
                exec_token: None,
                token: None,
                given: s.to_string(),
            });
        }
        let path = if let Some(rest) = s.strip_prefix("file:") {
            let rest = rest.split('?').next().unwrap_or("");
            rest.strip_prefix("//").unwrap_or(rest).to_string()
        } else if s.contains("://") {
            return Err(Error::Misuse(format!(
                "repl_sync('{s}'): unknown source scheme; use a database path, a file: URL, http(s):// or s3://"
            )));
        } else {
            s.to_string()
        };
        Ok(SourceSpec {
            scheme: Scheme::Dir,
            address: path,
            db: None,
            ca: None,
            exec_token: None,
            token: None,
            given: s.to_string(),
        })
    }

    /// Reach the source (read the primary's log directory, or prepare the HTTP client).
    pub fn open(&self) -> Result<Box<dyn Source>> {
        Ok(match self.scheme {
            Scheme::Dir => Box::new(DirSource::open(&self.address)?),
            Scheme::S3 => Box::new(super::s3::BucketSource::open(&self.address)?),
            Scheme::Http => Box::new(HttpSource::connect(
                &self.address,
                self.db.clone(),
                self.token.clone(),
                self.exec_token.clone(),
                self.ca.as_deref(),
            )?),
        })
    }

    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The database path (`Dir`) or `http://host:port` (`Http`).
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `Http`: the database named in the URL (`/v1/db/<name>`).
    pub fn db(&self) -> Option<&str> {
        self.db.as_deref()
    }

    /// `Http`: the token for forwarded writes (`exec_token=`).
    pub fn exec_token(&self) -> Option<&str> {
        self.exec_token.as_deref()
    }

    /// `Http` over TLS: the CA file named by `ca=`.
    pub fn ca(&self) -> Option<&str> {
        self.ca.as_deref()
    }

    /// The text to remember in `replica.json` (may hold the token: that file is owner-only).
    pub fn persisted(&self) -> &str {
        &self.given
    }
}

fn parse_http(s: &str) -> Result<SourceSpec> {
    let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
        ("http", r)
    } else if let Some(r) = s.strip_prefix("https://") {
        ("https", r)
    } else {
        return Err(Error::Misuse(format!(
            "not an http:// or https:// URL: {}",
            redact(s)
        )));
    };
    let (target, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let target = target.trim_end_matches('/');
    let (hostport, path) = match target.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (target, None),
    };
    let db = match path {
        None => None,
        Some(p) => match p.strip_prefix("v1/db/") {
            Some(name) if super::httpd::valid_name(name) => Some(name.to_string()),
            _ => {
                return Err(Error::Misuse(format!(
                    "repl_sync('{}'): use the primary's address, e.g. http://127.0.0.1:7070, or one database \
                     of several on it, e.g. http://127.0.0.1:7070/v1/db/app.db",
                    redact(s)
                )))
            }
        },
    };
    if hostport.is_empty() {
        return Err(Error::Misuse(format!(
            "repl_sync('{}'): the URL has no host:port, e.g. http://127.0.0.1:7070",
            redact(s)
        )));
    }
    let mut token = None;
    let mut exec_token = None;
    let mut ca = None;
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
            Some(("ca", f)) if !f.is_empty() && scheme == "https" => ca = Some(f.to_string()),
            Some(("ca", _)) if scheme != "https" => {
                return Err(Error::Misuse(format!(
                    "repl_sync('{}'): ca= is for https:// URLs",
                    redact(s)
                )))
            }
            _ => {
                // Only the key: the value may be a misspelt token= (a secret).
                let key = kv.split_once('=').map_or(kv, |(k, _)| k);
                return Err(Error::Misuse(format!(
                    "repl_sync('{}'): unknown URL parameter {key:?} (token=, exec_token= and ca= are understood)",
                    redact(s)
                )));
            }
        }
    }
    Ok(SourceSpec {
        scheme: Scheme::Http,
        address: format!("{scheme}://{hostport}"),
        db,
        ca,
        exec_token,
        token,
        given: s.to_string(),
    })
}

/// The source without its token.
impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.given))
    }
}

/// Like `Display`: a spec is never printed with its token, not even in a debug dump.
impl fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceSpec({self})")
    }
}

/// The URL without its `token=` parameter (for messages and status). Other parameters keep
/// only their key: the value of a misspelt `token=` is a secret too.
fn redact(spec: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_kept_apart_and_the_token_never_shows() {
        let s = SourceSpec::parse(" http://127.0.0.1:7070/?token=s3cret ").unwrap();
        assert_eq!(s.scheme(), Scheme::Http);
        assert_eq!(s.address(), "http://127.0.0.1:7070");
        assert_eq!(s.token(), Some("s3cret"));
        assert_eq!(s.to_string(), "http://127.0.0.1:7070/");
        assert!(!format!("{s:?}").contains("s3cret"));
        assert_eq!(s.persisted(), "http://127.0.0.1:7070/?token=s3cret");
        let d = SourceSpec::parse("file:///data/app.db?mode=ro").unwrap();
        assert_eq!(
            (d.scheme(), d.address(), d.token()),
            (Scheme::Dir, "/data/app.db", None)
        );
        assert_eq!(
            SourceSpec::parse("/data/app.db").unwrap().address(),
            "/data/app.db"
        );
        assert!(SourceSpec::parse("  ").is_err());
        assert!(SourceSpec::parse("ftp://h/x").is_err());
        assert_eq!(redact("http://h:1?token=s3cret"), "http://h:1");
        assert_eq!(redact("http://h:1?token=s3cret&x=1"), "http://h:1?x=…");
        assert_eq!(
            redact("http://h:1?Token=s3cret&tokn=s3cret"),
            "http://h:1?tokn=…"
        );
    }
}
