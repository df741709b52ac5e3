//! Two layers full of the unusual entries real images carry now and then,
//! for tests that compare a lazily mounted rootfs with containerd's unpack:
//! hard links across directories (one whose own header differs from its
//! target's), whiteouts and opaque directories over the lower layer,
//! xattrs in the `user.`, `security.` and `trusted.` namespaces on every
//! kind of entry, setuid/setgid/sticky modes, devices and fifos, long
//! names and deep paths, empty files, files that are mostly holes,
//! symlinks to absolute, relative, dangling and long targets, mtimes
//! before 1970, after 2038, after 2262 and with nanoseconds, owners above
//! 65535, names given twice. Every directory has its own entry (containerd
//! gives a directory a layer only implies the time of the unpack).

/// One tar entry; built with [`reg`], [`dir`], [`symlink`], [`hardlink`],
/// [`node`] and the setters.
#[derive(Clone)]
pub struct Entry {
    name: String,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
    link: Option<String>,
    device: (u32, u32),
    /// PAX records written before the entry (`SCHILY.xattr.*`, `mtime`, ...).
    pax: Vec<(String, Vec<u8>)>,
}

/// The mtime of most entries.
pub const MTIME: u64 = 1_650_000_000;

fn entry(name: &str, kind: tar::EntryType, mode: u32) -> Entry {
    Entry {
        name: name.to_string(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: MTIME,
        data: Vec::new(),
        link: None,
        device: (0, 0),
        pax: Vec::new(),
    }
}

pub fn reg(name: &str, data: &[u8]) -> Entry {
    Entry {
        data: data.to_vec(),
        ..entry(name, tar::EntryType::Regular, 0o644)
    }
}

/// `name` without its trailing slash.
pub fn dir(name: &str) -> Entry {
    entry(&format!("{name}/"), tar::EntryType::Directory, 0o755)
}

pub fn symlink(name: &str, target: &str) -> Entry {
    Entry {
        link: Some(target.to_string()),
        ..entry(name, tar::EntryType::Symlink, 0o777)
    }
}

/// A hard link to `target` whose header says what its target's says
/// (`like`), as image builders write it.
pub fn hardlink(name: &str, target: &Entry) -> Entry {
    Entry {
        name: name.to_string(),
        kind: tar::EntryType::Link,
        link: Some(target.name.clone()),
        data: Vec::new(),
        ..target.clone()
    }
}

/// A character or block device, or a fifo.
pub fn node(name: &str, kind: tar::EntryType, major: u32, minor: u32) -> Entry {
    Entry {
        device: (major, minor),
        ..entry(name, kind, 0o644)
    }
}

/// A whiteout of `name` (`dir/.wh.base`).
pub fn whiteout(name: &str) -> Entry {
    let (dir, base) = name.rsplit_once('/').unwrap_or(("", name));
    let path = if dir.is_empty() {
        format!(".wh.{base}")
    } else {
        format!("{dir}/.wh.{base}")
    };
    reg(&path, b"")
}

/// The opaque marker of directory `dir`.
pub fn opaque(dir: &str) -> Entry {
    reg(&format!("{dir}/.wh..wh..opq"), b"")
}

impl Entry {
    pub fn mode(mut self, mode: u32) -> Entry {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Entry {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: u64) -> Entry {
        self.mtime = mtime;
        self
    }

    pub fn xattr(self, name: &str, value: &[u8]) -> Entry {
        self.pax(&format!("SCHILY.xattr.{name}"), value)
    }

    /// A PAX record of the entry's extended header (e.g. `mtime`, `uid`).
    pub fn pax(mut self, key: &str, value: &[u8]) -> Entry {
        self.pax.push((key.to_string(), value.to_vec()));
        self
    }
}

/// A tar of `entries` in order (GNU headers: long names and big numbers).
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.pax.is_empty() {
            b.append_pax_extensions(e.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("tar");
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_size(e.data.len() as u64);
        if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(e.device.0).expect("tar");
            h.set_device_minor(e.device.1).expect("tar");
        }
        match &e.link {
            Some(target) => b.append_link(&mut h, &e.name, target).expect("tar"),
            None => b
                .append_data(&mut h, &e.name, e.data.as_slice())
                .expect("tar"),
        }
    }
    b.into_inner().expect("tar")
}

/// VFS capabilities v2, effective, `cap_net_bind_service` permitted.
pub const CAPABILITY: &[u8] = &[1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// `len` bytes that are zeros but for a few runs of data (`at`, `bytes`).
fn holes(len: usize, data: &[(usize, &[u8])]) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (at, bytes) in data {
        v[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    v
}

/// The lower of the two crafted layers.
pub fn lower_layer() -> Vec<u8> {
    use tar::EntryType::{Block, Char, Fifo};
    let orig = reg("hl/a/orig", b"hard-linked bytes")
        .mode(0o640)
        .owner(1001, 1002)
        .xattr("user.h", b"1");
    let orig2 = reg("hl/c/orig", b"linked with another header").mode(0o644);
    let mut e = vec![
        dir("hl"),
        dir("hl/a"),
        dir("hl/b"),
        dir("hl/c"),
        orig.clone(),
        hardlink("hl/b/link", &orig),
        hardlink("hl/link", &orig),
        orig2.clone(),
        // A link header of its own: containerd applies it to the inode.
        hardlink("hl/c/odd-link", &orig2)
            .mode(0o600)
            .owner(7, 8)
            .mtime(1_500_000_000),
        dir("modes").mode(0o2775),
        dir("modes/sticky").mode(0o1777),
        reg("modes/setuid", b"#!/bin/sh\n").mode(0o4755),
        reg("modes/setgid", b"x").mode(0o2711),
        reg("modes/all", b"x").mode(0o7777),
        reg("modes/none", b"x").mode(0),
        reg("modes/sticky-file", b"x").mode(0o1644),
        dir("dev"),
        node("dev/null", Char, 1, 3).mode(0o666),
        node("dev/sda", Block, 8, 0).mode(0o660).owner(0, 6),
        node("dev/big-minor", Block, 259, 1_048_575).mode(0o600),
        node("dev/fifo", Fifo, 0, 0).mode(0o620).owner(5, 5),
        dir("x")
            .xattr("user.dir", b"d")
            .xattr("security.dir", b"s")
            .xattr("trusted.dir", b"t"),
        reg("x/user", b"u")
            .xattr("user.a", b"1")
            .xattr("user.empty", b"")
            .xattr("user.bin", b"\x00\xff\x01"),
        reg("x/security", b"s")
            .xattr("security.capability", CAPABILITY)
            .xattr("security.test", b"s"),
        reg("x/trusted", b"t")
            .xattr("trusted.foo", b"t")
            .xattr("trusted.overlay.redirect", b"/hl")
            .xattr("user.kept", b"k"),
        symlink("x/symlink", "user")
            .xattr("user.x", b"refused on a symlink")
            .xattr("security.sym", b"s")
            .xattr("trusted.t", b"t"),
        node("x/fifo", Fifo, 0, 0)
            .xattr("user.x", b"refused on a fifo")
            .xattr("security.f", b"f"),
        node("x/char", Char, 1, 5).xattr("security.c", b"c"),
        reg("x/big-value", b"b").xattr("user.big", &[b'v'; 3000]),
    ];
    let mut many = reg("x/many", b"m");
    for i in 0..30 {
        many = many.xattr(&format!("user.n{i:02}"), format!("value {i}").as_bytes());
    }
    e.push(many);
    e.extend([
        dir("names"),
        reg(&format!("names/{}", "n".repeat(255)), b"long name"),
        reg("names/with space", b"1"),
        reg("names/tab\there", b"2"),
        reg("names/ünïcödé ✓", b"3"),
        reg("names/back\\slash", b"4"),
        reg("names/-dash", b"5"),
        reg("names/.hidden", b"6"),
        reg("names/..dots", b"7"),
        reg("names/quote\"'", b"8"),
        reg("names/new\nline", b"9"),
    ]);
    let mut deep = String::from("deep");
    e.push(dir(&deep));
    for level in 0..40 {
        deep = format!("{deep}/level-{level:02}-abc");
        e.push(dir(&deep));
    }
    e.push(reg(&format!("{deep}/leaf"), b"deep down"));
    e.extend([
        dir("empty"),
        reg("empty/file", b""),
        reg("empty/setuid", b"").mode(0o4755),
        dir("empty/dir"),
        dir("sparse"),
        reg(
            "sparse/holes",
            &holes(
                3 << 20,
                &[(1 << 20, &[7u8; 4096]), ((3 << 20) - 100, &[9u8; 100])],
            ),
        ),
        reg("sparse/zeros", &vec![0u8; 2 << 20]),
        reg(
            "sparse/last-byte",
            &holes(1 << 20, &[((1 << 20) - 1, b"!")]),
        ),
        dir("links"),
        symlink("links/abs", "/etc/passwd"),
        symlink("links/rel", "../hl/a/orig"),
        symlink("links/dangling", "nowhere"),
        symlink("links/escape", "../../../../../etc/shadow"),
        symlink("links/self", "self"),
        symlink("links/dir", "../modes"),
        symlink("links/long", &"t/".repeat(500)),
        symlink("links/odd-mode", "abs").mode(0o644),
        symlink("links/owned", "abs")
            .owner(1234, 5678)
            .mtime(1_400_000_000),
        dir("times").mtime(1),
        reg("times/epoch", b"").mtime(0),
        reg("times/negative", b"").pax("mtime", b"-86400"),
        reg("times/fraction", b"").pax("mtime", b"1650000000.123456789"),
        reg("times/y2038", b"").mtime(1 << 31),
        reg("times/y2100", b"").mtime(4_102_444_800),
        reg("times/y5138", b"").pax("mtime", b"99999999999"),
        dir("times/dir").pax("mtime", b"1234567890.5"),
        dir("ids"),
        reg("ids/big", b"").owner(100_000, 200_000),
        reg("ids/base256", b"").owner(3_000_000, 4_000_000),
        reg("ids/pax", b"")
            .pax("uid", b"4294967294")
            .pax("gid", b"4294967293"),
        dir("ids/dir").owner(65_536, 65_537),
        // Changed, removed or hidden by the upper layer.
        dir("wh"),
        reg("wh/gone", b"lower"),
        dir("wh/gone-dir"),
        reg("wh/gone-dir/inner", b"lower"),
        reg("wh/kept", b"kept"),
        dir("op"),
        reg("op/old", b"old"),
        dir("op/sub"),
        reg("op/sub/old", b"old"),
        dir("swap"),
        reg("swap/file-to-dir", b"file"),
        dir("swap/dir-to-file"),
        reg("swap/dir-to-file/child", b"child"),
        reg("swap/file-to-symlink", b"file"),
        dir("meta").xattr("user.lower", b"l"),
        reg("meta/file", b"old"),
        // A name given twice: the later entry is the file.
        dir("dup"),
        reg("dup/file", b"first"),
        reg("dup/file", b"second").mode(0o600),
        dir("dup/dir").mode(0o700),
        reg("dup/dir", b"now a file"),
    ]);
    tar_of(&e)
}

/// The upper of the two crafted layers: whiteouts, opaque directories,
/// entries that change type, directories whose attributes change.
pub fn upper_layer() -> Vec<u8> {
    let f = reg("hl2/a/f", b"upper link").mode(0o755).owner(3, 4);
    tar_of(&[
        dir("wh").mtime(1_660_000_000),
        whiteout("wh/gone"),
        whiteout("wh/gone-dir"),
        whiteout("wh/never-existed"),
        dir("op").mode(0o750),
        opaque("op"),
        reg("op/new", b"new"),
        dir("fresh"),
        opaque("fresh"),
        reg("fresh/f", b"f"),
        dir("swap"),
        dir("swap/file-to-dir"),
        reg("swap/file-to-dir/inside", b"inside"),
        reg("swap/dir-to-file", b"now a file"),
        symlink("swap/file-to-symlink", "../op/new"),
        dir("meta")
            .mode(0o700)
            .owner(42, 43)
            .mtime(1_670_000_000)
            .xattr("user.upper", b"u"),
        reg("meta/file", b"new").mode(0o600),
        dir("hl2"),
        dir("hl2/a"),
        dir("hl2/b"),
        f.clone(),
        hardlink("hl2/b/l", &f),
    ])
}
