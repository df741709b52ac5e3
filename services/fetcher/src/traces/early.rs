//! Early reads: a trace's blob spans ([`Trace::spans`]: where the traced
//! reads' chunks lie in the layer blobs) read from the registry as soon as
//! the trace is known, alongside the layers' footers and TOCs and before
//! any layer resolves, so that the link carries what the image's programs
//! will read from the pull's first round trips instead of waiting for the
//! TOCs. Spans go out in trace order, grouped per layer into requests of
//! about [`GROUP_BYTES`], [`PARALLEL`] at a time, up to [`BUDGET`] bytes
//! per pull; the bytes wait in memory for their layer.
//!
//! When a layer resolves, [`EarlyReads::take`] takes its spans still
//! queued off the queue (its replay reads those) and hands over the
//! others: the layer stores those that arrived like fetched chunks
//! (`Layer::ingest`: decoded and verified against its TOC, so a span only
//! ever decides which bytes are read early, never what a read returns),
//! and claims the chunks of those still on the wire at once
//! (`Layer::reserve`), so that a reader or the replay waits for them
//! instead of reading them a second time, and stores them when they come
//! (`Layer::fill`). Spans of a layer that never resolves are dropped with
//! the pull.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use stargaze_cache::Trace;
use tokio::sync::watch;

use crate::blob::RemoteBlob;
use crate::purpose::{FETCHED, Purpose};

/// Bytes read early per pull at most: a trace names what programs read
/// in their first seconds, rarely more; a forged one costs no more.
pub const BUDGET: u64 = 64 << 20;
/// Compressed bytes per request: as in the replay (`REPLAY_CALL_BYTES`).
pub const GROUP_BYTES: u64 = 1 << 20;
/// Requests in flight.
pub const PARALLEL: usize = 3;
/// Ranges per request at most: a `Range` header registries accept.
const GROUP_RANGES: usize = 64;
/// A range this close after a layer's previous span joins it: fewer parts
/// per request, few bytes nobody asked for (the engine's `merge_gap` is
/// for reads that wait; these are planned).
const SPAN_GAP: u64 = 16 << 10;

/// One request: ranges of one layer's blob.
struct Group {
    layer: usize,
    ranges: Vec<Range<u64>>,
}

/// A request's answer: one buffer per range (`None`: it failed).
type Answer = watch::Receiver<Option<Option<Arc<Vec<Bytes>>>>>;

#[derive(Default)]
struct State {
    queue: VecDeque<Group>,
    /// Requests on the wire, by id: layer, ranges, answer.
    reading: HashMap<u64, (usize, Vec<Range<u64>>, Answer)>,
    next_id: u64,
    /// What arrived for layers not resolved yet: `(blob offset, bytes)`.
    arrived: HashMap<usize, Vec<(u64, Bytes)>>,
}

/// One pull's early reads.
pub struct EarlyReads {
    state: Mutex<State>,
}

/// What a resolved layer takes over: spans that arrived, and spans still
/// on the wire with their answer to come.
#[derive(Default)]
pub struct Taken {
    pub arrived: Vec<(u64, Bytes)>,
    pub reading: Vec<(Vec<Range<u64>>, Pending)>,
}

/// The answer of a request still on the wire.
pub struct Pending(Answer);

impl Pending {
    /// One buffer per range, once in (`None`: the read failed).
    pub async fn bytes(mut self) -> Option<Arc<Vec<Bytes>>> {
        self.0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone().flatten())
    }
}

impl EarlyReads {
    /// Start reading `trace`'s spans of the layers `blobs` has a blob for
    /// (by position in `trace.layers`: the layers resolved ahead of their
    /// Prepare); `None` when there is nothing to read.
    pub fn start(
        trace: &Trace,
        blobs: HashMap<usize, Arc<dyn RemoteBlob>>,
    ) -> Option<Arc<EarlyReads>> {
        let queue = groups(trace, &blobs);
        if queue.is_empty() {
            return None;
        }
        let me = Arc::new(EarlyReads {
            state: Mutex::new(State {
                queue,
                ..Default::default()
            }),
        });
        tokio::spawn(me.clone().run(blobs));
        Some(me)
    }

    async fn run(self: Arc<Self>, blobs: HashMap<usize, Arc<dyn RemoteBlob>>) {
        let mut wire = tokio::task::JoinSet::new();
        loop {
            while wire.len() < PARALLEL {
                let Some((id, group, tx)) = ({
                    let mut st = self.state.lock();
                    st.queue.pop_front().map(|g| {
                        let id = st.next_id;
                        st.next_id += 1;
                        let (tx, rx) = watch::channel(None);
                        st.reading.insert(id, (g.layer, g.ranges.clone(), rx));
                        (id, g, tx)
                    })
                }) else {
                    break;
                };
                let blob = blobs[&group.layer].clone();
                wire.spawn(async move {
                    let read = blob.read_ranges(&group.ranges).await;
                    let parts = match read {
                        Ok(parts)
                            if parts.len() == group.ranges.len()
                                && parts
                                    .iter()
                                    .zip(&group.ranges)
                                    .all(|(p, r)| p.len() as u64 == r.end - r.start) =>
                        {
                            FETCHED.add(Purpose::Trace, parts.iter().map(|p| p.len() as u64).sum());
                            Some(Arc::new(parts))
                        }
                        // The layer's replay reads these once it resolves.
                        Ok(_) => {
                            tracing::debug!(blob = %blob.name(), "an early read came back short");
                            None
                        }
                        Err(e) => {
                            tracing::debug!(blob = %blob.name(), error = %e, "an early read failed");
                            None
                        }
                    };
                    let _ = tx.send(Some(parts.clone()));
                    (id, parts)
                });
            }
            let Some(joined) = wire.join_next().await else {
                break;
            };
            let Ok((id, parts)) = joined else {
                continue;
            };
            let mut st = self.state.lock();
            // Gone: its layer took it while it was on the wire.
            let Some((layer, ranges, _)) = st.reading.remove(&id) else {
                continue;
            };
            if let Some(parts) = parts {
                let arrived = st.arrived.entry(layer).or_default();
                arrived.extend(ranges.iter().map(|r| r.start).zip(parts.iter().cloned()));
            }
        }
    }

    /// Layer `layer` (its position in the trace) resolved: take its spans
    /// still queued off the queue (its replay reads those) and hand over
    /// the others, arrived or on the wire.
    pub fn take(&self, layer: usize) -> Taken {
        let mut st = self.state.lock();
        st.queue.retain(|g| g.layer != layer);
        let ids: Vec<u64> = st
            .reading
            .iter()
            .filter(|(_, (l, ..))| *l == layer)
            .map(|(id, _)| *id)
            .collect();
        let reading = ids
            .into_iter()
            .filter_map(|id| st.reading.remove(&id))
            .map(|(_, ranges, rx)| (ranges, Pending(rx)))
            .collect();
        Taken {
            arrived: st.arrived.remove(&layer).unwrap_or_default(),
            reading,
        }
    }
}

/// The trace's spans of the layers in `blobs` as requests: each layer's
/// spans in trace order cut into groups of about [`GROUP_BYTES`], the
/// groups ordered by their first span's place in the trace, up to
/// [`BUDGET`] bytes; a group's ranges ascending and disjoint (one
/// multi-range request).
fn groups(trace: &Trace, blobs: &HashMap<usize, Arc<dyn RemoteBlob>>) -> VecDeque<Group> {
    // (first span's position, layer, ranges, bytes)
    let mut out: Vec<(usize, Group, u64)> = Vec::new();
    let mut open: HashMap<usize, usize> = HashMap::new();
    let mut budget = BUDGET;
    for (seq, s) in trace.spans.iter().enumerate() {
        let layer = s.layer as usize;
        let len = s.end - s.start;
        if !blobs.contains_key(&layer) || len > budget {
            continue;
        }
        budget -= len;
        let i = match open.get(&layer) {
            Some(&i) if out[i].2 < GROUP_BYTES && out[i].1.ranges.len() < GROUP_RANGES => i,
            _ => {
                out.push((
                    seq,
                    Group {
                        layer,
                        ranges: Vec::new(),
                    },
                    0,
                ));
                open.insert(layer, out.len() - 1);
                out.len() - 1
            }
        };
        out[i].1.ranges.push(s.start..s.end);
        out[i].2 += len;
    }
    out.sort_by_key(|(seq, ..)| *seq);
    out.into_iter()
        .map(|(_, mut g, _)| {
            g.ranges = disjoint(std::mem::take(&mut g.ranges));
            g
        })
        .collect()
}

/// Ranges sorted, overlapping or touching ones merged.
fn disjoint(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The blob spans of a trace's reads, in the order of the reads: each
/// read's chunks as the layer's fetch would claim them
/// (`Layer::blob_ranges_of`), a range inside a span already listed left
/// out, one that continues the layer's previous span (within
/// [`SPAN_GAP`]) merged into it. `None` when a layer the reads touch is
/// not resolved here (`layer(i)` gives `trace.layers[i]`'s).
pub fn spans_of(
    trace: &Trace,
    layer: impl Fn(usize) -> Option<Arc<crate::engine::Layer>>,
) -> Option<Vec<stargaze_cache::TraceSpan>> {
    let mut resolved: HashMap<usize, Arc<crate::engine::Layer>> = HashMap::new();
    let mut spans: Vec<stargaze_cache::TraceSpan> = Vec::new();
    // Per layer: what the spans cover (start → end), and its last span.
    let mut covered: HashMap<usize, BTreeMap<u64, u64>> = HashMap::new();
    let mut last: HashMap<usize, usize> = HashMap::new();
    for r in &trace.reads {
        let i = r.layer as usize;
        let l = match resolved.get(&i) {
            Some(l) => l.clone(),
            None => {
                let l = layer(i)?;
                resolved.insert(i, l.clone());
                l
            }
        };
        let Some(ino) = l.index.lookup_path(&r.path) else {
            continue;
        };
        for range in l.blob_ranges_of(ino, r.offset, r.length, Purpose::Trace) {
            let cov = covered.entry(i).or_default();
            if cov
                .range(..=range.start)
                .next_back()
                .is_some_and(|(_, &end)| end >= range.end)
            {
                continue;
            }
            cov.entry(range.start)
                .and_modify(|end| *end = (*end).max(range.end))
                .or_insert(range.end);
            match last.get(&i).map(|&k| &mut spans[k]) {
                Some(s)
                    if range.start >= s.start
                        && range.start <= s.end.saturating_add(SPAN_GAP)
                        && range.end.max(s.end) - s.start
                            <= stargaze_cache::trace::MAX_SPAN_BYTES =>
                {
                    s.end = s.end.max(range.end);
                }
                _ => {
                    spans.push(stargaze_cache::TraceSpan {
                        layer: i as u32,
                        start: range.start,
                        end: range.end,
                    });
                    last.insert(i, spans.len() - 1);
                }
            }
        }
    }
    Some(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stargaze_cache::TraceSpan;

    fn trace(spans: &[(u32, u64, u64)]) -> Trace {
        let mut t = Trace::new(
            "example.com/x:1",
            &format!("sha256:{}", "2".repeat(64)),
            vec!["sha256:a".into(), "sha256:b".into(), "sha256:c".into()],
        );
        t.spans = spans
            .iter()
            .map(|&(layer, start, end)| TraceSpan { layer, start, end })
            .collect();
        t
    }

    fn blobs(layers: &[usize]) -> (tempfile::NamedTempFile, HashMap<usize, Arc<dyn RemoteBlob>>) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let map = layers
            .iter()
            .map(|&l| {
                let b: Arc<dyn RemoteBlob> =
                    Arc::new(crate::blob::FileBlob::open(f.path()).unwrap());
                (l, b)
            })
            .collect();
        (f, map)
    }

    #[test]
    fn spans_become_requests_in_trace_order_per_layer() {
        const M: u64 = 1 << 20;
        // Layer 2 is not read early (its Prepare resolves it).
        let t = trace(&[
            (1, 10 * M, 10 * M + 100),
            (0, 0, 600 << 10),
            (2, 0, 100),
            (0, 5 * M, 5 * M + (600 << 10)),
            (1, 0, 100),
            (0, 2 * M, 2 * M + 10),
        ]);
        let (_f, b) = blobs(&[0, 1]);
        let g: Vec<(usize, Vec<Range<u64>>)> = groups(&t, &b)
            .into_iter()
            .map(|g| (g.layer, g.ranges))
            .collect();
        assert_eq!(
            g,
            vec![
                // Layer 1's two spans, ascending, in one request: it came first.
                (1, vec![0..100, 10 * M..10 * M + 100]),
                // Layer 0's first two spans fill a request (over 1 MiB).
                (0, vec![0..600 << 10, 5 * M..5 * M + (600 << 10)]),
                (0, std::iter::once(2 * M..2 * M + 10).collect()),
            ]
        );
    }

    #[test]
    fn requests_are_bounded_in_bytes_and_ranges() {
        // A forged trace: far more than the budget, in tiny spans.
        let spans: Vec<(u32, u64, u64)> = (0..2000u64)
            .map(|i| (0, i * 100, i * 100 + 10))
            .chain((0..200u64).map(|i| {
                (
                    0,
                    (1 << 30) + i * (32 << 20),
                    (1 << 30) + i * (32 << 20) + (32 << 20),
                )
            }))
            .collect();
        let (_f, b) = blobs(&[0]);
        let g = groups(&trace(&spans), &b);
        assert!(g.iter().all(|g| g.ranges.len() <= GROUP_RANGES));
        let total: u64 = g
            .iter()
            .flat_map(|g| &g.ranges)
            .map(|r| r.end - r.start)
            .sum();
        assert!(total <= BUDGET, "{total}");
        assert_eq!(disjoint(vec![5..9, 0..3, 3..4, 8..12]), vec![0..4, 5..12]);
    }
}
