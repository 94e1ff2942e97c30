//! Client-side encryption of backup objects (FORMAT.md §9.6): XChaCha20-Poly1305 with a random
//! 24-byte nonce per object and the object's key as associated data (an object cannot be
//! passed off as another). The bucket sees only sealed bytes. The manifest carries a key check
//! (the seal of a fixed text), so a wrong key is refused before anything is read or written.

use crate::error::{Error, Result};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// `RPLE`, then the version byte, then the nonce.
const MAGIC: &[u8; 4] = b"RPLE";
const VERSION: u8 = 1;
const NONCE: usize = 24;
/// What the key check seals (with this associated data).
const CHECK_TEXT: &[u8] = b"sqlite-replica backup key check";
const CHECK_AAD: &[u8] = b"key-check";

/// A 32-byte key.
#[derive(Clone)]
pub struct Key(XChaCha20Poly1305);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    /// From 32 raw bytes or 64 hex digits (surrounding white space ignored).
    pub fn parse(text: &[u8], what: &str) -> Result<Key> {
        let t = std::str::from_utf8(text).map(str::trim).unwrap_or("");
        let raw = match crate::util::unhex(t) {
            Some(b) if b.len() == 32 => b,
            _ if text.len() == 32 => text.to_vec(),
            _ => {
                return Err(Error::Misuse(format!(
                    "{what}: a backup key is 32 bytes, given as 64 hex digits (e.g. from `openssl rand -hex 32`)"
                )))
            }
        };
        let c = XChaCha20Poly1305::new_from_slice(&raw)
            .map_err(|_| Error::Misuse(format!("{what}: not a 32-byte key")))?;
        Ok(Key(c))
    }

    /// The key from `REPL_BACKUP_KEY` (hex) or `REPL_BACKUP_KEY_FILE` (None: no encryption).
    pub fn from_env() -> Result<Option<Key>> {
        if let Some(k) = std::env::var("REPL_BACKUP_KEY")
            .ok()
            .filter(|k| !k.is_empty())
        {
            return Key::parse(k.as_bytes(), "REPL_BACKUP_KEY").map(Some);
        }
        if let Some(f) = std::env::var("REPL_BACKUP_KEY_FILE")
            .ok()
            .filter(|k| !k.is_empty())
        {
            let b = std::fs::read(&f).map_err(|e| {
                Error::io(
                    format!("reading the backup key file {f} (REPL_BACKUP_KEY_FILE)"),
                    e,
                )
            })?;
            return Key::parse(&b, &format!("REPL_BACKUP_KEY_FILE {f}")).map(Some);
        }
        Ok(None)
    }

    /// Seals `plain` as the object `key`.
    pub fn seal(&self, key: &str, plain: &[u8]) -> Result<Vec<u8>> {
        self.seal_aad(key.as_bytes(), plain)
    }

    fn seal_aad(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE];
        crate::util::urandom(&mut nonce)
            .map_err(|e| Error::io("reading /dev/urandom for a nonce", e))?;
        let ct = self
            .0
            .encrypt(&XNonce::from(nonce), Payload { msg: plain, aad })
            .map_err(|_| Error::Other("encryption failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + 1 + NONCE + ct.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens the sealed object `key` (`what` names it in errors).
    pub fn open(&self, key: &str, sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        self.open_aad(key.as_bytes(), sealed, what)
    }

    fn open_aad(&self, aad: &[u8], sealed: &[u8], what: &str) -> Result<Vec<u8>> {
        let head = MAGIC.len() + 1 + NONCE;
        if sealed.len() < head || &sealed[..4] != MAGIC {
            return Err(Error::Corrupt(format!(
                "{what} is not an encrypted backup object (no RPLE header): the backup was written without encryption; unset REPL_BACKUP_KEY / REPL_BACKUP_KEY_FILE"
            )));
        }
        if sealed[4] != VERSION {
            return Err(Error::Unsupported(format!(
                "{what}: encryption format {} is not supported; upgrade sqlite-replica",
                sealed[4]
            )));
        }
        let nonce: [u8; NONCE] = sealed[5..head].try_into().expect("24 bytes");
        self.0
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed[head..],
                    aad,
                },
            )
            .map_err(|_| {
                Error::Corrupt(format!(
                    "{what} does not decrypt: it was damaged, or sealed with another key"
                ))
            })
    }

    /// The manifest's key check for this key (hex).
    pub fn check(&self) -> Result<String> {
        Ok(crate::util::hex(&self.seal_aad(CHECK_AAD, CHECK_TEXT)?))
    }

    /// Whether `check` (a manifest's key check) was made with this key.
    pub fn matches(&self, check: &str) -> bool {
        crate::util::unhex(check)
            .and_then(|b| self.open_aad(CHECK_AAD, &b, "key check").ok())
            .is_some_and(|p| p == CHECK_TEXT)
    }
}

/// Whether stored bytes are sealed (start with the `RPLE` header).
pub fn is_sealed(b: &[u8]) -> bool {
    b.len() >= 5 && &b[..4] == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_wrong_keys() {
        let k = Key::parse(&[7u8; 64].map(|_| b'a'), "k").unwrap();
        let other = Key::parse(&[b'b'; 64], "k").unwrap();
        let s = k.seal("log/x.seg", b"a page of data").unwrap();
        assert!(is_sealed(&s));
        assert!(!s.windows(4).any(|w| w == b"page"));
        assert_eq!(k.open("log/x.seg", &s, "x").unwrap(), b"a page of data");
        assert!(k.open("log/y.seg", &s, "x").is_err(), "bound to its key");
        assert!(other.open("log/x.seg", &s, "x").is_err());
        let mut t = s.clone();
        t[40] ^= 1;
        assert!(k.open("log/x.seg", &t, "x").is_err());
        let c = k.check().unwrap();
        assert!(k.matches(&c) && !other.matches(&c));
        assert!(k
            .open("log/x.seg", b"RPLS plain", "x")
            .unwrap_err()
            .to_string()
            .contains("without encryption"));
        assert!(Key::parse(b"short", "k").is_err());
    }
}
