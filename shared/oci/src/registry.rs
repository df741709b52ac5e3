//! An image in a registry (`docker://REF`) as a conversion source or
//! destination, through `stargaze_registry`'s client (docker config and
//! credential helpers, hosts.toml, bearer tokens).
//!
//! Layers pass through a spill directory, one at a time: a download lands
//! there, is converted, the result is uploaded and both files are removed.
//! Blobs the destination has are not sent again; blobs of another
//! repository on the same registry are mounted instead of uploaded.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use stargaze_registry::{Client, Reference, RegistryError, UploadSource};
use tokio::runtime::Handle;

use crate::layout::Descriptor;
use crate::store::{ImageDest, ImageSource, LocalBlob, TransferProgress};
use crate::{OciError, media};

/// Largest config or manifest read into memory.
const MAX_SMALL_BLOB: u64 = 16 << 20;

/// What a destination registry was sent.
#[derive(Debug, Default)]
pub struct PushStats {
    /// Blobs uploaded, and their bytes.
    pub uploaded: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    /// Blobs the registry had already (not sent).
    pub existing: AtomicU64,
    /// Blobs mounted from another repository of the same registry.
    pub mounted: AtomicU64,
    /// Manifests and indexes pushed (by digest and by tag).
    pub manifests: AtomicU64,
}

/// One repository of a registry, read or written.
pub struct RegistryImage {
    client: Client,
    reference: Reference,
    rt: Handle,
    spill: PathBuf,
    /// Manifests read or pushed, by digest: (media type, bytes).
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    pub stats: PushStats,
}

impl RegistryImage {
    /// `reference` through `client`; `spill` holds layers in transit;
    /// `rt` runs the client (the caller must not be one of its threads).
    pub fn new(client: Client, reference: Reference, rt: Handle, spill: &Path) -> RegistryImage {
        RegistryImage {
            client,
            reference,
            rt,
            spill: spill.to_path_buf(),
            manifests: Mutex::new(HashMap::new()),
            stats: PushStats::default(),
        }
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    fn err(&self, source: RegistryError) -> OciError {
        OciError::Registry {
            image: format!("docker://{}", self.reference),
            error: Box::new(source),
        }
    }

    fn spill_file(&self) -> Result<tempfile::NamedTempFile, OciError> {
        tempfile::Builder::new()
            .prefix(".stargaze-spill-")
            .tempfile_in(&self.spill)
            .map_err(|e| OciError::io(&self.spill, e))
    }

    fn remember(&self, digest: &str, media_type: &str, bytes: Bytes) {
        self.manifests
            .lock()
            .expect("manifests")
            .insert(digest.to_string(), (media_type.to_string(), bytes));
    }

    fn exists(&self, digest: &str) -> Result<bool, OciError> {
        self.rt
            .block_on(self.client.blob_exists(&self.reference, digest))
            .map_err(|e| self.err(e))
    }

    fn upload(
        &self,
        digest: &str,
        size: u64,
        source: UploadSource<'_>,
        progress: TransferProgress<'_>,
    ) -> Result<(), OciError> {
        let p = |sent: u64| progress(sent, size);
        self.rt
            .block_on(
                self.client
                    .push_blob(&self.reference, digest, size, source, &p),
            )
            .map_err(|e| self.err(e))?;
        self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
        self.stats.uploaded_bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }
}

impl ImageSource for RegistryImage {
    fn name(&self) -> String {
        format!("docker://{}", self.reference)
    }

    fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, OciError> {
        let object = tag.unwrap_or(self.reference.object());
        let m = self
            .rt
            .block_on(self.client.fetch_manifest(&self.reference, object))
            .map_err(|e| self.err(e))?;
        let media_type = if m.media_type.is_empty() {
            media::OCI_MANIFEST.to_string()
        } else {
            m.media_type.clone()
        };
        let desc = Descriptor {
            media_type: media_type.clone(),
            digest: m.digest.clone(),
            size: m.bytes.len() as u64,
            annotations: Default::default(),
            extra: Default::default(),
        };
        self.remember(&m.digest, &media_type, m.bytes);
        Ok(desc)
    }

    fn read_manifest(&self, d: &Descriptor) -> Result<Vec<u8>, OciError> {
        if let Some((_, b)) = self.manifests.lock().expect("manifests").get(&d.digest) {
            return Ok(b.to_vec());
        }
        let m = self
            .rt
            .block_on(self.client.fetch_manifest(&self.reference, &d.digest))
            .map_err(|e| self.err(e))?;
        Ok(m.bytes.to_vec())
    }

    fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        let b = self
            .rt
            .block_on(
                self.client
                    .fetch_blob(&self.reference, digest, MAX_SMALL_BLOB),
            )
            .map_err(|e| self.err(e))?;
        Ok(b.to_vec())
    }

    fn local_blob(
        &self,
        d: &Descriptor,
        progress: TransferProgress<'_>,
    ) -> Result<LocalBlob, OciError> {
        let tmp = self.spill_file()?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        let mut done = 0u64;
        let total = d.size;
        let mut sink = |bytes: &[u8]| {
            out.write_all(bytes)?;
            done += bytes.len() as u64;
            progress(done, total);
            Ok(())
        };
        let size = self
            .rt
            .block_on(
                self.client
                    .download_blob(&self.reference, &d.digest, &mut sink),
            )
            .map_err(|e| self.err(e))?;
        out.flush().map_err(|e| OciError::io(tmp.path(), e))?;
        drop(out);
        if size != d.size {
            return Err(OciError::Invalid(format!(
                "{}: blob {} is {size} bytes, its descriptor says {}",
                ImageSource::name(self),
                d.digest,
                d.size
            )));
        }
        Ok(LocalBlob::Spilled(tmp))
    }

    fn as_registry(&self) -> Option<&RegistryImage> {
        Some(self)
    }
}

impl ImageDest for RegistryImage {
    fn name(&self) -> String {
        format!("docker://{}", self.reference)
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile, OciError> {
        self.spill_file()
    }

    fn scratch_dir(&self) -> PathBuf {
        self.spill.clone()
    }

    fn put_layer(
        &self,
        file: tempfile::NamedTempFile,
        digest: &str,
        size: u64,
        progress: TransferProgress<'_>,
    ) -> Result<bool, OciError> {
        if self.exists(digest)? {
            self.stats.existing.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        self.upload(digest, size, UploadSource::File(file.path()), progress)?;
        Ok(true)
    }

    fn put_blob(&self, bytes: &[u8]) -> Result<(String, u64), OciError> {
        let digest = stargaze_format::Digest::of(bytes).to_string();
        let size = bytes.len() as u64;
        if self.exists(&digest)? {
            self.stats.existing.fetch_add(1, Ordering::Relaxed);
        } else {
            self.upload(
                &digest,
                size,
                UploadSource::Bytes(Bytes::copy_from_slice(bytes)),
                &|_, _| {},
            )?;
        }
        Ok((digest, size))
    }

    fn put_manifest(&self, bytes: &[u8], media_type: &str) -> Result<(String, u64), OciError> {
        let digest = stargaze_format::Digest::of(bytes).to_string();
        let b = Bytes::copy_from_slice(bytes);
        self.rt
            .block_on(
                self.client
                    .push_manifest(&self.reference, &digest, media_type, b.clone()),
            )
            .map_err(|e| self.err(e))?;
        self.stats.manifests.fetch_add(1, Ordering::Relaxed);
        self.remember(&digest, media_type, b);
        Ok((digest, bytes.len() as u64))
    }

    fn copy_blob(
        &self,
        src: &dyn ImageSource,
        d: &Descriptor,
        local: Option<&LocalBlob>,
        progress: TransferProgress<'_>,
    ) -> Result<bool, OciError> {
        if media::is_foreign_layer(&d.media_type) {
            // Non-distributable: registries do not take them.
            return Ok(false);
        }
        if self.exists(&d.digest)? {
            self.stats.existing.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        if let Some(from) = src.as_registry()
            && from.reference.host == self.reference.host
        {
            match self.rt.block_on(self.client.mount_blob(
                &self.reference,
                &d.digest,
                &from.reference.repository,
            )) {
                Ok(true) => {
                    self.stats.mounted.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                Ok(false) => {}
                // No pull access to the other repository, or mounts
                // refused: upload the blob instead.
                Err(e @ (RegistryError::Status { .. } | RegistryError::Unauthorized { .. })) => {
                    tracing::debug!(blob = %d.digest, error = %e, "mount refused; uploading");
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        let spilled;
        let local = match local {
            Some(l) => l,
            None => {
                spilled = src.local_blob(d, progress)?;
                &spilled
            }
        };
        self.upload(
            &d.digest,
            d.size,
            UploadSource::File(local.path()),
            progress,
        )?;
        Ok(true)
    }

    fn copy_manifest(&self, src: &dyn ImageSource, d: &Descriptor) -> Result<(), OciError> {
        let bytes = src.read_manifest(d)?;
        self.put_manifest(&bytes, &d.media_type)?;
        Ok(())
    }

    fn set_tag(&self, tag: &str, desc: &Descriptor) -> Result<(), OciError> {
        let (media_type, bytes) = self
            .manifests
            .lock()
            .expect("manifests")
            .get(&desc.digest)
            .cloned()
            .ok_or_else(|| {
                OciError::Invalid(format!(
                    "{}: manifest {} was not pushed before its tag {tag}",
                    ImageSource::name(self),
                    desc.digest
                ))
            })?;
        self.rt
            .block_on(
                self.client
                    .push_manifest(&self.reference, tag, &media_type, bytes),
            )
            .map_err(|e| self.err(e))?;
        self.stats.manifests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
