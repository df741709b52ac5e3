//! The ring entries' memory: for every entry a header slot (the kernel's
//! `fuse_uring_req_header`, and beside it our state word) and a payload,
//! all in one file beside the mountpoint, mapped shared at an address
//! recorded in the file.
//!
//! Why a file and a fixed address: the kernel keeps, for every request a
//! process was serving, the *user address* of its entry's buffers, and reads
//! the reply from there when the entry is committed. A process that dies
//! (kill -9) leaves such requests behind, and the kernel never resends
//! requests held by ring entries (FUSE_NOTIFY_RESEND covers `/dev/fuse`
//! only). The next process maps the same file at the same address, finds
//! the requests in it (state word), answers them and commits them on its
//! own ring, which also re-arms the dead process's entries for itself.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::abi::ring_header;

/// Bytes of a request's or reply's payload: the INIT reply sets
/// `max_write` and `max_pages` so the kernel never needs more.
pub const PAYLOAD: usize = 1 << 20;
/// A header slot: the kernel's header, then our state word.
const HEADER_SLOT: usize = 4096;
const STATE_AT: usize = 1024;
const MAGIC: u64 = u64::from_le_bytes(*b"SGRING01");
/// Where the first process asks for its mapping (far from the heap, the
/// binary and the kernel's top-down mmap area).
const ADDRESS_HINT: usize = 0x2000_0000_0000;

/// An entry's state word.
pub mod state {
    /// Registered or committed: the kernel may put a request in it.
    pub const ARMED: u32 = 0;
    /// Holds a request being served.
    pub const REQUEST: u32 = 1;
    /// The reply is written; its commit is being submitted.
    pub const REPLIED: u32 = 2;
}

/// The mapping of all entries of all queues.
pub struct RingMemory {
    base: *mut u8,
    len: usize,
    pub queues: usize,
    pub per_queue: usize,
    /// Mapped at the previous process's address: its entries are ours.
    pub adopted: bool,
    pub path: PathBuf,
}

// SAFETY: the mapping lives as long as the value; each entry is written by
// the one thread serving its queue (or, between requests, by the kernel).
unsafe impl Send for RingMemory {}
unsafe impl Sync for RingMemory {}

fn file_len(entries: usize) -> usize {
    HEADER_SLOT + entries * (HEADER_SLOT + PAYLOAD)
}

impl RingMemory {
    /// The ring file of the mount at `mountpoint`.
    pub fn path_beside(mountpoint: &Path) -> PathBuf {
        let mut name = mountpoint.as_os_str().to_owned();
        name.push(".rings");
        PathBuf::from(name)
    }

    /// Map the ring file at `path` for `queues` × `per_queue` entries:
    /// the previous process's one at its address when `adopt` and it
    /// matches, else a new one.
    pub fn open(
        path: &Path,
        queues: usize,
        per_queue: usize,
        adopt: bool,
    ) -> io::Result<RingMemory> {
        if adopt {
            match Self::adopt(path, queues, per_queue) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot map the previous process's ring entries: requests it was serving stay unanswered")
                }
            }
        }
        let _ = std::fs::remove_file(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let len = file_len(queues * per_queue);
        file.set_len(len as u64)?;
        let base = map(&file, len, ADDRESS_HINT).or_else(|_| map(&file, len, 0))?;
        let mut head = [0u8; 32];
        head[0..8].copy_from_slice(&MAGIC.to_ne_bytes());
        head[8..16].copy_from_slice(&(base as u64).to_ne_bytes());
        head[16..20].copy_from_slice(&(queues as u32).to_ne_bytes());
        head[20..24].copy_from_slice(&(per_queue as u32).to_ne_bytes());
        head[24..28].copy_from_slice(&(PAYLOAD as u32).to_ne_bytes());
        file.write_all_at(&head, 0)?;
        Ok(RingMemory {
            base,
            len,
            queues,
            per_queue,
            adopted: false,
            path: path.to_path_buf(),
        })
    }

    fn adopt(path: &Path, queues: usize, per_queue: usize) -> io::Result<Option<RingMemory>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut head = [0u8; 32];
        file.read_exact_at(&mut head, 0)?;
        let word = |at: usize| u32::from_ne_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        let magic = u64::from_ne_bytes(head[0..8].try_into().expect("8 bytes"));
        let addr = u64::from_ne_bytes(head[8..16].try_into().expect("8 bytes")) as usize;
        if magic != MAGIC
            || word(16) as usize != queues
            || word(20) as usize != per_queue
            || word(24) as usize != PAYLOAD
        {
            tracing::warn!(file = %path.display(), "the previous process's ring file does not match this one's rings: requests it was serving stay unanswered");
            return Ok(None);
        }
        let len = file_len(queues * per_queue);
        if file.metadata()?.len() < len as u64 {
            return Ok(None);
        }
        let base = map(&file, len, addr)?;
        Ok(Some(RingMemory {
            base,
            len,
            queues,
            per_queue,
            adopted: true,
            path: path.to_path_buf(),
        }))
    }

    pub fn entries(&self) -> usize {
        self.queues * self.per_queue
    }

    fn slot(&self, i: usize) -> *mut u8 {
        assert!(i < self.entries());
        // SAFETY: within the mapping (checked above).
        unsafe { self.base.add(HEADER_SLOT + i * (HEADER_SLOT + PAYLOAD)) }
    }

    /// The kernel header of entry `i` (for the register iovec).
    pub fn header_ptr(&self, i: usize) -> *mut u8 {
        self.slot(i)
    }

    pub fn payload_ptr(&self, i: usize) -> *mut u8 {
        // SAFETY: the payload follows the header slot inside the mapping.
        unsafe { self.slot(i).add(HEADER_SLOT) }
    }

    /// The header of entry `i`.
    ///
    /// # Safety
    /// Only while the entry is not armed (the kernel writes it then), by
    /// the thread serving its queue.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn header(&self, i: usize) -> &mut [u8] {
        // SAFETY: the caller owns the entry now.
        unsafe { std::slice::from_raw_parts_mut(self.slot(i), ring_header::LEN) }
    }

    /// The payload of entry `i`.
    ///
    /// # Safety
    /// As for [`Self::header`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn payload(&self, i: usize) -> &mut [u8] {
        // SAFETY: as for the header.
        unsafe { std::slice::from_raw_parts_mut(self.payload_ptr(i), PAYLOAD) }
    }

    fn state_word(&self, i: usize) -> &AtomicU32 {
        // SAFETY: aligned, inside the header slot, never touched by the kernel.
        unsafe { &*(self.slot(i).add(STATE_AT) as *const AtomicU32) }
    }

    pub fn state(&self, i: usize) -> u32 {
        self.state_word(i).load(Ordering::Acquire)
    }

    pub fn set_state(&self, i: usize, s: u32) {
        self.state_word(i).store(s, Ordering::Release)
    }

    fn answered_word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: aligned (8 past the state word), inside the header slot,
        // never touched by the kernel.
        unsafe { &*(self.slot(i).add(STATE_AT + 8) as *const AtomicU64) }
    }

    /// The commit id entry `i` held when it was last armed: the kernel
    /// writes a new one with every request it puts in the entry, so a
    /// different id in the header means a request nobody answered yet.
    pub fn answered(&self, i: usize) -> u64 {
        self.answered_word(i).load(Ordering::Acquire)
    }

    pub fn set_answered(&self, i: usize, id: u64) {
        self.answered_word(i).store(id, Ordering::Release)
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no entry in use any more.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.len);
        }
    }
}

/// Map `len` bytes of `file` shared, at exactly `addr` (0: anywhere).
fn map(file: &File, len: usize, addr: usize) -> io::Result<*mut u8> {
    let flags = libc::MAP_SHARED
        | if addr != 0 {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
    // SAFETY: a new shared mapping of our file; FIXED_NOREPLACE never
    // replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    if addr != 0 && p as usize != addr {
        // Old kernels ignore MAP_FIXED_NOREPLACE and treat it as a hint.
        // SAFETY: the mapping just made.
        unsafe { libc::munmap(p, len) };
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("address {addr:#x} is taken"),
        ));
    }
    Ok(p as *mut u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_adopts_the_first_ones_address_and_states() {
        let dir = tempfile::tempdir().unwrap();
        let path = RingMemory::path_beside(&dir.path().join("mnt"));
        let first = RingMemory::open(&path, 2, 2, false).unwrap();
        assert!(!first.adopted);
        first.set_state(3, state::REQUEST);
        // SAFETY: no kernel in this test.
        unsafe { first.header(3)[8] = 0x5a };
        let at = first.header_ptr(0) as usize;
        drop(first);

        let second = RingMemory::open(&path, 2, 2, true).unwrap();
        assert!(second.adopted);
        assert_eq!(second.header_ptr(0) as usize, at);
        assert_eq!(second.state(3), state::REQUEST);
        assert_eq!(second.state(2), state::ARMED);
        // SAFETY: as above.
        assert_eq!(unsafe { second.header(3)[8] }, 0x5a);
        drop(second);

        // Another geometry: a new file, nothing adopted.
        let third = RingMemory::open(&path, 1, 2, true).unwrap();
        assert!(!third.adopted);
        assert_eq!(third.state(1), state::ARMED);
    }
}
