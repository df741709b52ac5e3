//! Where images are read from and written to during a conversion: an OCI
//! layout or a registry (see [`crate::registry`]), behind two traits so that
//! the converter walks any source into any destination.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::layout::{Descriptor, OciLayout};
use crate::registry::RegistryImage;
use crate::{OciError, media};

/// A blob as a local file, verified against its digest: the layout's own
/// file, or a download in the spill directory, removed when dropped.
pub enum LocalBlob {
    InPlace(PathBuf),
    Spilled(tempfile::NamedTempFile),
}

impl LocalBlob {
    pub fn path(&self) -> &Path {
        match self {
            LocalBlob::InPlace(p) => p,
            LocalBlob::Spilled(t) => t.path(),
        }
    }
}

/// Bytes done of a transfer: `(done, total)`.
pub type TransferProgress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// An image to read.
pub trait ImageSource: Sync {
    /// The image as the user named it, for messages.
    fn name(&self) -> String;
    /// The descriptor `tag` names (the source's own tag when `None`).
    fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, OciError>;
    /// A manifest or index, verified.
    fn read_manifest(&self, d: &Descriptor) -> Result<Vec<u8>, OciError>;
    /// A small blob (a config), verified.
    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciError>;
    /// A blob as a local file, verified.
    fn local_blob(
        &self,
        d: &Descriptor,
        progress: TransferProgress<'_>,
    ) -> Result<LocalBlob, OciError>;
    fn as_layout(&self) -> Option<&OciLayout> {
        None
    }
    fn as_registry(&self) -> Option<&RegistryImage> {
        None
    }
}

/// An image to write. Blobs go in before the manifests naming them, and
/// manifests before the indexes naming them.
pub trait ImageDest: Sync {
    fn name(&self) -> String;
    /// A file to write a converted layer into (in the spill directory or
    /// beside the destination's blobs).
    fn temp_file(&self) -> Result<tempfile::NamedTempFile, OciError>;
    /// Where compressed inputs are decompressed by default.
    fn scratch_dir(&self) -> PathBuf;
    /// Store a finished layer file under `digest`; `Ok(false)` when the
    /// destination had it already (nothing was sent).
    fn put_layer(
        &self,
        file: tempfile::NamedTempFile,
        digest: &str,
        size: u64,
        progress: TransferProgress<'_>,
    ) -> Result<bool, OciError>;
    /// Store a small blob (a config, an external TOC); its digest and size.
    fn put_blob(&self, bytes: &[u8]) -> Result<(String, u64), OciError>;
    /// Store a manifest or index; its digest and size.
    fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<(String, u64), OciError>;
    /// Carry a blob over unchanged (`local`: the source's bytes already on
    /// disk, when the caller has them). `Ok(false)` when it was there.
    fn copy_blob(
        &self,
        src: &dyn ImageSource,
        d: &Descriptor,
        local: Option<&LocalBlob>,
        progress: TransferProgress<'_>,
    ) -> Result<bool, OciError>;
    /// Carry a manifest of something that is not an image (a signature, an
    /// artifact) over unchanged.
    fn copy_manifest(&self, src: &dyn ImageSource, d: &Descriptor) -> Result<(), OciError>;
    /// Point `tag` at `desc` (written with [`ImageDest::put_manifest`]).
    fn set_tag(&self, tag: &str, desc: &Descriptor) -> Result<(), OciError>;
}

/// Parse a manifest or index read from a source.
pub fn parse_json(bytes: &[u8], what: &str) -> Result<Value, OciError> {
    serde_json::from_slice(bytes).map_err(|e| OciError::Invalid(format!("{what}: not JSON: {e}")))
}

impl ImageSource for OciLayout {
    fn name(&self) -> String {
        format!("oci:{}", self.root().display())
    }

    fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, OciError> {
        OciLayout::resolve(self, tag)
    }

    fn read_manifest(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        OciLayout::read_blob(self, &d.digest)
    }

    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        OciLayout::read_blob(self, digest)
    }

    fn local_blob(&self, d: &Descriptor, _: TransferProgress<'_>) -> Result<LocalBlob, OciError> {
        Ok(LocalBlob::InPlace(self.verify_blob(&d.digest)?))
    }

    fn as_layout(&self) -> Option<&OciLayout> {
        Some(self)
    }
}

impl ImageDest for OciLayout {
    fn name(&self) -> String {
        format!("oci:{}", self.root().display())
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile, OciError> {
        self.temp_blob()
    }

    fn scratch_dir(&self) -> PathBuf {
        self.root().join("blobs/sha256")
    }

    fn put_layer(
        &self,
        file: tempfile::NamedTempFile,
        digest: &str,
        _: u64,
        _: TransferProgress<'_>,
    ) -> Result<bool, OciError> {
        let there = self.has_blob(digest);
        self.commit_blob(file, digest)?;
        Ok(!there)
    }

    fn put_blob(&self, bytes: &[u8]) -> Result<(String, u64), OciError> {
        self.write_blob(bytes)
    }

    fn put_manifest(&self, bytes: &[u8], _: &str) -> Result<(String, u64), OciError> {
        self.write_blob(bytes)
    }

    fn copy_blob(
        &self,
        src: &dyn ImageSource,
        d: &Descriptor,
        local: Option<&LocalBlob>,
        progress: TransferProgress<'_>,
    ) -> Result<bool, OciError> {
        if self.has_blob(&d.digest) {
            return Ok(false);
        }
        if let Some(layout) = src.as_layout() {
            self.copy_blob_from(layout, &d.digest)?;
            return Ok(true);
        }
        if media::is_foreign_layer(&d.media_type) {
            // Not in the registry by design: its descriptor names where it is.
            return Ok(false);
        }
        let spilled;
        let local = match local {
            Some(l) => l,
            None => {
                spilled = src.local_blob(d, progress)?;
                &spilled
            }
        };
        let tmp = self.temp_blob()?;
        std::fs::copy(local.path(), tmp.path()).map_err(|e| OciError::io(local.path(), e))?;
        self.commit_blob(tmp, &d.digest)?;
        Ok(true)
    }

    fn copy_manifest(&self, src: &dyn ImageSource, d: &Descriptor) -> Result<(), OciError> {
        if let Some(layout) = src.as_layout() {
            return self.copy_blob_from(layout, &d.digest);
        }
        let bytes = src.read_manifest(d)?;
        self.write_blob(&bytes)?;
        Ok(())
    }

    fn set_tag(&self, tag: &str, desc: &Descriptor) -> Result<(), OciError> {
        OciLayout::set_tag(self, tag, desc.clone())
    }
}
