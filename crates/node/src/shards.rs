//! Shard files (issue 16, "flat memory on one machine"): one shard of a
//! node's input, its normalised identifiers and each one's items (the
//! bank's transactions), written when a sharded node starts so that it
//! works on a shard at a time instead of holding its whole input
//! (`crate::input`). Also the shard key file both nodes of a sharded
//! collaboration read ([`init_key`], [`load_key`]).
//!
//! Layout (little endian):
//!
//! ```text
//! magic        8 bytes  "CRSHARD\0"
//! format       u32      2
//! data version 32 bytes the input's digest (`HolderData::version`, ...)
//! key id       32 bytes SHA-256("cleanroom-v1-shard-key-id" || shard key)
//! shards       u32      S
//! shard        u32      s (< S)
//! width        u32      u64 values per item (2 for the bank's
//!                       transactions, 0 for the platform's identifiers)
//! records      then, per identifier: u16 length, its bytes (1..=1024),
//!                       u32 item count (0 when width is 0), then
//!                       count * width u64 values
//! count        u64      number of records
//! checksum     32 bytes SHA-256 of everything before it
//! ```
//!
//! A reader checks, before using anything: the magic and format, that the
//! file is for the data version, shard key, `S`, `s` and width it expects,
//! the checksum over the whole file, every record's bounds and the count.
//! Anything else is a [`ShardFileError`] naming the file and what is wrong,
//! never a partial read. A writer writes to `NAME.part`, syncs it and
//! renames it into place, so a crash leaves no file that looks complete.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use ring::digest::{Context, SHA256};

/// The file's first eight bytes.
const MAGIC: &[u8; 8] = b"CRSHARD\0";
/// The layout this code writes and reads.
pub const FORMAT: u32 = 2;
/// The longest normalised identifier a shard file holds.
pub const MAX_ID_LEN: usize = 1024;
/// Header bytes: magic, format, data version, key id, S, s, width.
const HEADER_LEN: usize = 8 + 4 + 32 + 32 + 4 + 4 + 4;
/// Trailer bytes: count and checksum.
const TRAILER_LEN: usize = 8 + 32;

/// What a shard file is for: both the writer's and the reader's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardFileId {
    /// The input's digest.
    pub data_version: [u8; 32],
    /// Names the shard key without revealing it ([`key_id`]).
    pub key_id: [u8; 32],
    /// `S`.
    pub shards: u32,
    /// `s`.
    pub shard: u32,
    /// `u64` values per item.
    pub width: u32,
}

/// `SHA-256("cleanroom-v1-shard-key-id" || key)`: which shard key a file
/// was split under (a one-way function of a 256-bit random key).
pub fn key_id(key: &[u8; 32]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-shard-key-id");
    ctx.update(key);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The shard key file's name in a certificate directory.
pub const KEY_FILE: &str = "shard.key";

/// Writes a fresh shard key (64 hex digits, mode 0600) to `dir/shard.key`
/// unless one is there; the file written, if any. Both operators use the
/// same key (one makes it and gives it to the other, like the CA).
///
/// # Errors
/// [`crate::NodeError::Config`] when the file cannot be written, or the OS
/// generator fails.
pub fn init_key(dir: &Path) -> Result<Option<PathBuf>, crate::NodeError> {
    let path = dir.join(KEY_FILE);
    if path.exists() {
        return Ok(None);
    }
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    cleanroom_crypto::rng::SystemRng::new().try_fill(key.as_mut_slice())?;
    // Written digit by digit into one buffer of its final size, wiped on
    // drop (no temporary copies of the key in freed memory).
    let mut text = zeroize::Zeroizing::new(String::with_capacity(65));
    for b in key.iter() {
        for nibble in [b >> 4, b & 0x0f] {
            text.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
        }
    }
    text.push('\n');
    let bad = |e: std::io::Error| crate::NodeError::Config {
        path: path.display().to_string(),
        what: e.to_string(),
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&path).map_err(bad)?;
    f.write_all(text.as_bytes()).map_err(bad)?;
    f.sync_all().map_err(bad)?;
    Ok(Some(path))
}

/// Reads a shard key file: the key, and its id ([`key_id`]).
///
/// # Errors
/// [`crate::NodeError::Config`] naming the file when it cannot be read or
/// is not 64 hex digits (the message never shows the file's content).
pub fn load_key(path: &Path) -> Result<(cleanroom_crypto::shard::ShardKey, [u8; 32]), crate::NodeError> {
    let bad = |what: String| crate::NodeError::Config {
        path: path.display().to_string(),
        what,
    };
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    let digits = text.trim().as_bytes();
    if digits.len() != 64 {
        return Err(bad("a shard key file holds 64 hex digits (32 bytes)".into()));
    }
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    for (k, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = (pair.first().copied().unwrap_or(b'x') as char).to_digit(16);
        let lo = (pair.get(1).copied().unwrap_or(b'x') as char).to_digit(16);
        match (hi, lo) {
            (Some(h), Some(l)) => *k = (h * 16 + l) as u8,
            _ => return Err(bad("a shard key file holds 64 hex digits (32 bytes)".into())),
        }
    }
    let id = key_id(&key);
    Ok((cleanroom_crypto::shard::ShardKey::new(*key), id))
}

/// Why a shard file was refused. The messages name the file and the
/// fault, never an identifier or a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShardFileError {
    /// Reading, writing, syncing or renaming failed.
    #[error("shard file {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not a shard file, or one of another layout.
    #[error("shard file {}: not a shard file of format 2 (the layout this build reads)", .path.display())]
    NotAShardFile {
        /// The file.
        path: PathBuf,
    },
    /// A shard file, but not the one expected.
    #[error("shard file {}: written for another {what}; delete the shard files to split the input again", .path.display())]
    Other {
        /// The file.
        path: PathBuf,
        /// `data version`, `shard key`, `shard count`, `shard` or `item width`.
        what: &'static str,
    },
    /// Shorter than its header and trailer, a checksum that does not match,
    /// a record out of bounds or a count that does not match.
    #[error("shard file {}: damaged ({what})", .path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What does not hold.
        what: &'static str,
    },
    /// A record the writer cannot store.
    #[error("shard file {}: {what}", .path.display())]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: &'static str,
    },
}

/// Writes one shard file, record by record.
pub struct ShardWriter {
    path: PathBuf,
    part: PathBuf,
    out: BufWriter<std::fs::File>,
    digest: Context,
    width: usize,
    count: u64,
}

impl core::fmt::Debug for ShardWriter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ShardWriter {{ path: {}, records: {} }}",
            self.path.display(),
            self.count
        )
    }
}

impl ShardWriter {
    /// Starts `path` (written as `path.part` until [`ShardWriter::finish`]).
    ///
    /// # Errors
    /// [`ShardFileError::Io`].
    pub fn create(path: &Path, id: &ShardFileId) -> Result<Self, ShardFileError> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        // A copy of the node's own input: readable by the node's user only.
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&part).map_err(|source| ShardFileError::Io {
            path: part.clone(),
            source,
        })?;
        let mut w = Self {
            path: path.to_path_buf(),
            part,
            out: BufWriter::new(file),
            digest: Context::new(&SHA256),
            width: id.width as usize,
            count: 0,
        };
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT.to_le_bytes());
        header.extend_from_slice(&id.data_version);
        header.extend_from_slice(&id.key_id);
        header.extend_from_slice(&id.shards.to_le_bytes());
        header.extend_from_slice(&id.shard.to_le_bytes());
        header.extend_from_slice(&id.width.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), ShardFileError> {
        self.digest.update(bytes);
        self.out.write_all(bytes).map_err(|source| ShardFileError::Io {
            path: self.part.clone(),
            source,
        })
    }

    /// Appends one identifier and its items' values (`width` per item, so
    /// a multiple of `width`; none when `width` is 0).
    ///
    /// # Errors
    /// [`ShardFileError::BadRecord`] for an empty or over-long identifier,
    /// values that are not whole items, or more than `u32::MAX` items;
    /// [`ShardFileError::Io`].
    pub fn push(&mut self, id: &[u8], values: &[u64]) -> Result<(), ShardFileError> {
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(ShardFileError::BadRecord {
                path: self.path.clone(),
                what: "an identifier must be 1 to 1024 bytes",
            });
        }
        let items = match self.width {
            0 if values.is_empty() => Some(0),
            0 => None,
            w if values.len().is_multiple_of(w) => u32::try_from(values.len() / w).ok(),
            _ => None,
        };
        let Some(items) = items else {
            return Err(ShardFileError::BadRecord {
                path: self.path.clone(),
                what: "a record's values are not whole items of the file's width",
            });
        };
        self.put(&(id.len() as u16).to_le_bytes())?;
        self.put(id)?;
        self.put(&items.to_le_bytes())?;
        for v in values {
            self.put(&v.to_le_bytes())?;
        }
        self.count += 1;
        Ok(())
    }

    /// Writes the count and checksum, syncs the file and renames it into
    /// place; returns the number of records.
    ///
    /// # Errors
    /// [`ShardFileError::Io`].
    pub fn finish(mut self) -> Result<u64, ShardFileError> {
        let count = self.count;
        self.put(&count.to_le_bytes())?;
        let sum = self.digest.clone().finish();
        let io = |path: &Path, source| ShardFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        self.out.write_all(sum.as_ref()).map_err(|e| io(&self.part, e))?;
        let file = self.out.into_inner().map_err(|e| io(&self.part, e.into_error()))?;
        file.sync_all().map_err(|e| io(&self.part, e))?;
        std::fs::rename(&self.part, &self.path).map_err(|e| io(&self.path, e))?;
        Ok(count)
    }
}

/// One shard as read back: identifiers in file order, each one's item
/// count, and all items' values (`width` per item), record after record.
#[derive(Clone, PartialEq, Eq)]
pub struct Shard {
    /// Normalised identifiers.
    pub ids: Vec<Vec<u8>>,
    /// Items per identifier.
    pub items: Vec<u32>,
    /// Item values, `width` per item, in record order.
    pub values: Vec<u64>,
}

impl core::fmt::Debug for Shard {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Shard {{ records: {} }}", self.ids.len())
    }
}

/// Reads `path`, refusing it unless it is a whole, undamaged shard file for
/// `expected`.
///
/// # Errors
/// A [`ShardFileError`] saying what is wrong.
pub fn read_shard(path: &Path, expected: &ShardFileId) -> Result<Shard, ShardFileError> {
    let bytes = std::fs::read(path).map_err(|source| ShardFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let damaged = |what| ShardFileError::Damaged {
        path: path.to_path_buf(),
        what,
    };
    let (Some(magic), Some(format)) = (bytes.get(..8), bytes.get(8..12)) else {
        return Err(ShardFileError::NotAShardFile {
            path: path.to_path_buf(),
        });
    };
    if magic != MAGIC || format != FORMAT.to_le_bytes() {
        return Err(ShardFileError::NotAShardFile {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(damaged("shorter than its header and trailer"));
    }
    // Everything but the checksum.
    let body_len = bytes.len() - 32;
    let (body, sum) = bytes.split_at(body_len);
    if ring::digest::digest(&SHA256, body).as_ref() != sum {
        return Err(damaged("checksum does not match"));
    }
    let mut r = Reader { bytes: body, at: 8 + 4 };
    let data_version = r.array::<32>().ok_or_else(|| damaged("header"))?;
    let key_id = r.array::<32>().ok_or_else(|| damaged("header"))?;
    let shards = r.u32().ok_or_else(|| damaged("header"))?;
    let shard = r.u32().ok_or_else(|| damaged("header"))?;
    let width = r.u32().ok_or_else(|| damaged("header"))?;
    let other = |what| ShardFileError::Other {
        path: path.to_path_buf(),
        what,
    };
    if data_version != expected.data_version {
        return Err(other("data version"));
    }
    if key_id != expected.key_id {
        return Err(other("shard key"));
    }
    if shards != expected.shards {
        return Err(other("shard count"));
    }
    if shard != expected.shard {
        return Err(other("shard"));
    }
    if width != expected.width {
        return Err(other("item width"));
    }
    let records_end = body_len - 8;
    let width = width as usize;
    let mut ids = Vec::new();
    let mut items = Vec::new();
    let mut values = Vec::new();
    while r.at < records_end {
        let len = usize::from(r.u16().ok_or_else(|| damaged("record length"))?);
        if len == 0 || len > MAX_ID_LEN {
            return Err(damaged("record length"));
        }
        let id = r.take(len).ok_or_else(|| damaged("record"))?;
        ids.push(id.to_vec());
        let n = r.u32().ok_or_else(|| damaged("record"))?;
        if width == 0 && n != 0 {
            return Err(damaged("items in a file of width 0"));
        }
        // Bounded by the file's length before anything is allocated.
        let bytes = (n as usize)
            .checked_mul(width)
            .and_then(|v| v.checked_mul(8))
            .ok_or_else(|| damaged("record"))?;
        let raw = r.take(bytes).ok_or_else(|| damaged("record"))?;
        values.extend(
            raw.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
        );
        items.push(n);
        if r.at > records_end {
            return Err(damaged("record"));
        }
    }
    let count = r.u64().ok_or_else(|| damaged("count"))?;
    if count != ids.len() as u64 {
        return Err(damaged("record count does not match"));
    }
    Ok(Shard { ids, items, values })
}

/// Bounds-checked reads over a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn id(shard: u32) -> ShardFileId {
        ShardFileId {
            data_version: [7; 32],
            key_id: key_id(&[9; 32]),
            shards: 16,
            shard,
            width: 3,
        }
    }

    /// Record `i` has `i % 4` items of three values.
    fn records(n: usize) -> Vec<(Vec<u8>, Vec<u64>)> {
        (0..n)
            .map(|i| {
                let v = i as u64;
                (
                    format!("email:user{i}@example.com").into_bytes(),
                    (0..i % 4)
                        .flat_map(|k| [v, v * 1000 + k as u64, u64::MAX - v])
                        .collect(),
                )
            })
            .collect()
    }

    fn write(path: &Path, id: &ShardFileId, recs: &[(Vec<u8>, Vec<u64>)]) {
        let mut w = ShardWriter::create(path, id).unwrap();
        for (i, v) in recs {
            w.push(i, v).unwrap();
        }
        assert_eq!(w.finish().unwrap(), recs.len() as u64);
    }

    #[test]
    fn a_shard_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1, 500] {
            let path = dir.path().join(format!("s{n}"));
            let recs = records(n);
            write(&path, &id(5), &recs);
            assert!(!dir.path().join(format!("s{n}.part")).exists());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "{mode:o}");
            }
            let got = read_shard(&path, &id(5)).unwrap();
            assert_eq!(got.ids, recs.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>());
            assert_eq!(got.values, recs.iter().flat_map(|(_, v)| v.clone()).collect::<Vec<_>>());
            assert_eq!(
                got.items,
                recs.iter().map(|(_, v)| (v.len() / 3) as u32).collect::<Vec<_>>()
            );
            assert_eq!(format!("{got:?}"), format!("Shard {{ records: {n} }}"));
        }
    }

    #[test]
    fn the_layout_is_as_documented() {
        // Header, one record and trailer assembled by hand from the module's
        // description, not through the writer.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one");
        let fid = id(5);
        write(&path, &fid, &[(b"ab".to_vec(), vec![1, 2, 3, 4, 5, 6])]);
        let mut want = Vec::new();
        want.extend_from_slice(b"CRSHARD\0");
        want.extend_from_slice(&2u32.to_le_bytes());
        want.extend_from_slice(&[7; 32]);
        want.extend_from_slice(&fid.key_id);
        want.extend_from_slice(&16u32.to_le_bytes());
        want.extend_from_slice(&5u32.to_le_bytes());
        want.extend_from_slice(&3u32.to_le_bytes());
        want.extend_from_slice(&2u16.to_le_bytes());
        want.extend_from_slice(b"ab");
        want.extend_from_slice(&2u32.to_le_bytes());
        for v in [1u64, 2, 3, 4, 5, 6] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(&1u64.to_le_bytes());
        use sha2::Digest;
        let sum = sha2::Sha256::digest(&want);
        want.extend_from_slice(&sum);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        let mut k = b"cleanroom-v1-shard-key-id".to_vec();
        k.extend_from_slice(&[9; 32]);
        assert_eq!(key_id(&[9; 32]).as_slice(), sha2::Sha256::digest(&k).as_slice());
    }

    #[test]
    fn another_files_shard_is_refused_by_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        write(&path, &id(5), &records(10));
        let cases: [(&str, ShardFileId); 5] = [
            (
                "data version",
                ShardFileId {
                    data_version: [8; 32],
                    ..id(5)
                },
            ),
            (
                "shard key",
                ShardFileId {
                    key_id: key_id(&[1; 32]),
                    ..id(5)
                },
            ),
            ("shard count", ShardFileId { shards: 17, ..id(5) }),
            ("shard", id(6)),
            ("item width", ShardFileId { width: 2, ..id(5) }),
        ];
        for (what, expected) in cases {
            let e = read_shard(&path, &expected).unwrap_err();
            assert!(
                matches!(e, ShardFileError::Other { what: w, .. } if w == what),
                "{what}: {e}"
            );
            assert!(e.to_string().contains(what), "{e}");
        }
    }

    #[test]
    fn a_damaged_file_is_refused_never_read_in_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        write(&path, &id(5), &records(20));
        let good = std::fs::read(&path).unwrap();
        // Every single-byte change after the magic and format, and every
        // truncation, is refused.
        for at in 12..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let e = read_shard(&path, &id(5)).unwrap_err();
            assert!(matches!(e, ShardFileError::Damaged { .. }), "byte {at}: {e}");
        }
        for len in [0, 5, 12, 40, HEADER_LEN, good.len() / 2, good.len() - 1] {
            std::fs::write(&path, &good[..len]).unwrap();
            let e = read_shard(&path, &id(5)).unwrap_err();
            assert!(
                matches!(e, ShardFileError::Damaged { .. } | ShardFileError::NotAShardFile { .. }),
                "length {len}: {e}"
            );
        }
        // Another format or not a shard file at all.
        let mut other = good.clone();
        other[8] = 1;
        std::fs::write(&path, &other).unwrap();
        assert!(matches!(
            read_shard(&path, &id(5)),
            Err(ShardFileError::NotAShardFile { .. })
        ));
        std::fs::write(&path, b"email,amount\n").unwrap();
        assert!(matches!(
            read_shard(&path, &id(5)),
            Err(ShardFileError::NotAShardFile { .. })
        ));
        // A consistent file (checksum recomputed) with a record that runs
        // past the end, or a count that does not match, is refused too.
        let resum = |mut body: Vec<u8>| {
            use sha2::Digest;
            let sum = sha2::Sha256::digest(&body);
            body.extend_from_slice(&sum);
            body
        };
        let body = &good[..good.len() - 32];
        let mut wrong_count = body.to_vec();
        let n = wrong_count.len();
        wrong_count[n - 8..].copy_from_slice(&21u64.to_le_bytes());
        std::fs::write(&path, resum(wrong_count)).unwrap();
        assert!(matches!(
            read_shard(&path, &id(5)),
            Err(ShardFileError::Damaged {
                what: "record count does not match",
                ..
            })
        ));
        let mut long_record = body.to_vec();
        long_record[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&1000u16.to_le_bytes());
        std::fs::write(&path, resum(long_record)).unwrap();
        assert!(matches!(read_shard(&path, &id(5)), Err(ShardFileError::Damaged { .. })));
        // An item count past the file's end is refused before any allocation.
        let first_id = b"email:user0@example.com".len();
        let at = HEADER_LEN + 2 + first_id;
        for n in [u32::MAX, 1_000_000, 1] {
            let mut many_items = body.to_vec();
            many_items[at..at + 4].copy_from_slice(&n.to_le_bytes());
            std::fs::write(&path, resum(many_items)).unwrap();
            assert!(
                matches!(read_shard(&path, &id(5)), Err(ShardFileError::Damaged { .. })),
                "{n} items"
            );
        }
        // The messages never carry an identifier.
        std::fs::write(&path, &good).unwrap();
        let e = read_shard(&path, &ShardFileId { shards: 3, ..id(5) }).unwrap_err();
        assert!(!e.to_string().contains("example.com"));
    }

    #[test]
    fn the_writer_refuses_records_it_cannot_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(&dir.path().join("s"), &id(0)).unwrap();
        assert!(matches!(w.push(b"", &[1, 2, 3]), Err(ShardFileError::BadRecord { .. })));
        assert!(matches!(
            w.push(&[b'a'; 1025], &[1, 2, 3]),
            Err(ShardFileError::BadRecord { .. })
        ));
        assert!(matches!(w.push(b"a", &[1, 2]), Err(ShardFileError::BadRecord { .. })));
        assert!(matches!(
            w.push(b"a", &[1, 2, 3, 4]),
            Err(ShardFileError::BadRecord { .. })
        ));
        w.push(b"a", &[]).unwrap();
        w.push(b"b", &[1, 2, 3, 4, 5, 6]).unwrap();
        let mut ids_only = ShardWriter::create(&dir.path().join("t"), &ShardFileId { width: 0, ..id(0) }).unwrap();
        assert!(matches!(
            ids_only.push(b"a", &[1]),
            Err(ShardFileError::BadRecord { .. })
        ));
        ids_only.push(b"a", &[]).unwrap();
        // Unfinished, it never appears under its name.
        drop(w);
        assert!(!dir.path().join("s").exists());
    }
}
