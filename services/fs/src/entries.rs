//! Attributes and directory listings, straight from a layer's mapped
//! index (the mount root lists the attached layers).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use stargaze_index::model::kind;

use crate::StargazeFs;
use crate::layers::{Attached, MOUNT_ROOT};

/// How long the kernel may cache what the mount root lists (layers come and go).
pub(crate) const ROOT_TTL: Duration = Duration::from_secs(1);

/// A directory entry offered to a listing reply, its name borrowed from the
/// index.
pub(crate) struct Listed<'a> {
    pub ino: u64,
    /// Where the kernel resumes the listing after this entry.
    pub next: u64,
    pub kind: FileType,
    pub name: &'a [u8],
    /// Attributes and their timeout: in a readdirplus listing only.
    pub attr: Option<(FileAttr, Duration)>,
}

fn file_type(k: u8) -> FileType {
    match k {
        kind::DIR => FileType::Directory,
        kind::SYMLINK => FileType::Symlink,
        kind::CHAR => FileType::CharDevice,
        kind::BLOCK => FileType::BlockDevice,
        kind::FIFO => FileType::NamedPipe,
        _ => FileType::RegularFile,
    }
}

/// Linux `new_encode_dev`.
fn rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    let t = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    t + Duration::from_nanos(u64::from(nsec))
}

pub(crate) fn layer_attr(a: &Attached, local: u64) -> Option<FileAttr> {
    let n = a.index.inode(local)?;
    let t = time(n.mtime(), n.mtime_nsec());
    let (major, minor) = n.rdev();
    Some(FileAttr {
        ino: INodeNo(a.global(local)),
        size: n.size(),
        blocks: n.blocks(),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(n.kind()),
        perm: n.perm() as u16,
        nlink: n.nlink(),
        uid: n.uid(),
        gid: n.gid(),
        rdev: rdev(major, minor),
        blksize: 4096,
        flags: 0,
    })
}

impl StargazeFs {
    pub(crate) fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(MOUNT_ROOT),
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2 + self.shared.layers.len() as u32,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Offer the entries of a directory listing from `offset` on to `add`,
    /// one by one, until it returns false (the reply is full) or the
    /// directory ends. Each entry is built only when offered, so a listing
    /// that takes many replies builds every entry about once, not once per
    /// reply. `plus` is the attribute timeout of a readdirplus listing:
    /// then every entry offered has its attributes (an entry without is
    /// skipped), otherwise none has.
    pub(crate) fn listing(
        &self,
        ino: u64,
        offset: u64,
        plus: Option<Duration>,
        mut add: impl FnMut(Listed<'_>) -> bool,
    ) -> Result<(), Errno> {
        let built = &self.shared.counters.listed_entries;
        let mut offer = |ino: u64,
                         next: u64,
                         kind: FileType,
                         name: &[u8],
                         attr: &dyn Fn() -> Option<FileAttr>|
         -> bool {
            let attr = match plus {
                None => None,
                Some(ttl) => match attr() {
                    Some(a) => Some((a, ttl)),
                    None => return true,
                },
            };
            built.fetch_add(1, Ordering::Relaxed);
            add(Listed {
                ino,
                next,
                kind,
                name,
                attr,
            })
        };
        if ino == MOUNT_ROOT {
            let root = self.root_attr();
            let dots: [(&[u8], u64); 2] = [(b".", 1), (b"..", 2)];
            for (name, next) in dots.into_iter().skip(offset as usize) {
                if !offer(MOUNT_ROOT, next, FileType::Directory, name, &|| Some(root)) {
                    return Ok(());
                }
            }
            let layers = self.shared.layers.list();
            let from = offset.saturating_sub(2) as usize;
            for (i, a) in layers.iter().enumerate().skip(from) {
                let name = a.name.as_bytes();
                if !offer(
                    a.global(1),
                    i as u64 + 3,
                    FileType::Directory,
                    name,
                    &|| layer_attr(a, 1),
                ) {
                    break;
                }
            }
            return Ok(());
        }
        let (a, local) = self.shared.layers.resolve(ino).ok_or(Errno::ENOENT)?;
        let node = a.index.inode(local).ok_or(Errno::ENOENT)?;
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let parent = if local == stargaze_index::ROOT_INO {
            MOUNT_ROOT
        } else {
            a.global(node.parent())
        };
        if offset == 0 && !offer(ino, 1, FileType::Directory, b".", &|| layer_attr(&a, local)) {
            return Ok(());
        }
        let parent_attr = || {
            if parent == MOUNT_ROOT {
                Some(self.root_attr())
            } else {
                layer_attr(&a, node.parent())
            }
        };
        if offset <= 1 && !offer(parent, 2, FileType::Directory, b"..", &parent_attr) {
            return Ok(());
        }
        for d in a.index.readdir(local, offset.saturating_sub(2) as usize) {
            let kind = file_type(d.kind);
            if !offer(a.global(d.ino), d.offset as u64 + 3, kind, d.name, &|| {
                layer_attr(&a, d.ino)
            }) {
                break;
            }
        }
        Ok(())
    }
}
