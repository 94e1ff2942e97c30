//! The primary's background work (run by the shared workers, `workers.rs`): the group fsync
//! round (the WAL for synchronous=NORMAL, and for every mode the log segments written since
//! the last round) after which it raises the durable watermark (records become visible to
//! replicas only up to it: FORMAT.md §7, "in the log and the log fsynced"), and the T3 poll
//! that notices commits made without the shim.

use super::{lock, read_header, Primary};

impl Primary {
    /// Make every record captured so far durable and visible to replicas now (the group
    /// fsync round, run synchronously). Called when a connection to the primary closes.
    ///
    /// Runs its own round whenever the watermark does not cover this process's position yet,
    /// also when the background thread already took the pending records into a round still in
    /// flight (its fsyncs take milliseconds, and a process exiting right after its last close
    /// would kill that round before its raise) or when the position came from other processes.
    pub fn flush(&self) {
        self.append_now();
        {
            let mut st = lock(&self.state);
            if st.durable >= st.pos.lsn {
                return;
            }
            st.pending = true;
        }
        self.round();
    }

    /// T3: notice commits made without the shim (on a shared worker, every few ms).
    pub(super) fn t3_check(&self) {
        // T3: a commit the shim did not see (a writer without the extension) shows as a
        // header ahead of the shared position. Our own commits are captured under WRITE (T2)
        // and only differ for microseconds, so act only when the same mismatch is seen on two
        // consecutive ticks: taking WRITE here can make an application's write fail with
        // SQLITE_BUSY if it has no busy timeout, so never take it on a transient.
        if let Some(h) = read_header(&self.agent) {
            // The claim: the position including committed transactions waiting for their
            // append (append.rs), which this kicks (a process that claimed them may be gone).
            let unprovable = match self.claim_state() {
                Some(false) => {
                    self.kick_appender();
                    false
                }
                Some(true) => true,
                None => false,
            };
            let shared = self.read_claim().or_else(|| self.read_position());
            let loaded = lock(&self.state).loaded;
            let moved = !loaded
                || unprovable
                || shared.is_none_or(|p| p.salts != h.salts || p.frame != h.mx_frame);
            let seen = (
                h.salts,
                h.mx_frame,
                h.change,
                shared.map(|p| (p.lsn, p.frame)),
            );
            let mut last = lock(&self.t3_seen);
            let stable = moved && *last == Some(seen);
            *last = if moved { Some(seen) } else { None };
            drop(last);
            // While the log cannot be written, retry from here only after a backoff: each try
            // holds WRITE, which writers would meet as SQLITE_BUSY (T1 retries anyway).
            let backing_off = lock(&self.state)
                .t3_retry_after
                .is_some_and(|t| std::time::Instant::now() < t);
            if stable && !backing_off {
                // Counted before the attempt and until the release: an application writer that
                // meets this WRITE retries in the shim instead of failing with SQLITE_BUSY.
                let _w = self.background_write();
                if self.agent.try_lock_write() {
                    crate::sys::fault_delay("t3-holds-write");
                    if let Some(h) = read_header(&self.agent) {
                        let mut st = lock(&self.state);
                        self.capture(&mut st, &self.agent, &h, false, false);
                        self.clear_intent_if_caught_up(&st, &h);
                    }
                    self.agent.unlock_write();
                    *lock(&self.t3_seen) = None;
                }
            }
        }
    }

    /// Group fsync round: make the records captured so far durable (WAL for NORMAL, the log
    /// segments for every mode), then advance the watermark.
    pub(super) fn round(&self) {
        let (target, wal, segments) = {
            let mut st = lock(&self.state);
            let (target, wal) = if st.pending {
                st.pending = false;
                st.synced = None;
                (st.pos, self.wal_file(&mut st).ok())
            } else if let Some(p) = st.synced.take() {
                (p, None) // the WAL was synced by its commit (synchronous=FULL)
            } else {
                return;
            };
            // The watermark means "in the log and the log fsynced" (FORMAT.md §7): the
            // segments written up to `target` are fsynced in this round too.
            match st.log.pending_sync() {
                Ok(b) => (target, wal, b),
                Err(e) => {
                    st.last_error = Some(e.to_string());
                    st.pending = true;
                    return;
                }
            }
        };
        if let Some(w) = wal {
            if let Err(e) = w.sync_data() {
                lock(&self.state).last_error = Some(format!("fsync of the WAL failed: {e}"));
                lock(&self.state).pending = true;
                return;
            }
        }
        if let Err(e) = segments.run() {
            let mut st = lock(&self.state);
            st.last_error = Some(e.to_string());
            st.pending = true;
            return;
        }
        lock(&self.state).log.sync_done(segments);
        // Raise the watermark without holding the state lock (commits may be waiting on it).
        if let Err(e) = self.durable_file.raise(target.lsn, target.generation) {
            lock(&self.state).last_error = Some(e.to_string());
        }
        crate::transport::notify::bump(&self.dir);
        let mut st = lock(&self.state);
        st.durable = st.durable.max(target.lsn);
    }
}
