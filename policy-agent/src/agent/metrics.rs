//! `/metrics` (Prometheus text), `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub pod: String,
    pub direction: String,
    pub verdict: String,
}

/// Flow verdicts per local pod: `namespace`, `pod` (the pod whose policies judged),
/// `direction`, `verdict`, and `policy`: the policy that decided (`ns/name`, or
/// `cnp/name` for a ClusterNetworkPolicy; empty when none did, e.g. a pod no policy
/// isolates). Bounded: only this node's pods (label sets of pods that leave are removed),
/// two directions, three verdicts (`allowed`, `denied`, `audit`), and at most
/// [`POLICIES_PER_SERIES`] policies per pod, direction and verdict (the rest count under
/// `policy="other"`); peers are not labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct FlowLabels {
    pub namespace: String,
    pub pod: String,
    pub direction: String,
    pub verdict: String,
    pub policy: String,
}

/// At most this many `policy` values per pod, direction and verdict in `flow_verdicts`.
pub const POLICIES_PER_SERIES: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub packets: Family<TrafficLabels, Counter>,
    pub bytes: Family<TrafficLabels, Counter>,
    pub reconcile_seconds: Histogram,
    /// One pass of the control loop (changes taken, compiled, a budgeted sync step).
    pub loop_step_seconds: Histogram,
    /// The longest pass so far, in seconds.
    pub loop_step_max_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub map_entries: Family<MapLabels, Gauge>,
    pub rejected_objects: Gauge,
    pub map_write_errors: Counter,
    pub endpoints: Gauge,
    pub fail_closed_endpoints: Gauge,
    pub migration_failures: Counter,
    pub migration_pending: Gauge,
    /// Set from `MapSync::too_big_count`.
    pub too_big_endpoints: Gauge,
    pub flow_verdicts: Family<FlowLabels, Counter>,
    /// The kernel's flow event counters (`FlowStats`, summed over CPUs).
    pub flow_events: Counter,
    pub flow_events_suppressed: Counter,
    pub flow_events_ring_full: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("policy_agent");
        let packets = Family::<TrafficLabels, Counter>::default();
        let bytes = Family::<TrafficLabels, Counter>::default();
        let reconcile_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let loop_step_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let loop_step_max_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let rejected_objects = Gauge::default();
        let map_write_errors = Counter::default();
        let endpoints = Gauge::default();
        let fail_closed_endpoints = Gauge::default();
        let migration_failures = Counter::default();
        let migration_pending = Gauge::default();
        let too_big_endpoints = Gauge::default();
        let flow_verdicts = Family::<FlowLabels, Counter>::default();
        let flow_events = Counter::default();
        let flow_events_suppressed = Counter::default();
        let flow_events_ring_full = Counter::default();
        registry.register(
            "flow_verdicts",
            "New flows judged and reported by the datapath's flow events, per local pod (the one whose policies judged), direction and verdict",
            flow_verdicts.clone(),
        );
        registry.register("flow_events", "Flow events the kernel wrote to the ring buffer", flow_events.clone());
        registry.register(
            "flow_events_suppressed",
            "Flow events the kernel's rate limit dropped (the packets were judged as usual)",
            flow_events_suppressed.clone(),
        );
        registry.register(
            "flow_events_ring_full",
            "Flow events dropped because the ring buffer was full (the agent read too slowly)",
            flow_events_ring_full.clone(),
        );
        registry.register("packets", "Packets judged by the datapath, per local pod, direction and verdict", packets.clone());
        registry.register("bytes", "Bytes judged by the datapath, per local pod, direction and verdict", bytes.clone());
        registry.register("reconcile_duration_seconds", "Time from a batch of changes to the maps holding them", reconcile_seconds.clone());
        registry.register(
            "loop_step_duration_seconds",
            "One pass of the control loop: the time other changes may wait (syncs are written in budgeted steps)",
            loop_step_seconds.clone(),
        );
        registry.register(
            "loop_step_max_seconds",
            "The longest pass of the control loop since the agent started",
            loop_step_max_seconds.clone(),
        );
        registry.register("map_entries", "Entries the agent keeps in each datapath map", map_entries.clone());
        registry.register("rejected_objects", "Objects refused as invalid (not enforced)", rejected_objects.clone());
        registry.register("map_write_errors", "Failed map writes (the pod concerned is fail-closed)", map_write_errors.clone());
        registry.register("endpoints", "Local pods enforced", endpoints.clone());
        registry.register(
            "fail_closed_endpoints",
            "Local pods denied everything because their tables could not be written",
            fail_closed_endpoints.clone(),
        );
        registry.register(
            "migration_failures",
            "Attempts to migrate the pinned maps of a previous agent (another layout or sizes) that failed; the previous datapath stays in force",
            migration_failures.clone(),
        );
        registry.register(
            "migration_pending",
            "1 while the previous agent's programs and maps still enforce (a migration under way or failed): not ready",
            migration_pending.clone(),
        );
        registry.register(
            "too_big_endpoints",
            "Local pods fail-closed because their tables do not fit in the maps (also counted in fail_closed_endpoints)",
            too_big_endpoints.clone(),
        );
        Metrics {
            registry,
            packets,
            bytes,
            reconcile_seconds,
            loop_step_seconds,
            loop_step_max_seconds,
            map_entries,
            rejected_objects,
            map_write_errors,
            endpoints,
            fail_closed_endpoints,
            migration_failures,
            migration_pending,
            too_big_endpoints,
            flow_verdicts,
            flow_events,
            flow_events_suppressed,
            flow_events_ring_full,
        }
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Mutex<Metrics>>,
    pub ready: Arc<AtomicBool>,
    /// The label sets of `flow_verdicts` in use (removed when their pod leaves the node).
    pub flow_label_sets: Arc<Mutex<std::collections::BTreeSet<FlowLabels>>>,
}

impl Shared {
    pub fn new() -> Shared {
        Shared { metrics: Arc::new(Mutex::new(Metrics::new())), ready: Arc::new(AtomicBool::new(false)), flow_label_sets: Arc::default() }
    }

    /// Counts a batch of named flows in `flow_verdicts`.
    pub fn count_flows(&self, flows: &[crate::flows::Flow]) {
        let m = self.metrics.lock().expect("metrics lock");
        let mut seen = self.flow_label_sets.lock().unwrap_or_else(|p| p.into_inner());
        for f in flows {
            let labels = flow_labels(f, &seen);
            m.flow_verdicts.get_or_create(&labels).inc();
            if !seen.contains(&labels) {
                seen.insert(labels);
            }
        }
    }
}

/// The label set `f` counts under, given the sets in use (`seen`): its deciding policy is
/// the first it names (the flow record lists the decider first).
fn flow_labels(f: &crate::flows::Flow, seen: &std::collections::BTreeSet<FlowLabels>) -> FlowLabels {
    let (namespace, pod) = f.subject.split_once('/').unwrap_or(("", f.subject.as_str()));
    let policy = f.policies.first().map(|p| match &p.namespace {
        Some(ns) => format!("{ns}/{}", p.name),
        None => format!("cnp/{}", p.name),
    });
    let mut labels = FlowLabels {
        namespace: namespace.to_string(),
        pod: pod.to_string(),
        direction: f.direction.clone(),
        verdict: f.verdict.clone(),
        policy: policy.unwrap_or_default(),
    };
    if !seen.contains(&labels) {
        let same_series = |l: &&FlowLabels| l.namespace == labels.namespace && l.pod == labels.pod && l.direction == labels.direction && l.verdict == labels.verdict;
        if seen.iter().filter(same_series).count() >= POLICIES_PER_SERIES {
            labels.policy = "other".to_string();
        }
    }
    labels
}

impl Default for Shared {
    fn default() -> Shared {
        Shared::new()
    }
}

async fn metrics(State(s): State<Shared>) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    let mut out = String::new();
    let m = s.metrics.lock().expect("metrics lock");
    match prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        Ok(()) => (StatusCode::OK, [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], out),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "text/plain")], e.to_string()),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Shared>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first full sync is not done, or the previous datapath still enforces (a migration of the pinned maps is pending or failed: see the log)\n",
        )
    }
}

/// Serves until the process ends.
pub async fn serve(addr: SocketAddr, shared: Shared) -> std::io::Result<()> {
    let app =
        Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(shared);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(policy: Option<(&str, &str)>) -> crate::flows::Flow {
        let policies = match policy {
            Some((ns, name)) => serde_json::json!([{"kind": "NetworkPolicy", "namespace": ns, "name": name, "role": "isolates"}]),
            None => serde_json::json!([]),
        };
        crate::flows::record::sample("x/b", policies)
    }

    fn text(shared: &Shared) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &shared.metrics.lock().unwrap().registry).unwrap();
        out
    }

    #[test]
    fn flow_verdicts_name_the_deciding_policy_and_stay_bounded() {
        let shared = Shared::new();
        shared.count_flows(&[flow(Some(("x", "deny"))), flow(Some(("x", "deny"))), flow(None)]);
        let t = text(&shared);
        let line = |policy: &str| {
            t.lines()
                .find(|l| l.starts_with("policy_agent_flow_verdicts_total{") && l.contains(&format!("policy=\"{policy}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(line("x/deny").as_deref(), Some("2"), "{t}");
        assert_eq!(line("").as_deref(), Some("1"), "{t}");
        // Many policies for one pod: the ones past the cap share one series.
        let many: Vec<_> = (0..POLICIES_PER_SERIES + 5).map(|i| format!("p{i}")).collect();
        shared.count_flows(&many.iter().map(|n| flow(Some(("x", n)))).collect::<Vec<_>>());
        let t = text(&shared);
        let series = t.lines().filter(|l| l.starts_with("policy_agent_flow_verdicts_total{")).count();
        assert_eq!(series, POLICIES_PER_SERIES + 1, "{t}");
        assert!(t.lines().any(|l| l.contains("policy=\"other\"") && l.ends_with(" 7")), "{t}");
    }
}
