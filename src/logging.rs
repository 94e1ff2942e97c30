//! The extension's event log: one line per event, `event=NAME level=LEVEL key=value …`.
//!
//! The extension runs inside someone else's process (a shell, a web server, a test harness), so
//! what it prints is the host's business: by default only warnings and errors are written, to
//! stderr. Settings (process-wide):
//!
//! | setting | environment | SQL | values |
//! |---|---|---|---|
//! | level | `REPL_LOG` | `repl_config('log', …)` | `off`, `error`, `warn` (default), `info`, `debug` |
//! | file | `REPL_LOG_FILE` | `repl_config('log_file', …)` | a path: lines are appended there instead of stderr; `''` = stderr |
//!
//! The level of each event is fixed by its name in `level_of` (one table), so call sites only
//! say what happened.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// How much the log says; each level includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// Parse a level name (case-insensitive); `None` for anything else.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "0" => Level::Off,
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            _ => return None,
        })
    }

    fn from_u8(v: u8) -> Level {
        match v {
            0 => Level::Off,
            1 => Level::Error,
            2 => Level::Warn,
            3 => Level::Info,
            _ => Level::Debug,
        }
    }
}

/// The default when `REPL_LOG` is unset: warnings and errors reach the user.
pub const DEFAULT_LEVEL: Level = Level::Warn;

/// Not yet read from the environment.
const UNSET: u8 = u8::MAX;
static LEVEL: AtomicU8 = AtomicU8::new(UNSET);

/// Where lines go: `None` = stderr. Read from `REPL_LOG_FILE` on first use.
static SINK: Mutex<Option<Sink>> = Mutex::new(None);

struct Sink {
    path: Option<String>,
    file: Option<std::fs::File>,
}

/// The level of an event, by name. Unknown names are `info`.
pub fn level_of(event: &str) -> Level {
    match event {
        // Something failed and needs a person: data may be at risk or a role stopped working.
        "panic_caught"
        | "http_panic"
        | "load_error"
        | "resume_failed"
        | "capture_error"
        | "log_tail_damaged"
        | "primary_not_in_wal_mode"
        | "backup_stopped"
        | "agent_close_abandoned" => Level::Error,
        // Handled automatically, but a person should know: costs a re-copy, a gap, a stall,
        // or a refused operation.
        "gap"
        | "foreign_write"
        | "crash_catch_up"
        | "log_tail_truncated"
        | "log_tail_repaired"
        | "log_tail_lost"
        | "log_restarted"
        | "replica_forked"
        | "maintenance_error"
        | "primary_detached"
        | "follow_error"
        | "resnapshot"
        | "wal_pinned"
        | "wal_write_refused"
        | "fault"
        | "server_error"
        | "accept_error"
        | "primary_deposed"
        | "primary_fenced"
        | "fence_error"
        | "replica_rewound"
        | "epoch_refused"
        | "orphaned_tail"
        | "promote_notify_failed"
        | "backup_error" => Level::Warn,
        // Routine: roles starting, servers listening, snapshots, retention, progress.
        _ => Level::Info,
    }
}

/// The level in force.
pub fn level() -> Level {
    let v = LEVEL.load(Ordering::Relaxed);
    if v != UNSET {
        return Level::from_u8(v);
    }
    let l = crate::config::get()
        .log_level
        .as_deref()
        .and_then(Level::parse)
        .unwrap_or(DEFAULT_LEVEL);
    // A concurrent `set_level` wins over the environment.
    let _ = LEVEL.compare_exchange(UNSET, l as u8, Ordering::Relaxed, Ordering::Relaxed);
    Level::from_u8(LEVEL.load(Ordering::Relaxed))
}

/// Set the level for this process (`repl_config('log', …)`).
pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

/// Where lines go now: the file path, or `None` for stderr.
pub fn file() -> Option<String> {
    let mut g = SINK.lock().unwrap_or_else(|e| e.into_inner());
    sink(&mut g).path.clone()
}

/// Send lines to `path` (appending; created owner-only) or, with `None`, to stderr. The file
/// is opened now, so a bad path is an error for the caller rather than lost lines later.
pub fn set_file(path: Option<&str>) -> std::io::Result<()> {
    let file = match path {
        Some(p) => Some(open_append(p)?),
        None => None,
    };
    let mut g = SINK.lock().unwrap_or_else(|e| e.into_inner());
    *g = Some(Sink {
        path: path.map(str::to_string),
        file,
    });
    Ok(())
}

fn open_append(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn sink(g: &mut Option<Sink>) -> &mut Sink {
    g.get_or_insert_with(|| {
        let path = crate::config::get().log_file.clone();
        // A file that cannot be opened falls back to stderr, once, with the reason.
        let file = path.as_deref().and_then(|p| match open_append(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!(
                    "event=log_file_error level=error path={p:?} error={:?} action=\"logging to stderr\"",
                    e.to_string()
                );
                None
            }
        });
        Sink {
            path: if file.is_some() { path } else { None },
            file,
        }
    })
}

/// Log one event line (`event=NAME key=value …`) at the level its name has in `level_of`.
pub fn event(line: &str) {
    let name = line
        .strip_prefix("event=")
        .and_then(|r| r.split([' ', '\n']).next())
        .unwrap_or("");
    event_at(level_of(name), line);
}

/// Log `line` at `lvl` when the level in force includes it. `level=…` is inserted after the
/// event name, so lines still start with `event=`.
pub fn event_at(lvl: Level, line: &str) {
    if lvl == Level::Off || lvl > level() {
        return;
    }
    let text = match line.split_once(' ') {
        Some((head, rest)) if head.starts_with("event=") => {
            format!("{head} level={} {rest}\n", lvl.name())
        }
        _ if line.starts_with("event=") => format!("{line} level={}\n", lvl.name()),
        _ => format!("event=message level={} text={line:?}\n", lvl.name()),
    };
    let mut g = SINK.lock().unwrap_or_else(|e| e.into_inner());
    match sink(&mut g).file.as_mut() {
        // One write call per line: O_APPEND keeps lines of several processes whole.
        Some(f) => {
            let _ = f.write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        for (s, l) in [
            ("off", Level::Off),
            ("ERROR", Level::Error),
            ("warn", Level::Warn),
            ("warning", Level::Warn),
            (" info ", Level::Info),
            ("debug", Level::Debug),
        ] {
            assert_eq!(Level::parse(s), Some(l), "{s}");
        }
        assert_eq!(Level::parse("verbose"), None);
        assert!(Level::Error < Level::Warn && Level::Warn < Level::Info);
    }

    #[test]
    fn every_event_has_a_level() {
        assert_eq!(level_of("follow_error"), Level::Warn);
        assert_eq!(level_of("gap"), Level::Warn);
        assert_eq!(level_of("panic_caught"), Level::Error);
        assert_eq!(level_of("listening"), Level::Info);
        assert_eq!(level_of("something_new"), Level::Info);
    }
}
