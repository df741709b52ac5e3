//! Snapshot metadata and directories, with the semantics of containerd's
//! overlay snapshotter (containerd 1.6 `snapshots/overlay`).
//!
//! Every operation is one redb write transaction. Directories are created
//! before a transaction commits (and removed if it fails) and deleted after
//! a removal commits, so a crash at any point leaves either a consistent
//! database or a directory no record owns, which [`Store::cleanup`] removes.
//!
//! Layout under the root: `metadata.redb`, `snapshots/<id>/fs` (the upper
//! directory or the unpacked layer) and `snapshots/<id>/work` (overlay's
//! work directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use stargaze_proto::containerd::types::Mount;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Kinds, numbered as in containerd's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

/// One snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    /// Key of the parent (a committed snapshot), empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: i64,
    pub updated: i64,
    /// Disk usage recorded at commit.
    pub size: i64,
    pub inodes: i64,
    /// For remote snapshots: the layer's directory in the fs service's mount,
    /// used instead of `snapshots/<id>/fs`.
    #[serde(default)]
    pub remote_dir: Option<String>,
}

/// Errors, each mapped to the gRPC code containerd turns into its errdefs.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshotter metadata ({path}): {reason}")]
    Internal { path: PathBuf, reason: String },
}

impl From<SnapError> for tonic::Status {
    fn from(e: SnapError) -> Self {
        let msg = e.to_string();
        match e {
            SnapError::NotFound(_) => tonic::Status::not_found(msg),
            SnapError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            SnapError::Internal { .. } => tonic::Status::internal(msg),
        }
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The metadata database and the snapshot directories.
pub struct Store {
    db: redb::Database,
    root: PathBuf,
}

impl Store {
    /// Open (creating) the store under `root`.
    pub fn open(root: &Path) -> Result<Store, SnapError> {
        let internal = |reason: String| SnapError::Internal {
            path: root.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(root.join("snapshots")).map_err(|e| internal(e.to_string()))?;
        let db = redb::Database::create(root.join("metadata.redb"))
            .map_err(|e| internal(e.to_string()))?;
        let store = Store {
            db,
            root: root.to_path_buf(),
        };
        // Create the tables so that read transactions find them.
        store.write(|t, c| {
            let _ = (t, c);
            Ok(())
        })?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn internal(&self, e: impl std::fmt::Display) -> SnapError {
        SnapError::Internal {
            path: self.root.join("metadata.redb"),
            reason: e.to_string(),
        }
    }

    /// The directory of snapshot `id`.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The filesystem directory a record presents: `snapshots/<id>/fs`, its
    /// upper dir or unpacked layer, or for a remote snapshot a symlink to the
    /// layer's directory in the fs mount. Every lowerdir thus shares the
    /// prefix `<root>/snapshots/`, which containerd's mount code needs to
    /// shorten long lowerdir lists (it chdirs there and passes relative
    /// paths once the options outgrow a page), as with its overlay
    /// snapshotter.
    pub fn fs_dir(&self, r: &Record) -> PathBuf {
        self.dir(r.id).join("fs")
    }

    /// Point `snapshots/<id>/fs` at a remote layer's directory (atomically).
    pub fn link_remote(&self, id: u64, remote_dir: &str) -> Result<(), SnapError> {
        let dir = self.dir(id);
        let io = |e: std::io::Error| self.internal(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let link = dir.join("fs");
        if std::fs::read_link(&link).is_ok_and(|t| t == Path::new(remote_dir)) {
            return Ok(());
        }
        let tmp = dir.join("fs.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(remote_dir, &tmp).map_err(io)?;
        std::fs::rename(&tmp, &link).map_err(io)
    }

    /// Run `f` in one write transaction and commit it.
    pub fn write<T>(
        &self,
        f: impl FnOnce(
            &mut redb::Table<&str, &[u8]>,
            &mut redb::Table<&str, u64>,
        ) -> Result<T, SnapError>,
    ) -> Result<T, SnapError> {
        let txn = self.db.begin_write().map_err(|e| self.internal(e))?;
        let out = {
            let mut snaps = txn.open_table(SNAPSHOTS).map_err(|e| self.internal(e))?;
            let mut counters = txn.open_table(COUNTERS).map_err(|e| self.internal(e))?;
            f(&mut snaps, &mut counters)?
        };
        txn.commit().map_err(|e| self.internal(e))?;
        Ok(out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Record, SnapError> {
        serde_json::from_slice(bytes).map_err(|e| self.internal(format!("corrupt record: {e}")))
    }

    fn get(
        &self,
        t: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &str,
    ) -> Result<Option<Record>, SnapError> {
        match t.get(key).map_err(|e| self.internal(e))? {
            Some(v) => Ok(Some(self.decode(v.value())?)),
            None => Ok(None),
        }
    }

    fn put(
        &self,
        t: &mut redb::Table<&str, &[u8]>,
        key: &str,
        r: &Record,
    ) -> Result<(), SnapError> {
        let bytes = serde_json::to_vec(r).map_err(|e| self.internal(e))?;
        t.insert(key, bytes.as_slice())
            .map_err(|e| self.internal(e))?;
        Ok(())
    }

    /// A snapshot by key.
    pub fn stat(&self, key: &str) -> Result<Record, SnapError> {
        let txn = self.db.begin_read().map_err(|e| self.internal(e))?;
        let t = txn.open_table(SNAPSHOTS).map_err(|e| self.internal(e))?;
        self.get(&t, key)?
            .ok_or_else(|| SnapError::NotFound(key.to_string()))
    }

    /// Every snapshot, by key.
    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapError> {
        let txn = self.db.begin_read().map_err(|e| self.internal(e))?;
        let t = txn.open_table(SNAPSHOTS).map_err(|e| self.internal(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.internal(e))? {
            let (k, v) = entry.map_err(|e| self.internal(e))?;
            out.push((k.value().to_string(), self.decode(v.value())?));
        }
        Ok(out)
    }

    /// The parent chain of a snapshot, nearest first: (key, record).
    pub fn parents(&self, r: &Record) -> Result<Vec<(String, Record)>, SnapError> {
        let mut out: Vec<(String, Record)> = Vec::new();
        let mut next = r.parent.clone();
        while !next.is_empty() {
            if out.len() > 4096 {
                return Err(self.internal("parent chain loops"));
            }
            let p = self.stat(&next)?;
            let following = p.parent.clone();
            out.push((next, p));
            next = following;
        }
        Ok(out)
    }

    /// Checks shared by every new snapshot, inside its transaction: `key`
    /// is free and `parent` (if any) is committed. Returns a fresh id.
    fn admit(
        &self,
        t: &mut redb::Table<&str, &[u8]>,
        counters: &mut redb::Table<&str, u64>,
        key: &str,
        parent: &str,
    ) -> Result<u64, SnapError> {
        if self.get(t, key)?.is_some() {
            return Err(SnapError::AlreadyExists(key.to_string()));
        }
        if !parent.is_empty() {
            match self.get(t, parent)? {
                None => return Err(SnapError::NotFound(format!("{parent} (parent of {key})"))),
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapError::FailedPrecondition(format!(
                        "parent {parent} of {key} is not committed"
                    )));
                }
                Some(_) => {}
            }
        }
        let id = counters
            .get("next_id")
            .map_err(|e| self.internal(e))?
            .map(|v| v.value())
            .unwrap_or(1);
        counters
            .insert("next_id", id + 1)
            .map_err(|e| self.internal(e))?;
        Ok(id)
    }

    /// Create an active or view snapshot (Prepare / View).
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
    ) -> Result<Record, SnapError> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        let mut made: Option<PathBuf> = None;
        let result = self.write(|t, counters| {
            let id = self.admit(t, counters, key, parent)?;
            let dir = self.dir(id);
            for sub in ["fs", "work"] {
                std::fs::create_dir_all(dir.join(sub))
                    .map_err(|e| self.internal(format!("{}: {e}", dir.display())))?;
            }
            made = Some(dir);
            let t0 = now();
            let r = Record {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: t0,
                updated: t0,
                size: 0,
                inodes: 0,
                remote_dir: None,
            };
            self.put(t, key, &r)?;
            Ok(r)
        });
        if result.is_err()
            && let Some(d) = made
        {
            let _ = std::fs::remove_dir_all(d);
        }
        result
    }

    /// Commit an active snapshot under `name` (Commit).
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Record, SnapError> {
        let active = self.stat(key)?;
        if active.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        // Usage of what will become immutable; measured outside the transaction.
        let (size, inodes) = disk_usage(&self.fs_dir(&active));
        self.write(|t, _| {
            let r = self
                .get(t, key)?
                .ok_or_else(|| SnapError::NotFound(key.to_string()))?;
            if r.kind != Kind::Active {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            if self.get(t, name)?.is_some() {
                return Err(SnapError::AlreadyExists(name.to_string()));
            }
            t.remove(key).map_err(|e| self.internal(e))?;
            // A commit makes a new snapshot: containerd's metadata store
            // (and its snapshotter suite) has both times at the commit.
            let t0 = now();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created: t0,
                updated: t0,
                size: if r.remote_dir.is_some() { 0 } else { size },
                inodes: if r.remote_dir.is_some() { 0 } else { inodes },
                ..r
            };
            self.put(t, name, &committed)?;
            Ok(committed)
        })
    }

    /// Remove a snapshot without children (Remove).
    pub fn remove(&self, key: &str) -> Result<Record, SnapError> {
        let removed = self.write(|t, _| {
            let r = self
                .get(t, key)?
                .ok_or_else(|| SnapError::NotFound(key.to_string()))?;
            for entry in t.iter().map_err(|e| self.internal(e))? {
                let (k, v) = entry.map_err(|e| self.internal(e))?;
                if self.decode(v.value())?.parent == key {
                    return Err(SnapError::FailedPrecondition(format!(
                        "snapshot {key} has children (e.g. {}); remove them first",
                        k.value()
                    )));
                }
            }
            t.remove(key).map_err(|e| self.internal(e))?;
            Ok(r)
        })?;
        // After the commit: a crash here leaves a directory Cleanup removes.
        let _ = std::fs::remove_dir_all(self.dir(removed.id));
        Ok(removed)
    }

    /// Replace labels (Update): `paths` empty or `labels` = all labels,
    /// `labels.<key>` = one label (removed when absent from `labels`).
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record, SnapError> {
        for p in paths {
            if p != "labels" && !p.starts_with("labels.") {
                return Err(SnapError::InvalidArgument(format!(
                    "cannot update field {p:?} of snapshot {key}: only labels can change"
                )));
            }
        }
        self.write(|t, _| {
            let mut r = self
                .get(t, key)?
                .ok_or_else(|| SnapError::NotFound(key.to_string()))?;
            if paths.is_empty() || paths.iter().any(|p| p == "labels") {
                r.labels = labels.clone();
            } else {
                for p in paths {
                    let k = &p["labels.".len()..];
                    match labels.get(k) {
                        Some(v) => r.labels.insert(k.to_string(), v.clone()),
                        None => r.labels.remove(k),
                    };
                }
            }
            r.updated = now();
            self.put(t, key, &r)?;
            Ok(r)
        })
    }

    /// Commit a remote snapshot directly under `name` (the `Prepare` of a
    /// lazily pulled layer): one transaction, no directory of its own; its
    /// tree is `remote_dir` in the fs service's mount.
    pub fn create_remote(
        &self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote_dir: &str,
    ) -> Result<Record, SnapError> {
        let mut made: Option<u64> = None;
        let result = self.write(|t, counters| {
            let id = self.admit(t, counters, name, parent)?;
            // The link exists before the record commits; a crash leaves a
            // directory no record owns, which Cleanup removes.
            made = Some(id);
            self.link_remote(id, remote_dir)?;
            let t0 = now();
            let r = Record {
                id,
                kind: Kind::Committed,
                parent: parent.to_string(),
                labels,
                created: t0,
                updated: t0,
                size: 0,
                inodes: 0,
                remote_dir: Some(remote_dir.to_string()),
            };
            self.put(t, name, &r)?;
            Ok(r)
        });
        if result.is_err()
            && let Some(id) = made
        {
            let _ = std::fs::remove_dir_all(self.dir(id));
        }
        result
    }

    /// Record that a snapshot's tree is a remote layer's directory.
    pub fn set_remote_dir(&self, key: &str, dir: &str) -> Result<(), SnapError> {
        self.write(|t, _| {
            let mut r = self
                .get(t, key)?
                .ok_or_else(|| SnapError::NotFound(key.to_string()))?;
            r.remote_dir = Some(dir.to_string());
            self.link_remote(r.id, dir)?;
            self.put(t, key, &r)
        })
    }

    /// Size and inodes: recorded for committed snapshots, measured for active ones.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapError> {
        let r = self.stat(key)?;
        Ok(match r.kind {
            Kind::Committed => (r.size, r.inodes),
            _ if r.remote_dir.is_some() => (0, 0),
            _ => disk_usage(&self.fs_dir(&r)),
        })
    }

    /// Remove snapshot directories no record owns (Cleanup).
    pub fn cleanup(&self) -> Result<usize, SnapError> {
        let owned: std::collections::HashSet<String> = self
            .all()?
            .into_iter()
            .map(|(_, r)| r.id.to_string())
            .collect();
        let mut removed = 0;
        let dir = self.root.join("snapshots");
        for e in std::fs::read_dir(&dir)
            .map_err(|e| self.internal(e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            if !owned.contains(&name) {
                crate::mounts::unmount_all_below(&e.path());
                if std::fs::remove_dir_all(e.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Bytes (allocated blocks) and inodes below `dir`, hardlinks counted once.
pub fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            size += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (size, inodes)
}

/// Overlay / bind mounts for a snapshot, as containerd's overlay snapshotter
/// returns them.
pub fn mounts(store: &Store, r: &Record) -> Result<Vec<Mount>, SnapError> {
    let parents = store.parents(r)?;
    let lower: Vec<String> = parents
        .iter()
        .map(|(_, p)| store.fs_dir(p).display().to_string())
        .collect();
    let own = store.fs_dir(r).display().to_string();
    let bind = |source: String, rw: bool| Mount {
        r#type: "bind".into(),
        source,
        target: String::new(),
        options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
    };
    Ok(match r.kind {
        Kind::Active if lower.is_empty() => vec![bind(own, true)],
        Kind::View if lower.is_empty() => vec![bind(own, false)],
        Kind::View if lower.len() == 1 => vec![bind(lower[0].clone(), false)],
        Kind::View => vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![format!("lowerdir={}", lower.join(":"))],
        }],
        _ => vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "index=off".into(),
                format!("workdir={}", store.dir(r.id).join("work").display()),
                format!("upperdir={own}"),
                format!("lowerdir={}", lower.join(":")),
            ],
        }],
    })
}
