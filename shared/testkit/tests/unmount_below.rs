//! `unmount_below` detaches what is mounted at and under a directory, and
//! leaves a sibling whose name merely starts with the directory's alone.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// Detaches whatever the test left mounted, even when it fails.
struct Mounted<'a>(Vec<&'a Path>);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            while nix::mount::umount2(*p, MntFlags::MNT_DETACH).is_ok() {}
        }
    }
}

fn mount_tmpfs(at: &Path) {
    nix::mount::mount(
        Some("stargaze-test"),
        at,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mounting a tmpfs at {}: {e}", at.display()));
}

fn is_mount_point(p: &Path) -> bool {
    let parent = p.parent().expect("a parent");
    std::fs::metadata(p).unwrap().dev() != std::fs::metadata(parent).unwrap().dev()
}

#[test]
fn unmounts_a_directory_and_below_but_not_its_prefix_sibling() {
    stargaze_testkit::require_that(
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() } == 0,
        "root, to mount tmpfs",
        "run the tests as root, as CI does",
    );
    let dir = tempfile::tempdir().unwrap();
    let (mnt, inner, sibling) = (
        dir.path().join("mnt"),
        dir.path().join("mnt/inner dir"),
        dir.path().join("mntc"),
    );
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&sibling).unwrap();
    let _guard = Mounted(vec![&sibling, &mnt, &inner]);
    mount_tmpfs(&sibling);
    mount_tmpfs(&mnt);
    std::fs::create_dir(&inner).unwrap();
    mount_tmpfs(&inner);
    assert!(is_mount_point(&inner) && is_mount_point(&mnt) && is_mount_point(&sibling));

    stargaze_testkit::unmount_below(&mnt);

    assert!(!is_mount_point(&mnt), "{} is still mounted", mnt.display());
    assert!(
        is_mount_point(&sibling),
        "{} was unmounted although it is not under {}",
        sibling.display(),
        mnt.display()
    );
}
