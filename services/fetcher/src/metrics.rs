//! Prometheus metrics of the fetcher, read from its counters at each scrape
//! (no bookkeeping on the hot path beyond the atomics already kept).
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `stargaze_fetcher_registry_requests_total` | host | HTTP requests sent |
//! | `stargaze_fetcher_registry_bytes_total` | host | body bytes received |
//! | `stargaze_fetcher_registry_errors_total` | host | failed requests (before retries) |
//! | `stargaze_fetcher_registry_retries_total` | host | retries |
//! | `stargaze_fetcher_registry_http2_responses_total` | host | answers over HTTP/2 |
//! | `stargaze_fetcher_registry_failovers_total` | host | blob reads that left this endpoint for the next after it failed |
//! | `stargaze_fetcher_registry_request_duration_seconds` | host | histogram, to response headers |
//! | `stargaze_fetcher_layer_chunks` | layer | chunks in the layer |
//! | `stargaze_fetcher_layer_chunks_present` | layer | chunks in the cache |
//! | `stargaze_fetcher_chunks_fetched_total` | layer | chunks fetched, verified and stored |
//! | `stargaze_fetcher_chunk_cache_hits_total` | layer | chunks asked for that were present |
//! | `stargaze_fetcher_range_requests_total` | layer | reads issued (one HTTP request each) |
//! | `stargaze_fetcher_ranges_total` | layer | byte ranges in those reads (merge ratio = chunks / requests) |
//! | `stargaze_fetcher_compressed_bytes_total` | layer | compressed bytes read |
//! | `stargaze_fetcher_fetched_bytes_total` | purpose | compressed bytes read, by what asked for them (`read`, `whole_file`, `neighbours`, `sweep`, `loads`, `entrypoint`, `landmark`, `trace`, `background`; `merge_gap`: bytes between wanted members read to save a range) |
//! | `stargaze_fetcher_verification_failures_total` | layer | chunks whose bytes did not match |
//! | `stargaze_fetcher_decode_cpu_seconds_total` | stage | CPU time storing chunks: `decompress`, `verify` (sha256), `write` (content files, presence bits) |
//! | `stargaze_fetcher_entrypoint_files_total` | | files fetched by the entrypoint prefetch (program, interpreter, libraries) |
//! | `stargaze_fetcher_entrypoint_bytes_total` | | their uncompressed bytes |
//! | `stargaze_fetcher_loads_files_total` | | files fetched because a program being read loads them (`loads.rs`: interpreters, libraries; the entrypoint prefetch's included) |
//! | `stargaze_fetcher_loads_bytes_total` | | their uncompressed bytes |
//! | `stargaze_fetcher_cache_limit_bytes` | | `cache_size_limit` (only with a limit, as the rest of these) |
//! | `stargaze_fetcher_cache_bytes` | | cache size at the last eviction pass |
//! | `stargaze_fetcher_cache_kept_bytes` | | of it, bytes of layers in use or used recently |
//! | `stargaze_fetcher_cache_eviction_passes_total` | | eviction passes (scans) |
//! | `stargaze_fetcher_cache_evicted_layers_total` | | layers evicted |
//! | `stargaze_fetcher_cache_evicted_files_total` | | content files evicted |
//! | `stargaze_fetcher_cache_evicted_bytes_total` | | bytes freed by eviction |
//! | `stargaze_fetcher_grpc_requests_total` | method, code | `stargaze.v1.Fetcher` requests |
//! | `stargaze_fetcher_grpc_request_duration_seconds` | method | their latency |

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use stargaze_registry::client::LATENCY_BUCKETS;
use stargaze_service::metrics::{Labels, family, render};

use crate::service::FetcherService;

#[derive(Debug)]
struct FetcherCollector(FetcherService);

impl std::fmt::Debug for FetcherService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FetcherService")
    }
}

type Series = Vec<(Labels, u64)>;

impl Collector for FetcherCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let hosts = self.0.shared.layers.client.stats();
        let per_host = |f: &dyn Fn(&stargaze_registry::HostStats) -> &AtomicU64| -> Series {
            hosts
                .iter()
                .map(|(h, s)| {
                    (
                        vec![("host".to_string(), h.clone())],
                        f(s).load(Ordering::Relaxed),
                    )
                })
                .collect()
        };
        family(
            &mut e,
            "stargaze_fetcher_registry_requests",
            "HTTP requests sent to registries",
            MetricType::Counter,
            &per_host(&|s| &s.requests),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_registry_bytes",
            "Body bytes received from registries",
            MetricType::Counter,
            &per_host(&|s| &s.bytes),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_registry_errors",
            "Failed registry requests, counted before retries",
            MetricType::Counter,
            &per_host(&|s| &s.errors),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_registry_retries",
            "Registry requests retried",
            MetricType::Counter,
            &per_host(&|s| &s.retries),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_registry_http2_responses",
            "Registry answers received over HTTP/2",
            MetricType::Counter,
            &per_host(&|s| &s.http2),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_registry_failovers",
            "Blob reads that left this endpoint for the next one after it failed",
            MetricType::Counter,
            &per_host(&|s| &s.failovers),
        )?;
        {
            let mut m = e.encode_descriptor(
                "stargaze_fetcher_registry_request_duration_seconds",
                "Time from sending a registry request to its response headers",
                None,
                MetricType::Histogram,
            )?;
            for (h, s) in &hosts {
                // Each bucket's own count (prometheus-client sums them); what
                // lies above the last bound goes in +Inf.
                let requests = s.requests.load(Ordering::Relaxed);
                let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                    .iter()
                    .zip(&s.latency_buckets)
                    .map(|(b, c)| (*b, c.load(Ordering::Relaxed)))
                    .collect();
                let below: u64 = buckets.iter().map(|(_, n)| n).sum();
                buckets.push((f64::INFINITY, requests.saturating_sub(below)));
                let labels = vec![("host".to_string(), h.clone())];
                m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                    s.latency_us.load(Ordering::Relaxed) as f64 / 1e6,
                    requests,
                    &buckets,
                    None,
                )?;
            }
        }
        let layers = self.0.layers();
        let per_layer = |f: &dyn Fn(&crate::engine::Layer) -> u64| -> Series {
            layers
                .iter()
                .map(|l| (vec![("layer".to_string(), l.digest.to_string())], f(l)))
                .collect()
        };
        family(
            &mut e,
            "stargaze_fetcher_layer_chunks",
            "Chunks in the layer",
            MetricType::Gauge,
            &per_layer(&|l| l.progress().1 as u64),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_layer_chunks_present",
            "Chunks of the layer in the cache",
            MetricType::Gauge,
            &per_layer(&|l| l.progress().0 as u64),
        )?;
        let c = |f: fn(&crate::engine::LayerCounters) -> &AtomicU64| {
            per_layer(&move |l| f(&l.counters).load(Ordering::Relaxed))
        };
        family(
            &mut e,
            "stargaze_fetcher_chunks_fetched",
            "Chunks fetched, verified and stored",
            MetricType::Counter,
            &c(|c| &c.chunks_fetched),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_chunk_cache_hits",
            "Chunks asked for that were already present",
            MetricType::Counter,
            &c(|c| &c.chunks_hit),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_range_requests",
            "Reads issued to the registry (one HTTP request each)",
            MetricType::Counter,
            &c(|c| &c.requests),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_ranges",
            "Byte ranges in those reads",
            MetricType::Counter,
            &c(|c| &c.ranges),
        )?;
        family(
            &mut e,
            "stargaze_fetcher_compressed_bytes",
            "Compressed bytes read for chunks",
            MetricType::Counter,
            &c(|c| &c.compressed_bytes),
        )?;
        let fetched = &crate::purpose::FETCHED;
        let mut by_purpose: Series = crate::Purpose::ALL
            .iter()
            .map(|&p| (vec![("purpose".into(), p.label().into())], fetched.get(p)))
            .collect();
        by_purpose.push((vec![("purpose".into(), "merge_gap".into())], fetched.gaps()));
        family(
            &mut e,
            "stargaze_fetcher_fetched_bytes",
            "Compressed bytes read, by what asked for them",
            MetricType::Counter,
            &by_purpose,
        )?;
        family(
            &mut e,
            "stargaze_fetcher_verification_failures",
            "Chunks whose bytes did not match their digest",
            MetricType::Counter,
            &c(|c| &c.verification_failures),
        )?;
        let (decompress, verify, write) = crate::engine::STAGE_CPU.seconds();
        stargaze_service::metrics::seconds_family(
            &mut e,
            "stargaze_fetcher_decode_cpu_seconds",
            "CPU time spent storing fetched chunks, by stage",
            &[
                (vec![("stage".into(), "decompress".into())], decompress),
                (vec![("stage".into(), "verify".into())], verify),
                (vec![("stage".into(), "write".into())], write),
            ],
        )?;
        for (name, help, v) in [
            (
                "stargaze_fetcher_entrypoint_files",
                "Files fetched by the entrypoint prefetch",
                &self.0.shared.entrypoint_files,
            ),
            (
                "stargaze_fetcher_entrypoint_bytes",
                "Uncompressed bytes of those files",
                &self.0.shared.entrypoint_bytes,
            ),
            (
                "stargaze_fetcher_loads_files",
                "Files fetched because a program being read loads them",
                &self.0.shared.loads.files,
            ),
            (
                "stargaze_fetcher_loads_bytes",
                "Uncompressed bytes of those files",
                &self.0.shared.loads.bytes,
            ),
        ] {
            let v = vec![(Labels::new(), v.load(Ordering::Relaxed))];
            family(&mut e, name, help, MetricType::Counter, &v)?;
        }
        if let Some(limit) = &self.0.size_limit() {
            let t = limit.totals();
            let last = t.last.clone().unwrap_or_default();
            let one = |v: u64| vec![(Labels::new(), v)];
            for (name, help, kind, v) in [
                (
                    "stargaze_fetcher_cache_limit_bytes",
                    "The cache's size limit",
                    MetricType::Gauge,
                    limit.limit(),
                ),
                (
                    "stargaze_fetcher_cache_bytes",
                    "Cache size at the last eviction pass",
                    MetricType::Gauge,
                    last.usage_after,
                ),
                (
                    "stargaze_fetcher_cache_kept_bytes",
                    "Of it, bytes of layers attached or used recently",
                    MetricType::Gauge,
                    last.kept_bytes,
                ),
                (
                    "stargaze_fetcher_cache_eviction_passes",
                    "Eviction passes (scans of the cache)",
                    MetricType::Counter,
                    t.passes,
                ),
                (
                    "stargaze_fetcher_cache_evicted_layers",
                    "Layers evicted from the cache",
                    MetricType::Counter,
                    t.layers,
                ),
                (
                    "stargaze_fetcher_cache_evicted_files",
                    "Content files evicted from the cache",
                    MetricType::Counter,
                    t.files,
                ),
                (
                    "stargaze_fetcher_cache_evicted_bytes",
                    "Bytes freed by eviction",
                    MetricType::Counter,
                    t.bytes,
                ),
            ] {
                family(&mut e, name, help, kind, &one(v))?;
            }
        }
        self.0.shared.rpc.encode("stargaze_fetcher", &mut e)
    }
}

impl FetcherService {
    /// What the gRPC server records (install with `RpcMetricsLayer`).
    pub fn rpc_metrics(&self) -> std::sync::Arc<stargaze_service::metrics::RpcMetrics> {
        self.shared.rpc.clone()
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render_metrics(&self) -> String {
        render(FetcherCollector(self.clone()))
    }
}
