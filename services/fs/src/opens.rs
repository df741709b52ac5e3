//! The mount's open files, in a table that outlives the process.
//!
//! After a restart the kernel still holds the file handles the previous
//! process gave out, and its FUSE inodes are in the I/O mode those opens
//! chose: an inode with a file open through FUSE passthrough accepts new
//! opens only with the same backing file, one with a file open in cached
//! mode refuses passthrough (both fail the `open` with EIO). So every open
//! handle is recorded here — its inode and, for passthrough, the kernel's
//! backing id — in a shared mapping of a file beside the mountpoint (on
//! /run, so it goes with the mount at a reboot). The handle number is the
//! record's position + 1: a restarted process never gives out a number that
//! is still open, and learns the mode of every inode from the records.
//!
//! A record is written before the open is answered and cleared before a
//! release is: a crash can leave a record of a handle the kernel never got
//! (its inode keeps its mode until the connection ends), never the reverse.
//! It is written once the open's mode is chosen, with that mode, so such a
//! record never claims a mode the kernel's inode is not in. A release
//! clears it before it closes the handle's backing id, and gives the number
//! out again only after: a record never names a backing id already closed,
//! and a new open never finds the state of the handle that had its number.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Records in the table: more files than this open at once get handle
/// numbers that are not recorded (and a warning).
pub const CAPACITY: u64 = 1 << 22;
/// Handle numbers above this are not in the table.
const UNRECORDED_BASE: u64 = 1 << 40;

/// How a handle was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through `read` (the kernel's page cache).
    Cached,
    /// FUSE passthrough with this backing id.
    Passthrough(u32),
}

/// A handle whose record is cleared and whose number is not free yet.
#[must_use = "the number is given out again only once freed"]
#[derive(Debug)]
pub struct Unrecorded {
    slot: u64,
}

/// A handle the previous process left open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenHandle {
    pub fh: u64,
    pub ino: u64,
    pub mode: Mode,
}

pub struct OpenTable {
    path: PathBuf,
    map: memmap2::MmapMut,
    free: Mutex<Free>,
    unrecorded: AtomicU64,
}

#[derive(Default)]
struct Free {
    slots: Vec<u64>,
    next: u64,
}

impl OpenTable {
    pub fn beside(mountpoint: &Path) -> PathBuf {
        let mut name = mountpoint.as_os_str().to_owned();
        name.push(".opens");
        PathBuf::from(name)
    }

    /// Open the table at `path`. With `keep`, the records of a previous
    /// process are returned; otherwise the table starts empty.
    pub fn open(path: &Path, keep: bool) -> std::io::Result<(OpenTable, Vec<OpenHandle>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!keep)
            .open(path)?;
        // Sparse: only pages of records ever used take memory.
        file.set_len(CAPACITY * 16)?;
        // SAFETY: the file is private to this service; nothing truncates it
        // while mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        let table = OpenTable {
            path: path.to_path_buf(),
            map,
            free: Mutex::new(Free::default()),
            unrecorded: AtomicU64::new(0),
        };
        let mut left = Vec::new();
        if keep {
            let mut free = table.free.lock();
            for slot in 0..CAPACITY {
                let (ino, mode) = table.read(slot);
                if ino == 0 {
                    continue;
                }
                // Free slots below the highest used one are given out first.
                for s in free.next..slot {
                    free.slots.push(s);
                }
                free.next = slot + 1;
                left.push(OpenHandle {
                    fh: slot + 1,
                    ino,
                    mode: if mode == 0 {
                        Mode::Cached
                    } else {
                        Mode::Passthrough((mode - 1) as u32)
                    },
                });
            }
            free.slots.reverse();
        }
        Ok((table, left))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn words(&self, slot: u64) -> (&AtomicU64, &AtomicU64) {
        let base = self.map.as_ptr() as *const AtomicU64;
        // SAFETY: slot < CAPACITY and the map holds CAPACITY * 2 aligned
        // u64s (page-aligned mapping); AtomicU64 has u64's layout.
        unsafe {
            (
                &*base.add((slot * 2) as usize),
                &*base.add((slot * 2 + 1) as usize),
            )
        }
    }

    fn read(&self, slot: u64) -> (u64, u64) {
        let (ino, mode) = self.words(slot);
        let i = ino.load(Ordering::Acquire);
        (i, mode.load(Ordering::Relaxed))
    }

    /// A new handle number for an open of `ino`, recorded before the
    /// caller answers the kernel.
    pub fn open_handle(&self, ino: u64, mode: Mode) -> u64 {
        let slot = {
            let mut free = self.free.lock();
            match free.slots.pop() {
                Some(s) => Some(s),
                None if free.next < CAPACITY => {
                    free.next += 1;
                    Some(free.next - 1)
                }
                None => None,
            }
        };
        let Some(slot) = slot else {
            if self.unrecorded.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    capacity = CAPACITY,
                    "more files open on the mount than the open-file table holds: those are not restored after a restart"
                );
            }
            return UNRECORDED_BASE + self.unrecorded.load(Ordering::Relaxed);
        };
        let word = match mode {
            Mode::Cached => 0,
            Mode::Passthrough(id) => u64::from(id) + 1,
        };
        // The mode first: a reader that sees the inode sees its mode.
        let (ino_word, mode_word) = self.words(slot);
        mode_word.store(word, Ordering::Relaxed);
        ino_word.store(ino, Ordering::Release);
        slot + 1
    }

    /// Whether a release of `fh` for inode `ino` is one the previous
    /// process already did: the kernel resends every request a dead
    /// process had read but not answered (`FUSE_NOTIFY_RESEND`), a release
    /// too, and by then the number may be free or given to another open.
    /// Handles beyond the table are never judged stale.
    pub fn is_stale_release(&self, fh: u64, ino: u64) -> bool {
        if fh == 0 || fh > CAPACITY {
            return false;
        }
        self.read(fh - 1).0 != ino
    }

    /// Clear the record of a handle being released, its number kept from
    /// new opens until [`free`](Self::free)d; `None` when not recorded.
    pub fn unrecord(&self, fh: u64) -> Option<Unrecorded> {
        if fh == 0 || fh > CAPACITY {
            return None;
        }
        let slot = fh - 1;
        (self.words(slot).0.swap(0, Ordering::AcqRel) != 0).then_some(Unrecorded { slot })
    }

    /// Give an unrecorded handle's number to new opens.
    pub fn free(&self, u: Unrecorded) {
        self.free.lock().slots.push(u.slot);
    }

    /// Forget a handle that has no other state to drop.
    pub fn release(&self, fh: u64) {
        if let Some(u) = self.unrecord(fh) {
            self.free(u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_done_before_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = OpenTable::beside(&dir.path().join("mnt"));
        let (t, _) = OpenTable::open(&path, false).unwrap();
        let a = t.open_handle(10, Mode::Cached);
        assert!(!t.is_stale_release(a, 10));
        assert!(t.is_stale_release(a, 11), "another file's release");
        t.release(a);
        assert!(t.is_stale_release(a, 10), "released already");
        // The number given to another open: the old release is stale.
        let b = t.open_handle(12, Mode::Cached);
        assert_eq!(a, b);
        assert!(t.is_stale_release(b, 10));
        assert!(!t.is_stale_release(b, 12));
        assert!(!t.is_stale_release(UNRECORDED_BASE + 1, 10));
    }

    #[test]
    fn handles_survive_a_reopen_and_their_numbers_are_not_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = OpenTable::beside(&dir.path().join("mnt"));
        let (t, left) = OpenTable::open(&path, false).unwrap();
        assert!(left.is_empty());
        let a = t.open_handle(10, Mode::Cached);
        let b = t.open_handle(11, Mode::Passthrough(0));
        let c = t.open_handle(12, Mode::Passthrough(7));
        t.release(b);
        drop(t);

        let (t, left) = OpenTable::open(&path, true).unwrap();
        assert_eq!(
            left,
            vec![
                OpenHandle {
                    fh: a,
                    ino: 10,
                    mode: Mode::Cached
                },
                OpenHandle {
                    fh: c,
                    ino: 12,
                    mode: Mode::Passthrough(7)
                },
            ]
        );
        // The freed number comes back; the open ones never do.
        let d = t.open_handle(13, Mode::Cached);
        let e = t.open_handle(14, Mode::Cached);
        assert_eq!(d, b);
        assert!(![a, c, d].contains(&e));
        drop(t);

        // A fresh start forgets everything.
        let (_t, left) = OpenTable::open(&path, false).unwrap();
        assert!(left.is_empty());
    }

    /// A panic while the free list is locked (a bug in one open) must not
    /// make every later open and release panic.
    #[test]
    fn a_panic_while_the_free_list_is_locked_leaves_it_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = OpenTable::open(&OpenTable::beside(&dir.path().join("mnt")), false).unwrap();
        let a = t.open_handle(10, Mode::Cached);
        std::thread::scope(|s| {
            let bug = s.spawn(|| {
                let _held = t.free.lock();
                panic!("a bug while holding the free list");
            });
            assert!(bug.join().is_err());
        });
        t.release(a);
        assert_eq!(t.open_handle(11, Mode::Cached), a);
    }
}
