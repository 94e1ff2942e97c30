//! Automatic failover on etcd (issue 16, part 4). `repl_config('failover', 'etcd://…/key')`
//! starts, for one database in this process, an agent thread (`repl-failover`):
//!
//! * **On a primary** (the *leader*): it holds `<key>` under an etcd lease and renews it every
//!   TTL/4. Writes are accepted only until the end of the lease as last renewed (counted from
//!   when the renewal was *sent*, so it ends here before it ends in etcd): a primary that cannot
//!   renew stops accepting writes (`SQLITE_READONLY`, `Primary::set_lease`) before anyone else
//!   can win. With the lease gone in etcd it takes the key back only when `<key>/epoch` still
//!   names its epoch (nobody won meanwhile); otherwise it was deposed: writes stay held and, once
//!   the new leader published its URL, it rejoins as that primary's replica
//!   (`roles::rejoin_as_replica`, its unreplicated tail kept aside) and goes on as a candidate.
//!   A restarted primary configured with a newer epoch in etcd does the same at once.
//! * **On a replica** (a *candidate*): it registers `<key>/members/<name>` under a lease of its
//!   own, renewed every TTL/4 (a candidate gone for good drops out of the election after the
//!   TTL), and polls `<key>` every 200 ms. While a leader with a URL exists, it writes
//!   `<key>/synced/<name>` = {epoch} (no lease: see "Who may win") and follows it. When the key
//!   is gone, it
//!   publishes `<key>/candidates/<name>` = its applied LSN (under its own lease), and once
//!   enough candidates published (the rule below) the most advanced one (ties: the smallest
//!   name) campaigns with one transaction: `<key>` absent and `<key>/epoch` unchanged →
//!   `<key>/epoch` = E + 1 and `<key>` = {name, epoch E + 1} under its lease. The winner
//!   promotes itself to epoch E + 1 (`roles::promote`), serves on its `listen` address, takes
//!   over the old primary's settings (published in the leader value) and publishes its URL; the
//!   others follow it.
//!
//! **Who may win.** Asynchronous (`sync_replicas` = 0 in the last leader value): the most
//! advanced of the candidates that published within one TTL after the key vanished (earlier
//! once every live member published). Synchronous (`sync_replicas` = N ≥ 1): every acknowledged
//! commit is applied on N followers; if those are candidates (the rule's assumption: the
//! synchronous followers are the failover candidates), any C − N + 1 of the C *voters* include
//! one of them, so the election waits until at least C − N + 1 voters published, and the most
//! advanced of them holds every acknowledged commit (all candidates hold prefixes of one
//! history). With fewer alive, no one wins: that is the price of losing no acknowledged commit.
//!
//! The voters are the live members **and** every candidate that followed the leader of the
//! epoch being replaced (its `synced/<name>` names that epoch), alive or not. Why a dead
//! follower keeps counting: a synchronous follower that acknowledged commits and then died (its
//! member lease ended) may be the only holder of those commits (N = 1: the others lagged);
//! leaving it out would let a less advanced candidate win and lose them. The mark is written
//! before the candidate follows the leader, whatever `sync_replicas` says then (it can be turned
//! on at any commit, before the candidate could know), and it only counts in the election that
//! ends that epoch: the winner holds every acknowledged commit of it, and the next epoch's
//! commits are acknowledged by followers of the next leader, which mark that epoch. So leases
//! drop a gone candidate from every later epoch, and from the current one when it never
//! followed its leader; within the epoch it followed, it counts until it comes back (or an
//! operator deletes `<key>/synced/<name>` knowing it held nothing the others lack).

use crate::error::{Error, Result};
use crate::primary::Primary;
use crate::replica::Replica;
use crate::roles::Db;
use crate::transport::etcd::{Cmp, Etcd, FailoverUrl, Op};
use once_cell::sync::Lazy;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn event(line: &str) {
    crate::logging::event(line);
}

/// One database's failover agent in this process.
pub struct Agent {
    db: Arc<Db>,
    raw: String,
    url: FailoverUrl,
    name: String,
    /// The address a promotion serves on (`listen`, or a primary's own server address).
    listen: Option<String>,
    etcd: Etcd,
    stop: AtomicBool,
    st: Mutex<State>,
}

#[derive(Default)]
struct State {
    role: &'static str,
    lease: i64,
    last_renew_ms: Option<u64>,
    leader: Option<Value>,
    last_error: Option<String>,
    /// When this candidate first saw the key gone (the election's clock).
    vacant_since: Option<Instant>,
    /// The candidate lease under which `<key>/candidates/<name>` is published.
    candidate_lease: i64,
    published: bool,
    /// The lease of `<key>/members/<name>` (a candidate's membership) and its last renewal.
    member_lease: i64,
    member_renewed: Option<Instant>,
    /// The epoch `<key>/synced/<name>` names (0: not written by this agent yet).
    synced_epoch: u64,
}

static AGENTS: Lazy<Mutex<HashMap<String, Arc<Agent>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

impl Agent {
    fn leader_key(&self) -> String {
        self.url.key.clone()
    }
    fn epoch_key(&self) -> String {
        format!("{}/epoch", self.url.key)
    }
    fn candidates(&self) -> String {
        format!("{}/candidates/", self.url.key)
    }
    fn members(&self) -> String {
        format!("{}/members/", self.url.key)
    }
    /// The last leader value, kept without a lease: a candidate that never saw the leader
    /// (started while the key was vacant) still knows its `sync_replicas` and settings.
    fn settings_key(&self) -> String {
        format!("{}/settings", self.url.key)
    }
    fn synced(&self) -> String {
        format!("{}/synced/", self.url.key)
    }

    fn note_error(&self, what: &str, e: &Error) {
        let msg = format!("{what}: {e}");
        let mut st = lock(&self.st);
        if st.last_error.as_deref() != Some(msg.as_str()) {
            event(&format!(
                "event=failover_error db={:?} key={:?} error={msg:?}",
                self.db.path, self.url.key
            ));
        }
        st.last_error = Some(msg);
    }
}

/// `host:port` of a server URL (`http://host:port[/v1/db/name]`).
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

/// `repl_config('failover')`: the URL in force for `path` in this process.
pub fn configured(path: &str) -> Option<String> {
    lock(&AGENTS).get(path).map(|a| a.raw.clone())
}

/// `repl_status().failover` for `path`, if an agent runs here.
pub fn status(path: &str) -> Option<Value> {
    let a = lock(&AGENTS).get(path).cloned()?;
    let st = lock(&a.st);
    Some(json!({
        "coordinator": a.url.endpoints,
        "key": a.url.key,
        "name": a.name,
        "role": st.role,
        "lease": (st.lease != 0).then(|| format!("{:x}", st.lease)),
        "member_lease": (st.member_lease != 0).then(|| format!("{:x}", st.member_lease)),
        "ttl_ms": a.url.ttl_secs() * 1000,
        "last_renew_ms": st.last_renew_ms,
        "leader": st.leader.as_ref().and_then(|l| l.get("url").cloned()),
        "leader_epoch": st.leader.as_ref().and_then(|l| l.get("epoch").cloned()),
        "writes_held": a.db.primary().and_then(|p| p.lease_hold()),
        "last_error": st.last_error,
    }))
}

/// `repl_config('failover', url)` (or NULL / '' to stop): starts (or stops) the agent of `db`.
/// On a primary the leadership is taken before this returns (an error if it cannot be).
pub fn configure(db: &Arc<Db>, raw: Option<&str>) -> Result<()> {
    stop(&db.path);
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(());
    };
    let url = FailoverUrl::parse(raw)?;
    let primary = db.primary();
    if primary.is_none() && db.replica().is_none() {
        return Err(Error::Misuse(format!(
            "repl_config('failover'): {} is neither a primary nor a replica; make it one first",
            db.path
        )));
    }
    if primary.is_none() && url.listen.is_none() {
        return Err(Error::Misuse(format!(
            "repl_config('failover'): a candidate needs the address it serves on once promoted: add \
             ?listen=host:port to {raw:?}"
        )));
    }
    // The address this node serves on once promoted: `listen`, or (a primary) the address its
    // server has now, so that a deposed primary that rejoins can be elected later.
    let listen = url.listen.clone().or_else(|| {
        primary
            .as_ref()
            .and_then(|p| p.server_url())
            .map(|u| host_port(&u))
    });
    let name = url
        .name
        .clone()
        .or_else(|| listen.clone())
        .unwrap_or_else(|| db.path.clone());
    let timeout = Duration::from_millis((url.ttl_ms / 4).clamp(200, 2000));
    let agent = Arc::new(Agent {
        db: db.clone(),
        raw: raw.to_string(),
        etcd: Etcd::new(url.endpoints.clone(), timeout),
        url,
        name,
        listen,
        stop: AtomicBool::new(false),
        st: Mutex::new(State::default()),
    });
    if let Some(p) = primary {
        match agent.acquire(&p, true) {
            Ok(()) => {}
            // Deposed: etcd names a newer epoch. It becomes the new primary's replica now when
            // that one is published, else the thread does once it is (writes stay held).
            Err(Error::ReadOnly(why)) => {
                lock(&agent.st).role = "deposed";
                if let Err(e) = agent.rejoin(&p) {
                    agent.note_error(&why, &e);
                }
            }
            Err(e) => return Err(e),
        }
    } else {
        agent.keep_member()?;
        if let Some(kv) = agent.etcd.get(&agent.leader_key())? {
            let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            if let Some(e) = v.get("epoch").and_then(Value::as_u64) {
                agent.mark_synced(e)?;
            }
        }
        lock(&agent.st).role = "candidate";
    }
    event(&format!(
        "event=failover_started db={:?} key={:?} role={} name={:?}",
        db.path,
        agent.url.key,
        lock(&agent.st).role,
        agent.name
    ));
    lock(&AGENTS).insert(db.path.clone(), agent.clone());
    let a = agent.clone();
    std::thread::Builder::new()
        .name("repl-failover".into())
        .spawn(move || run(a))
        .map_err(|e| Error::io("starting the failover thread", e))?;
    Ok(())
}

/// Stops the agent of `path` (a leader revokes its lease: the candidates elect at once).
pub fn stop(path: &str) {
    if let Some(a) = lock(&AGENTS).remove(path) {
        a.stop.store(true, Ordering::Release);
        let (lease, member) = {
            let st = lock(&a.st);
            (st.lease, st.member_lease)
        };
        for l in [lease, member] {
            if l != 0 {
                let _ = a.etcd.revoke(l); // the member entry goes with its lease
            }
        }
        if let Some(p) = a.db.primary() {
            p.set_lease(None, "");
        }
    }
}

fn run(a: Arc<Agent>) {
    while !a.stop.load(Ordering::Acquire) {
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.tick()));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => a.note_error("failover", &e),
            Err(_) => a.note_error("failover", &Error::Other("panic in the agent".into())),
        }
        let nap = if a.db.primary().is_some() {
            Duration::from_millis((a.url.ttl_secs() as u64 * 1000 / 4).clamp(100, 1000))
        } else {
            TICK
        };
        if let Some(left) = nap.checked_sub(t0.elapsed()) {
            std::thread::sleep(left);
        }
    }
}

impl Agent {
    fn tick(&self) -> Result<()> {
        if let Some(p) = self.db.primary() {
            return self.lead(&p);
        }
        if let Some(r) = self.db.replica() {
            return self.candidate(&r);
        }
        Ok(())
    }

    /// The leader value this primary publishes: its URL, epoch and the settings a successor
    /// takes over.
    fn leader_value(&self, p: &Primary) -> Result<Value> {
        let policy = crate::primary::maintenance::load_policy(p.dir())?;
        let settings = crate::primary::maintenance::policy_json(&policy);
        Ok(json!({
            "name": self.name,
            "url": p.server_url(),
            "epoch": p.epoch().0,
            "sync_replicas": policy.sync_replicas,
            "settings": settings,
        }))
    }

    /// The one etcd transaction that makes a node the leader of `epoch`: `<key>` must be free
    /// and `<key>/epoch` unchanged since it was read at revision `rev`, so two nodes can never
    /// both win an epoch. It writes the epoch, `<key>` = `value` under `lease` and, for a
    /// primary taking its key (`settings`), the lease-free copy of that value in
    /// `<key>/settings`. False: someone else got there first.
    fn take_leadership(
        &self,
        rev: i64,
        epoch: i64,
        value: &serde_json::Value,
        lease: i64,
        settings: bool,
    ) -> Result<bool> {
        let mut ops = vec![
            Op::Put {
                key: self.epoch_key(),
                value: epoch.to_string().into_bytes(),
                lease: 0,
            },
            Op::Put {
                key: self.leader_key(),
                value: value.to_string().into_bytes(),
                lease,
            },
        ];
        if settings {
            ops.push(Op::Put {
                key: self.settings_key(),
                value: value.to_string().into_bytes(),
                lease: 0,
            });
        }
        self.etcd.txn(
            &[
                Cmp::Absent(self.leader_key()),
                Cmp::ModRev(self.epoch_key(), rev),
            ],
            &ops,
        )
    }

    /// Takes the leadership key for primary `p` (first call: `first`); Err when another holds
    /// it or a newer epoch exists.
    fn acquire(&self, p: &Primary, first: bool) -> Result<()> {
        let sent = crate::primary::fence::mono_ms();
        let (lease, ttl) = self.etcd.grant(self.url.ttl_secs())?;
        let ours = p.epoch().0 as i64;
        let ek = self.etcd.get(&self.epoch_key())?;
        let (e, rev) = ek.as_ref().map_or((0, 0), |kv| {
            (
                String::from_utf8_lossy(&kv.value)
                    .parse::<i64>()
                    .unwrap_or(0),
                kv.mod_revision,
            )
        });
        if e > ours || (!first && e != ours) {
            let _ = self.etcd.revoke(lease);
            p.set_lease(Some(0), &format!("etcd names epoch {e} at {:?}, newer than this primary's epoch {ours}: it was deposed; it rejoins as the new primary's replica once that one is published", self.epoch_key()));
            return Err(Error::ReadOnly(format!(
                "failover: etcd's {:?} is epoch {e}, this primary's is {ours}: another primary was elected",
                self.epoch_key()
            )));
        }
        let value = self.leader_value(p)?;
        let won = self.take_leadership(rev, ours, &value, lease, true)?;
        if !won {
            let _ = self.etcd.revoke(lease);
            let holder = self.etcd.get(&self.leader_key())?;
            return Err(Error::Busy(format!(
                "failover: the leadership key {:?} is held ({}); a primary takes it only when it is free \
                 (wait for that lease to end, about {} s)",
                self.url.key,
                holder.map_or("changed meanwhile".into(), |kv| String::from_utf8_lossy(&kv.value).into_owned()),
                self.url.ttl_secs()
            )));
        }
        p.set_lease(Some(sent + ttl as u64 * 1000), &self.lost_why());
        let mut st = lock(&self.st);
        st.role = "leader";
        st.lease = lease;
        st.last_renew_ms = Some(crate::util::now_ms());
        st.leader = Some(value);
        st.last_error = None;
        drop(st);
        event(&format!(
            "event=failover_leader db={:?} key={:?} epoch={ours} lease={lease:x} ttl_s={ttl}",
            self.db.path, self.url.key
        ));
        Ok(())
    }

    fn lost_why(&self) -> String {
        format!(
            "its etcd lease on {:?} was not renewed before it ended (etcd unreachable, or this primary lost \
             the leadership); writes resume once it holds the key again, else repl_follow() the new primary",
            self.url.key
        )
    }

    /// Leader duty: renew; on a lost lease try to take the key back (same epoch only).
    fn lead(&self, p: &Primary) -> Result<()> {
        let lease = lock(&self.st).lease;
        if lease == 0 {
            return self.acquire_or_rejoin(p);
        }
        let sent = crate::primary::fence::mono_ms();
        let ttl = match self.etcd.keepalive(lease) {
            Ok(t) => t,
            Err(e) => {
                self.note_error("renewing the lease", &e);
                return Ok(()); // the deadline set at the last renewal stays
            }
        };
        if ttl <= 0 {
            event(&format!(
                "event=failover_lease_lost db={:?} key={:?} lease={lease:x}",
                self.db.path, self.url.key
            ));
            p.set_lease(Some(0), &self.lost_why());
            let mut st = lock(&self.st);
            st.lease = 0;
            st.role = "leader (lease lost)";
            drop(st);
            return self.acquire_or_rejoin(p);
        }
        p.set_lease(Some(sent + ttl as u64 * 1000), &self.lost_why());
        let value = self.leader_value(p)?;
        let mut st = lock(&self.st);
        st.last_renew_ms = Some(crate::util::now_ms());
        st.last_error = None;
        let changed = st.leader.as_ref() != Some(&value);
        drop(st);
        if changed
            && self.etcd.txn(
                &[Cmp::Lease(self.leader_key(), lease)],
                &[
                    Op::Put {
                        key: self.leader_key(),
                        value: value.to_string().into_bytes(),
                        lease,
                    },
                    Op::Put {
                        key: self.settings_key(),
                        value: value.to_string().into_bytes(),
                        lease: 0,
                    },
                ],
            )?
        {
            lock(&self.st).leader = Some(value);
        }
        Ok(())
    }

    /// Takes the key back (same epoch only); when etcd names a newer epoch this primary was
    /// deposed: it rejoins as the new primary's replica once that one is published.
    fn acquire_or_rejoin(&self, p: &Primary) -> Result<()> {
        match self.acquire(p, false) {
            Err(Error::ReadOnly(why)) => {
                lock(&self.st).role = "deposed";
                if self.rejoin(p)? {
                    Ok(())
                } else {
                    Err(Error::ReadOnly(why))
                }
            }
            r => r,
        }
    }

    /// A deposed primary (etcd's leader value names a newer epoch and its URL) becomes that
    /// primary's replica (`roles::rejoin_as_replica`: fenced first, its unreplicated tail kept
    /// in `orphaned-<epoch>-<lsn>/`), then goes on as a candidate. `Ok(false)`: no newer leader
    /// published yet (writes stay held; the next tick tries again).
    fn rejoin(&self, p: &Primary) -> Result<bool> {
        let Some(kv) = self.etcd.get(&self.leader_key())? else {
            return Ok(false);
        };
        let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
        let epoch = v.get("epoch").and_then(Value::as_u64).unwrap_or(0);
        let Some(url) = v.get("url").and_then(Value::as_str) else {
            return Ok(false); // the winner has not published its URL yet
        };
        let old = p.epoch().0 as u64;
        if epoch <= old {
            return Ok(false);
        }
        p.set_lease(
            Some(0),
            &format!("deposed: etcd names epoch {epoch} (primary {url}); rejoining as its replica"),
        );
        if !crate::roles::rejoin_as_replica(&self.db, url)? {
            return Err(Error::Misuse(format!(
                "failover: the leader {url} of epoch {epoch} is not a newer primary of this database's \
                 lineage; not rejoining (check the etcd key {:?})",
                self.url.key
            )));
        }
        let orphaned = self
            .db
            .replica()
            .map(|r| r.status_json()["orphaned"].clone())
            .unwrap_or(Value::Null);
        event(&format!(
            "event=failover_rejoined db={:?} key={:?} epoch={old} new_epoch={epoch} leader={url:?} orphaned={}",
            self.db.path,
            self.url.key,
            orphaned
                .get("dir")
                .and_then(Value::as_str)
                .map_or("none".to_string(), |d| format!("{d:?}"))
        ));
        let mut st = lock(&self.st);
        st.role = "candidate";
        st.lease = 0;
        st.leader = Some(v);
        st.last_error = None;
        Ok(true)
    }

    /// Keeps `<key>/members/<name>` alive under the member lease (renewed every TTL/4, granted
    /// and written again when it ended, e.g. after etcd was unreachable for a TTL).
    fn keep_member(&self) -> Result<()> {
        let every = Duration::from_millis((self.url.ttl_secs() as u64 * 1000 / 4).max(100));
        let (lease, at) = {
            let st = lock(&self.st);
            (st.member_lease, st.member_renewed)
        };
        if lease != 0 {
            if at.is_some_and(|t| t.elapsed() < every) {
                return Ok(());
            }
            let now = Instant::now();
            if self.etcd.keepalive(lease)? > 0 {
                lock(&self.st).member_renewed = Some(now);
                return Ok(());
            }
        }
        let now = Instant::now();
        let (lease, _) = self.etcd.grant(self.url.ttl_secs())?;
        let me = json!({"name": self.name, "listen": self.listen});
        self.etcd.put(
            &format!("{}{}", self.members(), self.name),
            me.to_string().as_bytes(),
            lease,
        )?;
        let mut st = lock(&self.st);
        st.member_lease = lease;
        st.member_renewed = Some(now);
        drop(st);
        event(&format!(
            "event=failover_member db={:?} key={:?} name={:?} lease={lease:x}",
            self.db.path, self.url.key, self.name
        ));
        Ok(())
    }

    /// Writes `<key>/synced/<name>` = {epoch} (no lease) before this candidate follows the
    /// leader of `epoch`: from then on it may acknowledge that leader's commits, so it counts
    /// among the voters of the election that ends the epoch, even if it dies (module comment).
    fn mark_synced(&self, epoch: u64) -> Result<()> {
        if epoch == 0 || lock(&self.st).synced_epoch == epoch {
            return Ok(());
        }
        let v = json!({"name": self.name, "epoch": epoch});
        self.etcd.put(
            &format!("{}{}", self.synced(), self.name),
            v.to_string().as_bytes(),
            0,
        )?;
        lock(&self.st).synced_epoch = epoch;
        Ok(())
    }

    /// Candidate duty: follow the leader, or take part in the election.
    fn candidate(&self, r: &Arc<Replica>) -> Result<()> {
        self.keep_member()?;
        let leader = self.etcd.get(&self.leader_key())?;
        if let Some(kv) = leader {
            let v: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            let mut st = lock(&self.st);
            st.vacant_since = None;
            st.role = "candidate";
            st.leader = Some(v.clone());
            let (published, clease) = (st.published, st.candidate_lease);
            st.published = false;
            st.candidate_lease = 0;
            drop(st);
            if published {
                let _ = self
                    .etcd
                    .delete(&format!("{}{}", self.candidates(), self.name));
            }
            if clease != 0 {
                let _ = self.etcd.revoke(clease);
            }
            if let Some(url) = v.get("url").and_then(Value::as_str) {
                let epoch = v.get("epoch").and_then(Value::as_u64).unwrap_or(0);
                self.mark_synced(epoch)?;
                self.follow(r, url, epoch)?;
            }
            return Ok(());
        }
        // The key is gone: election.
        let mut st = lock(&self.st);
        let since = *st.vacant_since.get_or_insert_with(Instant::now);
        let seen_leader = st.leader.clone();
        let mut clease = st.candidate_lease;
        drop(st);
        // The last leader's settings: etcd's copy (kept without a lease), else what this
        // candidate saw. A candidate started while the key was vacant must not take a
        // synchronous database for an asynchronous one.
        let last = match self.etcd.get(&self.settings_key())? {
            Some(kv) => serde_json::from_slice::<Value>(&kv.value).ok(),
            None => None,
        }
        .or(seen_leader);
        let sync_n = last
            .as_ref()
            .and_then(|l| l.get("sync_replicas"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if clease == 0 {
            clease = self.etcd.grant(self.url.ttl_secs())?.0;
            lock(&self.st).candidate_lease = clease;
        } else if self.etcd.keepalive(clease)? <= 0 {
            lock(&self.st).candidate_lease = 0;
            return Ok(());
        }
        let ek = self.etcd.get(&self.epoch_key())?;
        let (e, rev) = ek.as_ref().map_or((0, 0), |kv| {
            (
                String::from_utf8_lossy(&kv.value)
                    .parse::<u64>()
                    .unwrap_or(0),
                kv.mod_revision,
            )
        });
        if e == 0 {
            // No primary ever held the key: nothing to take over (a primary takes it with
            // repl_config('failover') and writes the first epoch).
            lock(&self.st).role = "candidate";
            return Ok(());
        }
        lock(&self.st).role = "candidate (electing)";
        let lsn = r.lsn().0;
        let me = json!({"name": self.name, "lsn": lsn, "epoch": e});
        self.etcd.put(
            &format!("{}{}", self.candidates(), self.name),
            me.to_string().as_bytes(),
            clease,
        )?;
        lock(&self.st).published = true;
        // Live members (leased), and the voters of this epoch's election: live members plus
        // every candidate that followed this epoch's leader (module comment, "Who may win").
        let names = |kvs: Vec<crate::transport::etcd::Kv>, epoch: Option<u64>| {
            kvs.iter()
                .filter_map(|kv| {
                    let v: Value = serde_json::from_slice(&kv.value).ok()?;
                    if epoch.is_some() && v.get("epoch").and_then(Value::as_u64) != epoch {
                        return None;
                    }
                    Some(v.get("name")?.as_str()?.to_string())
                })
                .collect::<std::collections::BTreeSet<String>>()
        };
        let live = names(self.etcd.get_prefix(&self.members())?, None);
        let mut voters = live.clone();
        if sync_n > 0 {
            voters.extend(names(self.etcd.get_prefix(&self.synced())?, Some(e)));
        }
        let members = live.len() as u64;
        let mut published: Vec<(u64, String)> = self
            .etcd
            .get_prefix(&self.candidates())?
            .iter()
            .filter_map(|kv| {
                let v: Value = serde_json::from_slice(&kv.value).ok()?;
                if v.get("epoch")?.as_u64()? != e {
                    return None; // left over from an earlier election
                }
                Some((
                    v.get("lsn")?.as_u64()?,
                    v.get("name")?.as_str()?.to_string(),
                ))
            })
            .collect();
        let n = published.len() as u64;
        let voted = published.iter().filter(|c| voters.contains(&c.1)).count() as u64;
        let voters = voters.len() as u64;
        let ready = if sync_n > 0 {
            voted + sync_n > voters
        } else {
            n >= members || since.elapsed() >= Duration::from_millis(self.url.ttl_ms)
        };
        // Most advanced first; ties: the smallest name.
        published.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let best = published.first().cloned();
        if !ready || best.as_ref().map(|b| b.1.as_str()) != Some(self.name.as_str()) {
            return Ok(());
        }
        let seen = r.status_json()["epoch"].as_u64().unwrap_or(1);
        let epoch = e.max(seen) + 1;
        let mut value = json!({
            "name": self.name, "url": null, "epoch": epoch, "sync_replicas": sync_n,
            "settings": last.as_ref().and_then(|l| l.get("settings").cloned()),
        });
        let won = self.take_leadership(rev, epoch as i64, &value, clease, false)?;
        if !won {
            return Ok(());
        }
        event(&format!(
            "event=failover_won db={:?} key={:?} epoch={epoch} lsn={lsn} candidates={n} members={members} voters={voters} sync_replicas={sync_n}",
            self.db.path, self.url.key
        ));
        let url = match self.promote(epoch as u32, value.get("settings").cloned()) {
            Ok(u) => u,
            Err(e) => {
                // Give the key up at once: another candidate may manage.
                let _ = self.etcd.revoke(clease);
                lock(&self.st).candidate_lease = 0;
                return Err(e);
            }
        };
        value["url"] = json!(url);
        let p = self
            .db
            .primary()
            .ok_or_else(|| Error::Other("promoted but not a primary".into()))?;
        let sent = crate::primary::fence::mono_ms();
        let ttl = self.etcd.keepalive(clease)?;
        p.set_lease(Some(sent + ttl.max(0) as u64 * 1000), &self.lost_why());
        self.etcd.txn(
            &[Cmp::Lease(self.leader_key(), clease)],
            &[
                Op::Put {
                    key: self.leader_key(),
                    value: value.to_string().into_bytes(),
                    lease: clease,
                },
                Op::Put {
                    key: self.settings_key(),
                    value: value.to_string().into_bytes(),
                    lease: 0,
                },
                Op::Delete(format!("{}{}", self.candidates(), self.name)),
                Op::Delete(format!("{}{}", self.members(), self.name)),
            ],
        )?;
        let member = std::mem::take(&mut lock(&self.st).member_lease);
        if member != 0 {
            let _ = self.etcd.revoke(member); // a leader is no candidate (its entry goes with it)
        }
        let mut st = lock(&self.st);
        st.role = "leader";
        st.lease = clease;
        st.candidate_lease = 0;
        st.published = false;
        st.vacant_since = None;
        st.last_renew_ms = Some(crate::util::now_ms());
        st.leader = Some(value);
        st.last_error = None;
        drop(st);
        event(&format!(
            "event=failover_promoted db={:?} key={:?} epoch={epoch} url={url:?}",
            self.db.path, self.url.key
        ));
        Ok(())
    }

    /// Promotes this replica to `epoch`, serving on the configured address, with the former
    /// primary's settings; returns its URL.
    fn promote(&self, epoch: u32, settings: Option<Value>) -> Result<String> {
        let addr = self.listen.clone().unwrap_or_default();
        let cfg = crate::config::get();
        let tls = crate::transport::server::TlsFiles::from_env()?;
        let bound = crate::transport::server::Server::bind(&addr, cfg.token.clone(), tls.as_ref())
            .map_err(|e| Error::Misuse(format!("failover: cannot listen on {addr}: {e}")))?
            .with_exec_token(cfg.exec_token.clone());
        let (p, done) = crate::roles::promote(&self.db, true, Some(crate::types::Epoch(epoch)))?;
        // Writes only once the lease deadline is set by the caller.
        p.set_lease(
            Some(0),
            "promoted by failover; waiting for the lease deadline",
        );
        if let Some(Value::Object(s)) = settings {
            for (k, v) in s {
                if let Some(v) = v.as_i64() {
                    if let Ok(policy) = crate::primary::maintenance::set_setting(p.dir(), &k, v) {
                        p.apply_policy(&policy);
                    }
                }
            }
        }
        p.serve(bound)?;
        let me = p.server_url().unwrap_or_else(|| self.db.path.clone());
        // Best effort and off the takeover path: a former primary that hangs (paused, cut off)
        // rather than refusing the connection would hold the new one's URL back for as long
        // as the request's timeout. It learns the new epoch from etcd too, when it runs again.
        let (done2, me2) = (done.clone(), me.clone());
        let _ = std::thread::Builder::new()
            .name("repl-failover-notify".into())
            .spawn(move || crate::roles::notify_former(&done2, &me2));
        Ok(me)
    }

    /// Follows the leader at `url` unless this replica does already.
    fn follow(&self, r: &Arc<Replica>, url: &str, epoch: u64) -> Result<()> {
        let same = r.source().is_some_and(|s| s.to_string() == url);
        if same && r.following() {
            return Ok(());
        }
        let seen = r.status_json()["epoch"].as_u64().unwrap_or(1);
        if epoch < seen {
            return Ok(()); // a stale leader value: wait for the new one
        }
        event(&format!(
            "event=failover_follow db={:?} key={:?} leader={url:?} epoch={epoch}",
            self.db.path, self.url.key
        ));
        r.sync(Some(url))?;
        r.follow(Duration::from_millis(1000))
    }
}
