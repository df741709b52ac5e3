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
        layers: vec![lower.digest.clone(), upper.digest.clone()],
        reads: (0..4)
            .map(|i| read(0, i))
            .chain((0..4).map(|i| read(1, i)))
            .collect(),
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
