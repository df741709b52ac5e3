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
//! it (`goblin`), then fetches its interpreter and libraries together, wave
//! after wave until nothing new is needed. Only files the program will load
//! are fetched: no extra bytes when the container runs the image's command.

use std::collections::HashSet;
use std::sync::Arc;

use stargaze_index::model::kind;

use crate::Layer;

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
    /// The directories of the config's `PATH`.
    pub path: Vec<String>,
    pub workdir: String,
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
        let path = c["Env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.strip_prefix("PATH="))
            .next_back()
            .unwrap_or(DEFAULT_PATH);
        Some(Command {
            program,
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
        })
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

/// An image's layers as its containers see them: top layer first.
pub struct Stack {
    layers: Vec<Arc<Layer>>,
}

impl Stack {
    pub fn new(top_first: Vec<Arc<Layer>>) -> Stack {
        Stack { layers: top_first }
    }

    /// The top-most entry at exactly `path` (no symlink followed):
    /// `None` when no layer has it or a whiteout hides it.
    fn entry(&self, path: &str) -> Option<(usize, u64)> {
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(ino) = layer.index.lookup_path(path) {
                let node = layer.index.inode(ino)?;
                if node.kind() == kind::CHAR && node.rdev() == (0, 0) {
                    return None;
                }
                return Some((i, ino));
            }
        }
        None
    }

    /// The regular file `path` names, following symlinks in any component
    /// and across layers: `(layer position, inode)`.
    pub fn resolve(&self, path: &str) -> Option<(usize, u64)> {
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
            let (i, ino) = self.entry(&candidate)?;
            let node = self.layers[i].index.inode(ino)?;
            if let Some(target) = node.symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                let target = std::str::from_utf8(target).ok()?;
                if target.starts_with('/') {
                    done.clear();
                }
                pending.extend(target.rsplit('/').map(str::to_string));
            } else if node.is_dir() {
                done.push(comp);
            } else if node.is_reg() && pending.iter().all(|c| c.is_empty() || c == ".") {
                return Some((i, ino));
            } else {
                return None;
            }
        }
        None
    }

    /// The first of `paths` that is a regular file.
    fn first_file(&self, paths: &[String]) -> Option<(String, usize, u64)> {
        paths
            .iter()
            .find_map(|p| self.resolve(p).map(|(i, ino)| (p.clone(), i, ino)))
    }
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
    let triple = match elf.header.e_machine {
        goblin::elf::header::EM_X86_64 => Some("x86_64-linux-gnu"),
        goblin::elf::header::EM_AARCH64 => Some("aarch64-linux-gnu"),
        goblin::elf::header::EM_ARM => Some("arm-linux-gnueabihf"),
        goblin::elf::header::EM_PPC64 => Some("powerpc64le-linux-gnu"),
        goblin::elf::header::EM_S390 => Some("s390x-linux-gnu"),
        goblin::elf::header::EM_386 => Some("i386-linux-gnu"),
        _ => None,
    };
    if let Some(t) = triple {
        needs.search.push(format!("/lib/{t}"));
        needs.search.push(format!("/usr/lib/{t}"));
    }
    let lib64 = if elf.is_64 {
        ["/lib64", "/usr/lib64"]
    } else {
        ["/lib32", "/usr/lib32"]
    };
    needs.search.extend(lib64.map(str::to_string));
    needs
        .search
        .extend(["/lib", "/usr/lib", "/usr/local/lib"].map(str::to_string));
    needs
}

/// Fetch the program `command` runs and everything it loads, wave by wave:
/// each wave's files in parallel, then parsed for the next wave.
pub async fn prefetch(stack: &Stack, command: &Command) -> Prefetched {
    let mut out = Prefetched::default();
    let mut seen: HashSet<(usize, u64)> = HashSet::new();
    let mut wave: Vec<(String, usize, u64)> = stack
        .first_file(&command.candidates())
        .into_iter()
        .collect();
    while !wave.is_empty() {
        let mut fetches = tokio::task::JoinSet::new();
        for (path, i, ino) in wave.drain(..) {
            if out.files.len() >= MAX_FILES || !seen.insert((i, ino)) {
                continue;
            }
            let layer = stack.layers[i].clone();
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
                    return Needs::default();
                }
                // Parsing reads the file back from the cache (a binary is
                // parsed whole: the dynamic section sits near its end).
                let content = layer.content_path(ino);
                match tokio::task::spawn_blocking(move || std::fs::read(&content).map(|b| needs_of(&b)))
                .await
                {
                    Ok(Ok(needs)) => needs,
                    _ => Needs::default(),
                }
            });
        }
        while let Some(done) = fetches.join_next().await {
            let Ok(needs) = done else { continue };
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
                wave.extend(found);
            }
            for lib in needs.libraries {
                let paths: Vec<String> =
                    needs.search.iter().map(|d| format!("{d}/{lib}")).collect();
                wave.extend(stack.first_file(&paths));
            }
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
