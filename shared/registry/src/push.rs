//! Writing to a registry: blob existence checks, cross-repository mounts,
//! blob uploads (one PUT for small blobs, PATCH chunks then PUT for large
//! ones, so that memory stays at one chunk), manifest PUTs, and whole-blob
//! downloads streamed to the caller.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;

use crate::client::{Resp, Scope};
use crate::hosts::Endpoint;
use crate::{Client, Manifest, Reference, RegistryError};

/// Blobs up to this size go in one PUT; larger ones in PATCH chunks of it.
pub const UPLOAD_CHUNK: usize = 16 << 20;

/// A blob to upload: bytes in memory, or a file read one chunk at a time.
pub enum UploadSource<'a> {
    Bytes(Bytes),
    File(&'a Path),
}

fn status_error(r: &Reference, object: &str, status: StatusCode, what: String) -> RegistryError {
    RegistryError::Status {
        host: r.host.clone(),
        repository: r.repository.clone(),
        object: object.to_string(),
        status: status.as_u16(),
        what,
    }
}

/// The registry's own words for a failure (`{"errors":[{"code","message"}]}`),
/// kept short.
async fn error_detail(resp: Resp) -> String {
    let body = http_body_util::Limited::new(resp.resp.into_body(), 64 << 10)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let msgs: Vec<String> = v["errors"]
        .as_array()
        .map(|errs| {
            errs.iter()
                .map(|e| {
                    format!(
                        "{} {}",
                        e["code"].as_str().unwrap_or_default(),
                        e["message"].as_str().unwrap_or_default()
                    )
                    .trim()
                    .to_string()
                })
                .collect()
        })
        .unwrap_or_default();
    if msgs.is_empty() {
        String::new()
    } else {
        format!(" ({})", msgs.join("; "))
    }
}

/// An upload `Location` (absolute or relative to the endpoint) as a URL.
fn absolute(ep: &Endpoint, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", ep.origin)
    } else {
        format!("{}/{location}", ep.origin)
    }
}

fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={}", crate::client::query_escape(value))
}

fn location(ep: &Endpoint, resp: &Resp) -> Option<String> {
    resp.resp
        .headers()
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(|l| absolute(ep, l))
}

impl Client {
    fn push_endpoint(&self, r: &Reference) -> Result<Endpoint, RegistryError> {
        self.inner
            .hosts
            .push_endpoints(r)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                RegistryError::Config(format!(
                    "no host to push {r} to: hosts.toml for {} gives no host with the push capability",
                    r.host
                ))
            })
    }

    /// The manifest (or index) `object` (a tag or digest) of `r`, verified.
    pub async fn fetch_manifest(
        &self,
        r: &Reference,
        object: &str,
    ) -> Result<Manifest, RegistryError> {
        self.get_manifest(r, object).await
    }

    /// Is `digest` in `r`'s repository already? (`HEAD` on the push host.)
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, RegistryError> {
        let ep = self.push_endpoint(r)?;
        let url = ep.url(r, "blobs", digest);
        let resp = self
            .send_body(
                &ep,
                r,
                Method::HEAD,
                &url,
                &HeaderMap::new(),
                Bytes::new(),
                &Scope::push(r),
                true,
            )
            .await?;
        match resp.resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(
                r,
                digest,
                s,
                "checking whether the blob is there".into(),
            )),
        }
    }

    /// Ask the registry to mount `digest` from repository `from` (same
    /// host) into `r`'s repository. `Ok(false)` when it will not (the
    /// blob is not there, or the registry does not mount): upload it then.
    pub async fn mount_blob(
        &self,
        r: &Reference,
        digest: &str,
        from: &str,
    ) -> Result<bool, RegistryError> {
        let ep = self.push_endpoint(r)?;
        let url = with_query(
            &with_query(&ep.url(r, "blobs", "uploads/"), "mount", digest),
            "from",
            from,
        );
        let resp = self
            .send_body(
                &ep,
                r,
                Method::POST,
                &url,
                &HeaderMap::new(),
                Bytes::new(),
                &Scope::push_and_pull(r, from),
                true,
            )
            .await?;
        match resp.resp.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // An upload session was opened instead; close it.
                if let Some(loc) = location(&ep, &resp) {
                    drop(resp);
                    let _ = self
                        .send_body(
                            &ep,
                            r,
                            Method::DELETE,
                            &loc,
                            &HeaderMap::new(),
                            Bytes::new(),
                            &Scope::push(r),
                            true,
                        )
                        .await;
                }
                Ok(false)
            }
            s => {
                let detail = error_detail(resp).await;
                Err(status_error(
                    r,
                    digest,
                    s,
                    format!("mounting the blob from {from}{detail}"),
                ))
            }
        }
    }

    /// Upload blob `digest` of `size` bytes to `r`'s repository;
    /// `progress(bytes sent)` after each chunk.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        source: UploadSource<'_>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), RegistryError> {
        let ep = self.push_endpoint(r)?;
        let scope = Scope::push(r);
        let fail = |s: StatusCode, what: &str, detail: String| {
            status_error(r, digest, s, format!("{what}{detail}"))
        };
        let resp = self
            .send_body(
                &ep,
                r,
                Method::POST,
                &ep.url(r, "blobs", "uploads/"),
                &HeaderMap::new(),
                Bytes::new(),
                &scope,
                true,
            )
            .await?;
        let s = resp.resp.status();
        if s != StatusCode::ACCEPTED {
            return Err(fail(s, "starting the upload", error_detail(resp).await));
        }
        let mut url = location(&ep, &resp).ok_or_else(|| {
            fail(
                s,
                "starting the upload",
                ": no Location in the answer".into(),
            )
        })?;
        drop(resp);
        let octets = HeaderValue::from_static("application/octet-stream");
        let mut file = match &source {
            UploadSource::File(p) => Some(std::fs::File::open(p).map_err(|e| {
                RegistryError::Config(format!("blob {digest}: reading {}: {e}", p.display()))
            })?),
            UploadSource::Bytes(_) => None,
        };
        let mut sent = 0u64;
        // Chunks while more than one chunk is left; the last one goes with the PUT.
        let last = loop {
            let chunk = match (&source, &mut file) {
                (UploadSource::Bytes(b), _) => {
                    let end = (sent as usize + UPLOAD_CHUNK).min(b.len());
                    b.slice(sent as usize..end)
                }
                (UploadSource::File(p), Some(f)) => {
                    let mut buf = Vec::with_capacity(UPLOAD_CHUNK);
                    f.by_ref()
                        .take(UPLOAD_CHUNK as u64)
                        .read_to_end(&mut buf)
                        .map_err(|e| {
                            RegistryError::Config(format!(
                                "blob {digest}: reading {}: {e}",
                                p.display()
                            ))
                        })?;
                    Bytes::from(buf)
                }
                (UploadSource::File(_), None) => unreachable!("the file was opened above"),
            };
            if sent + chunk.len() as u64 >= size {
                break chunk;
            }
            if chunk.is_empty() {
                return Err(RegistryError::Config(format!(
                    "blob {digest}: the source ended after {sent} of {size} bytes"
                )));
            }
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, octets.clone());
            let range = format!("{sent}-{}", sent + chunk.len() as u64 - 1);
            h.insert(
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&range).map_err(|e| RegistryError::Config(e.to_string()))?,
            );
            let n = chunk.len() as u64;
            let resp = self
                .send_body(&ep, r, Method::PATCH, &url, &h, chunk, &scope, true)
                .await?;
            let s = resp.resp.status();
            if s != StatusCode::ACCEPTED && s != StatusCode::NO_CONTENT {
                return Err(fail(
                    s,
                    &format!("uploading bytes {range}"),
                    error_detail(resp).await,
                ));
            }
            if let Some(next) = location(&ep, &resp) {
                url = next;
            }
            resp.stats.bytes.fetch_add(n, Ordering::Relaxed);
            sent += n;
            progress(sent);
        };
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, octets);
        let n = last.len() as u64;
        let resp = self
            .send_body(
                &ep,
                r,
                Method::PUT,
                &with_query(&url, "digest", digest),
                &h,
                last,
                &scope,
                true,
            )
            .await?;
        let s = resp.resp.status();
        if s != StatusCode::CREATED && !s.is_success() {
            return Err(fail(s, "finishing the upload", error_detail(resp).await));
        }
        resp.stats.bytes.fetch_add(n, Ordering::Relaxed);
        progress(sent + n);
        Ok(())
    }

    /// PUT a manifest or index under `object` (a tag, or its digest).
    pub async fn push_manifest(
        &self,
        r: &Reference,
        object: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        let ep = self.push_endpoint(r)?;
        let mut h = HeaderMap::new();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(media_type)
                .map_err(|e| RegistryError::Config(format!("media type {media_type:?}: {e}")))?,
        );
        let resp = self
            .send_body(
                &ep,
                r,
                Method::PUT,
                &ep.url(r, "manifests", object),
                &h,
                bytes,
                &Scope::push(r),
                true,
            )
            .await?;
        let s = resp.resp.status();
        if !s.is_success() {
            let detail = error_detail(resp).await;
            return Err(status_error(
                r,
                object,
                s,
                format!("pushing the manifest{detail}"),
            ));
        }
        Ok(())
    }

    /// Read a whole blob, handing its bytes to `sink` as they arrive, and
    /// check its digest at the end. Redirects are followed (without our
    /// credentials); an answer that breaks off is resumed where it stopped.
    /// Returns the blob's size.
    pub async fn download_blob(
        &self,
        r: &Reference,
        digest: &str,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<u64, RegistryError> {
        let mut hasher = stargaze_format::digest::Hasher::new();
        let mut got = 0u64;
        let mut attempt = 0u32;
        let mut failures = Vec::new();
        let mut done = false;
        for ep in self.endpoints(r)? {
            loop {
                match self
                    .download_from(&ep, r, digest, got, &mut hasher, sink)
                    .await
                {
                    Ok(n) => {
                        got = n;
                        done = true;
                        break;
                    }
                    Err((n, e @ RegistryError::Body { .. }))
                        if attempt < self.options().retries =>
                    {
                        tracing::debug!(%digest, error = %e, "resuming a broken download");
                        got = n;
                        attempt += 1;
                        tokio::time::sleep(self.options().min_backoff * (1 << attempt.min(10)))
                            .await;
                    }
                    // Nothing handed on yet: another endpoint may have it.
                    Err((0, e)) => {
                        failures.push(crate::EndpointFailure {
                            endpoint: ep.origin.clone(),
                            mirror: ep.mirror,
                            error: e,
                        });
                        break;
                    }
                    Err((_, e)) => return Err(e),
                }
            }
            if done {
                break;
            }
        }
        if !done {
            return Err(RegistryError::after_endpoints(r, failures));
        }
        let actual = hasher.finish().to_string();
        if actual != digest {
            return Err(RegistryError::Digest {
                what: "blob".into(),
                digest: digest.into(),
                host: r.host.clone(),
            });
        }
        Ok(got)
    }

    /// One GET from byte `from` on: the new count of bytes handed on, or
    /// the count so far with the error.
    async fn download_from(
        &self,
        ep: &Endpoint,
        r: &Reference,
        digest: &str,
        from: u64,
        hasher: &mut stargaze_format::digest::Hasher,
        sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
    ) -> Result<u64, (u64, RegistryError)> {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if from > 0 {
            let v = HeaderValue::from_str(&format!("bytes={from}-"))
                .map_err(|e| (from, RegistryError::Config(e.to_string())))?;
            h.insert(http::header::RANGE, v);
        }
        let mut url = ep.url(r, "blobs", digest);
        let mut auth = true;
        let mut resp = None;
        for _ in 0..5 {
            let x = self
                .send(ep, r, Method::GET, &url, &h, auth)
                .await
                .map_err(|e| (from, e))?;
            if x.resp.status().is_redirection()
                && let Some(next) = location(ep, &x)
            {
                url = next;
                // Pre-signed storage URLs must not get the registry's token.
                auth = false;
                continue;
            }
            resp = Some(x);
            break;
        }
        let resp = resp.ok_or_else(|| {
            (
                from,
                status_error(
                    r,
                    digest,
                    StatusCode::TEMPORARY_REDIRECT,
                    "downloading the blob: too many redirects".into(),
                ),
            )
        })?;
        let status = resp.resp.status();
        let expected = if from > 0 {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        };
        if status != expected {
            let detail = error_detail(resp).await;
            return Err((
                from,
                status_error(r, digest, status, format!("downloading the blob{detail}")),
            ));
        }
        let stats = resp.stats.clone();
        let mut body = resp.resp.into_body();
        let mut got = from;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                (
                    got,
                    RegistryError::Body {
                        blob: format!("{}/{}@{digest}", r.host, r.repository),
                        reason: format!("reading the body: {e}"),
                    },
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            hasher.update(&data);
            sink(&data).map_err(|e| {
                (
                    got,
                    RegistryError::Config(format!("blob {digest}: writing it down: {e}")),
                )
            })?;
            got += data.len() as u64;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_become_urls() {
        let ep = Endpoint {
            origin: "http://127.0.0.1:5000".into(),
            path: "/v2".into(),
            mirror: false,
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            timeout: None,
        };
        assert_eq!(
            absolute(&ep, "/v2/a/blobs/uploads/u?_state=x"),
            "http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(absolute(&ep, "https://s3/x"), "https://s3/x");
        assert_eq!(
            with_query(
                "http://h/v2/a/blobs/uploads/u?_state=x",
                "digest",
                "sha256:ab"
            ),
            "http://h/v2/a/blobs/uploads/u?_state=x&digest=sha256%3Aab"
        );
        assert_eq!(
            with_query("http://h/v2/a/blobs/uploads/", "mount", "sha256:ab"),
            "http://h/v2/a/blobs/uploads/?mount=sha256%3Aab"
        );
    }
}
