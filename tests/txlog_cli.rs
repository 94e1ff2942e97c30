//! Runs the built `sqlite-replica` binary on a synthetic log written through the public API:
//! verify / inspect / rebuild succeed and match the model; a corrupted byte in a segment makes
//! every command exit non-zero with a message naming the segment file; usage errors exit 2.

use replica::txlog::{DbChecksum, Log, LogConfig, Meta, Page, Record, RecordMeta};
use replica::types::{Generation, Lsn, PageNo, PageSize};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PS: u32 = 1024;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sqlite-replica"))
        .args(args)
        .output()
        .expect("run the binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes a log (LSN 1 = snapshot of 4 pages, then 7 transactions) into `dir`; returns the
/// database bytes after each LSN (index = LSN).
fn build_log(dir: &Path) -> Vec<Vec<u8>> {
    let ps = PageSize::new(PS).unwrap();
    let mut log = Log::create(
        dir,
        &Meta::new("primary", ps).unwrap(),
        LogConfig {
            segment_bytes: 8192,
            ..LogConfig::default()
        },
    )
    .unwrap();
    let mut pages: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8 + 1; PS as usize]).collect();
    let mut states = vec![Vec::new()];
    for lsn in 1..=8u64 {
        let (writes, size): (Vec<u32>, u32) = match lsn {
            1 => ((1..=4).collect(), 4),
            l if l % 3 == 0 => (vec![1, 6], 6),
            7 => (vec![2], 3),
            l => (vec![(l as u32 % 4) + 1], 5),
        };
        pages.resize(size as usize, vec![0; PS as usize]);
        let mut rec_pages = Vec::new();
        for n in writes {
            if lsn > 1 {
                pages[n as usize - 1] = vec![(lsn * 7 + u64::from(n)) as u8; PS as usize];
            }
            rec_pages.push(Page {
                pgno: PageNo::new(n).unwrap(),
                data: pages[n as usize - 1].clone(),
            });
        }
        let sum = DbChecksum::from_db_bytes(ps, &pages.concat()).total();
        let meta = RecordMeta {
            lsn: Lsn(lsn),
            generation: Generation(1),
            snapshot: lsn == 1,
            page_size: ps,
            commit_size: size,
            timestamp_ms: 1_700_000_000_000 + lsn,
            wal_salts: [0; 8],
            wal_frame: lsn as u32,
            wal_cksum: (1, 2),
            db_checksum: sum,
            page_count: rec_pages.len() as u32,
            epoch: replica::types::Epoch::FIRST,
        };
        log.append(&Record {
            meta,
            pages: rec_pages,
        })
        .unwrap();
        states.push(pages.concat());
    }
    log.sync().unwrap();
    states
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn verify_inspect_rebuild() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("app.db-replica");
    let states = build_log(&dir);
    let dir_s = dir.to_str().unwrap();
    assert!(segments(&dir).len() > 1, "the test wants several segments");

    let o = run(&["verify", dir_s]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("records 8") && out.contains("LSN 1..8") && out.ends_with("OK\n"),
        "{out}"
    );

    let o = run(&["inspect", dir_s]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines: Vec<String> = text(&o.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 8);
    let f: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(&f[..5], &["1", "1", "snapshot", "4", "4"]);
    assert_eq!(f[5].len(), 16);
    assert_eq!(f[6], "1700000000001");
    assert!(lines[2].starts_with("3 1 txn 2 6 "), "{}", lines[2]);
    let o = run(&["inspect", dir_s, "--from", "5"]);
    let lines: Vec<String> = text(&o.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 4);
    assert!(lines[0].starts_with("5 "));

    let db = d.path().join("out.db");
    let o = run(&["rebuild", dir_s, db.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("LSN 8"));
    assert_eq!(std::fs::read(&db).unwrap(), states[8]);
    let o = run(&["rebuild", dir_s, db.to_str().unwrap(), "--lsn", "4"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&db).unwrap(), states[4]);
    let o = run(&["rebuild", dir_s, db.to_str().unwrap(), "--lsn", "99"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("LSN 99"));
}

#[test]
fn corrupted_segment_fails_with_the_file_named() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("r");
    build_log(&dir);
    let seg = segments(&dir)[0].clone();
    let mut b = std::fs::read(&seg).unwrap();
    b[32 + 88 + 4 + 100] ^= 0x01; // a byte of the first page of the first record
    std::fs::write(&seg, &b).unwrap();
    let dir_s = dir.to_str().unwrap();
    let name = seg.file_name().unwrap().to_str().unwrap();
    let db = d.path().join("out.db");
    for args in [
        vec!["verify", dir_s],
        vec!["inspect", dir_s],
        vec!["rebuild", dir_s, db.to_str().unwrap()],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = text(&o.stderr);
        assert!(
            err.contains(name) && err.contains("checksum mismatch"),
            "{args:?}: {err}"
        );
    }
    assert!(!db.exists());
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&[]).status.code(), Some(2));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        run(&["rebuild", "a", "b", "--lsn", "x"]).status.code(),
        Some(2)
    );
    assert_eq!(run(&["inspect", "a", "--bogus"]).status.code(), Some(2));
    let o = run(&["verify", "/definitely/not/here"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("not a replication log directory"));
}
