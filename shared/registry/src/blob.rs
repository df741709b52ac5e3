//! Reading byte ranges of a blob: endpoint choice and fail-over,
//! redirects, size discovery, multi-range requests and their three
//! possible answers.
//!
//! The endpoint is chosen by a probe (mirrors first) and kept while it
//! works. When it fails a read (connection errors, 5xx, broken answers,
//! after the client's retries: [`RegistryError::is_endpoint_failure`]),
//! it is set aside for [`crate::ClientOptions::endpoint_backoff`] and the
//! read goes on from the next endpoint without an error reaching the
//! caller; once the back-off has passed, the next read probes again, so
//! reads return to a mirror that came back.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use headers::HeaderMapExt;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;

use crate::client::{Client, Resp};
use crate::hosts::Endpoint;
use crate::{EndpointFailure, Reference, RegistryError};

#[derive(Default)]
struct State {
    /// The endpoint that answered, and a redirect target if it sent one.
    endpoint: Option<Endpoint>,
    redirect: Option<String>,
    size: Option<u64>,
    /// When an endpoint preferred to the current one (set aside after a
    /// failure) may be tried again: the next read probes then.
    recheck: Option<Instant>,
}

/// What a probe found.
struct Probe {
    endpoint: Endpoint,
    redirect: Option<String>,
    size: u64,
    /// With a `tail` probe: `(start, bytes)` of the blob's end.
    tail: Option<(u64, Bytes)>,
    /// See [`State::recheck`].
    recheck: Option<Instant>,
}

/// One blob of one repository.
pub struct Blob {
    client: Client,
    reference: Reference,
    digest: String,
    state: Mutex<State>,
}

/// Fail-overs within one read before its error is returned.
const MAX_FAILOVERS: u32 = 8;

fn range_header(ranges: &[Range<u64>]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("{}-{}", r.start, r.end - 1))
        .collect();
    format!("bytes={}", parts.join(","))
}

/// The `Content-Range` of an answer or of one part of a multipart answer,
/// `bytes a-b/total`, as `(a..b+1, total)`; `None` when there is none or
/// it is not one range of bytes inside the size it gives.
fn content_range(h: &HeaderMap) -> Option<(Range<u64>, Option<u64>)> {
    let cr = h.typed_get::<headers::ContentRange>()?;
    let (first, last) = cr.bytes_range()?;
    let end = last.checked_add(1)?;
    let total = cr.bytes_len();
    if total.is_some_and(|t| end > t) {
        return None;
    }
    Some((first..end, total))
}

/// The boundary of a `multipart/byteranges` answer, from its Content-Type.
fn byteranges_boundary(h: &HeaderMap) -> Option<String> {
    let m: mime::Mime = h
        .get(http::header::CONTENT_TYPE)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    (m.type_() == mime::MULTIPART && m.subtype() == "byteranges")
        .then(|| m.get_param(mime::BOUNDARY).map(|b| b.as_str().to_string()))?
}

/// Parse a `multipart/byteranges` body into (range, bytes) parts, views
/// of `body` (never copies: this is the fetch path, and an answer is up to
/// `max_read_bytes`). Each part's headers are read by `httparse` and its
/// `Content-Range` by `headers`; the framing is RFC 2046's, held strictly:
/// a part must be followed right away by the next delimiter. multer reads
/// the same framing but copies the body into its own buffer first.
pub(crate) fn parse_multipart(
    body: &Bytes,
    boundary: &str,
) -> Result<Vec<(Range<u64>, Bytes)>, String> {
    let delim = format!("--{boundary}");
    let mut parts = Vec::new();
    // A preamble may come before the first delimiter.
    let mut pos = find(body, delim.as_bytes(), 0).ok_or("no multipart boundary in the body")?;
    loop {
        let n = parts.len() + 1;
        pos += delim.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            break;
        }
        // Transport padding, then the line end of the delimiter.
        let line_end = find(body, b"\r\n", pos)
            .ok_or_else(|| format!("multipart part {n}: no line end after its boundary"))?;
        let headers_start = line_end + 2;
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let (headers_len, parsed) =
            match httparse::parse_headers(&body[headers_start..], &mut slots) {
                Ok(httparse::Status::Complete((len, parsed))) => (len, parsed),
                Ok(httparse::Status::Partial) => {
                    return Err(format!("multipart part {n}: its headers never end"));
                }
                Err(e) => return Err(format!("multipart part {n}: headers: {e}")),
            };
        let mut headers = HeaderMap::new();
        for h in parsed.iter() {
            if let (Ok(name), Ok(value)) = (
                http::header::HeaderName::from_bytes(h.name.as_bytes()),
                HeaderValue::from_bytes(h.value),
            ) {
                headers.append(name, value);
            }
        }
        let (range, _) = content_range(&headers)
            .ok_or_else(|| format!("multipart part {n} without a valid Content-Range"))?;
        let start = headers_start + headers_len;
        let end = usize::try_from(range.end - range.start)
            .ok()
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= body.len())
            .ok_or_else(|| {
                format!(
                    "multipart part {n} shorter than its Content-Range {}-{}",
                    range.start,
                    range.end - 1
                )
            })?;
        if body.get(end..end + 2) != Some(b"\r\n")
            || body.get(end + 2..end + 2 + delim.len()) != Some(delim.as_bytes())
        {
            return Err(format!(
                "multipart part {n} is not followed by a boundary where its Content-Range {}-{} ends",
                range.start,
                range.end - 1
            ));
        }
        parts.push((range, body.slice(start..end)));
        pos = end + 2;
    }
    if parts.is_empty() {
        return Err("multipart body without parts".into());
    }
    Ok(parts)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Take each wanted range out of the parts that came back.
fn slice_out(wanted: &[Range<u64>], parts: &[(Range<u64>, Bytes)]) -> Option<Vec<Bytes>> {
    wanted
        .iter()
        .map(|w| {
            let (r, b) = parts
                .iter()
                .find(|(r, _)| r.start <= w.start && w.end <= r.end)?;
            Some(b.slice((w.start - r.start) as usize..(w.end - r.start) as usize))
        })
        .collect()
}

/// Where the pieces of a streamed range may end: the caller's unit ends,
/// relative to what was handed on so far.
struct Cuts<'a> {
    start: u64,
    ends: &'a [u64],
    /// Bytes of the range handed on so far.
    delivered: usize,
}

impl<'a> Cuts<'a> {
    fn new(start: u64, ends: &'a [u64]) -> Cuts<'a> {
        // A resumed range starts after some of its ends.
        let passed = ends.partition_point(|&e| e <= start);
        Cuts {
            start,
            ends: &ends[passed..],
            delivered: 0,
        }
    }

    /// With `received` bytes of the range in: how many more to hand on
    /// now (up to the furthest end reached), if any.
    fn reached(&mut self, received: usize) -> Option<usize> {
        let upto = self.start + received as u64;
        let mut cut = None;
        while let Some((&end, rest)) = self.ends.split_first()
            && end <= upto
        {
            cut = Some(end);
            self.ends = rest;
        }
        let n = cut?.checked_sub(self.start)? as usize;
        let more = n.checked_sub(self.delivered).filter(|m| *m > 0)?;
        self.delivered = n;
        Some(more)
    }
}

impl Blob {
    pub(crate) fn new(client: Client, reference: Reference, digest: String) -> Blob {
        Blob {
            client,
            reference,
            digest,
            state: Mutex::new(State::default()),
        }
    }

    pub fn name(&self) -> String {
        format!(
            "{}/{}@{}",
            self.reference.host, self.reference.repository, self.digest
        )
    }

    fn err(&self, status: StatusCode, what: &str) -> RegistryError {
        RegistryError::Status {
            host: self.reference.host.clone(),
            repository: self.reference.repository.clone(),
            object: self.digest.clone(),
            status: status.as_u16(),
            what: what.to_string(),
        }
    }

    /// Find an endpoint serving the blob (mirrors first) and learn its size
    /// and redirect target with one `Range: bytes=0-1` GET each.
    async fn probe(&self) -> Result<Probe, RegistryError> {
        self.probe_with(None).await
    }

    /// [`Blob::probe`], optionally asking for the last `tail` bytes instead
    /// of the first two (`Range: bytes=-N`): then the answer carries the
    /// size and the tail at once, as `(start, bytes)`.
    ///
    /// Endpoints set aside after a failure are tried last; one that fails
    /// here is set aside (when there is another to go to).
    async fn probe_with(&self, tail: Option<u64>) -> Result<Probe, RegistryError> {
        let endpoints = self.client.endpoints(&self.reference)?;
        let several = endpoints.len() > 1;
        // (rank in the configured order, endpoint, set aside until)
        let mut order: Vec<(usize, Endpoint, Option<Instant>)> = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, ep)| {
                let until = self.client.resting_until(&ep);
                (i, ep, until)
            })
            .collect();
        order.sort_by_key(|(i, _, until)| (until.is_some(), *i));
        // Endpoints ranked before `rank` resting now (set aside before this
        // probe or by it): probe again when the first of them is back.
        let recheck_before = |rank: usize| {
            order
                .iter()
                .filter(|(i, _, _)| *i < rank)
                .filter_map(|(_, ep, _)| self.client.resting_until(ep))
                .min()
        };
        let mut failures: Vec<EndpointFailure> = Vec::new();
        for (rank, ep, _) in order.iter().cloned() {
            let failure = |error: RegistryError| EndpointFailure {
                endpoint: ep.origin.clone(),
                mirror: ep.mirror,
                error,
            };
            let failed = |e: RegistryError| {
                if several && e.is_endpoint_failure() {
                    self.client.set_aside(&ep, &e);
                }
                failure(e)
            };
            let url = ep.url(&self.reference, "blobs", &self.digest);
            let mut h = HeaderMap::new();
            match tail {
                Some(n) => {
                    h.insert(
                        http::header::RANGE,
                        HeaderValue::from_str(&format!("bytes=-{}", n.max(1)))
                            .map_err(|e| RegistryError::Config(e.to_string()))?,
                    );
                    h.insert(
                        http::header::ACCEPT_ENCODING,
                        HeaderValue::from_static("identity"),
                    );
                }
                None => {
                    h.insert(http::header::RANGE, HeaderValue::from_static("bytes=0-1"));
                }
            }
            let resp = match self
                .client
                .send(&ep, &self.reference, Method::GET, &url, &h, true)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    failures.push(failed(e));
                    continue;
                }
            };
            let status = resp.resp.status();
            let (redirect, resp) = if status.is_redirection() {
                let loc = resp
                    .resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                drop(resp);
                let Some(loc) = loc else {
                    failures.push(failure(self.err(status, "redirect without Location")));
                    continue;
                };
                // Pre-signed URLs take no registry credentials or headers.
                let r = self
                    .client
                    .send(&ep, &self.reference, Method::GET, &loc, &h, false)
                    .await?;
                (Some(loc), r)
            } else {
                (None, resp)
            };
            let status = resp.resp.status();
            let crange = content_range(resp.resp.headers());
            if let (Some(n), StatusCode::PARTIAL_CONTENT, Some((r, Some(total)))) =
                (tail, status, crange.clone())
            {
                let stats = resp.stats.clone();
                let expected = (r.end - r.start).min(n) as usize;
                let body = self
                    .read_body(resp.resp.into_body(), expected, n as usize + 65536)
                    .await?;
                stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                let whole = body.len() as u64 == r.end - r.start && r.end == total;
                return Ok(Probe {
                    recheck: recheck_before(rank),
                    endpoint: ep,
                    redirect,
                    size: total,
                    tail: whole.then_some((r.start, body)),
                });
            }
            let size = match status {
                StatusCode::PARTIAL_CONTENT => crange.and_then(|(_, total)| total),
                StatusCode::OK => resp
                    .resp
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                _ => {
                    failures.push(failed(self.err(status, "probing the blob")));
                    continue;
                }
            };
            drop(resp); // a 200 here would be the whole blob: do not read it
            match size {
                Some(s) => {
                    return Ok(Probe {
                        recheck: recheck_before(rank),
                        endpoint: ep,
                        redirect,
                        size: s,
                        tail: None,
                    });
                }
                None => failures.push(failure(
                    self.err(status, "the answer does not say the blob's size"),
                )),
            }
        }
        Err(RegistryError::after_endpoints(&self.reference, failures))
    }

    /// The endpoint to read from (probing for one when there is none yet,
    /// when `reprobe`, or when a preferred endpoint's back-off has passed),
    /// its redirect target and the blob's size.
    async fn endpoint(
        &self,
        reprobe: bool,
    ) -> Result<(Endpoint, Option<String>, u64), RegistryError> {
        if !reprobe {
            let mut st = self.state.lock();
            if let (Some(ep), Some(size)) = (&st.endpoint, st.size) {
                let due = st.recheck.is_some_and(|t| Instant::now() >= t);
                if !due {
                    return Ok((ep.clone(), st.redirect.clone(), size));
                }
                // This read probes; the others go on from the current one.
                st.recheck = None;
            }
        }
        let probe = self.probe().await?;
        self.adopt(&probe)?;
        Ok((probe.endpoint, probe.redirect, probe.size))
    }

    /// Keep what a probe found. Every endpoint must agree on the size.
    fn adopt(&self, probe: &Probe) -> Result<(), RegistryError> {
        let mut st = self.state.lock();
        if let Some(known) = st.size
            && known != probe.size
        {
            return Err(RegistryError::Range {
                blob: self.name(),
                reason: format!(
                    "{} says the blob has {} bytes, another endpoint said {known}; check the mirrors configured for {}",
                    probe.endpoint.origin, probe.size, self.reference.host
                ),
            });
        }
        st.endpoint = Some(probe.endpoint.clone());
        st.redirect = probe.redirect.clone();
        st.size = Some(probe.size);
        st.recheck = probe.recheck;
        Ok(())
    }

    /// After `error` from `failed`: set it aside and read from the next
    /// endpoint. False when the error is not the endpoint's or there is
    /// no other endpoint to go to.
    fn fail_over(&self, failed: &Endpoint, error: &RegistryError) -> bool {
        if !error.is_endpoint_failure() {
            return false;
        }
        let Ok(endpoints) = self.client.endpoints(&self.reference) else {
            return false;
        };
        let mut st = self.state.lock();
        if st.endpoint.as_ref() != Some(failed) {
            // Another read already moved on: go on from where it went.
            return true;
        }
        let elsewhere = endpoints
            .iter()
            .any(|e| e.origin != failed.origin && self.client.resting_until(e).is_none());
        if !elsewhere {
            return false;
        }
        self.client.set_aside(failed, error);
        st.endpoint = None;
        st.redirect = None;
        true
    }

    /// The blob's size in bytes.
    pub async fn size(&self) -> Result<u64, RegistryError> {
        Ok(self.endpoint(false).await?.2)
    }

    /// The blob's size and its last `n` bytes (fewer for a smaller blob) as
    /// `(size, start, bytes)`. On a blob not probed yet this is one request
    /// (`Range: bytes=-n`, which also finds the endpoint and the size);
    /// registries that ignore or refuse suffix ranges cost the usual probe
    /// and read (and report their errors from those).
    pub async fn read_tail(&self, n: u64) -> Result<(u64, u64, Bytes), RegistryError> {
        let probed = {
            let st = self.state.lock();
            st.endpoint.is_some() && st.size.is_some()
        };
        // A registry that refuses suffix ranges (416, 400) gets the usual
        // probe and read below.
        if !probed && let Ok(probe) = self.probe_with(Some(n)).await {
            self.adopt(&probe)?;
            let size = probe.size;
            if let Some((start, bytes)) = probe.tail
                && size - start >= n.min(size)
            {
                let from = size - n.min(size);
                return Ok((size, from, bytes.slice((from - start) as usize..)));
            }
        }
        let size = self.size().await?;
        let start = size - n.min(size);
        if start == size {
            return Ok((size, start, Bytes::new()));
        }
        let bytes = self
            .read_ranges(std::slice::from_ref(&(start..size)))
            .await?
            .pop()
            .unwrap_or_default();
        Ok((size, start, bytes))
    }

    /// Read each range (in order). Ranges go out in as few requests as the
    /// registry allows: one multi-range request per `max_ranges_per_request`,
    /// or one request per range once the host has refused multi-range.
    pub async fn read_ranges(&self, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, RegistryError> {
        let mut parts: Vec<Vec<Bytes>> = vec![Vec::new(); ranges.len()];
        let whole = vec![Vec::new(); ranges.len()];
        self.stream_ranges(ranges, &whole, &mut |i, bytes| parts[i].push(bytes))
            .await?;
        Ok(parts
            .into_iter()
            .map(|mut p| match p.len() {
                // Each range comes whole, unless a broken answer was resumed.
                1 => p.pop().unwrap_or_default(),
                _ => Bytes::from(p.concat()),
            })
            .collect())
    }

    /// [`Blob::read_ranges`], handing the bytes on as they arrive: `sink`
    /// gets `(range index, bytes)` with each range's bytes in order. A
    /// piece ends at one of `ends[range index]` (blob offsets inside the
    /// range, ascending: where the caller's units, such as compressed
    /// members, end), as soon as the bytes up to it are in, so that no
    /// unit is cut in two and each can be used the moment it is complete;
    /// the rest of a range comes at its end (ranges of a multi-range answer
    /// come whole). Pieces are views of one buffer per answer, never
    /// copies. When an answer breaks off, the read resumes after the last
    /// piece handed on; on error, what was handed on stays valid.
    pub async fn stream_ranges(
        &self,
        ranges: &[Range<u64>],
        ends: &[Vec<u64>],
        sink: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), RegistryError> {
        let (_, _, size) = self.endpoint(false).await?;
        for r in ranges {
            if r.start >= r.end || r.end > size {
                return Err(RegistryError::Range {
                    blob: self.name(),
                    reason: format!(
                        "range {}..{} outside the blob of {size} bytes",
                        r.start, r.end
                    ),
                });
            }
        }
        // Bytes of each range handed on so far: a retry asks for the rest.
        let mut done = vec![0u64; ranges.len()];
        let per = self.client.options().max_ranges_per_request.max(1);
        let mut attempt = 0;
        let mut failovers = 0;
        loop {
            let missing: Vec<(usize, Range<u64>)> = ranges
                .iter()
                .enumerate()
                .filter(|(i, r)| r.start + done[*i] < r.end)
                .map(|(i, r)| (i, r.start + done[i]..r.end))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let single = self.client.options().force_single_range
                || self
                    .client
                    .inner
                    .single_range
                    .lock()
                    .contains(&self.reference.host);
            let n = if single { 1 } else { per.min(missing.len()) };
            let group: Vec<Range<u64>> = missing[..n].iter().map(|(_, r)| r.clone()).collect();
            let group_ends: Vec<&[u64]> = missing[..n]
                .iter()
                .map(|(i, _)| ends.get(*i).map_or(&[][..], |e| e.as_slice()))
                .collect();
            let (ep, _, _) = self.endpoint(false).await?;
            let mut deliver = |k: usize, bytes: Bytes| {
                let i = missing[k].0;
                done[i] += bytes.len() as u64;
                sink(i, bytes)
            };
            match self
                .read_group(&group, &group_ends, false, &mut deliver)
                .await
            {
                Ok(()) => {
                    if missing[..n]
                        .iter()
                        .any(|(i, r)| ranges[*i].start + done[*i] != r.end)
                    {
                        return Err(RegistryError::Range {
                            blob: self.name(),
                            reason: "the answer did not cover the ranges asked for".into(),
                        });
                    }
                    attempt = 0;
                }
                Err(RegistryError::MultiRangeRefused) => {
                    tracing::info!(host = %self.reference.host, "registry refuses multi-range requests: switching to one range per request");
                    self.client
                        .inner
                        .single_range
                        .lock()
                        .insert(self.reference.host.clone());
                }
                // The answer broke off (connection errors and 5xx are
                // already retried per request by the client): ask again
                // for what is still missing.
                Err(e @ RegistryError::Body { .. }) if attempt < self.client.options().retries => {
                    tracing::debug!(blob = %self.name(), error = %e, "resuming a broken answer");
                    tokio::time::sleep(self.client.options().min_backoff * (1 << attempt.min(10)))
                        .await;
                    attempt += 1;
                }
                // The endpoint failed: go on from the next one (a bound:
                // each endpoint once, and a few reads moving on at once).
                Err(e) if failovers < MAX_FAILOVERS && self.fail_over(&ep, &e) => {
                    tracing::debug!(blob = %self.name(), endpoint = %ep.origin, error = %e, "reading from the next endpoint");
                    failovers += 1;
                    attempt = 0;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One request for `group`; its bytes go to `deliver` as
    /// `(index in group, bytes)`.
    async fn read_group(
        &self,
        group: &[Range<u64>],
        ends: &[&[u64]],
        reprobed: bool,
        deliver: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), RegistryError> {
        let (ep, redirect, _) = self.endpoint(reprobed).await?;
        let mut h = HeaderMap::new();
        h.insert(
            http::header::RANGE,
            HeaderValue::from_str(&range_header(group))
                .map_err(|e| RegistryError::Config(e.to_string()))?,
        );
        h.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let (url, auth) = match &redirect {
            Some(u) => (u.clone(), false),
            None => (ep.url(&self.reference, "blobs", &self.digest), true),
        };
        let resp = self
            .client
            .send(&ep, &self.reference, Method::GET, &url, &h, auth)
            .await?;
        let status = resp.resp.status();
        match status {
            StatusCode::PARTIAL_CONTENT => self.partial(resp, group, ends, deliver).await,
            StatusCode::OK => self.whole(resp, group, ends, deliver).await,
            StatusCode::FORBIDDEN if redirect.is_some() && !reprobed => {
                // An expired pre-signed URL: ask the registry for a new one.
                drop(resp);
                Box::pin(self.read_group(group, ends, true, deliver)).await
            }
            StatusCode::BAD_REQUEST if group.len() > 1 => Err(RegistryError::MultiRangeRefused),
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // Dropped unread: hyper closes the connection instead of
                // pooling it (Debian's registry sends a wrong Content-Length
                // with 416 answers, which would poison the next request).
                drop(resp);
                Err(self.err(status, "range not satisfiable"))
            }
            s => Err(self.err(s, "reading ranges")),
        }
    }

    async fn partial(
        &self,
        resp: Resp,
        group: &[Range<u64>],
        ends: &[&[u64]],
        deliver: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), RegistryError> {
        let crange = content_range(resp.resp.headers());
        let multipart = byteranges_boundary(resp.resp.headers());
        let stats = resp.stats.clone();
        if multipart.is_none()
            && let [wanted] = group
            && crange.as_ref().is_some_and(|(r, _)| r == wanted)
        {
            // The common answer: exactly the one range asked for, handed on
            // while it arrives.
            return self
                .stream_body(
                    resp.resp.into_body(),
                    wanted,
                    ends.first().copied().unwrap_or_default(),
                    &stats,
                    deliver,
                )
                .await;
        }
        let limit = group.iter().map(|r| r.end - r.start).sum::<u64>() as usize
            + 4096 * group.len()
            + 65536;
        // One buffer of the expected size (a single range's length, or the
        // ranges plus room for the multipart headers): collecting the
        // frames and joining them would hold the body twice.
        let expected = match &crange {
            Some((r, _)) if multipart.is_none() => (r.end - r.start) as usize,
            _ => limit,
        };
        let body = self
            .read_body(resp.resp.into_body(), expected.min(limit), limit)
            .await?;
        stats.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        let parts = if let Some(b) = multipart {
            parse_multipart(&body, &b).map_err(|reason| RegistryError::Range {
                blob: self.name(),
                reason,
            })?
        } else {
            let (r, _) = crange.ok_or_else(|| RegistryError::Range {
                blob: self.name(),
                reason: "206 answer without Content-Range".into(),
            })?;
            if body.len() as u64 != r.end - r.start {
                return Err(RegistryError::Body {
                    blob: self.name(),
                    reason: format!(
                        "206 body of {} bytes for a range of {}",
                        body.len(),
                        r.end - r.start
                    ),
                });
            }
            vec![(r, body)]
        };
        let wanted = slice_out(group, &parts).ok_or_else(|| RegistryError::Range {
            blob: self.name(),
            reason: "the registry answered other ranges than requested".into(),
        })?;
        for (k, bytes) in wanted.into_iter().enumerate() {
            deliver(k, bytes);
        }
        Ok(())
    }

    /// The body of a single-range answer, handed on as it arrives, in
    /// pieces ending at `ends` (see [`Blob::stream_ranges`]). The pieces
    /// are views of one buffer of the range's size (no copies, no joining).
    async fn stream_body(
        &self,
        mut body: hyper::body::Incoming,
        range: &Range<u64>,
        ends: &[u64],
        stats: &crate::client::HostStats,
        deliver: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), RegistryError> {
        let len = (range.end - range.start) as usize;
        let mut buf = BytesMut::with_capacity(len);
        let mut cuts = Cuts::new(range.start, ends);
        let mut received = 0usize;
        while let Some(data) = self.next_data(&mut body).await? {
            stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            if received + data.len() > len {
                return Err(RegistryError::Body {
                    blob: self.name(),
                    reason: format!("the body is longer than the {len} bytes asked for"),
                });
            }
            received += data.len();
            buf.extend_from_slice(&data);
            if received < len
                && let Some(n) = cuts.reached(received)
            {
                deliver(0, buf.split_to(n).freeze());
            }
        }
        if !buf.is_empty() {
            deliver(0, buf.freeze());
        }
        if received != len {
            return Err(RegistryError::Body {
                blob: self.name(),
                reason: format!("206 body of {received} bytes for a range of {len}"),
            });
        }
        Ok(())
    }

    /// The next data frame of a body (trailers are skipped); `None` at its end.
    async fn next_data(
        &self,
        body: &mut hyper::body::Incoming,
    ) -> Result<Option<Bytes>, RegistryError> {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RegistryError::Body {
                blob: self.name(),
                reason: format!("reading the body: {e}"),
            })?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// A response body in one buffer allocated at `capacity`; more than
    /// `limit` bytes is an error.
    async fn read_body(
        &self,
        mut body: hyper::body::Incoming,
        capacity: usize,
        limit: usize,
    ) -> Result<Bytes, RegistryError> {
        let mut buf = BytesMut::with_capacity(capacity);
        while let Some(data) = self.next_data(&mut body).await? {
            if buf.len() + data.len() > limit {
                return Err(RegistryError::Body {
                    blob: self.name(),
                    reason: format!("the body is longer than the {limit} bytes asked for"),
                });
            }
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// A 200 answer carries the whole blob: keep only the wanted slices
    /// while streaming it, handing each on in pieces ending at `ends`.
    async fn whole(
        &self,
        resp: Resp,
        group: &[Range<u64>],
        ends: &[&[u64]],
        deliver: &mut (dyn FnMut(usize, Bytes) + Send),
    ) -> Result<(), RegistryError> {
        let stats = resp.stats.clone();
        let mut bufs: Vec<BytesMut> = group
            .iter()
            .map(|r| BytesMut::with_capacity((r.end - r.start) as usize))
            .collect();
        let mut cuts: Vec<Cuts> = group
            .iter()
            .enumerate()
            .map(|(k, r)| Cuts::new(r.start, ends.get(k).copied().unwrap_or_default()))
            .collect();
        let mut got = vec![0u64; group.len()];
        let mut body = resp.resp.into_body();
        let mut pos = 0u64;
        let end = group.iter().map(|r| r.end).max().unwrap_or(0);
        while pos < end {
            let Some(data) = self.next_data(&mut body).await? else {
                break;
            };
            stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            let chunk = pos..pos + data.len() as u64;
            for (k, (r, buf)) in group.iter().zip(bufs.iter_mut()).enumerate() {
                let from = r.start.max(chunk.start);
                let to = r.end.min(chunk.end);
                if from < to {
                    buf.extend_from_slice(
                        &data[(from - chunk.start) as usize..(to - chunk.start) as usize],
                    );
                    got[k] += to - from;
                    if got[k] < r.end - r.start
                        && let Some(n) = cuts[k].reached(got[k] as usize)
                    {
                        deliver(k, buf.split_to(n).freeze());
                    }
                }
            }
            pos = chunk.end;
        }
        // Stop reading here: dropping the body closes the connection.
        drop(body);
        for (k, (r, buf)) in group.iter().zip(bufs).enumerate() {
            if !buf.is_empty() {
                deliver(k, buf.freeze());
            }
            if got[k] != r.end - r.start {
                return Err(RegistryError::Body {
                    blob: self.name(),
                    reason: "the blob ended before the requested range".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's registry answers 416 with a wrong Content-Length: the
    /// connection must be dropped, not reused for the next request.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_416_does_not_poison_the_next_requests() {
        let reg = stargaze_testkit::Registry::start();
        let work = tempfile::tempdir().unwrap();
        let layout = work.path().join("l");
        stargaze_testkit::image::write_layout(
            &layout,
            "x",
            "v1",
            &[stargaze_testkit::image::data_layer(4).0],
        );
        stargaze_testkit::run(
            std::process::Command::new("skopeo")
                .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:v1", layout.display()))
                .arg(format!("docker://{}/t/a:v1", reg.addr)),
        );
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                layout
                    .join("blobs/sha256")
                    .join(&index["manifests"][0]["digest"].as_str().unwrap()[7..]),
            )
            .unwrap(),
        )
        .unwrap();
        let digest = m["layers"][0]["digest"].as_str().unwrap();
        let client = crate::Client::new(
            crate::Hosts::new(),
            crate::DockerConfig::in_dir(work.path()),
            crate::ClientOptions {
                max_connections_per_host: 1,
                ..Default::default()
            },
        );
        let r = Reference::parse(&format!("{}/t/a:v1", reg.addr)).unwrap();
        let blob = client.blob(&r, digest);
        let size = blob.size().await.unwrap();
        // Pretend the blob is larger so that a range past its end goes out.
        blob.state.lock().size = Some(size * 10);
        let e = blob
            .read_ranges(std::slice::from_ref(&(size + 10..size + 20)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("416"), "{e}");
        blob.state.lock().size = Some(size);
        for _ in 0..5 {
            let got = blob.read_ranges(&[0..100, size - 10..size]).await.unwrap();
            assert_eq!(got[0].len(), 100);
        }
    }

    fn multipart(body: &'static [u8]) -> Result<Vec<(Range<u64>, Bytes)>, String> {
        parse_multipart(&Bytes::from_static(body), "XYZ")
    }

    #[test]
    fn multipart_bodies() {
        let body = b"--XYZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-3/100\r\n\r\nabcd\r\n--XYZ\r\nContent-Range: bytes 10-11/100\r\n\r\n\r\n\r\n--XYZ--\r\n";
        let parts = multipart(body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].0, 0..4);
        assert_eq!(&parts[1].1[..], b"\r\n");
        let got = slice_out(&[1..3, 10..12], &parts).unwrap();
        assert_eq!(&got[0][..], b"bc");
        // RFC 2046 allows a preamble before the first boundary.
        let with_preamble =
            b"ignored\r\n--XYZ\r\nContent-Range: bytes 0-0/1\r\n\r\nx\r\n--XYZ--\r\n";
        assert_eq!(multipart(with_preamble).unwrap()[0].0, 0..1);
        assert!(multipart(b"garbage").is_err());
        assert!(multipart(b"--XYZ\r\nContent-Range: bytes 0-99/100\r\n\r\nshort").is_err());
    }

    /// Parts are views of the answer's buffer: a multi-range answer on the
    /// fetch path (up to `max_read_bytes`) is not held twice.
    #[test]
    fn multipart_parts_are_views_of_the_body() {
        let body = Bytes::from_static(
            b"--XYZ\r\nContent-Range: bytes 0-3/100\r\n\r\nabcd\r\n--XYZ\r\nContent-Range: bytes 10-11/100\r\n\r\nef\r\n--XYZ--\r\n",
        );
        let within = body.as_ptr_range();
        for (_, part) in parse_multipart(&body, "XYZ").unwrap() {
            assert!(within.contains(&part.as_ptr()), "a part was copied");
        }
    }

    /// Broken or hostile bodies are errors, never panics.
    #[test]
    fn broken_multipart_bodies_are_errors() {
        let broken: &[&[u8]] = &[
            b"",
            b"--XYZ--\r\n",
            // No Content-Range, or one that is not a range of bytes.
            b"--XYZ\r\n\r\nabcd\r\n--XYZ--\r\n",
            b"--XYZ\r\nContent-Range: bytes */4\r\n\r\nabcd\r\n--XYZ--\r\n",
            // A range far larger than the part, and one at the end of u64.
            b"--XYZ\r\nContent-Range: bytes 0-18446744073709551613/18446744073709551615\r\n\r\nabcd\r\n--XYZ--\r\n",
            b"--XYZ\r\nContent-Range: bytes 0-18446744073709551615/*\r\n\r\nabcd\r\n--XYZ--\r\n",
            // A part longer than its range.
            b"--XYZ\r\nContent-Range: bytes 0-1/4\r\n\r\nabcd\r\n--XYZ--\r\n",
            // Headers that never end, headers that are not text.
            b"--XYZ\r\nContent-Range: bytes 0-3/4\r\nabcd",
            b"--XYZ\r\nContent-Range: bytes \xff0-3/4\r\n\r\nabcd\r\n--XYZ--\r\n",
            // No closing boundary.
            b"--XYZ\r\nContent-Range: bytes 0-3/4\r\n\r\nabcd",
        ];
        for body in broken {
            assert!(
                multipart(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        // Every cut of a good body before its closing boundary, and every
        // byte of it replaced: errors or parts, but no panic.
        let good: &'static [u8] = b"--XYZ\r\nContent-Range: bytes 0-3/100\r\n\r\nabcd\r\n--XYZ\r\nContent-Range: bytes 10-11/100\r\n\r\nef\r\n--XYZ--\r\n";
        let close = good.len() - b"--XYZ--\r\n".len();
        for cut in 0..close {
            assert!(multipart(&good[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..good.len() {
            for byte in [0u8, b'-', b'\r', b'9', 0xff] {
                let mut b = good.to_vec();
                b[i] = byte;
                let _ = multipart(b.leak());
            }
        }
    }

    #[test]
    fn byteranges_boundaries() {
        let ctype = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(v));
            byteranges_boundary(&h)
        };
        assert_eq!(
            ctype("multipart/byteranges; boundary=3d6b6a416f9b5").as_deref(),
            Some("3d6b6a416f9b5")
        );
        assert_eq!(
            ctype("Multipart/ByteRanges; charset=x; Boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(ctype("multipart/byteranges"), None);
        assert_eq!(ctype("text/plain; boundary=x"), None);
        assert_eq!(byteranges_boundary(&HeaderMap::new()), None);
    }

    #[test]
    fn pieces_end_at_the_furthest_end_reached() {
        let ends = [110, 150, 160, 200];
        let mut c = Cuts::new(100, &ends);
        assert_eq!(c.reached(5), None, "no end reached yet");
        assert_eq!(c.reached(10), Some(10));
        assert_eq!(c.reached(55), Some(40), "150: up to the furthest end");
        assert_eq!(c.reached(59), None);
        assert_eq!(c.reached(99), Some(60 - 50));
        assert_eq!(c.reached(100), Some(40));
        // A range resumed at 155 skips the ends before it.
        let mut c = Cuts::new(155, &ends);
        assert_eq!(c.reached(5), Some(5));
        assert_eq!(c.reached(44), None);
        assert_eq!(Cuts::new(0, &[]).reached(1 << 20), None);
    }

    #[test]
    fn content_ranges() {
        let parse = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_RANGE, HeaderValue::from_static(v));
            content_range(&h)
        };
        assert_eq!(
            parse("bytes 100-199/1031716"),
            Some((100..200, Some(1031716)))
        );
        assert_eq!(parse("bytes 0-1/*"), Some((0..2, None)));
        assert_eq!(parse("bytes 5-1/9"), None);
        assert_eq!(parse("bytes 0-9/5"), None, "past the size it gives");
        assert_eq!(parse("bytes 0-18446744073709551615/*"), None);
        assert_eq!(parse("bytes 0-18446744073709551616/*"), None);
        assert_eq!(parse("bytes */9"), None);
        assert_eq!(parse("bytes -1-5/9"), None);
        assert_eq!(parse("bytes 1-2/500/600"), None);
        assert_eq!(parse("items 0-1/2"), None);
        assert_eq!(parse(""), None);
        assert_eq!(content_range(&HeaderMap::new()), None);
        assert_eq!(range_header(&[0..10, 20..21]), "bytes=0-9,20-20");
    }
}
