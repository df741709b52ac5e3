//! Which of a TOC's xattrs the mount shows: those containerd's own unpack
//! of the layer leaves on the file, so that a lazily pulled rootfs equals
//! the unpacked one and a layer cannot steer overlayfs with its xattrs.
//!
//! containerd 1.6's applier (`archive/tar.go` `createTarFile`,
//! `tar_unix.go` `setxattr`) sets every `SCHILY.xattr.*` record with
//! `lsetxattr` as root and skips the two refusals it expects:
//! * `trusted.*`: refused by containerd itself ("admin attributes from
//!   archive not supported", ENOTSUP). These are overlayfs's own
//!   (`trusted.overlay.redirect`, `.opaque`, `.metacopy`, `.whiteout`): a
//!   lower layer carrying them would change what the merged rootfs shows.
//! * `user.*` on anything but a regular file or directory: the kernel
//!   refuses it (EPERM) and containerd skips it.
//!
//! Linux knows no namespace besides `user`, `trusted`, `security` and
//! `system` (the POSIX ACLs): any other name is refused with EOPNOTSUPP,
//! which containerd skips as well.

use stargaze_format::NodeKind;

/// Whether containerd's unpack leaves the xattr `name` on a node of `kind`.
pub(crate) fn kept_by_unpack(name: &str, kind: NodeKind) -> bool {
    let Some((namespace, rest)) = name.split_once('.') else {
        return false;
    };
    if rest.is_empty() {
        return false;
    }
    match namespace {
        "trusted" => false,
        "user" => matches!(kind, NodeKind::Reg | NodeKind::Dir),
        "security" => true,
        "system" => matches!(rest, "posix_acl_access" | "posix_acl_default"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_containerd_sets_stays() {
        for kind in [NodeKind::Reg, NodeKind::Dir] {
            assert!(kept_by_unpack("user.comment", kind));
            assert!(kept_by_unpack("security.capability", kind));
            assert!(kept_by_unpack("system.posix_acl_access", kind));
        }
        assert!(kept_by_unpack("security.capability", NodeKind::Symlink));
    }

    #[test]
    fn what_containerd_refuses_or_the_kernel_rejects_goes() {
        for name in [
            "trusted.overlay.redirect",
            "trusted.overlay.opaque",
            "trusted.overlay.metacopy",
            "trusted.overlay.whiteout",
            "trusted.anything",
            "foo",
            "invalid-utf8",
            "gnu.x",
            "system.nfs4_acl",
            "user.",
            ".user",
        ] {
            assert!(!kept_by_unpack(name, NodeKind::Reg), "{name}");
            assert!(!kept_by_unpack(name, NodeKind::Dir), "{name}");
        }
        for kind in [
            NodeKind::Symlink,
            NodeKind::Char,
            NodeKind::Block,
            NodeKind::Fifo,
        ] {
            assert!(!kept_by_unpack("user.comment", kind), "{kind:?}");
        }
    }
}
