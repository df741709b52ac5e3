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
//! A cleared record keeps its mode until the number is free: a process
//! killed in between leaves the id it may not have closed, which the next
//! process closes before serving (the kernel never gives a closed id out
//! again soon: ids are allocated cyclically among 2^31).
//!
//! Beside each record is the kernel's number of the open request it
//! answers. A process killed between recording an open and answering it
//! leaves a record of a handle the kernel never got; the kernel presents
//! that request again to the next process (FUSE_NOTIFY_RESEND, or the ring
//! entry it takes over), which finds the record by the request's number and
//! drops it: the kernel would never release that handle.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Records in the table: more files than this open at once get handle
/// numbers that are not recorded (and a warning).
pub const CAPACITY: u64 = 1 << 22;
/// Handle numbers above this are not in the table.
const UNRECORDED_BASE: u64 = 1 << 40;
/// `FUSE_UNIQUE_RESEND`: set by the kernel in the number of a request it
/// gives again after FUSE_NOTIFY_RESEND.
const UNIQUE_RESEND: u64 = 1 << 63;
/// Bytes of the file: a record (inode, mode) per slot, then a request
/// number per slot. A table of a build without the numbers is shorter:
/// extended with zeros, its records are never taken for unanswered opens.
const FILE_LEN: u64 = CAPACITY * 24;

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
    passthrough: bool,
}

impl Unrecorded {
    /// Whether the handle was opened with passthrough.
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }
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
    /// The request numbers of the records a previous process left, to
    /// their handle: a request the kernel presents again is one whose
    /// answer it never got.
    adopted: Mutex<HashMap<u64, u64>>,
    /// Slots of releases a previous process did not finish, with the
    /// backing id each names (none named by a record left open).
    unfinished: Mutex<Vec<(u64, u32)>>,
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
        file.set_len(FILE_LEN)?;
        // SAFETY: the file is private to this service; nothing truncates it
        // while mapped.
        let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        let table = OpenTable {
            path: path.to_path_buf(),
            map,
            free: Mutex::new(Free::default()),
            unrecorded: AtomicU64::new(0),
            adopted: Mutex::new(HashMap::new()),
            unfinished: Mutex::new(Vec::new()),
        };
        let mut left = Vec::new();
        if keep {
            let mut free = table.free.lock();
            for slot in 0..CAPACITY {
                let (ino, mode) = table.read(slot);
                if ino == 0 {
                    if let Some(raw) = mode.checked_sub(1).and_then(|m| u32::try_from(m).ok()) {
                        table.unfinished.lock().push((slot, raw));
                    }
                    continue;
                }
                // Free slots below the highest used one are given out first.
                for s in free.next..slot {
                    free.slots.push(s);
                }
                free.next = slot + 1;
                let unique = table.unique_word(slot).load(Ordering::Relaxed);
                if unique != 0 {
                    table.adopted.lock().insert(unique, slot + 1);
                }
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
            let named: std::collections::HashSet<u32> = left
                .iter()
                .filter_map(|h| match h.mode {
                    Mode::Passthrough(raw) => Some(raw),
                    Mode::Cached => None,
                })
                .collect();
            table
                .unfinished
                .lock()
                .retain(|(_, raw)| !named.contains(raw));
        }
        Ok((table, left))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn words(&self, slot: u64) -> (&AtomicU64, &AtomicU64) {
        let base = self.map.as_ptr() as *const AtomicU64;
        // SAFETY: slot < CAPACITY and the map holds CAPACITY * 3 aligned
        // u64s (page-aligned mapping); AtomicU64 has u64's layout.
        unsafe {
            (
                &*base.add((slot * 2) as usize),
                &*base.add((slot * 2 + 1) as usize),
            )
        }
    }

    /// The number of the open request a slot's record answers (0: none).
    fn unique_word(&self, slot: u64) -> &AtomicU64 {
        let base = self.map.as_ptr() as *const AtomicU64;
        // SAFETY: as in `words`; the numbers follow the CAPACITY records.
        unsafe { &*base.add((CAPACITY * 2 + slot) as usize) }
    }

    fn read(&self, slot: u64) -> (u64, u64) {
        let (ino, mode) = self.words(slot);
        let i = ino.load(Ordering::Acquire);
        (i, mode.load(Ordering::Relaxed))
    }

    /// A new handle number for an open of `ino`, recorded before the
    /// caller answers the kernel's request `unique`.
    pub fn open_handle(&self, ino: u64, mode: Mode, unique: u64) -> u64 {
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
        self.unique_word(slot)
            .store(unique & !UNIQUE_RESEND, Ordering::Relaxed);
        mode_word.store(word, Ordering::Relaxed);
        ino_word.store(ino, Ordering::Release);
        slot + 1
    }

    /// The handle a previous process recorded for the open request
    /// `unique` of `ino` and never answered (the kernel presents only
    /// unanswered requests again): the kernel will never release it.
    pub fn unanswered(&self, unique: u64, ino: u64) -> Option<u64> {
        let unique = unique & !UNIQUE_RESEND;
        let mut adopted = self.adopted.lock();
        if adopted.is_empty() || unique == 0 {
            return None;
        }
        let fh = *adopted.get(&unique)?;
        let slot = fh - 1;
        if self.read(slot).0 != ino || self.unique_word(slot).load(Ordering::Relaxed) != unique {
            return None;
        }
        adopted.remove(&unique);
        Some(fh)
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
        if self.words(slot).0.swap(0, Ordering::AcqRel) == 0 {
            return None;
        }
        let mut adopted = self.adopted.lock();
        if !adopted.is_empty() {
            let unique = self.unique_word(slot).load(Ordering::Relaxed);
            if adopted.get(&unique) == Some(&fh) {
                adopted.remove(&unique);
            }
        }
        Some(Unrecorded {
            slot,
            passthrough: self.words(slot).1.load(Ordering::Relaxed) != 0,
        })
    }

    /// Give an unrecorded handle's number to new opens.
    pub fn free(&self, u: Unrecorded) {
        self.words(u.slot).1.store(0, Ordering::Relaxed);
        self.free.lock().slots.push(u.slot);
    }

    /// The backing ids of releases the previous process did not finish:
    /// perhaps still open, named by no open handle. (A table of a build
    /// that kept the modes of free slots names ids closed long ago.)
    pub fn unfinished_releases(&self) -> Vec<u32> {
        self.unfinished.lock().iter().map(|(_, raw)| *raw).collect()
    }

    /// Those ids are closed now: forget them.
    pub fn unfinished_closed(&self) {
        for (slot, _) in self.unfinished.lock().drain(..) {
            self.words(slot).1.store(0, Ordering::Relaxed);
        }
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
        let a = t.open_handle(10, Mode::Cached, 0);
        assert!(!t.is_stale_release(a, 10));
        assert!(t.is_stale_release(a, 11), "another file's release");
        t.release(a);
        assert!(t.is_stale_release(a, 10), "released already");
        // The number given to another open: the old release is stale.
        let b = t.open_handle(12, Mode::Cached, 0);
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
        let a = t.open_handle(10, Mode::Cached, 0);
        let b = t.open_handle(11, Mode::Passthrough(0), 0);
        let c = t.open_handle(12, Mode::Passthrough(7), 0);
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
        let d = t.open_handle(13, Mode::Cached, 0);
        let e = t.open_handle(14, Mode::Cached, 0);
        assert_eq!(d, b);
        assert!(![a, c, d].contains(&e));
        drop(t);

        // A fresh start forgets everything.
        let (_t, left) = OpenTable::open(&path, false).unwrap();
        assert!(left.is_empty());
    }

    /// A record left by a process killed before answering its open: the
    /// kernel presents the request again (its number with the resend bit)
    /// and finds that record; the records of answered opens, a number
    /// given to another inode, and an unknown number (a table of a build
    /// without them) are found by nothing.
    #[test]
    fn an_open_presented_again_finds_the_record_made_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = OpenTable::beside(&dir.path().join("mnt"));
        let (t, _) = OpenTable::open(&path, false).unwrap();
        let answered = t.open_handle(10, Mode::Cached, 40);
        let unanswered = t.open_handle(11, Mode::Passthrough(2), 42);
        let released = t.open_handle(12, Mode::Cached, 44);
        let unknown = t.open_handle(13, Mode::Cached, 0);
        t.release(released);
        assert_eq!(t.unanswered(42, 11), None, "nothing was taken over");
        drop(t);

        let (t, left) = OpenTable::open(&path, true).unwrap();
        assert_eq!(left.len(), 3);
        assert_eq!(t.unanswered(42 | UNIQUE_RESEND, 12), None, "another inode");
        assert_eq!(t.unanswered(44, 12), None, "released before");
        assert_eq!(t.unanswered(0, 13), None);
        assert_eq!(t.unanswered(42 | UNIQUE_RESEND, 11), Some(unanswered));
        assert_eq!(t.unanswered(42, 11), None, "found once");
        // A released handle is forgotten: its number, given to a new open,
        // is not found by the old request.
        t.release(answered);
        let again = t.open_handle(14, Mode::Cached, 46);
        assert_eq!(again, answered);
        assert_eq!(t.unanswered(40, 10), None);
        assert_eq!(t.unanswered(40, 14), None);
        assert_ne!(again, unknown);
    }

    /// A process killed in a release between clearing the record and
    /// freeing the number leaves the backing id to close to the next one,
    /// unless an open handle still names it; a finished release leaves
    /// nothing.
    #[test]
    fn a_release_cut_short_leaves_its_backing_id_to_the_next_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = OpenTable::beside(&dir.path().join("mnt"));
        let (t, _) = OpenTable::open(&path, false).unwrap();
        let a = t.open_handle(10, Mode::Passthrough(5), 0);
        let b = t.open_handle(11, Mode::Passthrough(6), 0);
        let _c = t.open_handle(11, Mode::Passthrough(6), 0);
        let d = t.open_handle(12, Mode::Passthrough(7), 0);
        let e = t.open_handle(13, Mode::Cached, 0);
        let cut = t.unrecord(a);
        assert!(cut.as_ref().is_some_and(Unrecorded::passthrough));
        let _still_named = t.unrecord(b);
        t.release(d);
        let _cached = t.unrecord(e);
        drop(t);

        let (t, left) = OpenTable::open(&path, true).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(t.unfinished_releases(), vec![5]);
        t.unfinished_closed();
        drop(t);
        let (t, _) = OpenTable::open(&path, true).unwrap();
        assert!(t.unfinished_releases().is_empty());
    }

    /// A panic while the free list is locked (a bug in one open) must not
    /// make every later open and release panic.
    #[test]
    fn a_panic_while_the_free_list_is_locked_leaves_it_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _) = OpenTable::open(&OpenTable::beside(&dir.path().join("mnt")), false).unwrap();
        let a = t.open_handle(10, Mode::Cached, 0);
        std::thread::scope(|s| {
            let bug = s.spawn(|| {
                let _held = t.free.lock();
                panic!("a bug while holding the free list");
            });
            assert!(bug.join().is_err());
        });
        t.release(a);
        assert_eq!(t.open_handle(11, Mode::Cached, 0), a);
    }
}
