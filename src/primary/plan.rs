//! The capture decision of WAL.md §D.4/D.7 as a pure function: given the capture position,
//! the wal-index header found under WRITE, whether this WRITE session's T1 caught up, and the
//! write intent left in the position file, what must capture do: nothing, record a WAL reset,
//! capture frames (checked against a dead session's intent or not), or start a new generation
//! (a gap). No I/O: `Primary::plan` (capture.rs) reads the inputs, `capture_once` acts on the
//! answer. See the `primary` module doc for why each rule holds.

use super::position::{Intent, IntentCheck, Position};
use crate::wal::WalIndexHeader;

/// What capture must do with the frames between the position and the header.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    Nothing,
    Reset,
    /// Reset if the database file equals the captured state, else a gap (the reason).
    ResetIfDbMatches(String),
    /// Reset if page 1 of the database file equals the captured one, else a gap (the reason).
    ResetIfPage1Matches(String),
    /// Capture frames start..=mxFrame; with `check`, only if they pass it (else a gap).
    Frames {
        start: u32,
        running: (u32, u32),
        check: Option<IntentCheck>,
    },
    Gap(String),
}

/// Everything the decision looks at (read by the caller under WRITE).
pub(super) struct Inputs<'a> {
    /// The capture position (the last captured LSN and the WAL position just after it).
    pub pos: Position,
    /// The live wal-index header.
    pub header: &'a WalIndexHeader,
    /// T2 of the WRITE session whose T1 caught up: whatever was committed since is ours.
    pub witnessed: bool,
    /// The write intent in the position file (read only when not `witnessed`).
    pub intent: Option<Intent>,
    /// The checksum of the WAL header with the header's salts (what frame 1's running
    /// checksum starts from); only used when the header has frames.
    pub wal_cksum: (u32, u32),
}

pub(super) fn plan(input: &Inputs<'_>) -> Plan {
    let &Inputs {
        pos,
        header: h,
        witnessed,
        intent,
        wal_cksum,
    } = input;
    // Not the owning session's T2, and an intent is pending: its session's process died
    // (WRITE is exclusive and we hold it). It vouches for the frames only while the
    // position is still exactly where that session's T1 left it.
    let dead = if witnessed {
        None
    } else {
        intent
            .filter(|i| {
                i.lsn == pos.lsn
                    && i.generation == pos.generation
                    && i.salts == pos.salts
                    && i.frame == pos.frame
            })
            .map(|intent| IntentCheck { intent })
    };
    if h.mx_frame == 0 {
        if h.salts == pos.salts {
            if pos.frame == 0 {
                return Plan::Nothing;
            }
            return Plan::Gap(format!(
                "the WAL went backwards: empty with the same salts, captured up to frame {}",
                pos.frame
            ));
        }
        if witnessed {
            return Plan::Reset;
        }
        if pos.frame == 0 && dead.is_none() {
            // Nothing captured in the old WAL, but nobody of ours reset it: a restart after a
            // TRUNCATE checkpoint (recovery of an empty WAL), or the WAL was deleted outside —
            // a rollback journal mode and back, whose writes went straight into the database
            // file. Those always rewrite page 1 (its change counter), so page 1 of the file
            // must still be the captured one (one read, not the whole file).
            return Plan::ResetIfPage1Matches(
                "the WAL was reset by a writer we did not witness (salts changed, nothing was \
                 captured in the old WAL) and page 1 of the database file differs from the \
                 captured state (written in a rollback journal mode?)"
                    .into(),
            );
        }
        if let Some(c) = dead {
            // The dead session reset the WAL (a TRUNCATE checkpoint, or a restart whose
            // transaction rolled back) after catching up: loss-free if nothing committed
            // since, which an unchanged iChange proves. A rebuilt header (iChange reset by
            // recovery) proves nothing: the WAL may also have been checkpointed and deleted
            // by a writer without the extension closing last. Then the database file (the
            // whole state while the WAL is empty) must equal the captured state.
            if h.change == c.intent.change {
                return Plan::Reset;
            }
            return Plan::ResetIfDbMatches(format!(
                "the WAL was reset after write session of pid {} died, iChange {} -> {}, and \
                 the database file differs from the captured state",
                c.intent.pid, c.intent.change, h.change
            ));
        }
        return Plan::Gap(format!(
            "the WAL was reset (salts changed, now empty) by a writer we did not witness; captured up to frame {}",
            pos.frame
        ));
    }
    if h.salts == pos.salts {
        if h.mx_frame < pos.frame {
            return Plan::Gap(format!(
                "the WAL went backwards: mxFrame {} < captured frame {} (lost committed frames?)",
                h.mx_frame, pos.frame
            ));
        }
        if h.mx_frame == pos.frame {
            if h.frame_cksum != pos.cksum && pos.frame > 0 {
                return Plan::Gap("WAL checksum at the captured frame changed".into());
            }
            return Plan::Nothing;
        }
        if !witnessed && dead.is_none() {
            // Committed frames nobody of ours captured under WRITE and no crashed write
            // session of ours to account for them: a writer without the extension. They
            // could be read, but the lineage promise is that every commit went through
            // capture; answer with a new generation and a snapshot that includes them.
            return Plan::Gap(format!(
                "frames {}..{} were committed without capture (a writer without the extension)",
                pos.frame + 1,
                h.mx_frame
            ));
        }
        let (start, running) = if pos.frame == 0 {
            (1, wal_cksum)
        } else {
            (pos.frame + 1, pos.cksum)
        };
        return Plan::Frames {
            start,
            running,
            check: dead,
        };
    }
    if witnessed || dead.is_some() {
        // A restart by this session (after T1 caught up), or by the dead one (its intent
        // says it had caught up; the frames must then be its one transaction).
        return Plan::Frames {
            start: 1,
            running: wal_cksum,
            check: dead,
        };
    }
    Plan::Gap("the WAL was restarted (new salts) by a writer we did not witness".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Generation, Lsn};

    const OLD: [u8; 8] = [1; 8];
    const NEW: [u8; 8] = [2; 8];
    const WAL_CKSUM: (u32, u32) = (0xaaaa, 0xbbbb);
    const POS_CKSUM: (u32, u32) = (0x1111, 0x2222);

    fn pos(frame: u32) -> Position {
        Position {
            lsn: Lsn(10),
            generation: Generation(2),
            salts: OLD,
            frame,
            cksum: POS_CKSUM,
        }
    }

    fn header(
        salts: [u8; 8],
        mx_frame: u32,
        change: u32,
        frame_cksum: (u32, u32),
    ) -> WalIndexHeader {
        let mut h = WalIndexHeader::parse_copy(&[0u8; 48]);
        h.salts = salts;
        h.mx_frame = mx_frame;
        h.change = change;
        h.frame_cksum = frame_cksum;
        h
    }

    /// The intent T1 of a session leaves at `pos(frame)` with iChange 7.
    fn intent(frame: u32) -> Intent {
        Intent {
            pid: 77,
            salts: OLD,
            frame,
            change: 7,
            lsn: Lsn(10),
            generation: Generation(2),
        }
    }

    /// What a row expects (a gap by a fragment of its reason).
    #[derive(Debug)]
    enum Want {
        Nothing,
        Reset,
        ResetIfDbMatches,
        ResetIfPage1Matches,
        Frames(u32, (u32, u32), bool),
        Gap(&'static str),
    }

    /// (name, position, live header, witnessed, intent in the position file, expected).
    type Row = (
        &'static str,
        Position,
        WalIndexHeader,
        bool,
        Option<Intent>,
        Want,
    );

    #[test]
    fn every_rule_of_the_decision() {
        let stale = Intent {
            lsn: Lsn(9),
            ..intent(5)
        };
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            // empty WAL
            ("empty, same salts, nothing captured", pos(0), header(OLD, 0, 7, (0, 0)), false, None, Want::Nothing),
            ("empty, same salts, frames captured", pos(5), header(OLD, 0, 7, (0, 0)), false, None, Want::Gap("went backwards: empty")),
            ("empty, new salts, nothing captured, not witnessed", pos(0), header(NEW, 0, 7, (0, 0)), false, None, Want::ResetIfPage1Matches),
            ("empty, new salts, nothing captured, witnessed", pos(0), header(NEW, 0, 7, (0, 0)), true, None, Want::Reset),
            ("empty, new salts, witnessed", pos(5), header(NEW, 0, 8, (0, 0)), true, None, Want::Reset),
            ("empty, new salts, dead session, same iChange", pos(5), header(NEW, 0, 7, (0, 0)), false, Some(intent(5)), Want::Reset),
            ("empty, new salts, dead session, rebuilt iChange", pos(5), header(NEW, 0, 0, (0, 0)), false, Some(intent(5)), Want::ResetIfDbMatches),
            ("empty, new salts, stale intent", pos(5), header(NEW, 0, 7, (0, 0)), false, Some(stale), Want::Gap("reset (salts changed")),
            ("empty, new salts, nobody", pos(5), header(NEW, 0, 7, (0, 0)), false, None, Want::Gap("reset (salts changed")),
            // same salts
            ("same salts, fewer frames", pos(5), header(OLD, 3, 7, (0, 0)), true, None, Want::Gap("mxFrame 3 < captured frame 5")),
            ("same salts, caught up", pos(5), header(OLD, 5, 7, POS_CKSUM), false, None, Want::Nothing),
            ("same salts, same frame, other checksum", pos(5), header(OLD, 5, 7, (9, 9)), false, None, Want::Gap("checksum at the captured frame")),
            ("same salts, nothing ever captured", pos(0), header(OLD, 0, 7, (9, 9)), false, None, Want::Nothing),
            ("same salts, new frames, foreign", pos(5), header(OLD, 8, 8, (0, 0)), false, None, Want::Gap("frames 6..8 were committed without capture")),
            ("same salts, new frames, stale intent", pos(5), header(OLD, 8, 8, (0, 0)), false, Some(stale), Want::Gap("without capture")),
            ("same salts, new frames, witnessed", pos(5), header(OLD, 8, 8, (0, 0)), true, None, Want::Frames(6, POS_CKSUM, false)),
            ("same salts, first frames, witnessed", pos(0), header(OLD, 2, 8, (0, 0)), true, None, Want::Frames(1, WAL_CKSUM, false)),
            ("same salts, new frames, dead session", pos(5), header(OLD, 8, 8, (0, 0)), false, Some(intent(5)), Want::Frames(6, POS_CKSUM, true)),
            ("same salts, witnessed ignores an intent", pos(5), header(OLD, 8, 8, (0, 0)), true, Some(intent(5)), Want::Frames(6, POS_CKSUM, false)),
            // new salts with frames
            ("restart, witnessed", pos(5), header(NEW, 3, 8, (0, 0)), true, None, Want::Frames(1, WAL_CKSUM, false)),
            ("restart, dead session", pos(5), header(NEW, 3, 8, (0, 0)), false, Some(intent(5)), Want::Frames(1, WAL_CKSUM, true)),
            ("restart, nobody", pos(5), header(NEW, 3, 8, (0, 0)), false, None, Want::Gap("restarted (new salts)")),
        ];
        for (name, pos, h, witnessed, intent, want) in rows {
            let got = plan(&Inputs {
                pos,
                header: &h,
                witnessed,
                intent,
                wal_cksum: WAL_CKSUM,
            });
            let ok = match (&want, &got) {
                (Want::Nothing, Plan::Nothing) | (Want::Reset, Plan::Reset) => true,
                (Want::ResetIfDbMatches, Plan::ResetIfDbMatches(_)) => true,
                (Want::ResetIfPage1Matches, Plan::ResetIfPage1Matches(_)) => true,
                (Want::Gap(part), Plan::Gap(why)) => why.contains(part),
                (
                    Want::Frames(s, r, checked),
                    Plan::Frames {
                        start,
                        running,
                        check,
                    },
                ) => {
                    s == start
                        && r == running
                        && check.is_some() == *checked
                        && check.is_none_or(|c| c.intent == intent.expect("checked"))
                }
                _ => false,
            };
            assert!(ok, "{name}: want {want:?}, got {got:?}");
        }
    }
}
