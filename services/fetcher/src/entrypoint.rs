//! Entrypoint prefetch: the files every container of an image reads first.
//!
//! A container starts by exec'ing the image's command. The kernel then maps
//! that program, its interpreter (the dynamic loader named in its ELF
//! header, or the one on its `#!` line) and the dynamic loader maps every
//! shared library it needs: a chain of files, each known only after the
//! previous one was read. Lazily, that chain is one sequential registry
//! round trip per file, on the critical path of every cold start.
//!
//! Before the first container runs, the fetcher already has everything it
//! takes to walk that chain itself: the image config ([`Command`]: entrypoint,
//! command, `PATH`, working directory) and the index of every layer
//! ([`Stack`]: paths resolved top layer first, through symlinks and
//! whiteouts, as overlayfs will). [`prefetch`] fetches the program, parses
//! it (`goblin`), then fetches its interpreter and libraries; each file's
//! follow-ups start as soon as it is parsed, until nothing new is needed.
//! Only files the program will load are fetched: no extra bytes when the
//! container runs the image's command. One guess is made: a CPython
//! interpreter in an image holding glibc's loader for its architecture is a
//! dynamically linked glibc program (distributions build it so), so the
//! loader, `libc.so.6` and glibc's start-up files are fetched with it
//! instead of after its 2-3 MB are in and parsed.
//!
//! The same holds for the files the runtime around the program reads, one
//! miss after another, before the program prints anything ([`Runtime`]):
//! containerd reads the image's `/etc/passwd` and `/etc/group` to set up the
//! process; glibc's loader reads `/etc/ld.so.cache`, its locale code the
//! locale named by `LC_ALL`/`LC_CTYPE`/`LANG` and the gconv module cache,
//! `localtime` reads `/etc/localtime`, user lookups `/etc/nsswitch.conf`; a
//! CPython interpreter (known by its file name, `pythonX.Y`) imports the
//! codecs of its filesystem encoding, `sitecustomize`, and runs the `.pth`
//! files of its site directories (whose `import` lines name more modules,
//! one more wave). Files named as arguments of the command (`python3
//! app.py`) are fetched too.

use std::collections::HashSet;
use std::sync::Arc;

use stargaze_index::model::kind;

use crate::engine::Layer;

/// Files one prediction fetches at most.
const MAX_FILES: usize = 64;
/// Bytes (uncompressed) one prediction fetches at most.
const MAX_BYTES: u64 = 256 << 20;
/// Symlinks followed while resolving one path (Linux's limit).
const MAX_LINKS: u32 = 40;
/// The `PATH` runtimes use when the image sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The program an image's containers run by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// `Entrypoint[0]`, else `Cmd[0]`.
    pub program: String,
    /// The rest of the command line (the entrypoint's, then `Cmd`).
    pub args: Vec<String>,
    /// The directories of the config's `PATH`.
    pub path: Vec<String>,
    pub workdir: String,
    /// The config's `Env` (`NAME=value`; the last of a name wins).
    pub env: Vec<(String, String)>,
    /// The config's `architecture` (`amd64`, `arm64`, ...).
    pub arch: Option<String>,
}

impl Command {
    /// Read from an image config (`None` when it names no program).
    pub fn from_config(config: &serde_json::Value) -> Option<Command> {
        let c = &config["config"];
        let first = |key: &str| {
            c[key]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let program = first("Entrypoint").or_else(|| first("Cmd"))?;
        let words = |key: &str| -> Vec<String> {
            c[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        };
        let mut argv = words("Entrypoint");
        argv.extend(words("Cmd"));
        let args = argv.into_iter().skip(1).collect();
        let env: Vec<(String, String)> = c["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let (k, v) = v.as_str()?.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })
            .collect();
        let path = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        Some(Command {
            program,
            args,
            path: path
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(str::to_string)
                .collect(),
            workdir: c["WorkingDir"]
                .as_str()
                .filter(|w| w.starts_with('/'))
                .unwrap_or("/")
                .to_string(),
            env,
            arch: config["architecture"].as_str().map(str::to_string),
        })
    }

    /// The value of `name` in the config's environment.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The locale glibc's `setlocale(LC_CTYPE, "")` picks from the
    /// environment; `None` for the built-in C/POSIX locale.
    pub fn ctype_locale(&self) -> Option<&str> {
        ["LC_ALL", "LC_CTYPE", "LANG"]
            .iter()
            .find_map(|n| self.var(n).filter(|v| !v.is_empty()))
            .filter(|l| *l != "C" && *l != "POSIX")
    }

    /// Arguments that name files relative to the working directory or
    /// absolute (`app.py`, `/srv/run.sh`), not options.
    fn file_arguments(&self) -> Vec<String> {
        self.args
            .iter()
            .filter(|a| !a.starts_with('-') && !a.is_empty() && !a.contains(char::is_whitespace))
            .map(|a| {
                if a.starts_with('/') {
                    a.clone()
                } else {
                    format!("{}/{a}", self.workdir.trim_end_matches('/'))
                }
            })
            .collect()
    }

    /// The absolute paths the runtime would try for the program, in order.
    fn candidates(&self) -> Vec<String> {
        if self.program.starts_with('/') {
            vec![self.program.clone()]
        } else if self.program.contains('/') {
            vec![format!("{}/{}", self.workdir, self.program)]
        } else {
            self.path
                .iter()
                .map(|d| format!("{d}/{}", self.program))
                .collect()
        }
    }
}

/// An image's layers as its containers see them: top layer first. While
/// the image resolves, some may not be known yet (`None`): a lookup that
/// reaches one cannot be answered yet.
pub struct Stack {
    layers: Vec<Option<Arc<Layer>>>,
}

/// A lookup that needed a layer not resolved yet.
#[derive(Debug, PartialEq, Eq)]
pub struct Unknown;

impl Stack {
    pub fn new(top_first: Vec<Arc<Layer>>) -> Stack {
        Stack::partial(top_first.into_iter().map(Some).collect())
    }

    /// A stack of which some layers are not resolved yet.
    pub fn partial(top_first: Vec<Option<Arc<Layer>>>) -> Stack {
        Stack { layers: top_first }
    }

    /// The layer at a position a lookup returned (always resolved).
    fn layer(&self, i: usize) -> &Arc<Layer> {
        self.layers[i]
            .as_ref()
            .expect("lookups only return resolved layers")
    }

    /// The top-most entry at exactly `path` (no symlink followed):
    /// `None` when no layer has it or a whiteout hides it.
    fn entry(&self, path: &str) -> Result<Option<(usize, u64)>, Unknown> {
        for (i, layer) in self.layers.iter().enumerate() {
            let Some(layer) = layer else {
                return Err(Unknown);
            };
            if let Some(ino) = layer.index.lookup_path(path) {
                let Some(node) = layer.index.inode(ino) else {
                    return Ok(None);
                };
                if node.kind() == kind::CHAR && node.rdev() == (0, 0) {
                    return Ok(None);
                }
                return Ok(Some((i, ino)));
            }
        }
        Ok(None)
    }

    /// The regular file `path` names, following symlinks in any component
    /// and across layers: `(layer position, inode)`.
    pub fn resolve(&self, path: &str) -> Option<(usize, u64)> {
        self.resolve_known(path).ok().flatten()
    }

    /// [`Stack::resolve`], telling a missing file from one that needs a
    /// layer not resolved yet.
    pub fn resolve_known(&self, path: &str) -> Result<Option<(usize, u64)>, Unknown> {
        let mut pending: Vec<String> = path.rsplit('/').map(str::to_string).collect();
        let mut done: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(comp) = pending.pop() {
            match comp.as_str() {
                "" | "." => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = format!("/{}/{comp}", done.join("/"));
            let Some((i, ino)) = self.entry(&candidate)? else {
                return Ok(None);
            };
            let Some(node) = self.layer(i).index.inode(ino) else {
                return Ok(None);
            };
            if let Some(target) = node.symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Ok(None);
                }
                let Ok(target) = std::str::from_utf8(target) else {
                    return Ok(None);
                };
                if target.starts_with('/') {
                    done.clear();
                }
                pending.extend(target.rsplit('/').map(str::to_string));
            } else if node.is_dir() {
                done.push(comp);
            } else if node.is_reg() && pending.iter().all(|c| c.is_empty() || c == ".") {
                return Ok(Some((i, ino)));
            } else {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The program a command most likely runs, from the layers resolved so
    /// far: the first `PATH` candidate whose file the known layers decide
    /// (found, and no unknown layer above any step of its path), to start
    /// fetching it before the rest of the image is resolved. Speculative:
    /// a candidate earlier in `PATH` that only an unknown layer could hold
    /// (`/usr/local/bin/python3` in a base image not resolved yet) is taken
    /// as absent; a wrong guess costs the bytes of one unused file, since
    /// the entrypoint prefetch runs again on the whole stack.
    pub fn program_known(&self, command: &Command) -> Option<(Arc<Layer>, u64)> {
        command
            .candidates()
            .iter()
            .find_map(|path| match self.resolve_known(path) {
                Ok(Some((i, ino))) => Some((self.layer(i).clone(), ino)),
                Ok(None) | Err(Unknown) => None,
            })
    }

    /// The first of `paths` that is a regular file.
    fn first_file(&self, paths: &[String]) -> Option<(String, usize, u64)> {
        paths
            .iter()
            .find_map(|p| self.resolve(p).map(|(i, ino)| (p.clone(), i, ino)))
    }

    /// Does `path` exist (any kind, after symlinks in its directories)?
    fn exists(&self, path: &str) -> bool {
        self.entry(path).ok().flatten().is_some() || self.resolve(path).is_some()
    }

    /// Names in directory `dir` in any layer (a listing's union, not
    /// checked against whiteouts: callers resolve each name).
    fn names_in(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for layer in self.layers.iter().flatten() {
            let Some(ino) = layer.index.lookup_path(dir) else {
                continue;
            };
            for e in layer.index.readdir(ino, 0) {
                if let Ok(n) = std::str::from_utf8(e.name)
                    && !names.iter().any(|m| m == n)
                {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        names
    }
}

/// How a fetched file is read for what it loads next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parse {
    /// An ELF binary or a `#!` script: interpreter, libraries.
    Program,
    /// A CPython `.pth` file: the modules its `import` lines load.
    Pth,
    /// Data: nothing follows from it.
    Data,
}

/// A CPython interpreter, known by its file name (`python3.11`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Python {
    pub major: u32,
    pub minor: u32,
    /// The installation prefix (`/usr`, `/usr/local`): the binary's
    /// directory's parent.
    pub prefix: String,
}

/// Modules CPython imports at startup that it does not freeze in its
/// binary before 3.11 (3.11 freezes all of these).
const PY_STARTUP_BEFORE_311: &[&str] = &[
    "abc",
    "codecs",
    "io",
    "os",
    "stat",
    "posixpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
    "site",
];
/// Modules 3.11+ freezes (imports of them read no file).
const PY_FROZEN_311: &[&str] = &[
    "abc",
    "codecs",
    "io",
    "os",
    "stat",
    "posixpath",
    "ntpath",
    "genericpath",
    "_collections_abc",
    "_sitebuiltins",
    "site",
    "importlib",
    "runpy",
    "zipimport",
];

impl Python {
    /// From the real path of the program (`/usr/bin/python3.11`).
    pub fn from_program(path: &str) -> Option<Python> {
        let (dir, name) = path.rsplit_once('/')?;
        let version = name.strip_prefix("python")?;
        let (major, minor) = version.split_once('.')?;
        let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
        if major < 3 {
            return None;
        }
        let prefix = dir.rsplit_once('/').map_or("", |(p, _)| p).to_string();
        Some(Python {
            major,
            minor,
            prefix,
        })
    }

    fn stdlib(&self) -> String {
        format!("{}/lib/python{}.{}", self.prefix, self.major, self.minor)
    }

    /// The `__pycache__` tag: `cpython-311`.
    fn tag(&self) -> String {
        format!("cpython-{}{}", self.major, self.minor)
    }

    /// Site directories of upstream and of Debian's builds, in the order
    /// `site` adds them.
    fn site_dirs(&self) -> Vec<String> {
        let (p, v) = (&self.prefix, format!("{}.{}", self.major, self.minor));
        vec![
            format!("/usr/local/lib/python{v}/dist-packages"),
            format!("{p}/lib/python{v}/site-packages"),
            format!("{p}/lib/python3/dist-packages"),
            format!("{p}/lib/python{v}/dist-packages"),
        ]
    }

    fn frozen(&self, module: &str) -> bool {
        self.minor >= 11 && PY_FROZEN_311.contains(&module)
    }

    /// The file an import of top-level `module` reads from `dirs`: the
    /// compiled `__pycache__` file when the image has it, else the source.
    fn module_file(&self, stack: &Stack, dirs: &[String], module: &str) -> Option<String> {
        let tag = self.tag();
        for d in dirs {
            let (source, cached) = if stack.exists(&format!("{d}/{module}/__init__.py")) {
                (
                    format!("{d}/{module}/__init__.py"),
                    format!("{d}/{module}/__pycache__/__init__.{tag}.pyc"),
                )
            } else if stack.exists(&format!("{d}/{module}.py")) {
                (
                    format!("{d}/{module}.py"),
                    format!("{d}/__pycache__/{module}.{tag}.pyc"),
                )
            } else {
                continue;
            };
            return Some(if stack.exists(&cached) {
                cached
            } else {
                source
            });
        }
        None
    }

    /// What the interpreter reads before running any code of the
    /// container's: codecs, startup modules, `sitecustomize`, `.pth` files.
    fn startup_files(&self, stack: &Stack) -> Vec<(String, Parse)> {
        let stdlib = self.stdlib();
        let tag = self.tag();
        let mut out = Vec::new();
        // The filesystem and locale encoding is UTF-8 in containers (PEP
        // 538/540 coerce the C locale to C.UTF-8).
        for codec in ["__init__", "aliases", "utf_8"] {
            let cached = format!("{stdlib}/encodings/__pycache__/{codec}.{tag}.pyc");
            let source = format!("{stdlib}/encodings/{codec}.py");
            out.push((
                if stack.exists(&cached) {
                    cached
                } else {
                    source
                },
                Parse::Data,
            ));
        }
        if self.minor < 11 {
            for m in PY_STARTUP_BEFORE_311 {
                out.extend(
                    self.module_file(stack, std::slice::from_ref(&stdlib), m)
                        .map(|f| (f, Parse::Data)),
                );
            }
        }
        let mut dirs = vec![stdlib.clone(), format!("{stdlib}/lib-dynload")];
        dirs.extend(self.site_dirs());
        out.extend(
            self.module_file(stack, &dirs, "sitecustomize")
                .map(|f| (f, Parse::Data)),
        );
        for d in self.site_dirs() {
            for name in stack.names_in(&d) {
                if name.ends_with(".pth") {
                    out.push((format!("{d}/{name}"), Parse::Pth));
                }
            }
        }
        out
    }
}

/// The top-level modules a `.pth` file's `import` lines load (`import a,
/// b.c` and `__import__('d')` anywhere on such a line).
pub fn pth_imports(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |m: &str| {
        let top = m.split('.').next().unwrap_or("").trim();
        if !top.is_empty()
            && top.chars().all(|c| c.is_alphanumeric() || c == '_')
            && !out.iter().any(|o| o == top)
        {
            out.push(top.to_string());
        }
    };
    for line in text.lines() {
        // site.py executes exactly the lines that start with "import".
        if !(line.starts_with("import ") || line.starts_with("import\t")) {
            continue;
        }
        for stmt in line.split(';').map(str::trim) {
            if let Some(names) = stmt.strip_prefix("import") {
                for n in names.split(',') {
                    add(n.split_whitespace().next().unwrap_or(""));
                }
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("__import__(") {
            rest = &rest[at + "__import__(".len()..];
            let quoted = rest.trim_start();
            if let Some(q) = quoted.chars().next().filter(|c| *c == '\'' || *c == '"')
                && let Some(end) = quoted[1..].find(q)
            {
                add(&quoted[1..1 + end]);
            }
        }
    }
    out
}

/// The files around the program that the runtime reads at start.
struct Runtime;

impl Runtime {
    /// Read by containerd itself from every image's root filesystem when
    /// it creates a container (the user and its additional groups).
    const CONTAINERD: [&'static str; 2] = ["/etc/passwd", "/etc/group"];

    /// Read by glibc when a dynamically linked program starts: the loader's
    /// cache, user lookups' switch file, the time zone (unless `TZ` is
    /// set), and the locale's character classes plus the gconv module
    /// cache when a locale other than C is asked for (`python`: always,
    /// C.UTF-8). `search`: the program's library directories.
    fn glibc(stack: &Stack, command: &Command, python: bool, search: &[String]) -> Vec<String> {
        let mut out: Vec<String> = vec!["/etc/ld.so.cache".into(), "/etc/nsswitch.conf".into()];
        if command.var("TZ").is_none() {
            out.push("/etc/localtime".into());
        }
        let locale = command.ctype_locale().or(python.then_some("C.UTF-8"));
        // With a locale archive glibc maps that instead of the files;
        // which parts of it it reads is not known here.
        if let Some(locale) = locale
            && !stack.exists("/usr/lib/locale/locale-archive")
        {
            let names = [locale.to_string(), normalize_codeset(locale)];
            let ctype: Vec<String> = names
                .iter()
                .map(|n| format!("/usr/lib/locale/{n}/LC_CTYPE"))
                .collect();
            out.extend(stack.first_file(&ctype).map(|(p, ..)| p));
            let gconv: Vec<String> = search
                .iter()
                .map(|d| format!("{d}/gconv/gconv-modules.cache"))
                .collect();
            out.extend(stack.first_file(&gconv).map(|(p, ..)| p));
        }
        out
    }
}

/// glibc's normalized codeset: `C.UTF-8` → `C.utf8`, `de_DE.ISO-8859-1@euro`
/// → `de_DE.iso88591@euro`.
fn normalize_codeset(locale: &str) -> String {
    let Some((lang, rest)) = locale.split_once('.') else {
        return locale.to_string();
    };
    let (codeset, modifier) = match rest.split_once('@') {
        Some((c, m)) => (c, format!("@{m}")),
        None => (rest, String::new()),
    };
    let norm: String = codeset
        .chars()
        .filter(|c| c.is_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let norm = if norm.chars().all(|c| c.is_ascii_digit()) {
        format!("iso{norm}")
    } else {
        norm
    };
    format!("{lang}.{norm}{modifier}")
}

/// What a prediction fetched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prefetched {
    /// The paths, in the order they were found.
    pub files: Vec<String>,
    /// Their uncompressed size.
    pub bytes: u64,
}

/// What a program needs loaded with it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Programs: the ELF interpreter, the `#!` interpreter (and, for
    /// `#!/usr/bin/env prog`, the bare `prog`, to look up in `PATH`).
    pub programs: Vec<String>,
    /// Shared library names (`DT_NEEDED`) with the directories to search.
    pub libraries: Vec<String>,
    pub search: Vec<String>,
}

/// Parse a file's start (or, for ELF, all of it) for what it loads.
pub fn needs_of(bytes: &[u8]) -> Needs {
    let mut needs = Needs::default();
    if let Some(rest) = bytes.strip_prefix(b"#!") {
        let line = rest.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        if let Some(interp) = words.next() {
            needs.programs.push(interp.to_string());
            if interp.ends_with("/env")
                && let Some(prog) = words.find(|w| !w.starts_with('-'))
            {
                needs.programs.push(prog.to_string());
            }
        }
        return needs;
    }
    let Ok(elf) = goblin::elf::Elf::parse(bytes) else {
        return needs;
    };
    if let Some(interp) = elf.interpreter {
        needs.programs.push(interp.to_string());
    }
    needs.libraries = elf.libraries.iter().map(|s| s.to_string()).collect();
    // $ORIGIN-relative and other substituted entries cannot be resolved
    // here; the loader's default directories follow.
    needs.search = elf
        .runpaths
        .iter()
        .chain(&elf.rpaths)
        .flat_map(|p| p.split(':'))
        .filter(|d| d.starts_with('/'))
        .map(str::to_string)
        .collect();
    let triple = GLIBC
        .iter()
        .find(|g| g.machine == elf.header.e_machine)
        .map(|g| g.triple);
    needs.search.extend(default_search(triple, elf.is_64));
    needs
}

/// The dynamic loader's default library directories: the multiarch ones
/// of `triple` (Debian's layout), then the classic ones.
fn default_search(triple: Option<&str>, is_64: bool) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = triple {
        out.push(format!("/lib/{t}"));
        out.push(format!("/usr/lib/{t}"));
    }
    let lib64 = if is_64 {
        ["/lib64", "/usr/lib64"]
    } else {
        ["/lib32", "/usr/lib32"]
    };
    out.extend(lib64.map(str::to_string));
    out.extend(["/lib", "/usr/lib", "/usr/local/lib"].map(str::to_string));
    out
}

/// glibc on one architecture: its dynamic loader's path (`PT_INTERP` of
/// every program linked against it), its multiarch triple, the ELF machine
/// and the OCI `architecture` name.
struct Glibc {
    oci_arch: &'static str,
    machine: u16,
    loader: &'static str,
    triple: &'static str,
    is_64: bool,
}

const GLIBC: &[Glibc] = &[
    Glibc {
        oci_arch: "amd64",
        machine: goblin::elf::header::EM_X86_64,
        loader: "/lib64/ld-linux-x86-64.so.2",
        triple: "x86_64-linux-gnu",
        is_64: true,
    },
    Glibc {
        oci_arch: "arm64",
        machine: goblin::elf::header::EM_AARCH64,
        loader: "/lib/ld-linux-aarch64.so.1",
        triple: "aarch64-linux-gnu",
        is_64: true,
    },
    Glibc {
        oci_arch: "arm",
        machine: goblin::elf::header::EM_ARM,
        loader: "/lib/ld-linux-armhf.so.3",
        triple: "arm-linux-gnueabihf",
        is_64: false,
    },
    Glibc {
        oci_arch: "ppc64le",
        machine: goblin::elf::header::EM_PPC64,
        loader: "/lib64/ld64.so.2",
        triple: "powerpc64le-linux-gnu",
        is_64: true,
    },
    Glibc {
        oci_arch: "s390x",
        machine: goblin::elf::header::EM_S390,
        loader: "/lib/ld64.so.1",
        triple: "s390x-linux-gnu",
        is_64: true,
    },
    Glibc {
        oci_arch: "386",
        machine: goblin::elf::header::EM_386,
        loader: "/lib/ld-linux.so.2",
        triple: "i386-linux-gnu",
        is_64: false,
    },
];

impl Glibc {
    /// The glibc of the image's architecture (the config's, else the first
    /// whose loader the image holds), when the image holds its loader.
    fn in_stack(stack: &Stack, arch: Option<&str>) -> Option<&'static Glibc> {
        GLIBC
            .iter()
            .filter(|g| arch.is_none_or(|a| a == g.oci_arch))
            .find(|g| stack.resolve(g.loader).is_some())
    }

    /// Is `path` (a `PT_INTERP`) glibc's dynamic loader? Also under other
    /// directories than the usual (`/usr/lib64/ld-linux-x86-64.so.2`).
    fn is_loader(path: &str) -> bool {
        path.contains("/ld-linux") || GLIBC.iter().any(|g| path == g.loader)
    }

    /// What a program linked against this glibc loads before any library
    /// of its own: the loader, `libc.so.6`, and the files glibc reads at
    /// start (`Runtime::glibc`).
    fn start_files(&self, stack: &Stack, command: &Command, python: bool) -> Vec<(String, Parse)> {
        let search = default_search(Some(self.triple), self.is_64);
        let mut out = vec![(self.loader.to_string(), Parse::Program)];
        let libc: Vec<String> = search.iter().map(|d| format!("{d}/libc.so.6")).collect();
        out.extend(stack.first_file(&libc).map(|(p, ..)| (p, Parse::Program)));
        out.extend(
            Runtime::glibc(stack, command, python, &search)
                .into_iter()
                .map(|f| (f, Parse::Data)),
        );
        out
    }
}

/// Largest file named as an argument that is fetched (a script, not a
/// data set).
const MAX_ARGUMENT_FILE: u64 = 16 << 20;

/// What one fetched file leads to.
#[derive(Debug, Default)]
struct Found {
    needs: Needs,
    /// Modules named by a `.pth` file.
    modules: Vec<String>,
}

/// Fetch the program `command` runs and everything it and its runtime
/// load: every file found is fetched at once, and each fetched program or
/// `.pth` file is parsed for more as soon as it is in.
pub async fn prefetch(stack: &Stack, command: &Command) -> Prefetched {
    let mut out = Prefetched::default();
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    // Files found and not started yet.
    let mut pending: Vec<(String, usize, u64, Parse)> = Vec::new();
    let want = |pending: &mut Vec<_>, path: &str, parse: Parse| {
        if let Some((p, i, ino)) = stack.first_file(&[path.to_string()]) {
            pending.push((p, i, ino, parse));
        }
    };
    let mut python: Option<Python> = None;
    let mut glibc_done = false;
    if let Some((path, i, ino)) = stack.first_file(&command.candidates()) {
        // An interpreter is known by its real name before any byte of it
        // is fetched: its startup files go in the first pending.
        python = Python::from_program(&stack.layer(i).index.path_of(ino));
        if let Some(py) = &python {
            for (f, parse) in py.startup_files(stack) {
                want(&mut pending, &f, parse);
            }
            // CPython as distributions build it is a dynamically linked
            // glibc program when the image has glibc: its loader, libc and
            // glibc's start-up files are known before its bytes are, and
            // fetch alongside it instead of a pending after it.
            if let Some(glibc) = Glibc::in_stack(stack, command.arch.as_deref()) {
                glibc_done = true;
                for (f, parse) in glibc.start_files(stack, command, true) {
                    want(&mut pending, &f, parse);
                }
            }
        }
        pending.insert(0, (path, i, ino, Parse::Program));
        for f in Runtime::CONTAINERD {
            want(&mut pending, f, Parse::Data);
        }
        for f in command.file_arguments() {
            if let Some((p, i, ino)) = stack.first_file(&[f])
                && stack
                    .layer(i)
                    .index
                    .inode(ino)
                    .is_some_and(|n| n.size() <= MAX_ARGUMENT_FILE)
            {
                pending.push((p, i, ino, Parse::Program));
            }
        }
    }
    // No waves in lockstep: a file's follow-ups start as soon as it is
    // parsed, while the rest of what was found with it is still arriving
    // (a program's libraries do not wait for its data files).
    let mut fetches = tokio::task::JoinSet::new();
    loop {
        for (path, i, ino, parse) in pending.drain(..) {
            if out.files.len() >= MAX_FILES || !seen.insert((i, ino)) {
                continue;
            }
            let layer = stack.layer(i).clone();
            let Some(size) = layer.index.inode(ino).map(|n| n.size()) else {
                continue;
            };
            if out.bytes + size > MAX_BYTES {
                continue;
            }
            out.bytes += size;
            out.files.push(path.clone());
            fetches.spawn(async move {
                if let Err(e) = layer.fetch(&[(ino, 0, size)]).await {
                    tracing::debug!(layer = %layer.digest, file = %path, error = %e, "entrypoint prefetch failed");
                    return Found::default();
                }
                if parse == Parse::Data {
                    return Found::default();
                }
                // Parsing reads the file back from the cache (a binary is
                // parsed whole: the dynamic section sits near its end).
                let content = layer.content_path(ino);
                let read = tokio::task::spawn_blocking(move || {
                    std::fs::read(&content).map(|b| match parse {
                        Parse::Pth => Found {
                            modules: pth_imports(&String::from_utf8_lossy(&b)),
                            ..Found::default()
                        },
                        _ => Found {
                            needs: needs_of(&b),
                            ..Found::default()
                        },
                    })
                })
                .await;
                match read {
                    Ok(Ok(found)) => found,
                    _ => Found::default(),
                }
            });
        }
        let Some(done) = fetches.join_next().await else {
            break;
        };
        let Ok(Found { needs, modules }) = done else {
            continue;
        };
        // glibc's loader: the files glibc itself reads at start.
        if !glibc_done && needs.programs.iter().any(|p| Glibc::is_loader(p)) {
            glibc_done = true;
            for f in Runtime::glibc(stack, command, python.is_some(), &needs.search) {
                want(&mut pending, &f, Parse::Data);
            }
        }
        if let Some(py) = &python {
            let dirs = py.site_dirs();
            for m in modules.iter().filter(|m| !py.frozen(m)) {
                if let Some(f) = py.module_file(stack, &dirs, m) {
                    want(&mut pending, &f, Parse::Data);
                }
            }
        }
        for p in needs.programs {
            let found = if p.contains('/') {
                stack.first_file(&[p])
            } else {
                stack.first_file(
                    &Command {
                        program: p,
                        ..command.clone()
                    }
                    .candidates(),
                )
            };
            pending.extend(found.map(|(p, i, ino)| (p, i, ino, Parse::Program)));
        }
        for lib in needs.libraries {
            let paths: Vec<String> = needs.search.iter().map(|d| format!("{d}/{lib}")).collect();
            pending.extend(
                stack
                    .first_file(&paths)
                    .map(|(p, i, ino)| (p, i, ino, Parse::Program)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_comes_from_entrypoint_then_cmd_with_the_config_path() {
        let c: serde_json::Value = serde_json::json!({"config": {
            "Cmd": ["python3"], "Env": ["LANG=C", "PATH=/opt/bin:/usr/bin:relative"], "WorkingDir": "/srv"}});
        let cmd = Command::from_config(&c).unwrap();
        assert_eq!(cmd.program, "python3");
        assert_eq!(cmd.path, ["/opt/bin", "/usr/bin"]);
        assert_eq!(cmd.candidates(), ["/opt/bin/python3", "/usr/bin/python3"]);
        let c: serde_json::Value = serde_json::json!({"config": {
            "Entrypoint": ["./run.sh"], "Cmd": ["x"], "WorkingDir": "/app"}});
        let cmd = Command::from_config(&c).unwrap();
        assert_eq!(cmd.candidates(), ["/app/./run.sh"]);
        assert!(Command::from_config(&serde_json::json!({"config": {}})).is_none());
        let c = serde_json::json!({"config": {"Cmd": ["sh"]}});
        assert_eq!(Command::from_config(&c).unwrap().path.len(), 6);
    }

    #[test]
    fn command_line_environment_and_locale() {
        let c = serde_json::json!({"config": {
            "Entrypoint": ["python3", "-u"], "Cmd": ["app.py", "--port", "80", "/srv/x.conf"],
            "Env": ["LANG=C.UTF-8", "TZ=", "LANG=de_DE.UTF-8"], "WorkingDir": "/srv/"}});
        let cmd = Command::from_config(&c).unwrap();
        assert_eq!(cmd.args, ["-u", "app.py", "--port", "80", "/srv/x.conf"]);
        assert_eq!(cmd.var("LANG"), Some("de_DE.UTF-8"), "the last wins");
        assert_eq!(cmd.var("TZ"), Some(""));
        assert_eq!(cmd.ctype_locale(), Some("de_DE.UTF-8"));
        assert_eq!(
            cmd.file_arguments(),
            ["/srv/app.py", "/srv/80", "/srv/x.conf"]
        );
        let c = serde_json::json!({"config": {"Cmd": ["sh"], "Env": ["LC_ALL=POSIX", "LANG=en_US.UTF-8"]}});
        assert_eq!(Command::from_config(&c).unwrap().ctype_locale(), None);
        assert_eq!(normalize_codeset("C.UTF-8"), "C.utf8");
        assert_eq!(
            normalize_codeset("de_DE.ISO-8859-1@euro"),
            "de_DE.iso88591@euro"
        );
        assert_eq!(normalize_codeset("en_US"), "en_US");
    }

    #[test]
    fn python_is_known_by_its_name_and_finds_its_directories() {
        let py = Python::from_program("/usr/bin/python3.11").unwrap();
        assert_eq!((py.major, py.minor, py.prefix.as_str()), (3, 11, "/usr"));
        assert_eq!(py.stdlib(), "/usr/lib/python3.11");
        assert_eq!(py.tag(), "cpython-311");
        assert!(
            py.site_dirs()
                .contains(&"/usr/lib/python3/dist-packages".to_string())
        );
        assert!(py.frozen("os") && !py.frozen("encodings"));
        let py = Python::from_program("/usr/local/bin/python3.9").unwrap();
        assert_eq!(py.prefix, "/usr/local");
        assert!(
            py.site_dirs()
                .contains(&"/usr/local/lib/python3.9/site-packages".to_string())
        );
        assert!(!py.frozen("os"));
        for not in [
            "/usr/bin/python3",
            "/usr/bin/python2.7",
            "/usr/bin/python3.x",
            "/bin/sh",
        ] {
            assert_eq!(Python::from_program(not), None, "{not}");
        }
    }

    #[test]
    fn pth_files_import_what_their_import_lines_name() {
        // setuptools' distutils-precedence.pth, verbatim.
        let setuptools = "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, 'local') == 'local'; enabled and __import__('_distutils_hack').add_shim(); \n";
        assert_eq!(pth_imports(setuptools), ["os", "_distutils_hack"]);
        let text = "# a comment\n/opt/extra/path\nimport a.b, c as d\n  import not_executed\nimportant/dir\n";
        assert_eq!(pth_imports(text), ["a", "c"]);
        assert!(pth_imports("").is_empty());
    }

    #[test]
    fn scripts_need_their_interpreter_and_the_program_env_runs() {
        let n = needs_of(b"#!/bin/sh -e\necho hi\n");
        assert_eq!(n.programs, ["/bin/sh"]);
        let n = needs_of(b"#!/usr/bin/env -S python3 -u\n");
        assert_eq!(n.programs, ["/usr/bin/env", "python3"]);
        assert_eq!(needs_of(b"plain text"), Needs::default());
    }

    #[test]
    fn a_real_binary_needs_its_loader_and_libraries() {
        // This machine's own /bin/sh (dash): dynamically linked against libc.
        let bytes = std::fs::read("/bin/sh").expect("/bin/sh");
        let n = needs_of(&bytes);
        assert!(n.programs.iter().any(|p| p.contains("ld-linux")), "{n:?}");
        assert!(
            n.libraries.iter().any(|l| l.starts_with("libc.so")),
            "{n:?}"
        );
        assert!(
            n.search.contains(&"/usr/lib/x86_64-linux-gnu".to_string())
                || !cfg!(target_arch = "x86_64")
        );
    }
}
