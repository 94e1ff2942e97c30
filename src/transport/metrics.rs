//! What the log server knows about its followers and reports: the follower table (last LSN,
//! long-polls in progress), records/s, and the Prometheus text of `GET /metrics`.

use crate::txlog::Log;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A follower not seen for this long is no longer "connected".
const FOLLOWER_TTL: Duration = Duration::from_secs(30);

pub(super) struct Follower {
    last_lsn: u64,
    seen: Instant,
    waiting: usize,
}

pub(super) type Followers = Mutex<HashMap<String, Follower>>;

/// The values `GET /metrics` reports.
pub(super) struct Metrics {
    pub lsn: u64,
    pub generation: u32,
    pub log_bytes: u64,
    pub records_per_sec: f64,
    pub served_records: u64,
    pub served_bytes: u64,
    /// `followers_json` entries.
    pub followers: Vec<serde_json::Value>,
}

/// `waiting`: +1 entering a long-poll, -1 leaving it, 0 to record a position only.
pub(super) fn touch_follower(followers: &Followers, id: &str, last_lsn: u64, waiting: i32) {
    let mut m = followers.lock().unwrap_or_else(|e| e.into_inner());
    let f = m.entry(id.to_string()).or_insert(Follower {
        last_lsn,
        seen: Instant::now(),
        waiting: 0,
    });
    f.last_lsn = f.last_lsn.max(last_lsn);
    f.seen = Instant::now();
    f.waiting = (f.waiting as i64 + waiting as i64).max(0) as usize;
    m.retain(|_, f| f.waiting > 0 || f.seen.elapsed() < FOLLOWER_TTL);
}

pub(super) fn followers_json(followers: &Followers, dir: &Path) -> serde_json::Value {
    let durable = Log::read_durable(dir).ok().flatten().map_or(0, |d| d.0 .0);
    let m = followers.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = m
        .iter()
        .filter(|(_, f)| f.waiting > 0 || f.seen.elapsed() < FOLLOWER_TTL)
        .map(|(id, f)| {
            serde_json::json!({
                "id": id,
                "last_lsn": f.last_lsn,
                "lag_lsn": durable.saturating_sub(f.last_lsn),
                "seen_ms_ago": f.seen.elapsed().as_millis() as u64,
            })
        })
        .collect();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    serde_json::Value::Array(v)
}

pub(super) fn records_per_sec(rate: &Mutex<Vec<(Instant, u64)>>, lsn: u64) -> f64 {
    let now = Instant::now();
    let mut r = rate.lock().unwrap_or_else(|e| e.into_inner());
    r.push((now, lsn));
    r.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(10));
    match (r.first(), r.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// The Prometheus text exposition of `m`.
pub(super) fn prometheus(m: &Metrics) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, lines: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    metric(
        "sqlite_replica_lsn",
        "Durable LSN of the primary.",
        "gauge",
        vec![(String::new(), m.lsn.to_string())],
    );
    metric(
        "sqlite_replica_generation",
        "Generation of the log.",
        "gauge",
        vec![(String::new(), m.generation.to_string())],
    );
    metric(
        "sqlite_replica_log_bytes",
        "Bytes of log segments retained.",
        "gauge",
        vec![(String::new(), m.log_bytes.to_string())],
    );
    metric(
        "sqlite_replica_records_per_second",
        "Records made durable per second (10 s window).",
        "gauge",
        vec![(String::new(), format!("{:.3}", m.records_per_sec))],
    );
    metric(
        "sqlite_replica_served_records_total",
        "Records sent to followers.",
        "counter",
        vec![(String::new(), m.served_records.to_string())],
    );
    metric(
        "sqlite_replica_served_bytes_total",
        "Record bytes sent to followers.",
        "counter",
        vec![(String::new(), m.served_bytes.to_string())],
    );
    metric(
        "sqlite_replica_followers",
        "Followers seen in the last 30 s.",
        "gauge",
        vec![(String::new(), m.followers.len().to_string())],
    );
    let label = |f: &serde_json::Value| {
        let id = f["id"]
            .as_str()
            .unwrap_or("")
            .replace('\\', "\\\\")
            .replace('"', "\\\"");
        format!("{{follower=\"{id}\"}}")
    };
    metric(
        "sqlite_replica_follower_lsn",
        "Last LSN a follower has received.",
        "gauge",
        m.followers
            .iter()
            .map(|f| (label(f), f["last_lsn"].to_string()))
            .collect(),
    );
    metric(
        "sqlite_replica_follower_lag_lsn",
        "How many LSNs a follower is behind the durable LSN.",
        "gauge",
        m.followers
            .iter()
            .map(|f| (label(f), f["lag_lsn"].to_string()))
            .collect(),
    );
    out
}
