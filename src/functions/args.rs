//! Reading SQL function arguments the way SQLite's own functions do.
//!
//! Bindings do not all bind numbers as integers: better-sqlite3 binds every JavaScript Number as
//! a REAL, Tcl binds a variable set with `set x 2000` as TEXT. SQLite's built-in functions accept
//! both wherever an integer is expected (numeric affinity: a REAL with no fractional part, a TEXT
//! that is a well-formed integer), so ours do too. Anything else is refused with a message that
//! names the function, the argument and what was given, in SQL terms ("a real number 3.5",
//! "the text 'abc'"), never Rust debug output.

use crate::error::{Error, Result};
use crate::ffi::conn::SqlValue;

/// The arguments of one call of `func` (e.g. "repl_wait").
pub struct Args<'a> {
    pub func: &'static str,
    pub values: &'a [SqlValue],
}

impl<'a> Args<'a> {
    pub fn new(func: &'static str, values: &'a [SqlValue]) -> Args<'a> {
        Args { func, values }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// The value at `i`, or `None` when the argument is absent or SQL NULL.
    pub fn get(&self, i: usize) -> Option<&'a SqlValue> {
        self.values.get(i).filter(|v| !matches!(v, SqlValue::Null))
    }

    /// Argument `i` (0-based) as an integer in `range`; `None` when absent or NULL.
    pub fn int(
        &self,
        i: usize,
        name: &str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<Option<i64>> {
        let Some(v) = self.get(i) else {
            return Ok(None);
        };
        match as_integer(v) {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            Some(n) => Err(self.bad(i, name, &range_text(&range), &format!("{n}"))),
            None => Err(self.bad(i, name, "an integer", &describe(v))),
        }
    }

    /// Argument `i` as text; `None` when absent or NULL; numbers and blobs are refused.
    pub fn text(&self, i: usize, name: &str) -> Result<Option<String>> {
        match self.get(i) {
            None => Ok(None),
            Some(SqlValue::Text(t)) => Ok(Some(t.clone())),
            Some(v) => Err(self.bad(i, name, "text", &describe(v))),
        }
    }

    /// Like `text`, but an integer is taken as its decimal text (a token or a request id that
    /// a binding passed as a number).
    pub fn text_or_int(&self, i: usize, name: &str) -> Result<Option<String>> {
        match self.get(i) {
            Some(SqlValue::Int(n)) => Ok(Some(n.to_string())),
            _ => self.text(i, name),
        }
    }

    /// The error for argument `i` (0-based): "f(): the NAME (argument N) must be WANT, got GOT".
    pub fn bad(&self, i: usize, name: &str, want: &str, got: &str) -> Error {
        Error::Misuse(format!(
            "{}(): the {name} (argument {}) must be {want}, got {got}",
            self.func,
            i + 1
        ))
    }
}

/// "a non-negative integer", "an integer between 1 and 60000", …
fn range_text(r: &std::ops::RangeInclusive<i64>) -> String {
    match (*r.start(), *r.end()) {
        (0, i64::MAX) => "a non-negative integer".into(),
        (1, i64::MAX) => "a positive integer".into(),
        (a, b) => format!("an integer between {a} and {b}"),
    }
}

/// The integer a value stands for under SQLite's numeric affinity: an INTEGER; a REAL with no
/// fractional part that fits in 64 bits; a TEXT that is a well-formed integer (optional sign,
/// digits, surrounding spaces). `None` for anything else.
pub fn as_integer(v: &SqlValue) -> Option<i64> {
    match v {
        SqlValue::Int(n) => Some(*n),
        SqlValue::Real(r) => {
            // 2^63 is exactly representable; anything at or past it does not fit.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            (r.is_finite() && r.fract() == 0.0 && *r >= -LIMIT && *r < LIMIT).then_some(*r as i64)
        }
        SqlValue::Text(t) => {
            let s = t.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\n' || c == '\r');
            let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.strip_prefix('+').unwrap_or(s).parse::<i64>().ok()
        }
        SqlValue::Null | SqlValue::Blob(_) => None,
    }
}

/// A value described for a person, in SQL terms: `NULL`, `the integer 7`, `a real number 3.5`,
/// `the text 'abc'` (quotes doubled, long text cut), `a blob of 4 bytes`.
pub fn describe(v: &SqlValue) -> String {
    match v {
        SqlValue::Null => "NULL".into(),
        SqlValue::Int(n) => format!("the integer {n}"),
        SqlValue::Real(r) => format!("a real number {}", fmt_real(*r)),
        SqlValue::Text(t) => {
            const MAX: usize = 40;
            let cut: String = t.chars().take(MAX).collect();
            let more = if t.chars().count() > MAX { "…" } else { "" };
            format!("the text '{}{more}'", cut.replace('\'', "''"))
        }
        SqlValue::Blob(b) if b.len() == 1 => "a blob of 1 byte".into(),
        SqlValue::Blob(b) => format!("a blob of {} bytes", b.len()),
    }
}

fn fmt_real(r: f64) -> String {
    if r.is_finite() && r.fract() == 0.0 && r.abs() < 1e15 {
        format!("{r:.1}")
    } else {
        format!("{r}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_under_numeric_affinity() {
        let ok = [
            (SqlValue::Int(3), 3),
            (SqlValue::Real(3.0), 3),
            (SqlValue::Real(-0.0), 0),
            (SqlValue::Text("3".into()), 3),
            (SqlValue::Text(" +42 ".into()), 42),
            (SqlValue::Text("-7".into()), -7),
            (SqlValue::Text("9223372036854775807".into()), i64::MAX),
        ];
        for (v, n) in ok {
            assert_eq!(as_integer(&v), Some(n), "{v:?}");
        }
        let refused = [
            SqlValue::Real(3.5),
            SqlValue::Real(f64::NAN),
            SqlValue::Real(f64::INFINITY),
            SqlValue::Real(1e19),
            SqlValue::Text("abc".into()),
            SqlValue::Text("3.0".into()),
            SqlValue::Text("".into()),
            SqlValue::Text("+".into()),
            SqlValue::Text("1e3".into()),
            SqlValue::Text("99999999999999999999".into()),
            SqlValue::Blob(vec![3]),
            SqlValue::Null,
        ];
        for v in refused {
            assert_eq!(as_integer(&v), None, "{v:?}");
        }
    }

    #[test]
    fn descriptions_speak_sql() {
        assert_eq!(describe(&SqlValue::Real(3.5)), "a real number 3.5");
        assert_eq!(describe(&SqlValue::Real(3.0)), "a real number 3.0");
        assert_eq!(describe(&SqlValue::Text("it's".into())), "the text 'it''s'");
        assert_eq!(describe(&SqlValue::Blob(vec![1, 2])), "a blob of 2 bytes");
        assert_eq!(describe(&SqlValue::Int(-1)), "the integer -1");
        assert!(describe(&SqlValue::Text("x".repeat(100))).ends_with("…'"));
    }

    #[test]
    fn errors_name_function_argument_and_value() {
        let vals = [SqlValue::Int(1), SqlValue::Real(2.5)];
        let a = Args::new("repl_wait", &vals);
        let e = a.int(1, "timeout_ms", 0..=10).unwrap_err().to_string();
        assert_eq!(
            e,
            "repl_wait(): the timeout_ms (argument 2) must be an integer, got a real number 2.5"
        );
        let vals = [SqlValue::Text("20".into())];
        let e = Args::new("repl_follow", &vals)
            .int(0, "interval_ms", 0..=10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 0 and 10, got 20"), "{e}");
        assert_eq!(
            Args::new("f", &[SqlValue::Null])
                .int(0, "x", 0..=1)
                .unwrap(),
            None
        );
    }
}
