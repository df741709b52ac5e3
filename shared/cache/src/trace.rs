//! `traces/sha256-<hex>.json`: a learned access trace of one image (by its
//! manifest digest): the files and byte ranges its containers read in
//! their first seconds, in the order they were first read, each named by
//! the layer (its position in the manifest) and the path inside it. The
//! fetcher records one while an image's first containers start, and on a
//! later cold pull fetches the traced ranges in that order as soon as each
//! layer resolves. Traces outlive the eviction of their layers (they are a
//! few KiB); the CLI shows them (`stargaze trace show`).
//!
//! Beside the reads, a trace keeps where their bytes lie in the layer
//! blobs ([`TraceSpan`], derived from the TOCs when it was saved): a
//! later pull reads those spans from its first round trip, before the
//! layers' TOCs are in, and keeps them until each layer resolves.
//!
//! `traces/tails/<hex>` keeps, per layer blob seen on this node, how many
//! bytes at its end hold the footer and TOC ([`Cache::tail_hint`]).
//!
//! A trace only ever decides what is fetched early, never what a read
//! returns (every chunk is still verified against the layer's TOC), and a
//! trace of one image is never used for another: its manifest and layer
//! list must be the image's. Anything else in the file (too large, not
//! JSON, another version, reads of layers it does not list) makes it
//! [`TraceError`], which the fetcher logs once and ignores.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use stargaze_format::Digest;

use crate::Cache;

/// The format's version.
pub const TRACE_VERSION: u32 = 1;
/// Reads one trace keeps at most.
pub const MAX_READS: usize = 16_384;
/// Largest trace file read.
pub const MAX_TRACE_BYTES: u64 = 4 << 20;
/// Largest blob span one trace names: a span is a few files' chunks.
pub const MAX_SPAN_BYTES: u64 = 64 << 20;

/// One image's learned access trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub version: u32,
    /// The reference it was recorded under (for people; not a key).
    pub image: String,
    /// The image's manifest digest (`sha256:<hex>`): the key.
    pub manifest: String,
    /// The image's layer digests, bottom first, as its manifest lists them.
    pub layers: Vec<String>,
    /// The reads, in the order they were first made.
    pub reads: Vec<TraceRead>,
    /// Where the reads' chunks lie in the layer blobs, in the order of the
    /// reads (empty in traces saved without the layers' TOCs at hand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<TraceSpan>,
}

/// Compressed bytes `[start, end)` of the blob of `layers[layer]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceSpan {
    pub layer: u32,
    pub start: u64,
    pub end: u64,
}

/// One read: bytes `[offset, offset + length)` of `path` in `layers[layer]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceRead {
    pub layer: u32,
    pub path: String,
    pub offset: u64,
    pub length: u64,
}

/// A trace file that cannot be used; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "trace {path} is {size} bytes, more than {MAX_TRACE_BYTES}: ignored; delete it to record anew"
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("trace {path} is not a stargaze trace ({reason}): ignored; delete it to record anew")]
    Malformed { path: PathBuf, reason: String },
    #[error("trace {path} is of image {found}, not {wanted}: ignored")]
    Foreign {
        path: PathBuf,
        found: String,
        wanted: String,
    },
}

impl Trace {
    /// An empty trace of an image.
    pub fn new(image: &str, manifest: &str, layers: Vec<String>) -> Trace {
        Trace {
            version: TRACE_VERSION,
            image: image.to_string(),
            manifest: manifest.to_string(),
            layers,
            reads: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// Parse and check a trace's bytes (`path` names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Trace, TraceError> {
        let malformed = |reason: String| TraceError::Malformed {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() as u64 > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge {
                path: path.to_path_buf(),
                size: bytes.len() as u64,
            });
        }
        let t: Trace = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        if t.version != TRACE_VERSION {
            return Err(malformed(format!("version {}", t.version)));
        }
        if t.reads.len() > MAX_READS || t.spans.len() > MAX_READS {
            return Err(malformed(format!(
                "{} reads, {} spans",
                t.reads.len(),
                t.spans.len()
            )));
        }
        if let Some(s) = t.spans.iter().find(|s| {
            s.layer as usize >= t.layers.len()
                || s.start >= s.end
                || s.end - s.start > MAX_SPAN_BYTES
        }) {
            return Err(malformed(format!(
                "a span of layer {} of {}, bytes {}-{}",
                s.layer,
                t.layers.len(),
                s.start,
                s.end
            )));
        }
        if let Some(r) = t.reads.iter().find(|r| {
            r.layer as usize >= t.layers.len() || !r.path.starts_with('/') || r.length == 0
        }) {
            return Err(malformed(format!(
                "a read of layer {} of {}, path {:?}",
                r.layer,
                t.layers.len(),
                r.path
            )));
        }
        Ok(t)
    }

    /// Read and check the trace at `path`, which must be of `manifest`
    /// with these layers.
    pub fn read(path: &Path, manifest: &str, layers: &[String]) -> Result<Trace, TraceError> {
        let io = |source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge {
                path: path.to_path_buf(),
                size,
            });
        }
        let t = Trace::parse(&std::fs::read(path).map_err(io)?, path)?;
        if t.manifest != manifest || t.layers != layers {
            return Err(TraceError::Foreign {
                path: path.to_path_buf(),
                found: t.manifest,
                wanted: manifest.to_string(),
            });
        }
        Ok(t)
    }

    /// Write the trace at `path`, replacing the file at once.
    pub fn write(&self, path: &Path) -> Result<(), TraceError> {
        let io = |source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).map_err(|e| TraceError::Malformed {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Add the reads not in the trace yet, after its own (up to
    /// [`MAX_READS`]).
    pub fn merge(&mut self, reads: impl IntoIterator<Item = TraceRead>) {
        let mut have: std::collections::HashSet<TraceRead> = self.reads.iter().cloned().collect();
        for r in reads {
            if self.reads.len() >= MAX_READS {
                break;
            }
            if have.insert(r.clone()) {
                self.reads.push(r);
            }
        }
    }

    /// The bytes its reads cover (overlaps counted twice).
    pub fn bytes(&self) -> u64 {
        self.reads.iter().map(|r| r.length).sum()
    }
}

impl Cache {
    /// Where traces are kept.
    pub fn traces_dir(&self) -> PathBuf {
        self.root().join("traces")
    }

    /// How many bytes at the end of a layer's blob hold its footer and TOC,
    /// as learned when the layer was last resolved on this node (kept with
    /// the traces, past the layer's eviction): the next pull reads them in
    /// one request instead of a tail window and then the rest of the TOC.
    /// A blob's bytes never change, so this is the blob's own fact, not
    /// anything an image says.
    pub fn tail_hint(&self, layer_digest: &Digest) -> Option<u64> {
        let path = self.tail_hint_path(layer_digest);
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Remember a layer's footer-and-TOC size (see [`Cache::tail_hint`]).
    pub fn set_tail_hint(&self, layer_digest: &Digest, bytes: u64) -> std::io::Result<()> {
        let path = self.tail_hint_path(layer_digest);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes.to_string())?;
        std::fs::rename(&tmp, &path)
    }

    fn tail_hint_path(&self, layer_digest: &Digest) -> PathBuf {
        self.traces_dir().join("tails").join(layer_digest.hex())
    }

    /// The trace file of the image with manifest digest `manifest`
    /// (`None` for a string that is not a sha256 digest).
    pub fn trace_path(&self, manifest: &str) -> Option<PathBuf> {
        let digest: stargaze_format::Digest = manifest.parse().ok()?;
        Some(
            self.traces_dir()
                .join(format!("sha256-{}.json", digest.hex())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(layer: u32, path: &str) -> TraceRead {
        TraceRead {
            layer,
            path: path.into(),
            offset: 0,
            length: 10,
        }
    }

    #[test]
    fn a_trace_round_trips_and_merges_only_new_reads() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_reader(dir.path());
        let m = format!("sha256:{}", "ab".repeat(32));
        let path = cache.trace_path(&m).unwrap();
        let layers = vec!["sha256:l0".to_string(), "sha256:l1".to_string()];
        let mut t = Trace::new("reg/x:1", &m, layers.clone());
        t.merge([read(1, "/a"), read(0, "/b"), read(1, "/a")]);
        assert_eq!(t.reads.len(), 2);
        t.write(&path).unwrap();
        let mut back = Trace::read(&path, &m, &layers).unwrap();
        assert_eq!(back, t);
        back.merge([read(0, "/b"), read(0, "/c")]);
        assert_eq!(back.reads, [read(1, "/a"), read(0, "/b"), read(0, "/c")]);
        assert!(cache.trace_path("sha256:../../etc").is_none());
        assert!(cache.trace_path("latest").is_none());
    }

    #[test]
    fn foreign_huge_and_malformed_traces_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_reader(dir.path());
        let m = format!("sha256:{}", "cd".repeat(32));
        let path = cache.trace_path(&m).unwrap();
        let layers = vec!["sha256:l0".to_string()];
        let mut t = Trace::new("reg/x:1", &m, layers.clone());
        t.merge([read(0, "/a")]);
        t.write(&path).unwrap();
        // Another image's layers, or another manifest.
        let e = Trace::read(&path, &m, &["sha256:other".to_string()]).unwrap_err();
        assert!(matches!(e, TraceError::Foreign { .. }), "{e}");
        let e = Trace::read(&path, "sha256:x", &layers).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        // A read of a layer the image does not have.
        let mut bad = t.clone();
        bad.reads.push(read(7, "/x"));
        bad.write(&path).unwrap();
        assert!(matches!(
            Trace::read(&path, &m, &layers).unwrap_err(),
            TraceError::Malformed { .. }
        ));
        // Spans of a layer it does not list, empty, or larger than any
        // few files.
        for span in [
            TraceSpan {
                layer: 1,
                start: 0,
                end: 10,
            },
            TraceSpan {
                layer: 0,
                start: 10,
                end: 10,
            },
            TraceSpan {
                layer: 0,
                start: 0,
                end: MAX_SPAN_BYTES + 1,
            },
        ] {
            let mut bad = t.clone();
            bad.spans.push(span);
            bad.write(&path).unwrap();
            assert!(
                matches!(
                    Trace::read(&path, &m, &layers).unwrap_err(),
                    TraceError::Malformed { .. }
                ),
                "{span:?}"
            );
        }
        let mut good = t.clone();
        good.spans.push(TraceSpan {
            layer: 0,
            start: 5,
            end: 10,
        });
        good.write(&path).unwrap();
        assert_eq!(Trace::read(&path, &m, &layers).unwrap(), good);
        // Not JSON; too large.
        std::fs::write(&path, b"\x00garbage").unwrap();
        assert!(matches!(
            Trace::read(&path, &m, &layers).unwrap_err(),
            TraceError::Malformed { .. }
        ));
        std::fs::write(&path, vec![b' '; MAX_TRACE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            Trace::read(&path, &m, &layers).unwrap_err(),
            TraceError::TooLarge { .. }
        ));
    }
}
