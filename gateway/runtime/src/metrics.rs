//! The Prometheus endpoint: `GET /metrics` on `metrics.listen`, in the OpenMetrics text format.
//!
//! Every value is read at scrape time: the serving loop's [`StatsSnapshot`] (published once a
//! second on a watch channel) and the counters other threads keep (reloads, activity log
//! lines). A [`prometheus_client`] registry of its own (no process-global recorder) holds one
//! collector that encodes them, so nothing on the data plane touches a metric. Every name
//! starts with `waygate_`; label values come from fixed sets (reasons, stages, actions, record
//! types, the configured egress locations), never from devices or domains.
//!
//! The HTTP stage's requests by decision will be one more family here
//! (`waygate_http_requests_total{action}`), read from the snapshot like the others.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use crate::dns::resolver::{DNS_ACTIONS, LATENCY_BUCKETS, QTYPES, RCODES};
use crate::reload::{ReloadCounters, ReloadFile};
use crate::stats::StatsSnapshot;
use waygate_observe::write::DropReason as LogDrop;
use waygate_observe::{LogKind, LogStats};

/// The OpenMetrics text format's content type.
const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the collector reads at each scrape.
#[derive(Debug)]
pub struct Sources {
    /// The serving loop's latest snapshot.
    pub stats: watch::Receiver<StatsSnapshot>,
    /// Reloads of the followed files.
    pub reloads: Arc<ReloadCounters>,
    /// Activity log lines, when `logs.dir` is set.
    pub logs: Option<Arc<LogStats>>,
    /// The egress locations' names, in config order.
    pub egress_locations: Vec<String>,
    /// The HTTP stage's counters, when it inspects.
    pub http: Option<Arc<waygate_http::HttpCounters>>,
}

/// Encodes every family from [`Sources`].
#[derive(Debug)]
struct Gateway(Sources);

/// The registry holding the gateway's collector.
pub fn registry(sources: Sources) -> Registry {
    let mut registry = Registry::with_prefix("waygate");
    registry.register_collector(Box::new(Gateway(sources)));
    registry
}

/// The registry's text, as `/metrics` serves it.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::warn!(%e, "cannot encode metrics");
    }
    text
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// A counter family with one label (`key`) from `values`.
fn counters<'a>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    key: &str,
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (label, v) in values {
        let labels = [(key, label)];
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Gateway {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.stats.borrow().clone();
        let bytes = Unit::Bytes;
        gauge(
            &mut e,
            "peers",
            "Devices with a WireGuard peer (active in the registry).",
            count(s.peers),
        )?;
        gauge(
            &mut e,
            "peers_connected",
            "Peers with a WireGuard session (a handshake within the last 3 minutes).",
            count(s.peers_connected),
        )?;
        counter(
            &mut e,
            "wireguard_handshakes",
            "WireGuard handshakes completed.",
            None,
            s.traffic.handshakes,
        )?;
        {
            let mut m = e.encode_descriptor(
                "tunnel_packets",
                "IP packets through the tunnels, by direction (rx: from devices).",
                None,
                MetricType::Counter,
            )?;
            for (dir, v) in [("rx", s.traffic.rx_packets), ("tx", s.traffic.tx_packets)] {
                ConstCounter::new(v).encode(m.encode_family(&[("direction", dir)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "tunnel",
                "IP packet bytes through the tunnels, by direction (rx: from devices).",
                Some(&bytes),
                MetricType::Counter,
            )?;
            for (dir, v) in [("rx", s.traffic.rx_bytes), ("tx", s.traffic.tx_bytes)] {
                ConstCounter::new(v).encode(m.encode_family(&[("direction", dir)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "flows_open",
                "Open flows by protocol (udp counts UDP and ping flows).",
                None,
                MetricType::Gauge,
            )?;
            for (p, n) in [("tcp", s.tcp_flows), ("udp", s.udp_flows)] {
                ConstGauge::new(count(n)).encode(m.encode_family(&[("protocol", p)])?)?;
            }
        }
        gauge(
            &mut e,
            "upstream_tasks",
            "Live upstream connections and sockets.",
            count(s.upstream_tasks),
        )?;
        let wg: Vec<(String, u64)> = s
            .wireguard_drops
            .iter()
            .map(|(r, n)| (format!("{r:?}"), *n))
            .collect();
        counters(
            &mut e,
            "wireguard_dropped",
            "Datagrams the WireGuard endpoint dropped, by reason.",
            "reason",
            wg.iter().map(|(r, n)| (r.as_str(), *n)),
        )?;
        let flow: Vec<(String, u64)> = s
            .flow_drops
            .iter()
            .map(|(r, n)| (format!("{r:?}"), *n))
            .collect();
        counters(
            &mut e,
            "flow_dropped",
            "Device packets the flow table dropped, by reason.",
            "reason",
            flow.iter().map(|(r, n)| (r.as_str(), *n)),
        )?;
        let rt: Vec<(String, u64)> = s
            .runtime_drops
            .iter()
            .map(|(r, n)| (format!("{r:?}"), *n))
            .collect();
        counters(
            &mut e,
            "runtime_dropped",
            "Work the runtime's full queues dropped, by reason.",
            "reason",
            rt.iter().map(|(r, n)| (r.as_str(), *n)),
        )?;
        {
            let mut m = e.encode_descriptor(
                "policy_decisions",
                "Final policy decisions by stage and action.",
                None,
                MetricType::Counter,
            )?;
            for (i, action) in DNS_ACTIONS.iter().enumerate() {
                let labels = [("stage", "dns"), ("action", *action)];
                ConstCounter::new(s.dns.decisions[i]).encode(m.encode_family(&labels)?)?;
            }
            for (kind, v) in &s.flow_decisions {
                let (stage, action) = kind.labels();
                let labels = [("stage", stage), ("action", action)];
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
        self.encode_dns(&mut e, &s)?;
        {
            let mut m = e.encode_descriptor(
                "egress_location_up",
                "Whether each egress location passes its health checks (1) or is down (0).",
                None,
                MetricType::Gauge,
            )?;
            for (name, up) in self.0.egress_locations.iter().zip(&s.egress_up) {
                let labels = [("location", name.as_str())];
                ConstGauge::new(i64::from(*up)).encode(m.encode_family(&labels)?)?;
            }
        }
        counters(
            &mut e,
            "reloads",
            "Followed files reloaded (the new version took effect), by file.",
            "file",
            ReloadFile::ALL.map(|f| (f.name(), self.0.reloads.done(f))),
        )?;
        counters(
            &mut e,
            "reload_failures",
            "Followed files that failed to reload (the previous version stayed), by file.",
            "file",
            ReloadFile::ALL.map(|f| (f.name(), self.0.reloads.failed(f))),
        )?;
        if let Some(http) = &self.0.http {
            counters(
                &mut e,
                "http_requests",
                "HTTP requests (and TLS connections decided on SNI alone) by the HTTP stage's decision.",
                "decision",
                http.by_decision(),
            )?;
        }
        if let Some(logs) = &self.0.logs {
            counters(
                &mut e,
                "log_lines_written",
                "Activity log lines written, by log.",
                "log",
                LogKind::ALL.map(|k| (k.name(), logs.written(k))),
            )?;
            {
                let mut m = e.encode_descriptor(
                    "log_lines_dropped",
                    "Activity log lines dropped (a full queue or a failed write such as a full disk), by log and reason.",
                    None,
                    MetricType::Counter,
                )?;
                for k in LogKind::ALL {
                    for r in LogDrop::ALL {
                        let labels = [("log", k.name()), ("reason", r.name())];
                        ConstCounter::new(logs.dropped(k, r)).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            counters(
                &mut e,
                "log_rotations",
                "Activity log files rotated, by log.",
                "log",
                LogKind::ALL.map(|k| (k.name(), logs.rotations(k))),
            )?;
        }
        Ok(())
    }
}

impl Gateway {
    fn encode_dns(&self, e: &mut DescriptorEncoder<'_>, s: &StatsSnapshot) -> std::fmt::Result {
        let d = &s.dns;
        counter(
            e,
            "dns_queries",
            "DNS queries handled (all outcomes).",
            None,
            d.queries,
        )?;
        {
            let mut m = e.encode_descriptor(
                "dns_answers",
                "DNS answers by question type and response code.",
                None,
                MetricType::Counter,
            )?;
            for (t, qtype) in QTYPES.iter().enumerate() {
                for (r, rcode) in RCODES.iter().enumerate() {
                    let v = d.answers[t][r];
                    // Pairs never seen are left out: 91 zero series would drown the rest.
                    if v == 0 && !(*qtype == "A" && *rcode == "NOERROR") {
                        continue;
                    }
                    let labels = [("qtype", *qtype), ("rcode", *rcode)];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        counter(
            e,
            "dns_cache_hits",
            "DNS queries answered from the cache.",
            None,
            d.cache_hits,
        )?;
        {
            let m = e.encode_descriptor(
                "dns_cache_hit_ratio",
                "Share of DNS queries answered from the cache since the start.",
                None,
                MetricType::Gauge,
            )?;
            let ratio = if d.queries == 0 {
                0.0
            } else {
                d.cache_hits as f64 / d.queries as f64
            };
            ConstGauge::new(ratio).encode(m)?;
        }
        counter(
            e,
            "dns_upstream_queries",
            "DNS queries sent upstream.",
            None,
            d.upstream,
        )?;
        counter(
            e,
            "dns_upstream_errors",
            "Upstream DNS queries that got no usable answer from any upstream (answered SERVFAIL).",
            None,
            d.upstream_errors,
        )?;
        counter(
            e,
            "dns_dropped",
            "Unreadable DNS datagrams dropped unanswered.",
            None,
            d.dropped,
        )?;
        counter(
            e,
            "dns_client_limited",
            "DNS queries answered SERVFAIL at once: the device had limits.dns_queries_per_device waiting.",
            None,
            d.client_limited,
        )?;
        let seconds = Unit::Seconds;
        let mut m = e.encode_descriptor(
            "dns_upstream_duration",
            "How long upstream DNS queries took, answered or failed.",
            Some(&seconds),
            MetricType::Histogram,
        )?;
        let h = &d.upstream_latency;
        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .zip(h.buckets.iter().copied())
            .collect();
        buckets.push((f64::MAX, h.buckets[LATENCY_BUCKETS.len()]));
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_micros as f64 / 1e6,
            h.count(),
            &buckets,
            None,
        )
    }
}

/// Serves `/metrics` on `listen` from a thread of its own (a scrape, or a client hammering the
/// endpoint, takes no time from the data plane's thread); fails at once when it cannot listen.
pub fn serve(listen: SocketAddr, registry: Registry) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("metrics.listen: cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("metrics: cannot start the async runtime")?;
    tracing::info!(%listen, "metrics served at /metrics");
    let registry = Arc::new(registry);
    std::thread::Builder::new()
        .name("waygate-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(err) => {
                        tracing::warn!(%err, "metrics: cannot use the listener");
                        return;
                    }
                };
                loop {
                    let stream = match listener.accept().await {
                        Ok((stream, _)) => stream,
                        Err(err) => {
                            tracing::debug!(%err, "metrics accept failed");
                            // Out of descriptors, most likely: let some close.
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let registry = registry.clone();
                    tokio::spawn(crate::dns::server::serve_http(stream, move |req| {
                        let registry = registry.clone();
                        async move { respond(&req, &registry) }
                    }));
                }
            });
        })?;
    Ok(())
}

fn respond<B>(req: &Request<B>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, body, content) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, render(registry), CONTENT),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".to_string(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_string(),
            "text/plain",
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use waygate_engine::flow::FlowDrop;
    use waygate_engine::gateway::FlowDecisionKind;

    fn scrape(
        snapshot: StatsSnapshot,
        logs: Option<Arc<LogStats>>,
    ) -> (String, prometheus_parse::Scrape) {
        let (tx, rx) = watch::channel(StatsSnapshot::default());
        tx.send_replace(snapshot);
        let reloads = Arc::new(ReloadCounters::default());
        let http = Arc::new(waygate_http::HttpCounters::default());
        http.blocked
            .fetch_add(6, std::sync::atomic::Ordering::Relaxed);
        let registry = registry(Sources {
            stats: rx,
            reloads,
            logs,
            egress_locations: vec!["frankfurt".into()],
            http: Some(http),
        });
        let text = render(&registry);
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("the text parses");
        (text, parsed)
    }

    fn value(
        scrape: &prometheus_parse::Scrape,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    #[test]
    fn the_text_parses_every_name_starts_with_waygate_and_values_come_from_the_snapshot() {
        let mut s = StatsSnapshot {
            peers: 3,
            peers_connected: 2,
            tcp_flows: 5,
            udp_flows: 1,
            flow_drops: vec![(FlowDrop::PolicyBlocked, 7)],
            flow_decisions: vec![(FlowDecisionKind::NetworkBlock, 7)],
            egress_up: vec![true],
            ..StatsSnapshot::default()
        };
        s.traffic.rx_bytes = 1234;
        s.traffic.handshakes = 4;
        s.dns.queries = 10;
        s.dns.cache_hits = 4;
        s.dns.answers[0][0] = 9; // A NOERROR
        s.dns.answers[1][3] = 1; // AAAA NXDOMAIN
        s.dns.decisions[1] = 2; // block
        s.dns.upstream_errors = 1;
        s.dns.client_limited = 7;
        s.dns.upstream_latency.observe(Duration::from_millis(3));
        s.dns.upstream_latency.observe(Duration::from_secs(9));
        let logs = Arc::new(LogStats::default());
        let (text, scrape) = scrape(s, Some(logs));
        assert!(!scrape.samples.is_empty());
        for sample in &scrape.samples {
            assert!(sample.metric.starts_with("waygate_"), "{}", sample.metric);
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            assert!(line.starts_with("# TYPE waygate_"), "{line}");
        }
        assert_eq!(value(&scrape, "waygate_peers", &[]), Some(3.0));
        assert_eq!(
            value(
                &scrape,
                "waygate_http_requests_total",
                &[("decision", "block")]
            ),
            Some(6.0)
        );
        assert_eq!(
            value(&scrape, "waygate_flows_open", &[("protocol", "tcp")]),
            Some(5.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_tunnel_bytes_total",
                &[("direction", "rx")]
            ),
            Some(1234.0)
        );
        assert_eq!(
            value(&scrape, "waygate_wireguard_handshakes_total", &[]),
            Some(4.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_flow_dropped_total",
                &[("reason", "PolicyBlocked")]
            ),
            Some(7.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_policy_decisions_total",
                &[("stage", "network"), ("action", "block")]
            ),
            Some(7.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_policy_decisions_total",
                &[("stage", "dns"), ("action", "block")]
            ),
            Some(2.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_dns_answers_total",
                &[("qtype", "AAAA"), ("rcode", "NXDOMAIN")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&scrape, "waygate_dns_cache_hit_ratio", &[]),
            Some(0.4)
        );
        assert_eq!(
            value(&scrape, "waygate_dns_upstream_errors_total", &[]),
            Some(1.0)
        );
        assert_eq!(
            value(&scrape, "waygate_dns_client_limited_total", &[]),
            Some(7.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_egress_location_up",
                &[("location", "frankfurt")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &scrape,
                "waygate_log_lines_dropped_total",
                &[("log", "dns"), ("reason", "write_error")]
            ),
            Some(0.0)
        );
        assert!(
            text.contains("waygate_dns_upstream_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("waygate_dns_upstream_duration_seconds_bucket{le=\"+Inf\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("waygate_dns_upstream_duration_seconds_count 2"),
            "{text}"
        );
    }

    #[test]
    fn without_activity_logs_there_are_no_log_families() {
        let (text, _) = scrape(StatsSnapshot::default(), None);
        assert!(!text.contains("waygate_log_lines"));
    }
}
