//! Why a store could not be opened ([`OpenError`]). Failures after opening are
//! `kernel_core::StoreError`s, which the kernel reports as `KernelError::Store`.

use std::path::PathBuf;

/// A store directory was refused or could not be opened. Nothing is guessed at and nothing is
/// reset: every variant names the directory, file or record and what was wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The directory is not empty and carries no format record: it is not a kernel store.
    #[error("{dir}: not a kernel store: the directory is not empty (it holds {found:?}) and has no {record} record")]
    Foreign {
        /// The directory.
        dir: PathBuf,
        /// One entry found in it.
        found: String,
        /// The record that was looked for.
        record: &'static str,
    },
    /// A record the store keeps could not be decoded.
    #[error("{dir}: bad {table} record {key}: {reason}")]
    BadRecord {
        /// The directory.
        dir: PathBuf,
        /// Where the record lives: `format-file` (the file beside the engine's files) or the
        /// engine keyspace that holds it (`kernel`).
        table: &'static str,
        /// The file name or key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The store was written in a format newer than this build reads.
    #[error("{dir}: store format {found} is newer than this build reads (format {supported}); refusing to open it")]
    NewerFormat {
        /// The directory.
        dir: PathBuf,
        /// The format the store says it has.
        found: u32,
        /// The newest format this build reads.
        supported: u32,
    },
    /// Another handle, in this process or another, has the store open.
    #[error("{dir}: the store is already open (its lock file is held)")]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// The file system failed.
    #[error("{dir}: I/O error while {doing}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What the store was doing.
        doing: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The storage engine refused to open or recover its files (for example a journal whose
    /// checksum does not match).
    #[error("{dir}: the storage engine could not open the store: {source}")]
    Engine {
        /// The directory.
        dir: PathBuf,
        /// The engine's error.
        #[source]
        source: fjall::Error,
    },
    /// The batches read back from the write-ahead log could not be written into the engine.
    #[error("{dir}: could not checkpoint the batches recovered from the write-ahead log: {source}")]
    Recovery {
        /// The directory.
        dir: PathBuf,
        /// Why the engine refused them.
        #[source]
        source: kernel_core::StoreError,
    },
}
