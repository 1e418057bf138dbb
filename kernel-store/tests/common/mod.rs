//! Helpers shared by kernel-store's integration tests.

use std::path::Path;

/// Copy a store directory as it is on disk now: with the store open (and synced), what a crash
/// at this instant would leave.
pub fn snapshot(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("ls") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            snapshot(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}
