//! Mount helpers.

use std::path::Path;

use stargaze_service::mountinfo;

/// Detach every mount at or below `dir` (deepest first).
pub fn unmount_all_below(dir: &Path) {
    for p in mountinfo::mount_points_under(&mountinfo::read(), dir) {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
