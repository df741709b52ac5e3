//! FUSE over io_uring: the second transport. After INIT (still a read and
//! a write on `/dev/fuse`) every CPU's queue of ring entries is registered
//! with `FUSE_IO_URING_CMD_REGISTER` on the `/dev/fuse` descriptor, and
//! from then on the kernel hands requests to the entries and takes each
//! answer with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also re-arms the
//! entry: one system call per request instead of a read and a write.
//! Forgets, interrupts and notifications keep using `/dev/fuse` (the
//! classic threads stay for them).
//!
//! * [`abi`]: the wire structures as offsets; [`decode`] the requests we
//!   serve; [`reply`] their answers.
//! * [`memory`]: the entries' buffers, in a file mapped at a fixed address
//!   so a process taking over the connection answers what a dead one held.
//! * [`queue`]: a thread and an io_uring per queue.
//!
//! Negotiation ([`negotiate`]): the kernel offers `FUSE_OVER_IO_URING` in
//! INIT only while the fuse module's `enable_uring` is on; the reply fuser
//! wrote is amended to accept it, with `max_write` and `max_pages` bounding
//! a payload to [`memory::PAYLOAD`].

pub mod abi;
pub mod decode;
pub mod memory;
mod queue;
pub mod reply;

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::{FsShared, StargazeFs};
use memory::{PAYLOAD, RingMemory};

/// Entries per queue: requests one CPU's queue serves at once (a read
/// waiting for the fetcher holds its entry).
pub const ENTRIES_PER_QUEUE: usize = 16;

/// `/sys/module/fuse/parameters/enable_uring`: Some(true) when on.
pub fn module_enabled() -> Option<bool> {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .ok()
        .map(|s| s.trim() == "Y")
}

/// The kernel makes one queue per possible CPU and serves a request on the
/// queue of the CPU that sent it; all must be registered before any is used.
pub fn possible_cpus() -> usize {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut n = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let mut ends = part.split('-').map(|x| x.parse::<usize>().ok());
        match (ends.next().flatten(), ends.next().flatten()) {
            (Some(a), Some(b)) if b >= a => n = n.max(b + 1),
            (Some(a), None) => n = n.max(a + 1),
            _ => {}
        }
    }
    if n == 0 {
        std::thread::available_parallelism().map_or(1, |p| p.get())
    } else {
        n
    }
}

/// Amend fuser's INIT `reply` to take FUSE over io_uring, if the kernel's
/// `init` request offers it; true when it did.
pub fn negotiate(init: &[u8], reply: &mut [u8]) -> bool {
    use abi::{init_out, put_u16, put_u32, u32_at};
    if !decode::init_offers_uring(init) {
        return false;
    }
    let h = abi::OUT_HEADER_LEN;
    if reply.len() < h + init_out::LEN_WITH_FLAGS2 {
        return false;
    }
    let out = &mut reply[h..];
    let flags = u32_at(out, init_out::FLAGS).unwrap_or(0) | abi::FUSE_INIT_EXT;
    let flags2 = u32_at(out, init_out::FLAGS2).unwrap_or(0) | abi::FLAGS2_OVER_IO_URING;
    put_u32(out, init_out::FLAGS, flags);
    put_u32(out, init_out::FLAGS2, flags2);
    // The kernel refuses entries whose payload is smaller than max_write
    // and max_pages: bound both (this mount is read-only; reads of up to
    // 1 MiB per request are plenty).
    put_u32(out, init_out::MAX_WRITE, PAYLOAD as u32);
    put_u16(out, init_out::MAX_PAGES, (PAYLOAD / 4096) as u16);
    true
}

/// The running ring queues of a mount.
pub struct Rings {
    threads: Vec<JoinHandle<()>>,
    pub queues: usize,
}

/// Queues set up but not yet running (their io_urings exist).
pub struct Prepared {
    queues: Vec<queue::Queue>,
    mem: Arc<RingMemory>,
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("mapping the ring entries at {path}: {source}")]
    Memory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up an io_uring for FUSE queue {qid}: {source}")]
    Setup {
        qid: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Set up the rings of the mount at `mountpoint` on descriptor `dev_fd`;
/// `adopt` maps the entries a previous process left.
pub fn prepare(
    shared: &Arc<FsShared>,
    mountpoint: &Path,
    dev_fd: RawFd,
    adopt: bool,
) -> Result<Prepared, RingError> {
    let n = possible_cpus();
    let path = RingMemory::path_beside(mountpoint);
    let mem = RingMemory::open(&path, n, ENTRIES_PER_QUEUE, adopt).map_err(|source| {
        RingError::Memory {
            path: path.display().to_string(),
            source,
        }
    })?;
    let mem = Arc::new(mem);
    let queues = (0..n)
        .map(|q| {
            queue::Queue::new(
                q as u16,
                mem.clone(),
                StargazeFs {
                    shared: shared.clone(),
                },
                dev_fd,
            )
            .map_err(|source| RingError::Setup { qid: q, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared { queues, mem })
}

impl Prepared {
    /// The descriptor the queues register on (the session's, once fuser's
    /// socket has been replaced by `/dev/fuse`).
    pub fn set_dev_fd(&mut self, fd: RawFd) {
        for q in &mut self.queues {
            q.set_dev_fd(fd);
        }
    }

    /// Start a thread per queue; returns once every entry was registered
    /// (or adopted).
    pub fn start(self) -> Rings {
        let adopted = self.mem.adopted;
        let queues = self.queues.len();
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = self
            .queues
            .into_iter()
            .map(|q| {
                let tx = tx.clone();
                std::thread::Builder::new()
                    .name(format!("fuse-ring-{}", q.qid))
                    .spawn(move || q.run(tx))
                    .expect("spawning a FUSE ring thread")
            })
            .collect();
        drop(tx);
        for _ in 0..queues {
            let _ = rx.recv();
        }
        tracing::info!(
            queues,
            entries_per_queue = ENTRIES_PER_QUEUE,
            adopted,
            "FUSE over io_uring: queues registered"
        );
        Rings { threads, queues }
    }
}

impl Rings {
    /// Wait for the queues to stop (after the unmount).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// After a take-over: requests that arrived while no process served the
/// connection wait in the kernel's queues, and the kernel moves them to
/// entries only when an entry of their queue commits. A lookup of a name
/// that does not exist, from a thread on each CPU, makes every queue
/// commit once.
pub fn wake_queues(mountpoint: &Path, queues: usize) {
    let handles: Vec<_> = (0..queues)
        .map(|cpu| {
            let probe = mountpoint.join(format!(".stargaze-ring-wake-{cpu}"));
            std::thread::spawn(move || {
                // SAFETY: a cpu_set_t on the stack, filled by the libc macros.
                let pinned = unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
                };
                if pinned {
                    let _ = std::fs::symlink_metadata(&probe);
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

#[cfg(test)]
mod tests {
    use super::abi::{self, init_in, init_out, u16_at, u32_at};
    use super::*;

    fn init_request(uring: bool) -> Vec<u8> {
        let mut b = vec![0u8; abi::IN_HEADER_LEN + 64];
        let a = abi::IN_HEADER_LEN;
        abi::put_u32(&mut b, a + init_in::FLAGS, abi::FUSE_INIT_EXT);
        if uring {
            abi::put_u32(&mut b, a + init_in::FLAGS2, abi::FLAGS2_OVER_IO_URING);
        }
        b
    }

    #[test]
    fn the_init_reply_takes_io_uring_only_when_offered_and_bounds_the_payload() {
        let h = abi::OUT_HEADER_LEN;
        let mut reply = vec![0u8; h + 64];
        abi::put_u32(&mut reply, h + init_out::MAX_WRITE, 16 << 20);
        abi::put_u16(&mut reply, h + init_out::MAX_PAGES, 4096);
        abi::put_u32(&mut reply, h + init_out::FLAGS2, 1);
        let before = reply.clone();
        assert!(!negotiate(&init_request(false), &mut reply));
        assert_eq!(reply, before, "untouched when not offered");

        assert!(negotiate(&init_request(true), &mut reply));
        let out = &reply[h..];
        assert_eq!(
            u32_at(out, init_out::FLAGS2),
            Some(1 | abi::FLAGS2_OVER_IO_URING)
        );
        assert_ne!(
            u32_at(out, init_out::FLAGS).unwrap() & abi::FUSE_INIT_EXT,
            0
        );
        assert_eq!(u32_at(out, init_out::MAX_WRITE), Some(PAYLOAD as u32));
        assert_eq!(
            u16_at(out, init_out::MAX_PAGES).map(|p| p as usize * 4096),
            Some(PAYLOAD)
        );
        // A reply too short to carry flags2 (protocol < 7.36) is left alone.
        let mut short = vec![0u8; h + 24];
        assert!(!negotiate(&init_request(true), &mut short));
    }

    #[test]
    fn possible_cpus_is_at_least_one() {
        assert!(possible_cpus() >= 1);
    }
}
