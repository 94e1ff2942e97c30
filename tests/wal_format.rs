//! WAL.md §G4: format round trip against stock SQLite writers.
//!
//! A stock writer (the system `sqlite3` CLI 3.40.1 in a separate process, and rusqlite's
//! bundled SQLite in this process) produces a WAL and a wal-index with more than 4062 frames
//! (several shm blocks) with 1 KiB and with 64 KiB pages; the `-wal` and `-shm` files are
//! copied while the writing connection is still open (`wal_autocheckpoint=0`). Our parser must
//! then agree with SQLite on everything: WAL header, the whole frame checksum chain, the
//! recovery scan, the wal-index header (mxFrame, nPage, aFrameCksum, raw salts, szPage,
//! aCksum), every aPgno entry and every hash lookup.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use replica::wal::{
    apgno_offset, block_of, frame_offset, hash_lookup, hash_lookup_checked, native_is_big_endian,
    recover_scan, shm_ckpt_info, shm_read_header, FrameReader, ShmAccess, VecShm, WalHeader,
    SHM_BLOCK_SIZE, WAL_HEADER_SIZE, WAL_VERSION,
};

const SQLITE3_CLI: &str = "/usr/bin/sqlite3";

/// The workload: many small insert transactions plus scattered updates (pages that appear in
/// many frames). `rows`/`blob` are chosen per page size so that the WAL exceeds 4062 frames.
fn workload(page_size: u32, txns: u32, rows: u32, blob: u32) -> Vec<String> {
    let mut sql = vec![
        format!("PRAGMA page_size={page_size};"),
        "PRAGMA journal_mode=WAL;".to_string(),
        "PRAGMA wal_autocheckpoint=0;".to_string(),
        "PRAGMA synchronous=NORMAL;".to_string(),
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);".to_string(),
    ];
    for i in 0..txns {
        sql.push(format!(
            "INSERT INTO t(v) SELECT randomblob({blob}) FROM \
             (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<{rows}) SELECT x FROM c);"
        ));
        if i % 4 == 3 {
            sql.push(format!(
                "UPDATE t SET v=randomblob({blob}) WHERE id % 53 = {};",
                i % 53
            ));
        }
    }
    sql
}

struct Captured {
    _dir: tempfile::TempDir,
    wal: PathBuf,
    shm: PathBuf,
}

fn sidecar(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Runs the workload in the system CLI (a separate process); the CLI copies its own `-wal`
/// and `-shm` with `.shell cp` before it exits, i.e. while its connection is open.
fn capture_with_cli(sql: &[String]) -> Captured {
    assert!(
        Path::new(SQLITE3_CLI).exists(),
        "{SQLITE3_CLI} not found: install the sqlite3 CLI (Debian package sqlite3) to run this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("cli.db");
    let (wal, shm) = (dir.path().join("copy-wal"), dir.path().join("copy-shm"));
    let mut script = sql.join("\n");
    script.push_str(&format!(
        "\n.shell cp '{}' '{}' && cp '{}' '{}'\n",
        sidecar(&db, "-wal").display(),
        wal.display(),
        sidecar(&db, "-shm").display(),
        shm.display()
    ));
    let mut child = Command::new(SQLITE3_CLI)
        .arg("-bail")
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sqlite3 CLI");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sqlite3 CLI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wal.exists() && shm.exists(),
        "CLI did not copy the -wal/-shm files"
    );
    Captured {
        _dir: dir,
        wal,
        shm,
    }
}

/// Runs the workload through rusqlite's bundled SQLite and copies the files while the
/// connection is open.
fn capture_with_rusqlite(sql: &[String]) -> Captured {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rs.db");
    let (wal, shm) = (dir.path().join("copy-wal"), dir.path().join("copy-shm"));
    let conn = rusqlite::Connection::open(&db).unwrap();
    for stmt in sql {
        conn.execute_batch(stmt).unwrap();
    }
    std::fs::copy(sidecar(&db, "-wal"), &wal).unwrap();
    std::fs::copy(sidecar(&db, "-shm"), &shm).unwrap();
    drop(conn);
    Captured {
        _dir: dir,
        wal,
        shm,
    }
}

/// Everything a linear scan of the WAL learns.
struct Scan {
    header: WalHeader,
    pgnos: Vec<u32>,
    commits: u32,
    last_commit: u32,
    n_page: u32,
    cksum_at_last_commit: (u32, u32),
}

fn scan_wal(file: &File, len: u64) -> Scan {
    let mut hb = [0u8; WAL_HEADER_SIZE];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut hb, 0).unwrap();
    let header = WalHeader::parse(&hb).expect("stock WAL header must be valid");
    assert_eq!(
        header.to_bytes(),
        hb,
        "re-encoding the header reproduces SQLite's bytes"
    );
    assert_eq!(
        header.big_endian_cksum,
        native_is_big_endian(),
        "SQLite writes the host's magic"
    );
    let mut reader = FrameReader::new(file, &header, 1, header.cksum);
    let mut s = Scan {
        header,
        pgnos: Vec::new(),
        commits: 0,
        last_commit: 0,
        n_page: 0,
        cksum_at_last_commit: (0, 0),
    };
    while let Some(f) = reader
        .next_frame()
        .expect("every stock frame must validate")
    {
        assert_eq!(f.frame_no as usize, s.pgnos.len() + 1);
        assert_eq!(f.data.len(), header.page_size.bytes());
        s.pgnos.push(f.header.pgno);
        if f.header.is_commit() {
            s.commits += 1;
            s.last_commit = f.frame_no;
            s.n_page = f.header.commit_size;
            s.cksum_at_last_commit = reader.running();
            assert_eq!(reader.running(), f.header.cksum);
        }
    }
    let n = s.pgnos.len() as u32;
    assert_eq!(reader.next_frame_no(), n + 1);
    // A fresh generation with no restart: the file ends exactly after the last frame,
    // which is a commit frame (nothing uncommitted was left behind).
    assert_eq!(frame_offset(header.page_size, n + 1), len, "WAL length");
    assert_eq!(s.last_commit, n, "last frame is a commit frame");
    s
}

fn verify(cap: &Captured, page_size: u32) {
    let wal_file = File::open(&cap.wal).unwrap();
    let wal_len = wal_file.metadata().unwrap().len();
    let scan = scan_wal(&wal_file, wal_len);
    let mx = scan.last_commit;
    assert_eq!(scan.header.page_size.get(), page_size);
    eprintln!("{page_size}: {mx} frames, {} commits", scan.commits);
    assert!(
        mx > 4062,
        "workload must span several shm blocks, got {mx} frames"
    );

    // Recovery scan agrees with the linear scan.
    let rec = recover_scan(&wal_file).unwrap();
    assert_eq!(rec.header, Some(scan.header));
    assert_eq!(
        (rec.mx_frame, rec.n_page, rec.frame_cksum),
        (mx, scan.n_page, scan.cksum_at_last_commit)
    );
    assert_eq!(rec.valid_frames, mx);
    assert_eq!(rec.pgnos, scan.pgnos);

    // wal-index header.
    let shm_bytes = std::fs::read(&cap.shm).unwrap();
    assert_eq!(
        shm_bytes.len() % SHM_BLOCK_SIZE,
        0,
        "shm size is a multiple of 32 KiB"
    );
    let shm = VecShm::from_bytes(&shm_bytes);
    assert!(
        shm.block_count() > block_of(mx),
        "{} blocks for {mx} frames",
        shm.block_count()
    );
    assert!(shm.block_count() >= 2);
    let h = shm_read_header(&shm).expect("stock wal-index header must be valid");
    assert_eq!(h.version, WAL_VERSION);
    assert_eq!(h.is_init, 1);
    assert_eq!(h.big_end_cksum, scan.header.big_endian_cksum);
    assert_eq!(h.page_size, page_size);
    let expect_sz = if page_size == 65536 {
        1
    } else {
        page_size as u16
    };
    assert_eq!(shm.read_u16(0, 14), expect_sz, "szPage encoding");
    assert_eq!(h.mx_frame, mx);
    assert_eq!(h.n_page, scan.n_page);
    assert_eq!(h.frame_cksum, scan.cksum_at_last_commit);
    assert_eq!(h.salts, scan.header.salts);
    // Salts are raw WAL header bytes 16..24, stored raw at shm offsets 32..40 (and 80..88).
    let wal_head = std::fs::read(&cap.wal).unwrap();
    assert_eq!(&shm_bytes[32..40], &wal_head[16..24]);
    assert_eq!(&shm_bytes[80..88], &wal_head[16..24]);
    // iChange counts commits (no padding with the default psow).
    assert_eq!(h.change, scan.commits, "iChange = number of commits");
    // Never checkpointed (wal_autocheckpoint=0).
    let ck = shm_ckpt_info(&shm);
    assert_eq!(ck.n_backfill, 0);
    assert_eq!(ck.read_marks[0], 0);

    // aPgno entries and hash lookups.
    let mut latest: HashMap<u32, u32> = HashMap::new();
    for f in 1..=mx {
        let pgno = scan.pgnos[f as usize - 1];
        let off = apgno_offset(f) as usize;
        let entry = u32::from_ne_bytes(shm_bytes[off..off + 4].try_into().unwrap());
        assert_eq!(entry, pgno, "aPgno entry of frame {f}");
        // The latest frame <= f holding this page is f itself.
        assert_eq!(
            hash_lookup_checked(&shm, pgno, 1, f).unwrap(),
            Some(f),
            "lookup page {pgno} in [1, {f}]"
        );
        latest.insert(pgno, f);
    }
    let dups = mx as usize - latest.len();
    assert!(dups > 100, "workload must repeat pages ({dups} repeats)");
    for (&pgno, &f) in &latest {
        assert_eq!(
            hash_lookup(&shm, pgno, 1, mx),
            Some(f),
            "latest frame of page {pgno}"
        );
    }
    // Pages never written to the WAL are not found.
    for pgno in (1..=scan.n_page + 10).filter(|p| !latest.contains_key(p)) {
        assert_eq!(
            hash_lookup_checked(&shm, pgno, 1, mx).unwrap(),
            None,
            "page {pgno}"
        );
    }
}

fn small_pages() -> Vec<String> {
    // ~15 frames per insert txn, ~40-80 per update txn: ~10 000 frames, 3 shm blocks.
    workload(1024, 400, 40, 300)
}

fn big_pages() -> Vec<String> {
    // One 60 000-byte row per 64 KiB page: ~22 frames per insert txn; > 4062 frames.
    workload(65536, 180, 20, 60000)
}

#[test]
fn cli_1k_pages() {
    verify(&capture_with_cli(&small_pages()), 1024);
}

#[test]
fn cli_64k_pages() {
    verify(&capture_with_cli(&big_pages()), 65536);
}

#[test]
fn rusqlite_1k_pages() {
    verify(&capture_with_rusqlite(&small_pages()), 1024);
}

#[test]
fn rusqlite_64k_pages() {
    verify(&capture_with_rusqlite(&big_pages()), 65536);
}
