//! Content-file writes through a ring per writing thread
//! (`[fetcher] cache_io = "io_uring"`).
//!
//! Each thread that writes owns an io_uring (thread-local, set up with
//! `IORING_SETUP_SINGLE_ISSUER` and `IORING_SETUP_DEFER_TASKRUN` where the
//! kernel has them), so there is no thread hop and no lock. A [`Batch`]
//! queues the writes of one decoded member without waiting for any of them;
//! [`Batch::finish`] submits what is queued, waits for every completion,
//! resubmits the rest of short writes and returns one result per write.
//! The caller publishes a chunk only after its write came back complete.
//!
//! Descriptors are plain (not registered): a content file takes about one
//! write in its life (one chunk per small file), so registering it would add
//! a system call per write instead of saving one.

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, types};
use nix::libc;

/// Submission queue size: the most writes in flight on one ring.
const RING_ENTRIES: u32 = 64;

thread_local! {
    /// This thread's ring, while no [`Batch`] has it out.
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// A new ring, with the single-issuer and deferred-task-run flags when the
/// kernel takes them (Linux >= 6.1), plain otherwise.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// Whether this machine gives io_uring to this process (sets up the
/// calling thread's ring).
pub fn probe() -> io::Result<()> {
    let ring = take_ring()?;
    put_ring(ring);
    Ok(())
}

fn take_ring() -> io::Result<IoUring> {
    match RING.with(|r| r.borrow_mut().take()) {
        Some(r) => Ok(r),
        None => new_ring(),
    }
}

fn put_ring(ring: IoUring) {
    RING.with(|r| *r.borrow_mut() = Some(ring));
}

struct Op {
    fd: RawFd,
    ptr: *const u8,
    len: usize,
    offset: u64,
    written: usize,
    result: Option<io::Result<()>>,
}

/// Writes queued on this thread's ring. Every buffer and file handed to
/// [`Batch::write`] stays borrowed for `'a`, and the batch does not give
/// them back (finish or drop) before the kernel is done with each.
pub struct Batch<'a> {
    ring: Option<IoUring>,
    ops: Vec<Op>,
    /// Indices into `ops` queued but not yet submitted.
    queued: Vec<usize>,
    /// Submitted and not yet completed.
    in_flight: usize,
    _borrows: PhantomData<&'a [u8]>,
}

impl<'a> Batch<'a> {
    /// Take this thread's ring (set up on first use). Fails where io_uring
    /// is refused.
    pub fn new() -> io::Result<Batch<'a>> {
        Ok(Batch {
            ring: Some(take_ring()?),
            ops: Vec::new(),
            queued: Vec::new(),
            in_flight: 0,
            _borrows: PhantomData,
        })
    }

    /// Queue a write of all of `data` at `offset` of `file`; its result is
    /// the same index of [`Batch::finish`]'s. Nothing waits here: the
    /// write goes to the kernel with the next full queue or `finish`.
    pub fn write(&mut self, file: &'a std::fs::File, data: &'a [u8], offset: u64) -> usize {
        let i = self.ops.len();
        self.ops.push(Op {
            fd: file.as_raw_fd(),
            ptr: data.as_ptr(),
            len: data.len(),
            offset,
            written: 0,
            result: data.is_empty().then_some(Ok(())),
        });
        if !data.is_empty() {
            self.queued.push(i);
            if self.queued.len() + self.in_flight >= RING_ENTRIES as usize {
                // A full ring: wait for what is in flight so that the
                // completion queue cannot overflow.
                self.round();
            }
        }
        i
    }

    /// Submit everything queued and wait for every write; one result per
    /// [`Batch::write`], in order.
    pub fn finish(mut self) -> Vec<io::Result<()>> {
        while !self.queued.is_empty() || self.in_flight > 0 {
            self.round();
        }
        std::mem::take(&mut self.ops)
            .into_iter()
            .map(|op| {
                // Every write has its result by now; a missing one must
                // never read as success (its chunk would be published
                // without its bytes).
                op.result
                    .unwrap_or_else(|| Err(io::Error::other("io_uring write without a completion")))
            })
            .collect()
    }

    /// Push the queued writes, submit them, wait for everything in flight
    /// and reap it; short writes are queued again.
    fn round(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        {
            let mut sq = ring.submission();
            for &i in &self.queued {
                let op = &self.ops[i];
                let len = u32::try_from(op.len - op.written).unwrap_or(u32::MAX);
                // SAFETY: `written < len`, so the pointer stays inside the
                // buffer `write` borrowed for `'a`.
                let ptr = unsafe { op.ptr.add(op.written) };
                let entry = opcode::Write::new(types::Fd(op.fd), ptr, len)
                    .offset(op.offset + op.written as u64)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the buffer and the descriptor are borrowed for
                // `'a`, and neither `finish` nor `drop` returns before this
                // entry's completion is reaped (or the process aborts). The
                // queue has room: `write` never lets queued + in flight
                // exceed its size.
                if unsafe { sq.push(&entry) }.is_err() {
                    self.ops[i].result =
                        Some(Err(io::Error::other("io_uring submission queue full")));
                } else {
                    self.in_flight += 1;
                }
            }
        }
        self.queued.clear();
        let mut failures = 0;
        loop {
            match ring.submit_and_wait(self.in_flight) {
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) && failures < 1000 =>
                {
                    failures += 1;
                    // EAGAIN/EBUSY: completions to reap first.
                    if Self::reap(ring, &mut self.ops, &mut self.queued, &mut self.in_flight) == 0
                        && e.raw_os_error() != Some(libc::EINTR)
                    {
                        std::thread::yield_now();
                    }
                    if self.in_flight == 0 {
                        break;
                    }
                }
                Err(e) => {
                    // The ring itself failed with writes in flight whose
                    // buffers the kernel may still read: giving the
                    // buffers back could write freed memory into the cache,
                    // so stop here.
                    eprintln!(
                        "stargaze-cache: io_uring failed with {} writes in flight ({e}): aborting",
                        self.in_flight
                    );
                    std::process::abort();
                }
            }
        }
        Self::reap(ring, &mut self.ops, &mut self.queued, &mut self.in_flight);
    }

    /// Take the completions that are in; returns how many.
    fn reap(
        ring: &mut IoUring,
        ops: &mut [Op],
        queued: &mut Vec<usize>,
        in_flight: &mut usize,
    ) -> usize {
        let mut n = 0;
        for cqe in ring.completion() {
            n += 1;
            *in_flight -= 1;
            let i = cqe.user_data() as usize;
            let r = cqe.result();
            let op = &mut ops[i];
            if r < 0 {
                op.result = Some(Err(io::Error::from_raw_os_error(-r)));
            } else if r == 0 {
                op.result = Some(Err(io::ErrorKind::WriteZero.into()));
            } else {
                op.written += r as usize;
                if op.written >= op.len {
                    op.result = Some(Ok(()));
                } else {
                    queued.push(i);
                }
            }
        }
        n
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // Not finished (a panic, an early return): nothing queued goes to
        // the kernel, but what is in flight is waited for before the
        // borrows end.
        self.queued.clear();
        while self.in_flight > 0 {
            self.round();
        }
        if let Some(ring) = self.ring.take() {
            put_ring(ring);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn ring_or_panic() -> Batch<'static> {
        // CI's kernel offers io_uring: where it is refused the test fails
        // rather than passing without having written anything.
        Batch::new().unwrap_or_else(|e| {
            panic!(
                "this test needs io_uring, which this machine refuses ({e}): \
                 set /proc/sys/kernel/io_uring_disabled to 0 and run outside \
                 seccomp profiles that block io_uring_setup"
            )
        })
    }

    #[test]
    fn batched_writes_land_where_asked_with_one_result_each() {
        drop(ring_or_panic());
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join(name))
                .unwrap()
        };
        let (a, b) = (open("a"), open("b"));
        let ro = std::fs::File::open(dir.path().join("a")).unwrap();
        const BLOCK: usize = 64 << 10;
        // More writes than the ring has entries, on several threads, each
        // with its own ring.
        let blocks: Vec<Vec<u8>> = (0..200u32).map(|k| vec![k as u8; BLOCK]).collect();
        std::thread::scope(|s| {
            for t in 0..2usize {
                let (a, b, ro, blocks) = (&a, &b, &ro, &blocks);
                s.spawn(move || {
                    let mut batch = Batch::new().unwrap();
                    let mut bad = Vec::new();
                    for (k, data) in blocks.iter().enumerate().filter(|(k, _)| k % 2 == t) {
                        let f = if k % 3 == 0 { a } else { b };
                        batch.write(f, data, (k * BLOCK) as u64);
                        if k % 50 == 1 {
                            bad.push(batch.write(ro, b"x", 0));
                        }
                    }
                    let empty = batch.write(a, &[], 0);
                    let results = batch.finish();
                    for (i, r) in results.iter().enumerate() {
                        assert_eq!(r.is_err(), bad.contains(&i), "write {i}: {r:?}");
                    }
                    assert!(results[empty].is_ok());
                });
            }
        });
        let mut buf = vec![0u8; BLOCK];
        for k in 0..200usize {
            let f = if k % 3 == 0 { &a } else { &b };
            f.read_exact_at(&mut buf, (k * BLOCK) as u64).unwrap();
            assert!(buf.iter().all(|&x| x == k as u8), "block {k}");
        }
        // The ring went back to the thread-local slot and is used again.
        let mut batch = Batch::new().unwrap();
        batch.write(&a, b"again", 0);
        assert!(batch.finish()[0].is_ok());
    }

    #[test]
    fn a_dropped_batch_waits_for_what_it_submitted() {
        drop(ring_or_panic());
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("f")).unwrap();
        let data = vec![7u8; 1 << 20];
        {
            let mut batch = Batch::new().unwrap();
            for k in 0..RING_ENTRIES as u64 + 3 {
                batch.write(&f, &data, k << 20);
            }
            // Dropped unfinished: the writes that reached the kernel (a full
            // ring's worth) are reaped before `data` may go.
        }
        let len = f.metadata().unwrap().len();
        assert!(len >= u64::from(RING_ENTRIES) << 20, "{len}");
        let mut batch = Batch::new().unwrap();
        batch.write(&f, b"x", 0);
        assert!(batch.finish()[0].is_ok());
    }
}
