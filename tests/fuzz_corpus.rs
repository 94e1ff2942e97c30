//! The seed corpora of the WAL and HTTP fuzz targets (`tests/corpus/wal_parse/`,
//! `tests/corpus/http_input/`) under `cargo test`: every committed file goes through the same
//! entry point the fuzz target calls (`wal::exercise_wal`, `transport::fuzzing::exercise_http`),
//! which must not panic. The seeds are generated here (a valid WAL and wal-index, truncations,
//! flips; record bodies, URLs, exec bodies); regenerate after a format change with
//! `cargo test --test fuzz_corpus -- --ignored regenerate_corpora`.

use replica::transport::fuzzing::exercise_http;
use replica::txlog::{
    encode_record, encode_record_with, Compression, DbChecksum, Page, Record, RecordMeta,
};
use replica::types::{Generation, Lsn, PageNo, PageSize};
use replica::wal::{
    encode_frame, exercise_wal, hash_insert, shm_publish_header, ShmAccess, VecShm, WalHeader,
    WalIndexHeader, SHM_VERSION,
};
use std::path::PathBuf;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(name)
}

fn wal_seeds() -> Vec<(String, Vec<u8>)> {
    let ps = PageSize::new(512).unwrap();
    let salts = *b"SALTsalt";
    let (hdr, h) = WalHeader::encode(false, ps, 7, salts);
    let mut wal = hdr.to_vec();
    let mut running = h.cksum;
    for (i, (pgno, commit)) in [(1u32, 0u32), (2, 0), (3, 3), (2, 3)].iter().enumerate() {
        let page = vec![i as u8 * 31 + 1; 512];
        let (f, c) = encode_frame(running, *pgno, *commit, salts, &page, false);
        running = c;
        wal.extend_from_slice(&f);
    }
    let mut shm = VecShm::new();
    shm.ensure_block(0).unwrap();
    for (frame, pgno) in [(1u32, 1u32), (2, 2), (3, 3), (4, 2)] {
        hash_insert(&mut shm, frame, pgno).unwrap();
    }
    let ih = WalIndexHeader {
        version: SHM_VERSION,
        change: 2,
        is_init: 1,
        big_end_cksum: false,
        page_size: 512,
        mx_frame: 4,
        n_page: 3,
        frame_cksum: running,
        salts,
        cksum: (0, 0),
    };
    shm_publish_header(&mut shm, &ih);
    let shm_bytes: Vec<u8> = shm.blocks.concat();
    let mut out = vec![
        ("wal-valid.bin".to_string(), wal.clone()),
        ("wal-header-only.bin".to_string(), wal[..32].to_vec()),
        (
            "wal-torn-frame.bin".to_string(),
            wal[..32 + 536 + 100].to_vec(),
        ),
        ("shm-valid.bin".to_string(), shm_bytes.clone()),
        ("shm-header.bin".to_string(), shm_bytes[..136].to_vec()),
    ];
    for at in [0usize, 5, 20, 40, 32 + 3, 32 + 24 + 7, wal.len() - 1] {
        let mut b = wal.clone();
        b[at] ^= 0x40;
        out.push((format!("wal-flip-{at}.bin"), b));
    }
    for at in [2usize, 16, 60, 100, 200] {
        let mut b = shm_bytes[..4096].to_vec();
        b[at] ^= 0x40;
        out.push((format!("shm-flip-{at}.bin"), b));
    }
    out
}

/// A manifest with a snapshot at LSN 3 and two chunks 4..=5, 6..=9 (as the uploader writes it).
fn manifest_seed() -> Vec<u8> {
    use replica::transport::s3::manifest::{chunk_key, snapshot_key, Manifest, Object};
    use replica::types::{Checksum, Epoch};
    let obj = |key: String, first: u64, last: u64| Object {
        key,
        first_lsn: Lsn(first),
        last_lsn: Lsn(last),
        generation: Generation(1),
        epoch: Epoch::FIRST,
        first_ms: 1_700_000_000_000 + first,
        last_ms: 1_700_000_000_000 + last,
        bytes: 4096,
        xxh3: 0x1234,
        db_checksum: Checksum(0xabcd + last),
    };
    let mut m = Manifest::new("lineage-1", Epoch::FIRST, 4096, "w1", "host:1");
    m.snapshots
        .push(obj(snapshot_key(Lsn(3), Generation(1)), 3, 3));
    m.chunks.push(obj(chunk_key(Lsn(4), Lsn(5)), 4, 5));
    m.chunks.push(obj(chunk_key(Lsn(6), Lsn(9)), 6, 9));
    m.to_json().into_bytes()
}

fn http_seeds() -> Vec<(String, Vec<u8>)> {
    let ps = PageSize::new(512).unwrap();
    let rec = |lsn: u64| {
        let pages = vec![Page {
            pgno: PageNo::new(1).unwrap(),
            data: vec![lsn as u8; 512],
        }];
        Record {
            meta: RecordMeta {
                lsn: Lsn(lsn),
                generation: Generation(1),
                snapshot: false,
                page_size: ps,
                commit_size: 1,
                timestamp_ms: 1_700_000_000_000,
                wal_salts: *b"saltsalt",
                wal_frame: lsn as u32,
                wal_cksum: (1, 2),
                db_checksum: DbChecksum::from_pages(ps, 1, &pages).total(),
                page_count: 1,
                epoch: replica::types::Epoch::FIRST,
            },
            pages,
        }
    };
    let mut body = encode_record(&rec(5));
    body.extend_from_slice(&encode_record(&rec(6)));
    let mut gap = encode_record(&rec(5));
    gap.extend_from_slice(&encode_record(&rec(7)));
    let mut out = vec![
        ("log-body.bin".to_string(), body.clone()),
        ("log-body-gap.bin".to_string(), gap),
        (
            "log-body-cut.bin".to_string(),
            body[..body.len() - 9].to_vec(),
        ),
    ];
    let mut flipped = body.clone();
    flipped[200] ^= 1;
    out.push(("log-body-flip.bin".to_string(), flipped));
    // Compressed records as a primary with `compress` on serves them (FORMAT.md §3.7, §8.9).
    let mut zbody = encode_record_with(&rec(5), Compression::Zstd(3));
    zbody.extend_from_slice(&encode_record_with(&rec(6), Compression::Lz4));
    let mut zflip = zbody.clone();
    zflip[97] ^= 1;
    out.push(("log-body-compressed.bin".to_string(), zbody));
    out.push(("log-body-compressed-flip.bin".to_string(), zflip));
    // What a bucket returns (FORMAT.md §9): a manifest as the uploader writes it and damaged
    // copies (encrypted objects: `sealed_seeds`).
    let manifest = manifest_seed();
    out.push(("bucket-manifest.json".to_string(), manifest.clone()));
    let cut = manifest.len() / 2;
    out.push((
        "bucket-manifest-cut.json".to_string(),
        manifest[..cut].to_vec(),
    ));
    let text = String::from_utf8(manifest.clone()).unwrap();
    out.push((
        "bucket-manifest-overlap.json".to_string(),
        text.replacen("\"first_lsn\": 6", "\"first_lsn\": 5", 1)
            .into_bytes(),
    ));
    for (i, u) in [
        "/v1/log?from=1&wait_ms=100&max_bytes=4096",
        "/v1/log?from=-1",
        "/v1/log?from=99999999999999999999999",
        "/v1/log?from=1&from=2&generation=4294967296",
        "/v1/info",
        "/v1/log?&&=&from",
    ]
    .iter()
    .enumerate()
    {
        out.push((format!("url-{i}.txt"), u.as_bytes().to_vec()));
    }
    for (i, j) in [
        r#"{"sql": "INSERT INTO t VALUES (?)", "params": [1, "x", null, {"blob": "00ff"}], "request_id": "r1"}"#,
        r#"{"sql": " ", "params": []}"#,
        r#"{"sql": "x", "params": {"a": 1}}"#,
        r#"{"sql": "x", "request_id": 7}"#,
        r#"[1, 2, 3]"#,
    ]
    .iter()
    .enumerate()
    {
        out.push((format!("exec-{i}.json"), j.as_bytes().to_vec()));
    }
    out
}

fn check(name: &str, seeds: Vec<(String, Vec<u8>)>, run: fn(&[u8])) {
    let d = dir(name);
    let mut n = 0;
    for e in std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}; regenerate the corpora", d.display()))
    {
        let p = e.unwrap().path();
        run(&std::fs::read(&p).unwrap());
        n += 1;
    }
    assert!(
        n >= seeds.len(),
        "{}: {n} files, {} seeds: regenerate the corpora",
        d.display(),
        seeds.len()
    );
    for (file, bytes) in seeds {
        let on_disk = std::fs::read(d.join(&file)).unwrap_or_default();
        assert_eq!(
            on_disk, bytes,
            "{file} is stale: cargo test --test fuzz_corpus -- --ignored regenerate_corpora"
        );
        run(&bytes);
    }
}

#[test]
fn wal_corpus_decodes_without_panicking() {
    check("wal_parse", wal_seeds(), exercise_wal);
    // The valid seed is what it claims: recovery finds its 4 frames and last commit.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("w");
    std::fs::write(&p, &wal_seeds()[0].1).unwrap();
    let r = replica::wal::recover_scan(&std::fs::File::open(&p).unwrap()).unwrap();
    assert_eq!((r.valid_frames, r.mx_frame, r.n_page), (4, 4, 3));
    let shm = VecShm::from_bytes(&wal_seeds()[3].1);
    assert_eq!(
        replica::wal::shm_read_header(&shm).map(|h| h.mx_frame),
        Some(4)
    );
}

#[test]
fn http_corpus_decodes_without_panicking() {
    check("http_input", http_seeds(), exercise_http);
}

/// Encrypted objects (a random nonce each time, so written by `regenerate_corpora` but not
/// compared with the committed files): the log body sealed with the fuzz entry point's key, and
/// a copy with one flipped byte.
fn sealed_seeds() -> Vec<(String, Vec<u8>)> {
    let key = replica::transport::s3::crypt::Key::parse(&[7u8; 32], "seed").unwrap();
    let body = http_seeds().remove(0).1;
    let sealed = key.seal("log/x.seg", &body).unwrap();
    let mut flip = sealed.clone();
    flip[40] ^= 1;
    vec![
        ("bucket-sealed.bin".to_string(), sealed),
        ("bucket-sealed-flip.bin".to_string(), flip),
    ]
}

#[test]
#[ignore = "writes the committed seed corpora; run after a format change"]
fn regenerate_corpora() {
    for (file, bytes) in sealed_seeds() {
        std::fs::write(dir("http_input").join(file), bytes).unwrap();
    }
    for (name, seeds) in [("wal_parse", wal_seeds()), ("http_input", http_seeds())] {
        let d = dir(name);
        std::fs::create_dir_all(&d).unwrap();
        for (file, bytes) in seeds {
            std::fs::write(d.join(file), bytes).unwrap();
        }
    }
}
