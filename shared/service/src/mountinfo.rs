//! The mount table as the kernel shows it in `/proc/self/mountinfo`, with
//! paths decoded (the kernel writes a space in a path as `\040`), and
//! "is this path at or under that directory" by path components, so that
//! `/a/b` is never taken for a directory above `/a/bc`.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of mountinfo (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted filesystem's device.
    pub device: String,
    /// The directory of the filesystem mounted here (`/` for all of it).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// What was mounted (a device, `overlay`, `stargaze`, ...).
    pub source: String,
    /// The filesystem's own options as the kernel prints them, still
    /// escaped: split them first, then [`unescape`] each piece.
    pub super_options: String,
}

/// The mounts this process sees; empty when mountinfo cannot be read (no
/// /proc), as if nothing were mounted.
pub fn read() -> Vec<Mount> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse(&text))
        .unwrap_or_default()
}

/// Parse mountinfo text, in its order (a later mount at the same point is
/// on top of an earlier one). Lines that do not have mountinfo's shape are
/// skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// `id parent major:minor root mount-point options [optional...] - fstype source super-options`
fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    // The optional fields end at the first lone "-" after the sixth field.
    let dash = 6 + fields.get(6..)?.iter().position(|f| *f == "-")?;
    Some(Mount {
        device: fields.get(2)?.to_string(),
        root: unescape_path(fields.get(3)?),
        mount_point: unescape_path(fields.get(4)?),
        fstype: unescape(fields.get(dash + 1)?),
        source: unescape(fields.get(dash + 2)?),
        super_options: fields.get(dash + 3).unwrap_or(&"").to_string(),
    })
}

/// Decode the kernel's octal escapes (`\040` space, `\011` tab, `\012`
/// newline, `\134` backslash, and any other `\ooo`). A backslash not
/// followed by three octal digits is kept as it is.
pub fn unescape(field: &str) -> String {
    String::from_utf8_lossy(&unescape_bytes(field)).into_owned()
}

/// A path field decoded; paths need not be UTF-8.
fn unescape_path(field: &str) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(unescape_bytes(field)))
}

fn unescape_bytes(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3');
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Is `path` the directory `dir` or inside it, component by component
/// (`/a/bc` is not under `/a/b`)? Neither path is resolved.
pub fn is_under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// The mount points at or under `dir`, deepest first (the order to detach
/// them in).
pub fn mount_points_under(mounts: &[Mount], dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mounts
        .iter()
        .map(|m| m.mount_point.clone())
        .filter(|p| is_under(p, dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// The last (topmost) mount whose mount point is exactly `dir`.
pub fn mounted_at<'a>(mounts: &'a [Mount], dir: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
36 22 0:32 / /var/lib/stargaze/mnt rw,nosuid,nodev,relatime shared:20 - fuse.stargaze stargaze rw,user_id=0,group_id=0,default_permissions,allow_other
37 22 0:33 / /run/a\\040dir rw - tmpfs tmp\\040fs rw,size=1024k
38 22 0:34 / /var/lib/stargaze/mntc rw master:3 propagate_from:1 - tmpfs tmpfs rw
39 22 0:35 / /var/lib/stargaze/mnt/x/rootfs rw - overlay overlay rw,lowerdir=/var/lib/stargaze/mnt/ab\\054c:/l2,upperdir=/u,workdir=/w
40 22 0:36 /sub /mnt/bind rw -
not a mountinfo line
";

    #[test]
    fn parses_fields_with_any_number_of_optional_fields() {
        let m = parse(SAMPLE);
        assert_eq!(m.len(), 5, "{m:#?}");
        assert_eq!(m[0].device, "8:1");
        assert_eq!(m[0].mount_point, Path::new("/"));
        assert_eq!(m[0].fstype, "ext4");
        assert_eq!(m[0].source, "/dev/sda1");
        assert_eq!(m[0].super_options, "rw,errors=remount-ro");
        assert_eq!(m[1].fstype, "fuse.stargaze");
        // Two optional fields, then the separator.
        assert_eq!(m[3].device, "0:34");
        assert_eq!(m[3].fstype, "tmpfs");
        assert_eq!(m[4].fstype, "overlay");
    }

    #[test]
    fn paths_are_decoded() {
        let m = parse(SAMPLE);
        assert_eq!(m[2].mount_point, Path::new("/run/a dir"));
        assert_eq!(m[2].source, "tmp fs");
        assert_eq!(unescape(r"a\011b\012c\134d\040e"), "a\tb\nc\\d e");
        // Escaped separators in options stay escaped until split.
        assert!(m[4].super_options.contains(r"ab\054c"));
        assert_eq!(unescape(r"ab\054c"), "ab,c");
    }

    #[test]
    fn a_backslash_without_three_octal_digits_is_kept() {
        assert_eq!(unescape(r"a\b"), r"a\b");
        assert_eq!(unescape(r"a\04"), r"a\04");
        assert_eq!(unescape(r"a\089"), r"a\089");
        assert_eq!(unescape(r"end\"), r"end\");
        assert_eq!(unescape(r"\400"), r"\400");
    }

    #[test]
    fn under_is_by_path_component() {
        let dir = Path::new("/a/b");
        assert!(is_under(Path::new("/a/b"), dir));
        assert!(is_under(Path::new("/a/b/"), dir));
        assert!(is_under(Path::new("/a/b/c"), dir));
        assert!(!is_under(Path::new("/a/bc"), dir));
        assert!(!is_under(Path::new("/a/bc/d"), dir));
        assert!(!is_under(Path::new("/a"), dir));
        assert!(is_under(Path::new("/a/bc"), Path::new("/a/bc/")));
    }

    #[test]
    fn mount_points_under_a_directory_exclude_siblings_and_come_deepest_first() {
        let m = parse(SAMPLE);
        assert_eq!(
            mount_points_under(&m, Path::new("/var/lib/stargaze/mnt")),
            vec![
                PathBuf::from("/var/lib/stargaze/mnt/x/rootfs"),
                PathBuf::from("/var/lib/stargaze/mnt"),
            ]
        );
        assert_eq!(
            mount_points_under(&m, Path::new("/run/a dir")),
            vec![PathBuf::from("/run/a dir")]
        );
    }

    #[test]
    fn the_topmost_mount_at_a_point_wins() {
        let text = "\
50 22 0:40 / /m rw - tmpfs first rw
51 50 0:41 / /m rw - fuse.stargaze second rw
";
        let m = parse(text);
        assert_eq!(mounted_at(&m, Path::new("/m")).unwrap().source, "second");
        assert!(mounted_at(&m, Path::new("/m/x")).is_none());
    }
}
