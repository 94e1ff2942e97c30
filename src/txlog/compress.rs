//! Page compression (FORMAT.md §3.7): one page image at a time, so a damaged entry is found
//! before anything else of its record is used and decompression is always bounded by the page
//! size. zstd (the `zstd` crate, bindings to the reference C library) is the default codec; lz4
//! (`lz4_flex`, pure Rust) is the faster, weaker alternative. Both are measured by
//! `sqlite-replica compress-bench` (scripts/bench_compress.py).

use crate::error::{Error, Result};

/// Codec ids stored in byte 68 of a version-2 record header (§3.7).
pub const CODEC_ZSTD: u8 = 1;
/// See `CODEC_ZSTD`.
pub const CODEC_LZ4: u8 = 2;

/// How new records are stored: the per-database `compress` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Compression {
    /// Version-1 records, page images as they are.
    #[default]
    None,
    /// zstd at this level (1..=19).
    Zstd(i32),
    /// lz4 block format.
    Lz4,
}

/// The `compress` setting's code for lz4 (`Compression::from_code`).
pub const LZ4_CODE: u64 = 100;

/// Default zstd level: level 3 is zstd's own default; on SQLite pages higher levels gain a few
/// percent for several times the CPU (see BENCHMARKS.md "Compression").
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

impl Compression {
    /// Parses the setting's value: `none`/`off`/`0`, `zstd`, `lz4`, or a zstd level `1`..`19`
    /// (also `zstd:<level>`).
    pub fn parse(v: &str) -> Option<Compression> {
        let v = v.trim().to_ascii_lowercase();
        let level = |s: &str| s.parse::<i32>().ok().filter(|l| (1..=19).contains(l));
        match v.as_str() {
            "none" | "off" | "0" | "" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd(DEFAULT_ZSTD_LEVEL)),
            "lz4" => Some(Compression::Lz4),
            s => s
                .strip_prefix("zstd:")
                .map_or_else(|| level(s), level)
                .map(Compression::Zstd),
        }
    }

    /// The setting's canonical spelling (what `repl_config` shows and config.json stores).
    pub fn name(&self) -> String {
        match self {
            Compression::None => "none".into(),
            Compression::Zstd(l) if *l == DEFAULT_ZSTD_LEVEL => "zstd".into(),
            Compression::Zstd(l) => format!("zstd:{l}"),
            Compression::Lz4 => "lz4".into(),
        }
    }

    /// The `compress` setting's stored code: 0 = none, 1..=19 = zstd level, 100 = lz4.
    pub fn from_code(v: u64) -> Option<Compression> {
        match v {
            0 => Some(Compression::None),
            1..=19 => Some(Compression::Zstd(v as i32)),
            LZ4_CODE => Some(Compression::Lz4),
            _ => None,
        }
    }

    /// Inverse of `from_code`.
    pub fn code(&self) -> u64 {
        match self {
            Compression::None => 0,
            Compression::Zstd(l) => *l as u64,
            Compression::Lz4 => LZ4_CODE,
        }
    }

    /// The codec id of §3.7, `None` for uncompressed records.
    pub fn codec(&self) -> Option<u8> {
        match self {
            Compression::None => None,
            Compression::Zstd(_) => Some(CODEC_ZSTD),
            Compression::Lz4 => Some(CODEC_LZ4),
        }
    }
}

thread_local! {
    /// One zstd context per thread and level (a context costs about a megabyte to set up:
    /// allocating one per page took two thirds of the time).
    static ZSTD_C: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses one page; `None` when the result would not be smaller than the page (the entry
/// is then stored raw, §3.7).
pub fn compress_page(c: Compression, page: &[u8]) -> Option<Vec<u8>> {
    let out = match c {
        Compression::None => return None,
        Compression::Zstd(level) => ZSTD_C.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
            }
            let (_, z) = slot.as_mut()?;
            z.compress(page).ok()
        })?,
        Compression::Lz4 => lz4_flex::block::compress(page),
    };
    (!out.is_empty() && out.len() < page.len()).then_some(out)
}

/// Decompresses one stored page entry of `codec` into exactly `page_size` bytes. The output
/// buffer is the page size, so a frame claiming more is refused without allocating it.
pub fn decompress_page(codec: u8, stored: &[u8], page_size: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; page_size];
    let n = match codec {
        CODEC_ZSTD => ZSTD_D
            .with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(zstd::bulk::Decompressor::new()?);
                }
                let d = slot.as_mut().expect("just set");
                d.decompress_to_buffer(stored, &mut out[..])
            })
            .map_err(|e| e.to_string()),
        CODEC_LZ4 => lz4_flex::block::decompress_into(stored, &mut out).map_err(|e| e.to_string()),
        other => Err(format!("unknown codec {other}")),
    }
    .map_err(|e| {
        Error::Corrupt(format!(
            "compressed page entry of {} bytes does not decompress ({e})",
            stored.len()
        ))
    })?;
    if n != page_size {
        return Err(Error::Corrupt(format!(
            "compressed page entry decompresses to {n} bytes, the page size is {page_size}"
        )));
    }
    Ok(out)
}
