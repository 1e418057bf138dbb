//! The format record: a small text file written when a store is created and checked, before the
//! engine touches anything, every time it is opened.
//!
//! ```text
//! kernel-store
//! format 2
//! engine fjall-3
//! ```
//!
//! It is written to a temporary name, synced and renamed into place, so it either exists whole
//! or not at all. A directory that holds anything but this record (or the lock file, or the
//! leftover temporary of an interrupted creation) and has no record is refused as foreign.

use crate::error::OpenError;
use std::fs;
use std::io::Write;
use std::path::Path;

/// The store layout this build writes and reads. Format 2 added the write-ahead log (`wal`):
/// a build of format 1 would ignore it and lose what it holds. A format-1 store (no log) is
/// read as it is and its record rewritten to format 2 when it is opened.
pub const STORE_FORMAT: u32 = 2;
/// The oldest format this build opens (and upgrades).
const OLDEST_FORMAT: u32 = 1;

/// The name of the format record file in a store directory.
pub const FORMAT_FILE: &str = "KERNEL-STORE";

/// The name of the lock file in a store directory.
pub const LOCK_FILE: &str = "kernel-store.lock";

/// The directory (inside the store directory) holding the engine's files.
pub(crate) const ENGINE_DIR: &str = "fjall";

const TEMP_FILE: &str = "KERNEL-STORE.tmp";
const MAGIC: &str = "kernel-store";
const ENGINE: &str = "fjall-3";

/// What the directory holds, before anything is written to it.
pub(crate) enum Found {
    /// Nothing (or only our lock file / an interrupted creation's temporary): create a store.
    Empty,
    /// A kernel store of a format this build reads: the format it says it has.
    Store(u32),
}

fn io<'a>(dir: &'a Path, doing: &'static str) -> impl FnOnce(std::io::Error) -> OpenError + 'a {
    move |source| OpenError::Io { dir: dir.to_path_buf(), doing, source }
}

/// Look at `dir` without changing it: empty, a store we read, or a refusal.
pub(crate) fn inspect(dir: &Path) -> Result<Found, OpenError> {
    let record = dir.join(FORMAT_FILE);
    match fs::read(&record) {
        Ok(bytes) => return check(dir, &bytes).map(Found::Store),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(dir, "reading the format record")(e)),
    }
    for entry in fs::read_dir(dir).map_err(io(dir, "listing the directory"))? {
        let name = entry.map_err(io(dir, "listing the directory"))?.file_name();
        if name != LOCK_FILE && name != TEMP_FILE {
            return Err(OpenError::Foreign { dir: dir.to_path_buf(), found: name.to_string_lossy().into_owned(), record: FORMAT_FILE });
        }
    }
    Ok(Found::Empty)
}

/// Decode a format record and check that this build reads it; returns its format.
fn check(dir: &Path, bytes: &[u8]) -> Result<u32, OpenError> {
    let bad = |reason: String| OpenError::BadRecord { dir: dir.to_path_buf(), table: "format-file", key: FORMAT_FILE.into(), reason };
    let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8 text: {e}")))?;
    let mut lines = text.lines();
    match lines.next() {
        Some(MAGIC) => {}
        other => return Err(bad(format!("first line is {other:?}, expected {MAGIC:?}"))),
    }
    let found = match lines.next().and_then(|l| l.strip_prefix("format ")) {
        Some(n) => n.parse::<u32>().map_err(|e| bad(format!("format number {n:?}: {e}")))?,
        None => return Err(bad("second line is not `format <number>`".into())),
    };
    if found > STORE_FORMAT {
        return Err(OpenError::NewerFormat { dir: dir.to_path_buf(), found, supported: STORE_FORMAT });
    }
    if found < OLDEST_FORMAT {
        return Err(bad(format!("format {found} was never written by any build")));
    }
    match lines.next().and_then(|l| l.strip_prefix("engine ")) {
        Some(ENGINE) => {}
        Some(other) => return Err(bad(format!("engine {other:?}, expected {ENGINE:?}"))),
        None => return Err(bad("third line is not `engine <name>`".into())),
    }
    if let Some(extra) = lines.find(|l| !l.is_empty()) {
        return Err(bad(format!("unexpected line {extra:?}")));
    }
    Ok(found)
}

/// Write the format record of a new store (or over an older one's): temporary file, sync,
/// rename, sync the directory.
pub(crate) fn create(dir: &Path) -> Result<(), OpenError> {
    let temp = dir.join(TEMP_FILE);
    let text = format!("{MAGIC}\nformat {STORE_FORMAT}\nengine {ENGINE}\n");
    let mut f = fs::File::create(&temp).map_err(io(dir, "creating the format record"))?;
    f.write_all(text.as_bytes()).map_err(io(dir, "writing the format record"))?;
    f.sync_all().map_err(io(dir, "syncing the format record"))?;
    drop(f);
    fs::rename(&temp, dir.join(FORMAT_FILE)).map_err(io(dir, "renaming the format record into place"))?;
    sync_dir(dir)
}

/// Make a directory's entries (a rename, a new file) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), OpenError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "syncing the directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(text: &str) -> Result<u32, OpenError> {
        check(Path::new("/s"), text.as_bytes())
    }

    #[test]
    fn the_written_record_reads_back() {
        assert_eq!(checked(&format!("{MAGIC}\nformat {STORE_FORMAT}\nengine {ENGINE}\n")).ok(), Some(STORE_FORMAT));
        assert_eq!(checked(&format!("{MAGIC}\nformat 1\nengine {ENGINE}\n")).ok(), Some(1), "format 1 is read (and upgraded)");
    }

    #[test]
    fn newer_formats_are_refused_by_number() {
        let e = checked(&format!("{MAGIC}\nformat 7\nengine {ENGINE}\n")).expect_err("newer");
        assert!(matches!(e, OpenError::NewerFormat { found: 7, supported: STORE_FORMAT, .. }), "{e}");
    }

    #[test]
    fn damaged_records_name_the_record_and_the_fault() {
        for text in [
            "kernel-stor\nformat 1\nengine fjall-3\n",
            "kernel-store\nformat x\nengine fjall-3\n",
            "kernel-store\nformat 0\n",
            "\u{0}\u{ff}",
        ] {
            let e = checked(text).expect_err("bad");
            assert!(matches!(&e, OpenError::BadRecord { table: "format-file", .. }), "{text:?}: {e}");
            assert!(e.to_string().contains(FORMAT_FILE), "{e}");
        }
    }
}
