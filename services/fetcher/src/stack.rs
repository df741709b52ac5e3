//! An image's layers as its containers see them: paths looked up top layer
//! first, through symlinks and whiteouts, as overlayfs will.

use std::sync::Arc;

use stargaze_format::Digest;
use stargaze_index::model::kind;

use crate::engine::Layer;

/// Symlinks followed while resolving one path (Linux's limit).
const MAX_LINKS: u32 = 40;

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

    /// The position of layer `digest`, when it is in the stack and resolved.
    pub fn position(&self, digest: &Digest) -> Option<usize> {
        self.layers
            .iter()
            .position(|l| l.as_ref().is_some_and(|l| l.digest == *digest))
    }

    /// The layer at a position a lookup returned (always resolved).
    pub fn layer(&self, i: usize) -> &Arc<Layer> {
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
    pub fn program_known(&self, candidates: &[String]) -> Option<(Arc<Layer>, u64)> {
        candidates
            .iter()
            .find_map(|path| match self.resolve_known(path) {
                Ok(Some((i, ino))) => Some((self.layer(i).clone(), ino)),
                Ok(None) | Err(Unknown) => None,
            })
    }

    /// The first of `paths` that is a regular file.
    pub fn first_file(&self, paths: &[String]) -> Option<(String, usize, u64)> {
        paths
            .iter()
            .find_map(|p| self.resolve(p).map(|(i, ino)| (p.clone(), i, ino)))
    }
}
