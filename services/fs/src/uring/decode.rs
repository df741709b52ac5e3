//! Requests as the kernel puts them in a ring entry: the in header, the
//! operation's header (`op_in`) and the rest of its arguments (names) in
//! the payload. Decoded defensively: a short or unknown request is an
//! error the caller answers with EIO or ENOSYS, never a panic.

use super::abi::{self, op, u32_at, u64_at};

/// `struct fuse_in_header`, the fields we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        Some(InHeader {
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        })
    }
}

/// A request this filesystem serves.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a> {
    Lookup {
        name: &'a [u8],
    },
    Getattr,
    Readlink,
    Open {
        flags: i32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Release {
        fh: u64,
    },
    Flush,
    Opendir,
    Releasedir,
    Readdir {
        offset: u64,
        size: u32,
        plus: bool,
    },
    Statfs,
    Getxattr {
        name: &'a [u8],
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Access,
    /// Known to the protocol, not served by this read-only filesystem.
    Unsupported(u32),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("opcode {0}: request shorter than its arguments")]
    Short(u32),
    #[error("opcode {0}: a name without its terminating NUL")]
    Unterminated(u32),
}

/// A NUL-terminated name at the start of `payload`.
fn name(opcode: u32, payload: &[u8]) -> Result<&[u8], DecodeError> {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::Unterminated(opcode))?;
    Ok(&payload[..end])
}

/// Decode the request of `opcode` from its operation header and payload.
pub fn decode<'a>(
    opcode: u32,
    op_in: &'a [u8],
    payload: &'a [u8],
) -> Result<Request<'a>, DecodeError> {
    let short = || DecodeError::Short(opcode);
    Ok(match opcode {
        op::LOOKUP => Request::Lookup {
            name: name(opcode, payload)?,
        },
        op::GETATTR => Request::Getattr,
        op::READLINK => Request::Readlink,
        // struct fuse_open_in { flags, open_flags }
        op::OPEN => Request::Open {
            flags: u32_at(op_in, 0).ok_or_else(short)? as i32,
        },
        op::OPENDIR => Request::Opendir,
        // struct fuse_read_in { fh, offset, size, read_flags, lock_owner, flags, padding }
        op::READ | op::READDIR | op::READDIRPLUS => {
            let fh = u64_at(op_in, 0).ok_or_else(short)?;
            let offset = u64_at(op_in, 8).ok_or_else(short)?;
            let size = u32_at(op_in, 16).ok_or_else(short)?;
            match opcode {
                op::READ => Request::Read { fh, offset, size },
                _ => Request::Readdir {
                    offset,
                    size,
                    plus: opcode == op::READDIRPLUS,
                },
            }
        }
        // struct fuse_release_in { fh, flags, release_flags, lock_owner }
        op::RELEASE => Request::Release {
            fh: u64_at(op_in, 0).ok_or_else(short)?,
        },
        op::RELEASEDIR => Request::Releasedir,
        op::FLUSH => Request::Flush,
        op::STATFS => Request::Statfs,
        // struct fuse_getxattr_in { size, padding }, then the name
        op::GETXATTR => Request::Getxattr {
            size: u32_at(op_in, 0).ok_or_else(short)?,
            name: name(opcode, payload)?,
        },
        op::LISTXATTR => Request::Listxattr {
            size: u32_at(op_in, 0).ok_or_else(short)?,
        },
        op::ACCESS => Request::Access,
        other => Request::Unsupported(other),
    })
}

/// Whether the kernel's INIT request offers FUSE over io_uring (it does
/// only while the fuse module's `enable_uring` is on).
pub fn init_offers_uring(init: &[u8]) -> bool {
    let args = init.get(abi::IN_HEADER_LEN..).unwrap_or_default();
    let flags = u32_at(args, abi::init_in::FLAGS).unwrap_or(0);
    let flags2 = u32_at(args, abi::init_in::FLAGS2).unwrap_or(0);
    flags & abi::FUSE_INIT_EXT != 0 && flags2 & abi::FLAGS2_OVER_IO_URING != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        abi::put_u64(&mut b, 0, fh);
        abi::put_u64(&mut b, 8, offset);
        abi::put_u32(&mut b, 16, size);
        b
    }

    #[test]
    fn reads_and_listings_take_their_arguments_from_the_op_header() {
        let h = read_in(7, 4096, 131072);
        assert_eq!(
            decode(op::READ, &h, &[]),
            Ok(Request::Read {
                fh: 7,
                offset: 4096,
                size: 131072
            })
        );
        assert_eq!(
            decode(op::READDIRPLUS, &h, &[]),
            Ok(Request::Readdir {
                offset: 4096,
                size: 131072,
                plus: true
            })
        );
    }

    #[test]
    fn names_come_from_the_payload_up_to_their_nul() {
        assert_eq!(
            decode(op::LOOKUP, &[], b"etc\0junk"),
            Ok(Request::Lookup { name: b"etc" })
        );
        let mut x = vec![0u8; 8];
        abi::put_u32(&mut x, 0, 64);
        assert_eq!(
            decode(op::GETXATTR, &x, b"user.a\0"),
            Ok(Request::Getxattr {
                name: b"user.a",
                size: 64
            })
        );
    }

    #[test]
    fn short_or_unterminated_requests_are_errors_not_panics() {
        assert_eq!(
            decode(op::READ, &[0u8; 10], &[]),
            Err(DecodeError::Short(op::READ))
        );
        assert_eq!(
            decode(op::LOOKUP, &[], b"abc"),
            Err(DecodeError::Unterminated(op::LOOKUP))
        );
        assert_eq!(
            decode(op::OPEN, &[], &[]),
            Err(DecodeError::Short(op::OPEN))
        );
        assert_eq!(decode(999, &[], &[]), Ok(Request::Unsupported(999)));
        assert_eq!(InHeader::parse(&[0u8; 12]), None);
    }

    #[test]
    fn uring_is_offered_only_with_init_ext_and_the_flags2_bit() {
        let mut init = vec![0u8; abi::IN_HEADER_LEN + 64];
        assert!(!init_offers_uring(&init));
        let a = abi::IN_HEADER_LEN;
        abi::put_u32(
            &mut init,
            a + abi::init_in::FLAGS2,
            abi::FLAGS2_OVER_IO_URING,
        );
        assert!(!init_offers_uring(&init));
        abi::put_u32(&mut init, a + abi::init_in::FLAGS, abi::FUSE_INIT_EXT);
        assert!(init_offers_uring(&init));
        assert!(!init_offers_uring(&init[..20]));
    }
}
