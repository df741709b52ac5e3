//! A small ext4 filesystem on a loop device, for tests that fill a disk.
//! It is unmounted (and its loop device detached) when dropped, even
//! when the test failed.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{is_root, require, require_that, run};

/// An ext4 filesystem of a fixed size mounted on a private directory.
pub struct LoopFs {
    dir: tempfile::TempDir,
    mount: PathBuf,
}

impl LoopFs {
    /// Make a `mib` MiB ext4 image (no blocks reserved for root, so that
    /// root fills it as any user would) and mount it with `-o loop`.
    pub fn new(mib: u64) -> LoopFs {
        require_that(
            is_root(),
            "root (it mounts a loop device)",
            "run the tests as root, as `make test` and CI do",
        );
        require("mkfs.ext4");
        require("losetup");
        let dir = tempfile::Builder::new()
            .prefix("sg-loop-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let image = dir.path().join("disk.img");
        let file = std::fs::File::create(&image).expect("disk image");
        file.set_len(mib << 20).expect("disk image size");
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&image));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        // The loop device is set up with autoclear: unmounting frees it.
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&image)
            .arg(&mount));
        LoopFs { dir, mount }
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Free bytes on the filesystem.
    pub fn free(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.mount)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let image = self.dir.path().join("disk.img");
        if nix::mount::umount(&self.mount).is_err() {
            let _ = nix::mount::umount2(&self.mount, nix::mount::MntFlags::MNT_DETACH);
        }
        // A device left attached (a lazy unmount, or autoclear not set):
        // detach whatever still backs onto the image.
        if let Ok(out) = Command::new("losetup").arg("-j").arg(&image).output() {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((dev, _)) = line.split_once(':') {
                    let _ = Command::new("losetup").arg("-d").arg(dev).status();
                }
            }
        }
    }
}
