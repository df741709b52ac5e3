//! Replies as the kernel reads them from a ring entry's payload (the out
//! header travels separately, in the entry's header): attributes, entries,
//! open results, statfs, xattr sizes and directory listings packed up to
//! the size the kernel asked for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

use super::abi::{self, put_u32, put_u64};

/// `st_mode`'s type bits of a file type.
fn type_bits(k: FileType) -> u32 {
    match k {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// Seconds (two's complement before the epoch) and nanoseconds.
fn time(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                ((-s) as u64, 0)
            } else {
                ((-s - 1) as u64, 1_000_000_000 - n)
            }
        }
    }
}

/// `struct fuse_attr` into `b` (at least `ATTR_LEN` bytes).
fn put_attr(b: &mut [u8], a: &FileAttr) {
    let (at, atn) = time(a.atime);
    let (mt, mtn) = time(a.mtime);
    let (ct, ctn) = time(a.ctime);
    put_u64(b, 0, u64::from(a.ino));
    put_u64(b, 8, a.size);
    put_u64(b, 16, a.blocks);
    put_u64(b, 24, at);
    put_u64(b, 32, mt);
    put_u64(b, 40, ct);
    put_u32(b, 48, atn);
    put_u32(b, 52, mtn);
    put_u32(b, 56, ctn);
    put_u32(b, 60, type_bits(a.kind) | u32::from(a.perm));
    put_u32(b, 64, a.nlink);
    put_u32(b, 68, a.uid);
    put_u32(b, 72, a.gid);
    put_u32(b, 76, a.rdev);
    put_u32(b, 80, a.blksize);
    put_u32(b, 84, a.flags);
}

/// `struct fuse_entry_out` into `b` (at least `ENTRY_OUT_LEN` bytes).
fn put_entry(b: &mut [u8], a: &FileAttr, ttl: Duration) {
    put_u64(b, 0, u64::from(a.ino));
    put_u64(b, 8, 0);
    put_u64(b, 16, ttl.as_secs());
    put_u64(b, 24, ttl.as_secs());
    put_u32(b, 32, ttl.subsec_nanos());
    put_u32(b, 36, ttl.subsec_nanos());
    put_attr(&mut b[40..], a);
}

pub fn entry(a: &FileAttr, ttl: Duration) -> Vec<u8> {
    let mut b = vec![0u8; abi::ENTRY_OUT_LEN];
    put_entry(&mut b, a, ttl);
    b
}

/// `struct fuse_attr_out`.
pub fn attr(a: &FileAttr, ttl: Duration) -> Vec<u8> {
    let mut b = vec![0u8; abi::ATTR_OUT_LEN];
    put_u64(&mut b, 0, ttl.as_secs());
    put_u32(&mut b, 8, ttl.subsec_nanos());
    put_attr(&mut b[16..], a);
    b
}

/// `struct fuse_open_out { fh, open_flags, backing_id }`.
pub fn open(fh: u64, flags: u32, backing_id: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    put_u64(&mut b, 0, fh);
    put_u32(&mut b, 8, flags);
    put_u32(&mut b, 12, backing_id);
    b
}

/// `struct fuse_statfs_out` of a read-only filesystem without free space.
pub fn statfs(block_size: u32, name_len: u32) -> Vec<u8> {
    let mut b = vec![0u8; 80];
    put_u32(&mut b, 40, block_size);
    put_u32(&mut b, 44, name_len);
    put_u32(&mut b, 48, block_size);
    b
}

/// `struct fuse_getxattr_out { size, padding }`: the size asked for with
/// a zero-sized buffer.
pub fn xattr_size(size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    put_u32(&mut b, 0, size);
    b
}

/// A `readdir` or `readdirplus` reply being packed, up to the kernel's size.
pub struct Listing {
    buf: Vec<u8>,
    max: usize,
    plus: bool,
}

fn padded(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl Listing {
    pub fn new(max: u32, plus: bool) -> Listing {
        Listing {
            buf: Vec::new(),
            max: max as usize,
            plus,
        }
    }

    /// Add an entry; false when it does not fit (the listing is full).
    /// `attr` is needed only in a readdirplus listing.
    pub fn add(
        &mut self,
        ino: u64,
        next: u64,
        kind: FileType,
        name: &[u8],
        attr: Option<(&FileAttr, Duration)>,
    ) -> bool {
        let head = if self.plus { abi::ENTRY_OUT_LEN } else { 0 };
        let len = head + padded(abi::DIRENT_LEN + name.len());
        if self.buf.len() + len > self.max {
            return false;
        }
        let start = self.buf.len();
        self.buf.resize(start + len, 0);
        let b = &mut self.buf[start..];
        if let Some((a, ttl)) = attr.filter(|_| self.plus) {
            put_entry(b, a, ttl);
        }
        let d = &mut b[head..];
        put_u64(d, 0, ino);
        put_u64(d, 8, next);
        put_u32(d, 16, name.len() as u32);
        put_u32(d, 20, type_bits(kind) >> 12);
        d[abi::DIRENT_LEN..abi::DIRENT_LEN + name.len()].copy_from_slice(name);
        true
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::abi::{u32_at, u64_at};
    use fuser::INodeNo;

    fn file(ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 5,
            blocks: 1,
            atime: UNIX_EPOCH - Duration::from_millis(1500),
            mtime: UNIX_EPOCH + Duration::new(10, 7),
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o644,
            nlink: 1,
            uid: 3,
            gid: 4,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    #[test]
    fn an_entry_carries_the_node_ttls_and_the_attributes() {
        let b = entry(&file(42), Duration::new(2, 5));
        assert_eq!(b.len(), 128);
        assert_eq!(u64_at(&b, 0), Some(42));
        assert_eq!((u64_at(&b, 16), u32_at(&b, 32)), (Some(2), Some(5)));
        let a = &b[40..];
        assert_eq!(u64_at(a, 8), Some(5));
        assert_eq!(u64_at(a, 32), Some(10));
        assert_eq!(u32_at(a, 52), Some(7));
        // 1.5 s before the epoch: -2 s + 0.5 s.
        assert_eq!(u64_at(a, 24), Some((-2i64) as u64));
        assert_eq!(u32_at(a, 48), Some(500_000_000));
        assert_eq!(u32_at(a, 60), Some(0o100644));
        assert_eq!((u32_at(a, 68), u32_at(a, 72)), (Some(3), Some(4)));
    }

    #[test]
    fn a_listing_stops_at_the_size_asked_for() {
        let mut l = Listing::new(80, false);
        assert!(l.add(1, 1, FileType::Directory, b".", None));
        assert!(l.add(2, 2, FileType::RegularFile, b"abcdefghi", None));
        assert!(!l.add(3, 3, FileType::RegularFile, b"x", None));
        let b = l.into_bytes();
        assert_eq!(b.len(), 32 + 40);
        assert_eq!(u32_at(&b, 20), Some(libc::DT_DIR as u32));
        assert_eq!(u32_at(&b, 32 + 16), Some(9));
        assert_eq!(&b[32 + 24..32 + 33], b"abcdefghi");

        let mut p = Listing::new(4096, true);
        let f = file(9);
        assert!(p.add(
            9,
            1,
            FileType::RegularFile,
            b"f",
            Some((&f, Duration::ZERO))
        ));
        let b = p.into_bytes();
        assert_eq!(b.len(), 128 + 32);
        assert_eq!(u64_at(&b, 0), Some(9));
        assert_eq!(u64_at(&b, 128), Some(9));
    }
}
