//! Metric building blocks the services share: a lock-free latency
//! [`Histogram`], per-method gRPC accounting ([`RpcMetrics`], recorded by the
//! tower layer [`RpcMetricsLayer`] around a tonic server), a bounded list of
//! [`RecentErrors`] for `stargaze status`, and [`render`] which turns a
//! collector into Prometheus text for [`crate::serve_metrics`].

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the latency histograms: from a cached FUSE
/// lookup (microseconds) to a layer resolution over a slow link (seconds).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// A latency histogram that many threads update without locks.
#[derive(Debug, Default)]
pub struct Histogram {
    count: AtomicU64,
    sum_ns: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Encode as one series of a histogram family.
    pub fn encode(
        &self,
        family: &mut prometheus_client::encoding::MetricEncoder,
    ) -> std::fmt::Result {
        // prometheus-client wants each bucket's own count and sums them up
        // itself; what lies above the last bound goes in +Inf.
        let count = self.count();
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                let n = c.load(Ordering::Relaxed);
                below += n;
                (*b, n)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .chain(std::iter::once((
                f64::INFINITY,
                count.saturating_sub(below),
            )))
            .collect();
        family.encode_histogram::<NoLabelSet>(
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            &buckets,
            None,
        )
    }
}

/// Label pairs of one series.
pub type Labels = Vec<(String, String)>;

/// Write a counter or gauge family with one series per entry.
pub fn family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: &[(Labels, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    let encode = |f: prometheus_client::encoding::MetricEncoder, v: u64| {
        if matches!(kind, MetricType::Gauge) {
            ConstGauge::new(v as i64).encode(f)
        } else {
            ConstCounter::new(v).encode(f)
        }
    };
    // A single series without labels is encoded on the family itself;
    // through encode_family it would print as `name{}`.
    if let [(labels, v)] = series
        && labels.is_empty()
    {
        return encode(m, *v);
    }
    for (labels, v) in series {
        encode(m.encode_family(labels)?, *v)?;
    }
    Ok(())
}

/// Write a counter family of seconds (fractional) with one series per entry.
pub fn seconds_family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// Write a histogram family with one series per entry.
pub fn histogram_family<'a>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, &'a Histogram)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Histogram)?;
    let series: Vec<_> = series.into_iter().collect();
    if let [(labels, h)] = series.as_slice()
        && labels.is_empty()
    {
        return h.encode(&mut m);
    }
    for (labels, h) in series {
        h.encode(&mut m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Prometheus text of everything `collector` reports.
pub fn render(collector: impl Collector) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// gRPC status code names, as the `code` label and in `stargaze status`.
pub fn grpc_code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("Unknown")
}

/// Requests and latencies of a gRPC server, by method and status code.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    methods: Mutex<BTreeMap<String, Arc<MethodStats>>>,
}

/// One method's counters: recorded without locks or allocation.
#[derive(Debug, Default)]
pub struct MethodStats {
    /// Requests by gRPC status code (0..=16; anything else counts as Unknown).
    codes: [AtomicU64; 17],
    latency: Histogram,
}

impl MethodStats {
    pub fn record(&self, code: i32, took: Duration) {
        let i = usize::try_from(code).ok().filter(|&i| i < 17).unwrap_or(2);
        self.codes[i].fetch_add(1, Ordering::Relaxed);
        self.latency.observe(took);
    }
}

impl RpcMetrics {
    /// The counters of `method`, created on its first request.
    pub fn method(&self, method: &str) -> Arc<MethodStats> {
        let mut methods = self.methods.lock();
        if let Some(m) = methods.get(method) {
            return m.clone();
        }
        methods.entry(method.to_string()).or_default().clone()
    }

    /// Requests recorded, all methods and codes.
    pub fn total(&self) -> u64 {
        self.methods
            .lock()
            .values()
            .flat_map(|s| s.codes.iter())
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// `<prefix>_grpc_requests_total{method,code}` and
    /// `<prefix>_grpc_request_duration_seconds{method}`.
    pub fn encode(&self, prefix: &str, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let methods: Vec<(String, Arc<MethodStats>)> = self
            .methods
            .lock()
            .iter()
            .map(|(m, s)| (m.clone(), s.clone()))
            .collect();
        let label = |m: &str| ("method".to_string(), m.to_string());
        let requests: Vec<(Labels, u64)> = methods
            .iter()
            .flat_map(|(m, s)| {
                (0..17).filter_map(move |c| {
                    let n = s.codes[c].load(Ordering::Relaxed);
                    (n > 0).then(|| {
                        let code = ("code".to_string(), grpc_code_name(c as i32).to_string());
                        (vec![label(m), code], n)
                    })
                })
            })
            .collect();
        family(
            e,
            &format!("{prefix}_grpc_requests"),
            "gRPC requests served, by method and status code",
            MetricType::Counter,
            &requests,
        )?;
        histogram_family(
            e,
            &format!("{prefix}_grpc_request_duration_seconds"),
            "Time from a gRPC request to its response headers",
            methods.iter().map(|(m, s)| (vec![label(m)], &s.latency)),
        )
    }
}

/// A tower layer for `tonic::transport::Server::builder().layer(..)` that
/// records every request in [`RpcMetrics`]. The status code comes from the
/// `grpc-status` response header (tonic sends errors as trailers-only
/// responses); its absence means OK.
#[derive(Clone)]
pub struct RpcMetricsLayer(pub Arc<RpcMetrics>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let stats = self
            .metrics
            .method(req.uri().path().rsplit('/').next().unwrap_or_default());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await;
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                Err(_) => 13,
            };
            stats.record(code, start.elapsed());
            result
        })
    }
}

/// One error a user should see in `stargaze status`: the status RPCs'
/// message itself, so every service hands its list over as is.
pub use stargaze_proto::v1::RecentError;

/// The last few errors of a service, newest last. Repeats of the newest
/// error (same subject and message) only refresh its time, so one failing
/// layer cannot push every other error out.
#[derive(Debug)]
pub struct RecentErrors {
    capacity: usize,
    errors: Mutex<VecDeque<RecentError>>,
}

impl Default for RecentErrors {
    fn default() -> Self {
        RecentErrors::new(32)
    }
}

impl RecentErrors {
    pub fn new(capacity: usize) -> RecentErrors {
        RecentErrors {
            capacity: capacity.max(1),
            errors: Mutex::new(VecDeque::new()),
        }
    }

    pub fn push(&self, subject: impl Into<String>, message: impl Into<String>) {
        let e = RecentError {
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            subject: subject.into(),
            message: message.into(),
        };
        let mut errors = self.errors.lock();
        if let Some(pos) = errors
            .iter()
            .position(|x| x.subject == e.subject && x.message == e.message)
        {
            errors.remove(pos);
        }
        if errors.len() == self.capacity {
            errors.pop_front();
        }
        errors.push_back(e);
    }

    /// Oldest first.
    pub fn list(&self) -> Vec<RecentError> {
        self.errors.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_text() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        struct C(Histogram);
        impl std::fmt::Debug for C {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("C")
            }
        }
        impl Collector for C {
            fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
                histogram_family(&mut e, "t_seconds", "test", [(vec![], &self.0)])
            }
        }
        let text = render(C(h));
        assert!(
            text.contains("t_seconds_bucket{le=\"0.00001\"} 1"),
            "{text}"
        );
        assert!(text.contains("t_seconds_bucket{le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"30.0\"} 2"), "{text}");
        assert!(text.contains("t_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(text.contains("t_seconds_count 3"), "{text}");
    }

    #[test]
    fn recent_errors_are_bounded_and_collapse_repeats() {
        let r = RecentErrors::new(3);
        for i in 0..5 {
            r.push(format!("layer{i}"), "boom");
        }
        r.push("layer3", "boom");
        let l = r.list();
        assert_eq!(
            l.iter().map(|e| e.subject.as_str()).collect::<Vec<_>>(),
            ["layer2", "layer4", "layer3"]
        );
    }

    /// A panic while the list is locked must not make every later failed
    /// read (which records its error here) panic as well.
    #[test]
    fn a_panic_while_the_list_is_locked_leaves_it_usable() {
        let r = RecentErrors::new(3);
        std::thread::scope(|s| {
            let bug = s.spawn(|| {
                let _held = r.errors.lock();
                panic!("a bug while holding the recent errors");
            });
            assert!(bug.join().is_err());
        });
        r.push("layer", "read failed");
        assert_eq!(r.list().len(), 1);
    }

    #[test]
    fn code_names() {
        assert_eq!(grpc_code_name(0), "OK");
        assert_eq!(grpc_code_name(6), "AlreadyExists");
        assert_eq!(grpc_code_name(16), "Unauthenticated");
        assert_eq!(grpc_code_name(99), "Unknown");
    }
}
