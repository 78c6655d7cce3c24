//! Snapshot files: `<data-dir>/snapshots/current.snap` is the latest
//! snapshot; one being built or received is written beside it under a
//! `.part` name, fsynced and renamed over it, so the current file is always
//! a whole snapshot. Files are read and sent in pieces, never held whole.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::raft::SnapshotFile;

const CURRENT: &str = "current.snap";
const PART: &str = "part";

/// The snapshot directory.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
    next: Arc<AtomicU64>,
}

impl SnapshotDir {
    /// Opens (or creates) `data_dir/snapshots`, removing the pieces of any
    /// snapshot a crash left half-written.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join("snapshots");
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == PART) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(Self {
            dir,
            next: Arc::default(),
        })
    }

    /// Where the latest snapshot is kept.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The latest snapshot, open for reading, if there is one.
    pub fn current(&self) -> io::Result<Option<std::fs::File>> {
        match std::fs::File::open(self.dir.join(CURRENT)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A new, empty file to write a snapshot into before [`Self::publish`].
    pub fn create(&self) -> io::Result<(std::fs::File, PathBuf)> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}.{PART}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// [`Self::create`] for openraft's receiving side.
    pub fn create_async(&self) -> io::Result<SnapshotFile> {
        let (file, path) = self.create()?;
        Ok(SnapshotFile::new(tokio::fs::File::from_std(file), path))
    }

    /// Makes a written snapshot file the current one: fsyncs it, renames it
    /// over the current file and fsyncs the directory, so after a crash the
    /// current file is either the old snapshot or this one, whole.
    pub fn publish(&self, file: &std::fs::File, path: &Path) -> io::Result<()> {
        file.sync_all()?;
        std::fs::rename(path, self.dir.join(CURRENT))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Wraps an open snapshot file for openraft (reading from its start).
    pub fn wrap(&self, file: std::fs::File) -> SnapshotFile {
        SnapshotFile::new(tokio::fs::File::from_std(file), self.dir.join(CURRENT))
    }
}
