//! A learned trace is replayed in trace order across the image's layers.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stargaze_cache::{Cache, Trace, TraceRead};
use stargaze_fetcher::{BlobError, FetchOptions, FileBlob, RemoteBlob, resolve_layer};

/// Reads of a blob: which layer, when each began, and its ranges.
type Log = Arc<Mutex<Vec<(&'static str, Instant, Vec<Range<u64>>)>>>;

/// A layer's blob behind a link with a round trip per read, logging when
/// each read begins.
struct Logged {
    name: &'static str,
    inner: FileBlob,
    log: Log,
}

#[tonic::async_trait]
impl RemoteBlob for Logged {
    fn name(&self) -> String {
        self.name.into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        self.log
            .lock()
            .push((self.name, Instant::now(), ranges.to_vec()));
        tokio::time::sleep(Duration::from_millis(40)).await;
        self.inner.read_ranges(ranges).await
    }
}

/// Incompressible bytes: a file's compressed size is its size.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A layer of four 1.1 MiB incompressible files `f0`..`f3`, resolved
/// through a [`Logged`] blob.
async fn layer(
    dir: &std::path::Path,
    cache: &Arc<Cache>,
    name: &'static str,
    seed: u64,
    log: &Log,
) -> Arc<stargaze_fetcher::Layer> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..4u64 {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        let data = noise(1_100_000, seed * 10 + i);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, format!("f{i}"), &data[..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut out = Vec::new();
    let res = stargaze_format::convert(name, &tar, &mut out, &Default::default(), None).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &out).unwrap();
    let opts = FetchOptions {
        read_amplify: 0,
        sweep_max_window: 0,
        ..Default::default()
    };
    let blob = Arc::new(Logged {
        name,
        inner: FileBlob::open(&path).unwrap(),
        log: log.clone(),
    });
    Arc::new(
        resolve_layer(
            cache.clone(),
            blob,
            &res.digest.to_string(),
            Some(res.toc_digest),
            false,
            &opts,
        )
        .await
        .unwrap(),
    )
}

/// Two layers resolve together, the upper one first; the trace read the
/// lower layer's files first. The first three calls (the calls in flight
/// at once) are the lower layer's first three files, and nothing of the
/// upper layer is read before they began: the replay follows the trace
/// over all layers, not each layer on its own or in the order the layers
/// resolved (either would read the upper layer from the start). Later
/// calls race each other, so only the first three are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_is_replayed_in_its_order_across_layers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    let log: Log = Arc::default();
    let lower = layer(dir.path(), &cache, "lower", 1, &log).await;
    let upper = layer(dir.path(), &cache, "upper", 2, &log).await;
    log.lock().clear();
    let read = |layer: u32, i: u32| TraceRead {
        layer,
        path: format!("/f{i}"),
        offset: 0,
        length: 1_100_000,
    };
    let trace = Trace {
        version: 1,
        image: "example.com/replay:1".into(),
        manifest: format!("sha256:{}", "0".repeat(64)),
        layers: vec![lower.digest.to_string(), upper.digest.to_string()],
        reads: (0..4)
            .map(|i| read(0, i))
            .chain((0..4).map(|i| read(1, i)))
            .collect(),
        spans: Vec::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut dones = Vec::new();
    for l in [&upper, &lower] {
        let (done, replayed) = tokio::sync::oneshot::channel();
        tx.send((l.clone(), done)).unwrap();
        dones.push(replayed);
    }
    drop(tx);
    stargaze_fetcher::traces::replay(Arc::new(trace), rx).await;
    for d in dones {
        d.await.expect("each layer is told its replay is over");
    }
    // Sweeps are read ahead again.
    assert!(!lower.is_replaying() && !upper.is_replaying());
    let log = log.lock().clone();
    let first_upper = log
        .iter()
        .filter(|(n, ..)| *n == "upper")
        .map(|(_, t, _)| *t)
        .min()
        .unwrap();
    for i in 0..3 {
        let ino = lower.index.lookup_path(&format!("/f{i}")).unwrap();
        let node = lower.index.inode(ino).unwrap();
        let start = node.chunks_in(0, 1).next().unwrap().compressed_offset;
        let began = log
            .iter()
            .filter(|(n, _, ranges)| *n == "lower" && ranges.iter().any(|r| r.contains(&start)))
            .map(|(_, t, _)| *t)
            .min()
            .unwrap_or_else(|| panic!("lower f{i} was never read"));
        assert!(
            began <= first_upper,
            "the upper layer was read before the lower layer's f{i}: {:?}",
            log.iter().map(|(n, ..)| *n).collect::<Vec<_>>()
        );
    }
    // Everything traced is present.
    for l in [&lower, &upper] {
        for i in 0..4 {
            let ino = l.index.lookup_path(&format!("/f{i}")).unwrap();
            let n = l.index.inode(ino).unwrap();
            assert!(
                n.chunks_in(0, n.size())
                    .all(|c| l.presence.is_present(c.global))
            );
        }
    }
}

/// A blob behind a link with a round trip per read that, when `corrupt`,
/// flips a byte of every answer (what a hostile network could do to the
/// bytes read before the layer's TOC could check them).
struct Early {
    inner: FileBlob,
    corrupt: bool,
    log: Log,
}

#[tonic::async_trait]
impl RemoteBlob for Early {
    fn name(&self) -> String {
        "early".into()
    }
    async fn size(&self) -> Result<u64, BlobError> {
        self.inner.size().await
    }
    async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>, BlobError> {
        self.log
            .lock()
            .push(("early", Instant::now(), ranges.to_vec()));
        tokio::time::sleep(Duration::from_millis(40)).await;
        let parts = self.inner.read_ranges(ranges).await?;
        Ok(parts
            .into_iter()
            .map(|p| {
                let mut v = p.to_vec();
                if self.corrupt && !v.is_empty() {
                    let mid = v.len() / 2;
                    v[mid] ^= 0x5a;
                }
                bytes::Bytes::from(v)
            })
            .collect())
    }
}

fn read_of(layer: u32, i: u32) -> TraceRead {
    TraceRead {
        layer,
        path: format!("/f{i}"),
        offset: 0,
        length: 1_100_000,
    }
}

/// A trace of `lower`'s files `files`, with the blob spans the fetcher
/// saves beside the reads.
fn trace_with_spans(lower: &Arc<stargaze_fetcher::Layer>, files: &[u32]) -> Trace {
    let mut trace = Trace::new(
        "example.com/early:1",
        &format!("sha256:{}", "1".repeat(64)),
        vec![lower.digest.to_string()],
    );
    trace.merge(files.iter().map(|&i| read_of(0, i)));
    let l = lower.clone();
    trace.spans =
        stargaze_fetcher::traces::early::spans_of(&trace, move |i| (i == 0).then(|| l.clone()))
            .expect("the layer is resolved");
    trace
}

/// Is file `f<i>` of the layer present, with the bytes it was made of?
fn file_is_right(l: &stargaze_fetcher::Layer, i: u64, seed: u64) -> bool {
    let ino = l.index.lookup_path(&format!("/f{i}")).unwrap();
    let n = l.index.inode(ino).unwrap();
    n.chunks_in(0, n.size())
        .all(|c| l.presence.is_present(c.global))
        && std::fs::read(l.content_path(ino)).unwrap() == noise(1_100_000, seed * 10 + i)
}

/// A layer of files `f0`..`f3` (made from `seed`) in a temporary directory,
/// a trace of `files` with its blob spans, and those spans being read early
/// through a second handle of the layer's blob (`corrupt`: flipping a byte
/// of every answer). Reads of either blob are logged.
struct EarlySetup {
    _dir: tempfile::TempDir,
    log: Log,
    lower: Arc<stargaze_fetcher::Layer>,
    trace: Trace,
    early: Arc<stargaze_fetcher::traces::early::EarlyReads>,
}

async fn early_setup(seed: u64, files: &[u32], corrupt: bool) -> EarlySetup {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    let log: Log = Arc::default();
    let lower = layer(dir.path(), &cache, "lower", seed, &log).await;
    let trace = trace_with_spans(&lower, files);
    log.lock().clear();
    let blob: Arc<dyn RemoteBlob> = Arc::new(Early {
        inner: FileBlob::open(&dir.path().join("lower")).unwrap(),
        corrupt,
        log: log.clone(),
    });
    let early = stargaze_fetcher::traces::early::EarlyReads::start(
        &trace,
        [(0usize, blob)].into_iter().collect(),
    )
    .expect("spans to read");
    EarlySetup {
        _dir: dir,
        log,
        lower,
        trace,
        early,
    }
}

/// The spans of a trace are read before the layer resolves (here: from
/// another handle of its blob), stored when it does, and the replay that
/// follows reads nothing more from the layer's own blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_read_early_are_stored_and_not_read_again() {
    let EarlySetup {
        log,
        lower,
        trace,
        early,
        ..
    } = early_setup(1, &[0, 2], false).await;
    // f0 and f2 lie 1.1 MB apart: one span each.
    assert_eq!(trace.spans.len(), 2, "{:?}", trace.spans);
    // The layer resolves once the early reads (40 ms each) are in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let taken = early.take(0);
    assert!(taken.reading.is_empty());
    assert_eq!(taken.arrived.len(), 2);
    for (at, bytes) in taken.arrived {
        assert!(lower.ingest(at, bytes).await > 0);
    }
    assert!(file_is_right(&lower, 0, 1) && file_is_right(&lower, 2, 1));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (done, replayed) = tokio::sync::oneshot::channel();
    tx.send((lower.clone(), done)).unwrap();
    drop(tx);
    stargaze_fetcher::traces::replay(Arc::new(trace), rx).await;
    replayed.await.unwrap();
    let log = log.lock().clone();
    assert!(
        log.iter().all(|(n, ..)| *n == "early"),
        "the replay read again what was read early: {:?}",
        log.iter()
            .map(|(n, _, r)| (*n, r.clone()))
            .collect::<Vec<_>>()
    );
}

/// Bytes read early that do not match the TOC are never served: their
/// chunks are fetched again from the layer's blob, and readers get the
/// right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_early_bytes_are_fetched_again() {
    let EarlySetup {
        log, lower, early, ..
    } = early_setup(3, &[1], true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (at, bytes) in early.take(0).arrived {
        lower.ingest(at, bytes).await;
    }
    // A reader of the file waits for the chunks fetched again.
    let ino = lower.index.lookup_path("/f1").unwrap();
    lower.fetch(&[(ino, 0, 1_100_000)]).await.unwrap();
    assert!(file_is_right(&lower, 1, 3));
    assert!(
        log.lock().iter().any(|(n, ..)| *n == "lower"),
        "the corrupt chunks were not fetched from the layer's blob"
    );
}

/// A layer that resolves takes its spans still queued off the queue (its
/// replay reads them); it claims the chunks of those on the wire, and a
/// reader of one of them waits for the early bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolved_layer_takes_its_queued_spans_off_the_queue_and_waits_for_the_others() {
    // Four files of 1.1 MB: four requests, three at a time.
    let EarlySetup {
        log, lower, early, ..
    } = early_setup(4, &[0, 1, 2, 3], false).await;
    // The first requests are on the wire (each takes 40 ms).
    tokio::time::sleep(Duration::from_millis(10)).await;
    let taken = early.take(0);
    let handed = taken.arrived.len() + taken.reading.len();
    assert!(handed < 4, "the queued span was read: {handed}");
    // Those on the wire are claimed: a reader of one waits for it instead
    // of reading the layer's blob.
    let mut fills = Vec::new();
    let mut first = None;
    for (ranges, answer) in taken.reading {
        let claims: Vec<_> = ranges.iter().map(|r| lower.reserve(r.clone())).collect();
        first = first.or(ranges.first().map(|r| r.start));
        let l = lower.clone();
        fills.push(tokio::spawn(async move {
            let parts = answer.bytes().await;
            for (i, c) in claims.into_iter().enumerate() {
                l.fill(c, parts.as_ref().and_then(|p| p.get(i).cloned()))
                    .await;
            }
        }));
    }
    let first = first.expect("a span on the wire");
    let (ino, _) = (1..=4)
        .map(|i| lower.index.lookup_path(&format!("/f{}", i - 1)).unwrap())
        .map(|ino| {
            (
                ino,
                lower
                    .index
                    .inode(ino)
                    .unwrap()
                    .chunks_in(0, 1)
                    .next()
                    .unwrap(),
            )
        })
        .find(|(_, c)| c.compressed_offset == first)
        .expect("the span starts a file");
    lower.fetch(&[(ino, 0, 1_100_000)]).await.unwrap();
    for f in fills {
        f.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = log.lock().clone();
    assert_eq!(
        log.len(),
        handed,
        "a span taken off the queue was still read"
    );
    assert!(
        log.iter().all(|(n, ..)| *n == "early"),
        "a chunk on the wire was read again"
    );
}

/// The replay paces itself by its own reads: chunks another read is
/// bringing in (here: claimed for early bytes still on the wire) take none
/// of its calls in flight, so the rest of the trace goes out meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_does_not_wait_on_chunks_others_bring_in() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open_writer(&dir.path().join("cache")).unwrap());
    let log: Log = Arc::default();
    let lower = layer(dir.path(), &cache, "lower", 5, &log).await;
    let trace = trace_with_spans(&lower, &[0, 1, 2, 3]);
    // f0..f2 claimed by early reads that have not come back: as many
    // chunks as the replay has calls in flight.
    let reserved: Vec<_> = (0..3)
        .flat_map(|i| {
            let ino = lower.index.lookup_path(&format!("/f{i}")).unwrap();
            lower.blob_ranges_of(ino, 0, 1_100_000, stargaze_fetcher::Purpose::Trace)
        })
        .map(|r| lower.reserve(r))
        .collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (done, _replayed) = tokio::sync::oneshot::channel();
    tx.send((lower.clone(), done)).unwrap();
    drop(tx);
    let replay = tokio::spawn(stargaze_fetcher::traces::replay(Arc::new(trace), rx));
    let start = Instant::now();
    while !file_is_right(&lower, 3, 5) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "f3 waited behind the chunks being brought in by others"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The early reads failed: their chunks are fetched the normal way.
    for r in reserved {
        lower.fill(r, None).await;
    }
    replay.await.unwrap();
    let f0 = lower.index.lookup_path("/f0").unwrap();
    lower.fetch(&[(f0, 0, 1_100_000)]).await.unwrap();
    assert!((0..4).all(|i| file_is_right(&lower, i, 5)));
}
