//! Errors of the format library.
//!
//! Every error a caller sees is an [`Error`]: the layer it concerns (a digest,
//! a file path, whatever name the caller gave) plus an [`ErrorKind`] that says
//! what is wrong and, where there is one, what to do about it. Internal
//! functions return bare `ErrorKind`s and the public entry points attach the
//! layer name, so no message ever lacks it.

use std::io;

use crate::digest::Digest;
use crate::footer::LayerFormat;

/// An error about one layer.
#[derive(Debug, thiserror::Error)]
#[error("layer {layer}: {kind}")]
pub struct Error {
    /// What the caller called the layer (digest, path or reference).
    pub layer: String,
    #[source]
    pub kind: ErrorKind,
}

impl Error {
    pub fn new(layer: impl Into<String>, kind: ErrorKind) -> Error {
        Error {
            layer: layer.into(),
            kind,
        }
    }
}

/// What went wrong, without the layer name.
#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    /// None of the known footers matched: the layer is not lazily pullable.
    #[error(
        "not an eStargz, legacy stargz or zstd:chunked layer ({0}); convert the image with `stargaze convert` or pull it normally"
    )]
    NotLazy(String),

    #[error("bad footer: {0}")]
    BadFooter(String),

    /// The layer keeps its TOC in a separate TOC image.
    #[error(
        "the TOC is stored outside the blob (external TOC footer); it must be fetched from the `<ref>-esgztoc` image"
    )]
    ExternalTocRequired,

    #[error(
        "TOC digest mismatch: the layer annotation says {expected} but the TOC in the blob hashes to {actual}; the image was modified after conversion or the registry served other bytes"
    )]
    TocDigestMismatch { expected: Digest, actual: Digest },

    #[error(
        "zstd:chunked manifest checksum mismatch: the layer annotation (io.github.containers.zstd-chunked.manifest-checksum or io.containers.zstd-chunked.manifest-checksum) says {expected} but the compressed TOC in the blob hashes to {actual}; the image was modified after it was written or the registry served other bytes"
    )]
    ManifestChecksumMismatch { expected: Digest, actual: Digest },

    #[error(
        "the layer is annotated with a zstd:chunked manifest checksum but is a {format} layer; the checksum cannot verify its TOC"
    )]
    ManifestChecksumWrongFormat { format: LayerFormat },

    #[error(
        "TOC is {size} bytes, more than the limit of {limit} bytes; raise the limit if the layer is trusted"
    )]
    TocTooLarge { size: u64, limit: u64 },

    #[error("cannot decode the TOC: {0}")]
    TocDecode(String),

    #[error("TOC JSON is invalid: {0}")]
    TocJson(String),

    #[error("TOC entry {entry:?}: {reason}")]
    InvalidEntry { entry: String, reason: String },

    #[error("file {file:?}, chunk at offset {offset}: {reason}")]
    Chunk {
        file: String,
        offset: u64,
        reason: String,
    },

    #[error(
        "file {file:?}, chunk at offset {offset}: content digest mismatch (TOC says {expected}, data hashes to {actual}); the blob is corrupt or was tampered with"
    )]
    ChunkDigestMismatch {
        file: String,
        offset: u64,
        expected: Digest,
        actual: Digest,
    },

    #[error("tar stream at byte {offset}: {reason}")]
    Tar { offset: u64, reason: String },

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl ErrorKind {
    pub fn io(context: impl Into<String>, source: io::Error) -> ErrorKind {
        ErrorKind::Io {
            context: context.into(),
            source,
        }
    }

    pub fn entry(entry: impl Into<String>, reason: impl Into<String>) -> ErrorKind {
        ErrorKind::InvalidEntry {
            entry: entry.into(),
            reason: reason.into(),
        }
    }

    pub fn tar(offset: u64, reason: impl Into<String>) -> ErrorKind {
        ErrorKind::Tar {
            offset,
            reason: reason.into(),
        }
    }

    pub fn chunk(file: impl Into<String>, offset: u64, reason: impl Into<String>) -> ErrorKind {
        ErrorKind::Chunk {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }

    /// Attach the layer name.
    pub fn layer(self, layer: impl Into<String>) -> Error {
        Error::new(layer, self)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
