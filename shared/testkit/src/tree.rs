//! A directory tree as a process sees it through `lstat`, `readlink`, the
//! xattr calls and `read`, and its differences from another tree, path by
//! path and field by field: how tests check a lazily mounted rootfs
//! against containerd's unpack of the same layers.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

/// What one path shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of a regular file or a symlink's target; 0 for the rest
    /// (a directory's size is its filesystem's business).
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
    pub nlink: u64,
    /// Device number of a character or block device; 0 for the rest.
    pub rdev: u64,
    pub symlink: Option<PathBuf>,
    /// Every xattr `llistxattr` lists, with its value.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// sha256 of a regular file's bytes.
    pub sha256: Option<String>,
    /// The other paths of the tree that are the same inode (hard links).
    pub same_inode: Vec<PathBuf>,
    /// Why a call on the path failed (`lstat`, `read`, xattrs).
    pub error: Option<String>,
}

/// Every path below `root` (not `root` itself), by path relative to it.
/// Directories are not followed into other filesystems.
pub fn walk(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                let rel = dir.strip_prefix(root).expect("below root").to_path_buf();
                out.entry(rel).or_insert_with(Node::default).error = Some(format!("readdir: {e}"));
                continue;
            }
        };
        for e in entries {
            let p = match e {
                Ok(e) => e.path(),
                Err(e) => {
                    let rel = dir.strip_prefix(root).expect("below root").to_path_buf();
                    out.entry(rel).or_insert_with(Node::default).error =
                        Some(format!("readdir: {e}"));
                    continue;
                }
            };
            let rel = p.strip_prefix(root).expect("below root").to_path_buf();
            let node = match std::fs::symlink_metadata(&p) {
                Ok(m) => {
                    if m.is_dir() {
                        stack.push(p.clone());
                    } else {
                        inodes
                            .entry((m.dev(), m.ino()))
                            .or_default()
                            .push(rel.clone());
                    }
                    node(&p, &m)
                }
                Err(e) => Node {
                    error: Some(format!("lstat: {e}")),
                    ..Default::default()
                },
            };
            out.insert(rel, node);
        }
    }
    for paths in inodes.values().filter(|p| p.len() > 1) {
        for p in paths {
            let mut others: Vec<PathBuf> = paths.iter().filter(|o| *o != p).cloned().collect();
            others.sort();
            out.get_mut(p).expect("walked").same_inode = others;
        }
    }
    out
}

fn node(p: &Path, m: &std::fs::Metadata) -> Node {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else if ft.is_socket() {
        "socket"
    } else {
        "reg"
    };
    let mut error = None;
    let sha256 = (kind == "reg").then(|| match std::fs::read(p) {
        Ok(bytes) => hex::encode(sha2::Sha256::digest(&bytes)),
        Err(e) => {
            error = Some(format!("read: {e}"));
            String::new()
        }
    });
    let xattrs = xattrs(p).unwrap_or_else(|e| {
        error = Some(format!("xattrs: {e}"));
        BTreeMap::new()
    });
    Node {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        size: if matches!(kind, "reg" | "symlink") {
            m.size()
        } else {
            0
        },
        mtime: (m.mtime(), m.mtime_nsec()),
        nlink: m.nlink(),
        rdev: if matches!(kind, "char" | "block") {
            m.rdev()
        } else {
            0
        },
        symlink: (kind == "symlink").then(|| std::fs::read_link(p).unwrap_or_default()),
        xattrs,
        sha256,
        same_inode: Vec::new(),
        error,
    }
}

/// Every xattr of `p` (not following a symlink) with its value.
pub fn xattrs(p: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path");
    // SAFETY: a valid C string; a null buffer of size 0 asks for the size.
    let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut names = vec![0u8; n as usize];
    // SAFETY: valid C string and buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    names.truncate(n as usize);
    let mut out = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).expect("no NUL in an xattr name");
        let mut v = vec![0u8; 65536];
        // SAFETY: valid C strings and buffer of the given length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if m < 0 {
            return Err(std::io::Error::last_os_error());
        }
        v.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), v);
    }
    Ok(out)
}

/// One path's difference: a field with both values, or a path only one
/// tree has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: PathBuf,
    pub field: &'static str,
    pub want: String,
    pub got: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: want {}, got {}",
            self.path.display(),
            self.field,
            self.want,
            self.got
        )
    }
}

fn xattrs_text(x: &BTreeMap<String, Vec<u8>>) -> String {
    let parts: Vec<String> = x
        .iter()
        .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v).escape_debug()))
        .collect();
    format!("{{{}}}", parts.join(", "))
}

/// How `got` differs from `want`, path by path and field by field.
pub fn differences(
    want: &BTreeMap<PathBuf, Node>,
    got: &BTreeMap<PathBuf, Node>,
) -> Vec<Difference> {
    let mut out = Vec::new();
    for (path, w) in want {
        let Some(g) = got.get(path) else {
            out.push(Difference {
                path: path.clone(),
                field: "path",
                want: format!("a {}", w.kind),
                got: "missing".into(),
            });
            continue;
        };
        let mut field = |name: &'static str, w: String, g: String| {
            if w != g {
                out.push(Difference {
                    path: path.clone(),
                    field: name,
                    want: w,
                    got: g,
                });
            }
        };
        field("error", format!("{:?}", w.error), format!("{:?}", g.error));
        field("type", w.kind.into(), g.kind.into());
        field("mode", format!("{:o}", w.mode), format!("{:o}", g.mode));
        field(
            "owner",
            format!("{}:{}", w.uid, w.gid),
            format!("{}:{}", g.uid, g.gid),
        );
        field("size", w.size.to_string(), g.size.to_string());
        field(
            "mtime",
            format!("{}.{:09}", w.mtime.0, w.mtime.1),
            format!("{}.{:09}", g.mtime.0, g.mtime.1),
        );
        field("nlink", w.nlink.to_string(), g.nlink.to_string());
        field("rdev", w.rdev.to_string(), g.rdev.to_string());
        field(
            "symlink",
            format!("{:?}", w.symlink),
            format!("{:?}", g.symlink),
        );
        field("xattrs", xattrs_text(&w.xattrs), xattrs_text(&g.xattrs));
        field(
            "bytes",
            format!("{:?}", w.sha256),
            format!("{:?}", g.sha256),
        );
        field(
            "hard links",
            format!("{:?}", w.same_inode),
            format!("{:?}", g.same_inode),
        );
    }
    for (path, g) in got {
        if !want.contains_key(path) {
            out.push(Difference {
                path: path.clone(),
                field: "path",
                want: "none".into(),
                got: format!("a {}", g.kind),
            });
        }
    }
    out
}
