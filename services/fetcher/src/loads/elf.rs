//! What a file loads with it, read from the few ranges that say so.
//!
//! An ELF object names its interpreter (`PT_INTERP`) and, in its dynamic
//! segment, the libraries it needs (`DT_NEEDED`) and where to look for them
//! (`DT_RPATH`, `DT_RUNPATH`), as offsets into its dynamic string table.
//! Those three places are a few KiB of a file that may be tens of MiB, and
//! the dynamic segment often sits near its end: reading them as ranges
//! lets the libraries' fetches start while the program's own bytes are
//! still arriving. [`head`] reads the file's start (a `#!` line, or the ELF
//! header and program headers), [`Elf::dynamic`] the dynamic segment,
//! [`Dynamic::names`] the strings. goblin parses each piece; the caller
//! fetches the ranges in between.

use std::ops::Range;

use goblin::container::{Container, Ctx};
use goblin::elf::header::{ET_DYN, ET_EXEC, Header};
use goblin::elf::program_header::{PT_DYNAMIC, PT_INTERP, PT_LOAD, ProgramHeader};
use scroll::Pread;

/// Bytes of a file's start that [`head`] is given.
pub const HEAD: u64 = 64 << 10;
/// Largest dynamic segment or string table read (a real one is a few KiB).
const MAX_SECTION: u64 = 1 << 20;

const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// What a file's start says it is.
#[derive(Debug, PartialEq)]
pub enum Head {
    /// A `#!` script: its interpreter, and for `#!/usr/bin/env prog` the
    /// bare `prog` (looked up in `PATH`).
    Script {
        interpreter: String,
        via_env: Option<String>,
    },
    Elf(Elf),
    /// Anything else: nothing follows from it.
    Other,
}

/// An ELF object's layout, from its headers.
#[derive(Debug, PartialEq)]
pub struct Elf {
    ctx: Ctx,
    pub machine: u16,
    pub is_64: bool,
    /// An executable or shared object with loadable segments: the kernel
    /// or the dynamic loader maps it, and page faults read it in any order.
    pub mapped: bool,
    /// File range of the interpreter's path.
    pub interpreter: Option<Range<u64>>,
    /// File range of the dynamic segment.
    pub dynamic: Option<Range<u64>>,
    /// `PT_LOAD` segments: (virtual address, file offset, file size).
    loads: Vec<(u64, u64, u64)>,
}

/// The dynamic segment's references into the string table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    needed: Vec<u64>,
    rpath: Option<u64>,
    runpath: Option<u64>,
    /// File range of the string table.
    pub strings: Option<Range<u64>>,
}

/// The names a dynamic segment gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// `DT_NEEDED`, in order.
    pub libraries: Vec<String>,
    /// `DT_RPATH` entries (the loader ignores them when `DT_RUNPATH` is set).
    pub rpath: Vec<String>,
    pub runpath: Vec<String>,
}

/// Read a file's first bytes (up to [`HEAD`]).
pub fn head(bytes: &[u8]) -> Head {
    if let Some(rest) = bytes.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let Some(interpreter) = words.next().map(str::to_string) else {
            return Head::Other;
        };
        let via_env = interpreter
            .ends_with("/env")
            .then(|| words.find(|w| !w.starts_with('-')).map(str::to_string))
            .flatten();
        return Head::Script {
            interpreter,
            via_env,
        };
    }
    elf(bytes).map_or(Head::Other, Head::Elf)
}

fn elf(bytes: &[u8]) -> Option<Elf> {
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    let header: Header = bytes.pread(0).ok()?;
    let container = header.container().ok()?;
    let ctx = Ctx::new(container, header.endianness().ok()?);
    let phdrs = ProgramHeader::parse(
        bytes,
        usize::try_from(header.e_phoff).ok()?,
        header.e_phnum as usize,
        ctx,
    )
    .ok()?;
    let range_of = |kind: u32| {
        phdrs
            .iter()
            .find(|p| p.p_type == kind && p.p_filesz > 0 && p.p_filesz <= MAX_SECTION)
            .map(|p| p.p_offset..p.p_offset.saturating_add(p.p_filesz))
    };
    let loads: Vec<(u64, u64, u64)> = phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .map(|p| (p.p_vaddr, p.p_offset, p.p_filesz))
        .collect();
    Some(Elf {
        ctx,
        machine: header.e_machine,
        is_64: container == Container::Big,
        mapped: matches!(header.e_type, ET_EXEC | ET_DYN) && !loads.is_empty(),
        interpreter: range_of(PT_INTERP),
        dynamic: range_of(PT_DYNAMIC),
        loads,
    })
}

/// A NUL-terminated string at the start of `bytes`.
fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&bytes[..end])
        .ok()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl Elf {
    /// The interpreter's path, from the bytes of [`Elf::interpreter`].
    pub fn interpreter_path(&self, bytes: &[u8]) -> Option<String> {
        c_string(bytes)
    }

    /// The file offset of virtual address `vaddr` (through the segment
    /// that maps it from the file).
    fn offset_of(&self, vaddr: u64) -> Option<u64> {
        self.loads.iter().find_map(|&(start, offset, size)| {
            (vaddr >= start && vaddr - start < size).then(|| offset + (vaddr - start))
        })
    }

    /// Read the dynamic segment (the bytes of [`Elf::dynamic`]).
    pub fn dynamic(&self, bytes: &[u8]) -> Dynamic {
        let mut out = Dynamic::default();
        let (mut strtab, mut strsz) = (None, None);
        let mut at = 0usize;
        while let Ok(d) = bytes.gread_with::<goblin::elf::dynamic::Dyn>(&mut at, self.ctx) {
            match d.d_tag {
                DT_NULL => break,
                DT_NEEDED => out.needed.push(d.d_val),
                DT_STRTAB => strtab = Some(d.d_val),
                DT_STRSZ => strsz = Some(d.d_val),
                DT_RPATH => out.rpath = Some(d.d_val),
                DT_RUNPATH => out.runpath = Some(d.d_val),
                _ => {}
            }
        }
        if let (Some(addr), Some(size)) = (strtab, strsz)
            && size <= MAX_SECTION
            && let Some(offset) = self.offset_of(addr)
        {
            out.strings = Some(offset..offset + size);
        }
        out
    }
}

impl Dynamic {
    /// Does it name anything to look up?
    pub fn is_empty(&self) -> bool {
        self.needed.is_empty()
    }

    /// Resolve the references against the string table's bytes.
    pub fn names(&self, strings: &[u8]) -> Names {
        let at = |off: u64| {
            usize::try_from(off)
                .ok()
                .and_then(|o| strings.get(o..))
                .and_then(c_string)
        };
        let list = |off: Option<u64>| -> Vec<String> {
            off.and_then(at)
                .map(|s| {
                    s.split(':')
                        .filter(|d| !d.is_empty())
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        Names {
            libraries: self.needed.iter().filter_map(|&o| at(o)).collect(),
            rpath: list(self.rpath),
            runpath: list(self.runpath),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read `bytes` as a caller would: the head, then each range.
    fn names_of(bytes: &[u8]) -> (Elf, Option<String>, Names) {
        let Head::Elf(elf) = head(&bytes[..bytes.len().min(HEAD as usize)]) else {
            panic!("not ELF");
        };
        let slice = |r: &Range<u64>| &bytes[r.start as usize..r.end as usize];
        let interp = elf
            .interpreter
            .as_ref()
            .and_then(|r| elf.interpreter_path(slice(r)));
        let dynamic = elf
            .dynamic
            .as_ref()
            .map(|r| elf.dynamic(slice(r)))
            .unwrap_or_default();
        let names = dynamic
            .strings
            .as_ref()
            .map(|r| dynamic.names(slice(r)))
            .unwrap_or_default();
        (elf, interp, names)
    }

    #[test]
    fn a_real_program_names_its_loader_and_libraries_from_a_few_ranges() {
        // This machine's own /bin/sh (dash): dynamically linked against libc.
        let bytes = std::fs::read("/bin/sh").expect("/bin/sh");
        let (elf, interp, names) = names_of(&bytes);
        assert!(elf.mapped);
        assert!(interp.is_some_and(|p| p.contains("ld-linux")));
        assert!(
            names.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{names:?}"
        );
        // The same names as goblin's whole-file parse.
        let whole = goblin::elf::Elf::parse(&bytes).unwrap();
        assert_eq!(names.libraries, whole.libraries);
    }

    #[test]
    fn a_shared_library_is_mapped_and_needs_what_goblin_says() {
        let path = std::fs::read_link("/lib/x86_64-linux-gnu/libz.so.1")
            .map(|t| std::path::Path::new("/lib/x86_64-linux-gnu").join(t))
            .unwrap_or_else(|_| "/lib/x86_64-linux-gnu/libc.so.6".into());
        let bytes = std::fs::read(&path).expect("a shared library");
        let (elf, _, names) = names_of(&bytes);
        assert!(elf.mapped && elf.is_64);
        let whole = goblin::elf::Elf::parse(&bytes).unwrap();
        assert_eq!(names.libraries, whole.libraries, "{}", path.display());
    }

    #[test]
    fn scripts_name_their_interpreter_and_what_env_runs() {
        assert_eq!(
            head(b"#!/bin/sh -e\necho hi\n"),
            Head::Script {
                interpreter: "/bin/sh".into(),
                via_env: None
            }
        );
        assert_eq!(
            head(b"#!/usr/bin/env -S perl -w\n"),
            Head::Script {
                interpreter: "/usr/bin/env".into(),
                via_env: Some("perl".into())
            }
        );
        assert_eq!(head(b"#!\n"), Head::Other);
        assert_eq!(head(b"plain text"), Head::Other);
        assert_eq!(head(b"\x7fELF truncated"), Head::Other);
    }

    #[test]
    fn hostile_headers_are_nothing_rather_than_a_panic() {
        let mut bytes = std::fs::read("/bin/sh").expect("/bin/sh");
        bytes.truncate(200);
        // Program headers claimed beyond the bytes given.
        bytes[56] = 0xff;
        bytes[57] = 0xff;
        assert_eq!(head(&bytes), Head::Other);
        let elf = match head(&std::fs::read("/bin/sh").unwrap()[..4096]) {
            Head::Elf(e) => e,
            h => panic!("{h:?}"),
        };
        // A dynamic segment of garbage, and a string table of garbage.
        let d = elf.dynamic(&[0xab; 64]);
        assert!(d.strings.is_none());
        let d = Dynamic {
            needed: vec![u64::MAX, 3],
            rpath: Some(1 << 40),
            runpath: None,
            strings: None,
        };
        assert_eq!(d.names(b"ab\0cd").libraries, Vec::<String>::new());
    }
}
