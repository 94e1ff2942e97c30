//! Small pieces of the log server's request handling: query parameters (strict decimal
//! integers), the constant-time token comparison, response headers.

/// Constant-time comparison (the length is not secret).
pub(super) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `a=1&b=2` → pairs (no percent-decoding: every parameter is a number).
pub(super) fn query_pairs(q: &str) -> Vec<(&str, &str)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect()
}

/// `path?query` → (path, pairs); for the fuzz target and tests.
pub(super) fn query(url: &str) -> (&str, Vec<(&str, &str)>) {
    match url.split_once('?') {
        None => (url, Vec::new()),
        Some((path, q)) => (path, query_pairs(q)),
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

pub(super) fn header(name: &str, value: impl std::fmt::Display) -> (String, String) {
    (name.to_string(), value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_strict_decimal_integers() {
        let p = [
            ("from", "12"),
            ("wait_ms", "-1"),
            ("max_bytes", "1e3"),
            ("x", "99999999999999999999999"),
        ];
        assert_eq!(num(&p, "from", 0..=100), Ok(Some(12)));
        assert!(num(&p, "wait_ms", 0..=100)
            .unwrap_err()
            .contains("wait_ms must be a decimal integer"));
        assert!(num(&p, "max_bytes", 1..=100).is_err());
        assert!(num(&p, "x", 0..=u64::MAX).is_err(), "more than 20 digits");
        assert_eq!(num(&p, "missing", 0..=1), Ok(None));
        assert!(num(&[("from", "")], "from", 0..=1).is_err());
        assert!(num(&[("from", "101")], "from", 0..=100).is_err());
    }

    #[test]
    fn query_strings_split() {
        assert_eq!(
            query("/v1/log?from=1&wait_ms=5"),
            ("/v1/log", vec![("from", "1"), ("wait_ms", "5")])
        );
        assert_eq!(query("/v1/info"), ("/v1/info", vec![]));
        assert_eq!(query("/x?a&&b="), ("/x", vec![("a", ""), ("b", "")]));
    }

    #[test]
    fn tokens_compare_in_constant_time() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret1"));
        assert!(ct_eq(b"", b""));
    }
}
