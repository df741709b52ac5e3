//! `layers/<hex>/source.json`: where a resolved layer comes from (image,
//! the annotations it was checked by, whether it may be unverified), so
//! that a restarted fetcher can resolve again, from its index in the cache
//! and without asking anyone, the layers fs still has attached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stargaze_format::Digest;

use crate::Cache;

/// A layer's saved source. Fields missing from the file read as empty, so
/// that files written by older fetchers still load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSource {
    /// The image reference the layer was resolved for.
    #[serde(default)]
    pub image_ref: String,
    /// The layer's digest (`sha256:<hex>`) as recorded, for whoever reads
    /// the file; the file's place, not this field, says whose it is (older
    /// fetchers' files may hold anything here).
    #[serde(default)]
    pub digest: String,
    /// The annotations its TOC was checked by.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The request allowed an unverified layer.
    #[serde(default)]
    pub allow_unverified: bool,
}

/// A source file that cannot be read or written; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "layer source {path}: {source}; the layer's reads fail after a restart until it is resolved again"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "layer source {path} is not valid ({source}); delete it: the layer is recorded anew when it is resolved again"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Cache {
    /// Where a layer's source is saved.
    pub fn source_path(&self, layer_digest: &Digest) -> PathBuf {
        self.layer_dir(layer_digest).join("source.json")
    }

    /// Save `source` as the source of layer `layer_digest`, replacing the
    /// file at once (a reader sees the old file or the new one, whole).
    /// Not synced: a source lost in a crash costs one resolve, not data.
    pub fn save_source(
        &self,
        layer_digest: &Digest,
        source: &LayerSource,
    ) -> Result<(), SourceError> {
        let path = self.source_path(layer_digest);
        let io = |source| SourceError::Io {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec(source).map_err(|source| SourceError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// The saved source of a layer; `None` when none was saved.
    pub fn load_source(&self, layer_digest: &Digest) -> Result<Option<LayerSource>, SourceError> {
        read(&self.source_path(layer_digest))
    }
}

fn read(path: &Path) -> Result<Option<LayerSource>, SourceError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SourceError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| SourceError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYER: Digest = Digest([0x11; 32]);

    fn cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_writer(dir.path()).unwrap();
        std::fs::create_dir_all(cache.layer_dir(&LAYER)).unwrap();
        (dir, cache)
    }

    #[test]
    fn a_saved_source_loads_as_it_was_saved() {
        let (_dir, cache) = cache();
        assert_eq!(cache.load_source(&LAYER).unwrap(), None);
        let source = LayerSource {
            image_ref: "registry.local/app:1".into(),
            digest: LAYER.to_string(),
            annotations: [(
                "containerd.io/snapshot/stargz/toc.digest".into(),
                "x".into(),
            )]
            .into_iter()
            .collect(),
            allow_unverified: true,
        };
        cache.save_source(&LAYER, &source).unwrap();
        assert_eq!(cache.load_source(&LAYER).unwrap(), Some(source));
        assert!(
            !cache
                .source_path(&LAYER)
                .with_extension("json.tmp")
                .exists()
        );
    }

    /// Files written before the type existed (and by older fetchers,
    /// without some fields) still load.
    #[test]
    fn files_of_older_fetchers_load() {
        let (_dir, cache) = cache();
        std::fs::write(
            cache.source_path(&LAYER),
            r#"{"image_ref":"r/i:t","digest":"d","annotations":{"k":"v"},"allow_unverified":false}"#,
        )
        .unwrap();
        let s = cache.load_source(&LAYER).unwrap().unwrap();
        assert_eq!(
            (s.image_ref.as_str(), s.annotations["k"].as_str()),
            ("r/i:t", "v")
        );
        std::fs::write(cache.source_path(&LAYER), r#"{"image_ref":"r/i:t"}"#).unwrap();
        let s = cache.load_source(&LAYER).unwrap().unwrap();
        assert!(s.annotations.is_empty() && !s.allow_unverified);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let (_dir, cache) = cache();
        std::fs::write(cache.source_path(&LAYER), "{not json").unwrap();
        let e = cache.load_source(&LAYER).unwrap_err();
        assert!(matches!(e, SourceError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("source.json"), "{e}");
    }
}
