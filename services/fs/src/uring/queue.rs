//! One queue of the ring: a thread with its own io_uring that registers
//! the queue's entries on `/dev/fuse`, waits for the kernel to put requests
//! in them, answers each through [`crate::ops`] (at once, or from a runtime
//! task after a fetch: the answer comes back through a channel and an
//! eventfd) and commits the answer, which also re-arms the entry.
//!
//! An entry's state word (in [`RingMemory`]) says what a process taking
//! over the connection must do with it: register it (armed), answer the
//! request in it (request), or commit the answer already in it (replied).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};

use fuser::Errno;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::abi::{self, op, ring_header, u32_at, u64_at};
use super::decode::{InHeader, Request, decode};
use super::memory::{PAYLOAD, RingMemory, state};
use super::reply;
use crate::StargazeFs;
use crate::ops::{Opened, Xattr};

/// user_data of the eventfd read; entries use their index.
const WAKE: u64 = u64::MAX;

/// What a request is answered with.
pub(crate) enum Answer {
    Data(Vec<u8>),
    Error(i32),
}

impl From<Result<Vec<u8>, Errno>> for Answer {
    fn from(r: Result<Vec<u8>, Errno>) -> Answer {
        match r {
            Ok(b) => Answer::Data(b),
            Err(e) => Answer::Error(e.code()),
        }
    }
}

/// Where answers computed elsewhere are sent, and the eventfd that wakes
/// the queue's thread for them.
pub(crate) struct Mailbox {
    tx: Sender<(usize, Answer)>,
    wake: OwnedFd,
}

thread_local! {
    /// Set on a queue's thread: an answer posted from there is picked up
    /// by its loop without a wake-up.
    static ON_QUEUE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Mailbox {
    fn post(&self, entry: usize, a: Answer) {
        if self.tx.send((entry, a)).is_ok() && !ON_QUEUE_THREAD.with(|c| c.get()) {
            let one = 1u64;
            // SAFETY: an 8-byte write of a local to our eventfd.
            unsafe {
                libc::write(
                    self.wake.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                );
            }
        }
    }
}

/// A queue ready to run on its thread.
pub(crate) struct Queue {
    pub qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    mem: Arc<RingMemory>,
    fs: StargazeFs,
    dev_fd: RawFd,
    mailbox: Arc<Mailbox>,
    answers: Receiver<(usize, Answer)>,
    /// The register iovecs (header, payload) of each entry as
    /// `struct iovec { base, len }` words (plain numbers, so the queue can
    /// move to its thread); stable while the kernel reads them.
    iovecs: Box<[[[usize; 2]; 2]]>,
    wake_buf: Box<u64>,
    /// Entries whose commit or register was queued, armed once submitted.
    to_arm: Vec<usize>,
    /// Entries the kernel still knows for this process.
    live: usize,
}

impl Queue {
    /// Set up the io_uring of queue `qid` (before INIT is answered: a
    /// kernel or sandbox that refuses io_uring must not leave a connection
    /// that waits for rings that never come).
    pub fn new(
        qid: u16,
        mem: Arc<RingMemory>,
        fs: StargazeFs,
        dev_fd: RawFd,
    ) -> std::io::Result<Queue> {
        let per = mem.per_queue;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((2 * per + 2).next_power_of_two() as u32)?;
        // SAFETY: a new eventfd, owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just created.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let (tx, answers) = std::sync::mpsc::channel();
        let first = qid as usize * per;
        let iovecs = (first..first + per)
            .map(|i| {
                [
                    [mem.header_ptr(i) as usize, ring_header::LEN],
                    [mem.payload_ptr(i) as usize, PAYLOAD],
                ]
            })
            .collect();
        Ok(Queue {
            qid,
            ring,
            mem,
            fs,
            dev_fd,
            mailbox: Arc::new(Mailbox { tx, wake }),
            answers,
            iovecs,
            wake_buf: Box::new(0),
            to_arm: Vec::new(),
            live: per,
        })
    }

    pub fn set_dev_fd(&mut self, fd: RawFd) {
        self.dev_fd = fd;
    }

    fn first(&self) -> usize {
        self.qid as usize * self.mem.per_queue
    }

    /// A FUSE io_uring command for entry `i`.
    fn command(&self, i: usize, cmd_op: u32, commit_id: u64) -> squeue::Entry128 {
        let mut cmd = [0u8; 80];
        // struct fuse_uring_cmd_req { flags, commit_id, qid, padding }
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut e = opcode::UringCmd80::new(types::Fd(self.dev_fd), cmd_op)
            .cmd(cmd)
            .addr(Some(self.iovecs[i - self.first()].as_ptr() as u64))
            .build()
            .user_data(i as u64);
        if cmd_op == abi::CMD_REGISTER {
            // sqe->len: the number of iovecs (header, payload). The crate
            // has no setter for it on this opcode; the SQE is repr(C).
            // SAFETY: offset 24 of `struct io_uring_sqe` is the u32 `len`.
            unsafe {
                let p = (&mut e as *mut squeue::Entry128 as *mut u8).add(24) as *mut u32;
                p.write_unaligned(2);
            }
        }
        e
    }

    fn push(&mut self, e: squeue::Entry128) {
        loop {
            // SAFETY: the buffers the entry points at (iovecs, ring
            // memory, wake_buf) live as long as the queue.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            self.submit(0);
        }
    }

    /// Submit what is queued (waiting for `want` completions); entries
    /// committed or registered are armed from then on.
    fn submit(&mut self, want: usize) {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if want == 0 {
                        continue;
                    }
                    break;
                }
                // Completions to reap first; the entries stay queued (and
                // not armed) until a later submit takes them.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return,
                Err(e) => {
                    tracing::error!(queue = self.qid, error = %e, "io_uring_enter failed");
                    break;
                }
            }
        }
        if self.ring.submission().is_empty() {
            for i in self.to_arm.drain(..) {
                self.mem.set_state(i, state::ARMED);
            }
        }
    }

    /// The commit id the kernel wrote into entry `i` with its last request.
    fn commit_id(&self, i: usize) -> u64 {
        // SAFETY: a read of the header; the caller owns the entry.
        u64_at(unsafe { self.mem.header(i) }, ring_header::COMMIT_ID).unwrap_or(0)
    }

    fn register(&mut self, i: usize) {
        // Whatever the buffer holds now is no request for this process.
        self.mem.set_answered(i, self.commit_id(i));
        let e = self.command(i, abi::CMD_REGISTER, 0);
        self.to_arm.push(i);
        self.push(e);
    }

    fn commit(&mut self, i: usize) {
        let id = self.commit_id(i);
        let e = self.command(i, abi::CMD_COMMIT_AND_FETCH, id);
        self.to_arm.push(i);
        self.push(e);
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.mailbox.wake.as_raw_fd()),
            &mut *self.wake_buf as *mut u64 as *mut u8,
            8,
        )
        .build()
        .user_data(WAKE);
        self.push(e.into());
    }

    /// Write `a` into entry `i` and commit it.
    fn answer(&mut self, i: usize, a: Answer) {
        // SAFETY: entry `i` holds a request: ours until committed.
        let (hdr, payload) = unsafe { (self.mem.header(i), self.mem.payload(i)) };
        let (error, len) = match a {
            Answer::Data(b) if b.len() <= PAYLOAD => {
                payload[..b.len()].copy_from_slice(&b);
                (0, b.len())
            }
            Answer::Data(_) => (-libc::EIO, 0),
            Answer::Error(e) => (-e, 0),
        };
        // struct fuse_out_header { len, error, unique }: `unique` is where
        // the in header has it.
        abi::put_u32(hdr, 0, (abi::OUT_HEADER_LEN + len) as u32);
        abi::put_u32(hdr, 4, error as u32);
        abi::put_u32(hdr, ring_header::PAYLOAD_SZ, len as u32);
        self.mem.set_answered(i, self.commit_id(i));
        self.mem.set_state(i, state::REPLIED);
        self.commit(i);
    }

    /// Serve the request the kernel put in entry `i`.
    fn serve(&mut self, i: usize) {
        self.mem.set_state(i, state::REQUEST);
        self.fs
            .shared
            .uring_requests
            .fetch_add(1, Ordering::Relaxed);
        let answer = self.dispatch(i);
        if let Some(a) = answer {
            self.answer(i, a);
        }
    }

    fn dispatch(&self, i: usize) -> Option<Answer> {
        // SAFETY: entry `i` holds a request: ours until committed.
        let (hdr, payload) = unsafe { (self.mem.header(i), self.mem.payload(i)) };
        let Some(h) = InHeader::parse(&hdr[ring_header::IN_OUT..]) else {
            return Some(Answer::Error(libc::EIO));
        };
        let op_in = &hdr[ring_header::OP_IN..ring_header::OP_IN + ring_header::OP_IN_LEN];
        let n = (u32_at(hdr, ring_header::PAYLOAD_SZ).unwrap_or(0) as usize).min(PAYLOAD);
        let req = match decode(h.opcode, op_in, &payload[..n]) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "a malformed FUSE request on the ring: EIO");
                return Some(Answer::Error(libc::EIO));
            }
        };
        let fs = &self.fs;
        let ino = h.nodeid;
        let data = |b: Vec<u8>| Some(Answer::Data(b));
        let error = |e: Errno| Some(Answer::Error(e.code()));
        match req {
            Request::Lookup { name } => match fs.op_lookup(ino, name) {
                Ok((a, ttl)) => data(reply::entry(&a, ttl)),
                Err(e) => error(e),
            },
            Request::Getattr => match fs.op_getattr(ino) {
                Ok((a, ttl)) => data(reply::attr(&a, ttl)),
                Err(e) => error(e),
            },
            Request::Readlink => Some(fs.op_readlink(ino).into()),
            Request::Open { flags } => match fs.op_open(ino, flags, h.unique) {
                Ok(Opened::Cached { fh }) => data(reply::open(fh, abi::FOPEN_KEEP_CACHE, 0)),
                Ok(Opened::Passthrough { fh, backing_id }) => {
                    data(reply::open(fh, abi::FOPEN_PASSTHROUGH, backing_id))
                }
                Err(e) => error(e),
            },
            Request::Opendir => data(reply::open(0, 0, 0)),
            Request::Read { fh, offset, size } => {
                let mailbox = self.mailbox.clone();
                fs.op_read(ino, fh, offset, size, move |r| mailbox.post(i, r.into()));
                None
            }
            Request::Release { fh } => {
                fs.op_release(ino, fh);
                data(Vec::new())
            }
            Request::Releasedir | Request::Flush => data(Vec::new()),
            Request::Access => {
                fs.op_access();
                data(Vec::new())
            }
            Request::Readdir { offset, size, plus } => {
                let mut l = reply::Listing::new(size.min(PAYLOAD as u32), plus);
                let listed = fs.op_readdir(ino, offset, plus, |e| {
                    let attr = e.attr.as_ref().map(|(a, ttl)| (a, *ttl));
                    l.add(e.ino, e.next, e.kind, e.name, attr)
                });
                match listed {
                    Ok(()) => data(l.into_bytes()),
                    Err(e) => error(e),
                }
            }
            Request::Statfs => {
                fs.op_statfs();
                data(reply::statfs(4096, 255))
            }
            Request::Getxattr { name, size } => match fs.op_getxattr(ino, name, size) {
                Ok(Xattr::Size(n)) => data(reply::xattr_size(n)),
                Ok(Xattr::Data(v)) => data(v),
                Err(e) => error(e),
            },
            Request::Listxattr { size } => match fs.op_listxattr(ino, size) {
                Ok(Xattr::Size(n)) => data(reply::xattr_size(n)),
                Ok(Xattr::Data(v)) => data(v),
                Err(e) => error(e),
            },
            Request::Unsupported(code) => {
                if !matches!(
                    code,
                    op::INIT | op::DESTROY | op::FORGET | op::BATCH_FORGET | op::INTERRUPT
                ) {
                    tracing::debug!(opcode = code, "FUSE request not served: ENOSYS");
                }
                Some(Answer::Error(libc::ENOSYS))
            }
        }
    }

    /// Register the queue's entries, or take over those a previous
    /// process left: answer the requests it was serving, commit the
    /// answers it had written.
    fn start(&mut self) -> (usize, usize) {
        let (mut adopted, mut registered) = (0, 0);
        for i in self.first()..self.first() + self.mem.per_queue {
            // A request the kernel put in the entry after its last answer
            // or registration, whatever the state word says (the process
            // may have died between the two).
            let unanswered = self.commit_id(i) != self.mem.answered(i);
            match (self.mem.adopted, self.mem.state(i)) {
                (true, state::REQUEST) => {
                    adopted += 1;
                    self.serve(i);
                }
                (true, _) if unanswered => {
                    adopted += 1;
                    self.serve(i);
                }
                (true, state::REPLIED) => {
                    adopted += 1;
                    self.commit(i);
                }
                _ => {
                    registered += 1;
                    self.register(i);
                }
            }
        }
        self.arm_wake();
        self.submit(0);
        (adopted, registered)
    }

    /// Serve until the connection ends (every entry torn down).
    pub fn run(mut self, started: Sender<()>) {
        ON_QUEUE_THREAD.with(|c| c.set(true));
        let (adopted, registered) = self.start();
        if adopted > 0 {
            tracing::info!(
                queue = self.qid,
                adopted,
                "answering the requests the previous process held in its ring entries"
            );
        }
        tracing::debug!(queue = self.qid, registered, "FUSE ring queue registered");
        let _ = started.send(());
        drop(started);
        let mut done = Vec::new();
        while self.live > 0 {
            self.submit(1);
            while let Ok((i, a)) = self.answers.try_recv() {
                self.answer(i, a);
            }
            done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (ud, res) in done.drain(..) {
                if ud == WAKE {
                    self.arm_wake();
                    continue;
                }
                let i = ud as usize;
                match res {
                    0 => self.serve(i),
                    // A commit the kernel does not know (answered before a
                    // take-over): the entry is new to this process.
                    r if r == -libc::ENOENT => self.register(i),
                    r => {
                        self.live -= 1;
                        if !matches!(-r, libc::ENOTCONN | libc::ECONNABORTED | libc::ENODEV) {
                            tracing::warn!(
                                queue = self.qid,
                                entry = i,
                                error = %std::io::Error::from_raw_os_error(-r),
                                "a FUSE ring entry failed"
                            );
                        }
                    }
                }
            }
            while let Ok((i, a)) = self.answers.try_recv() {
                self.answer(i, a);
            }
        }
        tracing::debug!(queue = self.qid, "FUSE ring queue stopped");
    }
}
