//! The FUSE wire format this transport speaks (`include/uapi/linux/fuse.h`,
//! protocol 7.45): opcodes, the layouts of the structures we decode and
//! encode as byte offsets, the io_uring ring-entry header, and
//! little-endian-free native readers (the kernel and we share the CPU).

/// Opcodes (`enum fuse_opcode`) this filesystem answers, and the ones it
/// must recognise to refuse.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

/// `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;

/// `FUSE_INIT_EXT` (flags) and `FUSE_OVER_IO_URING` (bit 41: flags2 bit 9).
pub const FUSE_INIT_EXT: u32 = 1 << 30;
pub const FLAGS2_OVER_IO_URING: u32 = 1 << (41 - 32);

/// Offsets in `struct fuse_init_in` (after the in header).
pub mod init_in {
    pub const FLAGS: usize = 12;
    pub const FLAGS2: usize = 16;
}

/// Offsets in `struct fuse_init_out` (after the out header).
pub mod init_out {
    pub const FLAGS: usize = 12;
    pub const MAX_WRITE: usize = 20;
    pub const MAX_PAGES: usize = 28;
    pub const FLAGS2: usize = 32;
    /// The shortest reply that has `flags2` (protocol >= 7.36).
    pub const LEN_WITH_FLAGS2: usize = 36;
}

/// `FOPEN_KEEP_CACHE`, `FOPEN_PASSTHROUGH`.
pub const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `struct fuse_attr`.
pub const ATTR_LEN: usize = 88;
/// `struct fuse_entry_out`: 40 bytes then the attributes.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// `struct fuse_attr_out`: 16 bytes then the attributes.
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
/// `struct fuse_dirent` without its name.
pub const DIRENT_LEN: usize = 24;

/// io_uring commands on `/dev/fuse` (`enum fuse_uring_cmd`).
pub const CMD_REGISTER: u32 = 1;
pub const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: the in/out header (128 bytes), the
/// operation's own header (128 bytes), then `struct fuse_uring_ent_in_out`.
pub mod ring_header {
    pub const IN_OUT: usize = 0;
    pub const OP_IN: usize = 128;
    pub const OP_IN_LEN: usize = 128;
    pub const ENT_IN_OUT: usize = 256;
    /// `fuse_uring_ent_in_out.commit_id` and `.payload_sz`.
    pub const COMMIT_ID: usize = ENT_IN_OUT + 8;
    pub const PAYLOAD_SZ: usize = ENT_IN_OUT + 16;
    /// sizeof(struct fuse_uring_req_header).
    pub const LEN: usize = ENT_IN_OUT + 32;
}

/// Native-endian reads that fail, not panic, past the end.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}
