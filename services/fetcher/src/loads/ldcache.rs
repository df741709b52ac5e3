//! The dynamic loader's cache, `/etc/ld.so.cache`: where glibc's loader
//! finds a library that no `RPATH`/`RUNPATH` names. `ldconfig` writes it
//! when an image is built, so it lists every directory the image's
//! packages registered (`/etc/ld.so.conf.d`, multiarch directories) and
//! resolving through it finds what the loader will open. No crate reads
//! this format; it is a header, fixed-size entries and a string table
//! (glibc's `sysdeps/generic/dl-cache.h`), parsed here with bounds checks
//! on every offset since the file comes from an image.

use std::collections::HashMap;

/// The format glibc has written since 2.32 (alone) and before (after the
/// old one).
const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
/// The format before glibc 2.32, kept in front of the new one by old
/// `ldconfig`s.
const OLD_MAGIC: &[u8] = b"ld.so-1.7.0";
const HEADER: usize = 48;
const ENTRY: usize = 24;
/// Largest cache read (a distribution's is tens of KiB).
pub const MAX_SIZE: u64 = 16 << 20;

/// Library name → paths, in the cache's order.
#[derive(Debug, Default)]
pub struct LdCache {
    entries: HashMap<String, Vec<(u32, String)>>,
}

/// The architecture bits of an entry's flags that a program of this ELF
/// machine and class loads (`None`: not known here, any entry will do).
fn arch_flags(machine: u16, is_64: bool) -> Option<&'static [u32]> {
    use goblin::elf::header::*;
    Some(match (machine, is_64) {
        (EM_X86_64, true) => &[0x0300],
        (EM_X86_64, false) => &[0x0800],
        (EM_386, false) => &[0],
        (EM_AARCH64, true) => &[0x0a00],
        (EM_ARM, false) => &[0x0900, 0x0b00, 0],
        (EM_PPC64, true) => &[0x0500],
        (EM_S390, true) => &[0x0400],
        (EM_RISCV, true) => &[0x1000, 0x0f00],
        _ => return None,
    })
}

impl LdCache {
    /// Parse a cache file; `None` when it is not one.
    pub fn parse(bytes: &[u8]) -> Option<LdCache> {
        let base = if bytes.starts_with(MAGIC) {
            0
        } else if bytes.starts_with(OLD_MAGIC) {
            // Old header (16 bytes) and entries (12 each), then the new
            // format aligned to 8; the new one's offsets count from there.
            let n = u32::from_le_bytes(bytes.get(12..16)?.try_into().ok()?) as usize;
            let end = 16usize.checked_add(n.checked_mul(12)?)?;
            let base = end.next_multiple_of(8);
            bytes.get(base..)?.starts_with(MAGIC).then_some(base)?
        } else {
            return None;
        };
        let new = &bytes[base..];
        // Byte order: 2 little, 3 big, 0 written by a glibc that did not
        // record it (the loader then takes the machine's own).
        let big = new.get(28).copied()? == 3;
        let u32_at = |at: usize| -> Option<u32> {
            let b: [u8; 4] = new.get(at..at + 4)?.try_into().ok()?;
            Some(if big {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            })
        };
        let string = |at: u32| -> Option<String> {
            let s = new.get(at as usize..)?;
            let end = s.iter().position(|&b| b == 0)?;
            String::from_utf8(s[..end].to_vec()).ok()
        };
        let n = u32_at(20)? as usize;
        let mut entries: HashMap<String, Vec<(u32, String)>> = HashMap::new();
        for i in 0..n {
            let at = HEADER.checked_add(i.checked_mul(ENTRY)?)?;
            let (flags, key, value) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            let hwcap = new.get(at + 16..at + 24)?;
            // Variants for CPU extensions (glibc-hwcaps): the loader picks
            // them by the CPU; the baseline entry is the one always there.
            if hwcap.iter().any(|&b| b != 0) {
                continue;
            }
            if let (Some(k), Some(v)) = (string(key), string(value)) {
                entries.entry(k).or_default().push((flags, v));
            }
        }
        Some(LdCache { entries })
    }

    /// The paths the cache gives for library `name` loaded by an object of
    /// this machine and class.
    pub fn lookup(&self, name: &str, machine: u16, is_64: bool) -> Vec<&str> {
        let wanted = arch_flags(machine, is_64);
        self.entries
            .get(name)
            .into_iter()
            .flatten()
            // libc6 (ELF) entries whose architecture bits match.
            .filter(|(flags, _)| {
                flags & 0xff == 3 && wanted.is_none_or(|w| w.contains(&(flags & 0xff00)))
            })
            .map(|(_, p)| p.as_str())
            .collect()
    }

    /// Library names it lists.
    pub fn names(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goblin::elf::header::{EM_386, EM_AARCH64, EM_X86_64};

    #[test]
    fn this_machines_cache_finds_libc_where_the_loader_does() {
        let bytes = std::fs::read("/etc/ld.so.cache").expect("/etc/ld.so.cache");
        let cache = LdCache::parse(&bytes).expect("a glibc cache");
        assert!(cache.names() > 10);
        let libc = cache.lookup("libc.so.6", EM_X86_64, true);
        assert!(
            libc.iter()
                .any(|p| std::path::Path::new(p).exists() && p.ends_with("/libc.so.6")),
            "{libc:?}"
        );
        assert!(cache.lookup("libc.so.6", EM_AARCH64, true).is_empty());
        assert!(
            cache
                .lookup("no-such-library.so", EM_X86_64, true)
                .is_empty()
        );
    }

    /// A cache with `entries` `(flags, key, value, hwcap)`, optionally
    /// behind an old-format header.
    fn build(entries: &[(u32, &str, &str, u64)], old: bool) -> Vec<u8> {
        let mut strings = Vec::new();
        let table = HEADER + entries.len() * ENTRY;
        let mut e = Vec::new();
        for (flags, k, v, hwcap) in entries {
            let ko = (table + strings.len()) as u32;
            strings.extend_from_slice(k.as_bytes());
            strings.push(0);
            let vo = (table + strings.len()) as u32;
            strings.extend_from_slice(v.as_bytes());
            strings.push(0);
            e.extend_from_slice(&flags.to_le_bytes());
            e.extend_from_slice(&ko.to_le_bytes());
            e.extend_from_slice(&vo.to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
            e.extend_from_slice(&hwcap.to_le_bytes());
        }
        let mut new = MAGIC.to_vec();
        new.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        new.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        new.push(2);
        new.resize(HEADER, 0);
        new.extend(e);
        new.extend(strings);
        if !old {
            return new;
        }
        let mut out = OLD_MAGIC.to_vec();
        out.resize(12, 0);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&[0; 12]);
        out.resize(32, 0);
        out.extend(new);
        out
    }

    #[test]
    fn entries_are_chosen_by_architecture_and_baseline() {
        let bytes = build(
            &[
                (0x0303, "libfoo.so.1", "/opt/x86-64-v3/libfoo.so.1", 1 << 50),
                (0x0303, "libfoo.so.1", "/opt/lib/libfoo.so.1", 0),
                (0x0003, "libfoo.so.1", "/opt/lib32/libfoo.so.1", 0),
                (0x0001, "libfoo.so.1", "/opt/libc5/libfoo.so.1", 0),
            ],
            false,
        );
        let c = LdCache::parse(&bytes).unwrap();
        assert_eq!(
            c.lookup("libfoo.so.1", EM_X86_64, true),
            ["/opt/lib/libfoo.so.1"]
        );
        assert_eq!(
            c.lookup("libfoo.so.1", EM_386, false),
            ["/opt/lib32/libfoo.so.1"]
        );
        let old = LdCache::parse(&build(&[(0x0303, "liba.so", "/a/liba.so", 0)], true)).unwrap();
        assert_eq!(old.lookup("liba.so", EM_X86_64, true), ["/a/liba.so"]);
    }

    #[test]
    fn hostile_caches_are_refused_or_partial_never_a_panic() {
        assert!(LdCache::parse(b"").is_none());
        assert!(LdCache::parse(b"not a cache at all").is_none());
        let mut bytes = build(&[(0x0303, "liba.so", "/a/liba.so", 0)], false);
        // Claims a billion entries.
        bytes[20..24].copy_from_slice(&1_000_000_000u32.to_le_bytes());
        assert!(LdCache::parse(&bytes).is_none());
        let mut bytes = build(&[(0x0303, "liba.so", "/a/liba.so", 0)], false);
        // A string offset far outside the file.
        bytes[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(LdCache::parse(&bytes).unwrap().names(), 0);
        let mut old = build(&[], true);
        old[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(LdCache::parse(&old).is_none());
    }
}
