//! Epochs on the replica side (issue 16): the newest epoch this replica has seen is kept in
//! `replica.json`; a source of an older epoch (a deposed primary) is refused, and records of an
//! older epoch too. A source of a newer epoch (the replica was re-pointed at a promoted
//! replica) is followed without a re-snapshot when this replica's history is a prefix of the
//! new primary's: the new epoch starts at LSN S with checksum C (`SourceInfo::epoch_start`),
//! and a replica at S with checksum C holds exactly that state. A replica past S holds records
//! the new primary never got: it rewinds by re-snapshot, with an `event=replica_rewound` line.

use super::source::write_meta;
use super::{log_event, Replica, State};
use crate::error::{Error, Result};
use crate::transport::SourceInfo;
use crate::types::{Checksum, Epoch, Lsn};

/// What a replica at (`lsn`, `checksum`) does when its source is the primary of a newer epoch
/// whose history starts at `start` (LSN, checksum).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Switch {
    /// Its history is a prefix of the new primary's (or it is behind, and the new primary's
    /// log decides: records, or a re-snapshot when they are not retained).
    Continue,
    /// It holds a state the new primary never had: re-snapshot (the reason says why).
    Rewind(String),
}

/// The pure decision of an epoch switch (unit-tested below).
pub(super) fn epoch_switch(lsn: Lsn, checksum: Checksum, start: Option<(Lsn, Checksum)>) -> Switch {
    let Some((s, c)) = start else {
        return Switch::Rewind(
            "the new primary does not say where its epoch starts, so a shared history cannot be checked"
                .into(),
        );
    };
    if lsn > s {
        return Switch::Rewind(format!(
            "the replica holds LSNs {}..={lsn} that the new primary never got (its epoch starts after LSN {s})",
            s.0 + 1
        ));
    }
    if lsn == s && checksum != c {
        return Switch::Rewind(format!(
            "at LSN {s} the replica's checksum is {checksum} but the new primary's is {c}: the histories differ"
        ));
    }
    Switch::Continue
}

/// Every record of a batch must be of the epoch the replica follows: an older one is a deposed
/// primary's, a newer one means the source changed epoch during the sync (the next sync
/// handles the switch). Nothing of the batch is applied otherwise.
pub(super) fn record_epochs(follows: Epoch, records: &[crate::txlog::Record]) -> Result<()> {
    if let Some(r) = records.iter().find(|r| r.meta.epoch != follows) {
        let older = r.meta.epoch < follows;
        return Err(Error::ReadOnly(format!(
            "record LSN {} is of epoch {}, but this replica follows epoch {follows}: {}; nothing was applied",
            r.meta.lsn,
            r.meta.epoch,
            if older {
                "records of a deposed primary are refused; follow the current primary"
            } else {
                "the source changed epoch during this sync; the next repl_sync() checks the new epoch"
            }
        )));
    }
    Ok(())
}

impl Replica {
    /// Compares the source's epoch (`info`) with the newest this replica has seen: older is
    /// refused, newer is handled once the live state is loaded (`switch_epoch`).
    pub(super) fn check_epoch(&self, st: &mut State, info: &SourceInfo) -> Result<()> {
        if let Some(spec) = st.meta.source.clone() {
            self.refuse_older_epoch(st, info, &spec)?;
        }
        st.pending_epoch = (info.epoch > st.meta.epoch).then_some((info.epoch, info.epoch_start));
        Ok(())
    }

    /// A source of an epoch older than the newest this replica has seen is a deposed primary.
    pub(super) fn refuse_older_epoch(
        &self,
        st: &State,
        info: &SourceInfo,
        spec: &crate::transport::SourceSpec,
    ) -> Result<()> {
        if info.epoch < st.meta.epoch {
            let src = spec.to_string();
            log_event(&format!(
                "event=epoch_refused db={:?} source={src:?} source_epoch={} epoch={}",
                self.db_path, info.epoch, st.meta.epoch
            ));
            return Err(Error::ReadOnly(format!(
                "{src} is a primary of epoch {} but this replica has seen epoch {}{}: that primary was deposed \
                 and its records are not this lineage's history any more; nothing was applied. Follow the \
                 current primary: repl_follow('<its URL>')",
                info.epoch,
                st.meta.epoch,
                st.meta
                    .epoch_primary
                    .as_deref()
                    .map(|p| format!(" (primary {p})"))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Records of an older epoch than the newest seen are refused (a deposed primary's).
    pub(super) fn check_record_epochs(
        &self,
        st: &State,
        records: &[crate::txlog::Record],
    ) -> Result<()> {
        record_epochs(st.meta.epoch, records)
    }

    /// With the live state loaded: follow the source's newer epoch, rewinding first when this
    /// replica's history is not a prefix of the new primary's.
    pub(super) fn switch_epoch(&self, st: &mut State) -> Result<()> {
        let Some((epoch, start)) = st.pending_epoch.take() else {
            return Ok(());
        };
        if let Switch::Rewind(why) = epoch_switch(st.lsn, st.sums.total(), start) {
            log_event(&format!(
                "event=replica_rewound db={:?} lsn={} new_epoch={epoch} epoch_start_lsn={} reason={why:?}",
                self.db_path,
                st.lsn,
                start.map_or(0, |s| s.0 .0)
            ));
            if let Err(e) = self.resnapshot(st, &format!("new epoch {epoch}: {why}")) {
                st.pending_epoch = Some((epoch, start));
                return Err(e);
            }
        }
        self.adopt_epoch(st, epoch)
    }

    /// This replica now follows `epoch` (remembered in `replica.json`, sent with requests).
    pub(super) fn adopt_epoch(&self, st: &mut State, epoch: Epoch) -> Result<()> {
        st.pending_epoch = None;
        if epoch == st.meta.epoch {
            return Ok(());
        }
        let before = st.meta.epoch;
        st.meta.epoch = epoch;
        st.meta.epoch_primary = st.meta.source.as_ref().map(|s| s.to_string());
        write_meta(&self.dir, &st.meta)?;
        log_event(&format!(
            "event=epoch_followed db={:?} epoch={epoch} previous_epoch={before} primary={:?} lsn={}",
            self.db_path,
            st.meta.epoch_primary.as_deref().unwrap_or("?"),
            st.lsn
        ));
        self.announce_epoch(st);
        Ok(())
    }

    /// Tell the sources (the sync's and the follower's) which epoch to send.
    pub(super) fn announce_epoch(&self, st: &State) {
        let primary = st.meta.epoch_primary.as_deref();
        if let Some(s) = &st.source {
            s.set_epoch(st.meta.epoch, primary);
        }
        *super::lock(&self.seen_epoch) = (st.meta.epoch, st.meta.epoch_primary.clone());
        if let Some((_, s)) = super::lock(&self.shared_source).as_ref() {
            s.set_epoch(st.meta.epoch, primary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_another_epoch_are_refused() {
        use crate::txlog::{Page, Record, RecordMeta};
        use crate::types::{Generation, PageNo, PageSize};
        let rec = |lsn: u64, e: u32| Record {
            meta: RecordMeta {
                lsn: Lsn(lsn),
                generation: Generation(1),
                snapshot: false,
                page_size: PageSize::new(512).unwrap(),
                commit_size: 1,
                timestamp_ms: 0,
                wal_salts: [0; 8],
                wal_frame: 0,
                wal_cksum: (0, 0),
                db_checksum: Checksum(0),
                page_count: 1,
                epoch: Epoch(e),
            },
            pages: vec![Page {
                pgno: PageNo::new(1).unwrap(),
                data: vec![0; 512],
            }],
        };
        assert!(record_epochs(Epoch(2), &[rec(5, 2), rec(6, 2)]).is_ok());
        let e = record_epochs(Epoch(2), &[rec(5, 2), rec(6, 1)]).unwrap_err();
        assert!(matches!(e, Error::ReadOnly(_)));
        assert!(e.to_string().contains("LSN 6 is of epoch 1") && e.to_string().contains("deposed"));
        let e = record_epochs(Epoch(2), &[rec(5, 3)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed epoch"), "{e}");
    }

    #[test]
    fn replica_json_without_epoch_is_epoch_1_and_keeps_it() {
        use super::super::source::ReplicaMeta;
        let old = r#"{"format":1,"role":"replica","source":"/p.db","lineage":"ab","created_ms":5}"#;
        let m = ReplicaMeta::from_json(old).unwrap();
        assert_eq!((m.epoch, m.epoch_primary.as_deref()), (Epoch::FIRST, None));
        let mut m2 = m.clone();
        m2.epoch = Epoch(3);
        m2.epoch_primary = Some("http://b:1".into());
        let back = ReplicaMeta::from_json(&m2.to_json()).unwrap();
        assert_eq!(
            (back.epoch, back.epoch_primary.as_deref()),
            (Epoch(3), Some("http://b:1"))
        );
    }

    #[test]
    fn epoch_start_header_round_trip() {
        let s = (Lsn(41), Checksum(0x00ab_cdef_0123_4567));
        let text = crate::transport::format_epoch_start(s);
        assert_eq!(text, "41 00abcdef01234567");
        assert_eq!(crate::transport::parse_epoch_start(&text), Some(s));
        assert_eq!(crate::transport::parse_epoch_start("41"), None);
        assert_eq!(crate::transport::parse_epoch_start("x 00"), None);
    }

    #[test]
    fn prefix_continues_ahead_or_different_rewinds() {
        let start = Some((Lsn(10), Checksum(77)));
        assert_eq!(epoch_switch(Lsn(10), Checksum(77), start), Switch::Continue);
        // Behind: the new primary's log decides (records, or 410 and a re-snapshot).
        assert_eq!(epoch_switch(Lsn(4), Checksum(1), start), Switch::Continue);
        match epoch_switch(Lsn(12), Checksum(77), start) {
            Switch::Rewind(m) => assert!(m.contains("LSNs 11..=12"), "{m}"),
            s => panic!("{s:?}"),
        }
        match epoch_switch(Lsn(10), Checksum(78), start) {
            Switch::Rewind(m) => assert!(m.contains("histories differ"), "{m}"),
            s => panic!("{s:?}"),
        }
        assert!(matches!(
            epoch_switch(Lsn(10), Checksum(77), None),
            Switch::Rewind(_)
        ));
    }
}
