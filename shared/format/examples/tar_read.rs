//! Our tar reader ([`stargaze_format::tar`]) against the `tar` crate on the
//! converter's path (issue 22): walk the same uncompressed layer tar held in
//! memory with both, getting for every entry what `convert.rs` uses (name,
//! type, size, mode, ids and names, mtime with nanoseconds, device numbers,
//! link name, `SCHILY.xattr.*`, and the entry's header, data and end
//! offsets), and check that both give the same list.
//!
//! The `tar` crate reads through `Cursor<&[u8]>` with `entries_with_seek`,
//! so payloads are skipped, not copied. What it does not give is filled in
//! on top, as the converter would have to: the entry's first byte (its first
//! extension header: the crate's `raw_header_position` is the entry's own
//! header), PAX `mtime` nanoseconds, `uname`/`gname` and xattrs, global PAX
//! headers, and a check that the payload lies inside the input.
//!
//! Usage: `cargo run --release -p stargaze-format --example tar_read -- [ROUNDS] TAR...` (each TAR: parity, then ROUNDS alternated
//! rounds per reader, default 5). With no TAR, only the parity cases built
//! here are checked.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::time::Instant;

use stargaze_format::tar::{TarKind, TarReader};

/// What the converter takes from one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    header_offset: u64,
    data_offset: u64,
    size: u64,
    end_offset: u64,
    kind: TarKind,
    name: String,
    link_name: String,
    mode: u32,
    uid: u64,
    gid: u64,
    user_name: String,
    group_name: String,
    mtime: (i64, u32),
    dev: (u32, u32),
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn ours(buf: &[u8]) -> Result<(Vec<Rec>, u64), String> {
    let mut r = TarReader::new(buf);
    let mut out = Vec::new();
    for e in r.by_ref() {
        let e = e.map_err(|e| e.to_string())?;
        out.push(Rec {
            header_offset: e.header_offset,
            data_offset: e.data_offset,
            size: e.size,
            end_offset: e.end_offset,
            kind: e.kind,
            name: e.name,
            link_name: e.link_name,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            user_name: e.user_name,
            group_name: e.group_name,
            mtime: (e.mtime, e.mtime_nsec),
            dev: (e.dev_major, e.dev_minor),
            xattrs: e.xattrs,
        });
    }
    Ok((out, r.trailer_offset().unwrap_or(0)))
}

/// PAX records the crate leaves to its caller.
#[derive(Default, Clone)]
struct Pax {
    uname: Option<String>,
    gname: Option<String>,
    mtime: Option<(i64, u32)>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn text(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "not UTF-8".to_string())
}

fn pax_time(t: &str) -> Option<(i64, u32)> {
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    Some((whole.parse().ok()?, digits.parse().ok()?))
}

fn pax_records<'a>(
    records: impl Iterator<Item = std::io::Result<tar::PaxExtension<'a>>>,
    into: &mut Pax,
) -> Result<(), String> {
    for r in records {
        let r = r.map_err(|e| e.to_string())?;
        let key = r.key().map_err(|e| e.to_string())?;
        let value = r.value_bytes();
        match key {
            "uname" => into.uname = Some(text(value)?),
            "gname" => into.gname = Some(text(value)?),
            "mtime" => into.mtime = Some(pax_time(&text(value)?).ok_or("PAX mtime")?),
            k if k.starts_with("SCHILY.xattr.") => {
                into.xattrs
                    .insert(k["SCHILY.xattr.".len()..].to_string(), value.to_vec());
            }
            _ => {}
        }
    }
    Ok(())
}

fn crate_reader(buf: &[u8]) -> Result<(Vec<Rec>, u64), String> {
    let io = |e: std::io::Error| e.to_string();
    let mut archive = tar::Archive::new(Cursor::new(buf));
    let mut out = Vec::new();
    let mut global = Pax::default();
    // The crate does not say where an entry's extension headers start: the
    // previous entry's end is where they do.
    let mut start = 0u64;
    let mut end = 0u64;
    for e in archive.entries_with_seek().map_err(io)? {
        let mut e = e.map_err(io)?;
        let typ = e.header().entry_type();
        let data = e.raw_file_position();
        let padded = e.size().div_ceil(512) * 512;
        end = data + padded;
        if typ.is_pax_global_extensions() {
            let mut body = Vec::new();
            e.read_to_end(&mut body).map_err(io)?;
            pax_records(tar::PaxExtensions::new(&body), &mut global)?;
            continue;
        }
        let kind = match typ {
            tar::EntryType::Regular | tar::EntryType::Continuous => TarKind::Regular,
            tar::EntryType::Link => TarKind::HardLink,
            tar::EntryType::Symlink => TarKind::Symlink,
            tar::EntryType::Char => TarKind::Char,
            tar::EntryType::Block => TarKind::Block,
            tar::EntryType::Directory => TarKind::Dir,
            tar::EntryType::Fifo => TarKind::Fifo,
            other => return Err(format!("unsupported entry type {other:?}")),
        };
        let mut pax = global.clone();
        if let Some(records) = e.pax_extensions().map_err(io)? {
            let mut local = Pax::default();
            pax_records(records, &mut local)?;
            pax.uname = local.uname.or(pax.uname);
            pax.gname = local.gname.or(pax.gname);
            pax.mtime = local.mtime.or(pax.mtime);
            pax.xattrs.extend(local.xattrs);
        }
        let h = e.header();
        // Header-only types carry no payload whatever their size says.
        let size = if kind == TarKind::Regular {
            e.size()
        } else {
            0
        };
        if data + size > buf.len() as u64 {
            return Err(format!("entry at {start} runs past the end"));
        }
        let name = text(&e.path_bytes())?;
        let link_name = match e.link_name_bytes() {
            Some(l) => text(&l)?,
            None => String::new(),
        };
        let (dev_major, dev_minor) = if matches!(kind, TarKind::Char | TarKind::Block) {
            (
                h.device_major().map_err(io)?.unwrap_or(0),
                h.device_minor().map_err(io)?.unwrap_or(0),
            )
        } else {
            (0, 0)
        };
        let mtime = match pax.mtime {
            Some(t) => t,
            None => (h.mtime().map_err(io)? as i64, 0),
        };
        out.push(Rec {
            header_offset: start,
            data_offset: data,
            size,
            end_offset: data + size.div_ceil(512) * 512,
            kind,
            name,
            link_name,
            mode: h.mode().map_err(io)? & 0o7777_7777,
            uid: h.uid().map_err(io)?,
            gid: h.gid().map_err(io)?,
            user_name: match pax.uname {
                Some(u) => u,
                None => text(h.username_bytes().unwrap_or_default())?,
            },
            group_name: match pax.gname {
                Some(g) => g,
                None => text(h.groupname_bytes().unwrap_or_default())?,
            },
            mtime,
            dev: (dev_major, dev_minor),
            xattrs: pax.xattrs,
        });
        start = end;
    }
    Ok((out, end))
}

/// Small archives with what real layers hold: GNU long names and link
/// names, PAX paths, xattrs and fractional mtimes, hard links, symlinks,
/// devices, a global PAX header, base-256 numbers.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let long = "d/".repeat(70) + "file";
    let mut out = Vec::new();
    let file = |mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_username("user").unwrap();
        h.set_groupname("group").unwrap();
        h
    };

    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut file(0o644, 3), &long, &b"abc"[..])
        .unwrap();
    let mut h = file(0o777, 0);
    h.set_entry_type(tar::EntryType::Symlink);
    b.append_link(&mut h, "sym", &long).unwrap();
    let mut h = file(0o644, 0);
    h.set_entry_type(tar::EntryType::Link);
    b.append_link(&mut h, "hard", &long).unwrap();
    out.push(("GNU long names, links", b.into_inner().unwrap()));

    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("mtime", &b"1650000000.123456789"[..]),
        ("SCHILY.xattr.user.k", &b"\xff\x00v"[..]),
        ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
        ("uname", &b"long-user-name"[..]),
        ("path", long.as_bytes()),
    ])
    .unwrap();
    b.append_data(&mut file(0o4755, 5), "short", &b"hello"[..])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    b.append_data(&mut h, "dev/null", &[][..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(0);
    b.append_data(&mut h, "dir/", &[][..]).unwrap();
    // Base-256 uid (too large for octal).
    let mut h = file(0o600, 1);
    h.set_uid(1 << 40);
    b.append_data(&mut h, "big-uid", &b"x"[..]).unwrap();
    out.push(("PAX records, devices, base-256", b.into_inner().unwrap()));

    // A header whose mode field is left empty (NULs), as some writers do.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    b.append_data(&mut h, "no-mode", &[][..]).unwrap();
    out.push(("empty numeric field", b.into_inner().unwrap()));

    // An archive cut inside a payload.
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut file(0o644, 4000), "cut", &[7u8; 4000][..])
        .unwrap();
    let mut cut = b.into_inner().unwrap();
    cut.truncate(2048);
    out.push(("archive cut inside a payload", cut));

    // A global header ahead of everything (as `git archive` writes one).
    let mut data = Vec::new();
    let global = [
        pax_record("mtime", "1700000000.5"),
        pax_record("uname", "everyone"),
    ]
    .concat();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XGlobalHeader);
    h.set_size(global.len() as u64);
    h.set_path("pax_global_header").unwrap();
    h.set_cksum();
    data.extend_from_slice(h.as_bytes());
    data.extend_from_slice(&global);
    data.resize(data.len().div_ceil(512) * 512, 0);
    let mut b = tar::Builder::new(data);
    b.append_data(&mut file(0o644, 2), "g", &b"hi"[..]).unwrap();
    out.push(("global PAX header", b.into_inner().unwrap()));
    out
}

/// Both readers' entry lists, or what differs between them.
/// `LEN key=value\n`, LEN counting itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

fn parity(what: &str, buf: &[u8]) -> Option<usize> {
    let outcome = match (ours(buf), crate_reader(buf)) {
        (Ok((a, ta)), Ok((b, tb))) => match a.iter().zip(&b).find(|(x, y)| x != y) {
            Some((x, y)) => Err(format!("ours {x:?}\n    tar crate {y:?}")),
            None if a.len() != b.len() => Err(format!("{} against {} entries", a.len(), b.len())),
            None if ta != tb => Err(format!("trailer at {ta} against {tb}")),
            None => Ok(a.len()),
        },
        (Err(a), Err(b)) => {
            println!("both refuse {what}: ours: {a}; tar crate: {b}");
            return None;
        }
        (a, b) => Err(format!(
            "ours {}, tar crate {}",
            a.map_or_else(|e| e, |(a, _)| format!("{} entries", a.len())),
            b.map_or_else(|e| e, |(b, _)| format!("{} entries", b.len()))
        )),
    };
    match outcome {
        Ok(n) => {
            println!("parity  {what}: {n} entries identical");
            Some(n)
        }
        Err(e) => {
            println!("DIFFERS {what}: {e}");
            None
        }
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let rounds = match args.first().and_then(|a| a.parse::<usize>().ok()) {
        Some(n) => {
            args.remove(0);
            n
        }
        None => 5,
    };
    for (what, buf) in cases() {
        parity(what, &buf);
    }
    for path in &args {
        let buf = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let Some(entries) = parity(path, &buf) else {
            continue;
        };
        let mb = buf.len() as f64 / 1e6;
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (k, times) in times.iter_mut().enumerate() {
                let t = Instant::now();
                let n = if k == 0 {
                    ours(&buf).unwrap().0.len()
                } else {
                    crate_reader(&buf).unwrap().0.len()
                };
                times.push(t.elapsed().as_secs_f64());
                assert_eq!(n, entries);
            }
        }
        println!("{path}: {mb:.0} MB, {entries} entries, {rounds} alternated rounds");
        for (name, t) in ["ours", "tar crate"].iter().zip(&mut times) {
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            println!(
                "  {name:10} median {:7.1} ms  ({:6.0} MB/s, {:5.2} M entries/s; min {:.1} ms, max {:.1} ms)",
                median * 1e3,
                mb / median,
                entries as f64 / median / 1e6,
                t[0] * 1e3,
                t[t.len() - 1] * 1e3
            );
        }
    }
}
