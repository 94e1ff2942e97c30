//! The follower table (who follows, from where, how far behind) and the Prometheus text of
//! `/metrics` for one served database.

use super::httpd::{Body, Reply};
use super::request::header;
use super::server::Shared;
use crate::txlog::{self, Log};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A follower not seen for this long is no longer "connected".
pub(super) const FOLLOWER_TTL: Duration = Duration::from_secs(30);

pub(super) struct Follower {
    pub(super) last_lsn: u64,
    /// Last request, or the end of the long-poll it is parked in (so a follower waiting in a
    /// long-poll stays listed).
    pub(super) seen: Instant,
}

/// A follower asked for `acked + 1`: it has `acked` applied and fsynced (its acknowledgement,
/// FORMAT.md §8). Recorded for every process of the primary, whose commits may wait for it
/// (synchronous replication, `txlog::acks`), when it moved or at least every 5 s while the
/// follower stays.
pub(super) fn ack_follower(sh: &Shared, id: &str, acked: u64) {
    let now = Instant::now();
    {
        let mut m = sh.acked.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(id.to_string()).or_insert((0, now));
        if acked <= e.0 && e.1.elapsed() < Duration::from_secs(5) && e.0 != 0 {
            return;
        }
        *e = (e.0.max(acked), now);
        if m.len() > 10_000 {
            m.retain(|_, (_, t)| t.elapsed() < FOLLOWER_TTL);
        }
    }
    if let Err(e) = txlog::acks::record(&sh.dir, id, acked) {
        crate::logging::event(&format!(
            "event=acks_error dir={:?} error={:?}",
            sh.dir,
            e.to_string()
        ));
    }
}

/// Record a follower's position; `until` is the end of the long-poll it is parked in.
pub(super) fn touch_follower(sh: &Shared, id: &str, last_lsn: u64, until: Option<Instant>) {
    let now = Instant::now();
    let seen = until.map_or(now, |u| u.max(now));
    let mut m = sh.followers.lock().unwrap_or_else(|e| e.into_inner());
    let f = m
        .entry(id.to_string())
        .or_insert(Follower { last_lsn: 0, seen });
    f.last_lsn = f.last_lsn.max(last_lsn);
    f.seen = f.seen.max(seen);
    // Bounded: a stranger inventing follower names cannot grow this map without limit.
    if m.len() > 10_000 {
        m.retain(|_, f| f.seen.elapsed() < FOLLOWER_TTL);
    }
}

pub(super) fn followers_json(sh: &Shared) -> serde_json::Value {
    let durable = Log::read_durable(&sh.dir)
        .ok()
        .flatten()
        .map_or(0, |d| d.0 .0);
    let acked = sh.acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let m = sh.followers.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = m
        .iter()
        .filter(|(_, f)| f.seen.elapsed() < FOLLOWER_TTL)
        .map(|(id, f)| {
            serde_json::json!({
                "id": id,
                "last_lsn": f.last_lsn,
                "lag_lsn": durable.saturating_sub(f.last_lsn),
                // Applied and fsynced on the follower (received = durable = applied: it asks
                // for the next LSN only then).
                "acked_lsn": acked.get(id.as_str()).map_or(0, |a| a.0),
                "seen_ms_ago": f.seen.elapsed().as_millis() as u64,
                "waiting": f.seen > Instant::now(),
            })
        })
        .collect();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    serde_json::Value::Array(v)
}

fn records_per_sec(sh: &Shared, lsn: u64) -> f64 {
    let now = Instant::now();
    let mut r = sh.rate.lock().unwrap_or_else(|e| e.into_inner());
    r.push((now, lsn));
    r.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(10));
    match (r.first(), r.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
        }
        _ => 0.0,
    }
}

pub(super) fn metrics(sh: &Shared) -> Reply {
    let durable = Log::read_durable(&sh.dir).ok().flatten();
    let lsn = durable.map_or(0, |d| d.0 .0);
    let generation = durable.map_or(0, |d| d.1 .0);
    let log_bytes: u64 = txlog::segment_infos(&sh.dir.join("log"))
        .map(|v| v.iter().map(|s| s.bytes).sum())
        .unwrap_or(0);
    let followers = followers_json(sh);
    let list = followers.as_array().cloned().unwrap_or_default();
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
        vec![(String::new(), lsn.to_string())],
    );
    metric(
        "sqlite_replica_generation",
        "Generation of the log.",
        "gauge",
        vec![(String::new(), generation.to_string())],
    );
    metric(
        "sqlite_replica_log_bytes",
        "Bytes of log segments retained.",
        "gauge",
        vec![(String::new(), log_bytes.to_string())],
    );
    metric(
        "sqlite_replica_records_per_second",
        "Records made durable per second (10 s window).",
        "gauge",
        vec![(String::new(), format!("{:.3}", records_per_sec(sh, lsn)))],
    );
    metric(
        "sqlite_replica_served_records_total",
        "Records sent to followers.",
        "counter",
        vec![(
            String::new(),
            sh.served_records.load(Ordering::Relaxed).to_string(),
        )],
    );
    metric(
        "sqlite_replica_served_bytes_total",
        "Record bytes sent to followers.",
        "counter",
        vec![(
            String::new(),
            sh.served_bytes.load(Ordering::Relaxed).to_string(),
        )],
    );
    if let (Some(_), Some(b)) = (
        super::s3::configured_target(&sh.dir),
        super::s3::read_status(&sh.dir),
    ) {
        let n = |k: &str| b.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        metric(
            "sqlite_replica_backup_uploaded_lsn",
            "Newest LSN in the bucket backup.",
            "gauge",
            vec![(String::new(), n("uploaded_lsn").to_string())],
        );
        metric(
            "sqlite_replica_backup_backlog",
            "Durable transactions not in the bucket yet.",
            "gauge",
            vec![(String::new(), n("backlog").to_string())],
        );
        metric(
            "sqlite_replica_backup_errors_total",
            "Failed uploader passes (this uploader's life).",
            "counter",
            vec![(String::new(), n("errors").to_string())],
        );
        metric(
            "sqlite_replica_backup_failing",
            "1 while the last uploader pass failed (last_error in repl_status()).",
            "gauge",
            vec![(
                String::new(),
                u8::from(!b["last_error"].is_null()).to_string(),
            )],
        );
    }
    metric(
        "sqlite_replica_followers",
        "Followers seen in the last 30 s.",
        "gauge",
        vec![(String::new(), list.len().to_string())],
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
        list.iter()
            .map(|f| (label(f), f["last_lsn"].to_string()))
            .collect(),
    );
    metric(
        "sqlite_replica_follower_acked_lsn",
        "Last LSN a follower acknowledged: applied and fsynced there (synchronous replication).",
        "gauge",
        list.iter()
            .map(|f| (label(f), f["acked_lsn"].to_string()))
            .collect(),
    );
    metric(
        "sqlite_replica_follower_lag_lsn",
        "How many LSNs a follower is behind the durable LSN.",
        "gauge",
        list.iter()
            .map(|f| (label(f), f["lag_lsn"].to_string()))
            .collect(),
    );
    if let Some(st) = sh.stats.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let j = st.json();
        for (name, key, help, kind) in [
            (
                "sqlite_replica_http_open_connections",
                "open_connections",
                "Open HTTP connections of the listener.",
                "gauge",
            ),
            (
                "sqlite_replica_http_parked_long_polls",
                "parked_long_polls",
                "Long-polls waiting for records.",
                "gauge",
            ),
            (
                "sqlite_replica_http_accepted_total",
                "accepted",
                "Connections accepted.",
                "counter",
            ),
            (
                "sqlite_replica_http_refused_total",
                "refused",
                "Connections refused (connection limit).",
                "counter",
            ),
            (
                "sqlite_replica_http_timeouts_total",
                "timeouts",
                "Connections closed by a header, body or write timeout.",
                "counter",
            ),
            (
                "sqlite_replica_http_too_large_total",
                "too_large",
                "Requests refused for head or body size.",
                "counter",
            ),
            (
                "sqlite_replica_http_bad_requests_total",
                "bad_requests",
                "Malformed requests.",
                "counter",
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                j[key]
            ));
        }
    }
    Reply::new(
        200,
        vec![header("Content-Type", "text/plain; version=0.0.4")],
        Body::Bytes(out.into_bytes()),
    )
}
