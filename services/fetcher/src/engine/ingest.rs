//! Blob bytes read before the layer resolved (a trace's early spans,
//! `traces/early.rs`), stored like fetched ones: every chunk wholly inside
//! them that is neither present nor claimed is claimed, decoded, verified
//! against the layer's TOC and written, exactly as a read of the registry
//! would have done it. A chunk that fails (bytes that do not match the
//! TOC) stays claimed and is fetched again the normal way, so readers
//! waiting for it get the registry's bytes, never the early ones.

use super::*;

impl Layer {
    /// The blob ranges a fetch of `[offset, offset + len)` of `ino` for
    /// `purpose` reads (a small file's whole extent, as [`Layer::fetch_for`]
    /// claims it), touching members merged. Holes read nothing.
    pub fn blob_ranges_of(
        &self,
        ino: u64,
        offset: u64,
        len: u64,
        purpose: Purpose,
    ) -> Vec<Range<u64>> {
        let Ok(claims) = self.chunks_for(ino, offset, len, purpose) else {
            return Vec::new();
        };
        let mut out: Vec<Range<u64>> = Vec::new();
        for c in claims.iter().filter(|c| !c.chunk.zeros) {
            let (start, end) = (c.chunk.compressed_offset, c.chunk.compressed_end);
            match out.last_mut() {
                Some(r) if start <= r.end && end >= r.start => {
                    r.start = r.start.min(start);
                    r.end = r.end.max(end);
                }
                _ => out.push(start..end),
            }
        }
        out
    }

    /// Claim the chunks wholly inside blob bytes `range`, neither present
    /// nor claimed, for bytes being read before the layer resolved: from
    /// now on a read of them waits for those bytes (see [`Layer::fill`])
    /// instead of reading them again.
    pub fn reserve(self: &Arc<Self>, range: Range<u64>) -> Reserved {
        let mut members: BTreeMap<u64, Member> = BTreeMap::new();
        if self.is_evicted() {
            return Reserved {
                layer: self.clone(),
                start: range.start,
                members,
            };
        }
        let mut st = self.state.lock();
        let len = range.end.saturating_sub(range.start);
        for (ino, chunk) in self.sweep.following(&self.index, range.start, len) {
            if chunk.zeros
                || self.presence.is_present(chunk.global)
                || st.inflight.contains_key(&chunk.global)
            {
                continue;
            }
            let (tx, _) = watch::channel(None);
            st.inflight.insert(chunk.global, tx);
            let m = members.entry(chunk.compressed_offset).or_insert(Member {
                end: chunk.compressed_end,
                claims: Vec::new(),
            });
            m.end = m.end.max(chunk.compressed_end);
            m.claims.push(Claim {
                ino,
                chunk,
                purpose: Purpose::Trace,
            });
        }
        Reserved {
            layer: self.clone(),
            start: range.start,
            members,
        }
    }

    /// Store what `reserved` claimed from `bytes`, the blob's bytes from
    /// its range's start (`None`: the read failed); returns how many
    /// chunks were stored. The chunks not stored are fetched the normal
    /// way, and their readers wait for that.
    pub async fn fill(
        self: &Arc<Self>,
        mut reserved: Reserved,
        bytes: Option<bytes::Bytes>,
    ) -> u64 {
        let (start, members) = (reserved.start, std::mem::take(&mut reserved.members));
        let mut stored = 0;
        let mut again: Vec<Claim> = Vec::new();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for (&at, m) in &members {
            let end = (m.end - start) as usize;
            match &bytes {
                Some(b) if end <= b.len() => {
                    let member = b.slice((at - start) as usize..end);
                    self.decode_later(None, at, member, &m.claims, &done_tx);
                }
                _ => again.extend(&m.claims),
            }
        }
        drop(done_tx);
        while let Some((at, outcome)) = done_rx.recv().await {
            let claims = &members[&at].claims;
            self.answer_stored(claims, &outcome);
            for (c, r) in claims.iter().zip(outcome) {
                match r {
                    Ok(()) => stored += 1,
                    Err(reason) => {
                        tracing::debug!(layer = %self.digest, file = %self.index.path_of(c.ino), %reason, "a chunk read early is fetched again");
                        again.push(*c);
                    }
                }
            }
        }
        self.fetch_again(again);
        stored
    }

    /// Claims whose early bytes did not serve: fetched the normal way.
    fn fetch_again(self: &Arc<Self>, claims: Vec<Claim>) {
        if claims.is_empty() {
            return;
        }
        self.state.lock().queue.extend(claims);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(self.clone().drain(false));
        }
    }

    /// [`Layer::reserve`] and [`Layer::fill`] of bytes already read.
    pub async fn ingest(self: &Arc<Self>, start: u64, bytes: bytes::Bytes) -> u64 {
        let reserved = self.reserve(start..start + bytes.len() as u64);
        self.fill(reserved, Some(bytes)).await
    }
}

/// Chunks claimed for bytes being read early ([`Layer::reserve`]), to be
/// given to [`Layer::fill`]; dropped unfilled, they are fetched the
/// normal way (their readers never wait for bytes that will not come).
#[must_use]
pub struct Reserved {
    layer: Arc<Layer>,
    start: u64,
    members: BTreeMap<u64, Member>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let claims = std::mem::take(&mut self.members)
            .into_values()
            .flat_map(|m| m.claims)
            .collect();
        self.layer.fetch_again(claims);
    }
}
