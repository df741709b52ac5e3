//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stargaze_format::Digest;
use stargaze_format::digest::Hasher;

use crate::OciError;

/// Annotation holding a tag in `index.json` (what skopeo's `oci:DIR:TAG` uses).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation containerd's `ctr image import` reads the image name from.
pub const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// A content descriptor; fields this code does not use (platform, urls,
/// artifactType, data, ...) are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Descriptor {
    pub fn from_value(v: &Value, what: &str) -> Result<Descriptor, OciError> {
        serde_json::from_value(v.clone())
            .map_err(|e| OciError::Invalid(format!("{what}: bad descriptor: {e}")))
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("descriptors serialise")
    }
}

/// An OCI image layout on disk.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OciError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| OciError::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| OciError::io(path, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| OciError::io(path, e))?;
    tmp.persist(path).map_err(|e| OciError::io(path, e.error))?;
    Ok(())
}

impl OciLayout {
    /// Open an existing layout.
    pub fn open(dir: &Path) -> Result<OciLayout, OciError> {
        for f in ["oci-layout", "index.json"] {
            if !dir.join(f).is_file() {
                return Err(OciError::Invalid(format!(
                    "{} is not an OCI image layout (no {f}); create one with `skopeo copy ... oci:{}:TAG`",
                    dir.display(),
                    dir.display()
                )));
            }
        }
        Ok(OciLayout {
            root: dir.to_path_buf(),
        })
    }

    /// Open a layout, creating an empty one if the directory has none.
    pub fn open_or_create(dir: &Path) -> Result<OciLayout, OciError> {
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(|e| OciError::io(dir, e))?;
        if !dir.join("oci-layout").is_file() {
            write_atomic(
                &dir.join("oci-layout"),
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            )?;
        }
        if !dir.join("index.json").is_file() {
            write_atomic(
                &dir.join("index.json"),
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
            )?;
        }
        Self::open(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob of a digest a manifest or caller gives as text is
    /// kept: the text is parsed first ([`OciError::Digest`] names a
    /// malformed one), so nothing but `sha256:<64 hex>` becomes a file
    /// name (no `..`, no other algorithms).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        Ok(self.blob_file(&digest.parse()?))
    }

    /// Where the blob of `digest` is kept (`blobs/sha256/<hex>`).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Read a blob and check its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        let expected: Digest = digest.parse()?;
        let path = self.blob_file(&expected);
        let bytes = std::fs::read(&path).map_err(|e| OciError::io(&path, e))?;
        let actual = Digest::of(&bytes);
        if actual != expected {
            return Err(OciError::BlobDigest {
                digest: digest.to_string(),
                actual: actual.to_string(),
                dir: self.root.clone(),
            });
        }
        Ok(bytes)
    }

    /// Check a (possibly large) blob file's digest by streaming it.
    pub fn verify_blob(&self, digest: &str) -> Result<PathBuf, OciError> {
        let expected: Digest = digest.parse()?;
        let path = self.blob_file(&expected);
        let mut f = std::fs::File::open(&path).map_err(|e| OciError::io(&path, e))?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| OciError::io(&path, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let actual = h.finish();
        if actual != expected {
            return Err(OciError::BlobDigest {
                digest: digest.to_string(),
                actual: actual.to_string(),
                dir: self.root.clone(),
            });
        }
        Ok(path)
    }

    /// Read a JSON blob (manifest, index, config).
    pub fn read_json(&self, digest: &str) -> Result<Value, OciError> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            OciError::Invalid(format!(
                "blob {digest} in {}: not JSON: {e}",
                self.root.display()
            ))
        })
    }

    /// Store bytes as a blob; returns its digest and size.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<(String, u64), OciError> {
        let digest = Digest::of(bytes);
        let path = self.blob_file(&digest);
        if !path.is_file() {
            write_atomic(&path, bytes)?;
        }
        Ok((digest.to_string(), bytes.len() as u64))
    }

    /// Serialise JSON compactly and store it as a blob.
    pub fn write_json(&self, v: &Value) -> Result<(String, u64), OciError> {
        self.write_blob(&serde_json::to_vec(v).expect("JSON values serialise"))
    }

    /// A temporary file beside the blobs, to be [`OciLayout::commit_blob`]ed.
    pub fn temp_blob(&self) -> Result<tempfile::NamedTempFile, OciError> {
        let dir = self.root.join("blobs/sha256");
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(|e| OciError::io(dir, e))
    }

    /// Move a finished temporary blob into place under its digest.
    pub fn commit_blob(&self, tmp: tempfile::NamedTempFile, digest: &str) -> Result<(), OciError> {
        let path = self.blob_path(digest)?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| OciError::io(&path, e))?;
        tmp.persist(&path)
            .map_err(|e| OciError::io(&path, e.error))?;
        Ok(())
    }

    /// Make `digest` from `src` present here (hardlink, else copy).
    pub fn copy_blob_from(&self, src: &OciLayout, digest: &str) -> Result<(), OciError> {
        let to = self.blob_path(digest)?;
        if to.is_file() {
            return Ok(());
        }
        let from = src.blob_path(digest)?;
        if std::fs::hard_link(&from, &to).is_ok() {
            return Ok(());
        }
        let tmp = self.temp_blob()?;
        std::fs::copy(&from, tmp.path()).map_err(|e| OciError::io(&from, e))?;
        self.commit_blob(tmp, digest)
    }

    pub fn index(&self) -> Result<Value, OciError> {
        let path = self.root.join("index.json");
        let bytes = std::fs::read(&path).map_err(|e| OciError::io(&path, e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Invalid(format!("{}: not JSON: {e}", path.display())))
    }

    fn index_entries(&self) -> Result<Vec<Descriptor>, OciError> {
        let index = self.index()?;
        let list = index["manifests"].as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|v| Descriptor::from_value(v, &format!("{}/index.json", self.root.display())))
            .collect()
    }

    /// Tags in `index.json`.
    pub fn tags(&self) -> Result<Vec<String>, OciError> {
        Ok(self
            .index_entries()?
            .into_iter()
            .filter_map(|d| d.annotations.get(REF_NAME).cloned())
            .collect())
    }

    /// The descriptor `tag` names, or the only one when no tag is given.
    pub fn resolve(&self, tag: Option<&str>) -> Result<Descriptor, OciError> {
        let entries = self.index_entries()?;
        let image = match tag {
            Some(t) => format!("oci:{}:{t}", self.root.display()),
            None => format!("oci:{}", self.root.display()),
        };
        match tag {
            Some(t) => entries
                .into_iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
                .ok_or_else(|| OciError::NoSuchTag {
                    image,
                    tag: t.to_string(),
                    dir: self.root.clone(),
                    available: self.tags().map(|t| t.join(", ")).unwrap_or_default(),
                }),
            None => match entries.len() {
                1 => Ok(entries.into_iter().next().expect("one entry")),
                0 => Err(OciError::Invalid(format!(
                    "{image}: the layout holds no image"
                ))),
                n => Err(OciError::Invalid(format!(
                    "{image}: the layout holds {n} images; name one with oci:DIR:TAG (tags: {})",
                    self.tags().map(|t| t.join(", ")).unwrap_or_default()
                ))),
            },
        }
    }

    /// Point `tag` at `desc` in `index.json`, replacing an entry with the
    /// same tag and keeping everything else.
    pub fn set_tag(&self, tag: &str, mut desc: Descriptor) -> Result<(), OciError> {
        desc.annotations
            .insert(REF_NAME.to_string(), tag.to_string());
        let mut index = self.index()?;
        let manifests = index
            .as_object_mut()
            .ok_or_else(|| {
                OciError::Invalid(format!(
                    "{}/index.json is not an object",
                    self.root.display()
                ))
            })?
            .entry("manifests")
            .or_insert_with(|| Value::Array(Vec::new()));
        let list = manifests
            .as_array_mut()
            .ok_or_else(|| OciError::Invalid("index.json: manifests is not a list".into()))?;
        list.retain(|d| d["annotations"][REF_NAME].as_str() != Some(tag));
        list.push(desc.to_value());
        let bytes = serde_json::to_vec(&index).expect("JSON values serialise");
        write_atomic(&self.root.join("index.json"), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_verified_and_digests_checked() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::open_or_create(dir.path()).unwrap();
        let (d, n) = l.write_blob(b"hello").unwrap();
        assert_eq!(n, 5);
        assert_eq!(l.read_blob(&d).unwrap(), b"hello");
        std::fs::write(l.blob_path(&d).unwrap(), b"HELLO").unwrap();
        assert!(matches!(l.read_blob(&d), Err(OciError::BlobDigest { .. })));
        // Malformed digests are refused before they name a file, each
        // error naming the digest.
        let hex = "ab".repeat(32);
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            "md5:abc".to_string(),
            format!("sha256:{}", &hex[1..]),
            format!("sha256:{}", hex.to_uppercase()),
            hex.clone(),
        ] {
            for e in [
                l.blob_path(&bad).unwrap_err(),
                l.read_blob(&bad).unwrap_err(),
                l.verify_blob(&bad).unwrap_err(),
            ] {
                assert!(matches!(e, OciError::Digest(_)), "{bad}: {e}");
                assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
            }
        }
        assert_eq!(
            l.blob_path(&format!("sha256:{hex}")).unwrap(),
            dir.path().join("blobs/sha256").join(&hex)
        );
    }

    #[test]
    fn tags_replace_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let l = OciLayout::open_or_create(dir.path()).unwrap();
        assert!(l.resolve(None).is_err());
        let (d1, n1) = l.write_blob(b"{}").unwrap();
        let desc = Descriptor {
            media_type: crate::media::OCI_MANIFEST.into(),
            digest: d1.clone(),
            size: n1,
            annotations: BTreeMap::new(),
            extra: Default::default(),
        };
        l.set_tag("a", desc.clone()).unwrap();
        l.set_tag("a", desc.clone()).unwrap();
        l.set_tag("b", desc).unwrap();
        assert_eq!(l.tags().unwrap(), ["a", "b"]);
        assert_eq!(l.resolve(Some("a")).unwrap().digest, d1);
        let err = l.resolve(Some("zz")).unwrap_err().to_string();
        assert!(err.contains("zz") && err.contains("a, b"), "{err}");
        assert!(l.resolve(None).is_err(), "two images: a tag is needed");
    }
}
