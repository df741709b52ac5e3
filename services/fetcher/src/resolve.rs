//! Resolving a layer: footer + TOC → verified tree → TOC index and
//! presence map in the cache.

use std::sync::Arc;

use stargaze_cache::{Cache, PresenceMap, verify_range};
use stargaze_format::footer::{MAX_FOOTER_SIZE, parse_footer};
use stargaze_format::reader::{LayerToc, decode_toc, verify_manifest_checksum};
use stargaze_format::{Digest, Error as FormatError, ErrorKind, Footer};
use stargaze_index::{IndexMeta, LayerIndex, build, write_atomic};

use crate::blob::RemoteBlob;
use crate::engine::Layer;
use crate::error::FetchError;
use crate::options::FetchOptions;

fn blob_err(layer: &str) -> impl Fn(crate::blob::BlobError) -> FetchError + '_ {
    move |source| FetchError::Blob {
        layer: layer.to_string(),
        source,
    }
}

/// What a layer's TOC is checked against: decided for every `Prepare`
/// from its labels, never only for the first one that resolved the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocCheck {
    /// `containerd.io/snapshot/stargz/toc.digest`: the sha256 of the TOC JSON.
    TocDigest(Digest),
    /// zstd:chunked `manifest-checksum` (containers/storage, skopeo,
    /// podman): the sha256 of the compressed TOC, checked before it is
    /// decompressed.
    ManifestChecksum(Digest),
    /// Nothing to check against: the operator allowed unverified layers
    /// (`allow_no_verification` and the skipverify label).
    Unverified,
}

impl TocCheck {
    /// The check for a layer with `expected` as its `toc.digest`;
    /// without one, only where unverified layers are allowed.
    pub fn new(
        layer: &str,
        expected: Option<Digest>,
        allow_unverified: bool,
    ) -> Result<TocCheck, FetchError> {
        match expected {
            Some(d) => Ok(TocCheck::TocDigest(d)),
            None if allow_unverified => Ok(TocCheck::Unverified),
            None => Err(FetchError::NotVerifiable {
                layer: layer.to_string(),
            }),
        }
    }

    /// The TOC digest this check requires, if it names one.
    fn toc_digest(self) -> Option<Digest> {
        match self {
            TocCheck::TocDigest(d) => Some(d),
            TocCheck::ManifestChecksum(_) | TocCheck::Unverified => None,
        }
    }

    /// Does the resolved layer `index` satisfy this check? A layer
    /// resolved for one manifest is served for another only when that
    /// manifest names the same TOC. `None` when the index cannot tell: it
    /// keeps the digest of the TOC JSON, not of the compressed TOC a
    /// manifest checksum covers ([`compressed_toc_digest`] reads that).
    pub fn check_index(self, layer: &str, index: &LayerIndex) -> Option<Result<(), FetchError>> {
        match self {
            TocCheck::TocDigest(expected) if index.toc_digest() != expected => {
                Some(Err(FetchError::Format(FormatError::new(
                    layer,
                    ErrorKind::TocDigestMismatch {
                        expected,
                        actual: index.toc_digest(),
                    },
                ))))
            }
            TocCheck::TocDigest(_) | TocCheck::Unverified => Some(Ok(())),
            TocCheck::ManifestChecksum(_) => None,
        }
    }

    /// Is anything verified?
    pub fn verifies(self) -> bool {
        !matches!(self, TocCheck::Unverified)
    }
}

/// Read footer and TOC, verify, write the index and presence map. A valid
/// index already in the cache (a restart) is reused without touching the
/// registry, as long as its TOC digest matches the expected one.
/// `layer_digest` is parsed here, before anything else: a malformed one is
/// [`FetchError::BadDigest`].
pub async fn resolve_layer(
    cache: Arc<Cache>,
    blob: Arc<dyn RemoteBlob>,
    layer_digest: &str,
    expected_toc: Option<Digest>,
    allow_unverified: bool,
    opts: &FetchOptions,
) -> Result<Layer, FetchError> {
    let digest: Digest = layer_digest.parse()?;
    let check = TocCheck::new(layer_digest, expected_toc, allow_unverified)?;
    resolve_with_toc(cache, blob, &digest, check, None, opts).await
}

/// [`resolve_layer`] with the check already decided; `toc_blob` is, for a
/// layer converted with an external TOC, its layer of the `-esgztoc` image
/// (still verified against `toc.digest`).
pub async fn resolve_with_toc(
    cache: Arc<Cache>,
    blob: Arc<dyn RemoteBlob>,
    layer_digest: &Digest,
    check: TocCheck,
    toc_blob: Option<Vec<u8>>,
    opts: &FetchOptions,
) -> Result<Layer, FetchError> {
    let layer_name = layer_digest.to_string();
    // Reuse a valid index already in the cache (a restart, or a layer
    // resolved before), without touching the registry.
    let reused = {
        let (cache, layer, name) = (cache.clone(), *layer_digest, layer_name.clone());
        tokio::task::spawn_blocking(move || {
            let _writing = cache.writing();
            LayerIndex::open(&cache.index_path(&layer))
                .ok()
                .filter(|i| {
                    i.layer_digest() == name
                        && check.check_index(&name, i).is_some_and(|r| r.is_ok())
                })
                .map(|index| open_presence(&cache, &layer, index))
        })
        .await
        .expect("index open task panicked")
    };
    let (index, presence) = match reused {
        Some(parts) => parts?,
        None => {
            let started = std::time::Instant::now();
            let mut toc = fetch_toc(&*blob, &layer_name, check, toc_blob, opts).await?;
            // Checked and parsed: the JSON (megabytes for a base layer) is
            // not needed while the index is built.
            toc.toc_json = Vec::new();
            let toc_read = started.elapsed();
            // The next pull of this blob reads its footer and TOC at once.
            if let Some(range) = toc.footer.toc_range(toc.blob_size) {
                let tail = toc.blob_size - range.start;
                if tail > opts.tail_window {
                    let (cache, layer) = (cache.clone(), *layer_digest);
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = cache.set_tail_hint(&layer, tail) {
                            tracing::debug!(%layer, error = %e, "the TOC's size is not remembered");
                        }
                    });
                }
            }
            let meta = IndexMeta {
                layer_digest: layer_name.clone(),
                toc_digest: toc.toc_digest,
                blob_size: toc.blob_size,
            };
            let (cache, layer, name) = (cache.clone(), *layer_digest, layer_name.clone());
            // Building a 100k-entry index takes tens of milliseconds.
            tokio::task::spawn_blocking(move || {
                let index_err = |source: stargaze_index::IndexError| {
                    if source.is_out_of_space() {
                        return full(&cache, &layer, &source);
                    }
                    FetchError::Index {
                        layer: name.clone(),
                        source,
                    }
                };
                let path = cache.index_path(&layer);
                // An index of this very TOC (a layer checked by its
                // manifest checksum, which the index cannot show, after a
                // restart) is kept as it is.
                if let Some(index) = LayerIndex::open(&path)
                    .ok()
                    .filter(|i| i.layer_digest() == name && i.toc_digest() == meta.toc_digest)
                {
                    let _writing = cache.writing();
                    return open_presence(&cache, &layer, index);
                }
                let bytes = build(&toc.toc, &meta).map_err(index_err)?;
                let _writing = cache.writing();
                write_atomic(&path, &bytes).map_err(index_err)?;
                let index = LayerIndex::open(&path).map_err(index_err)?;
                open_presence(&cache, &layer, index)
            })
            .await
            .expect("index build task panicked")
            .inspect(|(index, _)| {
                // Resolution is on the path of every cold Prepare: say
                // where its time went.
                tracing::info!(
                    layer = %layer_digest,
                    entries = index.inode_count(),
                    toc_read_ms = toc_read.as_millis() as u64,
                    index_ms = (started.elapsed() - toc_read).as_millis() as u64,
                    "layer resolved"
                );
            })?
        }
    };
    Ok(Layer::new(
        *layer_digest,
        index,
        presence,
        blob,
        cache,
        opts.clone(),
    ))
}

/// The cache's filesystem is full: ask eviction to make room, and say so.
fn full(cache: &Cache, layer_digest: &Digest, error: &dyn std::fmt::Display) -> FetchError {
    cache.note_full();
    FetchError::CacheFull {
        layer: layer_digest.to_string(),
        cache: cache.root().to_path_buf(),
        reason: error.to_string(),
    }
}

/// Open (or create) a layer's presence map, adopt the files other layers
/// already verified and shared, and record the layer's use. Called with
/// the cache's write gate held, so eviction sees either no layer or one it
/// must keep.
fn open_presence(
    cache: &Cache,
    layer_digest: &Digest,
    index: LayerIndex,
) -> Result<(LayerIndex, PresenceMap), FetchError> {
    let presence = PresenceMap::open_rw(
        &cache.presence_path(layer_digest),
        index.chunk_count(),
        layer_digest,
    )
    .map_err(|source| {
        if source.is_out_of_space() {
            return full(cache, layer_digest, &source);
        }
        FetchError::Cache {
            layer: layer_digest.to_string(),
            source,
        }
    })?;
    for ino in 1..=index.inode_count() {
        let Some(n) = index.inode(ino) else { continue };
        let Some(digest) = n.digest() else { continue };
        if !n.is_reg()
            || n.chunk_count() == 0
            || n.chunks().any(|c| presence.is_present(c.global))
            || !cache.is_shared(&digest)
        {
            continue;
        }
        let adopted = cache.adopt(layer_digest, ino, &digest, n.size(), |content| {
            // The shared bytes hash to `digest`; this layer's TOC must
            // describe those very bytes, chunk by chunk.
            n.chunks().all(|c| {
                (n.chunk_count() == 1 && c.size == n.size() && c.digest == digest.0)
                    || verify_range(content, c.file_offset, c.size, &Digest(c.digest))
            })
        });
        if adopted {
            for c in n.chunks() {
                presence.set_present(c.global);
            }
        } else if cache.is_shared(&digest) && !cache.layer_file_path(layer_digest, ino).exists() {
            tracing::warn!(
                layer = %layer_digest,
                file = %index.path_of(ino),
                toc_digest = %digest,
                "the layer's TOC disagrees with the verified content of the digest it gives: the file is fetched for this layer alone"
            );
        }
    }
    cache.touch_layer(layer_digest);
    Ok((index, presence))
}

/// The footer and the compressed TOC (`None` for an external TOC) with as
/// few reads as possible: one tail window, a second read only when the TOC
/// starts before it. Also the blob's size.
async fn read_toc_bytes(
    blob: &dyn RemoteBlob,
    layer: &str,
    opts: &FetchOptions,
) -> Result<(Footer, u64, Option<Vec<u8>>), FetchError> {
    let fmt = |k: ErrorKind| FetchError::Format(FormatError::new(layer, k));
    let want = opts.tail_window.max(MAX_FOOTER_SIZE as u64);
    let (size, tail) = blob.read_tail(want).await.map_err(blob_err(layer))?;
    // A tail read ahead may be longer than asked for (`Cache::tail_hint`).
    let window = tail.len() as u64;
    if window < size.min(want) || window > size {
        return Err(fmt(ErrorKind::BadFooter(
            "short read of the blob's tail".into(),
        )));
    }
    let footer_tail = &tail[tail.len().saturating_sub(MAX_FOOTER_SIZE)..];
    let footer = parse_footer(footer_tail, size).map_err(fmt)?;
    let Some(range) = footer.toc_range(size) else {
        debug_assert!(matches!(footer, Footer::ExternalToc));
        return Ok((footer, size, None));
    };
    let window_start = size - window;
    let compressed = if range.start >= window_start {
        tail[(range.start - window_start) as usize..(range.end - window_start) as usize].to_vec()
    } else {
        // Read what is missing in front of the window, then join.
        let mut head = blob
            .read_ranges(std::slice::from_ref(
                &(range.start..window_start.min(range.end)),
            ))
            .await
            .map_err(blob_err(layer))?
            .pop()
            .unwrap_or_default()
            .to_vec();
        if range.end > window_start {
            head.extend_from_slice(&tail[..(range.end - window_start) as usize]);
        }
        head
    };
    Ok((footer, size, Some(compressed)))
}

/// The footer and TOC, checked as `check` says.
async fn fetch_toc(
    blob: &dyn RemoteBlob,
    layer: &str,
    check: TocCheck,
    toc_blob: Option<Vec<u8>>,
    opts: &FetchOptions,
) -> Result<LayerToc, FetchError> {
    let expected = check.toc_digest();
    let (footer, size, compressed) = read_toc_bytes(blob, layer, opts).await?;
    let (max, layer_name) = (opts.max_toc_size, layer.to_string());
    let Some(compressed) = compressed else {
        let Some(toc_blob) = toc_blob else {
            return Err(FetchError::ExternalToc {
                layer: layer.to_string(),
            });
        };
        if let TocCheck::ManifestChecksum(_) = check {
            return Err(FetchError::Format(FormatError::new(
                layer,
                ErrorKind::ManifestChecksumWrongFormat {
                    format: footer.format(),
                },
            )));
        }
        return tokio::task::spawn_blocking(move || {
            let json = stargaze_format::reader::decode_toc_member(&toc_blob, max)
                .map_err(|k| FormatError::new(&layer_name, k))?;
            LayerToc::from_json(footer, size, json, expected)
                .map_err(|k| FormatError::new(&layer_name, k))
        })
        .await
        .expect("TOC decode task panicked")
        .map_err(FetchError::Format);
    };
    tokio::task::spawn_blocking(move || {
        let err = |k| FormatError::new(&layer_name, k);
        if let TocCheck::ManifestChecksum(sum) = check {
            verify_manifest_checksum(&footer, &compressed, sum).map_err(err)?;
        }
        let json = decode_toc(&footer, &compressed, max).map_err(err)?;
        LayerToc::from_json(footer, size, json, expected).map_err(err)
    })
    .await
    .expect("TOC decode task panicked")
    .map_err(FetchError::Format)
}

/// The sha256 of a resolved layer's compressed TOC, what a zstd:chunked
/// manifest checksum names, read from the blob; the TOC it decompresses to
/// must be the one the layer's index was built from (`index_toc`).
pub async fn compressed_toc_digest(
    blob: &dyn RemoteBlob,
    layer: &str,
    index_toc: Digest,
    opts: &FetchOptions,
) -> Result<Digest, FetchError> {
    let (footer, _, compressed) = read_toc_bytes(blob, layer, opts).await?;
    let err = |k| FetchError::Format(FormatError::new(layer, k));
    let Some(compressed) = compressed else {
        return Err(err(ErrorKind::ManifestChecksumWrongFormat {
            format: footer.format(),
        }));
    };
    let max = opts.max_toc_size;
    let (json, checksum) = tokio::task::spawn_blocking(move || {
        decode_toc(&footer, &compressed, max).map(|j| (Digest::of(&j), Digest::of(&compressed)))
    })
    .await
    .expect("TOC decode task panicked")
    .map_err(err)?;
    if json != index_toc {
        return Err(err(ErrorKind::TocDigestMismatch {
            expected: index_toc,
            actual: json,
        }));
    }
    Ok(checksum)
}
