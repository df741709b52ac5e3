//! Content-file writes through one io_uring on a dedicated thread: the
//! first design of `cache_io = "io_uring"`, replaced by [`crate::rings`]
//! (a ring per writing thread) and kept for the benchmark's comparison
//! ([`crate::Cache::use_io_uring_thread`]).
//!
//! One dedicated thread owns the ring. Writers hand it a job (descriptor,
//! bytes, offset) over a channel and block until the write completed, as a
//! `pwrite` would; the thread drains whatever jobs are queued, submits them
//! in one `io_uring_enter`, resubmits the rest of short writes, and answers
//! each writer. The gain over `pwrite` is one system call for many
//! concurrent writes; the cost is a thread hop per write (`make bench` shows
//! which wins on a node).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use io_uring::{IoUring, opcode, types};

/// Submission queue size, and the most writes submitted at once.
const RING_ENTRIES: u32 = 64;

struct Job {
    fd: RawFd,
    ptr: *const u8,
    len: usize,
    offset: u64,
    done: Sender<io::Result<()>>,
}

// SAFETY: `ptr` points into a slice the submitting thread keeps borrowed
// (it blocks in `write_all_at` until `done` is answered), and the descriptor
// stays open for the same reason.
unsafe impl Send for Job {}

/// The handle writers use; cheap to clone through `Arc`.
pub struct UringWriter {
    jobs: Sender<Job>,
}

impl std::fmt::Debug for UringWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UringWriter")
    }
}

impl UringWriter {
    /// Set up the ring and start its thread. Fails where io_uring is not
    /// available (old kernel, `io_uring_disabled`, a seccomp filter).
    pub fn start() -> io::Result<Arc<UringWriter>> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let (tx, rx) = unbounded();
        std::thread::Builder::new()
            .name("cache-uring".into())
            .spawn(move || run(ring, rx))?;
        Ok(Arc::new(UringWriter { jobs: tx }))
    }

    /// Write all of `data` at `offset` of `file`; returns when the kernel
    /// has the bytes (like `pwrite`).
    pub fn write_all_at(&self, file: &std::fs::File, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let (done, result) = bounded(1);
        self.jobs
            .send(Job {
                fd: file.as_raw_fd(),
                ptr: data.as_ptr(),
                len: data.len(),
                offset,
                done,
            })
            .map_err(|_| io::Error::other("the cache's io_uring thread has stopped"))?;
        result
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the cache's io_uring thread has stopped")))
    }
}

fn run(mut ring: IoUring, jobs: Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < RING_ENTRIES as usize {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let results = write_batch(&mut ring, &batch);
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.done.send(result);
        }
    }
}

/// Submit every job, resubmitting the remainder of short writes, until each
/// is written or failed.
fn write_batch(ring: &mut IoUring, batch: &[Job]) -> Vec<io::Result<()>> {
    let mut written = vec![0usize; batch.len()];
    let mut results: Vec<Option<io::Result<()>>> = batch.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    while !pending.is_empty() {
        {
            let mut sq = ring.submission();
            for &i in &pending {
                let j = &batch[i];
                let done = written[i];
                let len = u32::try_from(j.len - done).unwrap_or(u32::MAX);
                // SAFETY: see `Job`; the buffer outlives the operation.
                let entry = opcode::Write::new(types::Fd(j.fd), unsafe { j.ptr.add(done) }, len)
                    .offset(j.offset + done as u64)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the entry's buffer and descriptor stay valid until
                // its completion is reaped below. The queue holds
                // RING_ENTRIES and a batch is never larger.
                if unsafe { sq.push(&entry) }.is_err() {
                    results[i] = Some(Err(io::Error::other("io_uring submission queue full")));
                }
            }
        }
        let expected = pending.iter().filter(|&&i| results[i].is_none()).count();
        loop {
            match ring.submit_and_wait(expected) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The ring itself failed: report it for every write in
                    // flight (their completions will never be reaped).
                    let kind = e.kind();
                    for &i in &pending {
                        results[i].get_or_insert_with(|| Err(io::Error::new(kind, e.to_string())));
                    }
                    return finish(results);
                }
            }
        }
        let mut again = Vec::new();
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            let r = cqe.result();
            if r < 0 {
                results[i] = Some(Err(io::Error::from_raw_os_error(-r)));
            } else if r == 0 {
                results[i] = Some(Err(io::ErrorKind::WriteZero.into()));
            } else {
                written[i] += r as usize;
                if written[i] >= batch[i].len {
                    results[i] = Some(Ok(()));
                } else {
                    again.push(i);
                }
            }
        }
        pending = again;
    }
    finish(results)
}

/// Every job has its result by now; a missing one must never read as a
/// successful write (its chunk would be published without its bytes).
fn finish(results: Vec<Option<io::Result<()>>>) -> Vec<io::Result<()>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(io::Error::other("io_uring write without a completion"))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn concurrent_writes_land_where_asked() {
        // CI's kernel offers io_uring: where it is refused the test fails
        // rather than passing without having written anything.
        let w = UringWriter::start().unwrap_or_else(|e| {
            panic!(
                "this test needs io_uring, which this machine refuses ({e}): \
                 set /proc/sys/kernel/io_uring_disabled to 0 and run outside \
                 seccomp profiles that block io_uring_setup"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        const BLOCK: usize = 64 << 10;
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let (w, file) = (w.clone(), file.clone());
                std::thread::spawn(move || {
                    for k in 0..16u64 {
                        let data = vec![t.wrapping_mul(31).wrapping_add(k as u8); BLOCK];
                        let offset = (k * 8 + t as u64) * BLOCK as u64;
                        w.write_all_at(&file, &data, offset).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut buf = vec![0u8; BLOCK];
        for t in 0..8u8 {
            for k in 0..16u64 {
                file.read_exact_at(&mut buf, (k * 8 + t as u64) * BLOCK as u64)
                    .unwrap();
                let want = t.wrapping_mul(31).wrapping_add(k as u8);
                assert!(buf.iter().all(|&b| b == want), "block {t}/{k}");
            }
        }
        // Errors come back to the writer: a read-only descriptor.
        let ro = std::fs::File::open(dir.path().join("f")).unwrap();
        assert!(w.write_all_at(&ro, b"x", 0).is_err());
    }
}
