//! Attributes and directory listings, straight from a layer's mapped
//! index (the mount root lists the attached layers).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use stargaze_index::model::kind;

use crate::StargazeFs;
use crate::layers::{Attached, MOUNT_ROOT};

/// How long the kernel may cache what the mount root lists (layers come and go).
pub(crate) const ROOT_TTL: Duration = Duration::from_secs(1);

/// A directory entry to list: (inode, offset of the next entry, type, name, attributes).
pub(crate) type Listed = (u64, u64, FileType, Vec<u8>, Option<FileAttr>);

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

    /// (ino, offset of the next entry, type, name, attr) of a directory
    /// listing from `offset` on.
    pub(crate) fn listing(&self, ino: u64, offset: u64) -> Result<Vec<Listed>, Errno> {
        let mut out = Vec::new();
        if ino == MOUNT_ROOT {
            let root = self.root_attr();
            let mut all = vec![
                (MOUNT_ROOT, FileType::Directory, b".".to_vec(), Some(root)),
                (MOUNT_ROOT, FileType::Directory, b"..".to_vec(), Some(root)),
            ];
            for a in self.shared.layers.list() {
                all.push((
                    a.global(1),
                    FileType::Directory,
                    a.name.as_bytes().to_vec(),
                    layer_attr(&a, 1),
                ));
            }
            for (i, (ino, t, name, attr)) in all.into_iter().enumerate().skip(offset as usize) {
                out.push((ino, i as u64 + 1, t, name, attr));
            }
            return Ok(out);
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
        if offset == 0 {
            out.push((
                ino,
                1,
                FileType::Directory,
                b".".to_vec(),
                layer_attr(&a, local),
            ));
        }
        if offset <= 1 {
            let pattr = if parent == MOUNT_ROOT {
                Some(self.root_attr())
            } else {
                layer_attr(&a, node.parent())
            };
            out.push((parent, 2, FileType::Directory, b"..".to_vec(), pattr));
        }
        for d in a.index.readdir(local, offset.saturating_sub(2) as usize) {
            out.push((
                a.global(d.ino),
                d.offset as u64 + 3,
                file_type(d.kind),
                d.name.to_vec(),
                layer_attr(&a, d.ino),
            ));
        }
        Ok(out)
    }
}
