//! The store's write-ahead log (`<dir>/wal`): every applied batch, in order, as one checksummed
//! record. A batch is on disk once its record is written and the file `fdatasync`ed; the engine
//! receives the batches only at a checkpoint, merged by key, so a key created and deleted between
//! two checkpoints (an outbox entry, a run-queue entry, a promise that lived for one round trip)
//! never reaches fjall's memtable at all.
//!
//! A record is
//!
//! ```text
//! checksum u64 | body length u32 | batch number u64 | body
//! ```
//!
//! (little-endian; the checksum is xxh3-64 of everything after it, seeded with the previous
//! record's checksum — 0 for the first after the log starts over — so a record only checks out
//! after the one it was written after), and a body is the batch's
//! writes, each `key length u32 | key | 0` (a delete) or `key length u32 | key | 1 | value length
//! u32 | value`.
//!
//! The file grows in zero-filled steps of [`GROW`] ahead of the records, and after a checkpoint
//! (the engine holds, and has synced, every batch so far) the log starts again at offset 0 and
//! overwrites the old records in place: a record's `fdatasync` then changes no file size and
//! allocates no block, so it has no metadata to journal (on ext4 that halves its cost: an append
//! that grows the file costs about two overwrites). Reading takes the longest chain of records
//! from offset 0 whose checksums hold (each seeded with its predecessor's) and whose batch
//! numbers follow one another; a torn or half-written record ends it, and was never reported
//! durable. What lies past the newest record is left from before: an older generation (numbers
//! below the engine's count), or, after a power loss, records of the crashed run that reached
//! the disk out of order around a torn one. Neither continues the chain: their checksums were
//! seeded by other predecessors.

use kernel_core::WriteBatch;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The name of the log file in a store directory.
pub(crate) const WAL_FILE: &str = "wal";
/// checksum, body length, batch number.
const HEADER: usize = 8 + 4 + 8;
/// The file is extended with zeros this much at a time, ahead of the records.
pub(crate) const GROW: u64 = 1 << 20;

/// Why the log could not be read back.
#[derive(Debug)]
pub(crate) enum WalError {
    /// An I/O error, and what was being done.
    Io(&'static str, io::Error),
    /// The log does not fit the engine: a record that checks out but does not decode, or a
    /// first record later than the engine's next batch (batches would be missing).
    Bad(String),
}

/// The open log: where the next record goes, and records encoded but not yet written.
#[derive(Debug)]
pub(crate) struct Wal {
    file: File,
    /// The offset of the next write (the end of the current generation's written records).
    pos: u64,
    /// Records appended, not yet written to the file.
    buf: Vec<u8>,
    /// The file's length: zeros (or an older generation) past `pos`.
    allocated: u64,
    /// The checksum of the last record appended since the log started over (0 before the
    /// first): each record's checksum is seeded with its predecessor's.
    last_sum: u64,
}

impl Wal {
    /// Open (creating) the log in `dir` and read back the batches after `engine_applied`, the
    /// engine's batch count, in order: they are numbered `engine_applied + 1` onwards. The log
    /// is left to start over at offset 0, so the caller must have the engine take (and sync)
    /// those batches before it appends anything.
    pub fn open(dir: &Path, engine_applied: u64) -> Result<(Wal, Vec<WriteBatch>), WalError> {
        let path = dir.join(WAL_FILE);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| WalError::Io("opening the write-ahead log", e))?;
        if created {
            // The new name must survive a power loss with the records later synced into it.
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| WalError::Io("syncing the directory of the write-ahead log", e))?;
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| WalError::Io("reading the write-ahead log", e))?;
        let replay = read_records(&data, engine_applied)?;
        file.seek(SeekFrom::Start(0)).map_err(|e| WalError::Io("seeking in the write-ahead log", e))?;
        Ok((Wal { file, pos: 0, buf: Vec::new(), allocated: data.len() as u64, last_sum: 0 }, replay))
    }

    /// Encode batch number `number` as a record, to be written by the next [`Wal::write`]. A
    /// batch that cannot be logged (a key or value of 4 GiB or more) leaves nothing behind.
    pub fn append(&mut self, number: u64, batch: &WriteBatch) -> Result<(), String> {
        self.append_within(number, batch, u32::MAX as usize)
    }

    /// [`Wal::append`] with lengths (of a key, a value, the body) of at most `limit`.
    fn append_within(&mut self, number: u64, batch: &WriteBatch, limit: usize) -> Result<(), String> {
        let (start, sum) = (self.buf.len(), self.last_sum);
        let encoded = self.encode(number, batch, limit);
        if encoded.is_err() {
            self.buf.truncate(start);
            self.last_sum = sum;
        }
        encoded
    }

    fn encode(&mut self, number: u64, batch: &WriteBatch, limit: usize) -> Result<(), String> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; HEADER]);
        let len32 = |n: usize| match u32::try_from(n) {
            Ok(n32) if n <= limit => Ok(n32),
            _ => Err(format!("batch {number}: a key or value of {n} bytes is too long to log")),
        };
        for (k, v) in batch {
            self.buf.extend_from_slice(&len32(k.len())?.to_le_bytes());
            self.buf.extend_from_slice(k);
            match v {
                None => self.buf.push(0),
                Some(v) => {
                    self.buf.push(1);
                    self.buf.extend_from_slice(&len32(v.len())?.to_le_bytes());
                    self.buf.extend_from_slice(v);
                }
            }
        }
        let body = len32(self.buf.len() - start - HEADER)?;
        self.buf[start + 8..start + 12].copy_from_slice(&body.to_le_bytes());
        self.buf[start + 12..start + 20].copy_from_slice(&number.to_le_bytes());
        self.last_sum = xxh3_64_with_seed(&self.buf[start + 8..], self.last_sum);
        self.buf[start..start + 8].copy_from_slice(&self.last_sum.to_le_bytes());
        Ok(())
    }

    /// Write the appended records to the file (to the OS, not yet synced).
    pub fn write(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.pos + self.buf.len() as u64;
        if end > self.allocated {
            // Zeros up to the next step past the records; the records then overwrite them.
            let target = end.div_ceil(GROW) * GROW;
            self.file.seek(SeekFrom::Start(self.allocated))?;
            io::copy(&mut io::repeat(0).take(target - self.allocated), &mut self.file)?;
            self.file.seek(SeekFrom::Start(self.pos))?;
            self.allocated = target;
        }
        self.file.write_all(&self.buf)?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// `fdatasync` the file: every record written so far is on disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// A second handle on the file, for a thread that syncs it.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Bytes in the log since it last started over (written and appended).
    pub fn len(&self) -> u64 {
        self.pos + self.buf.len() as u64
    }

    /// Start over at offset 0, dropping what was appended and not written: the engine holds
    /// (and has synced) every batch the log held.
    pub fn restart(&mut self) -> io::Result<()> {
        self.buf.clear();
        self.last_sum = 0;
        self.file.seek(SeekFrom::Start(0))?;
        self.pos = 0;
        Ok(())
    }
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes)
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    data.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

/// The batches after `engine_applied` in the chain of good records at the start of `data`.
fn read_records(data: &[u8], engine_applied: u64) -> Result<Vec<WriteBatch>, WalError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut previous: Option<u64> = None;
    let mut seed = 0;
    while let (Some(sum), Some(len), Some(number)) = (u64_at(data, at), u32_at(data, at + 8), u64_at(data, at + 12)) {
        let Some(end) = (at + HEADER).checked_add(len as usize).filter(|&end| end <= data.len()) else { break };
        if xxh3_64_with_seed(&data[at + 8..end], seed) != sum {
            break; // torn, never synced, or an older generation's bytes
        }
        seed = sum;
        match previous {
            Some(p) if number != p + 1 => break, // an older generation's record
            None if number > engine_applied + 1 => {
                return Err(WalError::Bad(format!(
                    "the write-ahead log starts at batch {number}, but the engine holds only {engine_applied}: batches are missing"
                )));
            }
            _ => {}
        }
        if number > engine_applied {
            out.push(
                decode(&data[at + HEADER..end]).ok_or_else(|| {
                    WalError::Bad(format!("batch {number} in the write-ahead log passes its checksum but does not decode"))
                })?,
            );
        }
        previous = Some(number);
        at = end;
    }
    Ok(out)
}

fn decode(mut body: &[u8]) -> Option<WriteBatch> {
    fn take<'a>(body: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (body.get(..n)?, body.get(n..)?);
        *body = rest;
        Some(head)
    }
    let mut batch = Vec::new();
    while !body.is_empty() {
        let klen = u32::from_le_bytes(take(&mut body, 4)?.try_into().ok()?) as usize;
        let key = take(&mut body, klen)?.to_vec();
        let value = match take(&mut body, 1)?[0] {
            0 => None,
            1 => {
                let vlen = u32::from_le_bytes(take(&mut body, 4)?.try_into().ok()?) as usize;
                Some(take(&mut body, vlen)?.to_vec())
            }
            _ => return None,
        };
        batch.push((key, value));
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(i: u8) -> WriteBatch {
        vec![(vec![b'k', i], Some(vec![i; i as usize])), (vec![b'd', i], None)]
    }

    fn log(numbers: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("dir");
        let (mut wal, _) = Wal::open(dir.path(), 0).expect("open");
        for n in numbers {
            wal.append(n, &batch(n as u8)).expect("append");
        }
        wal.buf
    }

    #[test]
    fn records_read_back_after_the_engines_count() {
        let data = log(1..=5);
        assert_eq!(read_records(&data, 0).ok(), Some((1..=5).map(batch).collect()));
        assert_eq!(read_records(&data, 3).ok(), Some(vec![batch(4), batch(5)]));
        assert_eq!(read_records(&data, 5).ok(), Some(vec![]));
        assert_eq!(read_records(&data, 9).ok(), Some(vec![]), "an older generation, all in the engine");
    }

    #[test]
    fn a_torn_or_damaged_record_ends_the_log() {
        let data = log(1..=3);
        let (one, two) = (log([1]).len(), log([1, 2]).len());
        // Cut anywhere inside the second record: only the first survives.
        for cut in one..two {
            assert_eq!(read_records(&data[..cut], 0).ok(), Some(vec![batch(1)]), "cut at {cut}");
        }
        let mut flipped = data.clone();
        flipped[one + HEADER + 1] ^= 1;
        assert_eq!(read_records(&flipped, 0).ok(), Some(vec![batch(1)]));
    }

    #[test]
    fn an_older_generation_after_the_newest_records_is_not_replayed() {
        // Generation 1 held batches 1..=6; the engine checkpointed at 6 and the log restarted
        // with 7 and 8 over the start of it.
        let mut data = log(1..=6);
        let newer = log([7, 8]);
        data[..newer.len()].copy_from_slice(&newer);
        assert_eq!(read_records(&data, 6).ok(), Some(vec![batch(7), batch(8)]));
    }

    #[test]
    fn a_leftover_record_does_not_continue_a_new_chain() {
        // A crashed run logged 1, 2 (torn), 3; after recovery at 1 the new run logs a different
        // batch 2 of the same length, which ends right where the old 3 begins.
        let dir = tempfile::tempdir().expect("dir");
        let (mut old, _) = Wal::open(dir.path(), 0).expect("open");
        for n in 1..=3 {
            old.append(n, &batch(n as u8)).expect("append");
        }
        let mut data = old.buf.clone();
        let (one, two) = (log([1]).len(), log([1, 2]).len());
        let (mut new, _) = Wal::open(dir.path(), 0).expect("open");
        new.append(1, &batch(1)).expect("append");
        let other: WriteBatch = vec![(vec![b'k', 2], Some(vec![9; 2])), (vec![b'd', 2], None)];
        new.append(2, &other).expect("append");
        assert_eq!(new.buf.len(), two, "the same length as the old record 2");
        data[one..two].copy_from_slice(&new.buf[one..two]);
        assert_eq!(read_records(&data, 0).ok(), Some(vec![batch(1), other]), "the old record 3 is not replayed");
    }

    #[test]
    fn a_batch_too_long_to_log_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut wal, _) = Wal::open(dir.path(), 0).expect("open");
        wal.append_within(1, &batch(1), 32).expect("append");
        let before = wal.buf.clone();
        // Too long at the second entry, after the first was encoded.
        let long: WriteBatch = vec![(b"k".to_vec(), Some(vec![1])), (b"k2".to_vec(), Some(vec![0; 33]))];
        assert!(wal.append_within(2, &long, 32).is_err());
        assert_eq!(wal.buf, before, "nothing of it stays");
        wal.append_within(2, &batch(2), 32).expect("append");
        assert_eq!(read_records(&wal.buf, 0).ok(), Some(vec![batch(1), batch(2)]), "the next record follows on");
    }

    #[test]
    fn a_log_that_starts_past_the_engine_is_refused() {
        let data = log(5..=6);
        assert!(matches!(read_records(&data, 3), Err(WalError::Bad(e)) if e.contains("starts at batch 5")));
    }

    #[test]
    fn written_records_reopen_from_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut wal, replay) = Wal::open(dir.path(), 0).expect("open");
        assert!(replay.is_empty());
        for n in 1..=3 {
            wal.append(n, &batch(n as u8)).expect("append");
        }
        wal.write().expect("write");
        wal.append(4, &batch(4)).expect("append"); // appended, never written
        drop(wal);
        assert_eq!(std::fs::metadata(dir.path().join(WAL_FILE)).expect("stat").len(), GROW, "grown in a zeroed step");
        let (_, replay) = Wal::open(dir.path(), 1).expect("reopen");
        assert_eq!(replay, vec![batch(2), batch(3)]);
    }
}
