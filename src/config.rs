//! The process's settings from the environment, read once, at first use, into one struct.
//! docs/SQL.md ("Settings") lists them in one table with the URI parameters and `repl_config`
//! settings; a variable that is unset, empty or does not parse leaves the default.

#![forbid(unsafe_code)]

use once_cell::sync::Lazy;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `REPL_TOKEN`: the bearer token for servers and HTTP sources when none is given.
    pub token: Option<String>,
    /// `REPL_FSYNC_INTERVAL_US` (default 2000): pause between group-fsync rounds of a
    /// `synchronous=NORMAL` primary.
    pub fsync_interval: Duration,
    /// `REPL_MAINTENANCE_MS` (default 1000): how often a primary's snapshot/retention pass runs.
    pub maintenance_interval: Duration,
    /// `REPL_DRAIN_FRAMES` (default 4000, at least 16): the replica WAL length that triggers
    /// a drain (a PASSIVE checkpoint runs past a quarter of it).
    pub drain_frames: u32,
    /// `REPL_DRAIN_TIMEOUT_MS` (default 2000): how long a drain waits for readers.
    pub drain_timeout: Duration,
    /// `REPL_FAULT_KILL_AT=<point>:<n>` (tests only): SIGKILL at the n-th pass of `point`.
    pub fault_kill_at: Option<(String, u64)>,
    /// `REPL_FAULT_FAIL_AT=<point>:<n>` (tests only): the n-th time `point` is reached the
    /// operation there fails with an I/O error (`sys::fault_fails`).
    pub fault_fail_at: Option<(String, u64)>,
    /// `REPL_FAULT_DELAY_AT=<point>:<ms>` (tests only): every time `point` is reached the
    /// thread sleeps `ms` milliseconds there (`sys::fault_delay`).
    pub fault_delay_at: Option<(String, u64)>,
    /// `REPL_EXEC_TOKEN`: the token of `/v1/exec` (servers) and of forwarded writes (replicas).
    pub exec_token: Option<String>,
    /// `REPL_LOG`: the event log level as given (`logging` parses it; default warn).
    pub log_level: Option<String>,
    /// `REPL_LOG_FILE`: append event lines there instead of stderr.
    pub log_file: Option<String>,
    /// `REPL_TLS_CERT`, `REPL_TLS_KEY`: PEM files a listener serves HTTPS with.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// `REPL_CA_FILE`: the CA (PEM) https sources are checked against (default: system bundle).
    pub ca_file: Option<String>,
    /// `REPL_HTTP_MAX_CONNECTIONS` (at least 1): open connections per listener.
    pub http_max_connections: Option<u64>,
    /// `REPL_HTTP_HEAD_TIMEOUT_MS`, `REPL_HTTP_IDLE_TIMEOUT_MS`, `REPL_HTTP_WRITE_TIMEOUT_MS`
    /// (at least 10): the server's head, idle keep-alive and write-stall timeouts.
    pub http_head_timeout: Option<Duration>,
    pub http_idle_timeout: Option<Duration>,
    pub http_write_timeout: Option<Duration>,
    /// `REPL_BACKUP_LEASE_MS` (default 10000, at least 200; tests shorten it): the bucket
    /// manifest's lease (FORMAT.md §9.3).
    pub backup_lease_ms: u64,
    /// `REPL_BACKUP_PART_MB` (default 64, at least 5, the S3 minimum): an object larger than
    /// this goes to the bucket as a multipart upload of parts this size.
    pub backup_part_mb: u64,
    /// `REPL_BACKUP_COMPACT_CHUNKS` (default 64, at least 2): merge a run of this many small
    /// bucket chunks into one object (FORMAT.md §9.7).
    pub backup_compact_chunks: u64,
    /// `REPL_BACKGROUND_NICE` (default 0 = leave as inherited, up to 19): the nice value of the
    /// log-append and checkpoint-assist threads. Off by default: under CPU contention a niced
    /// append thread delays what replicas receive (replication lag) for ~1.5 % of commit time.
    pub background_nice: i32,
}

impl Config {
    /// The settings `var` gives (`var(name)` = the variable's value, if set).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Config {
        let num = |k: &str| var(k).and_then(|v| v.parse::<u64>().ok());
        // The server limits take surrounding spaces (as they did when the server read them).
        let num_trimmed = |k: &str| var(k).and_then(|v| v.trim().parse::<u64>().ok());
        let text = |k: &str| var(k).filter(|v| !v.is_empty());
        // Test fault points: `<point>:<n>`.
        let point_and_number = |k: &str| {
            var(k).and_then(|v| {
                let (p, n) = v.rsplit_once(':')?;
                Some((p.to_string(), n.parse::<u64>().ok()?))
            })
        };
        let ms_at_least_10 = |k: &str| {
            num_trimmed(k)
                .filter(|v| *v >= 10)
                .map(Duration::from_millis)
        };
        Config {
            token: var("REPL_TOKEN").filter(|t| !t.is_empty()),
            fsync_interval: Duration::from_micros(num("REPL_FSYNC_INTERVAL_US").unwrap_or(2000)),
            maintenance_interval: Duration::from_millis(num("REPL_MAINTENANCE_MS").unwrap_or(1000)),
            drain_frames: num("REPL_DRAIN_FRAMES")
                .map_or(4000, |v| v.clamp(16, u32::MAX as u64) as u32),
            drain_timeout: Duration::from_millis(num("REPL_DRAIN_TIMEOUT_MS").unwrap_or(2000)),
            fault_kill_at: point_and_number("REPL_FAULT_KILL_AT"),
            fault_fail_at: point_and_number("REPL_FAULT_FAIL_AT"),
            fault_delay_at: point_and_number("REPL_FAULT_DELAY_AT"),
            exec_token: text("REPL_EXEC_TOKEN"),
            log_level: text("REPL_LOG"),
            log_file: text("REPL_LOG_FILE"),
            tls_cert: text("REPL_TLS_CERT"),
            tls_key: text("REPL_TLS_KEY"),
            ca_file: text("REPL_CA_FILE"),
            http_max_connections: num_trimmed("REPL_HTTP_MAX_CONNECTIONS").filter(|v| *v >= 1),
            http_head_timeout: ms_at_least_10("REPL_HTTP_HEAD_TIMEOUT_MS"),
            http_idle_timeout: ms_at_least_10("REPL_HTTP_IDLE_TIMEOUT_MS"),
            http_write_timeout: ms_at_least_10("REPL_HTTP_WRITE_TIMEOUT_MS"),
            backup_lease_ms: num_trimmed("REPL_BACKUP_LEASE_MS")
                .filter(|v| *v >= 200)
                .unwrap_or(10_000),
            background_nice: num_trimmed("REPL_BACKGROUND_NICE")
                .filter(|v| *v <= 19)
                .map_or(0, |v| v as i32),
            backup_part_mb: num_trimmed("REPL_BACKUP_PART_MB")
                .filter(|v| (5..=4096).contains(v))
                .unwrap_or(64),
            backup_compact_chunks: num_trimmed("REPL_BACKUP_COMPACT_CHUNKS")
                .filter(|v| *v >= 2)
                .unwrap_or(64),
        }
    }
}

/// The process's settings (the environment at first use).
pub fn get() -> &'static Config {
    static CONFIG: Lazy<Config> = Lazy::new(|| Config::from_vars(|k| std::env::var(k).ok()));
    &CONFIG
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Config {
        Config::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn defaults_values_and_bad_values() {
        let d = with(&[]);
        assert_eq!(d.token, None);
        assert_eq!(d.fsync_interval, Duration::from_micros(2000));
        assert_eq!(d.maintenance_interval, Duration::from_millis(1000));
        assert_eq!(d.drain_frames, 4000);
        assert_eq!(d.drain_timeout, Duration::from_millis(2000));
        assert_eq!(d.fault_kill_at, None);
        assert_eq!(d.background_nice, 0);
        assert_eq!(with(&[("REPL_BACKGROUND_NICE", "10")]).background_nice, 10);
        assert_eq!(
            with(&[("REPL_BACKGROUND_NICE", "20")]).background_nice,
            0,
            "out of range"
        );
        let c = with(&[
            ("REPL_TOKEN", "s"),
            ("REPL_FSYNC_INTERVAL_US", "7"),
            ("REPL_MAINTENANCE_MS", "50"),
            ("REPL_DRAIN_FRAMES", "3"),
            ("REPL_DRAIN_TIMEOUT_MS", "300"),
            ("REPL_FAULT_KILL_AT", "a:b:2"),
            ("REPL_FAULT_FAIL_AT", "log-append:3"),
            ("REPL_FAULT_DELAY_AT", "t3-holds-write:400"),
        ]);
        assert_eq!(c.token.as_deref(), Some("s"));
        assert_eq!(c.fsync_interval, Duration::from_micros(7));
        assert_eq!(c.maintenance_interval, Duration::from_millis(50));
        assert_eq!(c.drain_frames, 16, "clamped");
        assert_eq!(c.drain_timeout, Duration::from_millis(300));
        assert_eq!(c.fault_kill_at, Some(("a:b".into(), 2)));
        assert_eq!(c.fault_fail_at, Some(("log-append".into(), 3)));
        assert_eq!(c.fault_delay_at, Some(("t3-holds-write".into(), 400)));
        let bad = with(&[
            ("REPL_TOKEN", ""),
            ("REPL_DRAIN_FRAMES", "x"),
            ("REPL_FAULT_KILL_AT", "p"),
        ]);
        assert_eq!(bad, d);
        let h = with(&[
            ("REPL_HTTP_MAX_CONNECTIONS", "0"),
            ("REPL_HTTP_HEAD_TIMEOUT_MS", "9"),
            ("REPL_HTTP_IDLE_TIMEOUT_MS", " 250 "),
            ("REPL_LOG", ""),
            ("REPL_CA_FILE", "/ca.pem"),
        ]);
        assert_eq!(h.http_max_connections, None, "at least 1");
        assert_eq!(h.http_head_timeout, None, "at least 10 ms");
        assert_eq!(h.http_idle_timeout, Some(Duration::from_millis(250)));
        assert_eq!((h.log_level, h.ca_file.as_deref()), (None, Some("/ca.pem")));
        assert_eq!(d.backup_lease_ms, 10_000);
        assert_eq!(
            with(&[("REPL_BACKUP_LEASE_MS", "150")]).backup_lease_ms,
            10_000
        );
        assert_eq!(
            with(&[("REPL_BACKUP_LEASE_MS", "1500")]).backup_lease_ms,
            1500
        );
        assert_eq!(d.backup_part_mb, 64);
        assert_eq!(with(&[("REPL_BACKUP_PART_MB", "4")]).backup_part_mb, 64);
        assert_eq!(with(&[("REPL_BACKUP_PART_MB", "5")]).backup_part_mb, 5);
        assert_eq!(d.backup_compact_chunks, 64);
        assert_eq!(
            with(&[("REPL_BACKUP_COMPACT_CHUNKS", "1")]).backup_compact_chunks,
            64
        );
        assert_eq!(
            with(&[("REPL_BACKUP_COMPACT_CHUNKS", "8")]).backup_compact_chunks,
            8
        );
    }
}
